"""Model back ends behind one protocol (engines/base.py); `build_small_engine` and `build_frontier_engine` choose.

Heavy imports (llama.cpp, vLLM, provider SDKs) happen inside each branch, so importing docroute costs nothing and a
missing optional back end only matters to the jobs that use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from docroute.engines.base import Engine
from docroute.schemas.spec import ExtractExample, FrontierSpec, SmallModelSpec, TaskSpec

if TYPE_CHECKING:
    from docroute.engines.extract.ranker import ExtractionRanker
    from docroute.engines.local.classify_choice import ClassifierChoice
    from docroute.engines.local.head import LabelHead


def build_small_engine(
    spec: SmallModelSpec,
    task: TaskSpec,
    examples: Sequence[tuple[str, str]] = (),
    head: LabelHead | None = None,
    *,
    extract_examples: Sequence[ExtractExample] = (),
    ranker: ExtractionRanker | None = None,
    measured: ClassifierChoice | None = None,
) -> Engine:
    """Create the engine that answers every document first (with what `docroute train` promoted, if anything).

    Classification by vectors (a head or zero-shot similarity) and extraction by learned rankers are engines of
    their own whatever the small model is; the generative engine is built only for what is left of the task, so a
    job answered wholly by the bundled encoder and rankers never loads a language model. The choices and their
    evidence ride on the engine (`classifier_choice`, `extraction_choice`) for the run log and summary.
    """
    from docroute.engines.extract.extractor import ExtractMethod, RankerExtractor, plan_extraction
    from docroute.engines.local.classifier import EncoderClassifier, SplitTaskEngine
    from docroute.engines.local.classify_choice import ClassifyMethod, plan_classifier

    parts: list[Engine] = []
    left: dict[str, object] = {"classify": task.classify, "extract": task.extract}
    classifier_choice = extraction_choice = None
    if task.classify is not None:
        plan = plan_classifier(spec, task.classify, examples, head, measured=measured)
        classifier_choice = plan.choice
        if plan.choice.method != ClassifyMethod.LABEL_SCORING:
            assert plan.encoder is not None and plan.head is not None
            classifier = EncoderClassifier(task.classify, plan.encoder, plan.head, method=plan.choice.method.value)
            classifier.classifier_choice = plan.choice
            parts.append(classifier)
            left["classify"] = None
    if task.extract is not None:
        extraction_choice, rankers = plan_extraction(spec, task.extract, extract_examples, ranker)
        if extraction_choice.method == ExtractMethod.RANKER and rankers is not None:
            parts.append(RankerExtractor(task.extract, rankers))
            left["extract"] = None
    if left["classify"] is not None or left["extract"] is not None:
        remaining = task.model_copy(update=left)
        parts.insert(0, _generative_engine(spec, remaining, examples))
    engine = parts[0] if len(parts) == 1 else SplitTaskEngine(parts)
    engine.classifier_choice = classifier_choice  # type: ignore[attr-defined]  # every engine here declares it
    engine.extraction_choice = extraction_choice  # type: ignore[attr-defined]
    return engine


def _generative_engine(spec: SmallModelSpec, task: TaskSpec, examples: Sequence[tuple[str, str]]) -> Engine:
    match spec.engine:
        case "llamacpp":
            from docroute.engines.local.llamacpp import LlamaCppEngine

            return LlamaCppEngine(spec, task, examples=examples)
        case "vllm":
            from docroute.engines.local.vllm import VllmEngine

            return VllmEngine(spec, task, examples=examples)
        case "openai_compatible":
            from docroute.engines.remote.openai_compat import engine_from_small_spec

            return engine_from_small_spec(spec, task)
    raise ValueError(f"unknown small-model engine {spec.engine!r}")  # pragma: no cover - spec validation


def build_frontier_engine(spec: FrontierSpec, task: TaskSpec) -> Engine:
    """Create the engine that answers escalated rows."""
    match spec.provider:
        case "openai" | "openai_compatible":
            from docroute.engines.remote.openai_compat import engine_from_frontier_spec

            return engine_from_frontier_spec(spec, task)
        case "anthropic":
            from docroute.engines.remote.anthropic import engine_from_frontier_spec as anthropic_engine

            return anthropic_engine(spec, task)
    raise ValueError(f"unknown frontier provider {spec.provider!r}")  # pragma: no cover - spec validation

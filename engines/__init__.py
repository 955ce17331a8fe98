"""Model back ends behind one protocol (engines/base.py); `build_small_engine` and `build_frontier_engine` choose.

Heavy imports (llama.cpp, vLLM, provider SDKs) happen inside each branch, so importing docroute costs nothing and a
missing optional back end only matters to the jobs that use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from docroute.engines.base import Engine
from docroute.schemas.spec import FrontierSpec, SmallModelSpec, TaskSpec

if TYPE_CHECKING:
    from docroute.engines.head import LabelHead


def build_small_engine(
    spec: SmallModelSpec, task: TaskSpec, examples: Sequence[tuple[str, str]] = (), head: LabelHead | None = None
) -> Engine:
    """Create the engine that answers every document first (with a head `docroute train` promoted, if any).

    Classification by vectors (a head or zero-shot similarity) is its own engine whatever the small model is; a job
    that also extracts pairs it with the generative engine, built for the extraction alone, so a classify-only job
    with the bundled encoder never loads a language model. The choice and its evidence ride on the engine as
    `classifier_choice` for the run log and summary.
    """
    from docroute.engines.classifier import EncoderClassifier, SplitTaskEngine
    from docroute.engines.classify_choice import ClassifyMethod, plan_classifier

    if task.classify is None:
        return _generative_engine(spec, task, examples)
    plan = plan_classifier(spec, task.classify, examples, head)
    if plan.choice.method == ClassifyMethod.LABEL_SCORING:
        engine = _generative_engine(spec, task, examples)
        engine.classifier_choice = plan.choice  # type: ignore[attr-defined]  # every generative engine declares it
        return engine
    assert plan.encoder is not None and plan.head is not None
    classifier = EncoderClassifier(task.classify, plan.encoder, plan.head, method=plan.choice.method.value)
    classifier.classifier_choice = plan.choice
    if task.extract is None:
        return classifier
    extractor = _generative_engine(spec, task.model_copy(update={"classify": None}), examples)
    return SplitTaskEngine(classifier, extractor)


def _generative_engine(spec: SmallModelSpec, task: TaskSpec, examples: Sequence[tuple[str, str]]) -> Engine:
    match spec.engine:
        case "llamacpp":
            from docroute.engines.llamacpp import LlamaCppEngine

            return LlamaCppEngine(spec, task, examples=examples)
        case "vllm":
            from docroute.engines.vllm import VllmEngine

            return VllmEngine(spec, task, examples=examples)
        case "openai_compatible":
            from docroute.engines.openai_compat import engine_from_small_spec

            return engine_from_small_spec(spec, task)
    raise ValueError(f"unknown small-model engine {spec.engine!r}")  # pragma: no cover - spec validation


def build_frontier_engine(spec: FrontierSpec, task: TaskSpec) -> Engine:
    """Create the engine that answers escalated rows."""
    match spec.provider:
        case "openai" | "openai_compatible":
            from docroute.engines.openai_compat import engine_from_frontier_spec

            return engine_from_frontier_spec(spec, task)
        case "anthropic":
            from docroute.engines.anthropic import engine_from_frontier_spec as anthropic_engine

            return anthropic_engine(spec, task)
    raise ValueError(f"unknown frontier provider {spec.provider!r}")  # pragma: no cover - spec validation

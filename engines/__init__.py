"""Model back ends behind one protocol (engines/base.py); `build_small_engine` and `build_frontier_engine` choose.

Heavy imports (llama.cpp, vLLM, provider SDKs) happen inside each branch, so importing docroute costs nothing and a
missing optional back end only matters to the jobs that use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from docroute.engines.base import Engine, EngineUnavailableError
from docroute.schemas.spec import FrontierSpec, SmallModelSpec, TaskSpec

if TYPE_CHECKING:
    from docroute.engines.head import LabelHead


def build_small_engine(
    spec: SmallModelSpec, task: TaskSpec, examples: Sequence[tuple[str, str]] = (), head: LabelHead | None = None
) -> Engine:
    """Create the engine that answers every document first (with a head `docroute train` promoted, if any)."""
    if head is not None and spec.engine != "llamacpp":
        raise EngineUnavailableError(f"a trained classification head needs the llamacpp engine, not {spec.engine}")
    match spec.engine:
        case "llamacpp":
            from docroute.engines.llamacpp import LlamaCppEngine

            return LlamaCppEngine(spec, task, examples=examples, head=head)
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

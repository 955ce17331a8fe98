"""Build engines once per worker process and run a shard's documents through them.

Loading a model, calibrating its label prior or training an embedding head takes seconds to minutes, so engines
are cached per process under a key of everything that shapes their answers; every shard a worker runs reuses them.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Sequence

from docroute.engines import build_frontier_engine, build_small_engine
from docroute.engines.base import Engine, EngineError, Prediction, Request
from docroute.schemas.spec import JobSpec
from docroute.tasks.examples import load_labeled_examples

_ENGINES: dict[str, Engine] = {}
_ENGINE_LOCKS: dict[str, threading.Lock] = {}
_REGISTRY_LOCK = threading.Lock()


def _cached(key: str, build: Callable[[], Engine]) -> Engine:
    with _REGISTRY_LOCK:
        engine = _ENGINES.get(key)
        if engine is not None:
            return engine
        lock = _ENGINE_LOCKS.setdefault(key, threading.Lock())
    with lock:  # one thread builds; the others wait for it instead of loading a second copy
        engine = _ENGINES.get(key)
        if engine is None:
            engine = build()
            with _REGISTRY_LOCK:
                _ENGINES[key] = engine
        return engine


def small_engine(spec: JobSpec) -> Engine:
    """Return this process's small-model engine for the job."""
    examples: list[tuple[str, str]] = []
    if spec.task.classify is not None:
        examples = load_labeled_examples(spec.task.classify)
    digest = hashlib.sha256(spec.spec_hash().encode())
    for text, label in examples:
        digest.update(text.encode() + b"\x00" + label.encode() + b"\x01")
    return _cached("small:" + digest.hexdigest(), lambda: build_small_engine(spec.small_model, spec.task, examples))


def frontier_engine(spec: JobSpec) -> Engine | None:
    """Return this process's frontier engine for the job, or None when the job has no frontier."""
    if spec.frontier is None:
        return None
    frontier = spec.frontier
    secret = frontier.api_key.get_secret_value() if frontier.api_key else ""
    key = (
        "frontier:"
        + hashlib.sha256(
            (spec.spec_hash() + frontier.model_dump_json(exclude={"api_key"}) + secret).encode()
        ).hexdigest()
    )
    return _cached(key, lambda: build_frontier_engine(frontier, spec.task))


def run_engine(engine: Engine, requests: Sequence[Request]) -> list[Prediction]:
    """Answer requests; a failure of the whole batch becomes one error prediction per request, never a lost row."""
    if not requests:
        return []
    try:
        return engine.predict(requests)
    except EngineError as exc:
        return [Prediction(id=r.id, model=engine.name, error=str(exc), retryable=True) for r in requests]


def clear_engine_cache() -> None:
    """Close and forget every cached engine (tests, and workers that switch jobs)."""
    with _REGISTRY_LOCK:
        engines = list(_ENGINES.values())
        _ENGINES.clear()
        _ENGINE_LOCKS.clear()
    for engine in engines:
        engine.close()

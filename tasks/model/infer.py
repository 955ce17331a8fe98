"""Build engines once per worker process and run a shard's documents through them.

Loading a model, calibrating its label prior or training an embedding head takes seconds to minutes, so engines
are cached per process under a key of everything that shapes their answers; every shard a worker runs reuses them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, nullcontext

from fsspec.core import url_to_fs

from docroute.engines import build_frontier_engine, build_small_engine
from docroute.engines.base import Engine, EngineError, Prediction, Request
from docroute.engines.local.classify_choice import ClassifierChoice, measurement_key
from docroute.engines.remote.client_base import AsyncClientEngine, SharedGate
from docroute.schemas.errors import DocrouteError
from docroute.schemas.spec import FrontierSpec, JobSpec
from docroute.tasks.ingest.examples import load_extraction_examples, load_labeled_examples
from docroute.tasks.model.classifier_choices import load_choice, save_choice
from docroute.tasks.model.heads import load_head
from docroute.tasks.model.rankers import load_ranker

_ENGINES: dict[str, Engine] = {}
_ENGINE_LOCKS: dict[str, threading.Lock] = {}
_REGISTRY_LOCK = threading.Lock()
_BUILT_BY_THIS_THREAD = threading.local()  # how many engines this thread built: a shard counts its own loads


def engines_built_by_this_thread() -> int:
    """Engines this thread has built so far (a shard compares the count before and after itself)."""
    return getattr(_BUILT_BY_THIS_THREAD, "count", 0)


def _cached(key: str, build: Callable[[], Engine]) -> Engine:
    with _REGISTRY_LOCK:
        engine = _ENGINES.get(key)
        if engine is not None:
            return engine
        lock = _ENGINE_LOCKS.setdefault(key, threading.Lock())
    with lock:  # one thread builds; the others wait for it instead of loading a second copy
        engine = _ENGINES.get(key)
        if engine is None:
            started = time.perf_counter()
            engine = build()
            _BUILT_BY_THIS_THREAD.count = engines_built_by_this_thread() + 1
            _run_logger().info(
                "built the %s engine %s in worker process %d in %.1f s; this process reuses it for every shard",
                key.split(":", 1)[0],
                engine.name,
                os.getpid(),
                time.perf_counter() - started,
            )
            with _REGISTRY_LOCK:
                _ENGINES[key] = engine
        return engine


def _run_logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The task run's logger (so the line reaches the Prefect UI), or this module's outside a run."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


_EXAMPLES: dict[tuple[str, str, str], tuple[list[tuple[str, str]], str]] = {}
_EXAMPLES_LOCK = threading.Lock()


def _examples_and_digest(spec: JobSpec) -> tuple[list[tuple[str, str]], str]:
    """The job's labeled examples and a digest of the spec and them: the engine cache's key.

    Every shard asks for its engine, so this runs once per shard: reading and parsing the examples file each time
    cost more than answering a shard with a cheap encoder. The parsed file is kept per process under the file's
    fsspec `ukey` (modification time and size on a local disk, the ETag on an object store: one stat or HEAD),
    so an edited examples file still makes another engine, as before.
    """
    spec_hash = spec.spec_hash()
    classify = spec.task.classify
    if classify is None or classify.examples_file is None:
        examples = load_labeled_examples(classify) if classify is not None else []
        return examples, _digest(spec_hash, examples)
    path = classify.examples_file
    try:
        fs, fs_path = url_to_fs(path)
        version = str(fs.ukey(fs_path))
    except (OSError, ValueError):  # unreadable: load_labeled_examples raises the job's own error message
        examples = load_labeled_examples(classify)
        return examples, _digest(spec_hash, examples)
    key = (spec_hash, path, version)
    with _EXAMPLES_LOCK:
        cached = _EXAMPLES.get(key)
    if cached is None:
        examples = load_labeled_examples(classify)
        cached = (examples, _digest(spec_hash, examples))
        with _EXAMPLES_LOCK:
            for stale in [k for k in _EXAMPLES if k[:2] == key[:2]]:  # an older version of the same file
                del _EXAMPLES[stale]
            _EXAMPLES[key] = cached
    return list(cached[0]), cached[1]  # a copy: an engine that kept and changed the list would change the cache


def _digest(spec_hash: str, examples: Sequence[tuple[str, str]]) -> str:
    digest = hashlib.sha256(spec_hash.encode())
    for text, label in examples:
        digest.update(text.encode() + b"\x00" + label.encode() + b"\x01")
    return digest.hexdigest()


def small_engine(spec: JobSpec, head_version: str | None = None) -> Engine:
    """Return this process's small-model engine for the job, with the trained head `head_version` if given."""
    examples, examples_digest = _examples_and_digest(spec)
    digest = hashlib.sha256(examples_digest.encode())
    if head_version is not None:
        digest.update(b"\x02head:" + head_version.encode() + spec.output.url.encode())

    def build() -> Engine:
        head = load_head(spec, head_version) if head_version is not None and spec.task.classify else None
        ranker = load_ranker(spec, head_version) if head_version is not None and spec.task.extract else None
        extract_examples = load_extraction_examples(spec.task.extract) if spec.task.extract is not None else []
        key = measurement_key(spec.small_model, spec.task.classify, examples, head) if spec.task.classify else None
        measured = load_choice(spec, key) if key is not None else None
        engine = build_small_engine(
            spec.small_model,
            spec.task,
            examples,
            head=head,
            extract_examples=extract_examples,
            ranker=ranker,
            measured=measured,
        )
        choice = getattr(engine, "classifier_choice", None)
        if key is not None and measured is None and choice is not None and choice.candidates:
            save_choice(spec, key, choice)  # later runs and other workers reuse it rather than measure again
        return engine

    return _cached("small:" + digest.hexdigest(), build)


def settle_classifier_choice(spec: JobSpec, head_version: str | None) -> ClassifierChoice | None:
    """Measure the candidate encoders here, once, before shards start in other processes; None if nothing to do.

    Worker processes of a distributed run each build their own engine: without a stored choice each would measure,
    paying the measurement once per process and, as timing budgets follow machine load, possibly choosing
    differently. A promoted head fixes the encoder, so then nothing is measured.
    """
    classify = spec.task.classify
    if classify is None or head_version is not None:
        return None
    examples, _ = _examples_and_digest(spec)
    key = measurement_key(spec.small_model, classify, examples)
    if key is None:
        return None
    stored = load_choice(spec, key)
    if stored is not None:
        return stored
    from docroute.engines.local.classify_choice import plan_classifier

    choice = plan_classifier(spec.small_model, classify, examples).choice
    if choice.candidates:
        save_choice(spec, key, choice)
    return choice


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
    return _cached(key, lambda: _with_shared_limit(build_frontier_engine(frontier, spec.task), frontier))


def _with_shared_limit(engine: Engine, frontier: FrontierSpec) -> Engine:
    if frontier.concurrency_limit and isinstance(engine, AsyncClientEngine):
        engine.share_limit(prefect_concurrency_gate(frontier.concurrency_limit))
    return engine


def prefect_concurrency_gate(limit_name: str) -> SharedGate:
    """A gate holding one slot of the Prefect global concurrency limit `limit_name` per call in flight.

    The engine's calls run on its own event-loop thread, which does not inherit the Prefect settings of the
    thread that built it (the API URL among them); the gate carries those settings over. `strict=True`: a limit
    that does not exist is an error, never an unlimited run.
    """
    from prefect.concurrency.asyncio import concurrency
    from prefect.context import SettingsContext

    captured = SettingsContext.get()

    @asynccontextmanager
    async def gate() -> AsyncIterator[None]:
        with SettingsContext(profile=captured.profile, settings=captured.settings) if captured else nullcontext():
            async with concurrency(limit_name, occupy=1, strict=True, raise_on_lease_renewal_failure=False):
                yield

    return gate


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
    with _EXAMPLES_LOCK:
        _EXAMPLES.clear()
    for engine in engines:
        engine.close()


class ConcurrencyLimitMissingError(DocrouteError, RuntimeError):
    """The job names a Prefect global concurrency limit the API does not have."""


def require_concurrency_limit(limit_name: str) -> int:
    """Check, before any shard runs, that the job's frontier concurrency limit exists; returns its size.

    Each call would otherwise fail on its own, deep in a shard, as a deferred row.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(limit_name)
        except ObjectNotFound:
            raise ConcurrencyLimitMissingError(
                f"frontier.concurrency_limit names {limit_name!r}, which this Prefect API does not have: run "
                f"`docroute setup` (it creates docroute-frontier) or `prefect global-concurrency-limit create "
                f"{limit_name} --limit 8`"
            ) from None
    if not limit.active:
        raise ConcurrencyLimitMissingError(f"the concurrency limit {limit_name!r} is inactive, so it would cap nothing")
    return limit.limit

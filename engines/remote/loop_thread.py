"""A private asyncio event loop on a daemon thread, and the engine base that answers batches through one.

`predict` is synchronous and is called from Prefect task worker threads, some of which run an event loop of
their own. An async SDK client (AsyncOpenAI, AsyncAnthropic) belongs to the event loop it first ran on, and so
does an asyncio.Semaphore; a client and semaphore per calling thread would multiply the connections a job opens
by its worker count. So each engine owns exactly one loop, on its own thread, and every `predict`, from any
thread, with or without a running loop of its own, submits its batch there. One loop means one client (one
connection pool) and one semaphore, so `max_concurrency` bounds the engine as a whole, not each calling thread.

`LoopThread` is that loop; `AsyncClientEngine` is the batch plumbing both HTTP engines (engines/remote/openai_compat.py,
engines/remote/anthropic.py) share on top of it, leaving them only what is provider-specific: the client and how one
document is answered.

A `SharedGate` extends the bound past one process: when set, every call also holds a slot of a limit that all
workers share (a Prefect global concurrency limit, tasks/model/infer.py) for as long as it is in flight.

An `ExchangeGate` (engines/base.py), passed to one `predict`, meters money: each call to the provider (the
answer, and a repair round if one happens) is admitted by the gate with a token bound for that call alone, just
before it is sent and inside its call slot, and settled with the tokens it was billed as soon as it returns
(`_send`). A call the gate refuses is not sent; its document becomes a retryable error row.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Generic, Protocol, Self, TypeVar

from docroute.engines.base import (
    EngineError,
    ExchangeGate,
    ExchangeKind,
    ExchangeRefusedError,
    Prediction,
    Request,
    Usage,
    check_complete,
)
from docroute.schemas.errors import DocrouteError

log = logging.getLogger(__name__)

T = TypeVar("T")

SharedGate = Callable[[], AbstractAsyncContextManager[Any]]
"""Makes the context manager one call holds while in flight; entered on the engine's loop."""


class SlotUnavailableError(EngineError):
    """A shared concurrency slot could not be taken; the call was not made, so it can be retried later."""


class FinalAnswerError(DocrouteError):
    """An answer that asking again will not fix (a refusal, a content filter, output cut at the limit)."""


_CLOSE_TIMEOUT_S = 30.0
"""How long `close` waits for the cleanup, then for the thread to end: a wedged server must not hang a flow."""


def _stop_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Ask a loop thread to finish; the finalizer of a LoopThread dropped without close()."""
    if not loop.is_closed():
        loop.call_soon_threadsafe(loop.stop)


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Body of the loop thread: serve until stopped, then cancel leftovers and close the loop."""
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


class LoopThread:
    """One asyncio event loop on a daemon thread, started on first use; safe to share between threads.

    `run` blocks the calling thread until a coroutine finishes on the loop. `close` stops the loop and joins the
    thread; a later `run` starts a fresh one. A LoopThread dropped without `close` (an engine nobody closed)
    stops its thread from a `weakref.finalize`, so abandoned engines do not pile up threads. The thread and its
    loop hold no reference back to the LoopThread, which is what lets that finalizer run.
    """

    def __init__(self, name: str) -> None:
        """`name` names the thread (`docroute-<name>`) and prefixes errors and log lines."""
        self.name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._finalizer: weakref.finalize[[asyncio.AbstractEventLoop], LoopThread] | None = None

    def __repr__(self) -> str:
        return f"LoopThread(name={self.name!r}, running={self._loop is not None})"

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run `coroutine` on the loop and return its result (or raise its exception) in the calling thread.

        Called from the loop's own thread it would wait on itself forever, so that raises EngineError instead.
        """
        loop, thread = self._ensure_started()
        if threading.current_thread() is thread:
            coroutine.close()  # never awaited: close it, so no "coroutine was never awaited" warning follows
            raise EngineError(f"{self.name}: run() was called from its own event loop thread, waiting on itself")
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result()

    def close(self, async_cleanup: Callable[[], Awaitable[object]] | None = None) -> None:
        """Run `async_cleanup()` on the loop (closing clients that belong to it), then stop the loop and join it.

        A no-op when the loop never started. A failing cleanup is logged at debug level, never raised: close()
        runs in `finally` blocks and `__exit__`, where it must not mask the caller's own error.
        """
        with self._lock:
            loop, thread, finalizer = self._loop, self._thread, self._finalizer
            self._loop = self._thread = self._finalizer = None
        if loop is None or thread is None:
            return
        if finalizer is not None:
            finalizer.detach()
        if async_cleanup is not None:
            try:
                asyncio.run_coroutine_threadsafe(_awaited(async_cleanup), loop).result(timeout=_CLOSE_TIMEOUT_S)
            except Exception as exc:
                log.debug("%s: closing the client failed: %s", self.name, type(exc).__name__)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=_CLOSE_TIMEOUT_S)

    def _ensure_started(self) -> tuple[asyncio.AbstractEventLoop, threading.Thread]:
        with self._lock:
            if self._loop is None or self._thread is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=_run_loop, args=(loop,), name=f"docroute-{self.name}", daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
                self._finalizer = weakref.finalize(self, _stop_loop, loop)
            return self._loop, self._thread


async def _awaited(make: Callable[[], Awaitable[T]]) -> T:
    """Call and await `make` on the loop, so the awaitable is created where it runs (and only if it runs)."""
    return await make()


class _AsyncClosable(Protocol):
    async def close(self) -> None: ...


ClientT = TypeVar("ClientT", bound=_AsyncClosable)


class AsyncClientEngine(ABC, Generic[ClientT]):
    """An engine answering each request of a batch through one async SDK client, at most `max_concurrency` at once.

    The client and the semaphore are created on the engine's LoopThread on first use and live there until
    `close`, so every thread calling `predict` shares them (see the module docstring). Subclasses say how to
    make the client and how to answer one document; `_answer` turns every model or transport failure into an
    error row, so an exception out of it is a bug and fails the whole batch.
    """

    def __init__(self, *, name: str, max_concurrency: int, timeout_s: float, max_retries: int) -> None:
        """Name the engine and check the client's limits; nothing connects until the first `predict`.

        `timeout_s` and `max_retries` are handed to the SDK client, whose retry loop does the transport work.
        """
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        if max_retries < 0:
            raise ValueError("max_retries cannot be negative")
        self.name = name
        self.classifier_choice: Any = None  # engines/classify_choice.ClassifierChoice, set by build_small_engine
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self._loop_thread = LoopThread(name)
        # touched only on the loop thread
        self._client: ClientT | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._gate: SharedGate | None = None

    def share_limit(self, gate: SharedGate | None) -> None:
        """Make every call also hold a slot from `gate` while in flight (None: only `max_concurrency`)."""
        self._gate = gate

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def predict(self, batch: Sequence[Request], gate: ExchangeGate | None = None) -> list[Prediction]:
        """Answer every request; exactly one prediction per request, in request order.

        With a `gate`, every call to the provider is admitted by it first and settled when it returns (see the
        module docstring); a refused call is not sent and its prediction is a retryable error.
        """
        requests = list(batch)
        if not requests:
            return []
        if len({request.id for request in requests}) != len(requests):
            raise EngineError("a batch holds the same request id twice")  # refuse before spending money
        return check_complete(requests, self._loop_thread.run(self._predict_all(requests, gate)), self.name)

    def close(self) -> None:
        """Close the HTTP client and stop the loop thread; a later `predict` starts afresh."""
        self._loop_thread.close(self._aclose)

    @abstractmethod
    def _make_client(self) -> ClientT:
        """Build the SDK client; called on the loop thread, which the client then belongs to."""

    provider_errors: tuple[type[Exception], ...] = ()
    """The SDK's own failures (transport, status), described by `_transport_error`."""

    connection_errors: tuple[type[Exception], ...] = ()
    """The provider errors after which the request may have been served and billed (timeouts, lost connections)."""

    @abstractmethod
    async def _answer(self, client: ClientT, request: Request, gate: ExchangeGate | None) -> Prediction:
        """Answer one request (through `_exchange`, each call through `_send`); failures become error rows."""

    @abstractmethod
    def _transport_error(self, exc: Exception) -> tuple[str, bool]:
        """Describe a failure the SDK gave up on, without secrets, and say whether a later try may succeed."""

    def _billing_unknown(self, exc: BaseException) -> bool:
        """Whether a call that raised `exc` may still have been billed (the request may have reached the model).

        True for timeouts, dropped connections and cancellation; an HTTP error status is an answer: not billed.
        """
        return isinstance(exc, self.connection_errors) or not isinstance(exc, self.provider_errors)

    async def _send(
        self,
        call: Callable[[], Awaitable[T]],
        usage_of: Callable[[T], Usage],
        *,
        gate: ExchangeGate | None,
        request_id: str,
        kind: ExchangeKind,
        bound: Usage,
    ) -> T:
        """Make one call to the provider, admitted by `gate` for at most `bound` tokens and settled on return.

        Raises ExchangeRefusedError, without calling, when the gate refuses. A call that fails settles as unbilled
        when the provider answered with an error status, and at its whole bound when the bill is unknown.
        """
        if gate is None:
            return await call()
        ticket = await gate.admit(request_id, kind, bound)
        used: Usage | None = None
        try:
            result = await call()
            used = usage_of(result)
            return result
        except BaseException as exc:
            used = None if self._billing_unknown(exc) else Usage()
            raise
        finally:
            ticket.settle(used)

    async def _exchange(self, prediction: Prediction, ask: Callable[[], Awaitable[None]]) -> Prediction:
        """Run one document's talk with the provider inside a call slot; every failure becomes the row's error.

        `ask` fills `prediction` (and may ask again once, for a repair or a longer answer). A refusal or cut-off
        is final, a transport failure may be retried on a later run, and a shared slot that could not be taken or
        a call the budget gate refused means that call was not sent: retryable as well.
        """
        refused = False
        try:
            async with self._call_slot():
                started = time.perf_counter()
                try:
                    await ask()
                except FinalAnswerError as exc:
                    prediction.error, prediction.retryable = str(exc), False
                except ExchangeRefusedError as exc:  # this call was not sent: a later run may afford it
                    prediction.error, prediction.retryable, refused = str(exc), True, True
                except self.provider_errors as exc:
                    prediction.error, prediction.retryable = self._transport_error(exc)
                finally:
                    prediction.engine_seconds = time.perf_counter() - started
        except SlotUnavailableError as exc:  # nothing was sent: retry on a later run
            prediction.error, prediction.retryable = str(exc), True
        if prediction.error is not None:
            prediction.label, prediction.fields = None, {}
            prediction.label_confidence, prediction.field_confidences = None, {}
            # the reason may quote the answer, i.e. document content: keep it out of warning-level logs
            if not refused:  # a call the budget gate held back did not fail: its caller reports it
                log.warning("%s: request %s failed (retryable=%s)", self.name, prediction.id, prediction.retryable)
            log.debug("%s: request %s: %s", self.name, prediction.id, prediction.error)
        return prediction

    @asynccontextmanager
    async def _call_slot(self) -> AsyncIterator[None]:
        """Hold one of this engine's `max_concurrency` slots and, when a gate is set, one shared slot.

        Failing to take the shared slot raises SlotUnavailableError before any call is made; failing to give it
        back only logs, because the answer has been paid for by then (the slot's lease expires on its own).
        """
        if self._semaphore is None:  # pragma: no cover - created by _predict_all before any _answer
            raise RuntimeError("_call_slot used outside predict")
        async with self._semaphore:
            if self._gate is None:
                yield
                return
            held = self._gate()
            try:
                await held.__aenter__()
            except Exception as exc:
                raise SlotUnavailableError(
                    f"could not take a slot of the shared frontier concurrency limit: {type(exc).__name__}: {exc}"
                ) from exc
            try:
                yield
            finally:
                try:
                    await held.__aexit__(None, None, None)
                except Exception as exc:
                    log.warning("%s: could not give back a shared concurrency slot: %s", self.name, exc)

    async def _aclose(self) -> None:
        client, self._client, self._semaphore = self._client, None, None
        if client is not None:
            await client.close()

    async def _predict_all(self, requests: list[Request], gate: ExchangeGate | None = None) -> list[Prediction]:
        if self._client is None:
            self._client = self._make_client()
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.max_concurrency)
        client = self._client
        results = await asyncio.gather(
            *(self._answer(client, request, gate) for request in requests), return_exceptions=True
        )
        predictions: list[Prediction] = []
        for result in results:
            if isinstance(result, BaseException):
                raise result  # a bug, not a model or transport failure: fail the batch loudly
            predictions.append(result)
        return predictions

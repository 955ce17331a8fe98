"""What every HTTP engine built on an async provider SDK shares; each provider module keeps only its wire format.

An engine here asks a chat model one question a document and turns whatever comes back into a typed answer or an
error row: never an exception for a single document, since one bad row must not lose a batch. The talk is the
same for every provider (engines/remote/openai_compat.py, engines/remote/anthropic.py): one call, then either one
repair round for an answer that does not fit the schema or, for an answer cut at its schema's length bound, the
same question with the full output limit; a refusal or an answer cut at that full limit is final; a failure the
SDK's own retries could not get past is retryable when a later run may succeed. Only making the client, building
the request, reading the response (answer, usage, stop reason) and naming the SDK's exception classes differ, and
that is all a provider module writes.

`predict` is synchronous and is called from Prefect task worker threads, some of which run an event loop of
their own. An async SDK client belongs to the event loop it first ran on, and so does an asyncio.Semaphore; a
client and semaphore per calling thread would multiply the connections a job opens by its worker count. So each
engine owns exactly one event loop, run by anyio's blocking portal on its own thread, and every `predict`, from
any thread, with or without a running loop of its own, submits its batch there. One loop means one client (one
connection pool) and one semaphore, so `max_concurrency` bounds the engine as a whole, not each calling thread.

A `SharedGate` extends the bound past one process: when set, every call also holds a slot of a limit that all
workers share (a Prefect global concurrency limit, tasks/model/infer.py) for as long as it is in flight.

An `ExchangeGate` (engines/base.py), passed to one `predict`, meters money: each call to the provider (the
answer, and a repair round if one happens) is admitted by the gate with a token bound for that call alone, just
before it is sent and inside its call slot, and settled with the tokens it was billed as soon as it returns
(`_send`). A call the gate refuses is not sent; its document becomes a retryable error row.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, Self, TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal

from docroute.engines.base import (
    EngineError,
    ExchangeGate,
    ExchangeKind,
    ExchangeRefusedError,
    Prediction,
    Request,
    Usage,
    check_complete,
    one_line,
    redact,
)
from docroute.engines.scoring.prompts import (
    INVALID_ANSWER_FEEDBACK,
    AnswerError,
    answer_bytes_bound,
    chat_messages,
    parse_answer,
    truncate_text_to_tokens,
    value_confidences,
)
from docroute.schemas.errors import DocrouteError, ExitCode, TransientError
from docroute.schemas.spec import TaskSpec

log = logging.getLogger(__name__)

T = TypeVar("T")

SharedGate = Callable[[], AbstractAsyncContextManager[Any]]
"""Makes the context manager one call holds while in flight; entered on the engine's loop."""

ERROR_CHARS = 300
"""The most characters of a server's or a model's words an error row quotes."""
TOKENS_PER_MESSAGE = 8
"""Tokens a chat turn's framing (role markers) may add, as engines/scoring/prompts.py counts them."""

_CLOSE_TIMEOUT_S = 30.0
"""How long `close` waits for the client's cleanup: a wedged server must not hang a flow."""

Turns = list[dict[str, Any]]
"""Chat turns in a provider's own message format (a repair round's assistant answer and feedback)."""


class SlotUnavailableError(EngineError, TransientError):
    """A shared concurrency slot could not be taken; the call was not made, so it can be retried later."""

    exit_code = ExitCode.TEMPORARY


class FinalAnswerError(DocrouteError):
    """An answer that asking again will not fix (a refusal, a content filter, output cut at the limit)."""


class CutShortError(AnswerError):
    """An answer cut at its schema's length bound, below max_output_tokens: asking with the full limit may do."""


def brief(text: str) -> str:
    """A server's or a model's words as an error row quotes them: one line of at most ERROR_CHARS."""
    return one_line(text, ERROR_CHARS)


# ----------------------------------------------------------------------------------------------------------
# what an SDK's failure means


@dataclass(frozen=True)
class SdkFailure:
    status: int | None
    """The HTTP status when the server answered, else None (connection failed or timed out, or a client error)."""
    retryable: bool
    message: str
    """The SDK's message, with the transport's cause for connection failures; not yet redacted."""


TRANSIENT_STATUSES = frozenset({408, 409, 429})
"""Statuses worth another try later, besides every 5xx (the SDKs' own retry set; 529 overloaded included)."""


@dataclass(frozen=True)
class SdkErrors:
    """The exception classes of one provider SDK, which is all it takes to read its failures.

    The `openai` and `anthropic` SDKs are generated from one template: a status error carries `status_code` and
    `message`, a connection error (timeouts included) a `message` and the transport's exception as its cause. So
    one reading serves both, and every client built on either agrees on what is transient.
    """

    base: type[Exception]
    """Every failure the SDK raises once its own retries are spent."""
    status: type[Exception]
    """The server answered with an error status: the call was not billed."""
    connection: type[Exception]
    """No answer came (refused, dropped, timed out): the request may still have been served and billed."""

    def read(self, exc: Exception) -> SdkFailure:
        """Read an exception the SDK raised after its own retries; the message may quote a secret."""
        if isinstance(exc, self.status):
            status = int(getattr(exc, "status_code", 0))
            message = str(getattr(exc, "message", exc))
            return SdkFailure(status, status in TRANSIENT_STATUSES or status >= 500, message)
        if isinstance(exc, self.connection):
            message = str(getattr(exc, "message", exc))
            cause = exc.__cause__
            if cause is not None and str(cause):
                message = f"{message} ({type(cause).__name__}: {cause})"
            return SdkFailure(None, True, message)
        return SdkFailure(None, False, str(exc))


# ----------------------------------------------------------------------------------------------------------
# the engine's event loop


@dataclass(frozen=True)
class _Running:
    context: AbstractContextManager[BlockingPortal]
    portal: BlockingPortal
    thread_id: int


def _name_loop_thread(name: str) -> int:
    """Runs on the portal's thread: name it for thread dumps and return its id, for `call` to recognise it.

    Named here because start_blocking_portal's own `name` argument is missing from older anyio 4 releases.
    """
    threading.current_thread().name = name
    return threading.get_ident()


def _stop(running: _Running, cleanup: Callable[[], Awaitable[object]] | None) -> None:
    """Run `cleanup` on the loop with a timeout, then stop the portal (cancelling what is left) and end its thread.

    Never raises: close() runs in `finally` blocks and `__exit__`, where it must not mask the caller's own error.
    """
    portal = running.portal
    if cleanup is not None:
        try:
            portal.start_task_soon(cleanup).result(timeout=_CLOSE_TIMEOUT_S)
        except Exception as exc:
            log.debug("closing the client failed: %s", type(exc).__name__)
    with contextlib.suppress(RuntimeError):  # stopped already
        portal.call(portal.stop, True)
    try:
        running.context.__exit__(None, None, None)  # the portal is stopped: this only waits for its thread to end
    except Exception as exc:
        log.debug("stopping the event loop failed: %s", type(exc).__name__)


def _abandon(running: _Running) -> None:
    """Finalizer of a LoopPortal dropped without close(): stop its loop from a short-lived thread.

    A finalizer runs in whatever thread dropped the last reference, possibly the loop's own, where waiting for the
    loop would wait on itself; so the stop is handed to a thread of its own and nobody waits for it.
    """
    threading.Thread(target=_stop, args=(running, None), name="docroute-portal-stop", daemon=True).start()


class LoopPortal:
    """One event loop on a thread of its own behind anyio's blocking portal, started on first use.

    `call` blocks the calling thread until a coroutine function finishes on the loop; any number of threads may
    call at once. `close` stops the loop and its thread; a later `call` starts a fresh one. A LoopPortal dropped
    without `close` (an engine nobody closed) stops its loop from a `weakref.finalize`, so abandoned engines do
    not pile up threads: nothing the loop runs refers back to the LoopPortal, which is what lets it be collected.
    """

    def __init__(self, name: str) -> None:
        """`name` names the thread (`docroute-<name>`) and prefixes errors."""
        self.name = name
        self._lock = threading.Lock()
        self._running: _Running | None = None
        self._finalizer: weakref.finalize[[_Running], LoopPortal] | None = None

    def __repr__(self) -> str:
        return f"LoopPortal(name={self.name!r}, running={self._running is not None})"

    def call(self, func: Callable[..., Awaitable[T]], *args: object) -> T:
        """Await `func(*args)` on the loop and return its result (or raise its exception) in the calling thread.

        Called from the loop's own thread it would wait on itself forever, so that raises EngineError instead.
        """
        running = self._ensure_started()
        if threading.get_ident() == running.thread_id:
            raise EngineError(f"{self.name}: predict was called from its own event loop thread, waiting on itself")
        return running.portal.call(func, *args)

    def close(self, cleanup: Callable[[], Awaitable[object]] | None = None) -> None:
        """Await `cleanup()` on the loop (closing clients that belong to it), then stop the loop; never raises."""
        with self._lock:
            running, finalizer = self._running, self._finalizer
            self._running = self._finalizer = None
        if running is None:
            return
        if finalizer is not None:
            finalizer.detach()
        _stop(running, cleanup)

    def _ensure_started(self) -> _Running:
        with self._lock:
            if self._running is None:
                context = start_blocking_portal()
                portal = context.__enter__()
                thread_id = portal.call(_name_loop_thread, f"docroute-{self.name}")
                self._running = _Running(context, portal, thread_id)
                self._finalizer = weakref.finalize(self, _abandon, self._running)
                self._finalizer.atexit = False  # at exit the daemon thread simply ends
            return self._running


# ----------------------------------------------------------------------------------------------------------
# the engine


@dataclass(frozen=True)
class Reply:
    """What one provider response says, in the terms the shared reading needs; a provider module fills it."""

    answer: str | dict[str, Any] | None
    """The answer to check against the task: JSON text, or an object (a tool call's input); None if there is none."""
    missing: str = "the response holds no answer"
    """Why `answer` is None, as the repair round tells the model."""
    final: str | None = None
    """A reason asking again will not fix (a refusal, a content filter, a context window exceeded)."""
    cut: bool = False
    """Generation stopped at the call's output limit."""
    tokens: Sequence[tuple[bytes | str, float]] = ()
    """The answer's tokens with their log-probabilities, when the provider returned them."""


class _AsyncClosable(Protocol):
    async def close(self) -> None: ...


ClientT = TypeVar("ClientT", bound=_AsyncClosable)


class AsyncClientEngine(ABC, Generic[ClientT]):
    """An engine answering each request of a batch through one async SDK client, at most `max_concurrency` at once.

    The client and the semaphore are created on the engine's loop on first use and live there until `close`, so
    every thread calling `predict` shares them (see the module docstring). Subclasses make the client, build a
    request, read a response and name their SDK's errors; every model or transport failure becomes an error row,
    so an exception out of `_answer` is a bug and fails the whole batch.
    """

    sdk_errors: ClassVar[SdkErrors]
    """The provider SDK's exception classes: what becomes an error row, and what may have been billed."""
    answer_margin_tokens: ClassVar[int]
    """Output tokens an answer may count beyond its own text (an end-of-message token, a tool call's framing)."""

    def __init__(
        self,
        *,
        task: TaskSpec,
        model: str,
        base_url: str | None,
        api_key: str | None,
        max_concurrency: int,
        timeout_s: float,
        max_retries: int,
        max_output_tokens: int,
        max_input_tokens: int,
        extra_body: dict[str, Any] | None,
        name_prefix: str,
        role: str,
        bound_output_by_schema: bool,
    ) -> None:
        """Configure the engine; nothing connects until the first `predict`.

        `timeout_s` and `max_retries` are handed to the SDK client, whose retry loop does the transport work.
        `role` names the model in error rows. `bound_output_by_schema`: where the answer schema bounds an answer's
        length (labels, enums, dates, numbers; not free text), each call asks for at most that many tokens
        (`answer_tokens`) instead of `max_output_tokens`, so a budget reserves what an answer can really cost; an
        answer cut there is asked for once more with `max_output_tokens`. It is ignored for a model that may think
        before answering (`_may_think`), whose thoughts are output tokens too.
        """
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        if max_retries < 0:
            raise ValueError("max_retries cannot be negative")
        if max_output_tokens < 1:
            raise ValueError("max_output_tokens must be at least 1")
        self.name = f"{name_prefix}:{model}"
        self.classifier_choice: Any = None  # engines/classify_choice.ClassifierChoice, set by build_small_engine
        self.task = task
        self.model = model
        self.base_url = base_url
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.max_output_tokens = max_output_tokens
        self.max_input_tokens = max_input_tokens
        self.extra_body = dict(extra_body) if extra_body else None
        self.role = role
        self._api_key = api_key
        self._field_names: list[str] = [f.name for f in task.extract.fields] if task.extract else []
        self._keys: list[str] = (["label"] if task.classify else []) + self._field_names
        answer_bytes = answer_bytes_bound(task) if bound_output_by_schema and not self._may_think() else None
        self.answer_tokens = (
            max_output_tokens
            if answer_bytes is None
            else min(max_output_tokens, answer_bytes + self.answer_margin_tokens)
        )
        """The output limit of a call: the answer schema's bound where it has one, else max_output_tokens."""
        self._portal = LoopPortal(self.name)
        # touched only on the loop
        self._client: ClientT | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._gate: SharedGate | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, base_url={self.base_url!r})"

    # -- what a provider module writes -----------------------------------------------------------------------

    @abstractmethod
    def _make_client(self) -> ClientT:
        """Build the SDK client; called on the engine's loop, which the client then belongs to."""

    @abstractmethod
    def _request(self, prompt: list[dict[str, str]], turns: Turns, output_tokens: int) -> dict[str, Any]:
        """The call's keyword arguments as sent (extra_body apart): the chat prompt, then a repair round's turns."""

    @abstractmethod
    async def _create(self, client: ClientT, request: dict[str, Any]) -> Any:
        """Send one request through the SDK client and return its response."""

    @abstractmethod
    def _call_bound(self, prompt: list[dict[str, str]], turns: Turns, output_tokens: int) -> Usage:
        """An upper bound on the tokens one call of this prompt and these turns can be billed for."""

    @abstractmethod
    def _usage(self, response: Any) -> Usage:
        """The tokens a response was billed for."""

    @abstractmethod
    def _reply(self, response: Any) -> Reply:
        """Read a response's answer and stop reason."""

    @abstractmethod
    def _repair_turns(self, response: Any, feedback: str) -> Turns | None:
        """The turns showing the model its answer and the feedback, or None when they would be too big to send."""

    @abstractmethod
    def _echo_bound(self) -> int:
        """An upper bound on the input tokens a bad answer adds when a repair round sends it back."""

    def _may_think(self) -> bool:
        """Whether the model may think before answering, so that its output is not bounded by the answer schema."""
        return False

    # -- public API ------------------------------------------------------------------------------------------

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
        return check_complete(requests, self._portal.call(self._predict_all, requests, gate), self.name)

    def close(self) -> None:
        """Close the HTTP client and stop the loop; a later `predict` starts afresh."""
        self._portal.close(self._aclose)

    def usage_bound(self, request: Request) -> Usage:
        """Return an upper bound on the tokens one request can be billed for, all its calls together.

        Two calls at most: the answer (at most `answer_tokens` out), then either one repair round or, for an
        answer cut at `answer_tokens`, the same question with `max_output_tokens`. Input is bounded by UTF-8
        bytes (a token spells at least one byte) plus what the provider counts besides the messages; the repair
        round resends the prompt with the bad answer (`_echo_bound`) and a reason of bounded length. Calls the
        SDK retries after 429/5xx/connection errors return no usage and are not counted. A gated `predict`
        reserves per call instead: `answer_bound`, then the bound of the second call's actual messages.
        """
        first = self.answer_bound(request)
        feedback = len(INVALID_ANSWER_FEEDBACK.encode("utf-8")) + 4 * ERROR_CHARS
        repair = first.input_tokens + self._echo_bound() + feedback + 2 * TOKENS_PER_MESSAGE
        return Usage(
            input_tokens=first.input_tokens + repair, output_tokens=first.output_tokens + self.max_output_tokens
        )

    def answer_bound(self, request: Request) -> Usage:
        """An upper bound on the tokens of the first call answering `request` (a batch request's only call)."""
        return self._call_bound(self._prompt(request)[0], [], self.answer_tokens)

    def request_body(self, request: Request) -> dict[str, Any]:
        """The body of the first call answering `request`, exactly as sent (a batch API's requests reuse it)."""
        return {**self._request(self._prompt(request)[0], [], self.answer_tokens), **(self.extra_body or {})}

    def read_response(self, request_id: str, response: Any) -> Prediction:
        """Turn one response (an SDK object) into a prediction without a repair round: a batch API's answers."""
        prediction = Prediction(id=request_id, model=self.name, usage=self._usage(response))
        try:
            self._read(response, prediction)
        except AnswerError as exc:
            prediction.error, prediction.retryable = f"invalid answer from {self.role}: {brief(str(exc))}", False
        except FinalAnswerError as exc:
            prediction.error, prediction.retryable = str(exc), False
        return prediction

    # -- one document ----------------------------------------------------------------------------------------

    def _prompt(self, request: Request) -> tuple[list[dict[str, str]], bool]:
        text, truncated = truncate_text_to_tokens(request.text, self.max_input_tokens)
        return chat_messages(self.task, text), truncated

    def _output_limit(self, kind: ExchangeKind) -> int:
        return self.max_output_tokens if kind is ExchangeKind.WIDEN else self.answer_tokens

    async def _answer(self, client: ClientT, request: Request, gate: ExchangeGate | None) -> Prediction:
        prompt, truncated = self._prompt(request)
        prediction = Prediction(id=request.id, model=self.name, truncated=truncated)
        return await self._exchange(prediction, lambda: self._ask(client, gate, prompt, prediction))

    async def _ask(
        self, client: ClientT, gate: ExchangeGate | None, prompt: list[dict[str, str]], prediction: Prediction
    ) -> None:
        """Ask once; if the answer does not fit the schema, show the model its answer and the reason, once.

        An answer cut at `answer_tokens` (below max_output_tokens) is instead asked for again, unchanged, with
        max_output_tokens. Each call is admitted by `gate` with the bound of its own messages and output limit.
        """
        response = await self._call(client, prompt, [], gate=gate, request_id=prediction.id, kind=ExchangeKind.ANSWER)
        prediction.usage += self._usage(response)
        try:
            self._read(response, prediction, self.answer_tokens)
            return
        except CutShortError:
            log.debug("%s: answer cut at %d tokens, asking again with more", self.name, self.answer_tokens)
            kind, turns = ExchangeKind.WIDEN, []
        except AnswerError as exc:
            reason = brief(str(exc))
            repair = self._repair_turns(response, INVALID_ANSWER_FEEDBACK.format(reason=reason))
            if repair is None:
                raise FinalAnswerError(
                    f"invalid answer from {self.role}: {reason} (too long to send back for a repair round)"
                ) from None
            log.debug("%s: invalid answer, asking again: %s", self.name, reason)
            kind, turns = ExchangeKind.REPAIR, repair
        response = await self._call(client, prompt, turns, gate=gate, request_id=prediction.id, kind=kind)
        prediction.usage += self._usage(response)
        try:
            self._read(response, prediction, self._output_limit(kind))
        except AnswerError as exc:
            prediction.error = f"invalid answer from {self.role}: {brief(str(exc))}"
            prediction.retryable = False

    async def _call(
        self,
        client: ClientT,
        prompt: list[dict[str, str]],
        turns: Turns,
        *,
        gate: ExchangeGate | None,
        request_id: str,
        kind: ExchangeKind,
    ) -> Any:
        """Send one call with the output limit of its kind, admitted by `gate` first."""
        output_tokens = self._output_limit(kind)
        request = self._request(prompt, turns, output_tokens)
        if self.extra_body:
            request["extra_body"] = self.extra_body
        bound = self._call_bound(prompt, turns, output_tokens)
        return await self._send(
            lambda: self._create(client, request), gate=gate, request_id=request_id, kind=kind, bound=bound
        )

    def _read(self, response: Any, prediction: Prediction, output_tokens: int | None = None) -> None:
        """Fill label, fields and confidences from a response, or raise AnswerError (ask again) / FinalAnswerError.

        An answer cut at the call's output limit is never guessed at: when it does not parse it is cut short
        (ask again with more) below max_output_tokens and final at it.
        """
        reply = self._reply(response)
        if reply.final is not None:
            raise FinalAnswerError(reply.final)
        try:
            if reply.answer is None:
                raise AnswerError(reply.missing)
            label, fields = parse_answer(self.task, reply.answer)
        except AnswerError:
            if not reply.cut:
                raise
            limit = self.answer_tokens if output_tokens is None else output_tokens
            if limit < self.max_output_tokens:
                raise CutShortError(f"cut off at the answer's length bound of {limit} tokens") from None
            raise FinalAnswerError(
                f"invalid answer from {self.role}: cut off at max_output_tokens={self.max_output_tokens}"
            ) from None
        prediction.label, prediction.fields = label, fields
        confidences: dict[str, float | None] = {}
        if reply.tokens and isinstance(reply.answer, str):
            confidences = value_confidences(reply.answer, list(reply.tokens), self._keys)
        prediction.label_confidence = confidences.get("label") if self.task.classify else None
        prediction.field_confidences = {name: confidences.get(name) for name in self._field_names}

    # -- calls, slots and failures ---------------------------------------------------------------------------

    def _transport_error(self, exc: Exception) -> tuple[str, bool]:
        """Describe a failure the SDK gave up on, without secrets, and say whether a later try may succeed."""
        failure = self.sdk_errors.read(exc)
        return f"{type(exc).__name__}: {brief(redact(failure.message, self._api_key))}", failure.retryable

    def _billing_unknown(self, exc: BaseException) -> bool:
        """Whether a call that raised `exc` may still have been billed (the request may have reached the model).

        True for timeouts, dropped connections and cancellation; an HTTP error status is an answer: not billed.
        """
        return isinstance(exc, self.sdk_errors.connection) or not isinstance(exc, self.sdk_errors.base)

    async def _send(
        self,
        call: Callable[[], Awaitable[Any]],
        *,
        gate: ExchangeGate | None,
        request_id: str,
        kind: ExchangeKind,
        bound: Usage,
    ) -> Any:
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
            used = self._usage(result)
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
                except self.sdk_errors.base as exc:
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

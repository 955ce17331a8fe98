"""Anthropic's Messages API as a docroute Engine, through the official `anthropic` SDK.

Structured output comes from a forced tool call: the request declares one tool whose `input_schema` is the
answer schema and sets `tool_choice` to that tool, so the answer arrives as the `input` object of a `tool_use`
block rather than as free text to be fished out of prose. The system prompt (the task, identical for every
document) is sent as a text block marked `cache_control: ephemeral`, so the tools and instructions form a
cached prefix billed at the cache-read rate after the first call of a run.

The SDK does the transport work. Its retry loop (`anthropic/_base_client.py`, `AsyncAPIClient._request`)
retries connection errors and timeouts, and responses `_should_retry` accepts: 408, 409, 429 and every status
>= 500, which includes 529 `overloaded_error`; it waits what `retry-after-ms` / `retry-after` say
(`_parse_retry_after_header`) or else backs off exponentially from 0.5 s to at most 8 s with jitter
(`_calculate_retry_timeout`). This module adds what a batch needs on top, as engines/remote/openai_compat.py does for
OpenAI: a bound on requests in flight across every thread using the engine, one repair round for an answer
that does not fit the schema, error rows instead of exceptions, and token usage per row.

The SDK sends API version 2026-10-21, which rejects `temperature`, `top_p` and `top_k` outright (HTTP 400,
even at their defaults), and the SDK itself has no such parameters; so unlike the OpenAI engine no
temperature is sent. A forced tool call on a fixed prompt is what keeps answers stable.

`predict` is synchronous and is called from worker threads. An AsyncAnthropic client belongs to the event loop
it first ran on, so the engine owns one private loop on a daemon thread (engines/remote/loop_thread.py): every
`predict`, from any thread, with or without a running loop of its own, submits its batch there. One loop means
one client (one connection pool) and one semaphore, so `max_concurrency` bounds the engine as a whole, not each
calling thread.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import anthropic
from anthropic import AsyncAnthropic

from docroute.engines.base import (
    EngineUnavailableError,
    ExchangeGate,
    ExchangeKind,
    Prediction,
    Request,
    Usage,
    one_line,
    redact,
)
from docroute.engines.remote.loop_thread import AsyncClientEngine, FinalAnswerError
from docroute.engines.scoring.prompts import (
    INVALID_ANSWER_FEEDBACK,
    AnswerError,
    answer_bytes_bound,
    answer_schema,
    chat_messages,
    estimate_prompt_tokens,
    parse_answer,
    truncate_text_to_tokens,
)
from docroute.schemas.spec import FrontierSpec, TaskSpec

log = logging.getLogger(__name__)

TOOL_NAME = "record_answer"
"""The one tool every request declares and forces; its input is the answer object."""

_TOOL_DESCRIPTION = (
    "Record your answer for the document: one object with exactly the keys the system prompt lists, "
    "null for a field the document does not state."
)
_CACHE_CONTROL: dict[str, str] = {"type": "ephemeral"}

_ERROR_CHARS = 300
_TOKENS_PER_MESSAGE = 8
_TOOL_USE_SYSTEM_TOKENS = 1024
"""Input tokens the API adds for a request with tools (Anthropic documents 313-346 for current models)."""
_REPAIR_OVERHEAD_TOKENS = 64
"""Tokens the repair round's block structure can add: the tool_use id and name, the tool_result wrapper."""
_ECHO_BYTES_PER_OUTPUT_TOKEN = 6
"""Bytes of a bad answer the repair round may send back, per token of max_output_tokens.

The answer is sent back as an object the API re-renders, so its input size is bounded by its UTF-8 bytes,
not by the tokens generated. Six bytes a token covers English (about 4) and CJK (3 bytes a character); a
larger answer is not sent back, which keeps `usage_bound` an actual bound.
"""
_ANSWER_MARGIN_TOKENS = 96
"""Output tokens a forced tool call counts beyond its input object's own text (the tool_use block's framing)."""


class _FinalAnswerError(FinalAnswerError):
    """An answer that asking again will not fix: a refusal, output cut at the limit, an oversized prompt."""


class _CutShortError(AnswerError):
    """An answer cut at its schema's length bound, below max_output_tokens: asking with the full limit may do."""


def _usage_of(message: Any) -> Usage:
    """Token usage of one Messages response.

    Anthropic reports fresh input, cache writes and cache reads separately; together they are the prompt
    (docroute's input_tokens), and cache reads are the discounted subset (cached_tokens). Cache writes are
    the subset billed at the cache-write rate (cache_write_tokens).
    """
    usage = getattr(message, "usage", None)
    if usage is None:
        return Usage()
    fresh = int(getattr(usage, "input_tokens", 0) or 0)
    written = int(getattr(usage, "cache_creation_input_tokens", 0) or 0)
    read = int(getattr(usage, "cache_read_input_tokens", 0) or 0)
    return Usage(fresh + written + read, int(getattr(usage, "output_tokens", 0) or 0), read, written)


def _tool_call(message: Any) -> Any | None:
    """Return the first `record_answer` tool_use block of a response, or None."""
    for block in getattr(message, "content", None) or []:
        if getattr(block, "type", None) == "tool_use" and getattr(block, "name", None) == TOOL_NAME:
            return block
    return None


def _text_of(message: Any) -> str:
    """Join the text blocks of a response (what a model wrote instead of, or before, calling the tool)."""
    blocks = getattr(message, "content", None) or []
    parts = [str(getattr(b, "text", "")) for b in blocks if getattr(b, "type", None) == "text"]
    return "".join(parts).strip()


class AnthropicEngine(AsyncClientEngine[AsyncAnthropic]):
    """Answer a task with a Claude model through the Messages API: one forced tool call a document.

    Errors never raise out of `predict` for a single document: transport failures that outlive the SDK's
    retries (408/409/429/5xx/529, timeouts, connection errors) become rows with `retryable=True`; other 4xx
    (bad request, auth), refusals, answers cut off at `max_output_tokens` and answers that stay invalid after
    one repair round become rows with `retryable=False`. Confidences are None: the API has no logprobs.
    """

    provider_errors = (anthropic.AnthropicError,)
    connection_errors = (anthropic.APIConnectionError,)  # timeouts included: the request may have been served

    def __init__(
        self,
        *,
        task: TaskSpec,
        model: str,
        api_key: str,
        base_url: str | None = None,
        max_concurrency: int = 8,
        timeout_s: float = 60.0,
        max_retries: int = 4,
        max_output_tokens: int = 512,
        max_input_tokens: int = 32000,
        extra_body: dict[str, Any] | None = None,
        name_prefix: str = "anthropic",
        bound_output_by_schema: bool = True,
    ) -> None:
        """Configure the engine; nothing connects until the first `predict`.

        `api_key` is required: without one the SDK would fall back to environment variables and profile files
        on disk, and which credential a job spends should be decided by its spec alone. `base_url` is the API
        root without `/v1` (the SDK appends `/v1/messages`); None means the SDK's default.

        `bound_output_by_schema`: where the answer schema bounds an answer's length (labels, enums, dates,
        numbers; not free text), each call's `max_tokens` is that bound (`answer_tokens`), so a budget reserves
        what an answer can really cost; an answer cut there is asked for once more with `max_output_tokens`.
        Off when `extra_body` turns on extended thinking, whose tokens are output too.
        """
        if not api_key:
            raise EngineUnavailableError("the Anthropic engine needs an API key")
        super().__init__(
            name=f"{name_prefix}:{model}", max_concurrency=max_concurrency, timeout_s=timeout_s, max_retries=max_retries
        )
        if max_output_tokens < 1:
            raise ValueError("max_output_tokens must be at least 1")
        self.task = task
        self.model = model
        self.base_url = base_url
        self.max_output_tokens = max_output_tokens
        self.max_input_tokens = max_input_tokens
        self.extra_body = dict(extra_body) if extra_body else None
        self.role = "frontier"
        self._api_key = api_key
        self._tool: dict[str, Any] = {
            "name": TOOL_NAME,
            "description": _TOOL_DESCRIPTION,
            "input_schema": answer_schema(task),
        }
        # one call, exactly one tool_use: a parallel second call would need a tool_result of its own in repair
        self._tool_choice: dict[str, Any] = {"type": "tool", "name": TOOL_NAME, "disable_parallel_tool_use": True}
        self._tool_bytes = len(json.dumps([self._tool, self._tool_choice]).encode("utf-8"))
        self._echo_limit_bytes = _ECHO_BYTES_PER_OUTPUT_TOKEN * max_output_tokens
        self._field_names: list[str] = [f.name for f in task.extract.fields] if task.extract else []
        thinks = "thinking" in (self.extra_body or {})
        answer_bytes = answer_bytes_bound(task) if bound_output_by_schema and not thinks else None
        self.answer_tokens = (
            max_output_tokens if answer_bytes is None else min(max_output_tokens, answer_bytes + _ANSWER_MARGIN_TOKENS)
        )
        """The `max_tokens` of a call: the answer schema's bound where it has one, else max_output_tokens."""

    def __repr__(self) -> str:
        return f"AnthropicEngine(name={self.name!r}, base_url={self.base_url!r})"

    # -- public API (predict, close and the context manager come from AsyncClientEngine) ---------------------

    def usage_bound(self, request: Request) -> Usage:
        """Return an upper bound on the tokens one request can be billed for, all its calls together.

        Two calls at most: the answer (at most `answer_tokens` out), then either one repair round or, for an
        answer cut at `answer_tokens`, the same question with `max_output_tokens`. Input is bounded by UTF-8
        bytes (a token spells at least one byte): the messages, the tool definition and the tokens the API adds
        for tool use. The repair round resends the prompt plus the bad answer (sent back only when it fits
        `_ECHO_BYTES_PER_OUTPUT_TOKEN` bytes a token) and a reason of bounded length. Calls the SDK retries
        after 429/5xx/connection errors return no usage and are not counted; cache writes, billed at 1.25x, are
        counted as plain input (see `_usage_of`). A gated `predict` reserves per call instead: `answer_bound`,
        then the bound of the second call's actual messages.
        """
        first = self.answer_bound(request)
        feedback = len(INVALID_ANSWER_FEEDBACK.encode("utf-8")) + 4 * _ERROR_CHARS
        echo = self._echo_limit_bytes + _REPAIR_OVERHEAD_TOKENS
        repair = first.input_tokens + echo + feedback + 2 * _TOKENS_PER_MESSAGE
        return Usage(
            input_tokens=first.input_tokens + repair, output_tokens=first.output_tokens + self.max_output_tokens
        )

    def answer_bound(self, request: Request) -> Usage:
        """An upper bound on the tokens of the first call answering `request`."""
        text, _ = truncate_text_to_tokens(request.text, self.max_input_tokens)
        return self._call_bound(chat_messages(self.task, text), [], self.answer_tokens)

    def _call_bound(self, prompt: list[dict[str, str]], turns: list[dict[str, Any]], output_tokens: int) -> Usage:
        """Bound one call: the chat prompt's bytes, the repair turns' JSON bytes, the tool and tool-use tokens."""
        inputs = estimate_prompt_tokens(prompt) + self._tool_bytes + _TOOL_USE_SYSTEM_TOKENS
        if turns:
            turn_bytes = len(json.dumps(turns, ensure_ascii=False, default=str).encode("utf-8"))
            inputs += turn_bytes + _REPAIR_OVERHEAD_TOKENS + len(turns) * _TOKENS_PER_MESSAGE
        return Usage(input_tokens=inputs, output_tokens=output_tokens)

    def request_body(self, request: Request) -> dict[str, Any]:
        """The Messages request answering `request` (first attempt), as sent; a batch API's `params` reuse it."""
        text, _ = truncate_text_to_tokens(request.text, self.max_input_tokens)
        system, messages = self._split(chat_messages(self.task, text))
        return {**self._create_kwargs(system, messages), **(self.extra_body or {})}

    def read_message(self, request_id: str, message: Any) -> Prediction:
        """Turn one Messages response (an SDK `Message`) into a prediction, without a repair round."""
        prediction = Prediction(id=request_id, model=self.name, usage=_usage_of(message))
        try:
            self._read(message, prediction)
        except AnswerError as exc:
            prediction.error, prediction.retryable = (
                f"invalid answer from {self.role}: {_brief(str(exc))}",
                False,
            )
        except _FinalAnswerError as exc:
            prediction.error, prediction.retryable = str(exc), False
        if prediction.error is not None:
            prediction.label, prediction.fields = None, {}
            prediction.field_confidences = {}
        return prediction

    def _make_client(self) -> AsyncAnthropic:
        return AsyncAnthropic(
            api_key=self._api_key,
            base_url=self.base_url,
            timeout=self.timeout_s,
            max_retries=self.max_retries,
        )

    # -- one document ----------------------------------------------------------------------------------------

    def _split(self, prompt: list[dict[str, str]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Split the shared chat prompt into Anthropic's cached `system` blocks and the user turn."""
        system, user = prompt
        blocks = [{"type": "text", "text": system["content"], "cache_control": dict(_CACHE_CONTROL)}]
        return blocks, [{"role": "user", "content": user["content"]}]

    async def _answer(self, client: AsyncAnthropic, request: Request, gate: ExchangeGate | None) -> Prediction:
        text, truncated = truncate_text_to_tokens(request.text, self.max_input_tokens)
        prediction = Prediction(id=request.id, model=self.name, truncated=truncated)
        prompt = chat_messages(self.task, text)
        return await self._exchange(prediction, lambda: self._ask(client, gate, prompt, prediction))

    async def _ask(
        self,
        client: AsyncAnthropic,
        gate: ExchangeGate | None,
        prompt: list[dict[str, str]],
        prediction: Prediction,
    ) -> None:
        """Ask once; if the answer does not fit the schema, show the model its answer and the reason, once.

        An answer cut at `answer_tokens` (below max_output_tokens) is instead asked for again, unchanged, with
        max_output_tokens. Each call is admitted by `gate` with the bound of its own messages and output limit.
        """
        message = await self._create(client, prompt, [], gate=gate, request_id=prediction.id, kind=ExchangeKind.ANSWER)
        prediction.usage += _usage_of(message)
        try:
            self._read(message, prediction, self.answer_tokens)
            return
        except _CutShortError:
            log.debug("%s: answer cut at %d tokens, asking again with more", self.name, self.answer_tokens)
            kind, turns = ExchangeKind.WIDEN, []
        except AnswerError as exc:
            reason = _brief(str(exc))
            repair = self._repair_turns(message, reason)
            if repair is None:
                raise _FinalAnswerError(
                    f"invalid answer from {self.role}: {reason} (too long to send back for a repair round)"
                ) from None
            log.debug("%s: invalid answer, asking again: %s", self.name, reason)
            kind, turns = ExchangeKind.REPAIR, repair
        message = await self._create(client, prompt, turns, gate=gate, request_id=prediction.id, kind=kind)
        prediction.usage += _usage_of(message)
        try:
            self._read(message, prediction, self._output_limit(kind))
        except AnswerError as exc:
            prediction.error = f"invalid answer from {self.role}: {_brief(str(exc))}"
            prediction.retryable = False

    def _output_limit(self, kind: ExchangeKind) -> int:
        return self.max_output_tokens if kind is ExchangeKind.WIDEN else self.answer_tokens

    def _repair_turns(self, message: Any, reason: str) -> list[dict[str, Any]] | None:
        """The assistant turn as answered plus the feedback, or None when the answer is too big to send back.

        A tool call must be answered by a `tool_result` for the same id: the reason goes there, flagged
        `is_error`, which is how the API tells a model its call failed. An answer without a tool call is sent
        back as text, followed by the reason as a plain user turn.
        """
        feedback = INVALID_ANSWER_FEEDBACK.format(reason=reason)
        call = _tool_call(message)
        if call is not None:
            echoed = json.dumps(call.input, ensure_ascii=False, default=str)
            if len(echoed.encode("utf-8")) > self._echo_limit_bytes:
                return None
            return [
                {
                    "role": "assistant",
                    "content": [{"type": "tool_use", "id": call.id, "name": call.name, "input": call.input}],
                },
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": call.id, "is_error": True, "content": feedback}],
                },
            ]
        text = _text_of(message)
        if len(text.encode("utf-8")) > self._echo_limit_bytes:
            return None
        turns: list[dict[str, Any]] = [{"role": "assistant", "content": text}] if text else []
        return [*turns, {"role": "user", "content": feedback}]

    def _create_kwargs(
        self, system: list[dict[str, Any]], messages: list[dict[str, Any]], output_tokens: int | None = None
    ) -> dict[str, Any]:
        return {
            "model": self.model,
            "max_tokens": self.answer_tokens if output_tokens is None else output_tokens,
            "system": system,
            "messages": messages,
            "tools": [self._tool],
            "tool_choice": self._tool_choice,
        }

    async def _create(
        self,
        client: AsyncAnthropic,
        prompt: list[dict[str, str]],
        turns: list[dict[str, Any]],
        *,
        gate: ExchangeGate | None,
        request_id: str,
        kind: ExchangeKind,
    ) -> Any:
        """Send one Messages call: the prompt plus `turns` (a repair round's), admitted by `gate` first."""
        system, messages = self._split(prompt)
        output_tokens = self._output_limit(kind)
        kwargs = self._create_kwargs(system, [*messages, *turns], output_tokens)
        if self.extra_body:
            kwargs["extra_body"] = self.extra_body
        bound = self._call_bound(prompt, turns, output_tokens)

        async def call() -> Any:
            return await client.messages.create(**kwargs)

        return await self._send(call, _usage_of, gate=gate, request_id=request_id, kind=kind, bound=bound)

    def _read(self, message: Any, prediction: Prediction, output_tokens: int | None = None) -> None:
        """Fill label and fields from a response, or raise AnswerError (ask again) / _FinalAnswerError (don't)."""
        stop = getattr(message, "stop_reason", None)
        if stop == "refusal":
            details = getattr(message, "stop_details", None)
            explanation = getattr(details, "explanation", None) if details is not None else None
            category = getattr(details, "category", None) if details is not None else None
            said = f" ({category}): {_brief(str(explanation))}" if explanation else f" ({category})" if category else ""
            raise _FinalAnswerError(f"{self.role} refused to answer{said}")
        if stop == "max_tokens":
            # a tool input cut short can still parse, minus the fields it never reached: never accept it
            limit = self.answer_tokens if output_tokens is None else output_tokens
            if limit < self.max_output_tokens:
                raise _CutShortError(f"cut off at the answer's length bound of {limit} tokens")
            raise _FinalAnswerError(
                f"invalid answer from {self.role}: cut off at max_output_tokens={self.max_output_tokens}"
            )
        if stop == "model_context_window_exceeded":
            raise _FinalAnswerError(
                f"{self.role} context window exceeded: lower max_input_tokens (now {self.max_input_tokens})"
            )
        call = _tool_call(message)
        if call is None:
            raise AnswerError(f"the response holds no {TOOL_NAME} tool call")
        payload = call.input
        if not isinstance(payload, dict):
            raise AnswerError(f"the {TOOL_NAME} input is a JSON {type(payload).__name__}, not an object")
        label, fields = parse_answer(self.task, payload)
        prediction.label, prediction.fields = label, fields
        prediction.label_confidence = None
        prediction.field_confidences = dict.fromkeys(self._field_names)

    def _transport_error(self, exc: anthropic.AnthropicError) -> tuple[str, bool]:
        """Describe a failure the SDK gave up on, without secrets, and say whether a later try may succeed."""
        if isinstance(exc, anthropic.APIStatusError):
            status = exc.status_code
            retryable = status in (408, 409, 429) or status >= 500  # 529 overloaded included
            detail = exc.message
        elif isinstance(exc, anthropic.APIConnectionError):  # includes APITimeoutError
            retryable = True
            detail = exc.message
            cause = exc.__cause__
            if cause is not None and str(cause):
                detail = f"{detail} ({type(cause).__name__}: {cause})"
        else:
            retryable = False
            detail = str(exc)
        return f"{type(exc).__name__}: {_brief(redact(detail, self._api_key))}", retryable


def engine_from_frontier_spec(spec: FrontierSpec, task: TaskSpec) -> AnthropicEngine:
    """Build the frontier engine for provider `anthropic` from the job spec."""
    if spec.provider != "anthropic":
        raise ValueError(f"provider {spec.provider!r} is not served by the Anthropic engine")
    api_key = spec.api_key.get_secret_value() if spec.api_key is not None else None
    if not api_key:
        raise EngineUnavailableError(
            "no Anthropic API key: set frontier.api_key, or the environment variable named by "
            "frontier.api_key_env (default ANTHROPIC_API_KEY)"
        )
    return AnthropicEngine(
        task=task,
        model=spec.model,
        api_key=api_key,
        base_url=spec.base_url,
        max_concurrency=spec.max_concurrency,
        timeout_s=spec.timeout_s,
        max_retries=spec.max_retries,
        max_output_tokens=spec.max_output_tokens,
        max_input_tokens=spec.max_input_tokens,
        extra_body=getattr(spec, "extra_body", None) or None,
    )


def _brief(text: str) -> str:
    return one_line(text, _ERROR_CHARS)

"""Any OpenAI-compatible chat endpoint (OpenAI, `vllm serve`, llama.cpp server) as a docroute Engine.

The official SDK does the transport work: its client retries 408/409/429/5xx, timeouts and connection errors
with exponential backoff and jitter, and honours `retry-after-ms` / `retry-after` (openai/_base_client.py,
`_parse_retry_after_header` and `_calculate_retry_timeout`). This module adds what a batch needs on top: a
bound on requests in flight across every thread using the engine, structured outputs, one repair round for an
answer that does not fit the schema, error rows instead of exceptions, token usage and logprob confidences per
row.

`predict` is synchronous and is called from worker threads. An AsyncOpenAI client belongs to the event loop it
first ran on, so the engine owns one private loop on a daemon thread (engines/remote/loop_thread.py): every `predict`,
from any thread, with or without a running loop of its own, submits its batch there. One loop means one client
(a shared connection pool) and one semaphore, so `max_concurrency` bounds the engine as a whole, not each
calling thread.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Literal

import openai
from openai import AsyncOpenAI

from docroute.engines.base import (
    PLACEHOLDER_API_KEY,
    EngineUnavailableError,
    ExchangeGate,
    ExchangeKind,
    Prediction,
    Request,
    Usage,
    one_line,
    redact,  # lived here before engines/base.py; still importable from this module,
)
from docroute.engines.remote.loop_thread import AsyncClientEngine, FinalAnswerError
from docroute.engines.remote.openai_failure import sdk_failure
from docroute.engines.scoring.prompts import (
    INVALID_ANSWER_FEEDBACK,
    AnswerError,
    answer_bytes_bound,
    answer_schema,
    chat_messages,
    estimate_prompt_tokens,
    parse_answer,
    truncate_text_to_tokens,
    value_confidences,
)
from docroute.schemas.spec import FrontierSpec, OpenAICompatibleSmallSpec, TaskSpec

log = logging.getLogger(__name__)

TokenLimitParam = Literal["max_tokens", "max_completion_tokens"]

_ERROR_CHARS = 300
_RETOKENIZE_MARGIN = 16
"""Tokens a generated answer may gain when sent back as input (generation need not split text canonically)."""
_ANSWER_MARGIN_TOKENS = 16
"""Tokens a completion may count beyond the answer's own text (an end-of-message token, a stray newline)."""
_OPENAI_REASONING = re.compile(r"^(?:o[1-9]|gpt-5)(?!.*-chat)")
_REASONING_OPTIONS = frozenset(
    {"reasoning_effort", "reasoning", "thinking", "include_reasoning", "chat_template_kwargs"}
)
"""extra_body keys that may make a model think before answering; thinking counts as output tokens."""


class _FinalAnswerError(FinalAnswerError):
    """An answer that asking again will not fix: a refusal, a content filter, output cut at the limit."""


class _CutShortError(AnswerError):
    """An answer cut at its schema's length bound, below max_output_tokens: asking with the full limit may do."""


def is_openai_reasoning_model(model: str) -> bool:
    """Say whether an OpenAI model is a reasoning model (o-series, gpt-5), which rejects temperature != 1."""
    return bool(_OPENAI_REASONING.match(model))


def _usage_of(completion: Any) -> Usage:
    usage = getattr(completion, "usage", None)
    if usage is None:
        return Usage()
    details = getattr(usage, "prompt_tokens_details", None)
    cached = (getattr(details, "cached_tokens", None) or 0) if details is not None else 0
    return Usage(int(usage.prompt_tokens or 0), int(usage.completion_tokens or 0), int(cached))


def _content_of(completion: Any) -> str:
    choices = getattr(completion, "choices", None) or []
    return (choices[0].message.content or "") if choices else ""


class OpenAICompatibleEngine(AsyncClientEngine[AsyncOpenAI]):
    """Answer a task with a chat model behind an OpenAI-compatible API: one structured-output call a document.

    Errors never raise out of `predict` for a single document: transport failures that outlive the SDK's
    retries become rows with `retryable=True` (a later run may succeed), bad requests, auth failures and
    answers that stay invalid after one repair round become rows with `retryable=False`.
    """

    provider_errors = (openai.OpenAIError,)
    connection_errors = (openai.APIConnectionError,)  # timeouts included: the request may have been served

    def __init__(
        self,
        *,
        task: TaskSpec,
        model: str,
        base_url: str | None,
        api_key: str | None,
        max_concurrency: int = 8,
        timeout_s: float = 60.0,
        max_retries: int = 4,
        max_output_tokens: int = 512,
        max_input_tokens: int = 32000,
        request_logprobs: bool = False,
        extra_body: dict[str, Any] | None = None,
        name_prefix: str = "openai",
        token_limit_param: TokenLimitParam = "max_tokens",
        send_temperature: bool = True,
        role: str = "frontier",
        schema_style: Literal["json_schema", "json_object"] = "json_schema",
        bound_output_by_schema: bool = True,
    ) -> None:
        """Configure the engine; nothing connects until the first `predict`.

        `schema_style`: `json_schema` is OpenAI's strict structured output; `json_object` sends
        `{"type": "json_object", "schema": ...}`, the form llama-cpp-python's server enforces with a grammar.
        `token_limit_param`: OpenAI's own API wants `max_completion_tokens` (reasoning models reject
        `max_tokens`), while older vLLM and llama.cpp servers only read `max_tokens`. `send_temperature=False`
        omits temperature for models that reject 0 (OpenAI reasoning models). `role` names the model in error
        rows.

        `bound_output_by_schema`: where the answer schema bounds an answer's length (labels, enums, dates,
        numbers; not free text), each call asks for at most that many tokens (`answer_tokens`) instead of
        `max_output_tokens`, so a budget reserves what an answer can really cost. An answer cut at that bound
        is asked for once more with `max_output_tokens`. Off for models that may think before answering (OpenAI
        reasoning models, an `extra_body` naming reasoning or thinking), whose thoughts are output tokens too.
        """
        super().__init__(
            name=f"{name_prefix}:{model}", max_concurrency=max_concurrency, timeout_s=timeout_s, max_retries=max_retries
        )
        self.task = task
        self.model = model
        self.base_url = base_url
        self.max_output_tokens = max_output_tokens
        self.max_input_tokens = max_input_tokens
        self.request_logprobs = request_logprobs
        self.extra_body = dict(extra_body) if extra_body else None
        self.token_limit_param: TokenLimitParam = token_limit_param
        self.send_temperature = send_temperature
        self.role = role
        self._api_key = api_key
        self._response_format: dict[str, Any] = (
            {"type": "json_schema", "json_schema": {"name": "answer", "schema": answer_schema(task), "strict": True}}
            if schema_style == "json_schema"
            else {"type": "json_object", "schema": answer_schema(task)}
        )
        self._schema_bytes = len(json.dumps(self._response_format).encode("utf-8"))
        self._field_names: list[str] = [f.name for f in task.extract.fields] if task.extract else []
        self._keys: list[str] = (["label"] if task.classify else []) + self._field_names
        thinks = is_openai_reasoning_model(model) or bool(_REASONING_OPTIONS & set(self.extra_body or {}))
        answer_bytes = answer_bytes_bound(task) if bound_output_by_schema and not thinks else None
        self.answer_tokens = (
            max_output_tokens if answer_bytes is None else min(max_output_tokens, answer_bytes + _ANSWER_MARGIN_TOKENS)
        )
        """The output limit of a call: the answer schema's bound where it has one, else max_output_tokens."""

    def __repr__(self) -> str:
        return f"OpenAICompatibleEngine(name={self.name!r}, base_url={self.base_url!r})"

    # -- public API (predict, close and the context manager come from AsyncClientEngine) ---------------------

    def usage_bound(self, request: Request) -> Usage:
        """Return an upper bound on the tokens one request can be billed for, all its calls together.

        Two calls at most: the answer (at most `answer_tokens` out), then either one repair round or, for an
        answer cut at `answer_tokens`, the same question with `max_output_tokens`. Input is bounded by UTF-8
        bytes (a token spells at least one byte) plus the response schema, which providers count as input too;
        the repair round resends the prompt with the bad answer and a reason of bounded length. Calls the SDK
        retries after 429/5xx/connection errors return no usage and are not counted. A gated `predict` reserves
        per call instead: `answer_bound`, then the bound of the second call's actual messages.
        """
        first = self.answer_bound(request)
        feedback = len(INVALID_ANSWER_FEEDBACK.encode("utf-8")) + 4 * _ERROR_CHARS
        repair = first.input_tokens + (self.answer_tokens + _RETOKENIZE_MARGIN) + feedback + 2 * 8
        return Usage(
            input_tokens=first.input_tokens + repair, output_tokens=first.output_tokens + self.max_output_tokens
        )

    def answer_bound(self, request: Request) -> Usage:
        """An upper bound on the tokens of the first call answering `request` (a batch request's only call)."""
        text, _ = truncate_text_to_tokens(request.text, self.max_input_tokens)
        return self._call_bound(chat_messages(self.task, text), self.answer_tokens)

    def _call_bound(self, messages: list[dict[str, str]], output_tokens: int) -> Usage:
        return Usage(input_tokens=estimate_prompt_tokens(messages) + self._schema_bytes, output_tokens=output_tokens)

    def _make_client(self) -> AsyncOpenAI:
        return AsyncOpenAI(
            api_key=self._api_key or PLACEHOLDER_API_KEY,
            base_url=self.base_url,
            timeout=self.timeout_s,
            max_retries=self.max_retries,
        )

    # -- one document ----------------------------------------------------------------------------------------

    async def _answer(self, client: AsyncOpenAI, request: Request, gate: ExchangeGate | None) -> Prediction:
        text, truncated = truncate_text_to_tokens(request.text, self.max_input_tokens)
        messages = chat_messages(self.task, text)
        prediction = Prediction(id=request.id, model=self.name, truncated=truncated)
        return await self._exchange(prediction, lambda: self._ask(client, gate, messages, prediction))

    async def _ask(
        self, client: AsyncOpenAI, gate: ExchangeGate | None, messages: list[dict[str, str]], prediction: Prediction
    ) -> None:
        """Ask once; if the answer does not fit the schema, show the model its answer and the reason, once.

        An answer cut at `answer_tokens` (below max_output_tokens) is instead asked for again, unchanged, with
        max_output_tokens. Each call is admitted by `gate` with the bound of its own messages and output limit.
        """
        completion = await self._complete(
            client, messages, gate=gate, request_id=prediction.id, kind=ExchangeKind.ANSWER
        )
        prediction.usage += _usage_of(completion)
        try:
            self._read(completion, prediction, self.answer_tokens)
            return
        except _CutShortError:
            log.debug("%s: answer cut at %d tokens, asking again with more", self.name, self.answer_tokens)
            kind, again = ExchangeKind.WIDEN, messages
        except AnswerError as exc:
            log.debug("%s: invalid answer, asking again: %s", self.name, exc)
            kind = ExchangeKind.REPAIR
            again = [
                *messages,
                {"role": "assistant", "content": _content_of(completion)},
                {"role": "user", "content": INVALID_ANSWER_FEEDBACK.format(reason=_brief(str(exc)))},
            ]
        completion = await self._complete(client, again, gate=gate, request_id=prediction.id, kind=kind)
        prediction.usage += _usage_of(completion)
        try:
            self._read(completion, prediction, self._output_limit(kind))
        except AnswerError as exc:
            prediction.error = f"invalid answer from {self.role}: {_brief(str(exc))}"
            prediction.retryable = False

    def _output_limit(self, kind: ExchangeKind) -> int:
        return self.max_output_tokens if kind is ExchangeKind.WIDEN else self.answer_tokens

    def _request_kwargs(self, messages: list[dict[str, str]], output_tokens: int | None = None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "response_format": self._response_format,
            self.token_limit_param: self.answer_tokens if output_tokens is None else output_tokens,
        }
        if self.send_temperature:
            kwargs["temperature"] = 0
        if self.request_logprobs:
            kwargs["logprobs"] = True
            kwargs["top_logprobs"] = 1  # llama-cpp-python's server returns no logprobs without it
        return kwargs

    def request_body(self, request: Request) -> dict[str, Any]:
        """The JSON body of the chat request answering `request`, exactly as sent (batch files reuse it)."""
        text, _ = truncate_text_to_tokens(request.text, self.max_input_tokens)
        return {**self._request_kwargs(chat_messages(self.task, text)), **(self.extra_body or {})}

    def read_completion(self, request_id: str, completion: Any) -> Prediction:
        """Turn a chat completion (an SDK object) into a prediction: typed answer, usage, or the reason it failed."""
        prediction = Prediction(id=request_id, model=self.name)
        prediction.usage = _usage_of(completion)
        try:
            self._read(completion, prediction)
        except AnswerError as exc:
            prediction.error = f"invalid answer from {self.role}: {_brief(str(exc))}"
            prediction.retryable = False
        except _FinalAnswerError as exc:
            prediction.error = str(exc)
            prediction.retryable = False
        return prediction

    async def _complete(
        self,
        client: AsyncOpenAI,
        messages: list[dict[str, str]],
        *,
        gate: ExchangeGate | None,
        request_id: str,
        kind: ExchangeKind,
    ) -> Any:
        """Send one chat call with the output limit of its kind, admitted by `gate` first."""
        output_tokens = self._output_limit(kind)
        kwargs = self._request_kwargs(messages, output_tokens)
        if self.extra_body:
            kwargs["extra_body"] = self.extra_body
        bound = self._call_bound(messages, output_tokens)

        async def call() -> Any:
            return await client.chat.completions.create(**kwargs)

        return await self._send(call, _usage_of, gate=gate, request_id=request_id, kind=kind, bound=bound)

    def _read(self, completion: Any, prediction: Prediction, output_tokens: int | None = None) -> None:
        """Fill label, fields and confidences from a completion, or raise AnswerError / _FinalAnswerError."""
        choices = getattr(completion, "choices", None) or []
        if not choices:
            raise AnswerError("the response holds no answer")
        choice = choices[0]
        refusal = getattr(choice.message, "refusal", None)
        if refusal:
            raise _FinalAnswerError(f"{self.role} refused to answer: {_brief(str(refusal))}")
        if choice.finish_reason == "content_filter":
            raise _FinalAnswerError(f"{self.role} answer withheld by the provider's content filter")
        content = choice.message.content or ""
        try:
            label, fields = parse_answer(self.task, content)
        except AnswerError:
            if choice.finish_reason == "length":
                limit = self.answer_tokens if output_tokens is None else output_tokens
                if limit < self.max_output_tokens:
                    raise _CutShortError(f"cut off at the answer's length bound of {limit} tokens") from None
                raise _FinalAnswerError(
                    f"invalid answer from {self.role}: cut off at max_output_tokens={self.max_output_tokens}"
                ) from None
            raise
        prediction.label, prediction.fields = label, fields
        confidences = self._confidences(choice, content)
        prediction.label_confidence = confidences.get("label") if self.task.classify else None
        prediction.field_confidences = {name: confidences.get(name) for name in self._field_names}

    def _confidences(self, choice: Any, content: str) -> dict[str, float | None]:
        logprobs = getattr(choice, "logprobs", None)
        entries = getattr(logprobs, "content", None) if logprobs is not None else None
        if not self.request_logprobs or not entries:
            return dict.fromkeys(self._keys)
        tokens: list[tuple[bytes | str, float]] = [
            (bytes(entry.bytes) if entry.bytes is not None else entry.token, float(entry.logprob)) for entry in entries
        ]
        return value_confidences(content, tokens, self._keys)

    def _transport_error(self, exc: openai.OpenAIError) -> tuple[str, bool]:
        """Describe a failure the SDK gave up on, without secrets, and say whether a later try may succeed."""
        failure = sdk_failure(exc)
        return f"{type(exc).__name__}: {_brief(redact(failure.message, self._api_key))}", failure.retryable


def engine_from_frontier_spec(spec: FrontierSpec, task: TaskSpec) -> OpenAICompatibleEngine:
    """Build the frontier engine for provider `openai` or `openai_compatible` from the job spec."""
    if spec.provider not in ("openai", "openai_compatible"):
        raise ValueError(f"provider {spec.provider!r} is not served by the OpenAI-compatible engine")
    api_key = spec.api_key.get_secret_value() if spec.api_key is not None else None
    openai_proper = spec.provider == "openai"
    if openai_proper and not api_key:
        raise EngineUnavailableError(
            "no OpenAI API key: set frontier.api_key, or the environment variable named by "
            "frontier.api_key_env (default OPENAI_API_KEY)"
        )
    reasoning = openai_proper and is_openai_reasoning_model(spec.model)
    return OpenAICompatibleEngine(
        task=task,
        model=spec.model,
        base_url=spec.base_url,
        api_key=api_key,
        max_concurrency=spec.max_concurrency,
        timeout_s=spec.timeout_s,
        max_retries=spec.max_retries,
        max_output_tokens=spec.max_output_tokens,
        max_input_tokens=spec.max_input_tokens,
        extra_body=spec.extra_body or None,
        name_prefix=spec.provider,
        token_limit_param="max_completion_tokens" if openai_proper else "max_tokens",
        send_temperature=not reasoning,
    )


def engine_from_small_spec(spec: OpenAICompatibleSmallSpec, task: TaskSpec) -> OpenAICompatibleEngine:
    """Build the small-model engine for a served model; logprobs on, since routing needs its confidences."""
    return OpenAICompatibleEngine(
        task=task,
        model=spec.model,
        base_url=spec.base_url,
        api_key=spec.api_key.get_secret_value() if spec.api_key is not None else None,
        max_concurrency=spec.max_concurrency,
        timeout_s=spec.timeout_s,
        max_retries=spec.max_retries,
        max_output_tokens=spec.max_output_tokens,
        max_input_tokens=spec.max_input_tokens,
        request_logprobs=True,
        # vllm serve enforces its own structured-outputs field natively (and response_format as well)
        extra_body={"structured_outputs": {"json": answer_schema(task)}} if spec.server == "vllm" else None,
        name_prefix=spec.engine,
        role="small model",
        schema_style="json_object" if spec.server == "llamacpp" else "json_schema",
        bound_output_by_schema=False,  # no budget meters the small model: keep its own limit
    )


def _brief(text: str) -> str:
    return one_line(text, _ERROR_CHARS)

"""Any OpenAI-compatible chat endpoint (OpenAI, `vllm serve`, llama.cpp server) as a docroute Engine.

The official SDK does the transport work: its client retries 408/409/429/5xx, timeouts and connection errors
with exponential backoff and jitter, and honours `retry-after-ms` / `retry-after` (openai/_base_client.py,
`_parse_retry_after_header` and `_calculate_retry_timeout`). The batch plumbing, the repair round, error rows and
the one event loop every calling thread shares come from engines/remote/client_base.py; this module is the Chat
Completions wire format: structured outputs (`response_format`, or vLLM's and llama.cpp's own forms), the token
limit parameter each server reads, and logprobs turned into per-value confidences.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

import openai
from openai import AsyncOpenAI

from docroute.engines.base import PLACEHOLDER_API_KEY, EngineUnavailableError, Usage
from docroute.engines.remote.client_base import AsyncClientEngine, Reply, SdkErrors, Turns, brief
from docroute.engines.scoring.prompts import answer_schema, estimate_prompt_tokens
from docroute.schemas.spec import FrontierSpec, OpenAICompatibleSmallSpec, TaskSpec

TokenLimitParam = Literal["max_tokens", "max_completion_tokens"]

OPENAI_ERRORS = SdkErrors(openai.OpenAIError, openai.APIStatusError, openai.APIConnectionError)
"""How every client built on the `openai` SDK reads its failures (this engine, the `/v1/embeddings` encoder)."""

_RETOKENIZE_MARGIN = 16
"""Tokens a generated answer may gain when sent back as input (generation need not split text canonically)."""
_OPENAI_REASONING = re.compile(r"^(?:o[1-9]|gpt-5)(?!.*-chat)")
_REASONING_OPTIONS = frozenset(
    {"reasoning_effort", "reasoning", "thinking", "include_reasoning", "chat_template_kwargs"}
)
"""extra_body keys that may make a model think before answering; thinking counts as output tokens."""


def is_openai_reasoning_model(model: str) -> bool:
    """Say whether an OpenAI model is a reasoning model (o-series, gpt-5), which rejects temperature != 1."""
    return bool(_OPENAI_REASONING.match(model))


def _content_of(completion: Any) -> str:
    choices = getattr(completion, "choices", None) or []
    return (choices[0].message.content or "") if choices else ""


class OpenAICompatibleEngine(AsyncClientEngine[AsyncOpenAI]):
    """Answer a task with a chat model behind an OpenAI-compatible API: one structured-output call a document.

    Errors never raise out of `predict` for a single document: transport failures that outlive the SDK's
    retries become rows with `retryable=True` (a later run may succeed), bad requests, auth failures and
    answers that stay invalid after one repair round become rows with `retryable=False`.
    """

    sdk_errors = OPENAI_ERRORS
    answer_margin_tokens = 16

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
        omits temperature for models that reject 0 (OpenAI reasoning models). `bound_output_by_schema` is off in
        effect for models that may think before answering (OpenAI reasoning models, an `extra_body` naming
        reasoning or thinking).
        """
        super().__init__(
            task=task,
            model=model,
            base_url=base_url,
            api_key=api_key,
            max_concurrency=max_concurrency,
            timeout_s=timeout_s,
            max_retries=max_retries,
            max_output_tokens=max_output_tokens,
            max_input_tokens=max_input_tokens,
            extra_body=extra_body,
            name_prefix=name_prefix,
            role=role,
            bound_output_by_schema=bound_output_by_schema,
        )
        self.request_logprobs = request_logprobs
        self.token_limit_param: TokenLimitParam = token_limit_param
        self.send_temperature = send_temperature
        self._response_format: dict[str, Any] = (
            {"type": "json_schema", "json_schema": {"name": "answer", "schema": answer_schema(task), "strict": True}}
            if schema_style == "json_schema"
            else {"type": "json_object", "schema": answer_schema(task)}
        )
        self._schema_bytes = len(json.dumps(self._response_format).encode("utf-8"))

    # -- the Chat Completions wire format --------------------------------------------------------------------

    def _may_think(self) -> bool:
        return is_openai_reasoning_model(self.model) or bool(_REASONING_OPTIONS & set(self.extra_body or {}))

    def _make_client(self) -> AsyncOpenAI:
        return AsyncOpenAI(
            api_key=self._api_key or PLACEHOLDER_API_KEY,
            base_url=self.base_url,
            timeout=self.timeout_s,
            max_retries=self.max_retries,
        )

    def _request(self, prompt: list[dict[str, str]], turns: Turns, output_tokens: int) -> dict[str, Any]:
        request: dict[str, Any] = {
            "model": self.model,
            "messages": [*prompt, *turns],
            "response_format": self._response_format,
            self.token_limit_param: output_tokens,
        }
        if self.send_temperature:
            request["temperature"] = 0
        if self.request_logprobs:
            request["logprobs"] = True
            request["top_logprobs"] = 1  # llama-cpp-python's server returns no logprobs without it
        return request

    async def _create(self, client: AsyncOpenAI, request: dict[str, Any]) -> Any:
        return await client.chat.completions.create(**request)

    def _call_bound(self, prompt: list[dict[str, str]], turns: Turns, output_tokens: int) -> Usage:
        """The messages' UTF-8 bytes plus the response schema, which providers count as input too."""
        messages = [*prompt, *turns]
        return Usage(input_tokens=estimate_prompt_tokens(messages) + self._schema_bytes, output_tokens=output_tokens)

    def _echo_bound(self) -> int:
        return self.answer_tokens + _RETOKENIZE_MARGIN

    def _usage(self, response: Any) -> Usage:
        usage = getattr(response, "usage", None)
        if usage is None:
            return Usage()
        details = getattr(usage, "prompt_tokens_details", None)
        cached = (getattr(details, "cached_tokens", None) or 0) if details is not None else 0
        return Usage(int(usage.prompt_tokens or 0), int(usage.completion_tokens or 0), int(cached))

    def _reply(self, response: Any) -> Reply:
        choices = getattr(response, "choices", None) or []
        if not choices:
            return Reply(None)
        choice = choices[0]
        refusal = getattr(choice.message, "refusal", None)
        if refusal:
            return Reply(None, final=f"{self.role} refused to answer: {brief(str(refusal))}")
        if choice.finish_reason == "content_filter":
            return Reply(None, final=f"{self.role} answer withheld by the provider's content filter")
        logprobs = getattr(choice, "logprobs", None)
        entries = (getattr(logprobs, "content", None) if logprobs is not None else None) or []
        tokens = [
            (bytes(entry.bytes) if entry.bytes is not None else entry.token, float(entry.logprob)) for entry in entries
        ]
        return Reply(
            choice.message.content or "",
            cut=choice.finish_reason == "length",
            tokens=tokens if self.request_logprobs else (),
        )

    def _repair_turns(self, response: Any, feedback: str) -> Turns:
        return [{"role": "assistant", "content": _content_of(response)}, {"role": "user", "content": feedback}]


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

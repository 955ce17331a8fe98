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
(`_calculate_retry_timeout`). The batch plumbing, the repair round, error rows and the one event loop every
calling thread shares come from engines/remote/client_base.py; this module is the Messages wire format.

The SDK sends API version 2026-10-21, which rejects `temperature`, `top_p` and `top_k` outright (HTTP 400,
even at their defaults), and the SDK itself has no such parameters; so unlike the OpenAI engine no
temperature is sent. A forced tool call on a fixed prompt is what keeps answers stable.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
from anthropic import AsyncAnthropic

from docroute.engines.base import EngineUnavailableError, Usage
from docroute.engines.remote.client_base import TOKENS_PER_MESSAGE, AsyncClientEngine, Reply, SdkErrors, Turns, brief
from docroute.engines.scoring.prompts import answer_schema, estimate_prompt_tokens
from docroute.schemas.spec import FrontierSpec, TaskSpec

TOOL_NAME = "record_answer"
"""The one tool every request declares and forces; its input is the answer object."""

ANTHROPIC_ERRORS = SdkErrors(anthropic.AnthropicError, anthropic.APIStatusError, anthropic.APIConnectionError)

_TOOL_DESCRIPTION = (
    "Record your answer for the document: one object with exactly the keys the system prompt lists, "
    "null for a field the document does not state."
)
_CACHE_CONTROL: dict[str, str] = {"type": "ephemeral"}

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

    sdk_errors = ANTHROPIC_ERRORS
    answer_margin_tokens = 96  # a forced tool call's framing counts as output too

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
        `bound_output_by_schema` is off in effect when `extra_body` turns on extended thinking.
        """
        if not api_key:
            raise EngineUnavailableError("the Anthropic engine needs an API key")
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
            role="frontier",
            bound_output_by_schema=bound_output_by_schema,
        )
        self._tool: dict[str, Any] = {
            "name": TOOL_NAME,
            "description": _TOOL_DESCRIPTION,
            "input_schema": answer_schema(task),
        }
        # one call, exactly one tool_use: a parallel second call would need a tool_result of its own in repair
        self._tool_choice: dict[str, Any] = {"type": "tool", "name": TOOL_NAME, "disable_parallel_tool_use": True}
        self._tool_bytes = len(json.dumps([self._tool, self._tool_choice]).encode("utf-8"))
        self._echo_limit_bytes = _ECHO_BYTES_PER_OUTPUT_TOKEN * max_output_tokens

    # -- the Messages wire format ----------------------------------------------------------------------------

    def _may_think(self) -> bool:
        return "thinking" in (self.extra_body or {})

    def _make_client(self) -> AsyncAnthropic:
        return AsyncAnthropic(
            api_key=self._api_key,
            base_url=self.base_url,
            timeout=self.timeout_s,
            max_retries=self.max_retries,
        )

    def _request(self, prompt: list[dict[str, str]], turns: Turns, output_tokens: int) -> dict[str, Any]:
        """The chat prompt as Anthropic's cached `system` blocks and the user turn, then the repair turns."""
        system, user = prompt
        return {
            "model": self.model,
            "max_tokens": output_tokens,
            "system": [{"type": "text", "text": system["content"], "cache_control": dict(_CACHE_CONTROL)}],
            "messages": [{"role": "user", "content": user["content"]}, *turns],
            "tools": [self._tool],
            "tool_choice": self._tool_choice,
        }

    async def _create(self, client: AsyncAnthropic, request: dict[str, Any]) -> Any:
        return await client.messages.create(**request)

    def _call_bound(self, prompt: list[dict[str, str]], turns: Turns, output_tokens: int) -> Usage:
        """Bound one call: the chat prompt's bytes, the repair turns' JSON bytes, the tool and tool-use tokens."""
        inputs = estimate_prompt_tokens(prompt) + self._tool_bytes + _TOOL_USE_SYSTEM_TOKENS
        if turns:
            turn_bytes = len(json.dumps(turns, ensure_ascii=False, default=str).encode("utf-8"))
            inputs += turn_bytes + _REPAIR_OVERHEAD_TOKENS + len(turns) * TOKENS_PER_MESSAGE
        return Usage(input_tokens=inputs, output_tokens=output_tokens)

    def _echo_bound(self) -> int:
        """The bytes of an answer `_repair_turns` still sends back, plus the blocks that carry it.

        Cache writes, billed at 1.25x, are counted as plain input (see `_usage`).
        """
        return self._echo_limit_bytes + _REPAIR_OVERHEAD_TOKENS

    def _usage(self, response: Any) -> Usage:
        """Token usage of one Messages response.

        Anthropic reports fresh input, cache writes and cache reads separately; together they are the prompt
        (docroute's input_tokens), and cache reads are the discounted subset (cached_tokens). Cache writes are
        the subset billed at the cache-write rate (cache_write_tokens).
        """
        usage = getattr(response, "usage", None)
        if usage is None:
            return Usage()
        fresh = int(getattr(usage, "input_tokens", 0) or 0)
        written = int(getattr(usage, "cache_creation_input_tokens", 0) or 0)
        read = int(getattr(usage, "cache_read_input_tokens", 0) or 0)
        return Usage(fresh + written + read, int(getattr(usage, "output_tokens", 0) or 0), read, written)

    def _reply(self, response: Any) -> Reply:
        stop = getattr(response, "stop_reason", None)
        if stop == "refusal":
            details = getattr(response, "stop_details", None)
            explanation = getattr(details, "explanation", None) if details is not None else None
            category = getattr(details, "category", None) if details is not None else None
            said = f" ({category}): {brief(str(explanation))}" if explanation else f" ({category})" if category else ""
            return Reply(None, final=f"{self.role} refused to answer{said}")
        if stop == "max_tokens":
            # a tool input cut short can still parse, minus the fields it never reached: never accept it
            return Reply(None, cut=True)
        if stop == "model_context_window_exceeded":
            return Reply(
                None, final=f"{self.role} context window exceeded: lower max_input_tokens (now {self.max_input_tokens})"
            )
        call = _tool_call(response)
        if call is None:
            return Reply(None, missing=f"the response holds no {TOOL_NAME} tool call")
        if not isinstance(call.input, dict):
            return Reply(None, missing=f"the {TOOL_NAME} input is a JSON {type(call.input).__name__}, not an object")
        return Reply(call.input)

    def _repair_turns(self, response: Any, feedback: str) -> Turns | None:
        """The assistant turn as answered plus the feedback, or None when the answer is too big to send back.

        A tool call must be answered by a `tool_result` for the same id: the feedback goes there, flagged
        `is_error`, which is how the API tells a model its call failed. An answer without a tool call is sent
        back as text, followed by the feedback as a plain user turn.
        """
        call = _tool_call(response)
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
        text = _text_of(response)
        if len(text.encode("utf-8")) > self._echo_limit_bytes:
            return None
        turns: Turns = [{"role": "assistant", "content": text}] if text else []
        return [*turns, {"role": "user", "content": feedback}]


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

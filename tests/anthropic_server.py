"""A real Anthropic Messages API server on 127.0.0.1 that answers from a fixed table, for tests.

The Anthropic engine is tested through the real `anthropic` SDK and real sockets, so retries, timeouts, headers
and JSON shapes are exercised as in production; only the model is replaced by a lookup. The server speaks the
wire format of POST /v1/messages: content blocks, `tool_use` blocks with id/name/input, usage with the prompt
cache fields, `stop_reason`, and error bodies `{"type": "error", "error": {"type": ..., "message": ...}}`. It
also rejects what the real API (version 2026-10-21) rejects and a fake would otherwise let slide: sampling
parameters, a `tool_choice` naming an undeclared tool, a `tool_use` without its `tool_result`.

    with AnthropicServer([("Invoice", {"label": "invoice"})], faults=["529"]) as server:
        engine = AnthropicEngine(..., base_url=server.base_url, api_key="sk-ant-test")
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

from fake_server import FakeHandler, FakeServer

AnswerEntry = tuple[str, Any]
"""(needle, answer): the answer is the tool input (a dict) sent when the needle is in the user's text."""

TOOL_USE_SYSTEM_TOKENS = 313
"""Input tokens the real API adds for tool_choice `tool` (Anthropic's documented figure), billed here too."""
TOKENS_PER_MESSAGE = 8

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
_SAMPLING = ("temperature", "top_p", "top_k")


def prompt_bytes(text: str) -> int:
    return len(text.encode("utf-8"))


class AnthropicServer(FakeServer):
    """An Anthropic Messages server answering from `answers` with a forced tool call, as a context manager.

    The answer is chosen from the user turns, newest first: the first needle found in the newest user turn
    that contains any needle wins (so a repair turn holding only a tool_result still gets the document's
    answer); with no match, `default`. Every request is recorded in `.requests` (method, path, lowercased
    headers, parsed body, then the status and JSON it got). `max_in_flight` is the highest number of message
    requests it was serving at once.

    Tokens are counted as the worst case a byte-based bound must cover: one input token per UTF-8 byte of
    the system text, message text, tool inputs sent back and the tool definitions, plus
    TOOL_USE_SYSTEM_TOKENS and TOKENS_PER_MESSAGE a turn. Output is a token per 4 bytes of the answer, at most
    `max_tokens`. The prompt cache is modelled: a system prompt whose last block carries `cache_control` is
    written to the cache on first sight (cache_creation_input_tokens) and read on later requests
    (cache_read_input_tokens); `input_tokens` is the rest.

    Faults, consumed one per message request in arrival order, then normal answers:
      "429"         status 429 `rate_limit_error` with `retry-after: <retry_after>`
      "529"         status 529 `overloaded_error`
      "500"/"400"/... any status code, with an Anthropic error body
      "401"         status 401 `authentication_error` quoting the key it was given
      "hang"        wait `hang_s` (longer than the client's timeout), then answer normally
      "invalid"     a tool call whose input breaks the schema (label not in the enum, every field an object)
      "max_tokens"  stop_reason "max_tokens", the tool input cut to its first half of keys
      "refusal"     stop_reason "refusal" with stop_details and no tool call
      "text"        a text block instead of a tool call, stop_reason "end_turn"
      "ok"          a normal answer
    With `api_key` set, a request whose `x-api-key` or `Authorization: Bearer` is not that key gets 401 whose
    message quotes the key it was given, the worst case a client must redact.

    Lifecycle, request records, the fault queue and the transport faults come from FakeServer (fake_server.py);
    `base_url` is the API root, as the SDK wants it: it appends /v1/messages itself.
    """

    thread_name = "anthropic-server"

    def __init__(
        self,
        answers: Sequence[AnswerEntry] = (),
        *,
        default: Any = None,
        faults: Iterable[str] = (),
        hang_s: float = 2.0,
        delay_s: float = 0.0,
        retry_after: str = "0.2",
        api_key: str | None = None,
        model: str = "claude-oracle-1",
    ) -> None:
        super().__init__(
            _Handler,
            faults=faults,
            hang_s=hang_s,
            delay_s=delay_s,
            retry_after=retry_after,
            api_key=api_key,
            model=model,
        )
        self.answers: list[AnswerEntry] = list(answers)
        self.default: Any = {} if default is None else default
        self._cache: set[str] = set()

    # -- test helpers ----------------------------------------------------------------------------------------

    @property
    def message_requests(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.requests if r["path"].split("?")[0].rstrip("/").endswith("/v1/messages")]

    def answered(self) -> list[dict[str, Any]]:
        """The 200 responses served, in arrival order."""
        return [r["response"] for r in self.message_requests if r.get("status") == 200]

    def served_usage(self) -> tuple[int, int, int]:
        """(input incl. cache writes and reads, output, cache reads) summed over every 200 response."""
        usages = [r["usage"] for r in self.answered()]
        return (
            sum(u["input_tokens"] + u["cache_creation_input_tokens"] + u["cache_read_input_tokens"] for u in usages),
            sum(u["output_tokens"] for u in usages),
            sum(u["cache_read_input_tokens"] for u in usages),
        )

    # -- answers (called from handler threads) ---------------------------------------------------------------

    def _pick(self, messages: Sequence[Mapping[str, Any]]) -> Any:
        user_texts = [_user_text(m.get("content")) for m in messages if m.get("role") == "user"]
        for text in reversed(user_texts):
            for needle, answer in self.answers:
                if needle in text:
                    return answer
        return self.default

    def _usage(self, body: Mapping[str, Any], output_tokens: int) -> dict[str, int]:
        system = body.get("system")
        blocks: list[Any] = [{"type": "text", "text": system}] if isinstance(system, str) else list(system or [])
        system_text = "".join(str(b.get("text", "")) for b in blocks if isinstance(b, dict))
        tools_bytes = prompt_bytes(json.dumps(body.get("tools") or []))
        messages = body.get("messages") or []
        prefix = tools_bytes + TOOL_USE_SYSTEM_TOKENS + prompt_bytes(system_text) + TOKENS_PER_MESSAGE
        rest = sum(_message_bytes(m.get("content")) + TOKENS_PER_MESSAGE for m in messages)
        written = read = 0
        if blocks and isinstance(blocks[-1], dict) and (blocks[-1].get("cache_control") or {}).get("type"):
            key = json.dumps([body.get("model"), body.get("tools"), system_text])
            with self._lock:
                hit = key in self._cache
                self._cache.add(key)
            written, read = (0, prefix) if hit else (prefix, 0)
        return {
            "input_tokens": prefix + rest - written - read,
            "cache_creation_input_tokens": written,
            "cache_read_input_tokens": read,
            "output_tokens": output_tokens,
        }

    def _message(self, body: Mapping[str, Any], fault: str) -> dict[str, Any]:
        answer = self._pick(body.get("messages") or [])
        tool_choice = body.get("tool_choice") or {}
        tools = body.get("tools") or [{}]
        tool_name = tool_choice.get("name") or tools[0].get("name") or "record_answer"
        max_tokens = int(body.get("max_tokens") or 0)
        serial = self._next_serial()
        stop_reason = "tool_use"
        stop_details: dict[str, Any] | None = None
        tool_input: Any = answer
        if fault == "invalid":
            properties = (tools[0].get("input_schema") or {}).get("properties") or {}
            tool_input = {"label": "__not_a_label__"}
            tool_input.update({name: {"invalid": True} for name in properties if name != "label"})
        elif fault == "max_tokens":
            keys = list(answer)[: len(answer) // 2]
            tool_input = {k: answer[k] for k in keys}
            stop_reason = "max_tokens"
        content: list[dict[str, Any]] = [
            {"type": "tool_use", "id": f"toolu_oracle_{serial:04d}", "name": tool_name, "input": tool_input}
        ]
        if fault == "refusal":
            content, stop_reason = [], "refusal"
            stop_details = {"type": "refusal", "category": "general_harms", "explanation": "Not something I do."}
        elif fault == "text":
            content, stop_reason = [{"type": "text", "text": f"My answer: {json.dumps(answer)}"}], "end_turn"
        generated = json.dumps(content[0].get("input", content[0].get("text"))) if content else "x"
        output_tokens = max_tokens if fault == "max_tokens" else min(prompt_bytes(generated) // 4 + 1, max_tokens)
        return {
            "id": f"msg_oracle_{serial:04d}",
            "type": "message",
            "role": "assistant",
            "model": str(body.get("model") or self.model),
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "stop_details": stop_details,
            "usage": self._usage(body, output_tokens),
        }


def _user_text(content: Any) -> str:
    """The text of a user turn: a string, or its text blocks and tool_result contents."""
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for block in content if isinstance(content, list) else []:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text":
            parts.append(str(block.get("text", "")))
        elif block.get("type") == "tool_result":
            parts.append(_user_text(block.get("content")))
    return "".join(parts)


def _message_bytes(content: Any) -> int:
    """Input tokens of one turn's content, a token per byte: text, tool inputs sent back, tool results."""
    if isinstance(content, str):
        return prompt_bytes(content)
    total = 0
    for block in content if isinstance(content, list) else []:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            total += prompt_bytes(str(block.get("text", "")))
        elif kind == "tool_use":
            rendered = json.dumps(block.get("input"), ensure_ascii=False)
            total += prompt_bytes(rendered) + prompt_bytes(str(block.get("id"))) + prompt_bytes(str(block.get("name")))
        elif kind == "tool_result":
            total += _message_bytes(block.get("content")) + prompt_bytes(str(block.get("tool_use_id")))
    return total


def _problem(body: Mapping[str, Any]) -> str | None:
    """What the real API would reject this request for (a 400), or None."""
    for name in _SAMPLING:
        if name in body:
            return f"{name}: Extra inputs are not permitted"
    if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] < 1:
        return "max_tokens: Field required"
    if not body.get("model"):
        return "model: Field required"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: at least one message is required"
    if messages[0].get("role") != "user":
        return "messages: the first message must use the user role"
    tools = {t.get("name") for t in body.get("tools") or []}
    choice = body.get("tool_choice") or {}
    if choice.get("type") == "tool" and choice.get("name") not in tools:
        return f"tool_choice: tool {choice.get('name')!r} not found in tools"
    for i, message in enumerate(messages):
        content = message.get("content")
        uses = (
            [b["id"] for b in content if isinstance(b, dict) and b.get("type") == "tool_use"]
            if isinstance(content, list)
            else []
        )
        if not uses:
            continue
        following = messages[i + 1].get("content") if i + 1 < len(messages) else None
        results = (
            {b.get("tool_use_id") for b in following if isinstance(b, dict) and b.get("type") == "tool_result"}
            if isinstance(following, list)
            else set()
        )
        missing = [u for u in uses if u not in results]
        if missing:
            return (
                f"messages.{i + 1}: tool_use ids were found without tool_result blocks immediately after: {missing[0]}"
            )
    return None


def error_body(status: int, message: str) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_oracle"}


class _Handler(FakeHandler):
    """POST /v1/messages, with the API's auth check and error bodies; every other route is a 404."""

    fake: AnthropicServer
    response_headers: ClassVar[Mapping[str, str]] = {"request-id": "req_oracle"}
    rate_limit_message = "Number of request tokens has exceeded your per-minute rate limit"
    retry_after_header = "retry-after"

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        return error_body(status, message)

    def fault_message(self, status: int) -> str:
        return "Overloaded" if status == 529 else super().fault_message(status)

    def _post(self, path: str, body: Any, headers: Mapping[str, str]) -> None:
        if not path.endswith("/v1/messages"):
            self._not_found()
            return
        with self.fake.in_flight():
            self._messages(body if isinstance(body, dict) else {}, headers)

    def _messages(self, body: dict[str, Any], headers: Mapping[str, str]) -> None:
        fake = self.fake
        given = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ").strip()
        if fake.api_key is not None and given != fake.api_key:
            self._send_error(401, f"invalid x-api-key: {given}")
            return
        fault = self._take_fault()
        if fault == "401":
            self._send_error(401, f"invalid x-api-key: {given}")
            return
        if self._serve_transport_fault(fault):
            return
        problem = _problem(body)
        if problem is not None:
            self._send_error(400, problem)
            return
        self._send_json(200, fake._message(body, fault))

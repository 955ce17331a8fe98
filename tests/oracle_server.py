"""A real OpenAI-compatible HTTP server on 127.0.0.1 that answers from a fixed table, for tests.

Engines are tested through the real `openai` SDK and real sockets, so retries, timeouts, headers and JSON
shapes are exercised as in production; only the model is replaced by a lookup. Faults (429 with Retry-After,
5xx, hangs, malformed or schema-violating answers, any status code) are injected one per request, in arrival
order.

    with OracleServer([("Invoice", {"label": "invoice"})], faults=["429"]) as server:
        engine = OpenAICompatibleEngine(..., base_url=server.base_url, api_key="sk-test")
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fake_server import STATUS_FAULT, FakeHandler, FakeServer

AnswerEntry = tuple[str, Any] | tuple[str, Any, float]
"""(needle, answer) or (needle, answer, logprob per token); the answer is a dict (sent as JSON) or text."""

_TOKEN = re.compile(r"\w+|\s+|[^\w\s]")


def fake_tokens(content: str) -> list[str]:
    """Split text into deterministic pseudo-tokens (words, whitespace runs, single punctuation marks)."""
    return _TOKEN.findall(content)


class OracleServer(FakeServer):
    """An OpenAI-compatible chat server answering from `answers`, usable as a context manager.

    The answer is chosen from the user messages, newest first: the first needle found in the newest user
    message that contains any needle wins (so a "that answer was invalid" follow-up still gets the document's
    answer); with no match, `default`. Every request is recorded in `.requests` (method, path, lowercased
    headers, parsed body, then the status and JSON it got). `max_in_flight` is the highest number of chat
    requests it was serving at once.

    Faults, consumed one per chat request in arrival order, then normal answers:
      "429"        status 429 with `Retry-After: <retry_after>`
      "500"/"503"/"400"/... any status code, with an OpenAI-style error body
      "hang"       wait `hang_s` (longer than the client's timeout), then answer normally
      "malformed"  content "{not json"
      "invalid"    valid JSON that breaks the schema (label not in the enum, every field an object)
      "length"     finish_reason "length" with the answer cut in half
      "refusal"    message.refusal set, content null
      "ok"         a normal answer
    With `api_key` set, a request without `Authorization: Bearer <api_key>` gets 401 whose message quotes the
    key it was given, the worst case a client must redact.

    Lifecycle, request records, the fault queue and the transport faults come from FakeServer (fake_server.py).
    """

    thread_name = "oracle-server"
    api_root = "/v1"

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
        cached_tokens: int = 0,
        model: str = "oracle-1",
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
        self.cached_tokens = cached_tokens
        self.files: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.hold_batches = False
        self.batch_faults: list[str] = []

    # -- test helpers ----------------------------------------------------------------------------------------

    @property
    def chat_requests(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.requests if r["path"].endswith("/chat/completions")]

    # -- the Files and Batch APIs --------------------------------------------------------------------------

    def _store_file(self, content: bytes, filename: str, purpose: str) -> dict[str, Any]:
        with self._lock:
            file_id = f"file-{len(self.files) + 1}"
            meta = {
                "id": file_id,
                "object": "file",
                "bytes": len(content),
                "created_at": 0,
                "filename": filename,
                "purpose": purpose,
                "status": "processed",
            }
            self.files[file_id] = {"meta": meta, "content": content}
        return meta

    def _create_batch(self, body: Mapping[str, Any]) -> dict[str, Any]:
        with self._lock:
            batch_id = f"batch_{len(self.batches) + 1}"
            batch = {
                "id": batch_id,
                "object": "batch",
                "endpoint": body.get("endpoint"),
                "input_file_id": body.get("input_file_id"),
                "completion_window": body.get("completion_window"),
                "status": "in_progress",
                "output_file_id": None,
                "error_file_id": None,
                "created_at": 0,
                "metadata": body.get("metadata"),
                "request_counts": {"total": 0, "completed": 0, "failed": 0},
            }
            self.batches[batch_id] = batch
        if not self.hold_batches:
            self.complete_batches()
        return batch

    def complete_batches(self) -> None:
        """Answer every pending batch: each line as the chat endpoint would, faults from `batch_faults`."""
        for batch in list(self.batches.values()):
            if batch["status"] != "in_progress":
                continue
            lines = self.files[batch["input_file_id"]]["content"].decode("utf-8").splitlines()
            outputs, errors = [], []
            for number, line in enumerate(lines):
                item = json.loads(line)
                with self._lock:
                    fault = self.batch_faults.pop(0) if self.batch_faults else "ok"
                if STATUS_FAULT.match(fault):
                    errors.append(
                        {
                            "id": f"batch_req_{number}",
                            "custom_id": item["custom_id"],
                            "response": {
                                "status_code": int(fault),
                                "request_id": "r",
                                "body": _error_body(int(fault), "x"),
                            },
                            "error": None,
                        }
                    )
                    continue
                outputs.append(
                    {
                        "id": f"batch_req_{number}",
                        "custom_id": item["custom_id"],
                        "response": {"status_code": 200, "request_id": "r", "body": self._answer(item["body"], fault)},
                        "error": None,
                    }
                )
            output = self._store_file("\n".join(json.dumps(o) for o in outputs).encode(), "out.jsonl", "batch_output")
            batch["output_file_id"] = output["id"]
            if errors:
                failed = self._store_file(
                    "\n".join(json.dumps(e) for e in errors).encode(), "err.jsonl", "batch_output"
                )
                batch["error_file_id"] = failed["id"]
            batch["status"] = "completed"
            batch["request_counts"] = {"total": len(lines), "completed": len(outputs), "failed": len(errors)}

    # -- answers (called from handler threads) ---------------------------------------------------------------

    def _pick(self, messages: Sequence[Mapping[str, Any]]) -> tuple[Any, float]:
        user_texts = [_text_of(m.get("content")) for m in messages if m.get("role") == "user"]
        for text in reversed(user_texts):
            for entry in self.answers:
                if entry[0] in text:
                    logprob = float(entry[2]) if len(entry) == 3 else 0.0
                    return entry[1], logprob
        return self.default, 0.0

    def _answer(self, body: Mapping[str, Any], fault: str) -> dict[str, Any]:
        messages = body.get("messages") or []
        answer, logprob = self._pick(messages)
        finish_reason = "stop"
        refusal: str | None = None
        content: str | None = answer if isinstance(answer, str) else json.dumps(answer)
        if fault == "malformed":
            content = "{not json"
        elif fault == "invalid":
            schema = ((body.get("response_format") or {}).get("json_schema") or {}).get("schema") or {}
            broken: dict[str, Any] = {"label": "__not_a_label__"}
            broken.update({name: {"invalid": True} for name in schema.get("properties", {}) if name != "label"})
            content = json.dumps(broken)
        elif fault == "length":
            assert content is not None
            content = content[: len(content) // 2]
            finish_reason = "length"
        elif fault == "refusal":
            content, refusal = None, "I cannot help with that."
        serial = self._next_serial()
        prompt_chars = sum(len(_text_of(m.get("content"))) for m in messages)
        completion_text = content if content is not None else (refusal or "")
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": content, "refusal": refusal},
            "logprobs": None,
            "finish_reason": finish_reason,
        }
        if body.get("logprobs") and content is not None:
            choice["logprobs"] = {
                "content": [
                    {"token": t, "logprob": logprob, "bytes": list(t.encode("utf-8")), "top_logprobs": []}
                    for t in fake_tokens(content)
                ],
                "refusal": None,
            }
        prompt_tokens = prompt_chars // 4 + 1
        completion_tokens = len(completion_text) // 4 + 1
        return {
            "id": f"chatcmpl-oracle-{serial}",
            "object": "chat.completion",
            "created": 0,
            "model": str(body.get("model") or self.model),
            "choices": [choice],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": min(self.cached_tokens, prompt_tokens)},
            },
        }


def _text_of(content: Any) -> str:
    """Message content as text: a string, or the text parts of a content list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def _multipart(content_type: str, raw: bytes) -> dict[str, Any]:
    """Parse a multipart/form-data body: text fields as str, file fields as (bytes, filename)."""
    from email.parser import BytesParser
    from email.policy import HTTP

    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
    fields: dict[str, Any] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        filename = part.get_filename()
        payload = part.get_payload(decode=True) or b""
        fields[str(name)] = (payload, filename or "upload") if filename else payload.decode("utf-8")
    return fields


def _error_body(status: int, message: str) -> dict[str, Any]:
    kinds = {400: "invalid_request_error", 401: "invalid_request_error", 429: "rate_limit_exceeded"}
    return {"error": {"message": message, "type": kinds.get(status, "server_error"), "param": None, "code": None}}


class _Handler(FakeHandler):
    """The OpenAI routes: chat completions, models, and the Files and Batch APIs."""

    fake: OracleServer

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        return _error_body(status, message)

    def _parse_body(self, raw: bytes) -> Any:
        if self.headers.get("Content-Type", "").startswith("multipart/form-data"):
            return _multipart(self.headers.get("Content-Type", ""), raw)
        return super()._parse_body(raw)

    def _send_bytes(self, data: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _get(self, path: str) -> None:
        oracle = self.fake
        parts = path.split("/")
        if path.endswith("/models"):
            model = {"id": oracle.model, "object": "model", "created": 0, "owned_by": "oracle"}
            self._send_json(200, {"object": "list", "data": [model]})
        elif len(parts) >= 2 and parts[-2] == "batches" and parts[-1] in oracle.batches:
            self._send_json(200, oracle.batches[parts[-1]])
        elif path.endswith("/content") and parts[-2] in oracle.files:
            self._send_bytes(oracle.files[parts[-2]]["content"])
        else:
            self._not_found()

    def _post(self, path: str, body: Any, headers: Mapping[str, str]) -> None:
        oracle = self.fake
        if path.endswith("/files") and isinstance(body, dict) and "file" in body:
            content, filename = body["file"]
            self._send_json(200, oracle._store_file(content, filename, str(body.get("purpose", ""))))
        elif path.endswith("/batches") and isinstance(body, dict):
            self._send_json(200, oracle._create_batch(body))
        elif path.endswith("/chat/completions"):
            with oracle.in_flight():
                self._chat(body if isinstance(body, dict) else {}, headers)
        else:
            self._not_found()

    def _chat(self, body: dict[str, Any], headers: Mapping[str, str]) -> None:
        oracle = self.fake
        if oracle.api_key is not None:
            given = headers.get("authorization", "").removeprefix("Bearer ").strip()
            if given != oracle.api_key:
                message = f"Incorrect API key provided: {given}. You can find your API key at https://example.test."
                self._send_error(401, message)
                return
        fault = self._take_fault()
        if self._serve_transport_fault(fault):
            return
        self._send_json(200, oracle._answer(body, fault))

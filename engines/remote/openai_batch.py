"""The OpenAI Batch API as a frontier: submit escalations as one JSONL file, collect the answers on a later run.

Batch requests cost half the synchronous price and are answered within 24 hours. The request bodies are built by
the synchronous engine (`OpenAICompatibleEngine.request_body`), so a batched answer is the same call, validated
the same way (`read_response`); the file format is the one `vllm run-batch` reads too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from docroute.engines.base import EngineUnavailableError, Prediction, Request, Usage, redact
from docroute.engines.remote.openai_compat import OpenAICompatibleEngine, engine_from_frontier_spec
from docroute.schemas.spec import FrontierSpec, TaskSpec

MAX_REQUESTS_PER_BATCH = 50_000
MAX_BYTES_PER_BATCH = 190 * 1024 * 1024  # OpenAI's limit is 200 MB per input file
FINISHED = frozenset({"completed", "failed", "expired", "cancelled"})
"""Batch statuses after which nothing more will arrive (an expired batch still returns what it finished)."""


@dataclass(frozen=True, slots=True)
class BatchStatus:
    """What the provider says of a submitted batch."""

    batch_id: str
    status: str
    output_file_id: str | None
    error_file_id: str | None
    detail: str = ""

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


class OpenAIBatchFrontier:
    """Submit, poll and collect OpenAI batches for one job's frontier."""

    def __init__(self, spec: FrontierSpec, task: TaskSpec) -> None:
        if spec.provider != "openai":
            raise ValueError("the OpenAI batch frontier needs provider openai")
        self.engine: OpenAICompatibleEngine = engine_from_frontier_spec(spec, task)
        self.name = self.engine.name
        self._spec = spec
        self._api_key = spec.api_key.get_secret_value() if spec.api_key else None

    def _client(self) -> Any:
        import openai

        if not self._api_key:
            raise EngineUnavailableError("no OpenAI API key for the batch API")
        return openai.OpenAI(
            api_key=self._api_key,
            base_url=self._spec.base_url,
            max_retries=self._spec.max_retries,
            timeout=self._spec.timeout_s,
        )

    def usage_bound(self, request: Request) -> Usage:
        """Worst-case tokens of one batched request: its one call (no repair round: a batch answer is final).

        The body asks for at most `answer_tokens`, the answer schema's length bound where it has one.
        """
        return self.engine.answer_bound(request)

    def lines(self, requests: Sequence[Request]) -> list[str]:
        """The batch input file's lines, one per request, keyed by the request id."""
        return [
            json.dumps(
                {
                    "custom_id": request.id,
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": self.engine.request_body(request),
                },
                separators=(",", ":"),
            )
            for request in requests
        ]

    def submit(self, lines: Sequence[str], *, metadata: dict[str, str]) -> str:
        """Upload the lines and start a batch; returns the batch id."""
        payload = ("\n".join(lines) + "\n").encode("utf-8")
        client = self._client()
        try:
            uploaded = client.files.create(file=("docroute-batch.jsonl", payload), purpose="batch")
            batch = client.batches.create(
                input_file_id=uploaded.id,
                endpoint="/v1/chat/completions",
                completion_window="24h",
                metadata=metadata,
            )
        except Exception as exc:  # the SDK's errors, described without secrets
            raise RuntimeError(redact(f"{type(exc).__name__}: {exc}", self._api_key)) from None
        finally:
            client.close()
        return str(batch.id)

    def status(self, batch_id: str) -> BatchStatus:
        client = self._client()
        try:
            batch = client.batches.retrieve(batch_id)
        finally:
            client.close()
        errors = getattr(batch, "errors", None)
        detail = ""
        if errors is not None and getattr(errors, "data", None):
            detail = "; ".join(str(getattr(e, "message", e)) for e in errors.data)[:500]
        return BatchStatus(batch_id, str(batch.status), batch.output_file_id, batch.error_file_id, detail)

    def collect(self, status: BatchStatus, request_ids: Sequence[str]) -> dict[str, Prediction]:
        """Read a finished batch's answers; a request with no answer becomes a retryable error prediction."""
        from openai.types.chat import ChatCompletion

        answers: dict[str, Prediction] = {}
        client = self._client()
        try:
            for file_id in (status.output_file_id, status.error_file_id):
                if not file_id:
                    continue
                content = client.files.content(file_id).read().decode("utf-8")
                for line in content.splitlines():
                    if not line.strip():
                        continue
                    item = json.loads(line)
                    custom_id = str(item.get("custom_id"))
                    response = item.get("response") or {}
                    if response.get("status_code") == 200 and isinstance(response.get("body"), dict):
                        completion = ChatCompletion.model_validate(response["body"])
                        answers[custom_id] = self.engine.read_response(custom_id, completion)
                    else:
                        error = item.get("error") or (response.get("body") or {}).get("error") or {}
                        message = error.get("message") if isinstance(error, dict) else str(error)
                        code = response.get("status_code")
                        answers[custom_id] = Prediction(
                            id=custom_id,
                            model=self.name,
                            error=f"batch request failed ({code}): {message}",
                            retryable=code is None or code in (408, 409, 429) or int(code) >= 500,
                        )
        finally:
            client.close()
        for request_id in request_ids:
            if request_id not in answers:
                answers[request_id] = Prediction(
                    id=request_id,
                    model=self.name,
                    error=f"batch {status.batch_id} ended {status.status} without answering this request"
                    + (f": {status.detail}" if status.detail else ""),
                    retryable=True,
                )
        return answers


def split_lines(lines: Sequence[str]) -> list[list[str]]:
    """Cut input lines into files within the provider's per-batch request and size limits."""
    chunks: list[list[str]] = [[]]
    size = 0
    for line in lines:
        length = len(line.encode("utf-8")) + 1
        if chunks[-1] and (len(chunks[-1]) >= MAX_REQUESTS_PER_BATCH or size + length > MAX_BYTES_PER_BATCH):
            chunks.append([])
            size = 0
        chunks[-1].append(line)
        size += length
    return [chunk for chunk in chunks if chunk]

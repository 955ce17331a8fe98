"""The engine protocol every model back end implements, and the types that cross it.

One synchronous batch-in/batch-out method keeps flows and tasks ignorant of how a back end batches or parallelises:
vLLM's continuous batching, llama.cpp's shared-prefix scoring and an HTTP client's bounded pool all live inside the
engine. Engines report tokens and seconds, never dollars (see schemas/pricing.py).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from docroute.schemas.errors import DocrouteError, ExitCode, TransientError
from docroute.schemas.page_geometry import PageLine
from docroute.schemas.pages import PageImages


@dataclass(frozen=True, slots=True)
class Request:
    """One document to answer: its id (doc_id), its parsed text and, for OCR'd pages, where its lines sit.

    `geometry` is the OCR'd lines in reading order with their boxes (schemas/page_geometry.py), empty for a text
    document: the extraction rankers read it (a value on the row of its label), other engines read only the text.
    """

    id: str
    text: str
    geometry: tuple[PageLine, ...] = ()
    page_images: PageImages | None = None
    """A scanned document's pages, rendered on demand, for an engine that looks at pages (schemas/pages.py)."""


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens one call consumed. Cache reads (`cached_tokens`) and cache writes (`cache_write_tokens`) are subsets
    of `input_tokens`, billed at their own rates where the provider has them."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.cached_tokens + other.cached_tokens,
            self.cache_write_tokens + other.cache_write_tokens,
        )


@dataclass(slots=True)
class Prediction:
    """An engine's answer for one request.

    `label`/`fields` hold typed values already checked against the task spec. Confidences are probabilities in
    [0, 1], or None where the back end cannot give one (a frontier API without logprobs). `error` is set when the
    engine could not answer; `retryable` says whether trying again later may succeed.
    """

    id: str
    model: str
    label: str | None = None
    label_confidence: float | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    field_confidences: dict[str, float | None] = field(default_factory=dict)
    usage: Usage = field(default_factory=Usage)
    engine_seconds: float = 0.0
    encoder_tokens: int = 0
    """Input tokens an encoder read for this answer (classification by vectors): priced where the encoder is a
    paid API (schemas/pricing.py `encoder_cost_usd`), free where it runs on the small model's own compute."""
    truncated: bool = False
    error: str | None = None
    retryable: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


@runtime_checkable
class Engine(Protocol):
    """A model back end: answers a batch of requests, exactly one prediction per request, in request order."""

    name: str

    def predict(self, batch: Sequence[Request]) -> list[Prediction]: ...

    def close(self) -> None: ...


class ExchangeKind(StrEnum):
    """Which of a document's calls to a paid provider is about to be sent (at most two per document)."""

    ANSWER = "answer"  # the first call
    REPAIR = "repair"  # the answer did not fit the schema: shown its answer and the reason, asked again once
    WIDEN = "widen"  # the answer was cut at its schema's length bound: asked again with the full max_output_tokens


class ExchangeTicket(Protocol):
    """A budget reservation held by one call in flight."""

    def settle(self, used: Usage | None) -> None:
        """Release the reservation, recording the tokens the call was billed; None: unknown, the bound counts."""
        ...


class ExchangeGate(Protocol):
    """What a paid engine asks before each call it sends, in tokens (it never sees dollars).

    `admit` runs on the engine's event loop and must not block it: it waits (asynchronously) while the budget is
    held by other calls in flight that may give some back, and raises ExchangeRefusedError when the call cannot
    be paid for. The engine then does not send it. The ticket is settled once, with the call's real usage, the
    moment its answer (or failure) arrives.
    """

    async def admit(self, request_id: str, kind: ExchangeKind, bound: Usage) -> ExchangeTicket:
        """Reserve `bound` (an upper bound on this one call's tokens) for request `request_id`."""
        ...


@runtime_checkable
class FrontierEngine(Engine, Protocol):
    """An engine whose calls cost money: it bounds each call's tokens and asks a gate before sending it."""

    def usage_bound(self, request: Request) -> Usage:
        """Return an upper bound on the tokens answering this request can consume (all attempts included)."""
        ...

    def predict(self, batch: Sequence[Request], gate: ExchangeGate | None = None) -> list[Prediction]:
        """Answer every request; with a gate, every call is admitted by it first (see ExchangeGate)."""
        ...


class EngineError(DocrouteError):
    """Base of the errors engines raise when a whole batch cannot be answered."""

    exit_code = ExitCode.ENGINE


class ExchangeRefusedError(EngineError, TransientError):
    """An ExchangeGate would not admit a call: it was not sent, and a later run may send it."""

    exit_code = ExitCode.TEMPORARY


class EngineUnavailableError(EngineError):
    """The back end cannot start here (a missing package, no GPU, an unreadable model file)."""


PLACEHOLDER_API_KEY = "EMPTY"
"""The key sent when none is configured: SDKs require one and keyless local servers ignore it. Not a secret."""

_SECRET_LIKE = re.compile(r"\b(?:sk|rk|pk)-[A-Za-z0-9_\-*.]{4,}|Bearer\s+\S+")
_WORDS = re.compile(r"[A-Za-z0-9_\-]{8,}")
_KEY_OVERLAP = 8


def one_line(text: str, limit: int) -> str:
    """Whitespace collapsed and the text cut to `limit` characters with an ellipsis.

    Error messages and prompts quote what a server or a document said; this keeps such a quote one readable line of
    bounded length, the same way everywhere.
    """
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1].rstrip() + "…"


def redact(text: str, secret: str | None) -> str:
    """Remove a secret, any 8+ character piece of it, and anything shaped like an API key or bearer token.

    Providers echo part of a rejected key in 401 messages ("Incorrect API key provided: sk-...abcd"), and
    error strings end up in Parquet rows and logs. It lives here, beside the errors, because every engine that
    holds a key (OpenAI-compatible, Anthropic, the batch APIs) must scrub what it reports the same way.
    """
    out = text
    if secret and secret != PLACEHOLDER_API_KEY:
        out = out.replace(secret, "***")
    out = _SECRET_LIKE.sub("***", out)
    if secret and secret != PLACEHOLDER_API_KEY and len(secret) >= _KEY_OVERLAP:
        pieces = {secret[i : i + _KEY_OVERLAP] for i in range(len(secret) - _KEY_OVERLAP + 1)}
        out = _WORDS.sub(lambda m: "***" if any(p in m.group(0) for p in pieces) else m.group(0), out)
    return out


def check_complete(batch: Sequence[Request], predictions: Sequence[Prediction], engine: str) -> list[Prediction]:
    """Return predictions in request order, or raise if any request is missing or answered twice."""
    by_id: dict[str, Prediction] = {}
    for prediction in predictions:
        if prediction.id in by_id:
            raise EngineError(f"{engine} answered request {prediction.id} twice")
        by_id[prediction.id] = prediction
    ids = [request.id for request in batch]
    if len(set(ids)) != len(ids):
        raise EngineError("a batch holds the same request id twice")
    missing = [i for i in ids if i not in by_id]
    if missing or len(by_id) != len(ids):
        raise EngineError(f"{engine} returned {len(by_id)} predictions for {len(ids)} requests (missing {missing[:3]})")
    return [by_id[i] for i in ids]

"""What a failure the OpenAI SDK gave up on means: its HTTP status, whether a later try may succeed, its message.

One reading for every client built on the SDK (the OpenAI-compatible chat engine, the `/v1/embeddings` encoder),
so they agree on what is transient. The message is the server's or the transport's own and may quote a secret:
callers redact it with the key they sent.
"""

from __future__ import annotations

from dataclasses import dataclass

import openai

TRANSIENT_STATUSES = frozenset({408, 409, 429})
"""Statuses worth another try later, besides every 5xx (the SDK's own retry set)."""


@dataclass(frozen=True)
class SdkFailure:
    status: int | None
    """The HTTP status when the server answered, else None (connection failed or timed out, or a client error)."""
    retryable: bool
    message: str
    """The SDK's message, with the transport's cause for connection failures; not yet redacted."""


def sdk_failure(exc: openai.OpenAIError) -> SdkFailure:
    """Read an exception the SDK raised after its own retries."""
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        return SdkFailure(status, status in TRANSIENT_STATUSES or status >= 500, exc.message)
    if isinstance(exc, openai.APIConnectionError):  # includes APITimeoutError
        message = exc.message
        cause = exc.__cause__
        if cause is not None and str(cause):
            message = f"{message} ({type(cause).__name__}: {cause})"
        return SdkFailure(None, True, message)
    return SdkFailure(None, False, str(exc))

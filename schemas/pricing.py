"""Prices of model calls, and the cost of one call from its token counts.

Engines report tokens and seconds, never dollars: every dollar figure in a row or a ledger comes from here, so a price
change is one edit and an unknown model is an error instead of a silent $0.
"""

from __future__ import annotations

import math
from datetime import date
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from docroute.schemas.errors import InputError

PRICES_AS_OF = date(2025, 11, 24)
"""When the default table was copied from the providers' public price pages; override in the job spec when stale."""


class ModelPrice(BaseModel):
    """USD per one million tokens for one model, with the discount its provider gives to batch jobs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_per_million: float = Field(ge=0)
    output_per_million: float = Field(ge=0)
    cached_input_per_million: float | None = Field(default=None, ge=0)
    cache_write_per_million: float | None = Field(default=None, ge=0, description="e.g. Anthropic: 1.25 x input")
    batch_discount: float = Field(default=0.5, ge=0, le=1, description="fraction taken off by the batch API")
    as_of: date = PRICES_AS_OF

    def cost_usd(
        self,
        input_tokens: int,
        output_tokens: int,
        cached_tokens: int = 0,
        *,
        cache_write_tokens: int = 0,
        batch: bool = False,
    ) -> float:
        """Price one call; cache reads and writes are billed at their own rates where the provider has them."""
        inputs = max(input_tokens, 0)
        cached = min(max(cached_tokens, 0), inputs) if self.cached_input_per_million is not None else 0
        written = min(max(cache_write_tokens, 0), inputs - cached) if self.cache_write_per_million is not None else 0
        usd = Decimal(inputs - cached - written) * Decimal(str(self.input_per_million)) + Decimal(
            max(output_tokens, 0)
        ) * Decimal(str(self.output_per_million))
        if cached:
            usd += Decimal(cached) * Decimal(str(self.cached_input_per_million))
        if written:
            usd += Decimal(written) * Decimal(str(self.cache_write_per_million))
        usd /= Decimal(1_000_000)
        if batch:
            usd *= Decimal(1) - Decimal(str(self.batch_discount))
        return float(usd)

    def cost_of(self, usage: Any, *, batch: bool = False) -> float:
        """Price an engine's `Usage` (tokens of every kind)."""
        return self.cost_usd(
            usage.input_tokens,
            usage.output_tokens,
            usage.cached_tokens,
            cache_write_tokens=getattr(usage, "cache_write_tokens", 0),
            batch=batch,
        )

    def worst_case_usd(self, input_tokens: int, output_tokens: int, *, batch: bool = False) -> float:
        """The most a call of this many tokens can cost: every input token at the dearest input rate."""
        dearest = max(self.input_per_million, self.cache_write_per_million or 0.0)
        usd = (
            Decimal(max(input_tokens, 0)) * Decimal(str(dearest))
            + Decimal(max(output_tokens, 0)) * Decimal(str(self.output_per_million))
        ) / Decimal(1_000_000)
        if batch:
            usd *= Decimal(1) - Decimal(str(self.batch_discount))
        return float(usd)


def _price(inp: float, out: float, cached: float | None = None, cache_write: float | None = None) -> ModelPrice:
    return ModelPrice(
        input_per_million=inp,
        output_per_million=out,
        cached_input_per_million=cached,
        cache_write_per_million=cache_write,
    )


DEFAULT_PRICES: dict[str, ModelPrice] = {
    # OpenAI (platform.openai.com/docs/pricing)
    "gpt-5": _price(1.25, 10.00, 0.125),
    "gpt-5-mini": _price(0.25, 2.00, 0.025),
    "gpt-5-nano": _price(0.05, 0.40, 0.005),
    "gpt-4.1": _price(2.00, 8.00, 0.50),
    "gpt-4.1-mini": _price(0.40, 1.60, 0.10),
    "gpt-4.1-nano": _price(0.10, 0.40, 0.025),
    "gpt-4o": _price(2.50, 10.00, 1.25),
    "gpt-4o-mini": _price(0.15, 0.60, 0.075),
    "o3": _price(2.00, 8.00, 0.50),
    "o4-mini": _price(1.10, 4.40, 0.275),
    # Anthropic (docs.anthropic.com pricing); cached = cache-read rate, then the 5-minute cache-write rate
    "claude-opus-4-5": _price(5.00, 25.00, 0.50, 6.25),
    "claude-opus-4-1": _price(15.00, 75.00, 1.50, 18.75),
    "claude-sonnet-4-5": _price(3.00, 15.00, 0.30, 3.75),
    "claude-sonnet-4-0": _price(3.00, 15.00, 0.30, 3.75),
    "claude-sonnet-4": _price(3.00, 15.00, 0.30, 3.75),  # claude-sonnet-4-20250514
    "claude-opus-4": _price(15.00, 75.00, 1.50, 18.75),  # claude-opus-4-20250514
    "claude-haiku-4-5": _price(1.00, 5.00, 0.10, 1.25),
    "claude-3-5-haiku-latest": _price(0.80, 4.00, 0.08, 1.00),
    # Mistral (mistral.ai/pricing)
    "mistral-large-latest": _price(2.00, 6.00),
    "mistral-medium-latest": _price(0.40, 2.00),
    "mistral-small-latest": _price(0.10, 0.30),
    "ministral-8b-latest": _price(0.10, 0.10),
    # OpenAI embeddings (input tokens only)
    "text-embedding-3-small": _price(0.02, 0.0),
    "text-embedding-3-large": _price(0.13, 0.0),
    "text-embedding-ada-002": _price(0.10, 0.0),
}


class UnknownModelPriceError(InputError, KeyError):
    """Raised for a model with no price: docroute never guesses $0."""

    def __str__(self) -> str:
        model = self.args[0] if self.args else "?"
        return (
            f"no price known for model {model!r}; set frontier.price (input_per_million, output_per_million) "
            f"in the job spec. Known models: {', '.join(sorted(DEFAULT_PRICES))}"
        )


def lookup_price(model: str, override: ModelPrice | None = None) -> ModelPrice:
    """Return the override, else the default for the model or its dated snapshot name (e.g. gpt-4o-2024-08-06)."""
    if override is not None:
        return override
    if model in DEFAULT_PRICES:
        return DEFAULT_PRICES[model]
    # provider snapshots append a date or version: gpt-4o-mini-2024-07-18, claude-haiku-4-5-20251001
    for name in sorted(DEFAULT_PRICES, key=len, reverse=True):
        if model.startswith(name + "-") and model[len(name) + 1 :][:1].isdigit():
            return DEFAULT_PRICES[name]
    raise UnknownModelPriceError(model)


_MIN_SIGNIFICANT = 2
_MAX_SIGNIFICANT = 4


def format_usd(value: float) -> str:
    """Write a dollar amount with enough digits to be true: $0.004 is `$0.0040`, never `$0.00`.

    From $1 up: cents with thousands separators (`$1,234.50`). Below: at least two significant digits and at
    least cents, and up to four significant digits where fewer would round the amount (`$0.00425`, `$0.1235`),
    so a small cap or spend reads as itself rather than as zero or as a neighbouring amount.
    """
    if not math.isfinite(value):
        return f"${value}"
    sign, magnitude = ("-" if value < 0 else ""), abs(value)
    if magnitude == 0 or magnitude >= 1:
        return f"{sign}${magnitude:,.2f}"
    exponent = math.floor(math.log10(magnitude))
    for significant in range(_MIN_SIGNIFICANT, _MAX_SIGNIFICANT + 1):
        text = f"{magnitude:.{max(2, significant - 1 - exponent)}f}"
        if math.isclose(float(text), magnitude, rel_tol=1e-9):
            break
    return f"{sign}${text}"


def self_hosted_cost_usd(engine_seconds: float, usd_per_hour: float) -> float:
    """Cost of running a self-hosted engine for the seconds it spent on a row (GPU-hour or CPU-hour rate)."""
    return max(engine_seconds, 0.0) * usd_per_hour / 3600.0


def encoder_cost_usd(price: ModelPrice | None, tokens: int) -> float:
    """Cost of embedding `tokens` input tokens: embeddings bill input only; no price (self-hosted) is $0.

    Encoders report tokens (`Encoded`, and per row `row_usage` in engines/local/remote_encoders.py), never dollars; the
    ledger prices them here with the encoder spec's `unit_price`, as it prices engines' `Usage`.
    """
    if price is None:
        return 0.0
    return price.cost_usd(max(tokens, 0), 0)

"""Tests for schemas/pricing.py: the cost of a call from its tokens, and finding a model's price."""

from __future__ import annotations

from datetime import date

import pytest
from pydantic import ValidationError

from docroute.schemas.pricing import (
    DEFAULT_PRICES,
    PRICES_AS_OF,
    ModelPrice,
    UnknownModelPriceError,
    format_usd,
    lookup_price,
    self_hosted_cost_usd,
)


def _price(inp: float, out: float, cached: float | None = None, **options: float) -> ModelPrice:
    return ModelPrice(input_per_million=inp, output_per_million=out, cached_input_per_million=cached, **options)


# --------------------------------------------------------------------------------------------------------------------
# cost arithmetic


def test_one_million_tokens_each_way() -> None:
    assert DEFAULT_PRICES["gpt-4o-mini"].cost_usd(1_000_000, 1_000_000) == 0.75
    assert DEFAULT_PRICES["claude-sonnet-4-5"].cost_usd(1_000_000, 1_000_000) == 18.0


def test_small_call_is_exact_decimal_arithmetic() -> None:
    # 1200 x 2.50 + 300 x 10.00 = 6000 micro-dollars: 0.006 exactly, not 0.006000000000000001
    assert DEFAULT_PRICES["gpt-4o"].cost_usd(1200, 300) == 0.006
    # 3 x 0.1 per million would be 3.0000000000000004e-07 in float arithmetic
    assert _price(0.1, 0.0).cost_usd(3, 0) == 3e-07


def test_zero_tokens_cost_nothing() -> None:
    assert DEFAULT_PRICES["gpt-5"].cost_usd(0, 0) == 0.0


def test_cached_tokens_are_billed_at_the_cached_rate() -> None:
    # gpt-4o: 600 fresh x 2.50 + 400 cached x 1.25 + 200 out x 10.00 = 4000 micro-dollars
    assert DEFAULT_PRICES["gpt-4o"].cost_usd(1000, 200, cached_tokens=400) == 0.004
    # claude-haiku-4-5: 0 fresh + 10000 cached x 0.10 + 0 out = 1000 micro-dollars
    assert DEFAULT_PRICES["claude-haiku-4-5"].cost_usd(10_000, 0, cached_tokens=10_000) == 0.001


def test_cached_tokens_are_clamped_to_the_input() -> None:
    price = DEFAULT_PRICES["gpt-4o"]
    # more cached than input: all input counts as cached (1000 x 1.25)
    assert price.cost_usd(1000, 0, cached_tokens=5000) == 0.00125
    # a negative cached count is ignored (1000 x 2.50)
    assert price.cost_usd(1000, 0, cached_tokens=-50) == 0.0025


def test_cached_tokens_without_a_cached_rate_pay_the_input_rate() -> None:
    # mistral-large-latest has no cached rate: 1000 x 2.00 + 100 x 6.00 = 2600 micro-dollars
    price = DEFAULT_PRICES["mistral-large-latest"]
    assert price.cached_input_per_million is None
    assert price.cost_usd(1000, 100, cached_tokens=400) == 0.0026
    assert price.cost_usd(1000, 100) == 0.0026


def test_batch_discount() -> None:
    price = DEFAULT_PRICES["gpt-4o"]
    assert price.batch_discount == 0.5
    assert price.cost_usd(1000, 200, cached_tokens=400, batch=True) == 0.002
    custom = _price(4.0, 8.0, batch_discount=0.25)
    # (1000 x 4 + 1000 x 8) / 1e6 = 0.012; 25% off = 0.009
    assert custom.cost_usd(1000, 1000, batch=True) == 0.009
    assert custom.cost_usd(1000, 1000) == 0.012
    assert _price(4.0, 8.0, batch_discount=1.0).cost_usd(1000, 1000, batch=True) == 0.0
    assert _price(4.0, 8.0, batch_discount=0.0).cost_usd(1000, 1000, batch=True) == 0.012


def test_cost_is_a_float() -> None:
    assert type(DEFAULT_PRICES["gpt-4o"].cost_usd(1, 1)) is float


def test_model_price_validation() -> None:
    with pytest.raises(ValidationError):
        _price(-1.0, 1.0)
    with pytest.raises(ValidationError):
        _price(1.0, -1.0)
    with pytest.raises(ValidationError):
        _price(1.0, 1.0, cached=-0.1)
    with pytest.raises(ValidationError):
        _price(1.0, 1.0, batch_discount=1.5)
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        ModelPrice(input_per_million=1, output_per_million=1, per_request=0.01)
    price = _price(1.0, 2.0)
    assert price.as_of == PRICES_AS_OF == date(2025, 11, 24)
    with pytest.raises(ValidationError, match="frozen"):
        price.input_per_million = 0.5


# --------------------------------------------------------------------------------------------------------------------
# lookup


@pytest.mark.parametrize("model", sorted(DEFAULT_PRICES))
def test_every_table_entry_is_found_by_its_exact_name(model: str) -> None:
    assert lookup_price(model) is DEFAULT_PRICES[model]


@pytest.mark.parametrize(
    ("model", "base"),
    [
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),  # not gpt-4o: the longest matching name wins
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4.1-2025-04-14", "gpt-4.1"),
        ("gpt-4.1-nano-2025-04-14", "gpt-4.1-nano"),
        ("gpt-5-mini-2025-08-07", "gpt-5-mini"),
        ("o3-2025-04-16", "o3"),
        ("o4-mini-2025-04-16", "o4-mini"),
        ("claude-haiku-4-5-20251001", "claude-haiku-4-5"),
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        ("claude-opus-4-1-20250805", "claude-opus-4-1"),
    ],
)
def test_dated_snapshots_use_their_base_price(model: str, base: str) -> None:
    assert lookup_price(model) is DEFAULT_PRICES[base]


def test_snapshot_prices_a_call() -> None:
    # gpt-4o-mini rates, not gpt-4o's: 1000 x 0.15 + 1000 x 0.60 = 750 micro-dollars
    assert lookup_price("gpt-4o-mini-2024-07-18").cost_usd(1000, 1000) == 0.00075
    assert lookup_price("claude-haiku-4-5-20251001").cost_usd(1000, 1000) == 0.006


@pytest.mark.parametrize(
    "model",
    [
        "gpt-9-turbo",
        "o3-mini",  # a different model, not an o3 snapshot: the suffix must start with a digit
        "gpt-4o-mini-tts",
        "gpt-4o-",
        "GPT-4O",
        "gpt-4o2024",
        "",
    ],
)
def test_unknown_models_raise(model: str) -> None:
    with pytest.raises(UnknownModelPriceError):
        lookup_price(model)


def test_unknown_model_error_names_the_model_and_the_fix() -> None:
    with pytest.raises(UnknownModelPriceError) as info:
        lookup_price("acme-large-2")
    message = str(info.value)
    assert message.startswith("no price known for model 'acme-large-2'; set frontier.price")
    assert "Known models: claude-3-5-haiku-latest, claude-haiku-4-5," in message
    assert isinstance(info.value, KeyError)
    assert info.value.args == ("acme-large-2",)


def test_unknown_model_error_without_args() -> None:
    assert str(UnknownModelPriceError()).startswith("no price known for model '?'")


def test_override_wins_even_for_known_and_unknown_models() -> None:
    override = _price(9.0, 9.0)
    assert lookup_price("gpt-4o", override) is override
    assert lookup_price("acme-large-2", override) is override


# --------------------------------------------------------------------------------------------------------------------
# self-hosted compute


@pytest.mark.parametrize(
    ("seconds", "usd_per_hour", "expected"),
    [
        (3600.0, 2.0, 2.0),
        (1800.0, 1.0, 0.5),
        (36.0, 0.5, 0.005),
        (0.0, 3.0, 0.0),
        (-10.0, 3.0, 0.0),
        (100.0, 0.0, 0.0),
    ],
)
def test_self_hosted_cost(seconds: float, usd_per_hour: float, expected: float) -> None:
    assert self_hosted_cost_usd(seconds, usd_per_hour) == pytest.approx(expected, rel=1e-12, abs=0.0)


def test_cache_writes_are_billed_at_their_own_rate() -> None:
    price = lookup_price("claude-haiku-4-5")
    # 1,000 input tokens of which 200 cache reads and 300 cache writes; 100 output tokens
    expected = (500 * 1.00 + 200 * 0.10 + 300 * 1.25 + 100 * 5.00) / 1_000_000
    assert price.cost_usd(1000, 100, 200, cache_write_tokens=300) == pytest.approx(expected)


def test_worst_case_covers_any_mix_of_cache_reads_and_writes() -> None:
    price = lookup_price("claude-sonnet-4-5")
    worst = price.worst_case_usd(1000, 100)
    for cached, written in [(0, 0), (0, 1000), (500, 500), (1000, 0)]:
        assert price.cost_usd(1000, 100, cached, cache_write_tokens=written) <= worst + 1e-15
    assert price.worst_case_usd(1000, 100, batch=True) == pytest.approx(worst / 2)


def test_cost_of_reads_every_kind_of_token() -> None:
    from docroute.engines.base import Usage

    price = lookup_price("claude-haiku-4-5")
    usage = Usage(input_tokens=1000, output_tokens=100, cached_tokens=200, cache_write_tokens=300)
    assert price.cost_of(usage) == price.cost_usd(1000, 100, 200, cache_write_tokens=300)
    assert price.cost_of(usage, batch=True) == pytest.approx(price.cost_of(usage) / 2)


@pytest.mark.parametrize(
    ("usd", "shown"),
    [
        (0.004, "$0.0040"),  # a small cap reads as itself, not as $0.00
        (0.00425, "$0.00425"),
        (0.0001747123, "$0.0001747"),
        (0.5, "$0.50"),
        (0.123456, "$0.1235"),
        (0.0, "$0.00"),
        (1.0, "$1.00"),
        (1234.5678, "$1,234.57"),
        (-0.004, "-$0.0040"),
        (-12.5, "-$12.50"),
        (3e-9, "$0.0000000030"),
    ],
)
def test_format_usd_shows_enough_digits_to_be_true(usd: float, shown: str) -> None:
    assert format_usd(usd) == shown

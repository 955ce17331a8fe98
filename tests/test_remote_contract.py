"""The contract every remote engine keeps, run against each one over real HTTP through its real SDK.

Routing and the row writers rely on these promises whichever provider answers: exactly one prediction per
request, in order; typed values and the usage the provider billed; one repair round for an answer that does not fit
the schema, then an error row; transport failures as retryable error rows once the SDK's retries are spent, never
exceptions; refusals and cut-off answers as final rows; `max_concurrency` bounding the engine across every calling
thread; no API key in any error text; one event loop per engine that close() ends, any number of times, and that
an engine dropped without close() does not leave behind. The OpenAI-compatible engine talks to OracleServer, the
Anthropic engine to AnthropicServer; both fakes share tests/fake_server.py, so a fault named here means the same
thing to both. Provider-specific behaviour (request shapes, repair formats, prompt caching, usage bounds) stays in
test_openai_compat.py and test_anthropic.py.
"""

from __future__ import annotations

import asyncio
import gc
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import Any

import pytest
from anthropic_server import AnthropicServer
from fake_server import FakeServer
from oracle_server import OracleServer

from docroute.engines.base import Engine, EngineError, Prediction, Request
from docroute.engines.remote.anthropic import AnthropicEngine
from docroute.engines.remote.client_base import AsyncClientEngine
from docroute.engines.remote.openai_compat import OpenAICompatibleEngine
from docroute.schemas.spec import TaskSpec

KEY = "sk-contract-0123456789abcdefGHIJ"
WRONG_KEY = "sk-contract-WRONGKEY-abcdefghijklmnop"

TASK = TaskSpec.model_validate(
    {
        "classify": {"labels": [{"name": "invoice"}, {"name": "receipt"}, {"name": "letter"}]},
        "extract": {
            "fields": [
                {"name": "total", "type": "decimal"},
                {"name": "issued", "type": "date"},
                {"name": "vendor", "type": "str", "required": False},
            ]
        },
    }
)
INVOICE = {"label": "invoice", "total": "1234.50", "issued": "2024-03-12", "vendor": "ACME"}
LETTER = {"label": "letter", "total": None, "issued": None, "vendor": None}
LABELS = ["invoice", "receipt", "letter"]


@dataclass(frozen=True)
class Provider:
    """One remote engine and the fake server speaking its provider's wire format."""

    name: str
    server: Callable[..., FakeServer]
    engine_class: type[AsyncClientEngine[Any]]
    model_requests: Callable[[Any], list[dict[str, Any]]]
    """The server's record of the model calls it got (chat completions, messages)."""
    billed: Callable[[Any], tuple[int, int]]
    """(input, output) tokens the server billed over every answered call."""
    cut_fault: str
    """The server's fault for an answer stopped at max_tokens."""

    def engine(self, server: FakeServer, **overrides: Any) -> AsyncClientEngine[Any]:
        options: dict[str, Any] = {
            "task": TASK,
            "model": "contract-1",
            "base_url": overrides.pop("base_url") if "base_url" in overrides else server.base_url,
            "api_key": KEY,
            "timeout_s": 0.5,
            "max_retries": 2,
        }
        options.update(overrides)
        return self.engine_class(**options)

    def predict_one(self, server: FakeServer, **overrides: Any) -> Prediction:
        with self.engine(server, **overrides) as engine:
            (prediction,) = engine.predict([Request("doc-1", "INVOICE 1")])
        return prediction


def _openai_billed(server: OracleServer) -> tuple[int, int]:
    answered = [r["response"]["usage"] for r in server.chat_requests if r.get("status") == 200]
    return sum(u["prompt_tokens"] for u in answered), sum(u["completion_tokens"] for u in answered)


def _anthropic_billed(server: AnthropicServer) -> tuple[int, int]:
    billed_input, billed_output, _ = server.served_usage()
    return billed_input, billed_output


PROVIDERS = [
    Provider(
        "openai",
        OracleServer,
        OpenAICompatibleEngine,
        lambda server: server.chat_requests,
        _openai_billed,
        "length",
    ),
    Provider(
        "anthropic",
        AnthropicServer,
        AnthropicEngine,
        lambda server: server.message_requests,
        _anthropic_billed,
        "max_tokens",
    ),
]


@pytest.fixture(params=PROVIDERS, ids=[p.name for p in PROVIDERS])
def provider(request: pytest.FixtureRequest) -> Provider:
    return request.param


def loop_threads(engine: AsyncClientEngine[Any]) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"docroute-{engine.name}"]


# ---------------------------------------------------------------------------------------------- answers


def test_a_valid_answer_gives_typed_values_and_the_billed_usage(provider: Provider) -> None:
    with provider.server([("INVOICE", INVOICE)]) as server:
        with provider.engine(server) as engine:
            assert isinstance(engine, Engine)
            (prediction,) = engine.predict([Request("doc-1", "INVOICE 1 from ACME")])
        assert prediction.ok, prediction.error
        assert (prediction.id, prediction.model, prediction.label) == ("doc-1", engine.name, "invoice")
        assert prediction.fields == {"total": Decimal("1234.50"), "issued": date(2024, 3, 12), "vendor": "ACME"}
        assert isinstance(prediction.fields["total"], Decimal)
        assert prediction.field_confidences == {"total": None, "issued": None, "vendor": None}
        assert prediction.truncated is False and prediction.engine_seconds > 0
        assert len(provider.model_requests(server)) == 1
        billed = provider.billed(server)
    assert billed[0] > 0 and billed[1] > 0
    assert (prediction.usage.input_tokens, prediction.usage.output_tokens) == billed


def test_long_documents_are_truncated_before_sending(provider: Provider) -> None:
    with provider.server([("INVOICE", INVOICE)]) as server:
        with provider.engine(server, max_input_tokens=100) as engine:
            (prediction,) = engine.predict([Request("doc-1", "INVOICE " + "zebra " * 2000)])
        sent = json.dumps(provider.model_requests(server)[0]["body"])
    assert prediction.ok and prediction.truncated
    assert 0 < sent.count("zebra") <= 100 * 4 // len("zebra ")  # about max_input_tokens, at 4 characters a token


def test_a_batch_gets_one_prediction_per_request_in_order_within_max_concurrency(provider: Provider) -> None:
    answers = [(f"doc number {i:02d}.", {**LETTER, "label": LABELS[i % 3]}) for i in range(20)]
    with provider.server(answers, delay_s=0.05) as server:
        batch = [Request(f"id-{i}", f"doc number {i:02d}.") for i in reversed(range(20))]
        with provider.engine(server, max_concurrency=4) as engine:
            predictions = engine.predict(batch)
        assert [p.id for p in predictions] == [r.id for r in batch]
        assert [p.label for p in predictions] == [LABELS[i % 3] for i in reversed(range(20))]
        assert all(p.ok for p in predictions)
        assert len(provider.model_requests(server)) == 20
        assert 2 <= server.max_in_flight <= 4


def test_one_failing_row_does_not_disturb_the_others(provider: Provider) -> None:
    with (
        provider.server([("INVOICE", INVOICE), ("LETTER", LETTER)], faults=["400"]) as server,
        provider.engine(server, max_concurrency=1) as engine,
    ):
        first, second = engine.predict([Request("1", "INVOICE"), Request("2", "LETTER")])
    assert first.error is not None and first.retryable is False and first.label is None
    assert second.ok and second.label == "letter" and second.fields["total"] is None


def test_an_invalid_answer_gets_exactly_one_repair_round(provider: Provider) -> None:
    with provider.server([("INVOICE", INVOICE)], faults=["invalid"]) as server:
        prediction = provider.predict_one(server)
        first, second = provider.model_requests(server)
        billed = provider.billed(server)
    assert prediction.ok and prediction.label == "invoice"
    assert "That answer was invalid" not in json.dumps(first["body"])
    assert "That answer was invalid: " in json.dumps(second["body"])  # the model is told why
    assert (prediction.usage.input_tokens, prediction.usage.output_tokens) == billed  # both calls counted


def test_an_answer_invalid_twice_is_a_final_error_row(provider: Provider) -> None:
    with provider.server([("INVOICE", INVOICE)], faults=["invalid", "invalid", "ok"]) as server:
        prediction = provider.predict_one(server)
        assert len(provider.model_requests(server)) == 2  # no third call
        billed = provider.billed(server)
    assert prediction.error is not None and prediction.error.startswith("invalid answer from frontier: ")
    assert "label" in prediction.error
    assert prediction.retryable is False
    assert prediction.label is None and prediction.fields == {}
    assert (prediction.usage.input_tokens, prediction.usage.output_tokens) == billed


@pytest.mark.parametrize("fault", ["refusal", "cut"])
def test_refused_and_cut_off_answers_are_final_without_a_repair_round(provider: Provider, fault: str) -> None:
    name = provider.cut_fault if fault == "cut" else fault
    with provider.server([("INVOICE", INVOICE)], faults=[name]) as server:
        prediction = provider.predict_one(server)
        assert len(provider.model_requests(server)) == 1
    expected = "refused to answer" if fault == "refusal" else "cut off at max_output_tokens=512"
    assert prediction.error is not None and expected in prediction.error
    assert prediction.retryable is False
    assert prediction.usage.output_tokens > 0  # the call was billed
    assert prediction.label is None and prediction.fields == {}


# ---------------------------------------------------------------------------------------------- transport


@pytest.mark.parametrize("fault", ["500", "429", "hang"])
def test_a_transient_failure_is_retried_by_the_sdk(provider: Provider, fault: str) -> None:
    with provider.server([("INVOICE", INVOICE)], faults=[fault], retry_after="0.3", hang_s=3.0) as server:
        started = time.perf_counter()
        prediction = provider.predict_one(server, timeout_s=0.3)
        elapsed = time.perf_counter() - started
        calls = provider.model_requests(server)
        billed = provider.billed(server)
    assert prediction.ok and prediction.label == "invoice"
    assert len(calls) == 2
    assert (prediction.usage.input_tokens, prediction.usage.output_tokens) == billed  # the failed try is not billed
    if fault == "429":
        assert calls[0]["status"] == 429 and elapsed >= 0.3  # Retry-After was honoured
    if fault == "hang":
        assert 0.3 <= elapsed < 2.5


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ("500", "InternalServerError: Error code: 500"),
        ("429", "RateLimitError: Error code: 429"),
        ("hang", "APITimeoutError: Request timed out"),
    ],
)
def test_a_failure_outliving_the_sdk_retries_is_a_retryable_row(provider: Provider, fault: str, error: str) -> None:
    with provider.server([("INVOICE", INVOICE)], faults=[fault] * 3, retry_after="0.05", hang_s=3.0) as server:
        prediction = provider.predict_one(server, max_retries=1, timeout_s=0.2)
        assert len(provider.model_requests(server)) == 2  # the first try and the SDK's one retry
    assert prediction.error is not None and prediction.error.startswith(error)
    assert prediction.retryable is True
    assert (prediction.usage.input_tokens, prediction.usage.output_tokens) == (0, 0)
    assert prediction.label is None and prediction.fields == {}


def test_connection_refused_is_a_retryable_row_without_the_key(provider: Provider) -> None:
    server = provider.server().start()
    base_url = server.base_url
    server.stop()
    with provider.engine(server, base_url=base_url, max_retries=0) as engine:
        (prediction,) = engine.predict([Request("x", "INVOICE")])
    assert prediction.error is not None and prediction.error.startswith("APIConnectionError: Connection error.")
    assert prediction.retryable is True
    assert KEY not in prediction.error


@pytest.mark.parametrize("fault", ["400", "404"])
def test_a_rejected_request_is_final_and_not_retried(provider: Provider, fault: str) -> None:
    with provider.server([("INVOICE", INVOICE)], faults=[fault]) as server:
        prediction = provider.predict_one(server)
        assert len(provider.model_requests(server)) == 1
    assert prediction.error is not None and f"Error code: {fault}" in prediction.error
    assert prediction.retryable is False


def test_a_rejected_key_is_final_and_never_shown(provider: Provider) -> None:
    with provider.server([("INVOICE", INVOICE)], api_key=KEY) as server:
        prediction = provider.predict_one(server, api_key=WRONG_KEY)
        (call,) = provider.model_requests(server)  # 401 is not retried
        assert WRONG_KEY in json.dumps(call["response"])  # the server did echo it
    assert prediction.error is not None and prediction.error.startswith("AuthenticationError: Error code: 401")
    assert prediction.retryable is False
    assert WRONG_KEY not in prediction.error
    assert "WRONGKEY" not in prediction.error and "abcdefghijklmnop" not in prediction.error


# ---------------------------------------------------------------------------------------------- the event loop


def test_max_concurrency_bounds_every_calling_thread_together(provider: Provider) -> None:
    """Plain threads and a thread running an event loop of its own share one client and one bound."""
    with provider.server([("doc", LETTER)], delay_s=0.05) as server:
        results: list[list[Prediction]] = []
        with provider.engine(server, max_concurrency=3) as engine:

            def plain(n: int) -> None:
                results.append(engine.predict([Request(f"{n}-{i}", "doc") for i in range(6)]))

            async def from_async_code(n: int) -> None:
                plain(n)

            threads = [threading.Thread(target=plain, args=(n,)) for n in range(2)]
            threads.append(threading.Thread(target=lambda: asyncio.run(from_async_code(2))))
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert len(loop_threads(engine)) == 1
        assert sorted(len(r) for r in results) == [6, 6, 6]
        assert all(p.ok for r in results for p in r)
        assert 2 <= server.max_in_flight <= 3


def test_close_is_idempotent_ends_the_loop_and_a_later_predict_starts_afresh(provider: Provider) -> None:
    with provider.server([("INVOICE", INVOICE)]) as server:
        engine = provider.engine(server)
        engine.close()  # never started: nothing to do
        assert engine.predict([Request("a", "INVOICE")])[0].label == "invoice"
        assert len(loop_threads(engine)) == 1
        engine.close()
        engine.close()
        assert loop_threads(engine) == []
        assert engine.predict([Request("b", "INVOICE")])[0].label == "invoice"  # a fresh loop and client
        assert engine.predict([]) == []
        with pytest.raises(EngineError, match="twice"):
            engine.predict([Request("c", "INVOICE"), Request("c", "INVOICE")])
        assert len(provider.model_requests(server)) == 2
        engine.close()
        assert loop_threads(engine) == []


def test_an_engine_dropped_without_close_does_not_keep_its_thread(provider: Provider) -> None:
    with provider.server([("INVOICE", INVOICE)]) as server:
        engine = provider.engine(server, name_prefix="dropped")
        assert engine.predict([Request("a", "INVOICE")])[0].ok
        (thread,) = loop_threads(engine)
        del engine
        gc.collect()
        thread.join(timeout=10)
    assert not thread.is_alive()


def test_predict_from_the_engines_own_loop_is_an_error_not_a_deadlock(provider: Provider) -> None:
    """A shared-limit gate runs on the engine's loop; a predict from there must fail at once, not wait forever."""
    with provider.server([("INVOICE", INVOICE)]) as server, provider.engine(server) as engine:

        @asynccontextmanager
        async def reentrant_gate() -> AsyncIterator[None]:
            engine.predict([Request("inner", "INVOICE")])
            yield

        engine.share_limit(reentrant_gate)
        started = time.perf_counter()
        (prediction,) = engine.predict([Request("outer", "INVOICE")])
        assert time.perf_counter() - started < 5
        assert provider.model_requests(server) == []  # the slot was never taken: nothing was sent
    assert prediction.error is not None and "own event loop thread" in prediction.error
    assert prediction.retryable is True


@pytest.fixture(autouse=True)
def _no_loop_thread_left(provider: Provider) -> Iterator[None]:
    """Every engine a test closes (or drops) leaves no event-loop thread behind."""
    before = {t.ident for t in threading.enumerate() if t.name.startswith("docroute-")}
    yield
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = [t for t in threading.enumerate() if t.name.startswith("docroute-") and t.ident not in before]
        if not left:
            return
        time.sleep(0.05)
    pytest.fail(f"threads left running: {[t.name for t in left]}")

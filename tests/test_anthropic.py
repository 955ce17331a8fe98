"""The Anthropic engine against a real local Messages API server, through the real `anthropic` SDK."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import date
from decimal import Decimal
from typing import Any

import anthropic
import pytest
from anthropic_server import AnthropicServer

from docroute.engines import build_frontier_engine
from docroute.engines.base import (
    Engine,
    EngineError,
    EngineUnavailableError,
    ExchangeKind,
    FrontierEngine,
    Request,
    Usage,
)
from docroute.engines.remote.anthropic import TOOL_NAME, AnthropicEngine, engine_from_frontier_spec
from docroute.engines.scoring.prompts import answer_schema, chat_messages
from docroute.schemas.spec import FrontierSpec, TaskSpec

KEY = "sk-ant-api03-oracle-0123456789abcdefGHIJ"
MODEL = "claude-haiku-4-5"

TASK = TaskSpec.model_validate(
    {
        "instructions": "The documents are scanned business papers.",
        "classify": {
            "labels": [
                {"name": "invoice", "description": "a bill asking for payment"},
                {"name": "receipt", "description": "proof of a payment already made"},
                {"name": "letter"},
            ]
        },
        "extract": {
            "fields": [
                {"name": "total", "type": "decimal", "description": "amount due"},
                {"name": "issued", "type": "date"},
                {"name": "vendor", "type": "str", "required": False},
            ]
        },
    }
)
CLASSIFY_ONLY = TaskSpec.model_validate({"classify": {"labels": [{"name": "spam"}, {"name": "ham"}]}})

INVOICE = {"label": "invoice", "total": "1234.50", "issued": "2024-03-12", "vendor": "ACME"}
LETTER = {"label": "letter", "total": None, "issued": None, "vendor": None}


def make_engine(server: AnthropicServer, **overrides: Any) -> AnthropicEngine:
    options: dict[str, Any] = {
        "task": TASK,
        "model": MODEL,
        "base_url": server.base_url,
        "api_key": KEY,
        "timeout_s": 0.5,
        "max_retries": 2,
    }
    options.update(overrides)
    return AnthropicEngine(**options)


def predict_one(server: AnthropicServer, text: str = "INVOICE 1", **overrides: Any) -> Any:
    with make_engine(server, **overrides) as engine:
        (prediction,) = engine.predict([Request("doc-1", text)])
    return prediction


def statuses(server: AnthropicServer) -> list[int | None]:
    return [r.get("status") for r in server.message_requests]


def usage_tuple(prediction: Any) -> tuple[int, int, int]:
    return prediction.usage.input_tokens, prediction.usage.output_tokens, prediction.usage.cached_tokens


# ---------------------------------------------------------------------------------------------- happy paths


def test_typed_answer_from_a_forced_tool_call_with_a_cached_system_prompt() -> None:
    with AnthropicServer([("INVOICE", INVOICE)]) as server:
        with make_engine(server) as engine:
            assert isinstance(engine, Engine) and isinstance(engine, FrontierEngine)
            assert engine.name == f"anthropic:{MODEL}"
            (prediction,) = engine.predict([Request("doc-1", "INVOICE 1 from ACME")])
        assert prediction.ok, prediction.error
        assert prediction.id == "doc-1"
        assert prediction.model == engine.name
        assert prediction.label == "invoice"
        assert prediction.fields == {"total": Decimal("1234.50"), "issued": date(2024, 3, 12), "vendor": "ACME"}
        assert isinstance(prediction.fields["total"], Decimal)
        assert prediction.label_confidence is None
        assert prediction.field_confidences == {"total": None, "issued": None, "vendor": None}
        assert prediction.truncated is False
        assert prediction.engine_seconds > 0

        (request,) = server.message_requests
        assert request["path"] == "/v1/messages"
        headers, body = request["headers"], request["body"]
        assert KEY in (headers.get("x-api-key"), headers.get("authorization", "").removeprefix("Bearer "))
        assert headers["anthropic-version"]
        assert body["model"] == MODEL
        assert body["max_tokens"] == 512
        assert "temperature" not in body  # API 2026-10-21 rejects every sampling parameter
        system, user = chat_messages(TASK, "INVOICE 1 from ACME")
        assert body["system"] == [{"type": "text", "text": system["content"], "cache_control": {"type": "ephemeral"}}]
        assert body["messages"] == [{"role": "user", "content": user["content"]}]
        (tool,) = body["tools"]
        assert tool["name"] == TOOL_NAME and tool["description"]
        assert tool["input_schema"] == answer_schema(TASK)
        assert body["tool_choice"]["type"] == "tool" and body["tool_choice"]["name"] == TOOL_NAME
        assert body["tool_choice"]["disable_parallel_tool_use"] is True
        assert "stream" not in body or body["stream"] is False

        usage = server.answered()[0]["usage"]
        assert usage["cache_creation_input_tokens"] > 0 and usage["cache_read_input_tokens"] == 0
        assert usage_tuple(prediction) == server.served_usage()


def test_classification_only_task() -> None:
    with AnthropicServer([("buy now", {"label": "spam"})], default={"label": "ham"}) as server:
        with make_engine(server, task=CLASSIFY_ONLY) as engine:
            spam, ham = engine.predict([Request("1", "buy now!!!"), Request("2", "lunch at noon?")])
        assert (spam.label, spam.fields, spam.field_confidences) == ("spam", {}, {})
        assert ham.ok and ham.label == "ham"
        assert server.message_requests[0]["body"]["tools"][0]["input_schema"]["required"] == ["label"]


def test_prompt_cache_reads_are_input_and_cached_tokens_summed_per_row() -> None:
    with AnthropicServer([("INVOICE", INVOICE), ("LETTER", LETTER)]) as server:
        with make_engine(server, max_concurrency=1) as engine:
            first, second = engine.predict([Request("1", "INVOICE"), Request("2", "LETTER")])
        written, read = (r["usage"] for r in server.answered())
    assert written["cache_creation_input_tokens"] > 0 and written["cache_read_input_tokens"] == 0
    assert read["cache_read_input_tokens"] == written["cache_creation_input_tokens"]
    assert read["cache_creation_input_tokens"] == 0
    assert first.usage.input_tokens == sum(written[k] for k in ("input_tokens", "cache_creation_input_tokens"))
    assert first.usage.cached_tokens == 0
    assert second.usage.input_tokens == read["input_tokens"] + read["cache_read_input_tokens"]
    assert second.usage.cached_tokens == read["cache_read_input_tokens"] > 0
    assert second.usage.output_tokens == read["output_tokens"] > 0


def test_batch_keeps_order_one_prediction_each_and_bounds_concurrency() -> None:
    labels = ["invoice", "receipt", "letter"]
    answers = [(f"doc number {i:02d}.", {**LETTER, "label": labels[i % 3]}) for i in range(20)]
    with AnthropicServer(answers, delay_s=0.05) as server:
        batch = [Request(f"id-{i}", f"doc number {i:02d}.") for i in reversed(range(20))]
        with make_engine(server, max_concurrency=4) as engine:
            predictions = engine.predict(batch)
        assert [p.id for p in predictions] == [r.id for r in batch]
        assert [p.label for p in predictions] == [labels[i % 3] for i in reversed(range(20))]
        assert all(p.ok for p in predictions)
        assert len(server.message_requests) == 20
        assert 2 <= server.max_in_flight <= 4


def test_concurrency_bound_is_shared_by_threads_calling_predict() -> None:
    with AnthropicServer([("doc", LETTER)], delay_s=0.05) as server:
        results: list[list[Any]] = []
        with make_engine(server, max_concurrency=3) as engine:
            threads = [
                threading.Thread(
                    target=lambda n=n: results.append(engine.predict([Request(f"{n}-{i}", "doc") for i in range(6)]))
                )
                for n in range(3)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        assert sorted(len(r) for r in results) == [6, 6, 6]
        assert all(p.ok for r in results for p in r)
        assert 2 <= server.max_in_flight <= 3


def test_predict_works_inside_a_running_event_loop_and_after_close() -> None:
    with AnthropicServer([("INVOICE", INVOICE)]) as server:
        engine = make_engine(server)

        async def called_from_async_code() -> Any:
            return engine.predict([Request("a", "INVOICE")])

        assert asyncio.run(called_from_async_code())[0].label == "invoice"
        engine.close()
        engine.close()  # idempotent
        assert engine.predict([Request("b", "INVOICE")])[0].label == "invoice"  # a fresh loop and client
        assert engine.predict([]) == []
        with pytest.raises(EngineError, match="twice"):
            engine.predict([Request("c", "INVOICE"), Request("c", "INVOICE")])
        assert len(server.message_requests) == 2
        engine.close()


def test_long_documents_are_truncated_before_sending() -> None:
    text = "INVOICE " + "word " * 2000
    with AnthropicServer([("INVOICE", INVOICE)]) as server:
        prediction = predict_one(server, text, max_input_tokens=100)
        sent = server.message_requests[0]["body"]["messages"][0]["content"]
    assert prediction.ok and prediction.truncated
    assert len(sent) < 100 * 4 + 50


# ---------------------------------------------------------------------------------------------- transport faults


def test_429_with_retry_after_is_retried_by_the_sdk_after_waiting() -> None:
    with AnthropicServer([("INVOICE", INVOICE)], faults=["429"], retry_after="0.3") as server:
        started = time.perf_counter()
        prediction = predict_one(server)
        elapsed = time.perf_counter() - started
        assert statuses(server) == [429, 200]
        assert [r["headers"].get("x-stainless-retry-count") for r in server.message_requests] == ["0", "1"]
    assert prediction.ok and prediction.label == "invoice"
    assert elapsed >= 0.3
    assert usage_tuple(prediction) == server.served_usage()  # the 429 is not billed


@pytest.mark.parametrize("fault", ["529", "500"])
def test_overloaded_and_server_errors_are_retried(fault: str) -> None:
    with AnthropicServer([("INVOICE", INVOICE)], faults=[fault]) as server:
        prediction = predict_one(server)
        assert statuses(server) == [int(fault), 200]
        assert server.message_requests[0]["response"]["error"]["type"] in ("overloaded_error", "api_error")
    assert prediction.ok and prediction.label == "invoice"


def test_hang_past_the_timeout_is_retried() -> None:
    with AnthropicServer([("INVOICE", INVOICE)], faults=["hang"], hang_s=3.0) as server:
        started = time.perf_counter()
        prediction = predict_one(server, timeout_s=0.3)
        elapsed = time.perf_counter() - started
        assert len(server.message_requests) == 2
    assert prediction.ok and prediction.label == "invoice"
    assert 0.3 <= elapsed < 2.5


@pytest.mark.parametrize(
    ("fault", "error_class"),
    [("529", "OverloadedError"), ("429", "RateLimitError"), ("500", "InternalServerError")],
)
def test_transient_errors_beyond_the_sdk_retries_are_retryable_rows(fault: str, error_class: str) -> None:
    with AnthropicServer([("INVOICE", INVOICE)], faults=[fault] * 3, retry_after="0.05") as server:
        prediction = predict_one(server, max_retries=1)
        assert len(server.message_requests) == 2
    assert not prediction.ok
    assert prediction.error.startswith(f"{error_class}: Error code: {fault}")
    assert prediction.retryable is True
    assert usage_tuple(prediction) == (0, 0, 0)
    assert prediction.label is None and prediction.fields == {}


def test_hang_on_every_attempt_is_a_retryable_timeout() -> None:
    with AnthropicServer([("INVOICE", INVOICE)], faults=["hang", "hang"], hang_s=3.0) as server:
        prediction = predict_one(server, timeout_s=0.2, max_retries=1)
        assert len(server.message_requests) == 2
    assert prediction.error.startswith("APITimeoutError: Request timed out")
    assert prediction.retryable is True


def test_auth_failure_is_final_not_retried_and_never_shows_the_key() -> None:
    wrong = "sk-ant-api03-WRONGKEY-abcdefghijklmnop"
    with AnthropicServer([("INVOICE", INVOICE)], api_key=KEY) as server:
        prediction = predict_one(server, api_key=wrong)
        assert statuses(server) == [401]  # 401 is not retried
        assert wrong in server.message_requests[0]["response"]["error"]["message"]  # the server did echo it
    assert prediction.error.startswith("AuthenticationError: Error code: 401")
    assert "authentication_error" in prediction.error
    assert prediction.retryable is False
    assert wrong not in prediction.error
    assert "WRONGKEY" not in prediction.error and "abcdefghijklmnop" not in prediction.error


def test_injected_401_fault_never_shows_the_right_key_either() -> None:
    with AnthropicServer([("INVOICE", INVOICE)], faults=["401"]) as server:
        prediction = predict_one(server)
        assert statuses(server) == [401]
        assert KEY in server.message_requests[0]["response"]["error"]["message"]
    assert prediction.retryable is False
    assert KEY not in prediction.error and "0123456789abcdef" not in prediction.error


@pytest.mark.parametrize("fault", ["400", "403", "404", "413"])
def test_other_client_errors_are_final(fault: str) -> None:
    with AnthropicServer([("INVOICE", INVOICE)], faults=[fault]) as server:
        prediction = predict_one(server)
        assert len(server.message_requests) == 1
    assert f"Error: Error code: {fault} - " in prediction.error
    assert prediction.retryable is False


def test_connection_refused_is_retryable() -> None:
    server = AnthropicServer().start()
    base_url = server.base_url
    server.stop()
    with AnthropicEngine(task=TASK, model=MODEL, base_url=base_url, api_key=KEY, max_retries=0) as engine:
        (prediction,) = engine.predict([Request("x", "INVOICE")])
    assert prediction.error.startswith("APIConnectionError: Connection error.")
    assert prediction.retryable is True
    assert KEY not in prediction.error


# ---------------------------------------------------------------------------------------------- answer faults


def test_invalid_tool_input_gets_one_repair_round_through_a_tool_result() -> None:
    with AnthropicServer([("INVOICE", INVOICE)], faults=["invalid"]) as server:
        prediction = predict_one(server)
        first, second = server.message_requests
        assert prediction.ok and prediction.label == "invoice"
        bad_call = first["response"]["content"][0]
        sent = second["body"]
        assert sent["system"] == first["body"]["system"]
        assert sent["tools"] == first["body"]["tools"] and sent["tool_choice"] == first["body"]["tool_choice"]
        user, assistant, result_turn = sent["messages"]
        assert user == first["body"]["messages"][0]
        assert assistant == {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": bad_call["id"], "name": TOOL_NAME, "input": bad_call["input"]},
            ],
        }
        assert result_turn["role"] == "user"
        (result,) = result_turn["content"]
        assert result["type"] == "tool_result" and result["tool_use_id"] == bad_call["id"]
        assert result["is_error"] is True
        assert result["content"].startswith("That answer was invalid: `label`")
        assert usage_tuple(prediction) == server.served_usage()  # both calls billed, cache read included
        assert prediction.usage.cached_tokens > 0


def test_invalid_twice_is_a_final_error_row() -> None:
    with AnthropicServer([("INVOICE", INVOICE)], faults=["invalid", "invalid"]) as server:
        prediction = predict_one(server)
        assert len(server.message_requests) == 2
        assert usage_tuple(prediction) == server.served_usage()
    assert not prediction.ok
    assert prediction.error.startswith("invalid answer from frontier: ")
    assert "label" in prediction.error
    assert prediction.retryable is False
    assert prediction.label is None and prediction.fields == {}


def test_text_instead_of_a_tool_call_is_repaired_as_text() -> None:
    with AnthropicServer([("INVOICE", INVOICE)], faults=["text"]) as server:
        prediction = predict_one(server)
        first, second = server.message_requests
        _, assistant, feedback = second["body"]["messages"]
    assert prediction.ok and prediction.label == "invoice"
    assert assistant == {"role": "assistant", "content": first["response"]["content"][0]["text"]}
    assert feedback["role"] == "user"
    assert feedback["content"].startswith(f"That answer was invalid: the response holds no {TOOL_NAME} tool call")


def test_an_invalid_answer_too_big_to_send_back_is_final_without_a_repair_round() -> None:
    with AnthropicServer([("INVOICE", INVOICE)], faults=["invalid"]) as server:
        prediction = predict_one(server, max_output_tokens=16)  # sends back at most 96 bytes
        assert len(server.message_requests) == 1
    assert "too long to send back" in prediction.error
    assert prediction.retryable is False
    assert prediction.usage.output_tokens > 0


@pytest.mark.parametrize(
    ("fault", "expected"),
    [("max_tokens", "cut off at max_output_tokens=512"), ("refusal", "refused to answer (general_harms)")],
)
def test_cut_off_and_refused_answers_are_final_without_a_repair_round(fault: str, expected: str) -> None:
    with AnthropicServer([("INVOICE", INVOICE)], faults=[fault]) as server:
        prediction = predict_one(server)
        assert len(server.message_requests) == 1
        assert usage_tuple(prediction) == server.served_usage()
    assert expected in prediction.error
    assert prediction.retryable is False
    assert prediction.usage.output_tokens > 0
    assert prediction.label is None and prediction.fields == {}


def test_one_failing_row_does_not_disturb_the_others() -> None:
    with (
        AnthropicServer([("INVOICE", INVOICE), ("LETTER", LETTER)], faults=["400"]) as server,
        make_engine(server, max_concurrency=1) as engine,
    ):
        first, second = engine.predict([Request("1", "INVOICE"), Request("2", "LETTER")])
    assert first.error is not None and first.retryable is False
    assert second.ok and second.label == "letter" and second.fields["total"] is None


# ---------------------------------------------------------------------------------------------- usage bound


@pytest.mark.parametrize(
    "faults",
    [[], ["invalid"], ["invalid", "invalid"], ["text"], ["text", "invalid"], ["max_tokens"], ["refusal"], ["529"]],
)
@pytest.mark.parametrize("text", ["INVOICE", "INVOICE Rechnung über 1.234,50 € — 日本語のテキスト " * 40])
@pytest.mark.parametrize(
    "answer",
    [
        {**INVOICE, "vendor": "株式会社テスト " * 6},  # multi-byte text sent back in a repair round
        {**INVOICE, "label": "memo", "vendor": "株式会社テスト " * 60},  # invalid, just under the 1536 bytes sent back
    ],
    ids=["small", "big-invalid"],
)
def test_usage_bound_covers_every_request_in_every_outcome(
    faults: list[str], text: str, answer: dict[str, Any]
) -> None:
    with AnthropicServer([("INVOICE", answer)], faults=faults) as server:
        with make_engine(server, max_output_tokens=256) as engine:
            request = Request("1", text)
            bound = engine.usage_bound(request)
            (prediction,) = engine.predict([request])
        served = [r["usage"] for r in server.answered()]
    assert served, "at least one call was answered"
    billed_input = sum(
        u["input_tokens"] + u["cache_creation_input_tokens"] + u["cache_read_input_tokens"] for u in served
    )
    assert prediction.usage.input_tokens == billed_input
    assert bound.input_tokens >= billed_input
    assert bound.output_tokens == 2 * 256 >= prediction.usage.output_tokens


class _RecordingGate:
    """An ExchangeGate admitting every call; records each call's kind, token bound and billed usage."""

    def __init__(self) -> None:
        self.calls: list[tuple[ExchangeKind, Usage, Usage | None]] = []

    async def admit(self, request_id: str, kind: ExchangeKind, bound: Usage) -> Any:
        calls, index = self.calls, len(self.calls)
        calls.append((kind, bound, None))

        class Ticket:
            def settle(self, used: Usage | None) -> None:
                calls[index] = (kind, bound, used)

        return Ticket()


@pytest.mark.parametrize(
    ("task", "faults", "kinds"),
    [
        (CLASSIFY_ONLY, [], [ExchangeKind.ANSWER]),
        (CLASSIFY_ONLY, ["invalid"], [ExchangeKind.ANSWER, ExchangeKind.REPAIR]),
        (CLASSIFY_ONLY, ["text"], [ExchangeKind.ANSWER, ExchangeKind.REPAIR]),
        (CLASSIFY_ONLY, ["max_tokens"], [ExchangeKind.ANSWER, ExchangeKind.WIDEN]),  # cut at the label bound
        (TASK, ["invalid", "invalid"], [ExchangeKind.ANSWER, ExchangeKind.REPAIR]),
    ],
)
def test_each_gated_call_is_billed_within_the_bound_it_reserved(
    task: TaskSpec, faults: list[str], kinds: list[ExchangeKind]
) -> None:
    answers = [("spam", {"label": "spam"}), ("INVOICE", INVOICE)]
    with AnthropicServer(answers, faults=faults) as server:
        with make_engine(server, task=task) as engine:
            gate = _RecordingGate()
            engine.predict([Request("1", "INVOICE spam " + "Rechnung über 1.234,50 € " * 20)], gate=gate)
        limits = [r["body"]["max_tokens"] for r in server.message_requests]
    assert [kind for kind, _, _ in gate.calls] == kinds
    for (kind, bound, used), limit in zip(gate.calls, limits, strict=True):
        assert used is not None
        assert used.input_tokens <= bound.input_tokens
        assert used.output_tokens <= bound.output_tokens == limit
        assert limit == (512 if kind is ExchangeKind.WIDEN else engine.answer_tokens)
    if task is CLASSIFY_ONLY:
        assert engine.answer_tokens < 200  # a label's answer: far below max_output_tokens


def test_usage_bound_follows_truncation() -> None:
    engine = AnthropicEngine(task=TASK, model=MODEL, api_key=KEY, max_input_tokens=100)
    huge, short = Request("h", "word " * 100_000), Request("s", "word " * 100)
    assert engine.usage_bound(huge) == engine.usage_bound(short)
    assert engine.usage_bound(Request("tiny", "x")).input_tokens < engine.usage_bound(short).input_tokens


# ---------------------------------------------------------------------------------------------- construction


def test_engine_from_frontier_spec_needs_a_key_and_the_anthropic_provider() -> None:
    with pytest.raises(EngineUnavailableError, match=r"ANTHROPIC_API_KEY") as caught:
        engine_from_frontier_spec(FrontierSpec(provider="anthropic", model=MODEL), TASK)
    assert "frontier.api_key_env" in str(caught.value)
    with pytest.raises(ValueError, match="openai"):
        engine_from_frontier_spec(FrontierSpec(provider="openai", model="gpt-4o-mini", api_key="k"), TASK)
    with pytest.raises(EngineUnavailableError):
        AnthropicEngine(task=TASK, model=MODEL, api_key="")
    engine = engine_from_frontier_spec(FrontierSpec(provider="anthropic", model=MODEL, api_key=KEY), TASK)
    assert engine.name == f"anthropic:{MODEL}"
    assert KEY not in repr(engine)
    engine.close()  # never started: a no-op


def test_build_frontier_engine_end_to_end() -> None:
    with AnthropicServer([("INVOICE", INVOICE)]) as server:
        spec = FrontierSpec(
            provider="anthropic",
            model=MODEL,
            base_url=server.base_url,
            api_key=KEY,
            timeout_s=2,
            max_retries=0,
            max_output_tokens=64,
            max_concurrency=2,
        )
        engine = build_frontier_engine(spec, TASK)
        assert isinstance(engine, AnthropicEngine)
        with engine:
            (prediction,) = engine.predict([Request("1", "INVOICE")])
        body = server.message_requests[0]["body"]
    assert prediction.ok and prediction.label == "invoice" and prediction.model == f"anthropic:{MODEL}"
    assert body["max_tokens"] == 64 and body["model"] == MODEL
    assert engine.max_concurrency == 2 and engine.max_retries == 0 and engine.timeout_s == 2


def test_extra_body_reaches_the_server() -> None:
    with AnthropicServer([("INVOICE", INVOICE)]) as server:
        prediction = predict_one(server, extra_body={"metadata": {"user_id": "docroute-test"}})
        body = server.message_requests[0]["body"]
    assert prediction.ok
    assert body["metadata"] == {"user_id": "docroute-test"}


def test_request_body_and_read_message_match_the_wire() -> None:
    with AnthropicServer([("INVOICE", INVOICE)], faults=["ok", "invalid", "max_tokens"]) as server:
        with make_engine(server, max_concurrency=1) as engine:
            requests = [Request("a", "INVOICE 1"), Request("b", "INVOICE 2"), Request("c", "INVOICE 3")]
            engine.predict(requests[:1])
            sent = server.message_requests[0]["body"]
            assert engine.request_body(requests[0]) == sent
            engine.predict(requests[1:])
        ok, invalid, cut, _ = (anthropic.types.Message.model_validate(r["response"]) for r in server.message_requests)
        good = engine.read_message("a", ok)
        assert good.ok and good.label == "invoice" and good.fields["total"] == Decimal("1234.50")
        assert good.usage.input_tokens > 0 and good.model == engine.name
        bad = engine.read_message("b", invalid)
        assert bad.error.startswith("invalid answer from frontier") and bad.retryable is False
        assert bad.label is None and bad.fields == {}
        assert "cut off" in engine.read_message("c", cut).error

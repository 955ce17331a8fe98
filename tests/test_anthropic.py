"""The Anthropic engine against a real local Messages API server, through the real `anthropic` SDK.

What every remote engine promises (order, retries, error rows, concurrency, secrets, the event loop) is tested once
for both in test_remote_contract.py; here is what only the Messages wire format has.
"""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from typing import Any

import anthropic
import pytest
from anthropic_server import AnthropicServer

from docroute.engines import build_frontier_engine
from docroute.engines.base import (
    Engine,
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


# ---------------------------------------------------------------------------------------------- transport faults


def test_overloaded_is_retried_by_the_sdk_with_its_retry_count_header() -> None:
    with AnthropicServer([("INVOICE", INVOICE)], faults=["529"]) as server:
        prediction = predict_one(server)
        assert statuses(server) == [529, 200]
        assert server.message_requests[0]["response"]["error"]["type"] == "overloaded_error"
        assert [r["headers"].get("x-stainless-retry-count") for r in server.message_requests] == ["0", "1"]
    assert prediction.ok and prediction.label == "invoice"


def test_overloaded_beyond_the_sdk_retries_is_a_retryable_row() -> None:
    """529 is Anthropic's own status: transient like any 5xx (client_base.TRANSIENT_STATUSES)."""
    with AnthropicServer([("INVOICE", INVOICE)], faults=["529"] * 3) as server:
        prediction = predict_one(server, max_retries=1)
        assert len(server.message_requests) == 2
    assert prediction.error.startswith("OverloadedError: Error code: 529")
    assert prediction.retryable is True
    assert usage_tuple(prediction) == (0, 0, 0)


def test_injected_401_fault_never_shows_the_right_key_either() -> None:
    with AnthropicServer([("INVOICE", INVOICE)], faults=["401"]) as server:
        prediction = predict_one(server)
        assert statuses(server) == [401]
        assert KEY in server.message_requests[0]["response"]["error"]["message"]
    assert prediction.retryable is False
    assert KEY not in prediction.error and "0123456789abcdef" not in prediction.error


@pytest.mark.parametrize("fault", ["403", "413"])
def test_other_client_errors_are_final(fault: str) -> None:
    with AnthropicServer([("INVOICE", INVOICE)], faults=[fault]) as server:
        prediction = predict_one(server)
        assert len(server.message_requests) == 1
    assert f"Error: Error code: {fault} - " in prediction.error
    assert prediction.retryable is False


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


def test_a_refusal_names_its_category_and_explanation() -> None:
    with AnthropicServer([("INVOICE", INVOICE)], faults=["refusal"]) as server:
        prediction = predict_one(server)
        assert usage_tuple(prediction) == server.served_usage()
    assert prediction.error == "frontier refused to answer (general_harms): Not something I do."
    assert prediction.retryable is False


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


def test_request_body_and_read_response_match_the_wire() -> None:
    with AnthropicServer([("INVOICE", INVOICE)], faults=["ok", "invalid", "max_tokens"]) as server:
        with make_engine(server, max_concurrency=1) as engine:
            requests = [Request("a", "INVOICE 1"), Request("b", "INVOICE 2"), Request("c", "INVOICE 3")]
            engine.predict(requests[:1])
            sent = server.message_requests[0]["body"]
            assert engine.request_body(requests[0]) == sent
            engine.predict(requests[1:])
        ok, invalid, cut, _ = (anthropic.types.Message.model_validate(r["response"]) for r in server.message_requests)
        good = engine.read_response("a", ok)
        assert good.ok and good.label == "invoice" and good.fields["total"] == Decimal("1234.50")
        assert good.usage.input_tokens > 0 and good.model == engine.name
        bad = engine.read_response("b", invalid)
        assert bad.error.startswith("invalid answer from frontier") and bad.retryable is False
        assert bad.label is None and bad.fields == {}
        assert "cut off" in engine.read_response("c", cut).error

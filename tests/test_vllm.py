"""The vLLM engine without a GPU: scoring maths, prompts, sampling parameters, parsing and accounting.

A toy runtime stands in for vLLM: character tokens, and next-token log-probabilities from a rule that prefers
continuing a word of the document. It answers in the shapes vLLM's RequestOutput has (prompt_token_ids,
num_cached_tokens, outputs[0].token_ids/.logprobs, prompt_logprobs), so the whole engine runs here. Tests that
build real SamplingParams run where vllm imports; the end-to-end test runs only with vllm and a CUDA GPU.
"""

from __future__ import annotations

import builtins
import json
import math
import os
import re
import sys
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from docroute.engines.base import EngineUnavailableError, Request
from docroute.engines.local.vllm import (
    INSTALL_HINT,
    NO_GPU_MESSAGE,
    Call,
    TokenizerGlue,
    VllmEngine,
    import_vllm,
    job_scores,
    llm_kwargs,
    lora_rank,
    make_sampling_params,
    merge_system,
    parse_generation,
    plain_chat,
    require_gpu,
    retryable,
    sampling_kwargs,
    score_calls,
    special_prefix,
    supports_token_id_logprobs,
)
from docroute.engines.local.vllm_scoring import (
    MISSING_LOGPROB,
    apportion,
    mean_softmax,
    prompt_logprob_score,
    request_usage,
    token_pieces,
    total_usage,
    trie_plan,
    trie_scores,
)
from docroute.engines.scoring import fewshot
from docroute.engines.scoring.confidence import choice_probabilities, choose_value, contextual_calibration, softmax
from docroute.engines.scoring.fewshot import truncate_tokens
from docroute.schemas.spec import (
    ClassifySpec,
    ExtractExample,
    ExtractSpec,
    FieldSpec,
    LabelSpec,
    TaskSpec,
    VllmSpec,
)

# ----------------------------------------------------------------------------------------------------------
# a toy runtime in vLLM's shapes


@dataclass
class Logprob:
    """vLLM's vllm.logprobs.Logprob, field for field."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


_WORD = re.compile(r"[\w.\-/]+")


def toy_logprob(context: str, token: int) -> float:
    """Prefer characters that continue a word of the document being asked about (the last one in the prompt)."""
    char = chr(token)
    text_at, doc_at = context.rfind("Text: "), context.rfind("Document:\n")
    if text_at > doc_at:
        document = context[text_at + 6 : context.find("\n", text_at)]
    else:
        end = context.find("\n---\n", doc_at)
        document = context[doc_at + 10 : end if end >= 0 else None]
    so_far = context[context.rfind(":") + 1 :]
    word = (so_far + char).strip()
    if char in " \n":
        return -0.5
    if word and any(w.startswith(word) for w in _WORD.findall(document)):
        return -0.1
    return -3.0


class LazyPromptLogprobs(Sequence):
    """prompt_logprobs computed on demand (vLLM computes them all; the engine reads only its continuations)."""

    def __init__(self, prompt: Sequence[int], decode: Callable[[Sequence[int]], str]) -> None:
        self.prompt, self.decode = list(prompt), decode

    def __len__(self) -> int:
        return len(self.prompt)

    def __getitem__(self, position: Any) -> Any:
        if not isinstance(position, int):
            raise TypeError("positions only")
        if position == 0:
            return None
        token = self.prompt[position]
        return {token: Logprob(toy_logprob(self.decode(self.prompt[:position]), token), rank=1)}


class ToyRuntime:
    """Implements engines.vllm.Runtime; simulates vLLM's 16-token prefix-cache blocks for num_cached_tokens."""

    BLOCK = 16

    def __init__(
        self,
        *,
        token_ids: bool = True,
        max_model_len: int = 8192,
        answer: Callable[[str], str] | None = None,
        fail_on: str | None = None,
    ) -> None:
        self.supports_token_ids = token_ids
        self.max_model_len = max_model_len
        self.memo: dict[str, Any] = {}
        self.runs: list[list[Call]] = []
        self.answer = answer or (lambda prompt: "{}")
        self.fail_on = fail_on
        self._blocks: set[int] = set()

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, tokens: Sequence[int]) -> str:
        return "".join(chr(t) for t in tokens if t != 1)

    def bos(self) -> list[int]:
        return [1]

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        return self.bos() + self.encode(plain_chat(messages))

    def _cached(self, prompt: Sequence[int], reads_cache: bool) -> int:
        cached, digest, hits = 0, 0, True
        for start in range(0, len(prompt) - self.BLOCK + 1, self.BLOCK):
            digest = hash((digest, tuple(prompt[start : start + self.BLOCK])))
            if hits and digest in self._blocks and start + self.BLOCK < len(prompt):
                cached = start + self.BLOCK
            else:
                hits = False
            self._blocks.add(digest)
        return cached if reads_cache else 0

    def run(self, calls: Sequence[Call]) -> tuple[list[Any], float]:
        self.runs.append(list(calls))
        if self.fail_on is not None and any(self.fail_on in self.decode(c.prompt) for c in calls):
            raise ValueError("this prompt breaks the toy model")
        outputs = []
        for call in calls:
            context = self.decode(call.prompt)
            prompt_logprobs = None
            if call.read_ids:
                best = max(call.read_ids, key=lambda t: toy_logprob(context, t))
                ids = [best]
                logprobs = [{t: Logprob(toy_logprob(context, t)) for t in (best, *call.read_ids)}]
            elif call.prompt_scoring:
                ids, logprobs = [10], [{10: Logprob(-0.5)}]
                prompt_logprobs = LazyPromptLogprobs(call.prompt, self.decode)
            else:
                ids = self.encode(self.answer(context))[: call.max_tokens]
                logprobs = [{t: Logprob(-0.01)} for t in ids]
            completion = SimpleNamespace(token_ids=ids, logprobs=logprobs, text=self.decode(ids), finish_reason="stop")
            outputs.append(
                SimpleNamespace(
                    prompt_token_ids=call.prompt,
                    num_cached_tokens=self._cached(call.prompt, reads_cache=not call.prompt_scoring),
                    prompt_logprobs=prompt_logprobs,
                    outputs=[completion],
                )
            )
        return outputs, 0.5


SPEC = VllmSpec(model="toy/model")


def classify_task() -> TaskSpec:
    labels = [
        LabelSpec(name="sports", examples=["The team won the cup."]),
        LabelSpec(name="weather", examples=["Rain tonight."]),
        LabelSpec(name="cooking", examples=["Bake the bread."]),
    ]
    return TaskSpec(instructions="Short snippets.", classify=ClassifySpec(labels=labels))


DOCS = [
    Request("a", "Severe weather warnings for the coast tonight."),
    Request("b", "Local sports club signs a new coach."),
    Request("c", "A cooking class for beginners starts Monday."),
]

INVOICE = """Northwind Office Supply
Invoice No: NW-20931
Date: 14/03/2024
TOTAL DUE: $351.27 USD
"""


def extract_task() -> TaskSpec:
    fields = [
        FieldSpec(name="invoice_date", type="date"),
        FieldSpec(name="currency", type="enum", values=["USD", "EUR", "GBP"]),
        FieldSpec(name="due_date", type="date", required=False, description="when payment is due"),
    ]
    example = ExtractExample(text="Date: 05/02/2024\nTOTAL: $31.36 EUR", values={"invoice_date": "05/02/2024"})
    return TaskSpec(extract=ExtractSpec(fields=fields, examples=[example]))


# ----------------------------------------------------------------------------------------------------------
# scoring maths


def test_trie_plan_reads_shared_beginnings_once() -> None:
    plan = trie_plan([[5, 6, 7], [5, 6, 8], [9]])
    assert plan.paths == ((), (5,), (5, 6))
    assert plan.reads == ((5, 9), (6,), (7, 8))
    assert plan.steps == (((0, 5), (1, 6), (2, 7)), ((0, 5), (1, 6), (2, 8)), ((0, 9),))
    with pytest.raises(ValueError, match="at least one token"):
        trie_plan([[1], []])
    assert trie_plan([]).size == 0


def test_trie_scores_sum_multi_token_labels() -> None:
    plan = trie_plan([[5, 6, 7], [5, 6, 8], [9]])
    reads = [{5: -0.1, 9: -2.0}, {6: -0.2}, {7: -0.3, 8: -1.3}]
    assert trie_scores(plan, reads) == pytest.approx([-0.6, -1.6, -2.0])
    assert trie_scores(plan, [{5: -0.1}, {6: -0.2}, {7: -0.3}])[2] == MISSING_LOGPROB
    with pytest.raises(ValueError, match="reads for a plan"):
        trie_scores(plan, reads[:2])


def test_prompt_logprob_score_reads_the_continuation_positions() -> None:
    prompt_logprobs = [None, {4: Logprob(-9.0)}, {5: Logprob(-0.25, rank=1)}, {6: Logprob(-0.5), 2: Logprob(-0.1)}]
    assert prompt_logprob_score(prompt_logprobs, 2, [5, 6]) == pytest.approx(-0.75)
    assert prompt_logprob_score([None, {1: -1.0}, {2: -2.0}], 1, [1, 2]) == pytest.approx(-3.0)  # plain floats
    with pytest.raises(ValueError, match="do not cover"):
        prompt_logprob_score(prompt_logprobs, 3, [6, 7])


def test_both_scoring_routes_give_the_same_scores() -> None:
    runtime = ToyRuntime()
    prompt = runtime.encode("Text: the weather is fine\nLabel:")
    labels = [runtime.encode(fewshot.label_continuation(t)) for t in ("weather", "sports", "wet weather")]
    scores = []
    for token_ids in (True, False):
        job, calls = score_calls(prompt, labels, token_ids=token_ids)
        job.first, job.count = 0, len(calls)
        outputs, _ = runtime.run(calls)
        scores.append(job_scores(job, outputs))
    assert scores[0] == pytest.approx(scores[1])
    assert np.argmax(scores[0]) == 0
    assert len(runtime.runs[0]) < 3 * len(labels[2]) and len(runtime.runs[1]) == 3  # the trie shares " w"/"we"


def test_label_probabilities_cover_the_whole_label_set_and_calibrate() -> None:
    scores = np.array([-1.0, -2.0, -4.0])
    probs = choice_probabilities(scores)
    assert probs.sum() == pytest.approx(1.0) and probs == pytest.approx(softmax(scores))
    prior = mean_softmax([[-1.0, -1.5, -3.0], [-1.2, -1.2, -2.0]])
    expected = softmax(scores) / prior / (softmax(scores) / prior).sum()
    assert choice_probabilities(scores, prior=prior) == pytest.approx(expected)
    assert choice_probabilities(scores, prior=prior) == pytest.approx(contextual_calibration(softmax(scores), prior))
    per_token = choice_probabilities(scores, lengths=[1, 2, 4])
    assert per_token == pytest.approx(softmax([-1.0, -1.0, -1.0]))


def test_a_subset_prior_equals_scoring_only_the_subset() -> None:
    rows = np.array([[-1.0, -2.0, -0.5, -3.0], [-2.0, -1.0, -1.5, -0.1]])
    subset = [0, 2]
    expected = np.mean([softmax(rows[0, subset]), softmax(rows[1, subset])], axis=0)
    assert mean_softmax(rows, subset) == pytest.approx(expected)


def test_choose_value_merges_spellings_and_lists() -> None:
    total = FieldSpec(name="total", type="decimal")
    value, confidence = choose_value(
        total, np.array([0.3, 0.25, 0.45]), [Decimal("9.00"), Decimal("9.00"), Decimal("8")], [0, 5, 9]
    )
    assert (value, confidence) == (Decimal("9.00"), pytest.approx(0.55))
    tags = FieldSpec(name="tags", type="list[str]")
    value, confidence = choose_value(
        tags, np.array([0.5, 0.1, 0.3, 0.1]), [["b"], ["x"], ["a", "b"], None], [9, 1, 2, -1]
    )
    assert value == ["a", "b"] and confidence == pytest.approx(0.8)
    value, confidence = choose_value(tags, np.array([0.1, 0.9]), [["x"], None], [0, -1])
    assert value == [] and confidence == pytest.approx(0.9)


def test_truncate_tokens_keeps_head_and_tail() -> None:
    tokens = list(range(100))
    kept, truncated = truncate_tokens(tokens, 20, [-1])
    assert truncated and len(kept) == 20 and kept[:12] == list(range(12)) and kept[12] == -1
    assert kept[13:] == list(range(93, 100))
    assert truncate_tokens(tokens, 100, [-1]) == (tokens, False)


def test_token_pieces_join_to_the_decoded_text() -> None:
    def chars(ids: Sequence[int]) -> str:
        return "".join(chr(i) for i in ids)

    assert token_pieces(chars, [104, 105]) == ["h", "i"]

    def utf8(ids: Sequence[int]) -> str:  # byte-level tokens: a character may span two of them
        return bytes(ids).decode("utf-8", errors="replace")

    euro = list("a€b".encode())
    pieces = token_pieces(utf8, euro)
    assert pieces == ["a", "", "", "€", "b"] and "".join(pieces) == "a€b"

    def rewriting(ids: Sequence[int]) -> str:  # a tokenizer that cleans up spaces before punctuation
        return chars(ids).replace(" .", ".")

    assert token_pieces(rewriting, [ord(c) for c in "a ."]) is None


# ----------------------------------------------------------------------------------------------------------
# requests, sampling parameters, LLM arguments


def test_sampling_kwargs_per_kind_of_call() -> None:
    reads = sampling_kwargs(Call((1, 2), read_ids=(7, 8)))
    assert reads == {"temperature": 0.0, "max_tokens": 1, "logprob_token_ids": [7, 8], "detokenize": False}
    scoring = sampling_kwargs(Call((1, 2, 7), prompt_scoring=True))
    assert scoring["prompt_logprobs"] == 0 and scoring["max_tokens"] == 1 and scoring["temperature"] == 0.0
    schema = {"type": "object", "properties": {"x": {"type": ["string", "null"]}}}
    generate = sampling_kwargs(Call((1,), schema=json.dumps(schema), max_tokens=64))
    assert generate == {
        "temperature": 0.0,
        "max_tokens": 64,
        "logprobs": 0,
        "structured_outputs": {"json": schema},
    }
    with pytest.raises(ValueError, match="exactly one"):
        Call((1,), read_ids=(2,), prompt_scoring=True)
    with pytest.raises(ValueError, match="exactly one"):
        Call((1,))


def test_llm_kwargs_and_lora_rank(tmp_path) -> None:
    plain = llm_kwargs(VllmSpec(model="Qwen/Qwen2.5-0.5B-Instruct"))
    assert plain == {
        "model": "Qwen/Qwen2.5-0.5B-Instruct",
        "dtype": "auto",
        "gpu_memory_utilization": 0.9,
        "tensor_parallel_size": 1,
        "seed": 0,
        "enable_prefix_caching": True,
    }
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 24}))
    assert lora_rank(str(tmp_path)) == 32
    assert lora_rank(str(tmp_path / "missing")) is None
    spec = VllmSpec(model="m", max_model_len=4096, quantization="fp8", lora_path=str(tmp_path), seed=7)
    full = llm_kwargs(spec, lora_rank=lora_rank(str(tmp_path)))
    assert full["max_model_len"] == 4096 and full["quantization"] == "fp8" and full["seed"] == 7
    assert full["enable_lora"] is True and full["max_lora_rank"] == 32 and full["max_loras"] == 1


def test_chat_helpers() -> None:
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert merge_system(messages) == [{"role": "user", "content": "S\n\nU"}]
    assert plain_chat(messages).startswith("S\n\nU\n\n") and plain_chat(messages).endswith("JSON object):\n")
    assert special_prefix([2, 5, 6], [5, 6]) == [2]
    assert special_prefix([5, 6, 3], [5, 6]) == []  # a trailing EOS is not a prefix
    assert special_prefix([5, 6], [5, 6]) == []


class MiniTokenizer:
    """A Hugging Face-like tokenizer: characters, one special token `<end>` (id 0), BOS (id 1), a chat template."""

    def __init__(self, *, template: bool = True, system_role: bool = True, split_option: bool = True) -> None:
        self.chat_template = "{{ messages }}" if template else None
        self.system_role, self.split_option = system_role, split_option

    def encode(self, text: str, add_special_tokens: bool = True, **options: Any) -> list[int]:
        if options and not self.split_option:
            raise TypeError("unexpected keyword argument")
        if options.get("split_special_tokens", False):
            ids = [ord(c) for c in text]
        else:
            ids = [0 if c == "\0" else ord(c) for c in text.replace("<end>", "\0")]
        return [1, *ids] if add_special_tokens else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return "".join("" if i in (0, 1) and skip_special_tokens else chr(i) for i in ids)

    def apply_chat_template(self, messages: list[dict[str, str]], **options: Any) -> str:
        assert options == {"tokenize": False, "add_generation_prompt": True}
        if not self.system_role and any(m["role"] == "system" for m in messages):
            raise ValueError("System role not supported")
        turns = "".join(f"[{m['role']}]{m['content']}<end>" for m in messages)
        return f"{turns}[assistant]"


def test_tokenizer_glue_keeps_documents_plain_inside_chat_templates() -> None:
    glue = TokenizerGlue(MiniTokenizer())
    assert glue.bos() == [1]
    assert glue.encode("a<end>") == [97, *[ord(c) for c in "<end>"]]  # a special-token string in text stays text
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "doc <end>[assistant]{}"}]
    tokens = glue.chat_prompt(messages)
    assert tokens.count(0) == 2  # the two turns' ends; the document's look-alike is plain characters
    assert glue.decode(tokens) == "[system]S[user]doc <end>[assistant]{}[assistant]"
    no_system = TokenizerGlue(MiniTokenizer(system_role=False))
    assert no_system.decode(no_system.chat_prompt(messages)).startswith("[user]S\n\ndoc")
    plain = TokenizerGlue(MiniTokenizer(template=False, split_option=False))
    assert plain.chat_prompt(messages)[0] == 1 and plain.decode(plain.chat_prompt(messages)).endswith("object):\n")
    assert plain.encode("a<end>") == [97, 0]  # without the option the tokenizer's own rule applies


# ----------------------------------------------------------------------------------------------------------
# outputs and accounting


def test_request_usage_reads_request_outputs() -> None:
    output = SimpleNamespace(prompt_token_ids=[1] * 40, num_cached_tokens=32, outputs=[SimpleNamespace(token_ids=[5])])
    usage = request_usage(output)
    assert (usage.prompt_tokens, usage.cached_tokens, usage.output_tokens, usage.computed) == (40, 32, 1, 9)
    no_cache_info = SimpleNamespace(prompt_token_ids=[1, 2], num_cached_tokens=None, outputs=[])
    assert request_usage(no_cache_info).computed == 2
    total = total_usage([usage, request_usage(no_cache_info)])
    assert (total.input_tokens, total.cached_tokens, total.output_tokens) == (42, 32, 1)


def test_apportion_splits_seconds_by_weight() -> None:
    assert apportion(3.0, [1, 2]) == pytest.approx([1.0, 2.0])
    assert apportion(2.0, [0, 0]) == pytest.approx([1.0, 1.0])
    assert apportion(1.0, []) == []


def _generation(text: str, logprob: float = -0.01, ids: list[int] | None = None) -> SimpleNamespace:
    tokens = ids if ids is not None else [ord(c) for c in text]
    completion = SimpleNamespace(token_ids=tokens, logprobs=[{t: Logprob(logprob), 0: Logprob(-9.0)} for t in tokens])
    return SimpleNamespace(outputs=[completion])


def _chars(ids: Sequence[int]) -> str:
    return "".join(chr(i) for i in ids)


def test_parse_generation_types_values_and_scores_their_tokens() -> None:
    fields = [
        FieldSpec(name="due", type="date"),
        FieldSpec(name="total", type="decimal"),
        FieldSpec(name="note", type="str", required=False),
    ]
    task = TaskSpec(extract=ExtractSpec(fields=fields))
    values, confidences = parse_generation(
        task, _generation('{"due": "2024-03-12", "total": "9.50", "note": null}'), _chars
    )
    assert values == {"due": date(2024, 3, 12), "total": Decimal("9.50"), "note": None}
    assert confidences["due"] == pytest.approx(math.exp(-0.01 * 10))
    assert confidences["total"] == pytest.approx(math.exp(-0.01 * 4))
    assert confidences["note"] == pytest.approx(math.exp(-0.01 * 4))


def test_parse_generation_of_a_cut_off_answer_escalates_its_fields() -> None:
    task = TaskSpec(extract=ExtractSpec(fields=[FieldSpec(name="due", type="date")]))
    values, confidences = parse_generation(task, _generation('{"due": "2024-0'), _chars)
    assert values == {"due": None} and confidences == {"due": 0.0}


# ----------------------------------------------------------------------------------------------------------
# the engine over the toy runtime


def test_prompts_put_the_shared_prefix_first_and_keep_documents_contiguous() -> None:
    runtime = ToyRuntime()
    engine = VllmEngine(SPEC, classify_task(), runtime=runtime)
    plans, calls = engine.plan(DOCS)
    prefix = engine._classify_prefix
    assert prefix[0] == 1 and runtime.decode(prefix).startswith("Short snippets.")
    assert all(call.prompt[: len(prefix)] == prefix for call in calls)
    for request, plan in zip(DOCS, plans, strict=True):
        own = calls[plan.first : plan.first + plan.count]
        doc = runtime.encode(fewshot.classify_document(request.text)) + runtime.encode(fewshot.CLASSIFY_QUESTION)
        assert all(c.prompt[len(prefix) : len(prefix) + len(doc)] == doc for c in own)
        assert len({id(c.base) for c in own}) == 1  # one shared copy of the document's tokens
    assert [p.first for p in plans] == [0, plans[0].count, plans[0].count + plans[1].count]


def test_label_scoring_classifies_with_calibrated_probabilities_in_one_call_per_shard() -> None:
    runtime = ToyRuntime()
    engine = VllmEngine(SPEC, classify_task(), runtime=runtime)
    assert engine.scoring == "token_ids" and engine.few_shot_used == 3
    assert len(runtime.runs) == 1  # the content-free calibration
    prior = engine._label_prior
    assert prior is not None and prior.sum() == pytest.approx(1.0) and prior[0] > prior[1]  # "sports" is shorter
    predictions = engine.predict(DOCS)
    assert len(runtime.runs) == 2  # one generate call for the whole shard
    assert [p.label for p in predictions] == ["weather", "sports", "cooking"]
    for prediction in predictions:
        assert prediction.ok and 1 / 3 < prediction.label_confidence <= 1.0
        assert prediction.model == "vllm:toy/model"
    raw = VllmEngine(SPEC, classify_task(), runtime=ToyRuntime())
    raw._label_prior = None
    assert raw.predict(DOCS[:1])[0].label_confidence != predictions[0].label_confidence


def test_prompt_logprob_route_agrees_with_token_id_route() -> None:
    by_ids = VllmEngine(SPEC, classify_task(), runtime=ToyRuntime(token_ids=True)).predict(DOCS)
    by_prompt_engine = VllmEngine(SPEC, classify_task(), runtime=ToyRuntime(token_ids=False))
    assert by_prompt_engine.scoring == "prompt_logprobs"
    by_prompt = by_prompt_engine.predict(DOCS)
    for a, b in zip(by_ids, by_prompt, strict=True):
        assert a.label == b.label and a.label_confidence == pytest.approx(b.label_confidence)
    assert all(p.usage.cached_tokens == 0 for p in by_prompt)  # vLLM skips the prefix cache for prompt logprobs


def test_token_accounting_and_seconds() -> None:
    runtime = ToyRuntime()
    engine = VllmEngine(SPEC, classify_task(), runtime=runtime)
    predictions = engine.predict(DOCS)
    calls = runtime.runs[-1]
    assert sum(p.usage.input_tokens for p in predictions) == sum(len(c) for c in calls)
    assert sum(p.usage.output_tokens for p in predictions) == len(calls)  # one generated token per read
    for prediction in predictions:
        assert 0 < prediction.usage.cached_tokens < prediction.usage.input_tokens
    assert sum(p.engine_seconds for p in predictions) == pytest.approx(0.5)
    assert all(p.engine_seconds > 0 for p in predictions)


def test_extraction_chooses_candidates_and_generates_what_has_none() -> None:
    runtime = ToyRuntime(answer=lambda prompt: '{"invoice_date": null, "due_date": "2024-03-28"}')
    engine = VllmEngine(SPEC, extract_task(), runtime=runtime)
    assert engine.examples_used == 1 and set(engine._choice_rows) == {"currency"}
    note = "Northwind Office Supply\nPayable in USD by the end of the month.\nTOTAL DUE: $351.27"
    with_date, without_date = engine.predict([Request("inv", INVOICE), Request("note", note)])
    assert with_date.ok and without_date.ok
    assert with_date.fields["invoice_date"] == date(2024, 3, 14)
    assert with_date.fields["currency"] == "USD"
    assert with_date.field_confidences["currency"] == pytest.approx(1.0)  # the only value the invoice names
    assert with_date.fields["due_date"] in (date(2024, 3, 14), None)  # candidates: the one date, or n/a
    generated = [c for c in runtime.runs[-1] if c.schema is not None]
    assert len(generated) == 1  # only the note lacks dates: its date fields are generated
    assert without_date.fields["invoice_date"] is None
    assert without_date.field_confidences["invoice_date"] == pytest.approx(math.exp(-0.01 * 4))  # "null"
    assert without_date.fields["due_date"] == date(2024, 3, 28)
    assert without_date.field_confidences["due_date"] == pytest.approx(math.exp(-0.01 * 10))
    schema = json.loads(generated[0].schema)
    assert set(schema["properties"]) == {"invoice_date", "due_date"}
    for prediction in (with_date, without_date):
        assert list(prediction.fields) == ["invoice_date", "currency", "due_date"]
        assert all(c is None or 0.0 <= c <= 1.0 for c in prediction.field_confidences.values())


def test_long_documents_are_truncated_and_say_so() -> None:
    engine = VllmEngine(VllmSpec(model="toy/model", max_input_tokens=64), classify_task(), runtime=ToyRuntime())
    long_doc, short_doc = engine.predict([Request("long", "weather " * 200), Request("short", "weather today")])
    assert long_doc.truncated and not short_doc.truncated
    assert long_doc.label == "weather"


def test_a_document_that_breaks_the_call_fails_alone() -> None:
    runtime = ToyRuntime(fail_on="POISON")
    engine = VllmEngine(SPEC, classify_task(), runtime=runtime)
    predictions = engine.predict([DOCS[0], Request("bad", "POISON pill"), DOCS[1]])
    assert [p.ok for p in predictions] == [True, False, True]
    assert "breaks the toy model" in predictions[1].error and not predictions[1].retryable
    assert predictions[0].label == "weather"


def test_a_document_that_cannot_be_planned_fails_alone(monkeypatch) -> None:
    runtime = ToyRuntime()
    engine = VllmEngine(SPEC, classify_task(), runtime=runtime)
    visible = engine._visible

    def broken(text: str, budget: int) -> tuple[str, bool]:
        if "POISON" in text:
            raise ValueError("cannot tokenize this")
        return visible(text, budget)

    monkeypatch.setattr(engine, "_visible", broken)
    predictions = engine.predict([DOCS[0], Request("bad", "POISON pill"), DOCS[1]])
    assert [p.ok for p in predictions] == [True, False, True]
    assert "cannot tokenize this" in predictions[1].error and predictions[1].usage.input_tokens == 0
    assert len(runtime.runs) == 2  # still one call for the shard


def _spec_with(**options: Any) -> VllmSpec:
    """The test spec with some options changed (few_shot, calibration, ...)."""
    return SPEC.model_copy(update=options)


def test_calibration_options() -> None:
    runtime = ToyRuntime()
    none = VllmEngine(_spec_with(calibration="none"), classify_task(), runtime=runtime)
    assert none._label_prior is None and runtime.runs == []
    docs = [Request(f"d{i}", DOCS[i % 3].text) for i in range(8)]
    content_free = VllmEngine(SPEC, classify_task(), runtime=ToyRuntime()).predict(docs)
    batch = VllmEngine(_spec_with(calibration="batch"), classify_task(), runtime=ToyRuntime())
    by_batch = batch.predict(docs)
    assert [p.label for p in by_batch] == [p.label for p in content_free]
    assert by_batch[0].label_confidence != content_free[0].label_confidence
    few = batch.predict(docs[:3])  # under 8 documents the content-free prior is used
    assert [p.label_confidence for p in few] == pytest.approx([p.label_confidence for p in content_free[:3]])


def test_few_shot_and_candidate_scoring_options() -> None:
    engine = VllmEngine(_spec_with(few_shot=1), classify_task(), runtime=ToyRuntime())
    assert engine.few_shot_used == 1
    summed = VllmEngine(SPEC, extract_task(), runtime=ToyRuntime()).predict([Request("inv", INVOICE)])[0]
    mean = VllmEngine(_spec_with(candidate_scoring="mean"), extract_task(), runtime=ToyRuntime())
    per_token = mean.predict([Request("inv", INVOICE)])[0]
    assert per_token.fields["invoice_date"] == summed.fields["invoice_date"] == date(2024, 3, 14)
    assert per_token.field_confidences["due_date"] != pytest.approx(summed.field_confidences["due_date"])


def test_generate_strategy_asks_every_field_as_json() -> None:
    runtime = ToyRuntime(answer=lambda p: '{"invoice_date": "2024-03-14", "currency": "USD", "due_date": null}')
    engine = VllmEngine(_spec_with(extract_strategy="generate"), extract_task(), runtime=runtime)
    (prediction,) = engine.predict([Request("inv", INVOICE)])
    assert [c.schema is not None for c in runtime.runs[-1]] == [True]
    assert prediction.fields == {"invoice_date": date(2024, 3, 14), "currency": "USD", "due_date": None}
    assert prediction.usage.output_tokens == len('{"invoice_date": "2024-03-14", "currency": "USD", "due_date": null}')


def test_a_context_too_small_for_the_prompt_is_refused() -> None:
    task = TaskSpec(instructions="word " * 400, classify=classify_task().classify)
    with pytest.raises(EngineUnavailableError, match="no room for documents"):
        VllmEngine(SPEC, task, runtime=ToyRuntime(max_model_len=1024))


def test_empty_batch() -> None:
    runtime = ToyRuntime()
    assert VllmEngine(SPEC, classify_task(), runtime=runtime).predict([]) == []
    assert len(runtime.runs) == 1


# ----------------------------------------------------------------------------------------------------------
# availability


def test_retryable_errors() -> None:
    class VLLMError(Exception):
        pass

    class VLLMClientError(VLLMError):
        pass

    class VLLMValidationError(VLLMClientError):
        pass

    class EngineDeadError(VLLMError):
        pass

    assert not retryable(VLLMValidationError("prompt too long"))
    assert not retryable(ValueError("bad input"))
    assert retryable(EngineDeadError("the engine core died"))
    assert retryable(RuntimeError("CUDA error: out of memory"))


def test_missing_vllm_is_a_clear_error(monkeypatch) -> None:
    real_import = builtins.__import__

    def no_vllm(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("No module named 'vllm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_vllm)
    with pytest.raises(EngineUnavailableError, match=re.escape(INSTALL_HINT)):
        import_vllm()
    with pytest.raises(EngineUnavailableError, match=re.escape(INSTALL_HINT)):
        VllmEngine(VllmSpec(model="any/model-not-loaded"), classify_task())


def test_no_gpu_is_a_clear_error(monkeypatch) -> None:
    fake_torch = types.ModuleType("torch")
    fake_torch.cuda = SimpleNamespace(is_available=lambda: False, device_count=lambda: 0)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    with pytest.raises(EngineUnavailableError, match=NO_GPU_MESSAGE):
        require_gpu()
    fake_torch.cuda = SimpleNamespace(is_available=lambda: True, device_count=lambda: 1)  # type: ignore[attr-defined]
    with pytest.raises(EngineUnavailableError, match="tensor_parallel_size is 2"):
        require_gpu(2)
    require_gpu(1)


def test_feature_detection_of_token_id_logprobs() -> None:
    class Old:
        __struct_fields__ = ("logprobs", "prompt_logprobs")

    class Transitional:  # vLLM 0.20: the field, but no num_logprobs
        __struct_fields__ = ("logprobs", "logprob_token_ids")

    class Current(Transitional):
        num_logprobs = property(lambda self: None)

    assert not supports_token_id_logprobs(Old)
    assert not supports_token_id_logprobs(Transitional)
    assert supports_token_id_logprobs(Current)


# ----------------------------------------------------------------------------------------------------------
# real vLLM objects (where vllm imports; no GPU needed)


def test_real_sampling_params_are_built_from_the_kwargs() -> None:
    vllm = pytest.importorskip("vllm", reason="vllm is not installed here")
    from vllm.sampling_params import StructuredOutputsParams

    assert supports_token_id_logprobs(vllm.SamplingParams)
    reads = make_sampling_params(sampling_kwargs(Call((1,), read_ids=(7, 8))), vllm)
    assert reads.logprob_token_ids == [7, 8] and reads.num_logprobs == 2 and reads.max_tokens == 1
    assert reads.temperature == 0.0 and not reads.skip_reading_prefix_cache  # reads use the prefix cache
    scoring = make_sampling_params(sampling_kwargs(Call((1, 7), prompt_scoring=True)), vllm)
    assert scoring.prompt_logprobs == 0 and scoring.skip_reading_prefix_cache  # ... prompt scoring cannot
    schema = {"type": "object", "properties": {"x": {"type": "string"}}, "required": ["x"]}
    generate = make_sampling_params(sampling_kwargs(Call((1,), schema=json.dumps(schema), max_tokens=32)), vllm)
    assert isinstance(generate.structured_outputs, StructuredOutputsParams)
    assert generate.structured_outputs.json == schema and generate.logprobs == 0 and generate.max_tokens == 32


def test_answer_schema_compiles_for_vllms_default_grammar_backend() -> None:
    vllm = pytest.importorskip("vllm", reason="vllm is not installed here")
    xgrammar = pytest.importorskip("xgrammar", reason="xgrammar is not installed here")
    from vllm.v1.structured_output.backend_xgrammar import validate_xgrammar_grammar

    from docroute.engines.scoring.prompts import answer_schema

    kinds = ["str", "int", "float", "decimal", "date", "datetime", "bool", "enum", "list[str]"]
    fields = [
        FieldSpec(name=f"f{i}", type=kind, values=["USD", "EUR"] if kind == "enum" else None)
        for i, kind in enumerate(kinds)
    ]
    schema = answer_schema(TaskSpec(extract=ExtractSpec(fields=fields)))
    params = make_sampling_params(sampling_kwargs(Call((1,), schema=json.dumps(schema), max_tokens=64)), vllm)
    validate_xgrammar_grammar(params)  # what vLLM checks before accepting the request
    assert xgrammar.Grammar.from_json_schema(json.dumps(schema)) is not None


def test_real_lora_request_and_logprob_type() -> None:
    pytest.importorskip("vllm", reason="vllm is not installed here")
    from vllm.logprobs import Logprob as VllmLogprob
    from vllm.lora.request import LoRARequest

    request = LoRARequest("adapter", 1, "/adapters/a")
    assert (request.lora_name, request.lora_int_id, request.lora_path) == ("adapter", 1, "/adapters/a")
    assert prompt_logprob_score([None, {3: VllmLogprob(-0.5, rank=1)}], 1, [3]) == pytest.approx(-0.5)


# ----------------------------------------------------------------------------------------------------------
# end to end on a GPU


def _gpu_skip_reason() -> str | None:
    try:
        import torch
        import vllm  # noqa: F401
    except Exception as exc:  # an import failure of any kind means: not here
        return f"needs vllm and torch ({exc})"
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    return None


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_skip_reason() is not None, reason=str(_gpu_skip_reason()))
def test_end_to_end_on_a_gpu() -> None:
    """A small instruct model (DOCROUTE_VLLM_TEST_MODEL: an HF id or a local path) classifies and extracts."""
    from docroute.engines.local.vllm import shared_runtime

    model = os.environ.get("DOCROUTE_VLLM_TEST_MODEL", "Qwen/Qwen2.5-0.5B-Instruct")
    spec = VllmSpec(model=model, max_model_len=4096, gpu_memory_utilization=0.4, max_input_tokens=1024)
    try:
        runtime = shared_runtime(spec)
    except EngineUnavailableError as exc:
        pytest.skip(f"cannot load {model} here: {exc}")
    task = TaskSpec(
        classify=ClassifySpec(
            labels=[
                LabelSpec(name="sports", examples=["The striker scored twice in the final."]),
                LabelSpec(name="weather", examples=["Heavy rain is expected tonight."]),
                LabelSpec(name="cooking", examples=["Simmer the sauce for ten minutes."]),
            ]
        ),
        extract=ExtractSpec(
            fields=[
                FieldSpec(name="invoice_date", type="date"),
                FieldSpec(name="total", type="decimal", description="the total amount due"),
                FieldSpec(name="currency", type="enum", values=["USD", "EUR", "GBP"]),
            ]
        ),
    )
    engine = VllmEngine(spec, task, runtime=runtime)
    assert engine.scoring == "token_ids"
    docs = [
        Request("w", "Snow storms will close mountain roads overnight."),
        Request("s", "The cyclist won the mountain stage of the tour."),
        Request("c", "Chop the carrots, add them to the pot and stir well."),
        Request("i", INVOICE),
    ]
    predictions = engine.predict(docs)
    assert all(p.ok for p in predictions), [p.error for p in predictions]
    assert [p.label for p in predictions[:3]] == ["weather", "sports", "cooking"]
    assert predictions[3].fields["invoice_date"] == date(2024, 3, 14)
    assert predictions[3].fields["currency"] == "USD"
    assert sum(p.usage.cached_tokens for p in predictions) > 0  # the shared prefix came from the prefix cache

    class PromptScoring:  # the same model through the prompt_logprobs route
        supports_token_ids = False

        def __getattr__(self, name: str) -> Any:
            return getattr(runtime, name)

    other = VllmEngine(spec, task, runtime=PromptScoring()).predict(docs[:3])
    for a, b in zip(predictions[:3], other, strict=True):
        assert a.label == b.label and a.label_confidence == pytest.approx(b.label_confidence, abs=0.05)

"""Classification by vectors whatever the small engine is: heads, zero-shot similarity, and the measured choice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_llamacpp_engine import TEST_TEXTS, TOPICS, _classify_task, _extract_task, _requests

from docroute.engines import build_small_engine
from docroute.engines.base import EngineUnavailableError, Request
from docroute.engines.local import llama_runtime
from docroute.engines.local.classifier import EncoderClassifier, SplitTaskEngine, classifier_of
from docroute.engines.local.classify_choice import ChoiceReason, ClassifyMethod, describe
from docroute.engines.local.head import LabelHead
from docroute.schemas.spec import (
    ClassifySpec,
    JobSpec,
    LabelSpec,
    LlamaCppSpec,
    OpenAICompatibleSmallSpec,
    TaskSpec,
    VllmSpec,
)

WORDLLAMA = "wordllama:l2_supercat_256"
GEMMA = "llamacpp:gemma-3-270m-q4_k_m.gguf"


def _accuracy(engine: EncoderClassifier | SplitTaskEngine) -> int:
    predictions = engine.predict(_requests(TEST_TEXTS))
    return sum(p.label == gold for p, (_, gold) in zip(predictions, TEST_TEXTS, strict=True))


@pytest.fixture
def no_language_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make loading any GGUF model fail: classification by the bundled encoder must not need one."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a language model was loaded for a job that classifies by the bundled encoder")

    monkeypatch.setattr(llama_runtime, "shared_runtime", refuse)


def test_a_head_over_the_bundled_encoder_needs_no_language_model(no_language_model: None) -> None:
    engine = build_small_engine(
        LlamaCppSpec(encoder="wordllama", classify_strategy="embedding_head"), _classify_task(with_examples=True)
    )
    assert isinstance(engine, EncoderClassifier) and engine.name == WORDLLAMA
    assert engine.classifier_choice is not None and engine.classifier_choice.reason == ChoiceReason.CONFIGURED
    assert engine.head.encoder == WORDLLAMA and engine.head.trained_on == 18
    assert engine.embed(["a text"]).shape == (1, 256)  # what `docroute train` fits heads on
    assert _accuracy(engine) >= 5
    for prediction in engine.predict(_requests(TEST_TEXTS)):
        assert prediction.ok and prediction.model == WORDLLAMA
        assert prediction.usage.input_tokens > 0 and not prediction.truncated and prediction.engine_seconds > 0


def test_auto_measures_each_encoder_and_keeps_the_cheapest_within_noise(runtime) -> None:
    engine = build_small_engine(LlamaCppSpec(), _classify_task(with_examples=True))
    choice = engine.classifier_choice
    assert choice is not None and choice.method == ClassifyMethod.EMBEDDING_HEAD
    assert choice.reason == ChoiceReason.CROSS_VALIDATED
    measured = {c.encoder: c for c in choice.candidates}
    assert set(measured) == {WORDLLAMA, GEMMA}
    for candidate in measured.values():
        assert candidate.examples == 18 and 0 <= candidate.cv_accuracy <= 1 and candidate.ms_per_text > 0
    assert measured[WORDLLAMA].ms_per_text < measured[GEMMA].ms_per_text
    best = max(c.cv_accuracy for c in measured.values())
    chosen = measured[choice.encoder]
    cheaper = [c for c in measured.values() if c.ms_per_text < chosen.ms_per_text]
    assert all(c.cv_accuracy < best - 0.01 for c in cheaper)  # a dearer encoder only when clearly better
    assert GEMMA in choice.why and WORDLLAMA in choice.why and choice.encoder in describe(choice)
    assert choice.to_json()["candidates"][0]["encoder"] in measured


def test_zero_shot_similarity_classifies_from_label_descriptions(no_language_model: None) -> None:
    engine = build_small_engine(LlamaCppSpec(), _classify_task(with_examples=False))
    assert isinstance(engine, EncoderClassifier) and engine.method == "similarity"
    choice = engine.classifier_choice
    assert choice is not None and choice.reason == ChoiceReason.TOO_FEW_EXAMPLES
    assert _accuracy(engine) >= 5
    probabilities = engine.head.predict_proba(engine.embed([text for text, _ in TEST_TEXTS]))
    assert np.allclose(probabilities.sum(axis=1), 1.0) and (probabilities.max(axis=1) < 0.999).all()


def test_similarity_fits_its_temperature_on_the_few_examples_it_has(no_language_model: None) -> None:
    few = TaskSpec(
        classify=ClassifySpec(
            labels=[
                LabelSpec(name=name, description=f"texts about {name}", examples=texts[:2])
                for name, texts in TOPICS.items()
            ]
        )
    )
    engine = build_small_engine(LlamaCppSpec(), few)
    assert isinstance(engine, EncoderClassifier) and engine.head.trained_on == 6
    assert "temperature fitted on 6 examples" in engine.classifier_choice.why
    assert _accuracy(engine) >= 5


def test_label_scoring_stays_with_the_language_model_when_asked(runtime) -> None:
    engine = build_small_engine(LlamaCppSpec(classify_strategy="label_scoring"), _classify_task(with_examples=True))
    assert classifier_of(engine) is None and engine.classifier_choice.method == ClassifyMethod.LABEL_SCORING


def test_classification_and_extraction_are_answered_together(runtime) -> None:
    task = _extract_task()
    task = task.model_copy(update={"classify": _classify_task(with_examples=True).classify})
    engine = build_small_engine(LlamaCppSpec(encoder="wordllama"), task)
    assert isinstance(engine, SplitTaskEngine) and engine.name == f"{GEMMA}+{WORDLLAMA}"
    [prediction] = engine.predict(_requests([("Invoice from Acme Ltd, total $12.00, bake the bread", "cooking")]))
    assert prediction.ok and prediction.label in TOPICS and prediction.label_confidence is not None
    assert prediction.fields and prediction.model == engine.name and prediction.usage.input_tokens > 0


@pytest.mark.parametrize(
    "small",
    [
        VllmSpec(model="Qwen/Qwen2.5-0.5B-Instruct", classify_strategy="embedding_head"),
        OpenAICompatibleSmallSpec(model="served", base_url="http://127.0.0.1:9/v1", classify_strategy="embedding_head"),
    ],
    ids=["vllm", "openai_compatible"],
)
def test_a_head_works_whatever_the_small_engine_is(small, no_language_model: None) -> None:
    engine = build_small_engine(small, _classify_task(with_examples=True))  # classify only: no model is started
    assert isinstance(engine, EncoderClassifier) and engine.encoder.name == WORDLLAMA
    assert _accuracy(engine) >= 5
    reused = build_small_engine(small, _classify_task(with_examples=True), head=engine.head)
    assert reused.classifier_choice.reason == ChoiceReason.PROMOTED_HEAD and _accuracy(reused) >= 5


def test_a_head_is_refused_by_an_encoder_it_was_not_trained_on(runtime) -> None:
    task = _classify_task(with_examples=True)
    wordllama = build_small_engine(LlamaCppSpec(encoder="wordllama"), task)
    gemma = build_small_engine(LlamaCppSpec(encoder="llamacpp"), task)
    assert isinstance(wordllama, EncoderClassifier) and isinstance(gemma, EncoderClassifier)
    assert gemma.head.encoder == GEMMA and wordllama.head.encoder == WORDLLAMA
    with pytest.raises(EngineUnavailableError, match=r"set small_model\.encoder"):  # a served encoder it cannot name
        build_small_engine(LlamaCppSpec(), task, head=_renamed(wordllama.head, "openai_compatible:other"))
    saved = LabelHead.from_bytes(wordllama.head.to_bytes())
    assert saved.encoder == WORDLLAMA
    reused = build_small_engine(LlamaCppSpec(encoder="llamacpp"), task, head=saved)  # the head names its encoder
    assert reused.name == WORDLLAMA and _accuracy(reused) >= 5
    legacy = _renamed(saved, "")  # saved before encoders had names: read with the GGUF model, whose width differs
    with pytest.raises(EngineUnavailableError, match="256-dimension"):
        build_small_engine(LlamaCppSpec(), task, head=legacy)
    with pytest.raises(EngineUnavailableError, match="other labels"):
        build_small_engine(
            LlamaCppSpec(),
            _classify_task(with_examples=False).model_copy(
                update={"classify": ClassifySpec(labels=[LabelSpec(name="x"), LabelSpec(name="y")])}
            ),
            head=saved,
        )


def _renamed(head: LabelHead, encoder: str) -> LabelHead:
    return LabelHead(head.labels, head.coef, head.intercept, head.trained_on, head.fingerprint, encoder)


def test_a_paid_encoder_is_priced_per_token_in_the_small_cost() -> None:
    def job(encoder: object) -> JobSpec:
        small = {"engine": "llamacpp", "usd_per_hour": 3.6} | ({"encoder": encoder} if encoder else {})
        return JobSpec.model_validate(
            {
                "name": "t",
                "source": {"url": "memory://docs"},
                "output": {"url": "memory://out"},
                "task": {"classify": {"labels": [{"name": "a"}, {"name": "b"}]}},
                "small_model": small,
            },
            context={"env": {"OPENAI_API_KEY": "sk-test-secret-123456"}},
        )

    paid = job({"kind": "openai_compatible", "model": "text-embedding-3-small"})
    served = job({"kind": "openai_compatible", "model": "bge", "base_url": "http://127.0.0.1:9/v1"})
    assert paid.small_cost_usd(1.0, 1_000_000) == pytest.approx(0.001 + 0.02)  # 1 s at $3.6/h + 1M tokens
    assert served.small_cost_usd(1.0, 1_000_000) == pytest.approx(0.001)  # self-hosted: compute only
    assert job("wordllama").small_cost_usd(1.0, 1_000_000) == pytest.approx(0.001)
    assert "sk-test-secret" not in json.dumps(paid.redacted())
    with pytest.raises(ValueError, match="no price known"):
        job({"kind": "openai_compatible", "model": "unknown-embedder"})


def test_rankers_answer_the_fields_from_worked_examples_without_a_language_model(
    no_language_model: None, tmp_path: Path
) -> None:
    from test_ranker import SPEC, receipts

    from docroute.engines.extract.extractor import ExtractMethod, RankerExtractor, plan_extraction
    from docroute.schemas.compare import values_match
    from docroute.tasks.ingest.examples import load_extraction_examples

    path = tmp_path / "receipts.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        for text, values in receipts(seed=1, count=40):
            handle.write(json.dumps({"text": text, "values": values}, default=str) + "\n")
    extract = SPEC.model_copy(update={"examples_file": str(path)})
    examples = load_extraction_examples(extract)
    task = TaskSpec(extract=extract, classify=_classify_task(with_examples=True).classify)
    engine = build_small_engine(LlamaCppSpec(encoder="wordllama"), task, extract_examples=examples)
    assert isinstance(engine, SplitTaskEngine) and any(isinstance(p, RankerExtractor) for p in engine.parts)
    assert (
        engine.extraction_choice.method == ExtractMethod.RANKER and "40 worked examples" in engine.extraction_choice.why
    )
    unseen = receipts(seed=99, count=30)
    predictions = engine.predict([Request(str(i), text) for i, (text, _) in enumerate(unseen)])
    for field in ("company", "date", "total"):
        right = sum(
            values_match(SPEC.field(field), p.fields[field], gold[field])
            for p, (_, gold) in zip(predictions, unseen, strict=True)
        )
        assert right >= 24, (field, right)  # 80% of unseen layouts
    for prediction in predictions:
        assert prediction.ok and prediction.label in TOPICS and prediction.model == engine.name
        assert all(0 <= c <= 1 for c in prediction.field_confidences.values() if c is not None)
    never, _ = plan_extraction(LlamaCppSpec(extract_ranker="never"), extract, examples)
    too_few, _ = plan_extraction(LlamaCppSpec(), extract, examples[:5])
    assert never.method == too_few.method == ExtractMethod.MODEL and "5 worked examples" in too_few.why


def test_a_measured_choice_is_reused_without_measuring_or_loading_the_losers(
    runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    from docroute.engines.local import classify_choice
    from docroute.engines.local.classify_choice import CandidateScore, ClassifierChoice, measurement_key

    task = _classify_task(with_examples=True)
    assert task.classify is not None
    measured = ClassifierChoice(
        ClassifyMethod.EMBEDDING_HEAD,
        ChoiceReason.CROSS_VALIDATED,
        f"head over {WORDLLAMA}: measured",
        WORDLLAMA,
        (CandidateScore(WORDLLAMA, 18, 0.9, 0.3, 0.1), CandidateScore(GEMMA, 18, 0.7, 0.8, 30.0)),
    )
    assert ClassifierChoice.from_json(json.loads(json.dumps(measured.to_json()))) == measured
    built: list[object] = []
    real = classify_choice.build_encoder
    monkeypatch.setattr(
        classify_choice, "build_encoder", lambda choice, small: built.append(choice) or real(choice, small)
    )
    engine = build_small_engine(LlamaCppSpec(), task, measured=measured)
    choice = engine.classifier_choice
    assert built == ["wordllama"]  # only the winner: the measurement is not run again
    assert choice.encoder == WORDLLAMA and choice.reason == ChoiceReason.CROSS_VALIDATED and "reused" in choice.why
    assert choice.candidates == measured.candidates and isinstance(engine, EncoderClassifier)
    assert engine.head.trained_on == 18 and _accuracy(engine) >= 5

    small = LlamaCppSpec()
    key = measurement_key(small, task.classify)
    assert key is not None and key == measurement_key(LlamaCppSpec(n_threads=1), task.classify)
    fewer = task.classify.model_copy(
        update={
            "labels": [label.model_copy(update={"examples": label.examples[:-1]}) for label in task.classify.labels]
        }
    )
    assert measurement_key(small, fewer) not in (None, key)  # other examples: measured afresh
    assert measurement_key(LlamaCppSpec(encoder="wordllama"), task.classify) is None  # one candidate: no race
    assert measurement_key(LlamaCppSpec(classify_strategy="label_scoring"), task.classify) is None


def test_the_first_build_stores_its_choice_and_later_builds_read_it(runtime, tmp_path: Path) -> None:
    from docroute.tasks.model import infer
    from docroute.tasks.model.classifier_choices import load_choice

    task = _classify_task(with_examples=True)
    spec = JobSpec.model_validate(
        {
            "name": "choice",
            "source": {"url": str(tmp_path / "docs")},
            "task": task.model_dump(mode="json"),
            "output": {"url": str(tmp_path / "out")},
        }
    )
    first = infer.small_engine(spec)
    stored = list((tmp_path / "out" / "heads").glob("choice-*.json"))
    assert len(stored) == 1 and first.classifier_choice is not None and first.classifier_choice.candidates
    key = stored[0].stem.removeprefix("choice-")
    assert load_choice(spec, key) == first.classifier_choice
    infer._ENGINES.clear()  # a new worker process
    second = infer.small_engine(spec)
    assert (
        second.classifier_choice.encoder == first.classifier_choice.encoder and "reused" in second.classifier_choice.why
    )
    assert infer.settle_classifier_choice(spec, None) == first.classifier_choice  # a distributed run finds it too
    stored[0].write_text("{not json", encoding="utf-8")
    assert load_choice(spec, key) is None  # damaged: measured again rather than trusted
    infer._ENGINES.clear()

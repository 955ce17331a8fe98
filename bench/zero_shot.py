"""Zero-shot classification on BANKING77: does combining label-description similarity with label scoring help?

    python bench/zero_shot.py [--labels 77 10 --documents 180 100 --seed 0]

Reads `../shared/datasets/banking77` (never copied into the repository). No labeled examples reach the job: each
intent is named only (`card_arrival` reads as "card arrival"), exactly as bench/routing_economics.py builds the
BANKING77 job, with its instructions line. For every document of a fixed, seeded sample it takes the full
probability vector over the labels from

* similarity: `build_small_engine` with `classify_strategy: similarity`, `encoder: wordllama` (the engine's own
  zero-shot head, softmax(cosine / T), T = SIMILARITY_TEMPERATURE);
* label scoring: `build_small_engine` with `classify_strategy: label_scoring` (the packaged Gemma 3 270M under
  llama.cpp, contextual calibration on content-free input), read through the engine's own scoring steps;

and from fixed combination rules that need no labels: the product of the two (a product of experts), their
geometric mean and their arithmetic mean (each renormalised). It reports accuracy, expected calibration error,
the accuracy of the most confident 25% and 50% of rows (what a router keeps), the AUROC of confidence against
correctness and the seconds per document; then each combination's gain over the best single signal with a
bootstrap 95% interval over documents. `--labels 10` draws a seeded subset of intents (and documents of those
intents only), which makes label scoring cheaper. Writes bench/results/zero_shot/results.md and results.json; does
not touch BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from memory_flat import machine  # bench/memory_flat.py
from publish import machine_line  # bench/publish.py

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "datasets" / "banking77"
RESULTS = ROOT / "bench" / "results" / "zero_shot"
INSTRUCTIONS = "Messages sent by customers of an online bank."  # as bench/routing_economics.py
ECE_BINS = 15
BOOTSTRAP = 2000


def sample(labels_wanted: int, documents: int, seed: int) -> tuple[list[str], list[dict[str, str]]]:
    """The intents (all 77, or a seeded subset kept in the dataset's order) and a seeded sample of their messages."""
    names = json.loads((SHARED / "categories.json").read_text())
    if labels_wanted < len(names):
        chosen = set(random.Random(seed).sample(names, labels_wanted))
        names = [name for name in names if name in chosen]
    rows = [r for r in csv.DictReader((SHARED / "train.csv").open(encoding="utf-8")) if r["category"] in names]
    random.Random(seed).shuffle(rows)
    if len(rows) < documents:
        raise SystemExit(f"only {len(rows)} messages for these {len(names)} intents")
    return names, rows[:documents]


def build_engines(names: Sequence[str]) -> tuple[Any, Any]:
    """The project's own engines: zero-shot similarity over WordLlama, and llama.cpp label scoring."""
    from docroute.engines import build_small_engine
    from docroute.engines.local.classifier import EncoderClassifier
    from docroute.engines.local.llamacpp import LlamaCppEngine
    from docroute.schemas.spec import ClassifySpec, LabelSpec, LlamaCppSpec, TaskSpec

    task = TaskSpec(instructions=INSTRUCTIONS, classify=ClassifySpec(labels=[LabelSpec(name=n) for n in names]))
    similarity = build_small_engine(LlamaCppSpec(classify_strategy="similarity", encoder="wordllama"), task)
    scoring = build_small_engine(LlamaCppSpec(classify_strategy="label_scoring"), task)
    assert isinstance(similarity, EncoderClassifier) and isinstance(scoring, LlamaCppEngine)
    return similarity, scoring


def similarity_probabilities(engine: Any, texts: Sequence[str]) -> tuple[np.ndarray, float]:
    """What `EncoderClassifier.predict` computes, kept as the whole vector; and seconds per document."""
    started = time.perf_counter()
    probabilities = engine.head.predict_proba(engine.encoder.encode(list(texts)).vectors)
    return np.asarray(probabilities, dtype=np.float64), (time.perf_counter() - started) / len(texts)


def scoring_probabilities(engine: Any, text: str) -> np.ndarray:
    """The steps of `LlamaCppEngine._classify` (content-free calibration), kept as the whole vector."""
    from docroute.engines.scoring import fewshot
    from docroute.engines.scoring.confidence import contextual_calibration, softmax

    nodes = sum(len(tokens) for tokens in engine._label_tokens)
    doc = engine._document_tokens(fewshot.classify_document(text), len(engine._classify_prefix), nodes)
    probabilities = softmax(engine._score_labels(text, doc.tokens))
    if engine._label_prior is not None:
        probabilities = contextual_calibration(probabilities, engine._label_prior)
    return probabilities


def check_same_as_engine(engine: Any, names: Sequence[str], texts: Sequence[str], probabilities: np.ndarray) -> None:
    """The vectors read here must give exactly what the engine's own `predict` answers."""
    from docroute.engines.base import Request

    predictions = engine.predict([Request(id=str(i), text=text) for i, text in enumerate(texts)])
    for prediction, row in zip(predictions, probabilities, strict=True):
        assert prediction.label == names[int(np.argmax(row))], (prediction.label, names[int(np.argmax(row))])
        assert abs(prediction.label_confidence - float(row.max())) < 1e-6


def normalise(matrix: np.ndarray) -> np.ndarray:
    return matrix / matrix.sum(axis=1, keepdims=True)


COMBINATIONS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "product (PoE)": lambda a, b: normalise(a * b),
    "geometric mean": lambda a, b: normalise(np.sqrt(a * b)),
    "arithmetic mean": lambda a, b: normalise((a + b) / 2),
}


def confident_accuracy(confidence: np.ndarray, correct: np.ndarray, share: float) -> float:
    """Accuracy of the `share` most confident rows (ties broken by row order, stably)."""
    keep = max(1, round(share * len(correct)))
    order = np.argsort(-confidence, kind="stable")[:keep]
    return float(correct[order].mean())


def ece(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error of the top-label confidence, equal-width bins."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            total += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(total)


def auroc(confidence: np.ndarray, correct: np.ndarray) -> float:
    """P(a right row is more confident than a wrong one), ties counted half (Mann-Whitney)."""
    right, wrong = confidence[correct], confidence[~correct]
    if not len(right) or not len(wrong):
        return float("nan")
    greater = (right[:, None] > wrong[None, :]).sum()
    ties = (right[:, None] == wrong[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(right) * len(wrong)))


@dataclass
class Scores:
    signal: str
    accuracy: float
    ece: float
    top25_accuracy: float
    top50_accuracy: float
    auroc: float
    seconds_per_doc: float


def score(signal: str, probabilities: np.ndarray, gold: np.ndarray, seconds: float) -> Scores:
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == gold
    return Scores(
        signal,
        float(correct.mean()),
        ece(confidence, correct),
        confident_accuracy(confidence, correct, 0.25),
        confident_accuracy(confidence, correct, 0.5),
        auroc(confidence, correct),
        seconds,
    )


def bootstrap_gain(
    combined: np.ndarray, single: np.ndarray, gold: np.ndarray, seed: int
) -> dict[str, tuple[float, float, float]]:
    """Gain of `combined` over `single` in accuracy and confident-half accuracy: point and 95% interval."""
    rng = np.random.default_rng(seed)
    conf_c, right_c = combined.max(axis=1), combined.argmax(axis=1) == gold
    conf_s, right_s = single.max(axis=1), single.argmax(axis=1) == gold
    accuracy, half = [], []
    for _ in range(BOOTSTRAP):
        rows = rng.integers(0, len(gold), len(gold))
        accuracy.append(right_c[rows].mean() - right_s[rows].mean())
        half.append(
            confident_accuracy(conf_c[rows], right_c[rows], 0.5) - confident_accuracy(conf_s[rows], right_s[rows], 0.5)
        )
    point_accuracy = float(right_c.mean() - right_s.mean())
    point_half = confident_accuracy(conf_c, right_c, 0.5) - confident_accuracy(conf_s, right_s, 0.5)
    return {
        "accuracy": (point_accuracy, *map(float, np.percentile(accuracy, [2.5, 97.5]))),
        "top50_accuracy": (point_half, *map(float, np.percentile(half, [2.5, 97.5]))),
    }


def run_setting(labels_wanted: int, documents: int, seed: int) -> dict[str, Any]:
    names, rows = sample(labels_wanted, documents, seed)
    texts = [row["text"] for row in rows]
    gold = np.array([names.index(row["category"]) for row in rows])
    started = time.perf_counter()
    similarity, scoring = build_engines(names)
    setup = time.perf_counter() - started
    print(f"{len(names)} intents, {len(rows)} messages: engines ready in {setup:.1f} s", flush=True)

    p_similarity, similarity_seconds = similarity_probabilities(similarity, texts)
    rows_scored = []
    started = time.perf_counter()
    for i, text in enumerate(texts, start=1):
        rows_scored.append(scoring_probabilities(scoring, text))
        if i % 25 == 0 or i == len(texts):
            elapsed = time.perf_counter() - started
            print(f"  label scoring {i}/{len(texts)}: {elapsed / i:.2f} s per message", flush=True)
    scoring_seconds = (time.perf_counter() - started) / len(texts)
    p_scoring = np.vstack(rows_scored)
    check = min(3, len(texts))  # the vectors read here answer what the engines themselves answer
    check_same_as_engine(similarity, names, texts[:check], p_similarity[:check])
    check_same_as_engine(scoring, names, texts[:check], p_scoring[:check])

    signals = {
        "similarity (wordllama)": (p_similarity, similarity_seconds),
        "label scoring": (p_scoring, scoring_seconds),
    }
    for rule, combine in COMBINATIONS.items():
        signals[rule] = (combine(p_similarity, p_scoring), similarity_seconds + scoring_seconds)
    table = [score(name, probabilities, gold, seconds) for name, (probabilities, seconds) in signals.items()]
    singles = table[:2]
    best = max(singles, key=lambda s: (s.accuracy, s.top50_accuracy))
    gains = {rule: bootstrap_gain(signals[rule][0], signals[best.signal][0], gold, seed) for rule in COMBINATIONS}
    helps = {rule: gain["accuracy"][1] > 0 and gain["top50_accuracy"][1] > 0 for rule, gain in gains.items()}
    return {
        "labels": len(names),
        "documents": len(rows),
        "intents": names,
        "setup_seconds": setup,
        "scores": [asdict(s) for s in table],
        "best_single": best.signal,
        "gains_over_best_single": gains,
        "measurably_helps": helps,
    }


def _milliseconds(seconds: float) -> str:
    ms = 1000 * seconds
    return f"{ms:,.0f}" if ms >= 10 else f"{ms:.3f}"


def markdown(settings: Sequence[dict[str, Any]], machine_sentence: str) -> str:
    lines = [
        machine_sentence,
        'Zero-shot: intent names only (`card_arrival` → "card arrival"), no examples; similarity = WordLlama '
        "softmax(cos/0.06); label scoring = Gemma 3 270M Q4_K_M under llama.cpp, content-free calibration. "
        "Top 25% / top 50% = accuracy of the most confident quarter / half of rows; AUROC of top-label confidence "
        "against correctness; ms per document on this machine (combinations pay both signals).",
        "",
        "| intents | docs | signal | accuracy | ECE | top 25% acc | top 50% acc | AUROC | ms/doc |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for setting in settings:
        for s in setting["scores"]:
            lines.append(
                f"| {setting['labels']} | {setting['documents']} | {s['signal']} | {s['accuracy']:.3f} "
                f"| {s['ece']:.3f} | {s['top25_accuracy']:.3f} | {s['top50_accuracy']:.3f} | {s['auroc']:.3f} "
                f"| {_milliseconds(s['seconds_per_doc'])} |"
            )
    lines += [
        "",
        "Gain over the best single signal (bootstrap 95% interval over documents, "
        f"{BOOTSTRAP} resamples); helps = both lower bounds above 0.",
        "",
        "| intents | rule | vs | Δ accuracy [95% CI] | Δ top 50% acc [95% CI] | helps |",
        "|---:|---|---|---|---|---|",
    ]
    for setting in settings:
        for rule, gain in setting["gains_over_best_single"].items():
            a, h = gain["accuracy"], gain["top50_accuracy"]
            lines.append(
                f"| {setting['labels']} | {rule} | {setting['best_single']} | {a[0]:+.3f} [{a[1]:+.3f}, {a[2]:+.3f}] "
                f"| {h[0]:+.3f} [{h[1]:+.3f}, {h[2]:+.3f}] | {'yes' if setting['measurably_helps'][rule] else 'no'} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--labels", type=int, nargs="+", default=[77, 10], help="intents per setting (77 = all)")
    parser.add_argument("--documents", type=int, nargs="+", default=[180, 100], help="messages per setting")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for results.md and results.json")
    options = parser.parse_args(argv)
    if len(options.labels) != len(options.documents):
        parser.error("--labels and --documents pair up: give as many of each")
    if not SHARED.exists():
        raise SystemExit(f"{SHARED} not found: this benchmark needs the shared BANKING77 data")
    started = time.perf_counter()
    settings = [
        run_setting(labels, documents, options.seed)
        for labels, documents in zip(options.labels, options.documents, strict=True)
    ]
    wall = time.perf_counter() - started
    info = machine()
    command = "python bench/zero_shot.py " + " ".join(argv if argv is not None else sys.argv[1:])
    table = markdown(settings, machine_line(info, command.strip())) + f"\nWall time: {wall:.0f} s.\n"
    print()
    print(table)
    options.results.mkdir(parents=True, exist_ok=True)
    (options.results / "results.md").write_text(
        f"# Zero-shot: similarity, label scoring and their combinations · banking77\n\n{table}", encoding="utf-8"
    )
    payload = {"machine": info, "command": command.strip(), "wall_seconds": wall, "settings": settings}
    (options.results / "results.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

"""From harvested frontier labels to a training set, an unbiased held-out set and a promotion decision.

Held-out rows are the labels of the *audit sample* (tasks/route.in_audit_sample): a fixed share of document ids,
drawn by hash, every one of which gets a frontier answer whatever the small model's confidence (escalated when
unsure, audited when sure). That makes the held-out set a random sample of the documents the job sees, which is what
a certificate needs; escalated rows alone are the hard cases and would certify nothing about the rest. Every other
label trains. A document's membership never changes, so a held-out document is never trained on in any round.
Labels are deduplicated by content hash (the latest answer wins), and a training text equal to a held-out text is
dropped, so the held-out score is not inflated by copies.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from docroute.engines.scoring.prompts import chat_messages
from docroute.schemas.errors import InputError
from docroute.schemas.spec import JobSpec
from docroute.schemas.values import to_json_value
from docroute.tasks.learn.embeddings import text_key
from docroute.tasks.learn.harvest import answer_columns
from docroute.tasks.route.certify import Certificate, certify_parts
from docroute.tasks.route.decide import in_audit_sample

_NEEDED = ["doc_id", "content_sha256", "processed_at", "text", "kind", "model"]


class TrainingDataError(InputError, ValueError):
    """The labels cannot support a training round; the message says what is missing."""


def read_harvested_labels(spec: JobSpec) -> pl.DataFrame:
    """Every label file under `<output>/labels/`, one frame (empty with the right columns when there are none)."""
    columns = _NEEDED + answer_columns(spec)
    fs, root = url_to_fs(spec.output.layout.labels_dir(), **spec.output.fsspec_options())
    files = sorted(fs.glob(f"{root}/**/*.parquet")) if fs.exists(root) else []
    frames = []
    for file in files:
        with fs.open(file, "rb") as handle:
            table = pq.read_table(handle)
        present = [c for c in columns if c in table.column_names]
        frames.append(pl.from_arrow(table.select(present)))
    if not frames:
        return pl.DataFrame(schema={c: pl.String for c in columns})
    frame = pl.concat(frames, how="diagonal_relaxed")
    for column in columns:
        if column not in frame.columns:
            frame = frame.with_columns(pl.lit(None, pl.String).alias(column))
    return frame.select(columns)


def latest_per_document(frame: pl.DataFrame, parts: Sequence[str]) -> pl.DataFrame:
    """One label per distinct content (the latest answer), keeping only rows with text and every part answered."""
    usable = frame.filter(pl.col("text").is_not_null() & (pl.col("text").str.len_chars() > 0))
    for part in parts:
        usable = usable.filter(pl.col(part).is_not_null())
    usable = usable.with_columns(
        pl.coalesce(pl.col("content_sha256"), pl.col("text").map_elements(text_key, return_dtype=pl.String)).alias(
            "_content"
        )
    )
    return usable.sort("processed_at", nulls_last=False).unique(subset="_content", keep="last", maintain_order=True)


@dataclass(frozen=True)
class TrainingSplit:
    """What one round trains on and certifies on, with the counts its report shows."""

    train: list[tuple[str, dict[str, object]]]  # (text, answers) from the harvested labels
    holdout: list[tuple[str, dict[str, object]]]
    harvested: int  # label rows read
    distinct: int  # after deduplication
    dropped_as_copies: int  # training texts equal to a held-out text
    unknown_labels: int = 0  # answers naming a label the job no longer defines


def split_labels(spec: JobSpec, frame: pl.DataFrame) -> TrainingSplit:
    """Split deduplicated labels into training and held-out (the audit sample), as (text, answers) pairs."""
    parts = answer_columns(spec)
    classify = spec.task.classify
    distinct = latest_per_document(frame, ["label"] if classify is not None else [])
    unknown = 0
    if classify is not None:  # labels answered under an earlier label set the job no longer has
        known = distinct.filter(pl.col("label").cast(pl.String).is_in(classify.label_names))
        unknown, distinct = distinct.height - known.height, known
    fraction = spec.routing.audit_fraction
    in_holdout = [in_audit_sample(doc_id, fraction) for doc_id in distinct["doc_id"].to_list()]
    records = distinct.select(["text", *parts]).to_dicts()
    holdout = [(r["text"], {p: r[p] for p in parts}) for r, held in zip(records, in_holdout, strict=True) if held]
    held_texts = {text_key(text) for text, _ in holdout}
    train_all = [(r["text"], {p: r[p] for p in parts}) for r, held in zip(records, in_holdout, strict=True) if not held]
    train = [(text, answers) for text, answers in train_all if text_key(text) not in held_texts]
    return TrainingSplit(train, holdout, frame.height, distinct.height, len(train_all) - len(train), unknown)


@dataclass(frozen=True)
class HeadComparison:
    """The current and the candidate classifier certified on the same held-out rows at the same target."""

    current: Certificate
    candidate: Certificate
    current_accuracy: float
    candidate_accuracy: float

    @property
    def promote(self) -> bool:
        return self.candidate.escalation_rate < self.current.escalation_rate

    @property
    def reason(self) -> str:
        verdict = "promoted" if self.promote else "kept the current head"
        return (
            f"{verdict}: certified escalation {self.candidate.escalation_rate:.1%} (candidate) vs "
            f"{self.current.escalation_rate:.1%} (current) on {self.current.n} held-out documents at accuracy "
            f"≥ {self.current.target_accuracy:.3f}"
        )


def compare_heads(
    spec: JobSpec,
    gold: Sequence[str],
    current: tuple[Sequence[str], Sequence[float]],
    candidate: tuple[Sequence[str], Sequence[float]],
) -> HeadComparison:
    """Certify both classifiers' label answers on the held-out rows, each at delta/2.

    Choosing the better of two certified thresholds on one sample is a selection; certifying each at delta/2 makes
    both statements hold together with probability ≥ 1 − delta (union bound), so whichever is kept is covered.
    """
    delta = spec.routing.delta / 2
    certificates: dict[str, Certificate] = {}
    accuracy: dict[str, float] = {}
    for name, (labels, confidence) in (("current", current), ("candidate", candidate)):
        correct = np.array([a == g for a, g in zip(labels, gold, strict=True)], dtype=bool)
        confidences = np.asarray(confidence, dtype=np.float64)
        certificates[name] = certify_parts(
            {"label": (confidences, correct)},
            target_accuracy=spec.routing.target_accuracy,
            delta=delta,
            procedure=spec.routing.certification,
            guarantee=spec.routing.guarantee,
        )["label"]
        accuracy[name] = float(correct.mean()) if len(correct) else 0.0
    return HeadComparison(
        certificates["current"], certificates["candidate"], accuracy["current"], accuracy["candidate"]
    )


def finetune_lines(spec: JobSpec, rows: Sequence[tuple[str, Mapping[str, object]]]) -> list[str]:
    """Chat-format fine-tuning lines: the frontier's own prompt for the document, and its answer as the reply.

    The same messages the frontier saw, so a model tuned on them learns the job's format and answers; the reply is
    the answer object the response schema asks for, values in their canonical JSON form.
    """
    lines = []
    for text, answers in rows:
        reply = {part: to_json_value(value) for part, value in answers.items()}
        messages = [
            *chat_messages(spec.task, text),
            {"role": "assistant", "content": json.dumps(reply, ensure_ascii=False, default=str)},
        ]
        lines.append(json.dumps({"messages": messages}, ensure_ascii=False))
    return lines


@dataclass(frozen=True)
class ExtractorComparison:
    """The current and the candidate field answers certified per required field on the same held-out rows.

    A row is escalated when any required field falls below its certified threshold (or has none), so the rates
    compared are the share of rows each extractor would send to the frontier, as a run routes them.
    """

    current: dict[str, Certificate]
    candidate: dict[str, Certificate]
    current_escalation: float
    candidate_escalation: float
    current_accuracy: float
    candidate_accuracy: float
    n: int

    @property
    def promote(self) -> bool:
        return self.candidate_escalation < self.current_escalation

    @property
    def reason(self) -> str:
        verdict = "promoted the rankers" if self.promote else "kept the current extractor"
        return (
            f"{verdict}: certified escalation {self.candidate_escalation:.1%} (candidate) vs "
            f"{self.current_escalation:.1%} (current) on {self.n} held-out documents"
        )


def compare_extractors(
    spec: JobSpec,
    fields: Sequence[str],
    gold: Sequence[Mapping[str, object]],
    current: Sequence[tuple[Mapping[str, object], Mapping[str, float | None]] | None],
    candidate: Sequence[tuple[Mapping[str, object], Mapping[str, float | None]] | None],
) -> ExtractorComparison:
    """Certify both extractors' fields at delta/2 each (a union bound covers whichever is kept), as compare_heads.

    `current`/`candidate` hold per row (values, confidences), or None where the extractor failed on the row.
    """
    from docroute.schemas.compare import values_match

    assert spec.task.extract is not None
    results: dict[str, tuple[dict[str, Certificate], float, float]] = {}
    for name, answers in (("current", current), ("candidate", candidate)):
        parts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for field in fields:
            spec_field = spec.task.extract.field(field)
            confidence = np.array(
                [
                    float("nan") if a is None or a[1].get(field) is None else float(a[1][field])  # type: ignore[arg-type]
                    for a in answers
                ]
            )
            correct = np.array(
                [
                    a is not None and values_match(spec_field, a[0].get(field), g.get(field))
                    for a, g in zip(answers, gold, strict=True)
                ],
                dtype=bool,
            )
            parts[field] = (np.nan_to_num(confidence, nan=-1.0), correct)
        certificates = certify_parts(
            parts,
            target_accuracy=spec.routing.target_accuracy,
            delta=spec.routing.delta / 2,
            procedure=spec.routing.certification,
            guarantee=spec.routing.guarantee,
            unit=spec.routing.guarantee_unit,
        )
        escalated = np.zeros(len(gold), dtype=bool)
        all_right = np.ones(len(gold), dtype=bool)
        for field, (confidence, correct) in parts.items():
            threshold = certificates[field].threshold
            escalated |= np.ones(len(gold), dtype=bool) if threshold is None else confidence < threshold
            all_right &= correct
        results[name] = (
            certificates,
            float(escalated.mean()) if len(gold) else 1.0,
            float(all_right.mean()) if len(gold) else 0.0,
        )
    return ExtractorComparison(
        current=results["current"][0],
        candidate=results["candidate"][0],
        current_escalation=results["current"][1],
        candidate_escalation=results["candidate"][1],
        current_accuracy=results["current"][2],
        candidate_accuracy=results["candidate"][2],
        n=len(gold),
    )

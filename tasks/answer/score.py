"""Answer labeled documents with the small model (and optionally the frontier) and mark each part right or wrong.

Calibration and evaluation need the same thing: for every labeled document, each part's confidence and whether the
answer matches the gold value (compared by type, schemas/compare.py). One Prefect task per shard, as in a run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from docroute.engines.base import Prediction, Request
from docroute.schemas.compare import label_match, values_match
from docroute.schemas.documents import Shard
from docroute.schemas.spec import JobSpec
from docroute.tasks.answer.budget import run_budget
from docroute.tasks.answer.escalate import escalate
from docroute.tasks.ingest.page_images import page_images
from docroute.tasks.ingest.read import read_documents
from docroute.tasks.model.infer import frontier_engine, run_engine, small_engine
from docroute.tasks.route.decide import part_confidence


@dataclass(frozen=True)
class ScoredDocument:
    """One labeled document's small-model answer (and frontier answer, when asked), or why it had none."""

    doc_id: str
    uri: str
    record_key: str | None
    input_chars: int
    small: Prediction | None
    frontier: Prediction | None = None
    frontier_cost_usd: float = 0.0
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@task(name="score-shard", retries=2, retry_delay_seconds=[2, 15], cache_policy=NO_CACHE)
def score_shard(
    spec: JobSpec,
    shard: Shard,
    wanted: frozenset[str] | None,
    frontier_run_id: str | None,
    head_version: str | None = None,
) -> list[ScoredDocument]:
    """Read a shard, keep the wanted documents, answer them with the small model and, when `frontier_run_id` names
    a run (whose budget the calls draw on), with the frontier too."""
    documents = [d for d in read_documents(spec.source, shard.refs) if wanted is None or d.doc_id in wanted]
    readable = [d for d in documents if d.ok]
    requests = [Request(d.doc_id, d.text or "", d.lines, page_images(spec, d)) for d in readable]
    small = {p.id: p for p in run_engine(small_engine(spec, head_version), requests)}
    frontier: dict[str, Any] = {}
    engine = frontier_engine(spec) if frontier_run_id is not None else None
    if engine is not None and spec.frontier is not None and frontier_run_id is not None:
        budget = run_budget(frontier_run_id, spec.routing.max_frontier_usd)
        frontier = escalate(engine, requests, budget, spec.frontier.unit_price)
    scored = []
    for doc in documents:
        if not doc.ok:
            scored.append(ScoredDocument(doc.doc_id, doc.uri, doc.record_key, 0, None, error=doc.error))
            continue
        outcome = frontier.get(doc.doc_id)
        scored.append(
            ScoredDocument(
                doc.doc_id,
                doc.uri,
                doc.record_key,
                len(doc.text or ""),
                small[doc.doc_id],
                outcome.prediction if outcome is not None else None,
                outcome.cost_usd if outcome is not None else 0.0,
            )
        )
    return scored


def answers_of(prediction: Prediction) -> dict[str, Any]:
    """A prediction as gold-style answers (for the frontier acting as the oracle)."""
    answers: dict[str, Any] = dict(prediction.fields)
    if prediction.label is not None:
        answers["label"] = prediction.label
    return answers


def part_correct(spec: JobSpec, part: str, prediction: Prediction | None, gold: Mapping[str, Any]) -> bool:
    """Whether a prediction got one part right (an unreadable document or a failed answer never is)."""
    if prediction is None or not prediction.ok:
        return False
    if part == "label":
        assert spec.task.classify is not None
        return label_match(spec.task.classify.label_names, prediction.label, gold.get("label"))
    assert spec.task.extract is not None
    return values_match(spec.task.extract.field(part), prediction.fields.get(part), gold.get(part))


@dataclass(frozen=True)
class Aligned:
    """Every required part's confidence and correctness over the documents labeled for all of them."""

    scored: list[ScoredDocument]
    confidence: dict[str, np.ndarray]
    correct: dict[str, np.ndarray]
    frontier_correct: dict[str, np.ndarray] | None


def align(
    spec: JobSpec, parts: Sequence[str], scored: Sequence[ScoredDocument], gold: Mapping[str, Mapping[str, Any]]
) -> Aligned:
    """Keep the documents that have a gold value for every part, and build aligned arrays for each part."""
    rows = [s for s in scored if s.doc_id in gold and all(p in gold[s.doc_id] for p in parts)]
    arrays = {part: part_arrays(spec, part, rows, gold) for part in parts}
    frontier = None
    if rows and all(a.frontier_correct is not None for a in arrays.values()):
        frontier = {part: a.frontier_correct for part, a in arrays.items() if a.frontier_correct is not None}
    return Aligned(
        rows,
        {part: a.confidence for part, a in arrays.items()},
        {part: a.correct for part, a in arrays.items()},
        frontier,
    )


@dataclass(frozen=True)
class PartArrays:
    """Aligned arrays for one part over the documents that have a gold value for it."""

    doc_ids: list[str]
    confidence: np.ndarray
    correct: np.ndarray
    frontier_correct: np.ndarray | None


def documents_with_every_part(parts: Mapping[str, PartArrays]) -> dict[str, PartArrays]:
    """The parts restricted to the documents that have a gold value for every part, in one shared order.

    Whole-document certification compares a document's parts row by row; a document missing one part's gold
    answer cannot be judged right or wrong as a whole, so it is left out of every part.
    """
    if not parts:
        return {}
    common = set.intersection(*(set(arrays.doc_ids) for arrays in parts.values()))
    first = next(iter(parts.values()))
    order = [doc_id for doc_id in first.doc_ids if doc_id in common]
    aligned: dict[str, PartArrays] = {}
    for name, arrays in parts.items():
        position = {doc_id: i for i, doc_id in enumerate(arrays.doc_ids)}
        index = np.array([position[doc_id] for doc_id in order], dtype=np.int64)
        frontier = None if arrays.frontier_correct is None else arrays.frontier_correct[index]
        aligned[name] = PartArrays(list(order), arrays.confidence[index], arrays.correct[index], frontier)
    return aligned


def part_arrays(
    spec: JobSpec, part: str, scored: Sequence[ScoredDocument], gold: Mapping[str, Mapping[str, Any]]
) -> PartArrays:
    """Collect a part's confidences and correctness; missing confidence counts as 0."""
    rows = [s for s in scored if s.doc_id in gold and part in gold[s.doc_id]]
    confidence = np.array(
        [(part_confidence(s.small, part) or 0.0) if s.small is not None and s.small.ok else 0.0 for s in rows]
    )
    correct = np.array([part_correct(spec, part, s.small, gold[s.doc_id]) for s in rows], dtype=bool)
    frontier = None
    if rows and all(s.frontier is not None for s in rows):
        frontier = np.array([part_correct(spec, part, s.frontier, gold[s.doc_id]) for s in rows], dtype=bool)
    return PartArrays([s.doc_id for s in rows], confidence, correct, frontier)

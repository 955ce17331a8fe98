"""A learned candidate ranker for extraction: each field's value chosen among its candidates by a conditional logit.

The small LM chooses among a document's candidates by likelihood alone, which finds dates but not totals, names or
addresses: on receipts it likes the largest amount and the first line. A few labelled documents (the job's
examples, or frontier answers harvested to `<output>/labels/`) say much more: the total follows "TOTAL", the address
is the 3-line span under the name. This module learns that per field, from (document text, gold value) pairs:

* candidates are engines/scoring/candidates.py's, plus longer line spans (engines/extract/ranker_features.py);
* features are hashed words around the candidate, position, format and value statistics, optionally an encoder
  embedding and the LM's own score; an OCR'd document's page geometry (its lines' rows, columns and boxes) refines
  the position and context features where the request carries it;
* the model is a conditional logit: one weight vector, a softmax over *one document's* candidates (plus "no value"
  for optional fields), fitted by maximising the probability of the gold value's candidates with L2 regularisation.
  The regularisation strength is picked by cross-validation and a temperature is fitted on out-of-fold logits, so the
  top candidate's share is a calibrated confidence the router can certify, like the LM's.

A ranker is plain arrays (np.savez, no pickle) and records the encoder whose vectors it reads, the feature version and
a fingerprint of its training data; loading it with another encoder is refused rather than silently misread.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any

import numpy as np
from scipy import sparse

from docroute.engines.extract.ranker_features import (
    CANDIDATE_LIMIT,
    DENSE_FEATURES,
    FEATURE_VERSION,
    HASH_BITS,
    featurize,
    ranker_candidates,
)
from docroute.engines.local.encoders import Encoder
from docroute.engines.scoring.candidates import Candidate
from docroute.engines.scoring.confidence import choose_value, softmax
from docroute.schemas.compare import normalise
from docroute.schemas.errors import DocrouteError, InputError
from docroute.schemas.page_geometry import PageLine
from docroute.schemas.spec import ExtractSpec, FieldSpec

__all__ = [
    "ExtractionRanker",
    "FieldRanker",
    "RankerMismatchError",
    "RankerTrainingError",
    "train_extraction_ranker",
    "train_ranker",
]

_STRENGTHS = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
"""L2 strengths tried by cross-validation (the loss is summed over documents, so these suit 20–2000 documents)."""
_FOLDS = 4
_EMBEDDING_SHRINK = 1.0
"""Embedding columns are divided by their spread times this times sqrt(dim): hundreds of standardised dimensions
at the same L2 strength as one position feature would let 100 documents be memorised (unshrunk, SROIE totals lost
10 points)."""
_MIN_DOCUMENTS = 2
_MAX_ITERATIONS = 300


class RankerMismatchError(DocrouteError, ValueError):
    """A saved ranker used with an encoder (or feature version) other than the one it was trained with."""


class RankerTrainingError(InputError, ValueError):
    """Too little usable training data for a field: too few documents whose gold value is among the candidates."""


def _encoder_name(encoder: Encoder | None) -> str:
    return encoder.name if encoder is not None else ""


def _positives(field: FieldSpec, values: Sequence[Any], gold: Any) -> np.ndarray:
    """Which options mean the gold value (compared as schemas/compare.py does); `values` ends with None for "none".

    For a list[str] field an option is right when each of its items is in the gold list.
    """
    gold_key = normalise(field, gold)
    keys = [normalise(field, v) if v is not None else None for v in values]
    if field.type == "list[str]" and gold_key is not None:
        wanted = set(gold_key)
        return np.array([k is not None and set(k) <= wanted for k in keys])
    return np.array([k == gold_key and (k is None) == (gold_key is None) for k in keys])


@dataclass
class _Problem:
    """Stacked training rows: one block of rows per document, with the rows that hold its gold value."""

    matrix: sparse.csr_matrix
    starts: np.ndarray
    positive: np.ndarray

    def subset(self, documents: np.ndarray) -> _Problem:
        ends = np.append(self.starts[1:], self.matrix.shape[0])
        rows = np.concatenate([np.arange(self.starts[d], ends[d]) for d in documents])
        sizes = ends[documents] - self.starts[documents]
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        return _Problem(self.matrix[rows], starts, self.positive[rows])


def _segment_log_sum_exp(values: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-document log-sum-exp of `values` (rows grouped by `starts`), and each row's share of its document."""
    counts = np.diff(np.append(starts, len(values)))
    peak = np.maximum.reduceat(values, starts)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    exp = np.exp(values - np.repeat(peak, counts))
    total = np.add.reduceat(exp, starts)
    log_total = np.log(total) + peak
    return log_total, exp / np.repeat(total, counts)


def _loss(weights: np.ndarray, problem: _Problem, strength: float) -> tuple[float, np.ndarray]:
    """Negative log-probability of the gold options, summed over documents, plus L2; and its gradient."""
    logits = problem.matrix @ weights
    all_log, all_share = _segment_log_sum_exp(logits, problem.starts)
    gold_logits = np.where(problem.positive, logits, -np.inf)
    gold_log, gold_share = _segment_log_sum_exp(gold_logits, problem.starts)
    value = float(np.sum(all_log - gold_log)) + 0.5 * strength * float(weights @ weights)
    gradient = problem.matrix.T @ (all_share - np.where(problem.positive, gold_share, 0.0)) + strength * weights
    return value, gradient


def _fit(problem: _Problem, strength: float, start: np.ndarray | None = None) -> np.ndarray:
    """Minimise the regularised loss with L-BFGS, from `start` (a nearby solution) or zero."""
    from scipy import optimize  # fitting only: a run that applies a ranker does not import it

    result = optimize.minimize(
        _loss,
        np.zeros(problem.matrix.shape[1]) if start is None else start,
        args=(problem, strength),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": _MAX_ITERATIONS},
    )
    return np.asarray(result.x)


def _held_out_log_loss(logits: np.ndarray, problem: _Problem) -> float:
    all_log, _ = _segment_log_sum_exp(logits, problem.starts)
    gold_log, _ = _segment_log_sum_exp(np.where(problem.positive, logits, -np.inf), problem.starts)
    return float(np.sum(all_log - gold_log))


@dataclass
class FieldRanker:
    """One field's conditional logit: probabilities = softmax over a document's options of (x / scale) @ w / T."""

    field: FieldSpec
    weights: np.ndarray
    scale: np.ndarray
    """Divisor of each non-hashed column (dense, embedding, LM), so one L2 strength suits them all."""
    temperature: float
    strength: float
    encoder_name: str
    """Name of the encoder whose embeddings are features ("" when none is)."""
    encoder_dim: int
    uses_lm: bool
    trained_on: int
    """Documents that taught it something (gold value among the candidates)."""
    offered: int
    """Documents given, including those whose gold value no candidate matched."""
    fingerprint: str
    feature_version: int = FEATURE_VERSION
    encoder: Encoder | None = dataclass_field(default=None, repr=False, compare=False)

    # ------------------------------------------------------------------ use
    def candidates(self, text: str) -> list[Candidate]:
        """The candidates this ranker was trained to rank (engines/scoring/candidates.py's plus longer spans)."""
        return ranker_candidates(self.field, text, limit=CANDIDATE_LIMIT)

    def logits(
        self,
        text: str,
        candidates: Sequence[Candidate],
        lm_scores: Sequence[float] | None = None,
        geometry: Sequence[PageLine] = (),
    ) -> np.ndarray:
        """Temperature-scaled scores of the candidates (and of "no value" last, for an optional field).

        `geometry` is the document's OCR'd lines (the request's), empty for text: see ranker_features.py.
        """
        if self.encoder_dim and self.encoder is None:
            raise RankerMismatchError(
                f"the {self.field.name} ranker reads embeddings from {self.encoder_name}: load it with that encoder"
            )
        matrix = featurize(
            self.field,
            text,
            candidates,
            with_none=not self.field.required,
            encoder=self.encoder,
            lm_scores=lm_scores,
            uses_lm=self.uses_lm,
            geometry=geometry,
        )
        return (_scaled(matrix, self.scale) @ self.weights) / self.temperature

    def rank(
        self,
        text: str,
        candidates: Sequence[Candidate] | None = None,
        lm_scores: Sequence[float] | None = None,
        geometry: Sequence[PageLine] = (),
    ) -> tuple[list[Any], np.ndarray]:
        """Values of the options (None last for "no value" on an optional field) and their probabilities.

        `candidates` default to `self.candidates(text)`; pass the engine's own list to rank exactly those.
        `lm_scores` (required when the ranker was trained with them) are the LM's log-likelihoods of the same
        candidates, optionally followed by the score of "no value". Probabilities sum to 1 over the document.
        """
        candidates = self.candidates(text) if candidates is None else list(candidates)
        values: list[Any] = [c.value for c in candidates]
        if not self.field.required:
            values.append(None)
        if not values:
            return [], np.zeros(0)
        return values, softmax(self.logits(text, candidates, lm_scores, geometry))

    def choose(
        self,
        text: str,
        candidates: Sequence[Candidate] | None = None,
        lm_scores: Sequence[float] | None = None,
        geometry: Sequence[PageLine] = (),
    ) -> tuple[Any, float]:
        """The field's value and its confidence: probability summed over options meaning the same value.

        A required field with no candidate at all gives (None, 0.0), as the LM engine does.
        """
        candidates = self.candidates(text) if candidates is None else list(candidates)
        values, probs = self.rank(text, candidates, lm_scores, geometry)
        if not values:
            return None, 0.0
        starts = [c.start for c in candidates] + ([-1] if not self.field.required else [])
        return choose_value(self.field, probs, values, starts)

    # ------------------------------------------------------------------ storage
    def to_bytes(self) -> bytes:
        """An .npz archive: weights and scales as arrays, everything else as JSON (no pickle)."""
        meta = {
            "field": self.field.model_dump(mode="json"),
            "temperature": self.temperature,
            "strength": self.strength,
            "encoder": self.encoder_name,
            "encoder_dim": self.encoder_dim,
            "uses_lm": self.uses_lm,
            "trained_on": self.trained_on,
            "offered": self.offered,
            "fingerprint": self.fingerprint,
            "feature_version": self.feature_version,
            "hash_bits": HASH_BITS,
        }
        buffer = io.BytesIO()
        np.savez_compressed(buffer, weights=self.weights, scale=self.scale, meta=np.array(json.dumps(meta)))
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, *, encoder: Encoder | None = None) -> FieldRanker:
        """Load a ranker; `encoder` must be the one it was trained with (None for a ranker trained without one)."""
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            meta = json.loads(str(archive["meta"]))
            weights, scale = archive["weights"], archive["scale"]
        if meta["feature_version"] != FEATURE_VERSION or meta["hash_bits"] != HASH_BITS:
            raise RankerMismatchError(
                f"ranker for {meta['field']['name']} uses features v{meta['feature_version']}/{meta['hash_bits']} "
                f"bits; this docroute reads v{FEATURE_VERSION}/{HASH_BITS}: retrain it"
            )
        if meta["encoder"] != _encoder_name(encoder):
            trained = meta["encoder"] or "no encoder"
            given = _encoder_name(encoder) or "no encoder"
            raise RankerMismatchError(
                f"ranker for {meta['field']['name']} was trained with {trained}, not {given}: "
                "load it with the encoder it was trained with, or retrain it"
            )
        return cls(
            field=FieldSpec.model_validate(meta["field"]),
            weights=weights,
            scale=scale,
            temperature=float(meta["temperature"]),
            strength=float(meta["strength"]),
            encoder_name=str(meta["encoder"]),
            encoder_dim=int(meta["encoder_dim"]),
            uses_lm=bool(meta["uses_lm"]),
            trained_on=int(meta["trained_on"]),
            offered=int(meta["offered"]),
            fingerprint=str(meta["fingerprint"]),
            feature_version=int(meta["feature_version"]),
            encoder=encoder,
        )


def _scaled(matrix: sparse.csr_matrix, scale: np.ndarray) -> sparse.csr_matrix:
    """Divide the non-hashed columns by their training spread (hashed word columns are 0/1 and stay)."""
    divisor = np.ones(matrix.shape[1])
    divisor[1 << HASH_BITS :] = scale
    return sparse.csr_matrix(matrix.multiply(1.0 / divisor[None, :]))


def training_fingerprint(
    field: FieldSpec,
    documents: Sequence[tuple[str, Any]],
    encoder_name: str,
    uses_lm: bool,
    geometries: Sequence[Sequence[PageLine]] | None = None,
) -> str:
    """Identify a ranker by its field, features, encoder and data, so a cached one is never reused for other data.

    A document's geometry counts only when it has some, so a ranker trained on text keeps the fingerprint it had.
    """
    digest = hashlib.sha256(json.dumps(field.model_dump(mode="json"), sort_keys=True).encode())
    digest.update(f"\x00v{FEATURE_VERSION}/{HASH_BITS}\x00{encoder_name}\x00{uses_lm}".encode())
    for i, (text, gold) in enumerate(documents):
        digest.update(b"\x00T" + text.encode() + b"\x00G" + repr(normalise(field, gold)).encode())
        if geometries is not None and geometries[i]:
            digest.update(b"\x00L" + repr(tuple(geometries[i])).encode())
    return digest.hexdigest()[:16]


def train_ranker(
    field: FieldSpec,
    documents: Sequence[tuple[str, Any]],
    *,
    encoder: Encoder | None = None,
    lm_scores: Sequence[Sequence[float]] | None = None,
    geometries: Sequence[Sequence[PageLine]] | None = None,
    seed: int = 0,
) -> FieldRanker:
    """Fit one field's ranker on (document text, gold value) pairs.

    A document teaches only when its gold value is among its candidates (or, for an optional field, when it has no
    value). `lm_scores`, when given, holds per document the LM's scores of `ranker_candidates(field, text)` (in that
    order, optionally followed by "no value"); the ranker then needs them at prediction time too. `geometries`, when
    given, holds per document its OCR'd lines (empty for a text document), so the geometric features are learned.
    Raises RankerTrainingError when fewer than two documents are usable.
    """
    if lm_scores is not None and len(lm_scores) != len(documents):
        raise ValueError("lm_scores needs one list per document")
    if geometries is not None and len(geometries) != len(documents):
        raise ValueError("geometries needs one sequence of lines per document")
    blocks: list[sparse.csr_matrix] = []
    positives: list[np.ndarray] = []
    for i, (text, gold) in enumerate(documents):
        if field.required and normalise(field, gold) is None:
            continue  # a required field without a gold value says nothing about which candidate is right
        lines = () if geometries is None else geometries[i]
        candidates = ranker_candidates(field, text, limit=CANDIDATE_LIMIT)
        values: list[Any] = [c.value for c in candidates] + ([] if field.required else [None])
        positive = _positives(field, values, gold)
        if not positive.any():
            continue
        blocks.append(
            featurize(
                field,
                text,
                candidates,
                with_none=not field.required,
                encoder=encoder,
                lm_scores=None if lm_scores is None else lm_scores[i],
                uses_lm=lm_scores is not None,
                geometry=lines,
            )
        )
        positives.append(positive)
    if len(blocks) < _MIN_DOCUMENTS:
        raise RankerTrainingError(
            f"field {field.name}: {len(blocks)} of {len(documents)} documents have their gold value among the "
            f"candidates; at least {_MIN_DOCUMENTS} are needed"
        )
    matrix = sparse.vstack(blocks, format="csr")
    sizes = np.array([b.shape[0] for b in blocks])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    dense = matrix[:, 1 << HASH_BITS :].toarray()
    spread = dense.std(axis=0)
    scale = np.where(spread > 1e-9, spread, 1.0)
    if encoder is not None:  # one penalty for the whole embedding, not per dimension: see _EMBEDDING_SHRINK
        embedding = slice(len(DENSE_FEATURES), len(DENSE_FEATURES) + 2 * encoder.dim)
        scale[embedding] *= _EMBEDDING_SHRINK * np.sqrt(encoder.dim)
    scaled = _scaled(matrix, scale)
    used = np.unique(scaled.indices)  # fit only the columns some training row uses: most hashed ones are empty
    problem = _Problem(sparse.csr_matrix(scaled[:, used]), starts, np.concatenate(positives))
    strength, temperature = _select_strength(problem, seed)
    weights = np.zeros(matrix.shape[1])
    weights[used] = _fit(problem, strength)
    encoder_name = _encoder_name(encoder)
    return FieldRanker(
        field=field,
        weights=weights,
        scale=scale,
        temperature=temperature,
        strength=strength,
        encoder_name=encoder_name,
        encoder_dim=encoder.dim if encoder is not None else 0,
        uses_lm=lm_scores is not None,
        trained_on=len(blocks),
        offered=len(documents),
        fingerprint=training_fingerprint(field, documents, encoder_name, lm_scores is not None, geometries),
        encoder=encoder,
    )


def _select_strength(problem: _Problem, seed: int) -> tuple[float, float]:
    """The L2 strength with the best cross-validated log-loss, and a temperature fitted on its out-of-fold logits.

    Strengths are tried from strong to weak, each fit starting from the previous one's solution (warm start), which
    makes the grid cost little more than one fit per fold. With under 2 documents per fold there is nothing to hold
    out: strength 1 and T = 1 are used.
    """
    documents = len(problem.starts)
    folds = min(_FOLDS, documents // 2)
    if folds < 2:
        return 1.0, 1.0
    order = np.random.default_rng(seed).permutation(documents)
    assignment = np.empty(documents, dtype=int)
    assignment[order] = np.arange(documents) % folds
    strengths = sorted(_STRENGTHS, reverse=True)
    logits = {strength: np.zeros(problem.matrix.shape[0]) for strength in strengths}
    ends = np.append(problem.starts[1:], problem.matrix.shape[0])
    for fold in range(folds):
        train = problem.subset(np.flatnonzero(assignment != fold))
        held = np.flatnonzero(assignment == fold)
        rows = np.concatenate([np.arange(problem.starts[d], ends[d]) for d in held])
        weights: np.ndarray | None = None
        for strength in strengths:
            weights = _fit(train, strength, weights)
            logits[strength][rows] = problem.matrix[rows] @ weights
    losses = {strength: _held_out_log_loss(logits[strength], problem) for strength in strengths}
    strength = min(strengths, key=lambda s: (losses[s], -s))
    chosen = logits[strength]
    from scipy import optimize

    result = optimize.minimize_scalar(
        lambda t: _held_out_log_loss(chosen / t, problem), bounds=(0.25, 4.0), method="bounded"
    )
    return strength, float(result.x)


@dataclass
class ExtractionRanker:
    """One FieldRanker per field it could be trained for; fields without one are left to the caller (the LM)."""

    rankers: dict[str, FieldRanker]
    encoder_name: str
    seconds: float = 0.0
    """Training time, for reports."""

    def extract(self, text: str, geometry: Sequence[PageLine] = ()) -> tuple[dict[str, Any], dict[str, float | None]]:
        """Values and confidences of the fields it has rankers for, in the engine's `_extract` shape.

        `geometry`: the document's OCR'd lines (the request's), empty for a text document.
        """
        values: dict[str, Any] = {}
        confidences: dict[str, float | None] = {}
        for name, ranker in self.rankers.items():
            values[name], confidences[name] = ranker.choose(text, geometry=geometry)
        return values, confidences

    def to_bytes(self) -> bytes:
        """One .npz holding each field ranker's own archive as bytes, plus the field order and encoder name."""
        buffer = io.BytesIO()
        arrays = {f"field_{name}": np.frombuffer(r.to_bytes(), dtype=np.uint8) for name, r in self.rankers.items()}
        meta = {"fields": list(self.rankers), "encoder": self.encoder_name, "feature_version": FEATURE_VERSION}
        np.savez(buffer, meta=np.array(json.dumps(meta)), **arrays)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, *, encoder: Encoder | None = None) -> ExtractionRanker:
        """Load; refuses (RankerMismatchError) an encoder other than the one the rankers were trained with."""
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            meta = json.loads(str(archive["meta"]))
            parts = {name: archive[f"field_{name}"].tobytes() for name in meta["fields"]}
        rankers = {name: FieldRanker.from_bytes(part, encoder=encoder) for name, part in parts.items()}
        return cls(rankers, str(meta["encoder"]))


def train_extraction_ranker(
    extract: ExtractSpec,
    documents: Sequence[tuple[str, Mapping[str, Any]]],
    *,
    encoder: Encoder | None = None,
    geometries: Sequence[Sequence[PageLine]] | None = None,
    seed: int = 0,
) -> tuple[ExtractionRanker, dict[str, str]]:
    """Train a ranker per field on (text, {field: gold}) pairs; a field absent from a mapping is unlabelled there.

    `geometries`, when given, holds per document its OCR'd lines (empty for a text document).

    Returns the rankers and, per field that got none, why (too few usable documents), so a caller can report it
    and keep using the LM for that field.
    """
    started = time.perf_counter()
    rankers: dict[str, FieldRanker] = {}
    skipped: dict[str, str] = {}
    for spec in extract.fields:
        labelled = [i for i, (_text, gold) in enumerate(documents) if spec.name in gold]
        pairs = [(documents[i][0], documents[i][1][spec.name]) for i in labelled]
        lines = None if geometries is None else [geometries[i] for i in labelled]
        try:
            rankers[spec.name] = train_ranker(spec, pairs, encoder=encoder, geometries=lines, seed=seed)
        except RankerTrainingError as exc:
            skipped[spec.name] = str(exc)
    return ExtractionRanker(rankers, _encoder_name(encoder), time.perf_counter() - started), skipped

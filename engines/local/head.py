"""A logistic-regression classification head over small-model embeddings.

For tasks with many labels (77 banking intents, say) scoring every label's words after a prompt is slow and a base
model knows little of the label names; embedding the text once and letting a linear head trained on the job's
labeled examples choose is ten times faster and uses the examples fully. The head is plain arrays so it can be
saved, versioned and promoted like any artifact.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from docroute.schemas.spec import ClassifySpec


@dataclass(frozen=True)
class LabelHead:
    """Multinomial logistic regression: probabilities = softmax(X @ coef.T + intercept)."""

    labels: tuple[str, ...]
    coef: np.ndarray
    intercept: np.ndarray
    trained_on: int
    fingerprint: str
    encoder: str = ""
    """The encoder whose vectors it reads (engines/local/encoders.py); empty for heads saved before encoders were
    named."""

    def predict_proba(self, embeddings: np.ndarray) -> np.ndarray:
        logits = embeddings @ self.coef.T + self.intercept
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        meta = {
            "labels": list(self.labels),
            "trained_on": self.trained_on,
            "fingerprint": self.fingerprint,
            "encoder": self.encoder,
        }
        np.savez_compressed(buffer, coef=self.coef, intercept=self.intercept, meta=np.array(json.dumps(meta)))
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> LabelHead:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            meta = json.loads(str(archive["meta"]))
            return cls(
                labels=tuple(meta["labels"]),
                coef=archive["coef"],
                intercept=archive["intercept"],
                trained_on=int(meta["trained_on"]),
                fingerprint=str(meta["fingerprint"]),
                encoder=str(meta.get("encoder", "")),
            )


def examples_fingerprint(model: str, examples: Sequence[tuple[str, str]], labels: Sequence[str]) -> str:
    """Identify a head by the model and data it was trained on, so a cached head is never used for other data."""
    digest = hashlib.sha256(model.encode())
    for label in labels:
        digest.update(b"\x00L" + label.encode())
    for text, label in examples:
        digest.update(b"\x00T" + text.encode() + b"\x00" + label.encode())
    return digest.hexdigest()[:16]


def head_training_data(classify: ClassifySpec, examples: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The job's own labeled data: every label's inline examples, then the examples file's rows.

    A label nobody gave examples for is described by its own words, so the head can still score it (very low).
    """
    data = [(text, label.name) for label in classify.labels for text in label.examples]
    data += [(text, label) for text, label in examples]
    covered = {label for _, label in data}
    for label in classify.labels:
        if label.name not in covered:
            data.append((f"{label.text}. {label.description}".strip(" ."), label.name))
    return data


REGULARISATION_GRID = (1.0, 10.0, 100.0, 1000.0)
"""Inverse regularisation strengths tried; cross-validated log-loss picks one, which keeps probabilities honest."""


@dataclass(frozen=True)
class HeadScore:
    """How a head does on examples it did not see: cross-validated over the job's own labeled examples."""

    accuracy: float
    log_loss: float
    c: float
    examples: int


def train_head(
    embeddings: np.ndarray,
    targets: Sequence[str],
    labels: Sequence[str],
    *,
    fingerprint: str,
    c: float | None = None,
    encoder: str = "",
) -> LabelHead:
    """Fit the head, choosing its regularisation by cross-validated log-loss unless `c` is given."""
    return fit_head(embeddings, targets, labels, fingerprint=fingerprint, c=c, encoder=encoder)[0]


def fit_head(
    embeddings: np.ndarray,
    targets: Sequence[str],
    labels: Sequence[str],
    *,
    fingerprint: str,
    c: float | None = None,
    encoder: str = "",
    folds: int = 5,
) -> tuple[LabelHead, HeadScore | None]:
    """Fit the head and say how it cross-validates (None when `c` is given or too few examples to fold).

    Log-loss rewards calibrated probabilities, not just the right argmax: on BANKING77 the strength it picks gives an
    expected calibration error of 0.03 where a fixed C=10 gives 0.44, so the router's thresholds mean what they say.
    The same folds give the accuracy `classify_strategy: auto` compares encoders by, at no extra cost. A label with
    no training example keeps a very low score instead of breaking the fit. `encoder` is recorded so the head is
    refused by an engine whose encoder gives other vectors.
    """
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    index = {label: i for i, label in enumerate(labels)}
    y = np.array([index[t] for t in targets])
    present, counts = np.unique(y, return_counts=True)
    if len(present) < 2:
        raise ValueError("the embedding head needs labeled examples of at least two labels")
    folds = min(folds, int(counts.min()))
    score: HeadScore | None = None
    # one BLAS/OpenMP thread: these matrices are small, and on a busy 2-core machine two threads spinning for each
    # other made one fit of 77 labels on 1,540 examples take 12.9 s instead of 0.2 s
    with threadpool_limits(limits=1):
        if c is None and folds >= 2:
            score = _cross_validate(embeddings, y, folds)
            c = score.c
        model = LogisticRegression(C=c or 100.0, max_iter=3000)
        model.fit(embeddings, y)
    if len(model.classes_) == 2:  # sklearn fits one logit for two classes: split it into two opposite halves
        weights = np.vstack([-model.coef_[0], model.coef_[0]]) / 2
        biases = np.array([-model.intercept_[0], model.intercept_[0]]) / 2
    else:
        weights, biases = model.coef_, model.intercept_
    coef = np.zeros((len(labels), embeddings.shape[1]), dtype=np.float64)
    intercept = np.full(len(labels), -30.0, dtype=np.float64)
    for row, cls in enumerate(model.classes_):
        coef[cls] = weights[row]
        intercept[cls] = biases[row]
    head = LabelHead(tuple(labels), coef, intercept, trained_on=len(targets), fingerprint=fingerprint, encoder=encoder)
    return head, score


def _cross_validate(embeddings: np.ndarray, y: np.ndarray, folds: int) -> HeadScore:
    """Log-loss and accuracy of every strength in REGULARISATION_GRID over stratified folds; the best log-loss wins.

    Each fold walks the grid from strong to weak regularisation, warm-starting every fit from the previous one's
    weights at a looser tolerance: the path costs little more than its last fit, where fitting each strength from
    zero made this search the slowest step of starting a job (~111 s for 1,540 examples of 77 labels).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    totals = {strength: [0.0, 0.0] for strength in REGULARISATION_GRID}
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=0).split(embeddings, y):
        model = LogisticRegression(max_iter=1000, tol=1e-3, warm_start=True)
        for strength in sorted(REGULARISATION_GRID):
            model.set_params(C=strength)
            model.fit(embeddings[train], y[train])
            probabilities = np.full((len(test), int(y.max()) + 1), 1e-15)
            probabilities[:, model.classes_] = np.clip(model.predict_proba(embeddings[test]), 1e-15, 1.0)
            probabilities /= probabilities.sum(axis=1, keepdims=True)
            totals[strength][0] -= float(np.log(probabilities[np.arange(len(test)), y[test]]).mean()) / folds
            totals[strength][1] += float((probabilities.argmax(axis=1) == y[test]).mean()) / folds
    best = min(totals, key=lambda strength: totals[strength][0])
    return HeadScore(accuracy=totals[best][1], log_loss=totals[best][0], c=best, examples=len(y))

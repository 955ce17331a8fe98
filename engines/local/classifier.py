"""Classification by an encoder, whatever the small engine is: a trained head, or zero-shot label similarity.

The vectors that classify short texts best rarely come from the model that extracts fields or scores labels (on 77
banking intents the 16 MB static WordLlama encoder reaches 84% with 20 examples per intent where mean-pooled Gemma
270M reaches 68%, at a 500th of the cost), so classification by vectors is its own engine: `EncoderClassifier`
reads an `Encoder` and a `LabelHead`. A zero-shot job gets a head too, built without training: each label's row is
its description's vector (averaged with any examples' vectors) divided by a temperature, so the same softmax gives
`softmax(cosine / T)` and everything downstream (saving, checking the encoder, the router's calibration) is shared.

`SplitTaskEngine` pairs it with a generative engine that extracts fields, so a job that classifies and extracts
still makes one prediction per document.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from docroute.engines.base import Engine, EngineUnavailableError, Prediction, Request, Usage, check_complete
from docroute.engines.local.encoders import Encoder
from docroute.engines.local.head import LabelHead
from docroute.engines.local.remote_encoders import row_usage
from docroute.engines.scoring.confidence import pick
from docroute.schemas.spec import ClassifySpec

if TYPE_CHECKING:
    from docroute.engines.local.classify_choice import ClassifierChoice

SIMILARITY_TEMPERATURE = 0.06
"""Zero-shot `softmax(cosine / T)` without examples to fit T on: on 77 banking intents with WordLlama vectors, T in
0.05-0.08 gives the lowest log-loss (1.78-1.85 against 6.1 at 0.01), so confidences are neither all ~1 nor flat."""

TEMPERATURE_GRID = (0.02, 0.03, 0.04, 0.06, 0.08, 0.12, 0.2)


def label_descriptions(classify: ClassifySpec) -> list[str]:
    """What a label means in words: its text and description (names like `card_arrival` read as `card arrival`)."""
    return [f"{label.text.replace('_', ' ')}. {label.description}".strip(" .") for label in classify.labels]


def similarity_head(
    classify: ClassifySpec,
    encoder: Encoder,
    examples: Sequence[tuple[str, str]] = (),
    *,
    fingerprint: str,
) -> LabelHead:
    """A zero-shot head: one prototype per label, from its description and whatever examples it has.

    With examples the temperature is the one whose probabilities give them the lowest log-loss against the
    description-only prototypes (the examples themselves would make any temperature look right); without, the
    default measured on real intents. Prototypes then absorb the examples, one vote each beside the description.
    """
    names = classify.label_names
    descriptions = encoder.embed(label_descriptions(classify)).astype(np.float64)
    known = [(text, label) for text, label in examples if label in names]
    temperature = SIMILARITY_TEMPERATURE
    prototypes = descriptions.copy()
    if known:
        vectors = encoder.embed([text for text, _ in known]).astype(np.float64)
        targets = np.array([names.index(label) for _, label in known])
        if len(set(targets.tolist())) >= 2:
            cosines = vectors @ descriptions.T
            temperature = min(TEMPERATURE_GRID, key=lambda t: _log_loss(cosines / t, targets))
        for index in range(len(names)):
            members = vectors[targets == index]
            if len(members):
                prototypes[index] = (descriptions[index] + members.sum(axis=0)) / (1 + len(members))
    norms = np.linalg.norm(prototypes, axis=1, keepdims=True)
    prototypes /= np.where(norms == 0, 1, norms)
    return LabelHead(
        labels=tuple(names),
        coef=prototypes / temperature,
        intercept=np.zeros(len(names)),
        trained_on=len(known),
        fingerprint=fingerprint,
        encoder=encoder.name,
    )


def _log_loss(logits: np.ndarray, targets: np.ndarray) -> float:
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(targets)), targets].mean())


def check_head(head: LabelHead, labels: Sequence[str], encoder: Encoder) -> None:
    """Refuse a head made for other labels or another encoder: its probabilities would be meaningless."""
    if list(head.labels) != list(labels):
        raise EngineUnavailableError("the classification head was trained for other labels than the job's")
    if head.encoder and head.encoder != encoder.name:
        raise EngineUnavailableError(
            f"the classification head was trained on encoder {head.encoder}, not {encoder.name}: "
            "train it again (docroute train) or set small_model.encoder back"
        )
    if head.coef.shape[1] != encoder.dim:  # heads saved without an encoder name: the width still tells
        raise EngineUnavailableError(
            f"the classification head reads {head.coef.shape[1]}-dimension vectors but encoder {encoder.name} "
            f"gives {encoder.dim}: train it again (docroute train) or set small_model.encoder back"
        )


class EncoderClassifier:
    """Engine protocol over an encoder and a head: one encoder call per batch, then a matrix product."""

    def __init__(self, classify: ClassifySpec, encoder: Encoder, head: LabelHead, *, method: str) -> None:
        check_head(head, classify.label_names, encoder)
        self.classify = classify
        self.encoder = encoder
        self.head = head
        self.method = method
        """embedding_head or similarity: how the head was made."""
        self.name = encoder.name
        self.classifier_choice: ClassifierChoice | None = None

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """The vectors the head reads, exactly as `predict` embeds documents (for `docroute train`)."""
        return self.encoder.embed(texts)

    def predict(self, batch: Sequence[Request]) -> list[Prediction]:
        if not batch:
            return []
        encoded = self.encoder.encode([request.text for request in batch])
        probabilities = self.head.predict_proba(encoded.vectors)
        seconds = encoded.seconds / len(batch)
        predictions = []
        for position, request in enumerate(batch):
            index, confidence = pick(probabilities[position])
            tokens, truncated = row_usage(encoded, position)
            predictions.append(
                Prediction(
                    id=request.id,
                    model=self.name,
                    label=self.classify.labels[index].name,
                    label_confidence=confidence,
                    usage=Usage(input_tokens=tokens),
                    engine_seconds=seconds,
                    encoder_tokens=tokens,
                    truncated=truncated,
                )
            )
        return check_complete(batch, predictions, self.name)

    def close(self) -> None:
        close = getattr(self.encoder, "close", None)
        if close is not None:
            close()


class SplitTaskEngine:
    """Parts of one task answered by different engines (label, fields), merged into one prediction per document.

    Each part engine was built for its share of the task only, so exactly one of them sets the label and each field
    comes from one of them; usage, seconds and truncation add up.
    """

    def __init__(self, parts: Sequence[Engine]) -> None:
        self.parts = list(parts)
        self.name = "+".join(part.name for part in self.parts)
        self.classifier_choice = next(
            (
                getattr(part, "classifier_choice", None)
                for part in self.parts
                if getattr(part, "classifier_choice", None)
            ),
            None,
        )

    @property
    def classifier(self) -> EncoderClassifier | None:
        return next((part for part in self.parts if isinstance(part, EncoderClassifier)), None)

    def predict(self, batch: Sequence[Request]) -> list[Prediction]:
        answers = [part.predict(batch) for part in self.parts]
        merged = []
        for predictions in zip(*answers, strict=True):
            first, rest = predictions[0], predictions[1:]
            first.model = self.name
            for other in rest:
                if other.label is not None:
                    first.label, first.label_confidence = other.label, other.label_confidence
                first.fields.update(other.fields)
                first.field_confidences.update(other.field_confidences)
                first.usage = first.usage + other.usage
                first.engine_seconds += other.engine_seconds
                first.encoder_tokens += other.encoder_tokens
                first.truncated |= other.truncated
                first.error = first.error or other.error
                first.retryable = first.retryable or other.retryable
            merged.append(first)
        return check_complete(batch, merged, self.name)

    def close(self) -> None:
        for part in self.parts:
            part.close()


def classifier_of(engine: Engine) -> EncoderClassifier | None:
    """The engine's classification by vectors, if it classifies that way."""
    if isinstance(engine, EncoderClassifier):
        return engine
    if isinstance(engine, SplitTaskEngine):
        return engine.classifier
    return None

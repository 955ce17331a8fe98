"""The embedded CPU engine: a small base model under llama.cpp, used the ways that measurably work for it.

* Classification by label scoring: the log-probability of every label's words after a few-shot prompt, normalised
  over the label set and divided by the label prior on content-free input (contextual calibration).
* Classification by vectors (a head trained on the job's examples, or zero-shot similarity) is not here: it is
  engines/local/classifier.py, over any encoder, and `build_small_engine` pairs it with this engine for extraction.
* Extraction by choosing each field's value among candidates taken from the document (engines/scoring/candidates.py),
  scored by the model's likelihood after a few-shot prompt; confidence is the chosen value's share of the
  candidate set's probability.

Free generation is not used: on a 270M base model it is slow and mostly wrong, while choosing among real
alternatives gives a calibrated confidence the router can trust.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from docroute.engines.base import EngineUnavailableError, Prediction, Request, Usage, check_complete
from docroute.engines.local.llama_runtime import LlamaRuntime, packaged_model_path, shared_runtime
from docroute.engines.scoring import fewshot
from docroute.engines.scoring.candidates import candidates_for
from docroute.engines.scoring.confidence import choose_value, contextual_calibration, pick, softmax
from docroute.schemas.spec import ExtractSpec, FieldSpec, LlamaCppSpec, TaskSpec

if TYPE_CHECKING:
    from docroute.engines.local.classify_choice import ClassifierChoice

CONTENT_FREE_INPUTS = ("N/A", "", "[MASK]")
"""Inputs that say nothing, used to estimate the label bias of the prompt (Zhao et al. 2021)."""


_QUESTION_RESERVE = 32
"""Tokens kept free after the document for the question segment."""


@dataclass
class _DocTokens:
    tokens: list[int]
    truncated: bool


class LlamaCppEngine:
    """Engine protocol implementation over a shared per-process llama.cpp runtime."""

    def __init__(
        self,
        spec: LlamaCppSpec,
        task: TaskSpec,
        *,
        examples: Sequence[tuple[str, str]] = (),
        runtime: LlamaRuntime | None = None,
    ) -> None:
        self.spec = spec
        self.task = task
        model_path = spec.model_path or packaged_model_path()
        self._runtime = runtime or shared_runtime(model_path, n_ctx=spec.n_ctx, n_threads=spec.n_threads)
        self.name = f"llamacpp:{spec.model_name}"
        self.classifier_choice: ClassifierChoice | None = None
        self._examples = list(examples)
        self._classify_prefix: list[int] = []
        self._label_tokens: list[list[int]] = []
        self._label_prior: np.ndarray | None = None
        self.strategy = "label_scoring"
        self.few_shot_used = 0
        self.examples_used = 0
        self._choice_priors: dict[tuple[str, tuple[tuple[int, ...], ...]], np.ndarray] = {}
        self._extract_prefix: list[int] = []
        self._question_tokens: dict[str, list[int]] = {}
        self._candidate_room = 0
        if task.classify is not None:
            self._prepare_classification()
        if task.extract is not None:
            self._prepare_extraction(task.extract)

    # ------------------------------------------------------------------ set-up
    def _prepare_classification(self) -> None:
        classify = self.task.classify
        assert classify is not None
        self._label_tokens = [
            self._runtime.tokenize(fewshot.label_continuation(label.text)) for label in classify.labels
        ]
        nodes = sum(len(t) for t in self._label_tokens)
        # the fixed prompt may use what the document budget and the label trie leave of the context
        budget = self._runtime.n_ctx - min(self.spec.max_input_tokens, self._runtime.n_ctx // 2) - nodes
        budget -= _QUESTION_RESERVE
        shots = fewshot.select_examples(classify, self._examples, self.spec.few_shot)
        while True:
            self._classify_prefix = self._runtime.tokenize(fewshot.classify_prefix(self.task, shots), add_bos=True)
            if len(self._classify_prefix) <= budget or not shots:
                break
            shots = shots[: len(shots) * 3 // 4]
        self.few_shot_used = len(shots)
        self._check_fits(self._classify_prefix, extra=nodes)
        if self.spec.calibration != "none":
            priors = [softmax(self._score_labels(text)) for text in CONTENT_FREE_INPUTS]
            self._label_prior = np.mean(priors, axis=0)

    def _prepare_extraction(self, extract: ExtractSpec) -> None:
        # candidates are scored in groups that fit beside the document; keep room for a few long ones at a time
        self._candidate_room = min(256, self._runtime.n_ctx // 8)
        budget = self._runtime.n_ctx - min(self.spec.max_input_tokens, self._runtime.n_ctx // 2)
        budget -= self._candidate_room + _QUESTION_RESERVE
        examples = list(extract.examples)
        while True:  # drop worked examples from the end until the fixed prompt leaves room for documents
            trimmed = extract.model_copy(update={"examples": examples})
            self._extract_prefix = self._runtime.tokenize(fewshot.extract_prefix(self.task, trimmed), add_bos=True)
            if len(self._extract_prefix) <= budget or not examples:
                break
            examples = examples[:-1]
        self.examples_used = len(examples)
        self._question_tokens = {
            field.name: self._runtime.tokenize(fewshot.extract_question(field)) for field in extract.fields
        }
        self._check_fits(self._extract_prefix, extra=self._candidate_room)

    def _check_fits(self, prefix: list[int], *, extra: int) -> None:
        room = self._runtime.n_ctx - len(prefix) - _QUESTION_RESERVE - extra
        if room < 64:
            raise EngineUnavailableError(
                f"the prompt's fixed part ({len(prefix)} tokens) leaves no room for documents in a "
                f"{self._runtime.n_ctx}-token context; raise small_model.n_ctx or lower few_shot"
            )

    # ------------------------------------------------------------------ documents
    def _document_tokens(self, wrapped: str, fixed: int, reserve: int) -> _DocTokens:
        """Tokenize a wrapped document, keeping its head and tail when it exceeds the token budget."""
        tokens = self._runtime.tokenize(wrapped)
        budget = min(self.spec.max_input_tokens, self._runtime.n_ctx - fixed - _QUESTION_RESERVE - reserve)
        kept, truncated = fewshot.truncate_tokens(tokens, budget, self._runtime.tokenize(fewshot.TRUNCATION_MARKER))
        return _DocTokens(kept, truncated)

    # ------------------------------------------------------------------ classification
    def _score_labels(self, text: str, doc: list[int] | None = None) -> np.ndarray:
        question = self._runtime.tokenize(fewshot.CLASSIFY_QUESTION)
        doc_tokens = doc if doc is not None else self._runtime.tokenize(fewshot.classify_document(text))
        return self._runtime.score([self._classify_prefix, doc_tokens, question], self._label_tokens)

    def _classify(self, text: str) -> tuple[str, float, Usage, bool]:
        classify = self.task.classify
        assert classify is not None
        nodes = sum(len(t) for t in self._label_tokens)
        doc = self._document_tokens(fewshot.classify_document(text), len(self._classify_prefix), nodes)
        probs = softmax(self._score_labels(text, doc.tokens))
        if self._label_prior is not None:
            probs = contextual_calibration(probs, self._label_prior)
        index, confidence = pick(probs)
        usage = Usage(
            input_tokens=len(self._classify_prefix) + len(doc.tokens) + nodes,
            cached_tokens=len(self._classify_prefix),
        )
        return classify.labels[index].name, confidence, usage, doc.truncated

    def _classify_batch_calibrated(self, texts: Sequence[str]) -> list[tuple[str, float, Usage, bool]]:
        """Batch calibration: the label prior is the mean prediction over the batch itself."""
        classify = self.task.classify
        assert classify is not None
        nodes = sum(len(t) for t in self._label_tokens)
        raw = []
        for text in texts:
            doc = self._document_tokens(fewshot.classify_document(text), len(self._classify_prefix), nodes)
            raw.append((softmax(self._score_labels(text, doc.tokens)), doc))
        prior = np.mean([p for p, _ in raw], axis=0) if len(raw) >= 8 else self._label_prior
        results = []
        for probs, doc in raw:
            calibrated = contextual_calibration(probs, prior) if prior is not None else probs
            index, confidence = pick(calibrated)
            usage = Usage(len(self._classify_prefix) + len(doc.tokens) + nodes, 0, len(self._classify_prefix))
            results.append((classify.labels[index].name, confidence, usage, doc.truncated))
        return results

    # ------------------------------------------------------------------ extraction
    def _choice_prior(self, field: FieldSpec, continuations: list[list[int]]) -> np.ndarray | None:
        """For fields with a fixed choice set (enum, bool), the model's preference on content-free documents.

        Like labels, a closed set of choices carries the prompt's bias (e.g. the currency the examples show);
        dividing by the prior on documents that say nothing removes it.
        """
        if field.type not in ("enum", "bool") or self.spec.calibration == "none":
            return None
        key = (field.name, tuple(tuple(c) for c in continuations))
        if key not in self._choice_priors:
            question = self._question_tokens[field.name]
            priors = []
            for text in CONTENT_FREE_INPUTS:
                null_doc = self._runtime.tokenize(fewshot.extract_document(text))
                scores = self._runtime.score([self._extract_prefix, null_doc, question], continuations)
                if self.spec.candidate_scoring == "mean":
                    scores = scores / np.array([len(c) for c in continuations])
                priors.append(softmax(scores))
            self._choice_priors[key] = np.mean(priors, axis=0)
        return self._choice_priors[key]

    def _extract(self, text: str, extract: ExtractSpec) -> tuple[dict[str, Any], dict[str, float | None], Usage, bool]:
        """Choose each field's value among its candidates.

        A candidate is scored together with what follows it in the examples (the next field's title, or the next
        document): a span that stops too early, such as the first line of a two-line name, is then unlikely,
        because the example format never puts the next field's title mid-value.
        """
        doc = self._document_tokens(fewshot.extract_document(text), len(self._extract_prefix), self._candidate_room)
        visible = self._runtime.detokenize(doc.tokens) if doc.truncated else text
        fields: dict[str, Any] = {}
        confidences: dict[str, float | None] = {}
        evaluated = len(doc.tokens)
        for position, field in enumerate(extract.fields):
            candidates = candidates_for(field, visible, limit=self.spec.max_candidates)
            mentioned = [c for c in candidates if c.start >= 0]
            if field.type == "enum" and mentioned:
                candidates = mentioned  # values the document names beat values it never mentions
            surfaces = [c.surface for c in candidates]
            values: list[Any] = [c.value for c in candidates]
            starts = [c.start for c in candidates]
            if not field.required:
                surfaces.append(fewshot.NO_VALUE)
                values.append(None)
                starts.append(-1)
            if not surfaces or (len(surfaces) == 1 and values[0] is None):
                fields[field.name], confidences[field.name] = (None, 0.0 if field.required else 1.0)
                continue
            following = extract.fields[position + 1] if position + 1 < len(extract.fields) else None
            ending = fewshot.extract_question(following) if following else "\nDocument:"
            continuations = [self._runtime.tokenize(fewshot.value_continuation(s) + ending) for s in surfaces]
            question = self._question_tokens[field.name]
            scores = self._runtime.score([self._extract_prefix, doc.tokens, question], continuations)
            evaluated += len(question) + sum(len(c) for c in continuations)
            if self.spec.candidate_scoring == "mean":
                scores = scores / np.array([len(c) for c in continuations])
            probs = softmax(scores)
            prior = self._choice_prior(field, continuations)
            if prior is not None:
                probs = contextual_calibration(probs, prior)
            value, confidence = choose_value(field, probs, values, starts)
            fields[field.name], confidences[field.name] = value, confidence
        usage = Usage(input_tokens=len(self._extract_prefix) + evaluated, cached_tokens=len(self._extract_prefix))
        return fields, confidences, usage, doc.truncated

    # ------------------------------------------------------------------ protocol
    def predict(self, batch: Sequence[Request]) -> list[Prediction]:
        predictions: list[Prediction] = []
        classify = self.task.classify
        batch_labels: list[tuple[str, float, Usage, bool]] | None = None
        if classify is not None and batch and self.spec.calibration == "batch":
            batch_labels = self._classify_batch_calibrated([r.text for r in batch])
        for position, request in enumerate(batch):
            started = self._runtime.busy_seconds()
            prediction = Prediction(id=request.id, model=self.name)
            usage = Usage()
            try:
                if classify is not None:
                    label, confidence, label_usage, truncated = (
                        batch_labels[position] if batch_labels is not None else self._classify(request.text)
                    )
                    prediction.label, prediction.label_confidence = label, confidence
                    prediction.truncated |= truncated
                    usage += label_usage
                if self.task.extract is not None:
                    fields, confidences, extract_usage, truncated = self._extract(request.text, self.task.extract)
                    prediction.fields, prediction.field_confidences = fields, confidences
                    prediction.truncated |= truncated
                    usage += extract_usage
            except (ValueError, RuntimeError) as exc:
                prediction.error = f"small model failed on this document: {exc}"
            prediction.usage = usage
            prediction.engine_seconds += self._runtime.busy_seconds() - started
            predictions.append(prediction)
        return check_complete(batch, predictions, self.name)

    def close(self) -> None:
        """Keep the shared runtime loaded: other shards in this worker process reuse it."""

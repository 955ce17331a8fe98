"""`docroute train`: make the small model learn from the frontier's answers, and keep the result only if it helps.

One round: read every harvested label (`<output>/labels/`), deduplicate, split off the audit sample as held-out,
refit the classification head on the job's examples plus the other labels, certify the current model and the
candidate on the held-out rows at the job's target accuracy, and write the candidate's head and router under a new
version. The router becomes current (`router.json`) only when the candidate's certified escalation rate is lower;
either way the round's report says what was compared. Every round also exports the labels as a chat-format
fine-tuning set (train and held-out JSONL) for generative models, e.g. a LoRA adapter that `small_model.lora_path`
then serves under vLLM.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext

from docroute.engines.base import Request
from docroute.engines.extract.extractor import RankerExtractor
from docroute.engines.extract.ranker import train_extraction_ranker
from docroute.engines.local.classifier import classifier_of
from docroute.engines.local.encoders import build_encoder
from docroute.engines.local.head import LabelHead, examples_fingerprint, head_training_data, train_head
from docroute.engines.scoring.calibration import fit_calibrator
from docroute.engines.scoring.confidence import pick
from docroute.schemas.compare import values_match
from docroute.schemas.load import load_job, with_output
from docroute.schemas.spec import JobSpec
from docroute.tasks.account.progress import bar
from docroute.tasks.ingest.examples import load_extraction_examples, load_labeled_examples
from docroute.tasks.learn.embeddings import EmbeddingCache
from docroute.tasks.learn.training import (
    HeadComparison,
    TrainingDataError,
    TrainingSplit,
    compare_extractors,
    compare_heads,
    finetune_lines,
    read_harvested_labels,
    split_labels,
)
from docroute.tasks.model.heads import write_head
from docroute.tasks.model.infer import run_engine, small_engine
from docroute.tasks.model.rankers import write_ranker
from docroute.tasks.route.certify import guarantee_of
from docroute.tasks.route.decide import required_parts
from docroute.tasks.route.router import Router, created_now, new_version, usable_router, write_router
from docroute.tasks.store.write import atomic_write, write_json


def _write_lines(spec: JobSpec, url: str, lines: list[str]) -> None:
    data = ("\n".join(lines) + ("\n" if lines else "")).encode("utf-8")
    atomic_write(spec.output, url, lambda handle: handle.write(data))


def export_finetuning_set(spec: JobSpec, split: TrainingSplit, version: str) -> dict[str, str]:
    """Write train.jsonl and holdout.jsonl in the chat format OpenAI, vLLM and most LoRA trainers read."""
    urls = {name: spec.output.layout.training(version, f"{name}.jsonl") for name in ("train", "holdout")}
    _write_lines(spec, urls["train"], finetune_lines(spec, split.train))
    _write_lines(spec, urls["holdout"], finetune_lines(spec, split.holdout))
    return urls


def _head_predictions(head: LabelHead, embeddings: np.ndarray) -> tuple[list[str], list[float]]:
    labels, confidences = [], []
    for probs in head.predict_proba(embeddings):
        index, confidence = pick(probs)
        labels.append(head.labels[index])
        confidences.append(confidence)
    return labels, confidences


def _current_predictions(spec: JobSpec, head_version: str | None, texts: list[str]) -> tuple[list[str], list[float]]:
    """The current small model's answers on the held-out texts, through the engine exactly as a run calls it."""
    predictions = run_engine(small_engine(spec, head_version), [Request(str(i), t) for i, t in enumerate(texts)])
    return [p.label or "" for p in predictions], [
        p.label_confidence if p.ok and p.label_confidence is not None else float("nan") for p in predictions
    ]


def _report(spec: JobSpec, result: dict[str, Any]) -> str:
    comparison = result.get("comparison")
    lines = [
        f"# docroute training · {spec.name}",
        "",
        f"Round `{result['version']}`: {result['harvested']} harvested labels, {result['distinct']} distinct; "
        f"trained on {result['train_examples']} job examples + {result['train_labels']} labels, "
        f"held out {result['holdout']} (the audit sample).",
    ]
    if comparison is not None and "current_escalation" in comparison:  # an extraction round: rows, then fields
        lines += ["", "| extractor | rows all right | certified row escalation |", "|---|---:|---:|"]
        for name in ("current", "candidate"):
            lines.append(f"| {name} | {comparison[name + '_accuracy']:.3f} | {comparison[name + '_escalation']:.1%} |")
        lines += ["", "| field | extractor | certified threshold | escalation |", "|---|---|---:|---:|"]
        for field in comparison["candidate"]:
            for name in ("current", "candidate"):
                cert = comparison[name][field]
                threshold = "none" if cert["threshold"] is None else f"{cert['threshold']:.3f}"
                lines.append(f"| {field} | {name} | {threshold} | {cert['escalation_rate']:.1%} |")
        lines += ["", f"**{result['decision']}**"]
    elif comparison is not None:
        lines += [
            "",
            "| classifier | held-out accuracy | certified threshold | certified escalation |",
            "|---|---:|---:|---:|",
        ]
        for name in ("current", "candidate"):
            cert = comparison[name]
            threshold = "none" if cert["threshold"] is None else f"{cert['threshold']:.3f}"
            lines.append(
                f"| {name} | {comparison[name + '_accuracy']:.3f} | {threshold} | {cert['escalation_rate']:.1%} |"
            )
        lines += ["", f"**{result['decision']}**"]
    else:
        lines += ["", result["decision"]]
    if result.get("finetune"):
        lines += ["", f"Fine-tuning set: `{result['finetune']['train']}` and `{result['finetune']['holdout']}`."]
    return "\n".join(lines)


@flow(name="train", log_prints=False)
def train(job: str, output: str | None = None, min_holdout: int = 30) -> dict[str, Any]:
    """Refit the classification head from the job's examples and the harvested labels; promote it only if better."""
    spec = with_output(load_job(Path(job)), output)
    logger = get_run_logger()
    if spec.frontier is None or spec.routing.audit_fraction <= 0:
        raise TrainingDataError(
            "docroute train certifies on the audit sample, a random share of documents that all get frontier "
            "answers: configure a frontier and set routing.audit_fraction (e.g. 0.1); escalated rows alone are "
            "the hard cases and say nothing certain about the rest"
        )
    if spec.frontier.mode == "batch":
        raise TrainingDataError(
            "docroute train needs the audit sample fully labeled, and audits run only with the synchronous "
            "frontier (frontier.mode: sync); in batch mode the sample's kept rows get no frontier answer"
        )
    current, why = usable_router(spec)
    logger.info("current model: %s", why)
    split = split_labels(spec, read_harvested_labels(spec))
    version = new_version(spec.spec_hash(), created_now())
    result: dict[str, Any] = {
        "version": version,
        "harvested": split.harvested,
        "distinct": split.distinct,
        "train_labels": len(split.train),
        "holdout": len(split.holdout),
        "dropped_as_copies": split.dropped_as_copies,
        "unknown_labels": split.unknown_labels,
        "train_examples": 0,
        "promoted": False,
        "comparison": None,
        "finetune": export_finetuning_set(spec, split, version),
    }
    logger.info(
        "%d labels, %d distinct: %d to train on, %d held out",
        split.harvested,
        split.distinct,
        len(split.train),
        len(split.holdout),
    )
    classify = spec.task.classify
    if len(split.holdout) < min_holdout:
        result["decision"] = (
            f"kept the current model: {len(split.holdout)} held-out labels, fewer than {min_holdout}; "
            "runs with audits add more"
        )
    elif classify is not None:
        result.update(_train_round(spec, current, split, version))
    else:  # extraction only: the fields' candidate rankers learn from the worked examples and the frontier's answers
        result.update(_ranker_round(spec, current, split, version))
    write_json(spec.output, spec.output.layout.training(version, "report.json"), result)
    logger.info("%s", result["decision"])
    if FlowRunContext.get() is not None:
        create_markdown_artifact(
            markdown=_report(spec, result), key=f"{spec.name}-training", description="docroute training round"
        )
    return result


EMBED_CHUNK = 256
"""Texts embedded per call while a bar watches: small enough to move the bar, large enough to batch well."""


def _shown(description: str, embed: Callable[[Sequence[str]], np.ndarray]) -> Callable[[Sequence[str]], np.ndarray]:
    """`embed` in chunks that advance a terminal bar (one call, as before, when nobody watches)."""

    def embed_with_bar(texts: Sequence[str]) -> np.ndarray:
        with bar(description, len(texts)) as shown:
            if not shown.visible:
                return embed(texts)
            chunks = []
            for start in range(0, len(texts), EMBED_CHUNK):
                chunk = texts[start : start + EMBED_CHUNK]
                chunks.append(np.asarray(embed(chunk)))
                shown.advance(len(chunk))
            return np.vstack(chunks)

    return embed_with_bar


def _train_round(spec: JobSpec, current: Router | None, split: TrainingSplit, version: str) -> dict[str, Any]:
    classify = spec.task.classify
    assert classify is not None
    kept_certificates = current.certificates if current is not None else {}
    missing = [p for p in required_parts(spec) if p != "label" and p not in kept_certificates]
    if missing:  # checked before any embedding: the head answers only the label
        raise TrainingDataError(
            f"no certificate for {', '.join(missing)}: run docroute calibrate once before training the head"
        )
    _refuse_partial_document_certificate(spec, ["label"])
    head_version = current.head_version if current is not None else None
    engine = small_engine(spec, head_version)
    current_classifier = classifier_of(engine)
    # the head learns on the vectors the current classifier reads; a model that scores labels itself gets the job's
    # encoder, else the bundled one
    encoder = (
        current_classifier.encoder
        if current_classifier is not None
        else build_encoder(spec.small_model.encoder or "wordllama", spec.small_model)
    )
    examples = head_training_data(classify, load_labeled_examples(classify))
    data = examples + [(text, str(answers["label"])) for text, answers in split.train]
    cache = EmbeddingCache(spec, encoder.name)
    train_texts = [text for text, _ in data]
    train_vectors = cache.embed(train_texts, _shown(f"{spec.name}: embedding training texts", encoder.embed))
    holdout_texts = [text for text, _ in split.holdout]
    holdout_vectors = cache.embed(holdout_texts, _shown(f"{spec.name}: embedding held-out texts", encoder.embed))
    cache.save(version)
    fingerprint = examples_fingerprint(encoder.name, data, classify.label_names)
    candidate = train_head(
        train_vectors, [label for _, label in data], classify.label_names, fingerprint=fingerprint, encoder=encoder.name
    )
    gold = [str(answers["label"]) for _, answers in split.holdout]
    candidate_labels, candidate_conf = _head_predictions(candidate, holdout_vectors)
    if current_classifier is not None:  # the same vectors: what its predict computes
        current_labels, current_conf = _head_predictions(current_classifier.head, holdout_vectors)
    else:
        current_labels, current_conf = _current_predictions(spec, head_version, holdout_texts)
    comparison = compare_heads(spec, gold, (current_labels, current_conf), (candidate_labels, candidate_conf))
    correct = np.array([a == g for a, g in zip(candidate_labels, gold, strict=True)])
    certificates = {"label": comparison.candidate}
    calibrators = {"label": fit_calibrator(np.asarray(candidate_conf), correct)}
    if current is not None:  # parts the head does not answer keep the certificates they have
        certificates = {**current.certificates, **certificates}
        calibrators = {**current.calibrators, **calibrators}
    router = _round_router(spec, version, len(split.holdout), certificates, calibrators)
    head_file = write_head(spec, version, candidate)
    router_file = write_router(spec, router, current=comparison.promote)
    return {
        "train_examples": len(examples),
        "promoted": comparison.promote,
        "decision": comparison.reason,
        "comparison": _comparison_json(comparison),
        "head": head_file,
        "router": router_file,
        "current_router": current.version if current is not None else None,
    }


def _refuse_partial_document_certificate(spec: JobSpec, certified: list[str]) -> None:
    """A round that re-certifies only some parts cannot keep a whole-document certificate (one threshold, one
    statement over every required part): say so before any work, rather than write a router that claims it."""
    others = [part for part in required_parts(spec) if part not in certified]
    if spec.routing.guarantee_unit == "document" and others:
        raise TrainingDataError(
            f"routing.guarantee_unit is document: one certificate covers {', '.join(required_parts(spec))} together, "
            f"and this training round certifies only {', '.join(certified)}; use guarantee_unit: part for training "
            "rounds, or run docroute calibrate (which certifies every part together) instead"
        )


def _round_router(
    spec: JobSpec, version: str, held_out: int, certificates: dict[str, Any], calibrators: dict[str, Any]
) -> Router:
    """The router a training round writes: certified on the held-out audit sample, naming the round's artifacts
    (`head_version`: its head, its rankers or both); "mixed" guarantee when kept parts were certified otherwise."""
    return Router(
        version=version,
        created_at=created_now().isoformat(),
        job=spec.name,
        spec_hash=spec.spec_hash(),
        small_model=spec.small_model.model_name,
        target_accuracy=spec.routing.target_accuracy,
        delta=spec.routing.delta,
        sample_size=held_out,
        labels_source="frontier labels: audit sample held out",
        certificates=certificates,
        calibrators=calibrators,
        head_version=version,
        guarantee=guarantee_of(certificates),
    )


def _ranker_round(spec: JobSpec, current: Router | None, split: TrainingSplit, version: str) -> dict[str, Any]:
    """Fit a ranker per field on the worked examples plus the training labels; certify it against the current
    extractor on the held-out rows and promote it only when it escalates fewer rows (as heads are promoted)."""
    extract = spec.task.extract
    assert extract is not None
    _refuse_partial_document_certificate(spec, [part for part in required_parts(spec) if part != "label"])
    examples = load_extraction_examples(extract)
    documents = [(e.text, {f.name: e.values.get(f.name) for f in extract.fields}) for e in examples]
    documents += [(text, dict(answers)) for text, answers in split.train]
    with bar(f"{spec.name}: fit rankers, answer held-out (current, candidate)", 3) as steps:
        ranker, skipped = train_extraction_ranker(extract, documents)
        steps.advance()
        if skipped:
            missing = "; ".join(f"{name}: {why}" for name, why in skipped.items())
            return {"train_examples": len(examples), "decision": f"kept the current extractor: no ranker for {missing}"}
        requests = [Request(str(i), text) for i, (text, _) in enumerate(split.holdout)]
        head_version = current.head_version if current is not None else None
        current_predictions = run_engine(small_engine(spec, head_version), requests)
        steps.advance()
        candidate_predictions = RankerExtractor(extract, ranker).predict(requests)
        steps.advance()
    fields = [part for part in required_parts(spec) if part != "label"]
    gold = [answers for _, answers in split.holdout]
    comparison = compare_extractors(
        spec,
        fields,
        gold,
        [(p.fields, p.field_confidences) if p.ok else None for p in current_predictions],
        [(p.fields, p.field_confidences) if p.ok else None for p in candidate_predictions],
    )
    calibrators = dict(current.calibrators) if current is not None else {}
    for field in fields:
        confidence = np.array([p.field_confidences.get(field) or 0.0 for p in candidate_predictions])
        correct = np.array(
            [
                values_match(extract.field(field), p.fields.get(field), g.get(field))
                for p, g in zip(candidate_predictions, gold, strict=True)
            ]
        )
        calibrators[field] = fit_calibrator(confidence, correct)
    certificates = {**(current.certificates if current is not None else {}), **comparison.candidate}
    router = _round_router(spec, version, len(split.holdout), certificates, calibrators)
    ranker_file = write_ranker(spec, version, ranker)
    router_file = write_router(spec, router, current=comparison.promote)
    return {
        "train_examples": len(examples),
        "promoted": comparison.promote,
        "decision": comparison.reason,
        "comparison": {
            "current_escalation": comparison.current_escalation,
            "candidate_escalation": comparison.candidate_escalation,
            "current_accuracy": comparison.current_accuracy,
            "candidate_accuracy": comparison.candidate_accuracy,
            "current": {f: c.to_json() for f, c in comparison.current.items()},
            "candidate": {f: c.to_json() for f, c in comparison.candidate.items()},
        },
        "ranker": ranker_file,
        "router": router_file,
        "current_router": current.version if current is not None else None,
    }


def _comparison_json(comparison: HeadComparison) -> dict[str, Any]:
    return {
        "current": comparison.current.to_json(),
        "candidate": comparison.candidate.to_json(),
        "current_accuracy": comparison.current_accuracy,
        "candidate_accuracy": comparison.candidate_accuracy,
    }

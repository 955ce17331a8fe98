"""`docroute calibrate`: certify routing thresholds on labeled documents and write a versioned router.

Gold answers come from a labels file, or from the frontier on a random sample (`oracle="frontier"`). The small
model answers the same documents; for each required part the flow picks the lowest threshold that reaches
`routing.target_accuracy` with probability ≥ 1 − `routing.delta` (tasks/certify.py) — on the kept rows, or on the
whole routed output relative to the frontier, as `routing.guarantee` says — fits a calibration of the
part's confidences for reporting, and writes `<output>/router.json`. When no threshold meets the target it says so
and the router escalates that part on every row rather than pretending.
"""

from __future__ import annotations

import random
import uuid
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext
from prefect.runtime import flow_run

from docroute.engines.calibration import expected_calibration_error, fit_calibrator
from docroute.flows.process import with_output
from docroute.schemas.load import load_job
from docroute.schemas.spec import JobSpec
from docroute.tasks.budget import release_run_budget
from docroute.tasks.certify import certify_parts, guarantee_of
from docroute.tasks.discover import cut_shards, list_documents
from docroute.tasks.labels import LabelSet, load_labels
from docroute.tasks.route import required_parts
from docroute.tasks.router import Router, created_now, new_version, usable_router, write_router
from docroute.tasks.score import ScoredDocument, answers_of, part_arrays, score_shard


def score_labeled(
    spec: JobSpec, labels: LabelSet | None, *, sample: int, frontier_run_id: str | None, head_version: str | None
) -> list[ScoredDocument]:
    """Answer the labeled documents (or a seeded random sample of files) shard by shard."""
    refs = list_documents(spec.source, exclude_prefix=spec.output.url)
    if labels is not None:
        refs = [r for r in refs if r.uri in labels.uris]
    else:
        refs = sorted(random.Random(spec.spec_hash()).sample(refs, min(sample, len(refs))), key=lambda r: r.uri)
    wanted = frozenset(labels.answers) if labels is not None else None
    futures = [
        score_shard.submit(spec, shard, wanted, frontier_run_id, head_version)
        for shard in cut_shards(refs, spec.shard_size)
    ]
    return [doc for future in futures for doc in future.result()]


def oracle_answers(scored: list[ScoredDocument]) -> LabelSet:
    """The frontier's answers as gold labels (documents it failed on are left out)."""
    answers = {s.doc_id: answers_of(s.frontier) for s in scored if s.frontier is not None and s.frontier.ok}
    return LabelSet(answers, frozenset(s.uri for s in scored), "frontier")


_GUARANTEE_WORDS = {
    "kept": "on the rows the small model keeps (guarantee: kept)",
    "overall": "on the whole routed output relative to the frontier (guarantee: overall)",
    "mixed": "some parts on their kept rows, others on the whole output (guarantee: mixed)",
}


def _summary(router: Router, ece: dict[str, float], url: str) -> str:
    lines = [
        f"# docroute calibration · {router.job}",
        "",
        f"Router `{router.version}` from {router.sample_size} labeled documents ({router.labels_source}); target "
        f"accuracy {router.target_accuracy:.3f} with probability ≥ {1 - router.delta:.3f}, "
        f"{_GUARANTEE_WORDS.get(router.guarantee, router.guarantee)}.",
        "",
        "| part | threshold | kept | kept accuracy | lower bound | escalation | ECE |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for part, cert in router.certificates.items():
        threshold = "none (always escalate)" if cert.threshold is None else f"{cert.threshold:.3f}"
        accuracy = "—" if cert.kept_accuracy is None else f"{cert.kept_accuracy:.3f}"
        bound = "—" if cert.lower_bound is None else f"{cert.lower_bound:.3f}"
        lines.append(
            f"| {part} | {threshold} | {cert.kept}/{cert.n} | {accuracy} | {bound} | {cert.escalation_rate:.1%} "
            f"| {ece.get(part, float('nan')):.3f} |"
        )
    if not router.meets_target:
        lines += ["", "**No threshold meets the target for some parts: they are escalated on every row.**"]
    lines += ["", f"Written to `{url}`."]
    return "\n".join(lines)


@flow(name="calibrate", log_prints=False)
def calibrate(
    job: str, labels: str | None = None, oracle: str | None = None, sample: int = 200, output: str | None = None
) -> dict[str, Any]:
    """Certify thresholds for a job from a labels file, or from the frontier's answers on a sample of documents."""
    spec = with_output(load_job(Path(job)), output)
    logger = get_run_logger()
    if (labels is None) == (oracle is None):
        raise ValueError("give either a labels file or oracle='frontier' (with a sample size)")
    if oracle is not None and (oracle != "frontier" or spec.frontier is None):
        raise ValueError("oracle='frontier' needs the job to configure a frontier")
    run_id = str(flow_run.get_id() or uuid.uuid4().hex)
    gold = load_labels(spec, labels) if labels is not None else None
    current, _ = usable_router(spec)
    head_version = current.head_version if current is not None else None  # recalibrating keeps the trained head
    if head_version:
        logger.info("calibrating with the trained classification head %s of router %s", head_version, current.version)
    try:
        scored = score_labeled(
            spec, gold, sample=sample, frontier_run_id=run_id if oracle else None, head_version=head_version
        )
    finally:
        release_run_budget(run_id)
    if gold is None:
        gold = oracle_answers(scored)
    parts = {part: part_arrays(spec, part, scored, gold.answers) for part in required_parts(spec)}
    empty = [part for part, arrays in parts.items() if len(arrays.correct) == 0]
    if empty:
        raise ValueError(f"no labeled documents for: {', '.join(empty)}")
    certificates = certify_parts(
        {part: (a.confidence, a.correct) for part, a in parts.items()},
        target_accuracy=spec.routing.target_accuracy,
        delta=spec.routing.delta,
        procedure=spec.routing.certification,
        guarantee=spec.routing.guarantee,
    )
    calibrators = {part: fit_calibrator(a.confidence, a.correct) for part, a in parts.items()}
    ece = {part: expected_calibration_error(a.confidence, a.correct) for part, a in parts.items()}
    created = created_now()
    router = Router(
        version=new_version(spec.spec_hash(), created),
        created_at=created.isoformat(),
        job=spec.name,
        spec_hash=spec.spec_hash(),
        small_model=spec.small_model.model_name,
        target_accuracy=spec.routing.target_accuracy,
        delta=spec.routing.delta,
        sample_size=max(len(a.correct) for a in parts.values()),
        labels_source=gold.source,
        certificates=certificates,
        calibrators=calibrators,
        head_version=head_version,
        guarantee=guarantee_of(certificates),
    )
    url = write_router(spec, router)
    for part, cert in certificates.items():
        if cert.threshold is None:
            logger.warning("%s: no threshold reaches %.3f; this part will always escalate", part, cert.target_accuracy)
    if FlowRunContext.get() is not None:
        create_markdown_artifact(
            markdown=_summary(router, ece, url), key=f"{spec.name}-router", description="docroute calibration"
        )
    return {"router": router, "url": url, "ece": ece, "documents": len(scored)}

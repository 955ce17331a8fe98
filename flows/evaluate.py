"""`docroute evaluate`: measure small-only, frontier-only and routed accuracy and cost on labeled documents.

The operating point is the current calibrated router (when it matches the job) or the job file's thresholds. Next to
it the report shows the two certified operating points — thresholds certified on these labels under
`routing.guarantee` "kept" and "overall", at the job's target and delta — with their escalation, routed accuracy and
cost, so the choice between the guarantees can be made on the job's own documents. The frontier's answers are either
real calls (`frontier="call"`, which spend money within the run's budget) or played by the gold labels
(`frontier="gold"`: escalated rows count as correct and are priced at the frontier's list price from their length,
the usual way to evaluate a cascade offline). Writes report.md, metrics.json and the accuracy-against-cost plot to
the report folder.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from docroute.flows.calibrate import score_labeled
from docroute.schemas.load import load_job, with_output
from docroute.schemas.pricing import lookup_price
from docroute.schemas.spec import JobSpec
from docroute.tasks.account.evaluation import CertificationSettings, EvaluationInput, evaluate, write_report
from docroute.tasks.account.ledger import estimated_frontier_cost_usd
from docroute.tasks.answer.budget import release_run_budget
from docroute.tasks.answer.score import align
from docroute.tasks.ingest.labels import load_labels
from docroute.tasks.route.decide import required_parts, spec_thresholds
from docroute.tasks.route.router import usable_router


def _frontier_price(spec: JobSpec, frontier_model: str | None) -> Any:
    if frontier_model:
        return lookup_price(frontier_model)
    if spec.frontier is not None:
        return spec.frontier.unit_price
    raise ValueError("the job has no frontier: name one with frontier_model to price the escalations")


def _per_label(spec: JobSpec, scored: list[Any], gold: dict[str, dict[str, Any]]) -> dict[str, list[str]] | None:
    if spec.task.classify is None:
        return None
    from docroute.schemas.values import ValueCoercionError, match_choice

    names = spec.task.classify.label_names

    def canonical(value: Any) -> str | None:
        if value is None:
            return None
        try:
            return match_choice(str(value), names)
        except ValueCoercionError:
            return str(value)

    breakdown: dict[str, list[Any]] = {
        "gold": [canonical(gold[s.doc_id]["label"]) for s in scored],
        "small": [s.small.label if s.small is not None and s.small.ok else None for s in scored],
    }
    if all(s.frontier is not None for s in scored):
        breakdown["frontier"] = [s.frontier.label if s.frontier.ok else None for s in scored]
    return breakdown


@flow(name="evaluate", log_prints=False)
def evaluate_job(
    job: str,
    labels: str,
    report: str,
    frontier: str = "gold",
    frontier_model: str | None = None,
    output: str | None = None,
) -> dict[str, Any]:
    """Evaluate the job's routing on labeled documents and write a report; returns the metrics."""
    if frontier not in ("gold", "call"):
        raise ValueError("frontier must be 'gold' (played by the labels) or 'call' (real frontier calls)")
    spec = with_output(load_job(Path(job)), output)
    logger = get_run_logger()
    gold = load_labels(spec, labels)
    run_id = str(flow_run.get_id() or uuid.uuid4().hex)
    router, why = usable_router(spec)
    logger.info("operating point: %s", why)
    try:
        scored = score_labeled(
            spec,
            gold,
            sample=0,
            frontier_run_id=run_id if frontier == "call" else None,
            head_version=router.head_version if router is not None else None,
        )
    finally:
        release_run_budget(run_id)
    parts = required_parts(spec)
    aligned = align(spec, parts, scored, gold.answers)
    if not aligned.scored:
        raise ValueError("no document is labeled for every required part")
    thresholds = router.thresholds() if router is not None else spec_thresholds(spec)
    price = _frontier_price(spec, frontier_model)
    rows = aligned.scored
    small_cost = np.array(
        [spec.small_cost_usd(s.small.engine_seconds, s.small.encoder_tokens) if s.small else 0.0 for s in rows]
    )
    if frontier == "call":
        frontier_cost = np.array([s.frontier_cost_usd for s in rows])
    else:
        frontier_cost = np.array([estimated_frontier_cost_usd(spec, price, s.input_chars) for s in rows])
    metrics = evaluate(
        EvaluationInput(
            doc_ids=[s.doc_id for s in rows],
            small_correct=aligned.correct,
            small_confidence=aligned.confidence,
            required=parts,
            frontier_correct=aligned.frontier_correct if frontier == "call" else None,
            small_cost_per_doc=small_cost,
            frontier_cost_per_doc=frontier_cost,
            thresholds=thresholds,
            per_label=_per_label(spec, rows, gold.answers),
            certification=CertificationSettings(
                target_accuracy=spec.routing.target_accuracy,
                delta=spec.routing.delta,
                procedure=spec.routing.certification,
                unit=spec.routing.guarantee_unit,
            ),
        )
    )
    metrics["operating_point"] = why
    metrics["router_version"] = router.version if router is not None else None
    metrics["router_guarantee"] = router.guarantee if router is not None else None
    metrics["frontier"] = {
        "answers": frontier,
        "model": frontier_model or (spec.frontier.model if spec.frontier else None),
    }
    label = f"router {router.version} ({router.guarantee})" if router is not None else "job-file thresholds"
    files = write_report(metrics, report, title=f"docroute evaluation · {spec.name}", operating_point_label=label)
    return {"metrics": metrics, "files": {k: str(v) for k, v in files.items()}}

"""`docroute calibrate`: certify routing thresholds on labeled documents and write a versioned router.

Gold answers come from a labels file, or from the frontier on a random sample (`oracle="frontier"`). The small
model answers the same documents; for each required part the flow picks the lowest threshold that reaches
`routing.target_accuracy` with probability ≥ 1 − `routing.delta` (tasks/route/certify.py) — on the kept rows, or on the
whole routed output relative to the frontier, as `routing.guarantee` says — fits a calibration of the
part's confidences for reporting, and writes `<output>/router.json`. When no threshold meets the target it says so
and the router escalates that part on every row rather than pretending.

With `candidates` (a YAML list of `{name, small_model}`, schemas/candidates.py) the flow answers "which is the
minimum small model that solves this reliably": the job's own small model (candidate `job`) and each candidate are
certified on the same gold answers at the same target, δ and guarantee, and priced per 1,000 documents as compute
(engine seconds × the candidate's `usd_per_hour`, plus paid encoder tokens) plus the frontier's list price for the
rows its router would escalate. The cheapest candidate whose router meets the target wins and its router is
written; every other candidate gets a typed reason (`CandidateOutcome`) and a sentence.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext
from prefect.futures import as_completed
from prefect.runtime import flow_run

from docroute.engines.scoring.calibration import expected_calibration_error, fit_calibrator
from docroute.schemas.candidates import JOB_CANDIDATE, SmallModelCandidate, load_candidates
from docroute.schemas.documents import cut_shards
from docroute.schemas.load import load_job, with_output
from docroute.schemas.pricing import ModelPrice, UnknownModelPriceError, format_usd, lookup_price
from docroute.schemas.spec import JobSpec, SmallModelSpec
from docroute.tasks.account.ledger import estimated_frontier_cost_usd
from docroute.tasks.account.progress import bar
from docroute.tasks.answer.budget import release_run_budget
from docroute.tasks.answer.score import (
    ScoredDocument,
    align,
    answers_of,
    documents_with_every_part,
    part_arrays,
    score_shard,
)
from docroute.tasks.ingest.discover import list_documents
from docroute.tasks.ingest.labels import LabelSet, load_labels
from docroute.tasks.route.certify import Certificate, certify_parts, guarantee_of
from docroute.tasks.route.decide import required_parts
from docroute.tasks.route.router import Router, created_now, new_version, usable_router, write_router


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
        for shard in cut_shards(refs, spec.shard_size_for(len(refs)))
    ]
    with bar(f"{spec.name}: scoring shards", len(futures)) as shown:
        for _ in as_completed(futures):
            shown.advance()
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
        f"{_GUARANTEE_WORDS.get(router.guarantee, router.guarantee)}"
        + (
            ", on whole documents (right only when every part is right; one threshold on the least confident part)."
            if any(cert.unit == "document" for cert in router.certificates.values())
            else ", each part on its own."
        ),
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


class CandidateOutcome(StrEnum):
    """What calibration decided about one small-model candidate."""

    CHOSEN = "chosen"  # the cheapest candidate whose router meets the target: its router is written
    DEARER = "dearer"  # meets the target, but the chosen one costs less per 1,000 documents
    MISSES_TARGET = "misses_target"  # some required part has no certified threshold: it would escalate every row
    UNAVAILABLE = "unavailable"  # its engine could not answer the labeled documents (the error says why)


@dataclass(frozen=True)
class CandidateMeasurement:
    """One candidate measured on the gold documents: how often it is right, how much it escalates, what it costs.

    Costs are per 1,000 documents: `small_cost_per_1000` is what the small model's compute (engine seconds at its
    `usd_per_hour`) and paid encoder tokens came to; `frontier_cost_per_1000` is the frontier's list price for the
    rows its certified router would escalate; `all_frontier_cost_per_1000` what sending every row there would cost.
    """

    name: str
    small_model: SmallModelSpec
    spec_hash: str
    documents: int = 0
    accuracy: float | None = None  # small model alone: a document is right when every required part is
    escalation_rate: float | None = None
    small_cost_per_1000: float | None = None
    frontier_cost_per_1000: float | None = None
    all_frontier_cost_per_1000: float | None = None
    uncertified: tuple[str, ...] = ()  # parts with no certified threshold
    error: str | None = None

    @property
    def cost_per_1000(self) -> float | None:
        if self.small_cost_per_1000 is None or self.frontier_cost_per_1000 is None:
            return None
        return self.small_cost_per_1000 + self.frontier_cost_per_1000

    @property
    def meets_target(self) -> bool:
        return self.error is None and self.accuracy is not None and not self.uncertified


@dataclass(frozen=True)
class CandidateVerdict:
    """A measured candidate, the typed decision about it, and the sentence a person reads."""

    measurement: CandidateMeasurement
    outcome: CandidateOutcome
    why: str

    @property
    def name(self) -> str:
        return self.measurement.name

    def to_json(self) -> dict[str, Any]:
        m = self.measurement
        data = {k: v for k, v in asdict(m).items() if k != "small_model"}
        encoder = m.small_model.encoder
        return data | {
            "uncertified": list(m.uncertified),
            "engine": m.small_model.engine,
            "model": m.small_model.model_name,
            "classify_strategy": m.small_model.classify_strategy,
            "encoder": encoder if isinstance(encoder, str) or encoder is None else encoder.name,
            "usd_per_hour": m.small_model.usd_per_hour,
            "cost_per_1000": m.cost_per_1000,
            "meets_target": m.meets_target,
            "outcome": self.outcome.value,
            "why": self.why,
        }


def judge_candidates(
    measurements: Sequence[CandidateMeasurement], *, target_accuracy: float, delta: float
) -> list[CandidateVerdict]:
    """Choose the cheapest candidate that meets the target (the earliest on a tie, so the job's own model keeps its
    place unless another is strictly cheaper) and say why each other one lost."""
    meeting = [m for m in measurements if m.meets_target and m.cost_per_1000 is not None]
    winner = min(meeting, key=lambda m: m.cost_per_1000 or 0.0) if meeting else None
    verdicts = []
    for m in measurements:
        if m.error is not None:
            verdicts.append(CandidateVerdict(m, CandidateOutcome.UNAVAILABLE, f"could not be scored: {m.error}"))
        elif not m.meets_target:
            why = (
                f"no threshold reaches accuracy {target_accuracy:.3f} with probability >= {1 - delta:.3f} for "
                f"{', '.join(m.uncertified)}: its router would escalate every row (small-only accuracy "
                f"{m.accuracy or 0.0:.1%})"
            )
            verdicts.append(CandidateVerdict(m, CandidateOutcome.MISSES_TARGET, why))
        elif m is winner:
            why = (
                f"the cheapest of the {len(meeting)} candidate(s) that meet the target: "
                f"{format_usd(m.cost_per_1000 or 0.0)} per 1,000 documents "
                f"(small {format_usd(m.small_cost_per_1000 or 0.0)} + frontier "
                f"{format_usd(m.frontier_cost_per_1000 or 0.0)}), escalating {m.escalation_rate or 0.0:.1%}"
            )
            verdicts.append(CandidateVerdict(m, CandidateOutcome.CHOSEN, why))
        else:
            assert winner is not None and winner.cost_per_1000 is not None
            cost = m.cost_per_1000 or 0.0
            if cost > winner.cost_per_1000:
                why = (
                    f"meets the target but costs {format_usd(cost)} per 1,000 documents, "
                    f"{format_usd(cost - winner.cost_per_1000)} more than {winner.name} "
                    f"({format_usd(winner.cost_per_1000)})"
                )
            else:  # a tie: the earlier candidate (the job's own model first) keeps its place
                why = (
                    f"meets the target at the same {format_usd(cost)} per 1,000 documents as {winner.name}, "
                    "listed before it"
                )
            verdicts.append(CandidateVerdict(m, CandidateOutcome.DEARER, why))
    return verdicts


def _escalation_price(spec: JobSpec, frontier_model: str | None) -> tuple[str, ModelPrice]:
    """The frontier's list price the escalated rows are charged at: the named model's, else the job's frontier's."""
    if frontier_model:
        try:
            return frontier_model, lookup_price(frontier_model)
        except UnknownModelPriceError as exc:
            raise ValueError(str(exc)) from None
    if spec.frontier is not None:
        return spec.frontier.model, spec.frontier.unit_price
    raise ValueError(
        "comparing small-model candidates prices the rows each one escalates, and the job has no frontier: name one "
        "with --frontier-model (e.g. gpt-4o-mini) or add a frontier to the job"
    )


def _escalated(confidence: Mapping[str, np.ndarray], certificates: Mapping[str, Certificate], n: int) -> np.ndarray:
    """Which rows the router would send to the frontier: any part under its threshold, or a part without one."""
    escalate = np.zeros(n, dtype=bool)
    for part, cert in certificates.items():
        if cert.threshold is None:
            return np.ones(n, dtype=bool)
        conf = np.asarray(confidence[part], dtype=np.float64)
        escalate |= np.isnan(conf) | (conf < cert.threshold)
    return escalate


def _measure(
    name: str,
    spec: JobSpec,
    scored: list[ScoredDocument],
    gold: LabelSet,
    router: Router,
    price: ModelPrice,
) -> CandidateMeasurement:
    """Accuracy, escalation and cost per 1,000 documents on the documents labeled for every required part."""
    parts = required_parts(spec)
    aligned = align(spec, parts, scored, gold.answers)
    rows = aligned.scored
    if not rows:
        raise ValueError("no document is labeled for every required part")
    right = np.logical_and.reduce([aligned.correct[p] for p in parts])
    escalate = _escalated(aligned.confidence, router.certificates, len(rows))
    small = np.array(
        [spec.small_cost_usd(s.small.engine_seconds, s.small.encoder_tokens) if s.small else 0.0 for s in rows]
    )
    frontier = np.array([estimated_frontier_cost_usd(spec, price, s.input_chars) for s in rows])
    return CandidateMeasurement(
        name=name,
        small_model=spec.small_model,
        spec_hash=spec.spec_hash(),
        documents=len(rows),
        accuracy=float(right.mean()),
        escalation_rate=float(escalate.mean()),
        small_cost_per_1000=1000 * float(small.mean()),
        frontier_cost_per_1000=1000 * float((frontier * escalate).mean()),
        all_frontier_cost_per_1000=1000 * float(frontier.mean()),
        uncertified=tuple(p for p, c in router.certificates.items() if c.threshold is None),
    )


def _answers_key(small: SmallModelSpec, head_version: str | None) -> str:
    """Candidates equal in everything but their price answer identically in the same time: score them once."""
    return small.model_dump_json(exclude={"usd_per_hour"}) + f"\x00{head_version}"


def small_model_yaml(small: SmallModelSpec) -> str:
    """The `small_model:` mapping to paste into the job file (what the candidate set; secrets left out)."""

    def drop_secrets(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: drop_secrets(v) for k, v in value.items() if k != "api_key"}
        return value

    mapping = drop_secrets(small.model_dump(mode="json", exclude_unset=True))
    return yaml.safe_dump({"small_model": {"engine": small.engine, **mapping}}, sort_keys=False)


def _candidates_summary(result: Mapping[str, Any]) -> str:
    lines = [
        "",
        "## Small-model candidates",
        "",
        f"Cost per 1,000 documents: small compute (engine seconds × `usd_per_hour`, plus paid encoder tokens) plus "
        f"the frontier ({result['frontier_model']}, list price) for the rows each router escalates; all-frontier "
        f"{format_usd(result['all_frontier_cost_per_1000'])}.",
        "",
        "| candidate | small model | strategy | small-only accuracy | escalation | small /1k | frontier /1k "
        "| total /1k | verdict | why |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for verdict in result["candidates"]:
        row = verdict.to_json()

        def num(key: str, fmt: str, row: dict[str, Any] = row) -> str:
            return "—" if row[key] is None else format(row[key], fmt)

        strategy = row["classify_strategy"] + (f" · {row['encoder']}" if row["encoder"] else "")
        lines.append(
            f"| {row['name']} | {row['engine']}: {row['model']} | {strategy} | {num('accuracy', '.1%')} "
            f"| {num('escalation_rate', '.1%')} | {num('small_cost_per_1000', '.4g')} "
            f"| {num('frontier_cost_per_1000', '.4g')} | {num('cost_per_1000', '.4g')} | {row['outcome']} "
            f"| {row['why']} |"
        )
    lines += ["", f"**{result['notice']}**"]
    if result["job_file_change"]:
        lines += ["", "```yaml", result["job_file_change"].rstrip(), "```"]
    return "\n".join(lines)


def _calibrate_candidates(
    spec: JobSpec,
    entries: Sequence[SmallModelCandidate],
    *,
    labels: str | None,
    sample: int,
    frontier_model: str | None,
) -> dict[str, Any]:
    """Certify and price the job's own small model and every candidate; write the cheapest passing one's router."""
    logger = get_run_logger()
    price_model, price = _escalation_price(spec, frontier_model)
    run_id = str(flow_run.get_id() or uuid.uuid4().hex)
    gold = load_labels(spec, labels) if labels is not None else None  # None: the frontier labels the job's sample
    lineup: list[tuple[str, SmallModelSpec]] = [(JOB_CANDIDATE, spec.small_model)]
    lineup += [(c.name, c.small_model) for c in entries]
    answered: dict[str, list[ScoredDocument]] = {}
    certified: dict[str, tuple[JobSpec, Router, dict[str, float]]] = {}
    measurements: list[CandidateMeasurement] = []
    try:
        for name, small in lineup:
            candidate_spec = spec.model_copy(update={"small_model": small})
            current, _ = usable_router(candidate_spec)  # a trained head belongs to the spec it was trained for
            head_version = current.head_version if current is not None else None
            key = _answers_key(small, head_version)
            if key not in answered:
                oracle_run = run_id if gold is None else None  # only the job's own scoring asks the frontier
                try:
                    answered[key] = score_labeled(
                        candidate_spec, gold, sample=sample, frontier_run_id=oracle_run, head_version=head_version
                    )
                except Exception as exc:  # a candidate that cannot run loses, with its error; the job's own cannot
                    if name == JOB_CANDIDATE:
                        raise
                    logger.warning("candidate %s could not be scored: %s", name, exc)
                    error = f"{type(exc).__name__}: {exc}"
                    measurements.append(CandidateMeasurement(name, small, candidate_spec.spec_hash(), error=error))
                    continue
            scored = answered[key]
            if gold is None:
                gold = oracle_answers(scored)
            router, ece = _certified_router(candidate_spec, scored, gold, head_version)
            certified[name] = (candidate_spec, router, ece)
            measurement = _measure(name, candidate_spec, scored, gold, router, price)
            measurements.append(measurement)
            logger.info(
                "candidate %s: accuracy %.3f, escalation %.3f, %s per 1,000 documents%s",
                name,
                measurement.accuracy,
                measurement.escalation_rate,
                format_usd(measurement.cost_per_1000 or 0.0),
                "" if measurement.meets_target else " (misses the target)",
            )
    finally:
        release_run_budget(run_id)
    verdicts = judge_candidates(measurements, target_accuracy=spec.routing.target_accuracy, delta=spec.routing.delta)
    winner = next((v.name for v in verdicts if v.outcome is CandidateOutcome.CHOSEN), None)
    chosen_spec, router, ece = certified[winner or JOB_CANDIDATE]
    url = write_router(chosen_spec, router)
    job_file_change = None
    if winner is None:
        notice = (
            "No candidate meets the target: wrote the job's own small model's router, which escalates its "
            "uncertified parts on every row."
        )
        logger.warning(notice)
    elif winner == JOB_CANDIDATE:
        notice = "The job's own small model is the cheapest that meets the target: its router is in use."
        logger.info(notice)
    else:
        job_file_change = small_model_yaml(chosen_spec.small_model)
        notice = (
            f"Candidate {winner!r} wins: the router written (spec hash {router.spec_hash}) is for its small model, "
            f"and runs of this job ignore it (using the job file's thresholds) until the job file sets small_model "
            f"to {winner!r}:"
        )
        logger.warning("%s\n%s", notice, job_file_change)
    reference = next(
        (m.all_frontier_cost_per_1000 for m in measurements if m.all_frontier_cost_per_1000 is not None), 0.0
    )
    result: dict[str, Any] = {
        "router": router,
        "url": url,
        "ece": ece,
        "documents": measurements[0].documents,
        "candidates": verdicts,
        "winner": winner,
        "frontier_model": price_model,
        "all_frontier_cost_per_1000": reference,
        "notice": notice,
        "job_file_change": job_file_change,
    }
    if FlowRunContext.get() is not None:
        create_markdown_artifact(
            markdown=_summary(router, ece, url) + "\n" + _candidates_summary(result),
            key=f"{spec.name}-router",
            description="docroute calibration with small-model candidates",
        )
    return result


def _certified_router(
    spec: JobSpec, scored: list[ScoredDocument], gold: LabelSet, head_version: str | None
) -> tuple[Router, dict[str, float]]:
    """Certify every required part of `spec`'s answers against the gold ones: the router, and each part's ECE."""
    parts = {part: part_arrays(spec, part, scored, gold.answers) for part in required_parts(spec)}
    empty = [part for part, arrays in parts.items() if len(arrays.correct) == 0]
    if empty:
        raise ValueError(f"no labeled documents for: {', '.join(empty)}")
    unit = spec.routing.guarantee_unit
    certified = documents_with_every_part(parts) if unit == "document" else parts
    if unit == "document" and not next(iter(certified.values())).doc_ids:
        raise ValueError(f"no labeled document has gold answers for every required part ({', '.join(parts)})")
    certificates = certify_parts(
        {part: (a.confidence, a.correct) for part, a in certified.items()},
        target_accuracy=spec.routing.target_accuracy,
        delta=spec.routing.delta,
        procedure=spec.routing.certification,
        guarantee=spec.routing.guarantee,
        unit=unit,
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
    return router, ece


@flow(name="calibrate", log_prints=False)
def calibrate(
    job: str,
    labels: str | None = None,
    oracle: str | None = None,
    sample: int = 200,
    output: str | None = None,
    candidates: str | None = None,
    frontier_model: str | None = None,
) -> dict[str, Any]:
    """Certify thresholds for a job from a labels file, or from the frontier's answers on a sample of documents.

    With `candidates` (a YAML file of small models) the job's own small model and each candidate are certified and
    priced, and the router of the cheapest one that meets the target is written (see `compare_candidates`);
    `frontier_model` prices the escalations when the job names no frontier.
    """
    spec = with_output(load_job(Path(job)), output)
    logger = get_run_logger()
    if (labels is None) == (oracle is None):
        raise ValueError("give either a labels file or oracle='frontier' (with a sample size)")
    if oracle is not None and (oracle != "frontier" or spec.frontier is None):
        raise ValueError("oracle='frontier' needs the job to configure a frontier")
    if candidates is not None:
        return _calibrate_candidates(
            spec, load_candidates(candidates), labels=labels, sample=sample, frontier_model=frontier_model
        )  # with oracle='frontier' (labels None) the frontier labels the job's sample once, for every candidate
    if frontier_model is not None:
        raise ValueError("frontier_model prices the candidates' escalations: it goes with a candidates file")
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
    router, ece = _certified_router(spec, scored, gold, head_version)
    url = write_router(spec, router)
    for part, cert in router.certificates.items():
        if cert.threshold is None:
            logger.warning("%s: no threshold reaches %.3f; this part will always escalate", part, cert.target_accuracy)
    if FlowRunContext.get() is not None:
        create_markdown_artifact(
            markdown=_summary(router, ece, url), key=f"{spec.name}-router", description="docroute calibration"
        )
    return {"router": router, "url": url, "ece": ece, "documents": len(scored)}

"""The cost ledger: per-shard tallies from the written rows, a per-run cost table, and the run's summary.

Tallies are computed from the same Arrow table that was written, so the ledger always equals the sum of the rows.
The all-frontier counterfactual prices the documents the frontier never saw with the tokens-per-character the run's
own escalations measured, so "savings" compares like with like.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import date, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from docroute.engines.scoring.prompts import chat_messages
from docroute.schemas.pricing import ModelPrice
from docroute.schemas.spec import JobSpec
from docroute.schemas.summary import LedgerEntry

CHARS_PER_TOKEN = 4.0
"""Fallback characters per token for the counterfactual when no row reached the frontier in this run."""


def _frontier_model(spec: JobSpec) -> str:
    """The frontier engine's name as rows record it (provider:model)."""
    if spec.frontier is None:
        return ""
    return f"{spec.frontier.provider}:{spec.frontier.model}"


def summarise_part(table: pa.Table, spec: JobSpec) -> list[LedgerEntry]:
    """Tally one part's rows by route and model, for the small model and the frontier separately."""
    if table.num_rows == 0:
        return []
    base = table.select(
        [
            "route",
            "small_model",
            "small_input_tokens",
            "small_output_tokens",
            "small_cost_usd",
            "frontier_input_tokens",
            "frontier_output_tokens",
            "frontier_cost_usd",
            "engine_seconds",
            "input_chars",
        ]
    )
    base = base.set_column(0, "route", pc.cast(base["route"], pa.string()))
    base = base.set_column(1, "small_model", pc.fill_null(base["small_model"], ""))
    base = base.set_column(
        base.schema.get_field_index("input_chars"), "input_chars", pc.fill_null(base["input_chars"], 0)
    )
    entries: list[LedgerEntry] = []
    small = base.group_by(["route", "small_model"]).aggregate(
        [
            ("route", "count"),
            ("small_input_tokens", "sum"),
            ("small_output_tokens", "sum"),
            ("small_cost_usd", "sum"),
            ("engine_seconds", "sum"),
            ("input_chars", "sum"),
        ]
    )
    for record in small.to_pylist():
        entries.append(
            LedgerEntry(
                route=record["route"],
                role="small",
                model=record["small_model"],
                documents=record["route_count"],
                input_tokens=record["small_input_tokens_sum"],
                output_tokens=record["small_output_tokens_sum"],
                cost_usd=record["small_cost_usd_sum"],
                engine_seconds=record["engine_seconds_sum"],
                input_chars=record["input_chars_sum"],
            )
        )
    called = base.filter(pc.greater(pc.add(base["frontier_input_tokens"], base["frontier_output_tokens"]), 0))
    if called.num_rows:
        frontier = called.group_by(["route"]).aggregate(
            [
                ("route", "count"),
                ("frontier_input_tokens", "sum"),
                ("frontier_output_tokens", "sum"),
                ("frontier_cost_usd", "sum"),
                ("input_chars", "sum"),
            ]
        )
        for record in frontier.to_pylist():
            entries.append(
                LedgerEntry(
                    route=record["route"],
                    role="frontier",
                    model=_frontier_model(spec),
                    documents=record["route_count"],
                    input_tokens=record["frontier_input_tokens_sum"],
                    output_tokens=record["frontier_output_tokens_sum"],
                    cost_usd=record["frontier_cost_usd_sum"],
                    engine_seconds=0.0,
                    input_chars=record["input_chars_sum"],
                )
            )
    return entries


def merge_entries(entries: list[LedgerEntry]) -> list[LedgerEntry]:
    """Add up the shards' entries per (route, role, model), in a stable order."""
    merged: dict[tuple[str, str, str], LedgerEntry] = {}
    for entry in entries:
        key = (entry.route, entry.role, entry.model)
        merged[key] = merged[key] + entry if key in merged else entry
    return [merged[key] for key in sorted(merged)]


COST_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string()),
        pa.field("job", pa.string()),
        pa.field("run_date", pa.date32()),
        pa.field("route", pa.string()),
        pa.field("role", pa.string()),
        pa.field("model", pa.string()),
        pa.field("documents", pa.int64()),
        pa.field("input_tokens", pa.int64()),
        pa.field("output_tokens", pa.int64()),
        pa.field("cost_usd", pa.float64()),
        pa.field("engine_seconds", pa.float64()),
        pa.field(
            "all_frontier_usd",
            pa.float64(),
            metadata={"description": "these documents all-frontier (on small-role rows, so each counts once)"},
        ),
    ]
)


def cost_table(entries: list[LedgerEntry], spec: JobSpec, *, run_id: str, run_date: date) -> pa.Table:
    """The run's tally by route, role and model, with the all-frontier counterfactual of each route."""
    counterfactual = all_frontier_by_route(entries, spec)
    records = [
        {
            "run_id": run_id,
            "job": spec.name,
            "run_date": run_date,
            **{k: v for k, v in asdict(entry).items() if k != "input_chars"},
            "model": entry.model or None,
            "all_frontier_usd": counterfactual.get(entry.route) if entry.role == "small" and entry.model else None,
        }
        for entry in entries
    ]
    return pa.Table.from_pylist(records, schema=COST_SCHEMA)


def prompt_overhead_tokens(spec: JobSpec) -> float:
    """Tokens every frontier call spends before the document: instructions, labels, fields, examples."""
    return sum(len(m["content"]) for m in chat_messages(spec.task, "")) / CHARS_PER_TOKEN


def default_output_tokens(spec: JobSpec) -> int:
    """A frontier answer's length when no call measured it: a label, and a short value per field."""
    return 12 + 16 * (len(spec.task.extract.fields) if spec.task.extract else 0)


def estimated_frontier_cost_usd(spec: JobSpec, price: ModelPrice, input_chars: int) -> float:
    """What one document of this many characters would cost at the frontier (list price, no measurements)."""
    tokens = prompt_overhead_tokens(spec) + input_chars / CHARS_PER_TOKEN
    return price.cost_usd(round(tokens), default_output_tokens(spec))


def all_frontier_by_route(entries: list[LedgerEntry], spec: JobSpec) -> dict[str, float]:
    """What each route's documents would have cost had they all gone to the frontier (empty without a frontier).

    Documents the frontier answered cost what they cost. The others are priced with the tokens per character and
    output tokens per document this run's own escalations measured (a fixed 4 characters per token and a small
    answer when nothing was escalated). Unreadable documents (route error without a frontier call) cost nothing:
    no model could have answered them.
    """
    if spec.frontier is None:
        return {}
    price = spec.frontier.unit_price
    overhead = prompt_overhead_tokens(spec)
    sent = [e for e in entries if e.role == "frontier" and e.route == "frontier"]
    sent_docs = sum(e.documents for e in sent)
    sent_chars = sum(e.input_chars for e in sent)
    tokens_per_char = 1 / CHARS_PER_TOKEN
    output_per_doc: float = default_output_tokens(spec)
    if sent_docs:
        sent_in = sum(e.input_tokens for e in sent)
        output_per_doc = sum(e.output_tokens for e in sent) / sent_docs
        if sent_chars and sent_in > sent_docs * overhead:
            tokens_per_char = (sent_in - sent_docs * overhead) / sent_chars
    estimate: dict[str, float] = {"frontier": sum(e.cost_usd for e in sent)}
    for route in ("small", "deferred", "error"):
        # each document has exactly one small-role entry, so counting those counts each document once
        readable = [e for e in entries if e.role == "small" and e.route == route and e.model]
        docs = sum(e.documents for e in readable)
        chars = sum(e.input_chars for e in readable)
        estimate[route] = price.cost_usd(round(docs * overhead + chars * tokens_per_char), round(docs * output_per_doc))
    return estimate


def all_frontier_estimate_usd(entries: list[LedgerEntry], spec: JobSpec) -> float | None:
    """What the whole run would have cost all-frontier (None without a frontier)."""
    by_route = all_frontier_by_route(entries, spec)
    return sum(by_route.values()) if by_route else None


RUN_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string()),
        pa.field("job", pa.string()),
        pa.field("run_date", pa.date32()),
        pa.field("started_at", pa.timestamp("us", tz="UTC")),
        pa.field("finished_at", pa.timestamp("us", tz="UTC")),
        pa.field("spec_hash", pa.string()),
        pa.field("small_model", pa.string()),
        pa.field("frontier_model", pa.string()),
        pa.field("documents", pa.int64()),
        pa.field("small", pa.int64()),
        pa.field("frontier", pa.int64()),
        pa.field("deferred", pa.int64()),
        pa.field("error", pa.int64()),
        pa.field("small_cost_usd", pa.float64()),
        pa.field("frontier_cost_usd", pa.float64()),
        pa.field("cost_usd", pa.float64()),
        pa.field("all_frontier_usd", pa.float64()),
        pa.field("savings_pct", pa.float64()),
        pa.field("max_frontier_usd", pa.float64()),
        pa.field("engine_seconds", pa.float64()),
        pa.field("wall_seconds", pa.float64()),
        pa.field("parts", pa.int64()),
        pa.field("router_version", pa.string()),
        pa.field("head_version", pa.string()),
        pa.field("escalated", pa.int64()),
        pa.field("escalation_rate", pa.float64()),
        pa.field("audited", pa.int64()),
        pa.field("audit_agreement", pa.float64()),
    ]
)


def run_record(
    spec: JobSpec,
    entries: list[LedgerEntry],
    *,
    run_id: str,
    run_date: date,
    started_at: datetime,
    finished_at: datetime,
    parts: int,
    router_version: str | None = None,
    head_version: str | None = None,
    audited: int = 0,
    audit_agreed: int = 0,
    escalated: int = 0,
) -> dict[str, Any]:
    """One row describing the whole run: counts by route, spend, and the counterfactual."""
    small_entries = [e for e in entries if e.role == "small"]
    by_route = {
        route: sum(e.documents for e in small_entries if e.route == route)
        for route in ("small", "frontier", "deferred", "error")
    }
    small_cost = sum(e.cost_usd for e in entries if e.role == "small")
    frontier_cost = sum(e.cost_usd for e in entries if e.role == "frontier")
    all_frontier = all_frontier_estimate_usd(entries, spec)
    total = small_cost + frontier_cost
    savings = None
    if all_frontier:
        savings = 100.0 * (1 - total / all_frontier)
    return {
        "run_id": run_id,
        "job": spec.name,
        "run_date": run_date,
        "started_at": started_at,
        "finished_at": finished_at,
        "spec_hash": spec.spec_hash(),
        "small_model": next((e.model for e in small_entries if e.model), None),
        "frontier_model": _frontier_model(spec) or None,
        "documents": sum(by_route.values()),
        **by_route,
        "small_cost_usd": small_cost,
        "frontier_cost_usd": frontier_cost,
        "cost_usd": total,
        "all_frontier_usd": all_frontier,
        "savings_pct": savings,
        "max_frontier_usd": spec.routing.max_frontier_usd,
        "engine_seconds": sum(e.engine_seconds for e in entries),
        "wall_seconds": (finished_at - started_at).total_seconds(),
        "parts": parts,
        "router_version": router_version,
        "head_version": head_version,
        "escalated": escalated,
        "escalation_rate": escalated / sum(by_route.values()) if sum(by_route.values()) else None,
        "audited": audited,
        "audit_agreement": audit_agreed / audited if audited else None,
    }

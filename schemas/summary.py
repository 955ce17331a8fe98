"""What a committed run hands back to its caller: the run's ledger row, the files that commit it, and its parts.

The CLI, the benchmarks and the tests read a run through this one typed model instead of a dict of string keys,
so a renamed or missing figure fails where the run is built, not in whichever reader happened to spell it. The
ledger entry lives here too, below `tasks/`, because the summary carries the run's entries and `schemas/` imports
nothing above it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """Spend of one model on the rows of one route."""

    route: str
    role: str  # "small" or "frontier"
    model: str
    documents: int
    input_tokens: int
    output_tokens: int
    cost_usd: float
    engine_seconds: float
    input_chars: int

    def __add__(self, other: LedgerEntry) -> LedgerEntry:
        return LedgerEntry(
            self.route,
            self.role,
            self.model,
            self.documents + other.documents,
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.cost_usd + other.cost_usd,
            self.engine_seconds + other.engine_seconds,
            self.input_chars + other.input_chars,
        )


class CommittedPart(BaseModel):
    """One Parquet part the manifest counts; the manifest stores exactly these fields, so readers of either agree."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str
    rows: int
    shard: int  # negative for the parts of frontier batches collected at the start of the run
    reused: bool  # written by the interrupted run this one resumed, read back instead of recomputed


class RunSummary(BaseModel):
    """A committed run as `process_documents` returns it.

    The first block mirrors the run row of the ledger (`tasks/account/ledger.py run_record`, `RUN_SCHEMA`) field by
    field, so the summary and the run table cannot disagree; `extra="forbid"` turns a figure added to the run row
    but not here into an error on the first run instead of a value no reader sees.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    # the run row of the ledger
    run_id: str
    job: str
    run_date: date
    started_at: datetime
    finished_at: datetime
    spec_hash: str
    small_model: str | None
    frontier_model: str | None
    documents: int
    small: int
    frontier: int
    deferred: int
    error: int
    small_cost_usd: float
    frontier_cost_usd: float
    cost_usd: float
    all_frontier_usd: float | None
    savings_pct: float | None
    max_frontier_usd: float | None
    engine_seconds: float
    wall_seconds: float
    router_version: str | None
    head_version: str | None
    escalated: int
    escalation_rate: float | None
    audited: int
    audit_agreement: float | None

    # the files the commit wrote (URLs under output.url); `state` is "" when the run wrote no snapshot
    manifest: str
    costs: str
    runs: str
    state: str

    # what the run did, beyond the ledger row
    entries: tuple[LedgerEntry, ...]
    parts: tuple[CommittedPart, ...]
    listed: int
    up_to_date: int
    retried: int
    resumed_from: str | None  # the interrupted run whose plan this one finished
    worker_processes: int
    engines_built: int
    # how the small model classified and why (the classifier choice's JSON plus a one-line `summary`); a record
    # for people and the Prefect UI, so it stays the engine's own JSON rather than a second copy of its type
    classification: dict[str, Any] | None

"""Where everything a job writes lives: every URL and file name under `output.url`, built and parsed here only.

The README documents this layout as a contract (warehouse queries, `current_rows()` and other tools read it), so
it has one owner: a run, a flow or a test that needs a path asks `OutputSpec.layout`, and names that are read back
(manifests sort by commit time and carry the run id) are parsed by the same class that builds them. Pure string
work: no I/O.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from datetime import UTC, date, datetime

MANIFEST_TIME_FORMAT = "%Y%m%dT%H%M%S%fZ"
"""Manifest names are `<commit time>--<run id>.json`, so the listing's order is the commit order."""


def _safe(name: str) -> str:
    """An external id (a batch id) as a file-name part: letters, digits, `-` and `_` only."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


@dataclass(frozen=True)
class OutputLayout:
    """The paths under one output root (`output.url`), as the README's "What a run writes" lists them."""

    root: str

    # -- results history: one Parquet part per shard, partitioned by run date ------------------------------------
    def results_part(self, run_date: date, plan_id: str, shard_index: int) -> str:
        return f"{self.root}/results/run_date={run_date.isoformat()}/part-{plan_id}-{shard_index:05d}.parquet"

    def batch_part(self, run_date: date, run_id: str, batch_id: str) -> str:
        """Where a run writes the rows a collected frontier batch answered."""
        return f"{self.root}/results/run_date={run_date.isoformat()}/part-{run_id}-batch-{_safe(batch_id)}.parquet"

    def results_dir(self) -> str:
        return f"{self.root}/results"

    def compacted_part(self, run_date: date, compaction_id: str, index: int) -> str:
        """A file `docroute compact` coalesced from a run date's small parts (never a plan's part name)."""
        return f"{self.root}/results/run_date={run_date.isoformat()}/compacted-{compaction_id}-{index:05d}.parquet"

    @staticmethod
    def part_run_date(url: str) -> date | None:
        """The run date a results, errors or labels file's folder names (None for a path this layout did not build)."""
        folder = posixpath.basename(posixpath.dirname(url))
        if not folder.startswith("run_date="):
            return None
        try:
            return date.fromisoformat(folder.removeprefix("run_date="))
        except ValueError:
            return None

    def errors_dir(self) -> str:
        return f"{self.root}/errors"

    def errors_part(self, run_date: date, plan_id: str, shard_index: int) -> str:
        """Where a shard's error rows are copied for triage."""
        return f"{self.root}/errors/run_date={run_date.isoformat()}/errors-{plan_id}-{shard_index:05d}.parquet"

    # -- frontier answers kept as labeled data --------------------------------------------------------------------
    def labels_dir(self) -> str:
        return f"{self.root}/labels"

    def labels_part(self, run_date: date, plan_id: str, shard_index: int) -> str:
        return f"{self.labels_dir()}/run_date={run_date.isoformat()}/labels-{plan_id}-{shard_index:05d}.parquet"

    def batch_labels_part(self, run_date: date, run_id: str, batch_id: str) -> str:
        """Labels of a collected frontier batch, beside the labels of the run that collected it."""
        return f"{self.labels_dir()}/run_date={run_date.isoformat()}/labels-{run_id}-batch-{_safe(batch_id)}.parquet"

    # -- the current table: one row per document, a Delta Lake table every run merges into ------------------------
    def current_table(self) -> str:
        """The table's root folder (its `_delta_log/` and data files live under it)."""
        return f"{self.root}/tables/documents"

    def iceberg_catalog_db(self) -> str:
        """The default Iceberg catalog of a local output: a SQLite file beside the tables it names."""
        return f"{self.root}/tables/catalog.db"

    def iceberg_table(self) -> str:
        """The Iceberg table's location (`metadata/` and `data/` under it), apart from a Delta table's folder."""
        return f"{self.root}/tables/iceberg/documents"

    # -- the ledger -----------------------------------------------------------------------------------------------
    def costs(self, run_date: date, run_id: str) -> str:
        return f"{self.root}/costs/run_date={run_date.isoformat()}/costs-{run_id}.parquet"

    def runs_dir(self) -> str:
        return f"{self.root}/runs"

    def run_record(self, run_date: date, run_id: str) -> str:
        return f"{self.runs_dir()}/run_date={run_date.isoformat()}/run-{run_id}.parquet"

    # -- the commit and the state it points at --------------------------------------------------------------------
    def manifests_dir(self) -> str:
        return f"{self.root}/manifests"

    def manifest(self, run_id: str, committed_at: datetime) -> str:
        """Manifest names start with the commit time, so the newest committed run is the last name listed."""
        return f"{self.manifests_dir()}/{committed_at.strftime(MANIFEST_TIME_FORMAT)}--{run_id}.json"

    @staticmethod
    def manifest_run_id(path: str) -> str:
        """The run id a manifest's file name carries."""
        return posixpath.basename(path)[: -len(".json")].split("--", 1)[-1]

    @staticmethod
    def manifest_committed_at(path: str) -> datetime | None:
        """The commit time a manifest's file name starts with (None for a name this layout did not write)."""
        stamp = posixpath.basename(path).split("--", 1)[0]
        try:
            return datetime.strptime(stamp, MANIFEST_TIME_FORMAT).replace(tzinfo=UTC)
        except ValueError:
            return None

    def state_documents_dir(self) -> str:
        return f"{self.root}/state/documents"

    def state_snapshot(self, run_id: str) -> str:
        return f"{self.state_documents_dir()}/state-{run_id}.parquet"

    def plans_dir(self) -> str:
        return f"{self.root}/state/plans"

    def plan(self, plan_id: str) -> str:
        return f"{self.plans_dir()}/{plan_id}.parquet"

    def leases_dir(self) -> str:
        return f"{self.root}/state/leases"

    def lease(self, generation: int) -> str:
        return f"{self.leases_dir()}/lease-{generation:010d}.json"

    def frontier_batches(self, *parts: str) -> str:
        """`state/frontier_batches/` (batch records), or a path under it (`staging/...`)."""
        return "/".join([self.root, "state", "frontier_batches", *parts])

    # -- what docroute calibrate and docroute train write ---------------------------------------------------------
    def router(self, version: str | None = None) -> str:
        """The current router (`router.json`), or one version of it."""
        return f"{self.root}/router.json" if version is None else f"{self.root}/routers/router-{version}.json"

    def head(self, version: str) -> str:
        return f"{self.root}/heads/head-{version}.npz"

    def classifier_choice(self, key: str) -> str:
        return f"{self.root}/heads/choice-{key}.json"

    def ranker(self, version: str) -> str:
        return f"{self.root}/rankers/ranker-{version}.npz"

    def training(self, version: str, name: str) -> str:
        return f"{self.root}/training/{version}/{name}"

    def embeddings(self, key: str) -> str:
        return f"{self.root}/training/embeddings/{key}"

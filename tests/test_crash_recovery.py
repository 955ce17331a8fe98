"""Crash recovery the way production fails: real processes SIGKILLed at every step of a run and its commit.

Each run is a separate `python crash_child.py` process using the default local Prefect API (its own PREFECT_HOME,
no PREFECT_API_URL: the ephemeral server and its SQLite database, where a killed run stays "Running"). The child
kills itself with SIGKILL at a named step (tests/crash_child.py), or the test kills it at a random moment. No
person steps in between runs: the next ordinary run must take over, finish the work and leave exactly one current
row per document, with no committed file deleted and no part committed twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from corpus import COOKING, SPORTS, WEATHER, topic_job_yaml
from s3_server import make_bucket, s3_access_yaml
from test_current_table import assert_table_is_current
from test_iceberg_table import assert_iceberg_is_current

from docroute.schemas.layout import OutputLayout
from docroute.schemas.load import load_job
from docroute.schemas.spec import JobSpec, OutputSpec
from docroute.tasks.store.current import current_rows
from docroute.tasks.store.lease import newest_lease
from docroute.tasks.store.table import APP_ID, delta_storage_options

CHILD = Path(__file__).with_name("crash_child.py")
TEXTS = [SPORTS, WEATHER, COOKING]

MID_SHARDS = "docroute.flows.process:update_progress@1"
COMMIT_STEPS = [
    "docroute.flows.process:write_merged_state",  # every part written; no state snapshot yet
    "docroute.flows.process:write_merged_state+after",  # snapshot written; no ledger, no manifest
    "docroute.tasks.account.report:write_json",  # cost table and run row written; no manifest
    "docroute.tasks.account.report:write_json+after",  # manifest written; old snapshots not pruned, no artifacts
    "docroute.flows.process:sync_current_table@2",  # committed; the current table one run behind (call 1: run start)
    "docroute.tasks.store.table:_commit_properties",  # the table's new Delta files written, their commit not made
    "docroute.flows.process:sync_current_table@2+after",  # the table holds the run; plan and old parts not cleaned
    "docroute.flows.process:clean_up_after_commit",  # committed; plan file and obsolete parts not deleted
    "docroute.tasks.store.plan:_delete@1+after",  # part-way through the clean-up
    "docroute.tasks.store.lease:OutputLease.release",  # all done, the lease never given back
]
OUTSIDE_THE_LEASE = [
    "docroute.flows.process:acquire_lease",  # the flow run exists in the API; no lease names it yet
    "docroute.tasks.store.lease:OutputLease.release+after",  # the lease given back; Prefect not yet told Completed
]


def _child_env(home: Path) -> dict[str, str]:
    """The environment of a scheduled run on a fresh machine: no Prefect server configured."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        DO_NOT_TRACK="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL="WARNING",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",  # as `docroute` sets it (flows/cli.py)
    )
    return env


@dataclass
class Harness:
    """A job, its source (local folder or S3 prefix), and what every run must preserve."""

    job: Path
    home: Path
    put: Any  # (name, text) -> None
    remove: Any  # name -> None
    listed: Any  # () -> set of source URIs
    storage: Any  # fsspec filesystem of the output
    output_root: str  # the output in that filesystem's terms
    committed_ever: set[str] = field(default_factory=set)
    log: list[str] = field(default_factory=list)
    added: int = 0

    def add_documents(self, count: int) -> None:
        for _ in range(count):
            self.put(f"doc-{self.added:03d}.txt", f"{TEXTS[self.added % 3]} (item {self.added})\n")
            self.added += 1

    def run(self, kill_at: str = "none", *, kill_after_s: float | None = None, start_at: float | None = None) -> int:
        """One run in its own process; returns its exit code (-9: it was SIGKILLed)."""
        command = [sys.executable, str(CHILD), str(self.job), kill_at]
        if start_at is not None:
            command += ["--start-at", str(start_at)]
        log = self.job.parent / f"run-{len(self.log):03d}.log"
        with log.open("w") as sink:
            child = subprocess.Popen(
                command,
                env=_child_env(self.home),
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: a lost node takes every process of the run
            )
            try:
                child.wait(timeout=kill_after_s if kill_after_s is not None else 300)
            except subprocess.TimeoutExpired:
                os.kill(child.pid, signal.SIGKILL)
                child.wait()
            finally:
                # what the run left running in its group (Prefect's ephemeral API server outlives a killed run)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(child.pid, signal.SIGKILL)
        self.log.append(f"--- {kill_at} (after {kill_after_s}s) rc={child.returncode}\n{log.read_text()[-3000:]}")
        return child.returncode

    def check_committed(self) -> None:
        """What any reader of the output may rely on, after any crash."""
        fs, root = self.storage, self.output_root
        fs.invalidate_cache()
        manifests = (
            sorted(p for p in fs.find(f"{root}/manifests") if p.endswith(".json"))
            if fs.exists(f"{root}/manifests")
            else []
        )
        runs = [OutputLayout.manifest_run_id(p) for p in manifests]
        assert len(runs) == len(set(runs)), f"a run committed twice: {runs}"
        newest_state = None
        for path in manifests:
            manifest = json.loads(fs.cat_file(path))
            urls = [part["url"] for part in manifest["parts"]]
            assert len(urls) == len(set(urls)), f"{path} names a part twice"
            self.committed_ever.update(urls)
            newest_state = manifest.get("state") or newest_state
        missing = [url for url in self.committed_ever if not fs.exists(url.split("://", 1)[-1])]
        assert not missing, f"committed parts deleted: {missing}"
        if newest_state:
            assert fs.exists(newest_state.split("://", 1)[-1]), "the committed state snapshot is gone"
            rows = current_rows(load_job(self.job).output)  # never a FileNotFoundError
            assert rows.is_empty() or rows["doc_id"].n_unique() == rows.height
        spec = load_job(self.job)
        synced = _table_synced_to(spec.output, spec)
        committed_at = [OutputLayout.manifest_committed_at(p) for p in manifests]
        assert synced is None or synced in {_micros(at) for at in committed_at if at}, "the table ran ahead"

    def check_final(self) -> pl.DataFrame:
        """After a normal run: one current row per listed document, nothing stale left behind."""
        self.check_committed()
        output = load_job(self.job).output
        rows = current_rows(output)
        listed = self.listed()
        assert rows.height == len(listed) and rows["doc_id"].n_unique() == rows.height
        assert set(rows["source_uri"].to_list()) == listed
        assert set(rows["route"].to_list()) <= {"small", "deferred"}  # no error rows: every document answered
        fs, root = self.storage, self.output_root
        fs.invalidate_cache()
        parts = {p for p in fs.find(f"{root}/results") if p.endswith(".parquet")}
        committed = {url.split("://", 1)[-1] for url in self.committed_ever}
        assert parts <= committed, f"orphan parts a glob reader would count: {parts - committed}"
        assert not [p for p in fs.find(f"{root}/state/plans")], "a plan was left open"
        lease = newest_lease(output)
        assert lease is not None and lease.released_by == "committed"
        # the current table caught up with every committed run
        if output.table.format == "iceberg":
            assert_iceberg_is_current(self.job)
        else:
            assert_table_is_current(self.job)
        return rows


def _micros(at: datetime) -> int:
    return (at - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def _table_synced_to(output: OutputSpec, spec: JobSpec) -> int | None:
    """The manifest time (µs) the current table says it holds; None when there is no table yet."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    if output.table.format == "iceberg":
        from docroute.tasks.store.iceberg_table import load_iceberg_catalog, load_iceberg_table, synced_version

        catalog = load_iceberg_catalog(output)
        try:
            found = load_iceberg_table(spec, catalog)
            return None if found is None else synced_version(found)
        finally:
            catalog.close()

    try:
        table = DeltaTable(output.layout.current_table(), storage_options=delta_storage_options(output))
    except TableNotFoundError:
        return None
    return table.transaction_version(APP_ID)


_HOME: list[Path] = []


def _prefect_home(tmp_path: Path) -> Path:
    """One local Prefect database for all these tests (creating one costs ~20 s), as on a machine that runs a
    nightly job: each run still starts its own ephemeral API over it."""
    if not _HOME:
        _HOME.append(tmp_path.parent / "crash-prefect-home")
    return _HOME[0]


GEMMA = "  classify_strategy: label_scoring\n"
WORDLLAMA = "  encoder: wordllama\n  classify_strategy: similarity\n"
"""The crash tests are about the run's commit, not the model: WordLlama similarity answers in microseconds where
Gemma's label scoring takes a second per document, so the same kills cost a fraction of the time."""


def _crash_job_text(source: Path, output: Path, table: str = "") -> str:
    text = topic_job_yaml(source, output, shard_size=2, extra="runner: {max_workers: 2}\n").replace(GEMMA, WORDLLAMA)
    assert WORDLLAMA in text
    return text.replace(f"  url: {output}\n", f"  url: {output}\n  table: {table}\n") if table else text


def _local_harness(tmp_path: Path, *, table: str = "") -> Harness:
    from fsspec.implementations.local import LocalFileSystem

    docs = tmp_path / "docs"
    docs.mkdir()
    out = tmp_path / "out"
    job = tmp_path / "job.yaml"
    job.write_text(_crash_job_text(docs, out, table), encoding="utf-8")

    def put(name: str, text: str) -> None:
        (docs / name).write_text(text, encoding="utf-8")

    def remove(name: str) -> None:
        (docs / name).unlink()

    def listed() -> set[str]:
        return {f"file://{p}" for p in docs.iterdir()}

    return Harness(job, _prefect_home(tmp_path), put, remove, listed, LocalFileSystem(), str(out))


def _s3_harness(tmp_path: Path, endpoint: str, bucket: str) -> Harness:
    fs = make_bucket(endpoint, bucket)
    access = s3_access_yaml(endpoint)
    text = _crash_job_text(Path("/in"), Path("/out"))
    text = text.replace("  url: /in\n", f"  url: s3://{bucket}/in\n{access}")
    text = text.replace("  url: /out\n", f"  url: s3://{bucket}/out\n{access}")
    job = tmp_path / "job.yaml"
    job.write_text(text, encoding="utf-8")

    def put(name: str, text: str) -> None:
        fs.pipe(f"{bucket}/in/{name}", text.encode())

    def remove(name: str) -> None:
        fs.rm(f"{bucket}/in/{name}")

    def listed() -> set[str]:
        fs.invalidate_cache()
        return {f"s3://{p}" for p in fs.find(f"{bucket}/in")}

    return Harness(job, _prefect_home(tmp_path), put, remove, listed, fs, f"{bucket}/out")


def _crash_loop(
    harness: Harness, steps: list[str], random_kills: int, seed: int, outside_the_lease: list[str] | None = None
) -> None:
    """Each commit step is hit by a run that resumes a run killed mid-shards, so every crash lands on adopted work
    too; then kills at random moments, and where no lease names the run; then one ordinary run, which must leave
    everything right."""
    rng = random.Random(seed)
    harness.add_documents(6)
    for step in steps:
        harness.add_documents(3)
        assert harness.run(MID_SHARDS) == -signal.SIGKILL, harness.log[-1]
        harness.check_committed()
        harness.add_documents(2)
        if rng.random() < 0.5:
            harness.put("doc-000.txt", f"{COOKING} (rewritten {step})\n")  # a changed file
        assert harness.run(step) == -signal.SIGKILL, harness.log[-1]
        harness.check_committed()
    for _ in range(random_kills):
        harness.add_documents(4)
        harness.run(kill_after_s=rng.uniform(4.0, 16.0))
        harness.check_committed()
    for point in outside_the_lease or []:
        harness.add_documents(1)
        assert harness.run(point) == -signal.SIGKILL, harness.log[-1]
        harness.check_committed()
    assert harness.run() == 0, harness.log[-1]
    harness.check_final()


@pytest.mark.slow
def test_a_crash_loop_on_a_local_folder_ends_with_one_current_row_per_document(tmp_path: Path) -> None:
    harness = _local_harness(tmp_path)
    try:
        _crash_loop(harness, COMMIT_STEPS, random_kills=2, seed=14, outside_the_lease=OUTSIDE_THE_LEASE)
    except AssertionError:
        print("\n".join(harness.log))
        raise
    # every dead run's flow run was found dead and marked Crashed in the local API, not left "Running" or "Pending"
    # (by the run that took over its lease, or, where no lease named it, by the next run on this machine)
    states = _flow_run_states(harness.home)
    assert states.get("RUNNING", 0) == states.get("PENDING", 0) == 0, states
    assert states["COMPLETED"] >= 1 and states["CRASHED"] >= 2 * len(COMMIT_STEPS) + len(OUTSIDE_THE_LEASE), states


def _flow_run_states(home: Path) -> dict[str, int]:
    """Flow runs by state type in the children's local Prefect database, read the way they reach it."""
    script = (
        "import collections, json\n"
        "from prefect.client.orchestration import get_client\n"
        "with get_client(sync_client=True) as client:\n"
        "    runs = client.read_flow_runs(limit=200)\n"
        "print(json.dumps(collections.Counter(r.state.type.value for r in runs if r.state)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=_child_env(home), capture_output=True, text=True, timeout=180, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_crash_loop_on_s3_ends_with_one_current_row_per_document(tmp_path: Path, s3_endpoint: str) -> None:
    harness = _s3_harness(tmp_path, s3_endpoint, "crash-loop")
    steps = [
        "docroute.flows.process:write_merged_state+after",
        "docroute.tasks.account.report:write_json+after",
        "docroute.flows.process:sync_current_table@2",
        "docroute.tasks.store.table:_commit_properties",  # the table's files written to S3, the Delta commit not made
        "docroute.tasks.store.plan:_delete@1+after",
    ]
    try:
        _crash_loop(harness, steps, random_kills=1, seed=41)
    except AssertionError:
        print("\n".join(harness.log))
        raise


@pytest.mark.slow
def test_a_crash_loop_with_an_iceberg_table_never_leaves_it_ahead_and_ends_current(tmp_path: Path) -> None:
    harness = _local_harness(tmp_path, table="{format: iceberg}")
    steps = [
        "docroute.tasks.account.report:write_json+after",  # manifest written; the table one run behind
        "docroute.flows.process:sync_current_table@2",  # committed; the catalog commit not yet made
        "docroute.flows.process:sync_current_table@2+after",  # the table holds the run; clean-up not done
    ]
    try:
        _crash_loop(harness, steps, random_kills=0, seed=23)
    except AssertionError:
        print("\n".join(harness.log))
        raise


def test_a_deleted_source_file_is_marked_not_kept_as_current(tmp_path: Path) -> None:
    harness = _local_harness(tmp_path)
    harness.add_documents(4)
    assert harness.run() == 0, harness.log[-1]
    harness.remove("doc-001.txt")
    assert harness.run() == 0, harness.log[-1]
    output = load_job(harness.job).output
    current = current_rows(output)
    assert current.height == 3 and not current["source_uri"].str.ends_with("doc-001.txt").any()
    everything = current_rows(output, include_deleted=True)
    gone = everything.filter(pl.col("source_uri").str.ends_with("doc-001.txt"))
    assert everything.height == 4 and gone.height == 1 and gone["deleted_at"].item() is not None
    assert everything.filter(pl.col("deleted_at").is_null()).height == 3
    harness.put("doc-001.txt", f"{WEATHER} (item 1)\n")  # it comes back
    assert harness.run() == 0, harness.log[-1]
    assert current_rows(output).height == 4


def test_two_runs_started_together_never_both_process(tmp_path: Path) -> None:
    """Both processes reach the lease at the same instant; the store lets one create it."""
    harness = _local_harness(tmp_path)
    harness.add_documents(4)
    assert harness.run() == 0  # creates the Prefect database once, so both racers start equally fast
    harness.add_documents(4)
    start_at = time.time() + 25
    racers, logs = [], [tmp_path / "first.log", tmp_path / "second.log"]
    for log in logs:
        with log.open("w") as sink:
            racers.append(
                subprocess.Popen(
                    [sys.executable, str(CHILD), str(harness.job), "none", "--start-at", str(start_at)],
                    env=_child_env(harness.home),
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    for racer in racers:
        racer.wait(timeout=300)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(racer.pid, signal.SIGKILL)
    first, second = racers
    outputs = [log.read_text() for log in logs]
    codes = [first.returncode, second.returncode]
    assert sorted(codes)[0] == 0 and sorted(codes)[1] != 0, (codes, outputs)
    loser = outputs[codes.index(max(codes))]
    assert "RunInProgressError" in loser and "holds the lease" in loser, loser
    assert "processed" not in loser
    manifests = list((Path(harness.output_root) / "manifests").glob("*.json"))
    assert len(manifests) == 2  # the first run's and the winner's
    harness.check_final()

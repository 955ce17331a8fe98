"""End-to-end throughput of embedded classification: `docroute run` on 100k short messages in a local folder.

    python bench/throughput.py [--documents 100000] [--shard-size N] [--max-workers 2] [--no-append]

What a user does, timed (issue 15, item 4; target ≥ 3,000 documents/s on 2 cores):

1. N synthetic customer messages (5-30 words, ten intents, deterministic seed) are written as .txt files, 1,000 to
   a folder, with an examples CSV of 20 labeled messages per intent (drawn from another seed, so none is a
   document), and a job: `small_model: {engine: llamacpp, encoder: wordllama, classify_strategy: embedding_head}`,
   no frontier (low-confidence rows are written `deferred`, nothing calls an API), local Parquet out.
2. `docroute run job.yaml` in a fresh process (the CLI's own code path: `docroute.flows.cli.app`), twice: the
   first run processes every document, the second finds nothing changed (the incremental run). Wall time is the
   whole process, from interpreter start to exit: imports, the ephemeral Prefect API's start, the engine build
   (the head trained on the examples), the flow, and the summary.
3. The breakdown comes from the same runs: the child process wraps the pipeline's functions (the names the flow
   and the shard task look up: `discover_documents`, `read_documents`, `run_engine`, `rows_to_table`, …) with
   timers. Stages inside shards run on `runner.max_workers` threads, so they are summed thread-seconds, not wall
   seconds; "Prefect and the rest" is what remains of the flow's wall time.

Every run is checked: rows written == unique doc ids == N. Results: a Markdown table on stdout, appended to
BENCHMARKS.md, raw numbers in bench/results/throughput/results.json.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from publish import machine_line, publish  # bench/publish.py

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "throughput"
DOCS_PER_FOLDER = 1000
SEED = 15
CHANGED_EVERY = 10
"""The third run follows a change to every 10th file: the current table's MERGE at a tenth of the documents."""
TABLE_STAGE = "commit: current table (Delta MERGE)"
EXAMPLES_PER_LABEL = 20

# ------------------------------------------------------------------------------------------- synthetic messages

INTENTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "card_arrival": (
        "the customer is waiting for a new card to be delivered",
        (
            "my new card has not arrived yet",
            "when will my card be delivered",
            "I am still waiting for the card you sent",
            "how long does the card take to arrive",
            "can I track the delivery of my card",
            "the replacement card never showed up in the mail",
        ),
    ),
    "lost_or_stolen_card": (
        "the card was lost or stolen",
        (
            "I lost my card yesterday",
            "someone stole my wallet with my card",
            "my card was stolen please block it",
            "I cannot find my card anywhere",
            "I think my card has been taken",
            "please freeze my card it is missing",
        ),
    ),
    "exchange_rate": (
        "questions about currency exchange rates",
        (
            "what exchange rate do you use",
            "how much is one euro in dollars today",
            "why was the exchange rate so bad",
            "do you add a margin on currency conversion",
            "which rate applies when I pay abroad",
            "the conversion rate on my statement looks wrong",
        ),
    ),
    "pin_blocked": (
        "the PIN is blocked after wrong attempts",
        (
            "my pin is blocked",
            "I entered the wrong pin three times",
            "how do I unblock my pin",
            "the machine says my pin is locked",
            "I forgot my pin and now it is blocked",
            "can you reset my blocked pin code",
        ),
    ),
    "cash_withdrawal_charge": (
        "a fee was charged for an ATM cash withdrawal",
        (
            "why was I charged for taking out cash",
            "there is a fee on my atm withdrawal",
            "I thought cash withdrawals were free",
            "the cash machine charged me extra",
            "what does a withdrawal at an atm cost",
            "I see a charge after withdrawing money",
        ),
    ),
    "transfer_not_received": (
        "a transfer sent to someone has not arrived",
        (
            "my friend did not get the money I sent",
            "the transfer has not reached the recipient",
            "I sent a payment but it never arrived",
            "how long until my transfer shows up for them",
            "the bank transfer is still missing on their side",
            "the person I paid says nothing came through",
        ),
    ),
    "refund_request": (
        "the customer wants money back for a purchase",
        (
            "I want a refund for this order",
            "the shop promised to give my money back",
            "how do I get reimbursed for a cancelled purchase",
            "the merchant refund is not on my account",
            "please return the money for the faulty item",
            "I returned the goods but got no refund",
        ),
    ),
    "account_closure": (
        "the customer wants to close the account",
        (
            "please close my account",
            "I want to delete my account and all data",
            "how can I terminate my account with you",
            "I no longer need this account cancel it",
            "what happens to my balance if I close the account",
            "I am leaving the bank close everything",
        ),
    ),
    "address_change": (
        "the customer moved and wants to update the address",
        (
            "I moved and need to change my address",
            "how do I update my home address",
            "my address on file is wrong",
            "please send letters to my new address",
            "where can I edit my postal address in the app",
            "I have a new flat update my details",
        ),
    ),
    "app_login_problem": (
        "the customer cannot log in to the app",
        (
            "I cannot log in to the app",
            "the app keeps rejecting my password",
            "login fails with an error every time",
            "I am locked out of my online banking",
            "the verification code never arrives when I sign in",
            "the app crashes on the login screen",
        ),
    ),
}
OPENERS = ("hi", "hello", "hey there", "good morning", "excuse me", "dear support", "urgent", "quick question")
FILLERS = (
    "this is really annoying",
    "I need help as soon as possible",
    "it happened last week",
    "I am travelling at the moment",
    "thanks in advance",
    "can someone explain",
    "nobody answered my last message",
    "I use the card every day",
    "it was around 40 dollars",
    "this is the second time",
    "please advise",
    "my name is on the account",
    "I checked the app twice",
    "it is for my business account",
    "the reference number is on the receipt",
)


def message(rng: random.Random, label: str) -> str:
    """One message of `label`: an opener sometimes, a core phrase, fillers; 5-30 words, cut at a random length."""
    words: list[str] = []
    if rng.random() < 0.4:
        words += rng.choice(OPENERS).split()
    words += rng.choice(INTENTS[label][1]).split()
    target = rng.randint(5, 30)
    while len(words) < target:
        words += rng.choice(FILLERS).split()
        if rng.random() < 0.15:
            words.append(str(rng.randint(1, 9999)))
    return " ".join(words[: max(target, 5)]).capitalize() + rng.choice((".", "?", "!", ""))


def write_corpus(folder: Path, n: int, seed: int = SEED) -> None:
    """N messages as .txt files, DOCS_PER_FOLDER to a sub-folder, labels spread evenly."""
    rng = random.Random(seed)
    labels = list(INTENTS)
    for i in range(n):
        sub = folder / f"d{i // DOCS_PER_FOLDER:04d}"
        if i % DOCS_PER_FOLDER == 0:
            sub.mkdir(parents=True, exist_ok=True)
        (sub / f"msg{i:07d}.txt").write_text(message(rng, labels[i % len(labels)]) + "\n", encoding="utf-8")


def change_every(folder: Path, step: int) -> int:
    """Append a sentence to every `step`-th message (sorted by name) so the next run sees it changed; how many."""
    changed = 0
    for i, path in enumerate(sorted(folder.rglob("*.txt"))):
        if i % step == 0:
            path.write_text(path.read_text(encoding="utf-8").rstrip("\n") + " Any update?\n", encoding="utf-8")
            changed += 1
    return changed


def write_examples(path: Path, per_label: int = EXAMPLES_PER_LABEL, seed: int = SEED + 1) -> None:
    """The labeled examples the embedding head trains on (another seed than the documents)."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for label in INTENTS:
            for _ in range(per_label):
                writer.writerow([message(rng, label), label])


def job_yaml(source: Path, examples: Path, output: Path, shard_size: int | None, max_workers: int) -> str:
    """The job a user would write for this corpus: the cheap bundled encoder and a head, no frontier."""
    labels = "\n".join(
        f"      - name: {name}\n        description: {description}" for name, (description, _) in INTENTS.items()
    )
    shard = f"shard_size: {shard_size}\n" if shard_size is not None else ""
    return f"""name: bench-throughput
source:
  url: {source}
  glob: "**/*.txt"
task:
  instructions: Messages sent by customers of an online bank.
  classify:
    examples_file: {examples}
    labels:
{labels}
small_model:
  engine: llamacpp
  encoder: wordllama
  classify_strategy: embedding_head
routing:
  threshold: 0.6
output:
  url: {output}
{shard}runner:
  max_workers: {max_workers}
"""


# ------------------------------------------------------------------------------------------- child: timed CLI run

# (module, attribute, stage): the names the flow and the shard task call, so wrapping them times the real calls
STAGES: tuple[tuple[str, str, str], ...] = (
    ("docroute.flows.process", "acquire_lease", "lease"),
    ("docroute.flows.process", "discover_documents", "discover (listing)"),
    ("docroute.flows.process", "open_run_state", "state: previous state vs listing"),
    ("docroute.flows.process", "select_todo", "state: select to-do"),
    ("docroute.flows.process", "make_plan", "plan"),
    ("docroute.flows.process", "write_plan", "plan"),
    ("docroute.flows.process", "_spill_part_state", "flow: spill shard state"),
    ("docroute.flows.process", "update_progress", "flow: progress artifact"),
    ("docroute.flows.process", "start_progress", "flow: progress artifact"),
    ("docroute.flows.process", "write_merged_state", "commit: state snapshot"),
    ("docroute.flows.process", "merge_entries", "commit: ledger"),
    ("docroute.flows.process", "run_record", "commit: ledger"),
    ("docroute.flows.process", "write_ledger", "commit: ledger + manifest"),
    ("docroute.flows.process", "clean_up_after_commit", "commit: clean-up"),
    ("docroute.flows.process", "sync_current_table", TABLE_STAGE),
    ("docroute.tasks.shard", "read_documents", "shard: read + parse"),
    ("docroute.tasks.shard", "small_engine", "shard: engine lookup / build"),
    ("docroute.tasks.shard", "run_engine", "shard: engine predict"),
    ("docroute.tasks.shard", "answer_documents", "shard: answer (route + rows)"),
    ("docroute.tasks.shard", "rows_to_table", "shard: rows → Arrow"),
    ("docroute.tasks.shard", "write_parquet", "shard: write Parquet"),
    ("docroute.tasks.shard", "write_errors", "shard: write Parquet"),
    ("docroute.tasks.shard", "write_staging", "shard: other"),
    ("docroute.tasks.shard", "hand_over_part_state", "shard: hand state to flow"),
    ("docroute.tasks.shard", "shard_result", "shard: tallies"),
)
BODY = "flow body (docroute's run_job)"
SHARD_BODY = "shard: task body, untimed rest"


class Timers:
    """Seconds per stage, summed over threads, exclusive of the timed stages nested in it; calls per stage.

    Exclusive, so that the stages add up: the shard body's own line is what none of its timed stages covers.
    `inclusive` keeps the whole time of the outer stages (the flow body, the shard body).
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.inclusive: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stack = threading.local()

    def wrap(self, function: Callable[..., Any], stage: str) -> Callable[..., Any]:
        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            nested: list[float] = getattr(self._stack, "nested", [])
            self._stack.nested = nested
            nested.append(0.0)  # time spent in timed stages called from this one
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - started
                inner = nested.pop()
                if nested:
                    nested[-1] += elapsed
                with self._lock:
                    self.seconds[stage] = self.seconds.get(stage, 0.0) + elapsed - inner
                    self.inclusive[stage] = self.inclusive.get(stage, 0.0) + elapsed
                    self.calls[stage] = self.calls.get(stage, 0) + 1

        return timed


def run_child(job: Path, result_path: Path, full_refresh: bool) -> None:
    """`docroute run job.yaml` in this process with the pipeline's functions timed; numbers to `result_path`."""
    started = time.perf_counter()
    import importlib

    from docroute.flows import cli  # typer only: Prefect is not imported yet

    cli._quiet_prefect()  # as `docroute run` does before Prefect configures its logging (console at WARNING)
    from docroute.flows.prefect_api import start_ephemeral_api_early

    # `docroute run` starts the API after validating the job and before importing the pipeline; the imports below
    # (needed to wrap the pipeline in timers) are that import, so the API starts here, where the CLI would
    start_ephemeral_api_early()
    import docroute.flows.process as process_module

    timers = Timers()
    for module_name, attribute, stage in STAGES:
        module = importlib.import_module(module_name)
        setattr(module, attribute, timers.wrap(getattr(module, attribute), stage))
    shard_module = importlib.import_module("docroute.tasks.shard")
    shard_module.process_shard.fn = timers.wrap(shard_module.process_shard.fn, SHARD_BODY)
    from docroute import engines

    engines.build_small_engine = timers.wrap(engines.build_small_engine, "engine build (head training)")
    importlib.import_module("docroute.tasks.model.infer").build_small_engine = engines.build_small_engine
    flow = process_module.process_documents
    flow.fn = timers.wrap(flow.fn, BODY)
    flow_timer: dict[str, float] = {}

    def timed_flow(*args: Any, **kwargs: Any) -> Any:
        began = time.perf_counter()
        try:
            return flow(*args, **kwargs)
        finally:
            flow_timer["seconds"] = time.perf_counter() - began

    process_module.process_documents = timed_flow  # cli._run imports it from the module at call time
    imported = time.perf_counter() - started
    arguments = ["run", str(job)] + (["--full-refresh"] if full_refresh else [])
    cli.app(arguments, standalone_mode=False)
    result = {
        "imports_seconds": imported,
        "flow_seconds": flow_timer.get("seconds"),
        "stages": timers.seconds,
        "inclusive": timers.inclusive,
        "calls": timers.calls,
    }
    result_path.write_text(json.dumps(result), encoding="utf-8")


# ------------------------------------------------------------------------------------------- parent


def child_env(prefect_home: Path, api_url: str | None = None) -> dict[str, str]:
    """No analytics, a private Prefect home (a fresh database); the ephemeral local API unless `api_url` is given."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_PROFILE")}
    env.update(
        {
            "DO_NOT_TRACK": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_HOME": str(prefect_home),
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        }
    )
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


@contextlib.contextmanager
def prefect_server(prefect_home: Path) -> Iterator[str]:
    """A `prefect server start` of its own for the runs, as a deployment has one: yields its API URL.

    Without it every `docroute run` starts Prefect's ephemeral API in a subprocess and waits for it; with it the
    runs measure docroute and the flow, not that start-up.
    """
    import socket
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    command = [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1"]
    server = subprocess.Popen(
        [*command, "--port", str(port), "--no-ui"],
        env=child_env(prefect_home),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the Prefect server did not start") from None
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=60)


START_AND_STOP_API = "from prefect.server.api.server import SubprocessASGIServer as S; S().start(); S().stop()"


def prepare_prefect_home(prefect_home: Path) -> float:
    """Start and stop the ephemeral API once, untimed: as on any machine after its first Prefect run.

    A fresh `PREFECT_HOME` makes the first API start create the database (every migration) and register Prefect's
    block types, 6–10 s here that no later run pays; `--cold-prefect-home` measures it instead.
    """
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", START_AND_STOP_API],
        env=child_env(prefect_home),
        capture_output=True,
        check=True,
    )
    return time.perf_counter() - started


def timed_run(
    job: Path, prefect_home: Path, *, full_refresh: bool, profile: Path | None, api_url: str | None = None
) -> dict[str, Any]:
    """One `docroute run` in a fresh process; wall seconds of the whole process and the child's own numbers."""
    result_path = job.parent / f"result-{time.monotonic_ns()}.json"
    command = [sys.executable, __file__, "--child", str(job), str(result_path)]
    if full_refresh:
        command.append("--full-refresh")
    if profile is not None:  # py-spy samples every thread (cProfile would see the main thread only)
        command = [
            str(Path(sys.executable).parent / "py-spy"),
            "record",
            "--idle",
            "-r",
            "100",
            "-f",
            "raw",
            "-o",
            str(profile),
            "--",
            *command,
        ]
    started = time.perf_counter()
    completed = subprocess.run(
        command, env=child_env(prefect_home, api_url), capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - started
    if completed.returncode != 0:
        raise SystemExit(f"docroute run failed ({completed.returncode}):\n{completed.stdout}\n{completed.stderr}")
    result = json.loads(result_path.read_text(encoding="utf-8"))
    result["wall_seconds"] = wall
    result["stdout"] = completed.stdout
    return result


def count_rows(output: Path) -> tuple[int, int]:
    """Rows and distinct doc ids across the committed result parts."""
    import polars as pl

    frame = (
        pl.scan_parquet(str(output / "results" / "**" / "*.parquet"))
        .select(pl.len().alias("rows"), pl.col("doc_id").n_unique().alias("ids"))
        .collect()
    )
    return int(frame["rows"][0]), int(frame["ids"][0])


def route_counts(output: Path) -> dict[str, int]:
    import polars as pl

    frame = pl.scan_parquet(str(output / "results" / "**" / "*.parquet")).group_by("route").len().collect()
    return {str(route): int(n) for route, n in frame.iter_rows()}


def _rate(n: int, seconds: float | None) -> str:
    return f"{n / seconds:,.0f}" if seconds else "—"


def breakdown_rows(result: dict[str, Any], n: int) -> list[str]:
    """Table rows: each stage's (exclusive) seconds and what docs/s it alone would allow."""
    stages: dict[str, float] = dict(result["stages"])
    inclusive: dict[str, float] = result["inclusive"]
    calls: dict[str, int] = result["calls"]
    flow = result["flow_seconds"] or 0.0
    body = inclusive.get(BODY, 0.0)
    flow_own = stages.pop(BODY, 0.0)  # the body's time outside every timed stage
    shards = inclusive.get(SHARD_BODY, 0.0)
    workers = result.get("max_workers", 1)
    flow_side = body - shards  # thread-seconds are not wall seconds: shards overlap the flow's own loop
    rows = [
        f"| Prefect flow run around the body: the ephemeral API's start (none with a server), flow run states | 1 | "
        f"{flow - body:.2f} | "
        f"{_rate(n, flow - body)} |",
        f"| flow body (docroute's `run_job`, wall) | 1 | {body:.2f} | {_rate(n, body)} |",
    ]
    for stage in sorted(stages, key=lambda s: (s.startswith("shard"), -stages[s])):
        rows.append(f"| · {stage} | {calls.get(stage, 0):,} | {stages[stage]:.2f} | {_rate(n, stages[stage])} |")
    rows.append(
        f"| · flow thread outside the stages above: submitting shards, waiting for them, Prefect bookkeeping | 1 | "
        f"{flow_own:.2f} | — |"
    )
    if shards:
        rows.append(
            f"| shard task bodies, all stages (thread-seconds over {workers} threads; body − this / {workers} = "
            f"{flow_side + shards - shards / workers:.1f} s of flow wall outside shard bodies) | "
            f"{calls.get(SHARD_BODY, 0):,} | {shards:.2f} | {_rate(n, shards)} |"
        )
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--documents", type=int, default=100_000)
    parser.add_argument("--shard-size", type=int, default=None, help="default: the job's default (JobSpec)")
    parser.add_argument("--max-workers", type=int, default=2)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--profile", type=Path, default=None, help="py-spy raw profile of the full run here")
    parser.add_argument(
        "--prefect-server",
        action="store_true",
        help="run against a `prefect server start` of the benchmark's own instead of the ephemeral API",
    )
    parser.add_argument(
        "--cold-prefect-home",
        action="store_true",
        help="time the first run with a Prefect home that has no database yet (its migrations run in it)",
    )
    parser.add_argument("--note", default="", help="a sentence added under the table")
    parser.add_argument("--no-append", action="store_true", help="do not append the table to BENCHMARKS.md")
    parser.add_argument("--child", nargs=2, metavar=("JOB", "RESULT"), help=argparse.SUPPRESS)
    parser.add_argument("--full-refresh", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.child:
        run_child(Path(options.child[0]), Path(options.child[1]), options.full_refresh)
        return

    n = options.documents
    with tempfile.TemporaryDirectory(prefix="docroute-throughput-") as scratch_name:
        scratch = Path(scratch_name)
        source, output = scratch / "docs", scratch / "out"
        started = time.perf_counter()
        write_corpus(source, n)
        write_examples(scratch / "examples.csv")
        generate_seconds = time.perf_counter() - started
        job = scratch / "job.yaml"
        job.write_text(
            job_yaml(source, scratch / "examples.csv", output, options.shard_size, options.max_workers),
            encoding="utf-8",
        )
        from docroute.schemas.load import load_job

        spec = load_job(job)
        home = scratch / "prefect-home"
        database_seconds = None if options.cold_prefect_home else prepare_prefect_home(home)
        with prefect_server(home) if options.prefect_server else contextlib.nullcontext() as api_url:
            first = timed_run(job, home, full_refresh=False, profile=options.profile, api_url=api_url)
            rows, ids = count_rows(output)
            if rows != n or ids != n:
                raise SystemExit(f"the run wrote {rows} rows ({ids} distinct doc ids) for {n} documents")
            routes = route_counts(output)
            second = timed_run(job, home, full_refresh=False, profile=None, api_url=api_url)
            rows_after, _ = count_rows(output)
            if rows_after != n:
                raise SystemExit(f"the incremental run changed the rows: {rows_after} for {n} documents")
            changed = change_every(source, CHANGED_EVERY)
            third = timed_run(job, home, full_refresh=False, profile=None, api_url=api_url)
            rows_changed, _ = count_rows(output)
            if rows_changed != n + changed:
                raise SystemExit(f"the run over {changed} changed files wrote {rows_changed - n} rows")
    for result in (first, second, third):
        result["max_workers"] = options.max_workers
    command = (
        f"python bench/throughput.py --documents {n} --max-workers {options.max_workers}"
        + (f" --shard-size {options.shard_size}" if options.shard_size else "")
        + (" --prefect-server" if options.prefect_server else "")
        + (" --cold-prefect-home" if options.cold_prefect_home else "")
    )
    from memory_flat import machine  # the sibling benchmark's helper

    info = machine()
    shard_size = spec.shard_size or f"{spec.shard_size_for(n)} (the default for this run)"
    engine_build = first["stages"].get("engine build (head training)", 0.0)
    flow = first["flow_seconds"]
    lines = [
        f"{machine_line(info, command)} No GPU; 2 cores shared with other work (run under `nice -n 5`), so "
        "expect noise of ±10% or more. Prefect API: "
        + (
            "a `prefect server start` already running (as a deployment has)."
            if options.prefect_server
            else "the ephemeral one each `docroute run` starts (no PREFECT_API_URL)."
        )
        + (
            " The Prefect home had no database: the first run's API start ran its migrations."
            if database_seconds is None
            else f" The Prefect home was prepared before the runs (database and block types, {database_seconds:.0f} s, "
            "untimed), as on any machine after its first Prefect run."
        ),
        f"{n:,} synthetic messages (5-30 words, 10 intents, seed {SEED}), 1,000 .txt files per folder, written in "
        f"{generate_seconds:.0f} s (not timed); {len(INTENTS) * EXAMPLES_PER_LABEL} labeled examples; "
        f"`small_model: {{engine: llamacpp, encoder: wordllama, classify_strategy: embedding_head}}`, no frontier; "
        f"shard_size {shard_size}, {options.max_workers} threads. Routes: "
        + ", ".join(f"{route} {count:,}" for route, count in sorted(routes.items()))
        + ".",
        "",
        "| run | process wall s | docs/s (whole process) | flow s | docs/s (flow) |",
        "|---|---:|---:|---:|---:|",
        f"| first run: every document | {first['wall_seconds']:.1f} | {_rate(n, first['wall_seconds'])} | "
        f"{flow:.1f} | {_rate(n, flow)} |",
        f"| second run: nothing changed | {second['wall_seconds']:.1f} | {_rate(n, second['wall_seconds'])} | "
        f"{second['flow_seconds']:.1f} | {_rate(n, second['flow_seconds'])} |",
        "",
        f"First run, where the time goes (process start → flow start {first['wall_seconds'] - flow:.1f} s: Python "
        f"imports {first['imports_seconds']:.1f} s, CLI validation; the engine build "
        f"{engine_build:.1f} s is inside the flow, in the first shard). Shard stages are thread-seconds summed over "
        f"{options.max_workers} threads.",
        "",
        "| stage | calls | seconds | docs/s if alone |",
        "|---|---:|---:|---:|",
        *breakdown_rows(first, n),
        "",
        "Second run (nothing changed):",
        "",
        "| stage | calls | seconds | docs/s if alone |",
        "|---|---:|---:|---:|",
        *breakdown_rows(second, n),
        "",
        f"The current table's share of each run (`sync_current_table`: the check at the run's start and the commit "
        f"after its manifest; the third run follows a change to every {CHANGED_EVERY}th file, {changed:,} files, so "
        f"its commit is a Delta MERGE of {changed:,} rows into a {n:,}-row table):",
        "",
        "| run | table sync s | flow s | share of the flow |",
        "|---|---:|---:|---:|",
        *(
            f"| {name} | {result['stages'].get(TABLE_STAGE, 0.0):.2f} | {result['flow_seconds']:.1f} | "
            f"{result['stages'].get(TABLE_STAGE, 0.0) / max(result['flow_seconds'], 1e-9):.1%} |"
            for name, result in (
                ("first run: every document (one rewrite commit)", first),
                ("second run: nothing changed", second),
                (f"third run: {changed:,} changed files (MERGE)", third),
            )
        ),
    ]
    if options.note:
        lines += ["", options.note]
    table = "\n".join(lines)
    print(table)
    payload = {
        "machine": info,
        "command": command,
        "documents": n,
        "shard_size": spec.shard_size,
        "max_workers": options.max_workers,
        "routes": routes,
        "first": {k: v for k, v in first.items() if k != "stdout"},
        "second": {k: v for k, v in second.items() if k != "stdout"},
        "third": {k: v for k, v in third.items() if k != "stdout"},
        "first_stdout": first["stdout"],
        "second_stdout": second["stdout"],
    }
    publish(options.results, "Embedded classification throughput", table, payload, append=not options.no_append)


if __name__ == "__main__":
    main()

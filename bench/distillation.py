"""The distillation loop on BANKING77: does each `docroute train` round lower the escalation rate and the bill?

    python bench/distillation.py [--rounds 5 --per-round 1000 --examples-per-label 20 --audit 0.2]

Reads `../shared/datasets/banking77` (never copied into the repository). The job starts from a handful of labeled
examples per intent; round 0 calibrates a router with the frontier as oracle on a sample of round 1's documents.
Each round then processes `--per-round` new messages with `process_documents` (the real flow, the embedded model,
real frontier calls to an OpenAI-compatible server on 127.0.0.1 that answers with the gold intent, priced at
gpt-4o-mini's list price), and runs `docroute train`, which refits the head on the examples plus every frontier
label so far, certifies it on the audit sample and promotes it only when its certified escalation rate is lower.
Prints a table, saves a plot and the raw numbers under bench/results/distillation/, appends to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the OpenAI-compatible test server

from memory_flat import machine  # bench/memory_flat.py
from publish import machine_line, publish  # bench/publish.py

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "datasets" / "banking77"
RESULTS = ROOT / "bench" / "results" / "distillation"


def split_banking77(per_round: int, rounds: int, examples_per_label: int, seed: int) -> tuple[list, list]:
    """A few examples per intent for the job, then `rounds` disjoint batches of new messages."""
    rows = list(csv.DictReader((SHARED / "train.csv").open(encoding="utf-8")))
    random.Random(seed).shuffle(rows)
    examples: list[dict[str, str]] = []
    taken: dict[str, int] = {}
    rest = []
    for row in rows:
        if taken.get(row["category"], 0) < examples_per_label:
            taken[row["category"]] = taken.get(row["category"], 0) + 1
            examples.append(row)
        else:
            rest.append(row)
    batches = [rest[i * per_round : (i + 1) * per_round] for i in range(rounds)]
    if len(batches[-1]) < per_round:
        raise SystemExit(f"BANKING77 train has too few messages for {rounds} rounds of {per_round}")
    return examples, batches


def job_yaml(scratch: Path, source: Path, base_url: str, options: argparse.Namespace) -> str:
    labels = json.loads((SHARED / "categories.json").read_text())
    label_lines = "\n".join(f"      - {{name: {json.dumps(name)}}}" for name in labels)
    return f"""name: bench-distillation
source: {{url: {source}}}
task:
  instructions: Messages sent by customers of an online bank.
  classify:
    examples_file: {scratch / "examples.csv"}
    labels:
{label_lines}
small_model: {{engine: llamacpp}}  # classify_strategy auto: the encoder is measured on the examples
frontier:
  provider: openai
  model: gpt-4o-mini
  base_url: {base_url}
  api_key: sk-bench-not-a-real-key
  max_retries: 1
routing:
  target_accuracy: {options.target}
  delta: {options.delta}
  audit_fraction: {options.audit}
  max_frontier_usd: null
output: {{url: {scratch / "out"}}}
shard_size: 256
"""


def kept_accuracy(output: Path, run_id: str, gold: dict[str, str]) -> tuple[int, int]:
    """How many of the rows the small model kept in this run carry the gold intent (the certificate's claim)."""
    import polars as pl

    rows = pl.read_parquet(f"{output}/results/**/*.parquet").filter(
        (pl.col("run_id") == run_id) & (pl.col("route") == "small")
    )
    right = 0
    for uri, label in zip(rows["source_uri"].to_list(), rows["label"].to_list(), strict=True):
        text = Path(uri.removeprefix("file://").removeprefix("file:")).read_text(encoding="utf-8").strip()
        right += gold[text] == label
    return right, rows.height


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in rows]
    fig, left = plt.subplots(figsize=(7, 4))
    left.plot(rounds, [100 * r["escalation_rate"] for r in rows], "o-", color="tab:red", label="escalation rate")
    left.set_xlabel("run (1,000 new documents each)")
    left.set_ylabel("escalated rows, %", color="tab:red")
    left.set_ylim(0, 100)
    left.set_xticks(rounds)
    right = left.twinx()
    right.plot(rounds, [r["cost_per_1k"] for r in rows], "s--", color="tab:blue", label="cost per 1,000 documents")
    right.plot(rounds, [r["all_frontier_per_1k"] for r in rows], ":", color="tab:gray", label="all-frontier per 1,000")
    right.set_ylabel("USD per 1,000 documents", color="tab:blue")
    right.set_ylim(0, max(r["all_frontier_per_1k"] for r in rows) * 1.15)
    lines = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    names = left.get_legend_handles_labels()[1] + right.get_legend_handles_labels()[1]
    left.legend(lines, names, loc="upper right", fontsize=8)
    left.set_title("BANKING77: docroute train after every run (frontier played by the gold labels)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=1000)
    parser.add_argument("--examples-per-label", type=int, default=20)
    parser.add_argument("--audit", type=float, default=0.2, help="routing.audit_fraction: the held-out sample")
    parser.add_argument("--calibration-sample", type=int, default=200)
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--delta", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--no-append", action="store_true", help="do not append the table to BENCHMARKS.md")
    options = parser.parse_args(argv)
    if not SHARED.exists():
        raise SystemExit(f"{SHARED} not found: this benchmark needs the shared BANKING77 data")

    home = Path(tempfile.mkdtemp(prefix="docroute-distillation-prefect-"))
    os.environ.pop("PREFECT_API_URL", None)
    os.environ.pop("PREFECT_PROFILE", None)
    os.environ.update({"PREFECT_HOME": str(home), "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})

    from oracle_server import OracleServer

    from docroute.flows.calibrate import calibrate
    from docroute.flows.process import process_documents
    from docroute.flows.train import train

    examples, batches = split_banking77(options.per_round, options.rounds, options.examples_per_label, options.seed)
    gold = {row["text"].strip(): row["category"] for batch in batches for row in batch}
    # longest first: a message that contains a shorter one as a substring still finds its own answer
    answers = [(text, {"label": label}) for text, label in sorted(gold.items(), key=lambda kv: -len(kv[0]))]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="docroute-distillation-") as name, OracleServer(answers) as server:
        scratch = Path(name)
        with (scratch / "examples.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            writer.writerows((r["text"], r["category"]) for r in examples)
        jobs = []
        for index, batch in enumerate(batches, start=1):
            folder = scratch / f"round{index}"
            folder.mkdir()
            for i, row in enumerate(batch):
                (folder / f"m{i:05d}.txt").write_text(row["text"] + "\n", encoding="utf-8")
            job = scratch / f"round{index}.yaml"
            job.write_text(job_yaml(scratch, folder, f"{server.base_url}", options), encoding="utf-8")
            jobs.append(str(job))
        started = time.perf_counter()
        calibrate(jobs[0], oracle="frontier", sample=options.calibration_sample)
        calibrate_seconds = time.perf_counter() - started
        for index, job in enumerate(jobs, start=1):
            started = time.perf_counter()
            run = process_documents(job)
            run_seconds = time.perf_counter() - started
            kept_right, kept = kept_accuracy(scratch / "out", run.run_id, gold)
            started = time.perf_counter()
            trained = train(job)
            train_seconds = time.perf_counter() - started
            comparison = trained.get("comparison") or {}
            row = {
                "round": index,
                "router": run.router_version,
                "head": run.head_version or "examples",
                "documents": run.documents,
                "escalated": run.escalated,
                "escalation_rate": run.escalation_rate,
                "kept": kept,
                "kept_accuracy": kept_right / kept if kept else None,
                "audited": run.audited,
                "cost_usd": run.cost_usd,
                "cost_per_1k": 1000 * run.cost_usd / run.documents,
                "all_frontier_per_1k": 1000 * (run.all_frontier_usd or 0) / run.documents,
                "run_seconds": run_seconds,
                "train_seconds": train_seconds,
                "train_labels": trained["train_labels"],
                "holdout": trained["holdout"],
                "current_escalation": (comparison.get("current") or {}).get("escalation_rate"),
                "candidate_escalation": (comparison.get("candidate") or {}).get("escalation_rate"),
                "candidate_accuracy": comparison.get("candidate_accuracy"),
                "promoted": trained["promoted"],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)

    options.results.mkdir(parents=True, exist_ok=True)
    plot(rows, options.results / "escalation_and_cost.png")
    info = machine()
    command = "python bench/distillation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    publish(
        options.results,
        "Distillation loop · banking77",
        table(rows, options, machine_line(info, command.strip()), calibrate_seconds),
        {
            "machine": info,
            "command": command.strip(),
            "calibrate_seconds": calibrate_seconds,
            "options": {k: str(v) for k, v in vars(options).items()},
            "rounds": rows,
        },
        append=not options.no_append,
    )


def table(rows: list[dict[str, Any]], options: argparse.Namespace, machine: str, calibrate_seconds: float) -> str:
    """The BENCHMARKS.md table: one line per run, with the training round that followed it."""
    lines = [
        machine,
        f"{options.examples_per_label} examples per intent to start ({77 * options.examples_per_label}); round 0 on "
        f"{options.calibration_sample} frontier-labeled messages in {calibrate_seconds:.0f} s; target accuracy "
        f"{options.target} with probability ≥ {1 - options.delta}; audit sample {options.audit:.0%} (the held-out "
        "set). Frontier played by the gold labels at gpt-4o-mini's list price; costs include the audits.",
        "",
        "| run | head used | escalation | kept rows right | cost / 1k docs | all-frontier / 1k | then trained on "
        "| held out | certified escalation: current → candidate | candidate held-out accuracy | promoted "
        "| run s + train s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---|---|",
    ]
    for r in rows:
        certified = (
            "—"
            if r["current_escalation"] is None
            else f"{r['current_escalation']:.1%} → {r['candidate_escalation']:.1%}"
        )
        accuracy = "—" if r["candidate_accuracy"] is None else f"{r['candidate_accuracy']:.3f}"
        kept = "—" if not r["kept"] else f"{r['kept_accuracy']:.3f} of {r['kept']}"
        lines.append(
            f"| {r['round']} | {r['head']} | {r['escalation_rate']:.1%} | {kept} | ${r['cost_per_1k']:.4f} "
            f"| ${r['all_frontier_per_1k']:.4f} | {r['train_labels']} labels + examples | {r['holdout']} "
            f"| {certified} | {accuracy} | {'yes' if r['promoted'] else 'no'} "
            f"| {r['run_seconds']:.0f} + {r['train_seconds']:.0f} |"
        )
    lines += ["", "![escalation and cost per run](bench/results/distillation/escalation_and_cost.png)"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""Certified routing on real labeled data: calibrate on one split, evaluate on another, frontier played by the gold.

    python bench/routing_economics.py banking77 [--train 1500 --calibrate 1000 --evaluate 1000]
    python bench/routing_economics.py sroie [--calibrate 150 --evaluate 150]
    (--guarantee overall: the target bounds the routed output's accuracy relative to the frontier, not kept rows')

Reads `../shared/datasets` (never copied into the repository): writes each split's documents and labels to a
scratch folder, runs `docroute calibrate` and `docroute evaluate` with the embedded model, prints a table, appends
a dated row to BENCHMARKS.md and copies the report (plot included) to bench/results/<dataset>/.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "datasets"


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}"
    )


def banking77(scratch: Path, options: argparse.Namespace) -> tuple[Path, Path, Path]:
    train, calibrate, evaluate, seed = options.train, options.calibrate, options.evaluate, options.seed
    rows = list(csv.DictReader((SHARED / "banking77" / "train.csv").open(encoding="utf-8")))
    labels = json.loads((SHARED / "banking77" / "categories.json").read_text())
    random.Random(seed).shuffle(rows)
    parts = {
        "train": rows[:train],
        "cal": rows[train : train + calibrate],
        "eval": rows[train + calibrate :][:evaluate],
    }
    with (scratch / "examples.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows((r["text"], r["category"]) for r in parts["train"])
    for split in ("cal", "eval"):
        folder = scratch / split
        folder.mkdir()
        with (scratch / f"{split}_labels.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "label"])
            for i, row in enumerate(parts[split]):
                (folder / f"q{i:05d}.txt").write_text(row["text"] + "\n", encoding="utf-8")
                writer.writerow([f"q{i:05d}.txt", row["category"]])
    label_lines = "\n".join(f"      - {{name: {json.dumps(name)}}}" for name in labels)
    job = f"""name: bench-banking77
source: {{url: {{SPLIT}}}}
task:
  instructions: Messages sent by customers of an online bank.
  classify:
    examples_file: {scratch / "examples.csv"}
    labels:
{label_lines}
small_model: {_small_model(options.encoder)}
frontier: {{provider: openai, model: gpt-4o-mini, api_key: not-used-the-gold-plays-the-frontier}}
routing: {{target_accuracy: 0.9, delta: 0.05, certification: {options.certification}, guarantee: {options.guarantee}, \
guarantee_unit: {options.guarantee_unit}}}
output: {{url: {scratch / "out"}}}
shard_size: 256
"""
    return _write_jobs(scratch, job)


def _small_model(encoder: str) -> str:
    if encoder == "auto":  # the default: strategy and encoder chosen by cross-validation on the examples
        return "{engine: llamacpp}"
    return f"{{engine: llamacpp, classify_strategy: embedding_head, encoder: {encoder}}}"


def _sroie_text(box: Path) -> str:
    lines = []
    for raw in box.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = raw.split(",", 8)
        if len(parts) == 9 and parts[8].strip():
            lines.append(parts[8].strip())
    return "\n".join(lines)


def sroie(scratch: Path, options: argparse.Namespace) -> tuple[Path, Path, Path]:
    calibrate, evaluate, seed = options.calibrate, options.evaluate, options.seed
    keys = sorted((SHARED / "sroie" / "train" / "key").glob("*.json"))
    random.Random(seed).shuffle(keys)
    train = options.train_receipts
    shots, worked = keys[:2], keys[: 2 + train]  # the prompt's two examples are among the worked ones
    cal, ev = keys[2 + train : 2 + train + calibrate], keys[2 + train + calibrate : 2 + train + calibrate + evaluate]
    fields = ("company", "date", "address", "total")
    required = set(options.required.split(",")) if options.required else set(fields)
    for split, chosen in (("cal", cal), ("eval", ev)):
        folder = scratch / split
        folder.mkdir()
        with (scratch / f"{split}_labels.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", *fields])
            for key in chosen:
                gold = json.loads(key.read_text(encoding="utf-8"))
                text = _sroie_text(SHARED / "sroie" / "train" / "box" / f"{key.stem}.csv")
                (folder / f"{key.stem}.txt").write_text(text + "\n", encoding="utf-8")
                writer.writerow([f"{key.stem}.txt", *(gold.get(f, "") for f in fields)])
    examples = []
    for key in shots:
        gold = json.loads(key.read_text(encoding="utf-8"))
        text = _sroie_text(SHARED / "sroie" / "train" / "box" / f"{key.stem}.csv")
        examples.append({"text": text, "values": {f: gold.get(f) for f in fields}})
    with (scratch / "worked.jsonl").open("w", encoding="utf-8") as handle:  # what the extraction rankers learn from
        for key in worked[2:]:
            gold = json.loads(key.read_text(encoding="utf-8"))
            text = _sroie_text(SHARED / "sroie" / "train" / "box" / f"{key.stem}.csv")
            handle.write(json.dumps({"text": text, "values": {f: gold.get(f) for f in fields}}) + "\n")
    field_specs = [
        {"name": "company", "type": "str", "description": "the shop or company that issued the receipt"},
        {"name": "date", "type": "date"},
        {"name": "address", "type": "str", "description": "the shop's address"},
        {"name": "total", "type": "decimal", "description": "the total amount paid"},
    ]
    for field in field_specs:
        field["required"] = field["name"] in required
    job = {
        "name": "bench-sroie",
        "source": {"url": "{SPLIT}"},
        "task": {
            "instructions": "Scanned shop receipts.",
            "extract": {
                "fields": field_specs,
                "examples": examples,
                **({"examples_file": str(scratch / "worked.jsonl")} if train else {}),
            },
        },
        "small_model": {"engine": "llamacpp"},
        "frontier": {"provider": "openai", "model": "gpt-4o-mini", "api_key": "not-used-the-gold-plays-the-frontier"},
        "routing": {
            "target_accuracy": 0.9,
            "delta": 0.05,
            "certification": options.certification,
            "guarantee": options.guarantee,
            "guarantee_unit": options.guarantee_unit,
        },
        "output": {"url": str(scratch / "out")},
        "shard_size": 25,
    }
    return _write_jobs(scratch, json.dumps(job))


def _write_jobs(scratch: Path, template: str) -> tuple[Path, Path, Path]:
    cal, ev = scratch / "job_cal.yaml", scratch / "job_eval.yaml"
    cal.write_text(template.replace("{SPLIT}", str(scratch / "cal")), encoding="utf-8")
    ev.write_text(template.replace("{SPLIT}", str(scratch / "eval")), encoding="utf-8")
    return cal, ev, scratch / "report"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=["banking77", "sroie"])
    parser.add_argument("--train", type=int, default=1500)
    parser.add_argument("--calibrate", type=int, default=1000)
    parser.add_argument("--evaluate", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--certification", choices=["bonferroni", "fixed-sequence"], default="bonferroni")
    parser.add_argument(
        "--encoder",
        choices=["auto", "llamacpp", "wordllama"],
        default="auto",
        help="banking77: the head's encoder (auto: measured on the examples, the default)",
    )
    parser.add_argument(
        "--guarantee", choices=["kept", "overall"], default="kept", help="what the 0.9 target bounds (README)"
    )
    parser.add_argument(
        "--guarantee-unit",
        choices=["part", "document"],
        default="part",
        help="part: each required part meets the target; document: whole rows do (every part right)",
    )
    parser.add_argument(
        "--train-receipts", type=int, default=100, help="sroie: worked receipts the extraction rankers learn from"
    )
    parser.add_argument("--required", default="", help="sroie: comma-separated required fields (default: all four)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix=f"docroute-bench-{args.dataset}-"))
    build = banking77 if args.dataset == "banking77" else sroie
    cal_job, eval_job, report = build(scratch, args)
    docroute = str(Path(sys.executable).parent / "docroute")
    env = {**os.environ, "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    started = time.perf_counter()
    subprocess.run(
        [docroute, "calibrate", str(cal_job), "--labels", str(scratch / "cal_labels.csv")], check=True, env=env
    )
    calibrated = time.perf_counter()
    subprocess.run(
        [docroute, "evaluate", str(eval_job), "--labels", str(scratch / "eval_labels.csv"), "--report", str(report)],
        check=True,
        env=env,
    )
    finished = time.perf_counter()
    metrics = json.loads((report / "metrics.json").read_text())
    router = json.loads((scratch / "out" / "router.json").read_text())
    variant = args.dataset + (f"-{args.required.replace(',', '-')}" if args.required else "")
    variant += "" if args.certification == "bonferroni" else f"-{args.certification}"
    variant += "" if args.guarantee == "kept" else f"-{args.guarantee}"
    variant += "" if args.guarantee_unit == "part" else f"-{args.guarantee_unit}"
    variant += "" if args.encoder == "auto" else f"-{args.encoder}"
    results = ROOT / "bench" / "results" / variant
    if results.exists():
        shutil.rmtree(results)
    shutil.copytree(report, results)
    (results / "router.json").write_text(json.dumps(router, indent=2), encoding="utf-8")
    thresholds = ", ".join(
        f"{part} {'none' if c['threshold'] is None else round(c['threshold'], 3)}"
        for part, c in router["certificates"].items()
    )
    routed, small, frontier = metrics["routed"], metrics["small_only"], metrics["frontier_only"]
    header = (
        "| calibration / evaluation docs | certified thresholds | small-only accuracy | routed accuracy | escalation "
        "| routed $ / 1k docs | all-frontier $ / 1k docs | savings | calibrate + evaluate |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---|"
    )
    savings = "—" if routed["savings_pct"] is None else f"{routed['savings_pct']:.1f}%"
    row = (
        f"| {router['sample_size']} / {metrics['n_documents']} | {thresholds} | {small['accuracy']:.3f} | "
        f"{routed['accuracy']:.3f} | {routed['escalation_rate']:.1%} | ${routed['cost_per_1000']:.4f} | "
        f"${frontier['cost_per_1000']:.4f} | "
        f"{savings} | "
        f"{calibrated - started:.0f} s + {finished - calibrated:.0f} s |"
    )
    print(header)
    print(row)
    command = (
        f"python bench/routing_economics.py {args.dataset} --train {args.train} --calibrate {args.calibrate} "
        f"--evaluate {args.evaluate} --seed {args.seed} --certification {args.certification} "
        f"--guarantee {args.guarantee} --encoder {args.encoder}"
        + (f" --guarantee-unit {args.guarantee_unit}" if args.guarantee_unit != "part" else "")
        + (f" --required {args.required}" if args.required else "")
        + (f" --train-receipts {args.train_receipts}" if args.dataset == "sroie" else "")
    )
    with (ROOT / "BENCHMARKS.md").open("a", encoding="utf-8") as handle:
        handle.write(
            f"\n### Routing economics · {variant} · {datetime.now(UTC).date()}\n\n"
            f"Machine: {_machine()}. Command: `{command}`. Report and plot: `bench/results/{variant}/`.\n\n"
            f"{header}\n{row}\n"
        )


if __name__ == "__main__":
    main()

"""Append a benchmark's dated table to BENCHMARKS.md, so every run leaves its numbers beside the earlier ones."""

from __future__ import annotations

import json
import os
import platform
from datetime import UTC, datetime
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def append_to_benchmarks(title: str, table: str, path: Path = BENCHMARKS) -> None:
    """Add `### <title> · <date>` and the table (which names the machine and the command) at the end of the file."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    section = f"\n### {title} · {datetime.now(UTC).date().isoformat()}\n\n{table.rstrip()}\n"
    path.write_text(text.rstrip("\n") + "\n" + section, encoding="utf-8")
    print(f"appended to {path}")


def machine_info() -> dict[str, object]:
    """Where and when a benchmark ran, in the keys `machine_line` reads."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "date": datetime.now(UTC).date().isoformat(),
    }


def machine_line(info: dict[str, object], command: str) -> str:
    """The sentence every table starts with: where and how its numbers were measured."""
    return (
        f"Machine: {info['platform']}, {info['cores']} cores ({info['processor']}), Python {info['python']}; "
        f"{info['date']}. Command: `{command}`."
    )


def publish(results: Path, title: str, table: str, payload: dict[str, object], *, append: bool) -> None:
    """Save the table and the raw numbers under `results`, and append the table to BENCHMARKS.md unless told not."""
    results.mkdir(parents=True, exist_ok=True)
    (results / "results.md").write_text(f"# {title}\n\n{table.rstrip()}\n", encoding="utf-8")
    (results / "results.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    if append:
        append_to_benchmarks(title, table)

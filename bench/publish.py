"""Append a benchmark's dated table to BENCHMARKS.md, so every run leaves its numbers beside the earlier ones."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def append_to_benchmarks(title: str, table: str, path: Path = BENCHMARKS) -> None:
    """Add `### <title> · <date>` and the table (which names the machine and the command) at the end of the file."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    section = f"\n### {title} · {datetime.now(UTC).date().isoformat()}\n\n{table.rstrip()}\n"
    path.write_text(text.rstrip("\n") + "\n" + section, encoding="utf-8")
    print(f"appended to {path}")

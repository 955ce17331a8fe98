"""Progress in the terminal (tasks/account/progress.py): a run shows a bar over its shards when a terminal watches,
and nothing at all otherwise (pipes, logs, scheduled deployments)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from corpus import topic_job_yaml
from rich.console import Console

from docroute.flows.process import process_documents
from docroute.tasks.account.progress import bar, terminal_console, terminal_progress

pytestmark = pytest.mark.usefixtures("prefect_server")

SIMILARITY = "  engine: llamacpp\n  classify_strategy: similarity\n  encoder: wordllama\n"


def _job(tmp_path: Path, documents: int) -> Path:
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(documents):
        (docs / f"d{i}.json").write_text(json.dumps({"id": f"d{i}", "body": {"text": f"match report {i}"}}))
    text = topic_job_yaml(docs, tmp_path / "out", shard_size=2)
    text = text.replace("  engine: llamacpp\n  classify_strategy: label_scoring\n", SIMILARITY)
    job = tmp_path / "job.yaml"
    job.write_text(text, encoding="utf-8")
    return job


def _terminal() -> tuple[Console, io.StringIO]:
    screen = io.StringIO()
    return Console(file=screen, force_terminal=True, width=120), screen


def test_a_watched_run_shows_a_bar_over_its_shards(tmp_path: Path) -> None:
    console, screen = _terminal()
    with terminal_progress(console):
        summary = process_documents(str(_job(tmp_path, documents=6)))
    assert summary.documents == 6
    shown = screen.getvalue()
    assert "topics: shards" in shown and "3/3" in shown


def test_bars_are_silent_when_no_terminal_watches(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert terminal_console() is None  # pytest's captured stderr is not a terminal: the CLI shows nothing
    with terminal_progress(None):
        quiet = bar("anything", 3)
        quiet.advance()
        quiet.finish()
        process_documents(str(_job(tmp_path, documents=2)))
    assert not quiet.visible
    captured = capsys.readouterr()
    assert "shards" not in captured.out + captured.err


def test_a_bar_counts_what_it_is_told_and_keeps_its_final_count() -> None:
    console, screen = _terminal()
    with terminal_progress(console):
        with bar("embedding", 5) as shown:
            assert shown.visible
            shown.advance(2)
            shown.advance(3)
        late = bar("listing", None)
        late.set_total(4)
        late.advance(4)
    text = screen.getvalue()
    assert "embedding" in text and "5/5" in text and "4/4" in text
    assert not bar("after the display", 1).visible


def test_a_watched_compaction_shows_its_steps(tmp_path: Path) -> None:
    from docroute.flows.compact import compact_output

    job = _job(tmp_path, documents=6)
    process_documents(str(job))
    (tmp_path / "docs" / "d0.json").write_text(json.dumps({"id": "d0", "body": {"text": "a new match report"}}))
    process_documents(str(job))
    console, screen = _terminal()
    with terminal_progress(console):
        report = compact_output(str(job), retention_hours=0)
    assert report.manifest is not None
    shown = screen.getvalue()
    assert "topics: compaction steps" in shown and "5/5" in shown

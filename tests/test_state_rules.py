"""Which files a run processes and what the state says afterwards: the rules on their own, fast, no model, no Prefect.

The end-to-end versions (real runs over real folders and S3) are in test_flow.py and test_storage.py; these pin the
decisions themselves so a change to one rule fails here by name.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pyarrow as pa
from corpus import topic_job_yaml

from docroute.schemas.documents import LISTING_SCHEMA
from docroute.schemas.load import load_job
from docroute.schemas.spec import JobSpec
from docroute.tasks.store.state import STATE_SCHEMA, StateUpdate, merge_state, select_documents

T0 = datetime(2026, 12, 1, 8, tzinfo=UTC)
T1 = datetime(2026, 12, 2, 8, tzinfo=UTC)


def _spec(tmp_path: Path, extra: str = "") -> JobSpec:
    (tmp_path / "docs").mkdir(exist_ok=True)
    job = tmp_path / "job.yaml"
    job.write_text(topic_job_yaml(tmp_path / "docs", tmp_path / "out", extra=extra), encoding="utf-8")
    return load_job(job)


def _listing(files: dict[str, str | None]) -> pa.Table:
    uris = list(files)
    return pa.table(
        {"uri": uris, "path": uris, "size": [1] * len(uris), "etag": list(files.values())}, schema=LISTING_SCHEMA
    )


def _table(rows: list[dict[str, object]], **changes: object) -> pa.Table:
    defaults = {"small_model": "m", "part_url": "p", "run_id": "r0", "processed_at": T0, "deleted_at": None}
    table = pa.Table.from_pylist([{**defaults, **row, **changes} for row in rows])
    return table.select(STATE_SCHEMA.names).cast(STATE_SCHEMA)


def _state(rows: list[dict[str, object]]) -> pl.DataFrame:
    frame = pl.from_arrow(_table(rows))
    assert isinstance(frame, pl.DataFrame)
    return frame


def _row(uri: str, etag: str, spec_hash: str, *, route: str = "small", retry: bool = False) -> dict[str, object]:
    return {
        "doc_id": uri,
        "source_uri": uri,
        "source_etag": etag,
        "spec_hash": spec_hash,
        "route": route,
        "retry": retry,
    }


def test_each_listed_file_is_new_changed_retried_or_up_to_date_and_retries_go_first(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    same = spec.spec_hash()
    state = _state(
        [
            _row("u/changed", "old", same),
            _row("u/respec", "e", "an-older-spec"),
            _row("u/failed", "e", same, route="error", retry=True),
            _row("u/unreadable", "e", same, route="error", retry=False),
            _row("u/kept", "e", same),
            _row("u/no-etag", "e", same),
        ]
    )
    listing = _listing(
        {
            "u/new": "e",
            "u/changed": "new",
            "u/respec": "e",
            "u/failed": "e",
            "u/unreadable": "e",
            "u/kept": "e",
            "u/no-etag": None,  # nothing proves it unchanged: always processed
        }
    )
    chosen = select_documents(listing, state, spec)
    assert (chosen.retry, chosen.new, chosen.changed, chosen.up_to_date) == (1, 1, 3, 2)
    assert chosen.todo["uri"].to_pylist() == ["u/failed", "u/new", "u/changed", "u/respec", "u/no-etag"]


def test_deferred_rows_wait_for_a_frontier_and_are_retried_once_one_is_configured(tmp_path: Path) -> None:
    without = _spec(tmp_path)
    state = _state([_row("u/deferred", "e", without.spec_hash(), route="deferred", retry=True)])
    assert select_documents(_listing({"u/deferred": "e"}), state, without).up_to_date == 1  # same answer again
    frontier = "frontier: {provider: openai_compatible, model: gpt-4o-mini, base_url: 'http://127.0.0.1:9/v1'}\n"
    spec = _spec(tmp_path, extra=frontier)
    state = _state([_row("u/deferred", "e", spec.spec_hash(), route="deferred", retry=True)])
    assert select_documents(_listing({"u/deferred": "e"}), state, spec).retry == 1


def test_a_run_replaces_the_rows_it_rewrote_and_marks_files_gone_from_the_source() -> None:
    previous = _state([_row("u/a", "e", "h"), _row("u/b", "e", "h"), _row("u/gone", "e", "h")])
    rewritten = _table([_row("u/a", "e2", "h")], part_url="p1", run_id=None, processed_at=None)
    merged = merge_state(
        previous, StateUpdate(by_file=[rewritten]), listed_uris=pa.array(["u/a", "u/b"]), run_id="r1", processed_at=T1
    ).to_pylist()
    by_uri = {row["source_uri"]: row for row in merged}
    assert len(merged) == 3 and by_uri["u/a"]["source_etag"] == "e2" and by_uri["u/a"]["run_id"] == "r1"
    assert by_uri["u/b"]["run_id"] == "r0" and by_uri["u/b"]["deleted_at"] is None  # untouched
    assert by_uri["u/gone"]["deleted_at"] == T1  # kept in the history, out of the current view
    # a later run that still misses it keeps the first date; once it is listed again it is unmarked
    again = pl.from_arrow(pa.Table.from_pylist(merged).cast(STATE_SCHEMA))
    assert isinstance(again, pl.DataFrame)
    later = merge_state(again, StateUpdate(), listed_uris=pa.array(["u/a", "u/b"]), run_id="r2", processed_at=T1)
    assert {r["source_uri"]: r["deleted_at"] for r in later.to_pylist()}["u/gone"] == T1
    back = merge_state(
        again, StateUpdate(), listed_uris=pa.array(["u/a", "u/b", "u/gone"]), run_id="r3", processed_at=T1
    )
    assert {r["source_uri"]: r["deleted_at"] for r in back.to_pylist()}["u/gone"] is None

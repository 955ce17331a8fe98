"""An output written before rows carried typed outcomes still decides retries right under today's code (issue 16).

The fixture is a real output of commit f18f12f (tests/fixtures/legacy-f18f12f/README.md): its parts have no
`route_outcome` or `error_code` column and its state snapshot says which rows to retry in the words of that
version. Today's run over it must retry exactly the deferred rows, leave the kept row and the unreadable files
alone, and read old and new parts together.
"""

from __future__ import annotations

import contextlib
import fcntl
import shutil
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

from docroute.flows.process import process_documents
from docroute.schemas.load import load_job
from docroute.tasks.account.views import open_views
from docroute.tasks.store.current import current_rows

FIXTURE = Path(__file__).parent / "fixtures" / "legacy-f18f12f"
WHERE_IT_WAS_WRITTEN = Path("/tmp/docroute-legacy-f18f12f")  # its manifests and state name this folder


@contextlib.contextmanager
def _restored_output() -> Iterator[Path]:
    """The fixture back where that version wrote it, one test session at a time (two could share this machine)."""
    with Path(f"{WHERE_IT_WAS_WRITTEN}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        shutil.rmtree(WHERE_IT_WAS_WRITTEN, ignore_errors=True)
        shutil.copytree(FIXTURE, WHERE_IT_WAS_WRITTEN)
        try:
            yield WHERE_IT_WAS_WRITTEN
        finally:
            shutil.rmtree(WHERE_IT_WAS_WRITTEN, ignore_errors=True)


@pytest.mark.usefixtures("prefect_server")
def test_a_run_over_an_output_written_before_typed_outcomes_retries_exactly_the_deferred_rows() -> None:
    with _restored_output() as folder:
        spec = load_job(folder / "job.yaml")
        before = current_rows(spec.output)
        assert "route_outcome" not in before.columns  # as that version wrote it
        deferred = set(before.filter(pl.col("route") == "deferred")["doc_id"].to_list())
        assert len(deferred) == 5 and before.height == 8

        summary = process_documents(str(folder / "job.yaml"))

        assert summary.retried == 5 and summary.documents == 5  # the deferred rows, nothing else
        assert summary.up_to_date == 3  # the kept row and the two unreadable files
        after = current_rows(spec.output)
        assert after.height == 8 and after["doc_id"].n_unique() == 8
        retried = after.filter(pl.col("doc_id").is_in(sorted(deferred)))
        assert set(retried["run_id"].to_list()) == {summary.run_id}
        assert set(retried["route_outcome"].to_list()) == {"frontier_retryable"}  # the frontier is still down
        untouched = after.filter(~pl.col("doc_id").is_in(sorted(deferred)))
        assert untouched["route_outcome"].null_count() == 3  # still the old parts' rows
        assert sorted(untouched["route"].to_list()) == ["error", "error", "small"]
        with open_views(spec) as views:  # old and new parts read together, by column name
            total, with_outcome = views.execute("select count(*), count(route_outcome) from results").fetchone()  # type: ignore[misc]
        assert (total, with_outcome) == (13, 5)

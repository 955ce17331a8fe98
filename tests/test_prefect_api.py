"""The CLI starts Prefect's ephemeral API while it imports the pipeline: a real `docroute run` in its own process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

JOB = """\
name: early-api
source: {url: docs}
task:
  classify:
    labels:
      - {name: refund, description: the customer wants their money back}
      - {name: delivery, description: where is the parcel or when will it arrive}
small_model: {engine: llamacpp, encoder: wordllama, classify_strategy: similarity}
routing: {threshold: 0.0}
output: {url: out}
"""


def _env(home: Path) -> dict[str, str]:
    """A machine with no Prefect server configured: the ephemeral API, as `docroute run` meets it first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return env


def test_docroute_run_with_no_api_configured_starts_the_ephemeral_api_early_and_finishes(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    for i, text in enumerate(["I want a refund for my order", "my parcel has not arrived yet", "money back please"]):
        (docs / f"{i}.txt").write_text(text, encoding="utf-8")
    (tmp_path / "job.yaml").write_text(JOB, encoding="utf-8")
    script = (
        "import threading, docroute.flows.prefect_api as api\n"
        "real = api.start_ephemeral_api_early\n"
        "def spy():\n"
        "    started = real()\n"
        "    print('early-start-thread', started.thread is not None, flush=True)\n"
        "    return started\n"
        "api.start_ephemeral_api_early = spy\n"
        "from docroute.flows.cli import main\n"
        "main()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, "run", "job.yaml"],
        cwd=tmp_path,
        env=_env(tmp_path / "prefect-home"),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "early-start-thread True" in done.stdout
    rows = pl.read_parquet(f"{tmp_path}/out/results/**/*.parquet")
    assert sorted(rows["doc_id"].unique().to_list()) == sorted(rows["doc_id"].to_list()) and rows.height == 3
    assert "Traceback" not in done.stderr


@pytest.mark.usefixtures("prefect_server")
def test_nothing_is_started_when_an_api_url_is_configured() -> None:
    from docroute.flows.prefect_api import start_ephemeral_api_early

    started = start_ephemeral_api_early()
    assert started.thread is None
    started.wait()  # returns at once

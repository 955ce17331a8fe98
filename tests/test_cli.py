"""The `docroute` command: validate, run and demo, through the real CLI entry point."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import prefect.main  # noqa: F401 - Prefect configures its logging here, and its console handler keeps the stream
import pytest  # it was given: import it here, not inside a CliRunner invocation whose captured stream then closes
from typer.testing import CliRunner

from docroute.flows.cli import app

runner = CliRunner()


def test_validate_prints_the_spec_with_secrets_masked(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(
        "name: ok\nsource: {url: docs, storage_options: {key: AKIA123, secret: hunter2}}\n"
        "task: {classify: {labels: [{name: a}, {name: b}]}}\noutput: {url: out}\n"
        "frontier: {provider: openai, model: gpt-4o-mini, api_key: sk-live-secret}\n"
    )
    result = runner.invoke(app, ["validate", str(job)])
    assert result.exit_code == 0, result.output
    assert "hunter2" not in result.output and "AKIA123" not in result.output and "sk-live-secret" not in result.output
    assert '"key": "***"' in result.output and str(tmp_path / "docs") in result.output


def test_invalid_job_exits_2_naming_field_and_line(tmp_path: Path) -> None:
    job = tmp_path / "bad.yaml"
    job.write_text("name: bad\nsource: {url: docs}\ntask:\n  classify:\n    labels: [{name: only}]\noutput: {url: o}\n")
    for command in ("validate", "run", "train"):
        result = runner.invoke(app, [command, str(job)])
        assert result.exit_code == 2
        assert "line 5: task.classify.labels" in result.output


def test_bundled_demo_jobs_are_valid() -> None:
    from importlib.resources import files

    from docroute.schemas.load import load_job

    for name in ("demo_classify.yaml", "demo_extract.yaml"):
        spec = load_job(Path(str(files("docroute.examples") / name)))
        assert Path(spec.source.url).is_dir()
        assert spec.frontier is None  # the demo needs no API key


@pytest.mark.usefixtures("prefect_server")
def test_demo_runs_on_the_embedded_model(tmp_path: Path) -> None:
    result = runner.invoke(app, ["demo", "--job", "classify", "--output", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "demo-support-intents" in result.output and "total" in result.output
    # the demo's 10 examples per intent: auto measures both bundled encoders and says which it kept, and why
    assert "classification: embedding_head over " in result.output and "cross-validated" in result.output
    rows = pl.read_parquet(f"{tmp_path}/classify/results/**/*.parquet")
    assert rows.height == 32  # 28 files, one of them a 5-record jsonl (see examples/build_demo_corpus.py)
    assert rows.filter(pl.col("route") == "error").height == 2  # the binary and the empty file
    assert (tmp_path / "classify" / "manifests").is_dir()


@pytest.mark.parametrize("name", ["vllm_offline", "vllm_serve", "openai", "anthropic"])
def test_engine_example_jobs_are_valid(name: str) -> None:
    from importlib.resources import files

    from docroute.schemas.load import load_job

    path = Path(str(files("docroute.examples") / "engines" / f"{name}.yaml"))
    spec = load_job(path, env={"OPENAI_API_KEY": "sk-test", "ANTHROPIC_API_KEY": "sk-ant-test"})
    assert spec.frontier is not None and spec.frontier.api_key is not None
    assert spec.small_model.engine in ("llamacpp", "vllm", "openai_compatible")


@pytest.mark.usefixtures("prefect_server")
def test_unlock_ends_a_held_lease_and_run_refuses_a_held_output_in_one_line(tmp_path: Path) -> None:
    from docroute.schemas.load import load_job
    from docroute.tasks.store.lease import acquire_lease, newest_lease

    job = tmp_path / "job.yaml"
    job.write_text(
        "name: ok\nsource: {url: docs}\ntask: {classify: {labels: [{name: a}, {name: b}]}}\noutput: {url: out}\n"
    )
    (tmp_path / "docs").mkdir()
    output = load_job(job).output
    nothing = runner.invoke(app, ["unlock", str(job)])
    assert nothing.exit_code == 0 and "no run holds the lease" in nothing.output

    held = acquire_lease(output, run_id="holder-run", flow_run_id=None, ttl_s=60)  # this process: alive
    refused = runner.invoke(app, ["run", str(job)])
    assert refused.exit_code == 3, refused.output
    assert "holder-run" in refused.output and "holds the lease" in refused.output and "Traceback" not in refused.output

    result = runner.invoke(app, ["unlock", str(job)])
    assert result.exit_code == 0 and "holder-run" in result.output
    newest = newest_lease(output)
    assert newest is not None and newest.released_by == "forced: docroute unlock"
    held.release("late")  # it lost the output: nothing written
    assert newest_lease(output) == newest


@pytest.mark.usefixtures("prefect_server")
def test_a_missing_source_ends_with_the_source_exit_code_in_one_line(tmp_path: Path) -> None:
    """A typo in source.url is a failed run a scheduler can see (exit 4), not a successful run of nothing."""
    job = tmp_path / "job.yaml"
    job.write_text(
        "name: ok\nsource: {url: no-such-docs}\ntask: {classify: {labels: [{name: a}, {name: b}]}}\n"
        "output: {url: out}\n"
    )
    result = runner.invoke(app, ["run", str(job)])
    assert result.exit_code == 4, result.output
    assert f"docroute: source {tmp_path / 'no-such-docs'} does not exist" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out" / "manifests").exists()  # nothing committed

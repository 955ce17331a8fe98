"""docroute setup and deployments/prefect.yaml against a real Prefect server (the session's test server)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL

from docroute.flows.setup import FRONTIER_LIMIT, SetupSpec, setup_prefect

pytestmark = pytest.mark.usefixtures("prefect_server")
ROOT = Path(__file__).resolve().parents[1]


def test_setup_creates_pool_limit_and_variables_idempotently() -> None:
    first = setup_prefect(SetupSpec(repository="https://example.invalid/jobs.git", job="jobs/support.yaml"))
    assert any("work pool docroute-process" in item for item in first.created)
    second = setup_prefect(SetupSpec(frontier_concurrency=3))
    assert not second.created and f"concurrency limit {FRONTIER_LIMIT} = 3" in second.updated
    with get_client(sync_client=True) as client:
        assert client.read_work_pool("docroute-process").type == "process"
        assert client.read_global_concurrency_limit_by_name(FRONTIER_LIMIT).limit == 3
        assert client.read_variable_by_name("docroute_job").value == "jobs/support.yaml"  # kept, not reset
        assert client.read_variable_by_name("docroute_branch").value == "main"


def _env() -> dict[str, str]:
    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "DO_NOT_TRACK": "1"}


def _deploy_from_the_file() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all", "--prefect-file",
         "deployments/prefect.yaml"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_prefect_deploy_creates_the_scheduled_deployments_from_the_file() -> None:
    setup_prefect(SetupSpec(repository=str(ROOT), job="examples/demo_classify.yaml"))
    _deploy_from_the_file()
    with get_client(sync_client=True) as client:
        nightly = client.read_deployment_by_name("process-documents/nightly")
        weekly = client.read_deployment_by_name("calibrate/weekly-calibrate")
        training = client.read_deployment_by_name("train/weekly-train")
    assert nightly.work_pool_name == weekly.work_pool_name == training.work_pool_name == "docroute-process"
    assert training.schedules[0].schedule.cron == "0 3 * * 0"  # before the weekly calibration re-certifies
    assert nightly.parameters["job"] == "examples/demo_classify.yaml"
    assert nightly.global_concurrency_limit is not None and nightly.global_concurrency_limit.limit == 1
    schedule = nightly.schedules[0].schedule
    assert schedule.cron == "0 2 * * *" and schedule.timezone == "Europe/London"
    assert weekly.schedules[0].schedule.cron == "0 4 * * 0"


@pytest.mark.parametrize(("template", "kind"), [("kubernetes-gpu.json", "kubernetes"), ("docker-gpu.json", "docker")])
def test_gpu_work_pool_templates_are_accepted_by_the_server(template: str, kind: str) -> None:
    import json

    from prefect.client.schemas.actions import WorkPoolCreate

    body = json.loads((ROOT / "deployments" / "work-pools" / template).read_text())
    name = f"docroute-gpu-{kind}"
    with get_client(sync_client=True) as client:  # the server rejects placeholders without a declared variable
        client.create_work_pool(WorkPoolCreate(name=name, type=kind, base_job_template=body), overwrite=True)
        stored = client.read_work_pool(name).base_job_template
    broken = json.loads(json.dumps(body))
    del broken["variables"]["properties"]["gpus"]
    with get_client(sync_client=True) as client, pytest.raises(Exception, match="gpus"):
        client.create_work_pool(WorkPoolCreate(name=f"{name}-broken", type=kind, base_job_template=broken))
    text = json.dumps(stored["job_configuration"])
    if kind == "kubernetes":
        assert '"nodeSelector": "{{ node_selector }}"' in text and '"tolerations": "{{ tolerations }}"' in text
        assert '"nvidia.com/gpu": "{{ gpus }}"' in text
    else:
        assert '"device_requests"' in text and '"capabilities": [["gpu"]]' in text


def test_the_gpu_image_copies_only_paths_that_exist() -> None:
    lines = (ROOT / "deployments" / "Dockerfile").read_text().splitlines()
    copied = [line.split()[1:-1] for line in lines if line.startswith("COPY ")]
    assert copied and all((ROOT / path).exists() for sources in copied for path in sources)


def test_a_process_worker_runs_the_nightly_deployment_and_publishes_its_artifacts(tmp_path: Path) -> None:
    """The whole production path: the deployment's pull steps clone the repository, a real `prefect worker`
    started here runs the flow in its own process, and the run writes Parquet and its keyed artifacts.

    The entrypoint file comes from the clone, i.e. from the last commit of this branch, as in production."""
    import polars as pl
    from corpus import build_topic_corpus, topic_job_yaml
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    branch = subprocess.run(
        ["git", "rev-parse", "--abbrev-ref", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    setup_prefect(SetupSpec(repository=str(ROOT), branch=branch))
    _deploy_from_the_file()
    gold = build_topic_corpus(tmp_path / "docs")
    job = tmp_path / "nightly.yaml"
    job.write_text(topic_job_yaml(tmp_path / "docs", tmp_path / "out", name="nightly-test"), encoding="utf-8")
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("process-documents/nightly")
        run = client.create_flow_run_from_deployment(deployment.id, parameters={"job": str(job)})
    worker = subprocess.run(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", "docroute-process", "--type", "process",
         "--run-once", "--limit", "1"],
        env=_env(), capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    with get_client(sync_client=True) as client:
        finished = client.read_flow_run(run.id)
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
        )
    assert finished.state is not None and finished.state.is_completed(), (
        f"{finished.state}\n{worker.stdout[-4000:]}\n{worker.stderr[-4000:]}"
    )
    rows = pl.read_parquet(f"{tmp_path}/out/results/**/*.parquet")
    assert rows.height == len(gold)  # one row per document, records of the jsonl file included
    assert set(rows["run_id"]) == {str(run.id)}
    keys = {a.key for a in artifacts}
    assert {"nightly-test-summary", "nightly-test-costs", "nightly-test-progress", "nightly-test-output"} <= keys
    link = next(a for a in artifacts if a.key == "nightly-test-output")
    assert (tmp_path / "out").resolve().as_uri() in str(link.data)

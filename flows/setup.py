"""`docroute setup`: create, idempotently, what the deployments in deployments/prefect.yaml expect on a Prefect server.

- a `process` work pool for CPU runs (GPU pools use the templates in deployments/ and are created the same way);
- a global concurrency limit for frontier calls, shared by every worker;
- the variables the deployment file reads: where to clone the project from, which branch, which job file and
  which labels file the weekly calibration uses.

Running it again changes nothing that exists, except values given explicitly, so it is safe in a bootstrap script.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
    VariableCreate,
    VariableUpdate,
    WorkPoolCreate,
)
from prefect.exceptions import ObjectNotFound
from pydantic import BaseModel, ConfigDict, Field

FRONTIER_LIMIT = "docroute-frontier"
"""The global concurrency limit every frontier call occupies one slot of."""


class SetupSpec(BaseModel):
    """What `docroute setup` creates; every name matches deployments/prefect.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    work_pool: str = Field(default="docroute-process", min_length=1)
    frontier_concurrency: int = Field(default=8, ge=1, description="frontier calls in flight across all workers")
    repository: str | None = Field(default=None, description="git URL (or path) the deployments clone")
    branch: str | None = Field(default=None, description="branch the deployments check out")
    job: str | None = Field(default=None, description="job file path, relative to the clone")
    labels: str | None = Field(default=None, description="gold labels file for the weekly calibration")


VARIABLES = {"repository": "docroute_repository", "branch": "docroute_branch", "job": "docroute_job",
             "labels": "docroute_labels"}  # fmt: skip
DEFAULTS = {"branch": "main", "job": "examples/demo_classify.yaml", "labels": ""}  # labels: set before calibrating


@dataclass
class SetupReport:
    """What changed, for the CLI to print."""

    created: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)


def setup_prefect(spec: SetupSpec) -> SetupReport:
    """Create the work pool, the frontier concurrency limit and the deployment variables on the current API."""
    report = SetupReport()
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(spec.work_pool)
            report.kept.append(f"work pool {spec.work_pool}")
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=spec.work_pool, type="process"))
            report.created.append(f"work pool {spec.work_pool} (process)")
        try:
            limit = client.read_global_concurrency_limit_by_name(FRONTIER_LIMIT)
            if limit.limit != spec.frontier_concurrency:
                client.update_global_concurrency_limit(
                    FRONTIER_LIMIT, GlobalConcurrencyLimitUpdate(limit=spec.frontier_concurrency)
                )
                report.updated.append(f"concurrency limit {FRONTIER_LIMIT} = {spec.frontier_concurrency}")
            else:
                report.kept.append(f"concurrency limit {FRONTIER_LIMIT}")
        except ObjectNotFound:
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=FRONTIER_LIMIT, limit=spec.frontier_concurrency, active=True)
            )
            report.created.append(f"concurrency limit {FRONTIER_LIMIT} = {spec.frontier_concurrency}")
        for key, name in VARIABLES.items():
            given = getattr(spec, key)
            existing = client.read_variable_by_name(name)
            if existing is None:
                value = given if given is not None else DEFAULTS.get(key, "")
                client.create_variable(VariableCreate(name=name, value=value))
                report.created.append(f"variable {name} = {value!r}")
            elif given is not None and existing.value != given:
                client.update_variable(VariableUpdate(name=name, value=given))
                report.updated.append(f"variable {name} = {given!r}")
            else:
                report.kept.append(f"variable {name}")
    return report

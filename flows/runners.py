"""The Prefect task runner that shard tasks go to, chosen by the job's `runner` block.

The flow itself always runs in one process; only shard tasks fan out. `threads` keeps them in the flow's process
(the embedded model and the frontier budget are shared there); `dask` and `ray` hand them to prefect-dask's
`DaskTaskRunner` or prefect-ray's `RayTaskRunner`, so a cluster that already exists does the scheduling — docroute
runs no cluster of its own. Both integrations are optional extras and are imported only when a job asks for them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from docroute.schemas.errors import DocrouteError
from docroute.schemas.spec import RunnerSpec


class RunnerUnavailableError(DocrouteError, RuntimeError):
    """The job asks for a runner whose Prefect integration is not installed."""


def shard_task_runner(runner: RunnerSpec) -> TaskRunner[Any]:
    """Build (not start) the task runner for the job's shard tasks."""
    match runner.kind:
        case "threads":
            return ThreadPoolTaskRunner(max_workers=runner.max_workers)
        case "dask":
            try:
                from prefect_dask import DaskTaskRunner
            except ImportError as exc:
                raise RunnerUnavailableError(
                    "runner.kind dask needs prefect-dask: pip install 'docroute[dask]'"
                ) from exc
            dask = runner.dask
            assert dask is not None  # filled in by RunnerSpec's validator
            if dask.address:
                return DaskTaskRunner(address=dask.address)
            return DaskTaskRunner(
                cluster_kwargs={
                    "n_workers": dask.n_workers,
                    "threads_per_worker": dask.threads_per_worker,
                    "processes": True,
                    "dashboard_address": ":0",  # any free port: two local runs must not collide
                }
            )
        case "ray":
            try:
                from prefect_ray import RayTaskRunner
            except ImportError as exc:
                raise RunnerUnavailableError("runner.kind ray needs prefect-ray: pip install 'docroute[ray]'") from exc
            ray = runner.ray
            assert ray is not None
            return RayTaskRunner(address=ray.address) if ray.address else RayTaskRunner()
    raise ValueError(f"unknown runner kind {runner.kind!r}")  # pragma: no cover - spec validation


@contextmanager
def shard_task_options(runner: RunnerSpec) -> Iterator[None]:
    """Resources each shard task asks its runner for, while shards are submitted.

    For Ray: `num_cpus`/`num_gpus` per shard, and `max_calls=0`, because Ray otherwise ends a GPU task's worker
    process after every call — which would load the model again for every shard.
    """
    if runner.kind != "ray":
        with nullcontext():
            yield
        return
    from prefect_ray.context import remote_options

    ray = runner.ray
    assert ray is not None
    with remote_options(num_cpus=ray.num_cpus, num_gpus=ray.num_gpus, max_calls=0):
        yield

"""Flow runs whose process died: tag each run with its process at creation, and mark dead ones Crashed.

With the default local Prefect API nothing watches a flow run's process: a run killed by SIGKILL (the OOM killer, a
lost node) stays "Running" in the UI forever. The output's lease (tasks/store/lease.py) names its holder's flow run, so
a run that takes over a dead holder's lease marks that one Crashed; but a run can die before it holds the lease
(while Prefect creates it, loads the job or waits for the lease) or after it gave the lease back (while Prefect
records Completed), and then no lease names it.

So the flow run itself carries its process: `tagged_with_this_process` adds a tag naming this process (PID, start
time and a digest of host, boot and PID namespace) to every flow run created inside it, atomically with the
run's creation, so no window exists in which a run is live in the API without it. Every later run on the same
machine looks at the non-final docroute flow runs and marks Crashed those whose tagged process has ended.
Runs started by a Prefect worker are not tagged: the worker watches their process and reports crashes itself.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

from docroute.tasks.store.process_identity import ProcessIdentity, is_gone

log = logging.getLogger(__name__)

MARKER_TAG = "docroute-process"
"""Every tagged run also carries this exact tag, so the API filters them for us (tags match whole, not by prefix)."""
PROCESS_TAG_PREFIX = f"{MARKER_TAG}:"
LIVE_STATE_TYPES = ("PENDING", "RUNNING", "CANCELLING")
"""States a run leaves only through its own process; SCHEDULED and PAUSED runs wait for someone else."""

SWEEP_LIMIT = 200


@dataclass(frozen=True)
class TaggedProcess:
    """The process a flow run's tag names."""

    host: str
    pid: int
    started: str
    machine_key: str

    @property
    def tag(self) -> str:
        return f"{PROCESS_TAG_PREFIX}{self.host}:{self.pid}:{self.started}:{self.machine_key}"

    @classmethod
    def of(cls, identity: ProcessIdentity) -> TaggedProcess | None:
        """None where the process cannot be named for good (no /proc): such runs are left to the lease."""
        if identity.process_started is None or identity.machine_key is None:
            return None
        return cls(identity.host, identity.pid, identity.process_started, identity.machine_key)

    @classmethod
    def parse(cls, tag: str) -> TaggedProcess | None:
        if not tag.startswith(PROCESS_TAG_PREFIX):
            return None
        parts = tag.removeprefix(PROCESS_TAG_PREFIX).rsplit(":", 3)  # a host name never holds ":", but be safe
        if len(parts) != 4 or not parts[1].isdigit() or not all(parts):
            return None
        host, pid, started, machine_key = parts
        return cls(host, int(pid), started, machine_key)


@contextlib.contextmanager
def tagged_with_this_process() -> Iterator[None]:
    """Flow runs created inside carry this process's tag (see the module docstring)."""
    tagged = TaggedProcess.of(ProcessIdentity.current())
    if tagged is None:
        yield
        return
    from prefect import tags

    with tags(MARKER_TAG, tagged.tag):
        yield


def mark_dead_runs_crashed(*, current: str | None = None) -> int:
    """Mark Crashed every non-final tagged flow run whose process on this machine has ended; returns how many.

    Never raises: a run that cannot sweep still does its own work."""
    me = TaggedProcess.of(ProcessIdentity.current())
    if me is None:
        return 0
    try:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import (
            FlowRunFilter,
            FlowRunFilterState,
            FlowRunFilterStateType,
            FlowRunFilterTags,
        )
        from prefect.client.schemas.objects import StateType
        from prefect.states import Crashed

        marked = 0
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    tags=FlowRunFilterTags(all_=[MARKER_TAG]),
                    state=FlowRunFilterState(
                        type=FlowRunFilterStateType(any_=[StateType(name) for name in LIVE_STATE_TYPES])
                    ),
                ),
                limit=SWEEP_LIMIT,
            )
            for run in runs:
                dead = _dead_process(run.tags, me.machine_key)
                if str(run.id) == current or dead is None:
                    continue
                message = (
                    f"its process (pid {dead.pid} on {dead.host}) ended without reporting a final state: killed "
                    "(SIGKILL, the OOM killer) or lost; a later docroute run on the same machine found it gone"
                )
                client.set_flow_run_state(run.id, Crashed(message=message), force=True)
                marked += 1
        return marked
    except Exception as exc:  # the UI's state is not worth failing a run over
        log.info("could not look for flow runs of dead processes: %s", type(exc).__name__)
        return 0


def _dead_process(tags: list[str], machine_key: str) -> TaggedProcess | None:
    """The run's tagged process when it ran on this machine and has ended; None when alive, elsewhere or untagged."""
    for tag in tags:
        tagged = TaggedProcess.parse(tag)
        if tagged is not None and tagged.machine_key == machine_key:
            return tagged if is_gone(tagged.pid, tagged.started) else None
    return None

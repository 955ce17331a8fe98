"""Flow runs of killed processes are found dead by the next run on the same machine and marked Crashed."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.states import Running

from docroute.flows.run_liveness import MARKER_TAG, TaggedProcess, mark_dead_runs_crashed, tagged_with_this_process
from docroute.tasks.store.process_identity import ProcessIdentity, process_started


def _ended_process() -> TaggedProcess:
    """The tag a flow run of a process on this machine would carry, for a process that has since been killed."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    started = process_started(child.pid)
    child.kill()
    child.wait()
    me = TaggedProcess.of(ProcessIdentity.current())
    assert me is not None and started is not None
    return TaggedProcess(me.host, child.pid, started, me.machine_key)


def test_a_tag_names_one_process_and_reads_back() -> None:
    me = TaggedProcess.of(ProcessIdentity.current())
    assert me is not None
    assert TaggedProcess.parse(me.tag) == me
    assert TaggedProcess.parse(MARKER_TAG) is None
    assert TaggedProcess.parse(f"{MARKER_TAG}:host:notapid:1:abc") is None
    assert TaggedProcess.parse("nightly") is None
    odd = TaggedProcess("fe80::1", 7, "99", "abcdef012345")  # even a host written with colons reads back
    assert TaggedProcess.parse(odd.tag) == odd


@flow(name="liveness-probe")
def _probe() -> list[str]:
    from prefect.runtime import flow_run

    return sorted(flow_run.get_tags())


@pytest.mark.usefixtures("prefect_server")
def test_a_flow_run_started_inside_carries_this_process_from_its_creation() -> None:
    with tagged_with_this_process():
        tags = _probe()
    me = TaggedProcess.of(ProcessIdentity.current())
    assert me is not None and tags == sorted([MARKER_TAG, me.tag])
    assert _probe() == []  # outside, nothing is added


@pytest.mark.usefixtures("prefect_server")
def test_only_runs_of_ended_processes_on_this_machine_are_marked_crashed() -> None:
    me = TaggedProcess.of(ProcessIdentity.current())
    assert me is not None
    dead = _ended_process()
    elsewhere = TaggedProcess("node-7", dead.pid, dead.started, "0123456789ab")  # another machine: can't be judged
    cases = {
        "dead": [MARKER_TAG, dead.tag],
        "alive": [MARKER_TAG, me.tag],
        "elsewhere": [MARKER_TAG, elsewhere.tag],
        "untagged": [],
        "pid reused": [MARKER_TAG, TaggedProcess(me.host, me.pid, "1", me.machine_key).tag],
    }
    with get_client(sync_client=True) as client:
        ids = {}
        for name, tags in cases.items():
            run = client.create_flow_run(_probe, name=f"liveness-{name}-{uuid.uuid4().hex[:6]}", tags=tags)
            client.set_flow_run_state(run.id, Running(), force=True)
            ids[name] = run.id
        current = client.create_flow_run(_probe, tags=[MARKER_TAG, dead.tag])  # the caller's own run is spared
        client.set_flow_run_state(current.id, Running(), force=True)

        assert mark_dead_runs_crashed(current=str(current.id)) == 2

        states = {name: client.read_flow_run(run_id).state for name, run_id in ids.items()}
        assert client.read_flow_run(current.id).state.is_running()  # type: ignore[union-attr]
    assert states["dead"].is_crashed() and f"pid {dead.pid}" in (states["dead"].message or "")  # type: ignore[union-attr]
    assert states["pid reused"].is_crashed()  # type: ignore[union-attr]
    for name in ("alive", "elsewhere", "untagged"):
        assert states[name].is_running(), name  # type: ignore[union-attr]
    assert mark_dead_runs_crashed(current=str(current.id)) == 0  # marked once; the living stay as they are
    with get_client(sync_client=True) as client:
        for run_id in (*ids.values(), current.id):  # leave the session's server as other tests expect it
            client.delete_flow_run(run_id)

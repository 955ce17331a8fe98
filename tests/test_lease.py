"""The output lease: atomic acquisition on a local disk and on S3, liveness, takeover, forcing, fencing.

Fast tests of tasks/store/lease.py on their own (no model); the end-to-end crash tests are in test_crash_recovery.py.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from s3_server import make_bucket, s3_access_yaml

from docroute.schemas.spec import OutputSpec
from docroute.tasks.store.lease import (
    HolderVerdict,
    LeaseLostError,
    LeaseRecord,
    RunInProgressError,
    acquire_lease,
    force_release,
    newest_lease,
)
from docroute.tasks.store.process_identity import ProcessIdentity
from docroute.tasks.store.write import create_exclusive


def _local(tmp_path: Path) -> OutputSpec:
    return OutputSpec(url=str(tmp_path / "out"))


def _s3(endpoint: str, bucket: str) -> OutputSpec:
    make_bucket(endpoint, bucket)
    import yaml

    access = yaml.safe_load(s3_access_yaml(endpoint))["s3"]
    return OutputSpec.model_validate({"url": f"s3://{bucket}/out", "s3": access})


def _race(output: OutputSpec, url: str, contenders: int = 8) -> list[bool]:
    """`contenders` threads released together, each trying to create the same file with its own content."""
    barrier = threading.Barrier(contenders)
    won: list[bool] = [False] * contenders

    def contend(i: int) -> None:
        barrier.wait()
        won[i] = create_exclusive(output, url, f"contender {i}".encode())

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return won


def test_create_exclusive_has_exactly_one_winner_on_a_local_disk(tmp_path: Path) -> None:
    output = _local(tmp_path)
    url = output.layout.lease(1)
    won = _race(output, url)
    assert sum(won) == 1
    winner = won.index(True)
    assert Path(url).read_bytes() == f"contender {winner}".encode()  # the winner's whole content, never a mix
    assert not [p for p in Path(url).parent.iterdir() if p.name.startswith(".")]  # no staging file left


def test_create_exclusive_has_exactly_one_winner_on_s3(s3_endpoint: str) -> None:
    """moto enforces `If-None-Match: *` as S3 does: the conditional PUT is what makes the lease atomic there."""
    output = _s3(s3_endpoint, "lease-race")
    url = output.layout.lease(1)
    won = _race(output, url)
    assert sum(won) == 1
    assert not create_exclusive(output, url, b"late")


def _record(generation: int, **changes: object) -> LeaseRecord:
    now = datetime.now(UTC)
    me = ProcessIdentity.current()
    fields: dict[str, object] = {
        "generation": generation,
        "lease_id": uuid.uuid4().hex,
        "run_id": f"run-{generation}",
        "host": me.host,
        "pid": me.pid,
        "boot_id": me.boot_id,
        "pid_namespace": me.pid_namespace,
        "process_started": me.process_started,
        "acquired_at": now,
        "renewed_at": now,
        "expires_at": now + timedelta(seconds=60),
        "ttl_s": 60.0,
    }
    fields.update(changes)
    return LeaseRecord.model_validate(fields)


def _plant(output: OutputSpec, record: LeaseRecord) -> None:
    assert create_exclusive(output, output.layout.lease(record.generation), record.model_dump_json().encode())


def _dead_pid() -> tuple[int, str | None]:
    """A PID of this host whose process has ended, with the start time it had."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    from docroute.tasks.store.process_identity import process_started as _process_started

    started = _process_started(child.pid)
    child.kill()
    child.wait()
    return child.pid, started


def test_a_lease_whose_process_died_on_this_host_is_taken_over_at_once(tmp_path: Path) -> None:
    output = _local(tmp_path)
    pid, started = _dead_pid()
    _plant(output, _record(1, pid=pid, process_started=started))
    began = time.monotonic()
    lease = acquire_lease(output, run_id="next", flow_run_id=None, ttl_s=60)
    try:
        assert time.monotonic() - began < 5  # no waiting for the expiry
        assert lease.record.generation == 2 and lease.record.took_over == 1
        assert lease.takeover is not None and lease.takeover.verdict is HolderVerdict.PROCESS_GONE
    finally:
        lease.release("test")
    assert newest_lease(output) == lease.record and lease.record.released_by == "test"


def test_a_pid_reused_by_another_process_does_not_look_alive(tmp_path: Path) -> None:
    output = _local(tmp_path)
    me = ProcessIdentity.current()
    _plant(output, _record(1, pid=me.pid, process_started="1"))  # this PID, but a process started at another time
    lease = acquire_lease(output, run_id="next", flow_run_id=None, ttl_s=60)
    assert lease.takeover is not None and lease.takeover.verdict is HolderVerdict.PROCESS_GONE
    lease.release("test")


def test_a_live_holder_on_this_host_refuses_a_second_run_at_once(tmp_path: Path) -> None:
    output = _local(tmp_path)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        from docroute.tasks.store.process_identity import process_started as _process_started

        _plant(output, _record(1, pid=child.pid, process_started=_process_started(child.pid)))
        with pytest.raises(RunInProgressError, match="holds the lease") as refused:
            acquire_lease(output, run_id="second", flow_run_id=None, ttl_s=60)
        assert "run-1" in str(refused.value) and "docroute unlock" in str(refused.value)
        assert newest_lease(output).generation == 1  # type: ignore[union-attr]  # nothing written
    finally:
        child.kill()
        child.wait()


def test_an_expired_lease_from_another_host_is_taken_over(tmp_path: Path) -> None:
    output = _local(tmp_path)
    past = datetime.now(UTC) - timedelta(seconds=5)
    _plant(output, _record(1, host="node-7", boot_id="other", renewed_at=past, expires_at=past))
    lease = acquire_lease(output, run_id="next", flow_run_id=None, ttl_s=60)
    assert lease.takeover is not None and lease.takeover.verdict is HolderVerdict.EXPIRED
    lease.release("test")


def test_a_remote_holder_is_watched_until_it_expires_or_renews(tmp_path: Path) -> None:
    output = _local(tmp_path)
    soon = datetime.now(UTC) + timedelta(seconds=1.5)
    _plant(output, _record(1, host="node-7", boot_id="other", ttl_s=1.5, expires_at=soon))
    began = time.monotonic()
    lease = acquire_lease(output, run_id="next", flow_run_id=None, ttl_s=60, poll_s=0.1)
    assert 1.0 < time.monotonic() - began < 10  # it waited for the expiry, not for a person
    assert lease.takeover is not None and lease.takeover.verdict is HolderVerdict.EXPIRED
    lease.release("test")

    # a remote holder that renews while it is watched is alive: refused, without waiting for the whole TTL
    remote = _record(3, host="node-8", boot_id="other", ttl_s=30.0)
    _plant(output, remote)
    stop = threading.Event()

    def renew() -> None:
        from docroute.tasks.store.lease import _write

        while not stop.wait(0.3):
            now = datetime.now(UTC)
            _write(output, remote.model_copy(update={"renewed_at": now, "expires_at": now + timedelta(seconds=30)}))

    renewer = threading.Thread(target=renew)
    renewer.start()
    try:
        began = time.monotonic()
        with pytest.raises(RunInProgressError):
            acquire_lease(output, run_id="other", flow_run_id=None, ttl_s=60, poll_s=0.1)
        assert time.monotonic() - began < 5
    finally:
        stop.set()
        renewer.join()


def test_a_forced_unlock_fences_the_holder_off(tmp_path: Path) -> None:
    output = _local(tmp_path)
    lease = acquire_lease(output, run_id="holder", flow_run_id=None, ttl_s=60)
    lease.check()
    ended = force_release(output, "by the test")
    assert ended is not None and ended.run_id == "holder"
    with pytest.raises(LeaseLostError, match="taken over"):
        lease.check()
    lease.release("too late")  # writes nothing: the output is not this run's any more
    newest = newest_lease(output)
    assert newest is not None and newest.generation == 2 and newest.released_by == "forced: by the test"
    after = acquire_lease(output, run_id="next", flow_run_id=None, ttl_s=60)  # free at once
    assert after.record.generation == 3 and after.takeover is None
    after.release("test")


def test_the_heartbeat_renews_and_old_generations_are_pruned(tmp_path: Path) -> None:
    output = _local(tmp_path)
    lease = acquire_lease(output, run_id="beating", flow_run_id=None, ttl_s=1.0)
    first = lease.record.renewed_at
    time.sleep(1.0)
    assert newest_lease(output).renewed_at > first  # type: ignore[union-attr]
    lease.release("test")
    for i in range(12):
        acquire_lease(output, run_id=f"r{i}", flow_run_id=None, ttl_s=60).release("test")
    names = sorted(p.name for p in (Path(output.url) / "state" / "leases").iterdir())
    assert len(names) <= 9 and names[-1] == "lease-0000000013.json"


@pytest.mark.usefixtures("prefect_server")
def test_taking_over_marks_the_dead_runs_flow_run_crashed(tmp_path: Path) -> None:
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    @flow(name="lease-victim")
    def victim() -> None:
        return None

    with get_client(sync_client=True) as client:
        flow_run = client.create_flow_run(victim, state=Running())
        output = _local(tmp_path)
        pid, started = _dead_pid()
        _plant(output, _record(1, pid=pid, process_started=started, flow_run_id=str(flow_run.id)))
        lease = acquire_lease(output, run_id="rescuer", flow_run_id=None, ttl_s=60)
        lease.release("test")
        state = client.read_flow_run(flow_run.id).state
    assert lease.takeover is not None and lease.takeover.flow_run_marked_crashed
    assert state is not None and state.is_crashed() and "rescuer" in (state.message or "")

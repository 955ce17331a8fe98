"""One run per output, for real: a lease on the output that a live run renews and a dead run lets lapse.

Two runs writing one output would each process everything, each spend its own frontier cap, and delete each
other's uncommitted parts. A record of "who runs" is not enough: a SIGKILLed run (OOM killer, node loss, an
evicted pod) never says it has stopped, and its Prefect flow run stays "Running" forever with the local API. So
the run holds a *lease*: a small JSON object under `<output>/state/leases/`, created with a create-if-absent
write (tasks/store/write.py `create_exclusive`: a hard link on a local disk, `If-None-Match: *` on S3), renewed by a
heartbeat thread every quarter of its time to live, and released at the end of the run.

Generations make taking over safe. Lease files are `lease-<generation>.json`; the newest generation is the one
that counts. A run may create generation g + 1 only when generation g is released, or its holder is provably dead:
  * same host (hostname, boot id and PID namespace agree): the holder's process is gone (or is another process
    that reused its PID: the start time differs). Known at once, no waiting.
  * another host: the lease expired (not renewed for `ttl_s`), or Prefect reports the holder's flow run ended.
    A new run waits up to one time to live for that; a renewal seen meanwhile proves the holder alive.
Of two runs racing for g + 1 the store lets exactly one create it; the other sees the winner alive and stops
before it has listed, planned or spent anything.

A holder that finds a newer generation (it was declared dead while only stalled, or someone forced the lease with
`docroute unlock`) has lost the output: `check()` raises before each commit step, so it never commits over the
new holder. The remaining window (a stall between the check and the write it guards) is why the time to live
should be far longer than any pause of the process; clocks of the hosts must agree to well within it.
"""

from __future__ import annotations

import contextlib
import logging
import posixpath
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from fsspec.core import url_to_fs
from pydantic import BaseModel, ConfigDict

from docroute.schemas.errors import StateError
from docroute.schemas.spec import OutputSpec
from docroute.tasks.store.process_identity import ProcessIdentity, process_started
from docroute.tasks.store.write import atomic_write, create_exclusive

log = logging.getLogger(__name__)

_HELD: set[str] = set()
"""Lease ids this process holds now: a lease naming this very process but not in here was left by an earlier run
of it that could not give the lease back (its storage failed at the end), so it does not prove a live holder."""
_HELD_LOCK = threading.Lock()

KEPT_GENERATIONS = 8
"""Older lease files are pruned; a few are kept as a short history of who ran (and who was taken over)."""


class RunInProgressError(StateError, RuntimeError):
    """Another live run holds the output's lease; this run stopped before doing anything."""


class LeaseLostError(StateError, RuntimeError):
    """This run's lease was taken over (it was judged dead, or forced): it must not commit."""


class HolderVerdict(StrEnum):
    """What a new run concluded about the newest lease on the output."""

    NONE = "none"  # no lease was ever taken
    RELEASED = "released"  # its run ended and gave it back
    ALIVE = "alive"  # same host, its process runs; or another host and it renewed while we watched
    PROCESS_GONE = "process_gone"  # same host, its process no longer exists
    EXPIRED = "expired"  # not renewed for its time to live
    FLOW_RUN_ENDED = "flow_run_ended"  # Prefect says its flow run is in a final state
    UNKNOWN = "unknown"  # another host, not expired yet: wait and watch

    @property
    def dead(self) -> bool:
        return self in {HolderVerdict.PROCESS_GONE, HolderVerdict.EXPIRED, HolderVerdict.FLOW_RUN_ENDED}


class LeaseRecord(BaseModel):
    """The content of one lease file: who holds it, until when, and whether it was given back."""

    model_config = ConfigDict(frozen=True)

    generation: int
    lease_id: str
    run_id: str
    flow_run_id: str | None = None
    host: str
    pid: int
    boot_id: str | None = None
    pid_namespace: str | None = None
    process_started: str | None = None  # the process's start time in clock ticks since boot (/proc/<pid>/stat)
    acquired_at: datetime
    renewed_at: datetime
    expires_at: datetime
    ttl_s: float
    released_at: datetime | None = None
    released_by: str | None = None  # why: "commit", "failed: …", "forced: …"
    took_over: int | None = None  # the generation this one replaced without its release

    def describe(self) -> str:
        where = f"{self.host} pid {self.pid}"
        return f"run {self.run_id} ({where}, lease generation {self.generation}, renewed {self.renewed_at:%H:%M:%S}Z)"


def _generations(output: OutputSpec) -> list[int]:
    fs, root = url_to_fs(output.layout.leases_dir(), **output.fsspec_options())
    fs.invalidate_cache(root)
    try:
        names = [posixpath.basename(p) for p in fs.ls(root, detail=False)]
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        if name.startswith("lease-") and name.endswith(".json"):
            with contextlib.suppress(ValueError):
                found.append(int(name[len("lease-") : -len(".json")]))
    return sorted(found)


def _read(output: OutputSpec, generation: int) -> LeaseRecord | None:
    fs, path = url_to_fs(output.layout.lease(generation), **output.fsspec_options())
    try:
        return LeaseRecord.model_validate_json(fs.cat_file(path))
    except FileNotFoundError:
        return None


def newest_lease(output: OutputSpec) -> LeaseRecord | None:
    """The lease that counts now (the newest generation), or None when no run ever took one."""
    for generation in reversed(_generations(output)):
        record = _read(output, generation)
        if record is not None:
            return record
    return None


def _flow_run_ended(flow_run_id: str | None) -> bool:
    """Whether Prefect reports the holder's flow run in a final state (False when it cannot tell)."""
    if not flow_run_id:
        return False
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            state = client.read_flow_run(uuid.UUID(flow_run_id)).state
    except Exception:  # another Prefect server's run, or no API: nothing is proved
        return False
    return state is not None and state.is_final()


def judge(record: LeaseRecord | None, me: ProcessIdentity, now: datetime) -> HolderVerdict:
    """Decide whether the newest lease still has a live holder, without waiting."""
    if record is None:
        return HolderVerdict.NONE
    if record.released_at is not None:
        return HolderVerdict.RELEASED
    if me.sees(record.host, record.boot_id, record.pid_namespace):
        if record.pid == me.pid and record.process_started == me.process_started:
            with _HELD_LOCK:
                return HolderVerdict.ALIVE if record.lease_id in _HELD else HolderVerdict.PROCESS_GONE
        started = process_started(record.pid)
        if started is None:
            return HolderVerdict.PROCESS_GONE
        if record.process_started is None or started == record.process_started:
            # the same process (or, without a recorded start time, maybe another that reused the PID: then only
            # expiry below can tell)
            if record.process_started is not None or now < record.expires_at:
                return HolderVerdict.ALIVE
        else:
            return HolderVerdict.PROCESS_GONE  # the PID now names another process
    if now >= record.expires_at:
        return HolderVerdict.EXPIRED
    if _flow_run_ended(record.flow_run_id):
        return HolderVerdict.FLOW_RUN_ENDED
    return HolderVerdict.UNKNOWN


def mark_flow_run_crashed(flow_run_id: str | None, message: str) -> bool:
    """Move a dead holder's flow run to Crashed so the UI stops showing it as running; False when it could not."""
    if not flow_run_id:
        return False
    try:
        from prefect.client.orchestration import get_client
        from prefect.states import Crashed

        with get_client(sync_client=True) as client:
            run_id = uuid.UUID(flow_run_id)
            state = client.read_flow_run(run_id).state
            if state is not None and state.is_final():
                return False
            client.set_flow_run_state(run_id, Crashed(message=message), force=True)
    except Exception as exc:  # not ours to fail on: the output is what matters
        log.info("could not mark flow run %s crashed: %s", flow_run_id, type(exc).__name__)
        return False
    return True


# -- the held lease ---------------------------------------------------------------------------------------------


@dataclass
class Takeover:
    """The lease a run replaced because its holder was dead."""

    previous: LeaseRecord
    verdict: HolderVerdict
    flow_run_marked_crashed: bool


class OutputLease:
    """A lease this process holds; a daemon thread renews it until `release`."""

    def __init__(self, output: OutputSpec, record: LeaseRecord, takeover: Takeover | None) -> None:
        self.output = output
        self.record = record
        self.takeover = takeover
        self._lost: str | None = None
        self._valid_until = record.expires_at
        self._stop = threading.Event()
        self._lock = threading.Lock()
        with _HELD_LOCK:
            _HELD.add(record.lease_id)
        self._thread = threading.Thread(target=self._renew_forever, name="docroute-lease", daemon=True)
        self._thread.start()

    @property
    def renew_every_s(self) -> float:
        return max(0.2, self.record.ttl_s / 4)

    def _renew_forever(self) -> None:
        while not self._stop.wait(self.renew_every_s):
            try:
                self.renew()
            except LeaseLostError:
                return
            except Exception as exc:  # storage hiccup: try again next beat; check() fails once the lease lapses
                log.warning("could not renew the lease on %s: %s", self.output.url, type(exc).__name__)

    def renew(self) -> None:
        """Push the expiry forward, unless a newer generation says the output is no longer ours."""
        with self._lock:
            if self._lost is not None:
                raise LeaseLostError(self._lost)
            newer = [g for g in _generations(self.output) if g > self.record.generation]
            if newer:
                taker = _read(self.output, newer[-1])
                self._lost = (
                    f"this run's lease on {self.output.url} was taken over by "
                    f"{taker.describe() if taker else f'generation {newer[-1]}'}"
                    + (f" ({taker.released_by})" if taker and taker.released_by else "")
                )
                raise LeaseLostError(self._lost)
            now = datetime.now(UTC)
            record = self.record.model_copy(
                update={"renewed_at": now, "expires_at": now + timedelta(seconds=self.record.ttl_s)}
            )
            _write(self.output, record)
            self.record, self._valid_until = record, record.expires_at

    def check(self) -> None:
        """Raise LeaseLostError unless the lease is still this run's; called before every commit step."""
        self.renew()
        if datetime.now(UTC) >= self._valid_until:  # pragma: no cover - renew() just moved it
            raise LeaseLostError(f"this run's lease on {self.output.url} lapsed")

    def release(self, why: str) -> None:
        """Stop renewing and give the output back (nothing is written when the lease was lost)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=self.renew_every_s + 30)
        with _HELD_LOCK:
            _HELD.discard(self.record.lease_id)
        with self._lock:
            if self._lost is not None:
                return
            released = self.record.model_copy(update={"released_at": datetime.now(UTC), "released_by": why})
            _write(self.output, released)
            self.record = released
        _prune(self.output, self.record.generation)

    @contextlib.contextmanager
    def released_after(
        self, success: str, logger: logging.Logger | logging.LoggerAdapter[Any] | None = None
    ) -> Iterator[OutputLease]:
        """Hold the lease for the block, then release it saying how the block ended: `success`, or
        `failed: <exception type>`. A release that fails is logged, never raised: it must not hide the block's own
        error, and the lease lapses by itself within its time to live."""
        outcome = "failed"
        try:
            yield self
            outcome = success
        except BaseException as exc:
            outcome = f"failed: {type(exc).__name__}"
            raise
        finally:
            try:
                self.release(outcome)
            except Exception as exc:
                (logger or log).warning(
                    "could not release the lease on %s (%s): it lapses in %.0f s",
                    self.output.url,
                    exc,
                    self.record.ttl_s,
                )


def _write(output: OutputSpec, record: LeaseRecord) -> None:
    data = record.model_dump_json(indent=2).encode()
    atomic_write(output, output.layout.lease(record.generation), lambda handle: handle.write(data))


def _prune(output: OutputSpec, current: int) -> None:
    """Delete lease files far behind `current` (a stale racer re-creating one backs off when it sees `current`)."""
    fs, _ = url_to_fs(output.url, **output.fsspec_options())
    for generation in _generations(output):
        if generation <= current - KEPT_GENERATIONS:
            _, path = url_to_fs(output.layout.lease(generation), **output.fsspec_options())
            with contextlib.suppress(FileNotFoundError):
                fs.rm(path)


def acquire_lease(
    output: OutputSpec,
    *,
    run_id: str,
    flow_run_id: str | None,
    ttl_s: float,
    wait_s: float | None = None,
    poll_s: float | None = None,
) -> OutputLease:
    """Take the output's lease, replacing a dead holder's; raise RunInProgressError when a live run holds it.

    A holder on another host that has neither expired nor renewed yet is watched for up to `wait_s` (default: its
    time to live): a renewal proves it alive, expiry proves it dead.
    """
    me = ProcessIdentity.current()
    watched: LeaseRecord | None = None
    deadline: float | None = None
    poll = poll_s if poll_s is not None else min(1.0, ttl_s / 8)
    while True:
        latest = newest_lease(output)
        now = datetime.now(UTC)
        verdict = judge(latest, me, now)
        if verdict is HolderVerdict.UNKNOWN and latest is not None:
            if watched is not None and (
                latest.generation != watched.generation or latest.renewed_at != watched.renewed_at
            ):
                verdict = HolderVerdict.ALIVE  # it renewed while we watched
            else:
                if watched is None:
                    watched = latest
                    deadline = time.monotonic() + (wait_s if wait_s is not None else latest.ttl_s)
                if deadline is not None and time.monotonic() < deadline:
                    time.sleep(poll)
                    continue
                verdict = HolderVerdict.ALIVE  # watched long enough without proof of death
        if verdict is HolderVerdict.ALIVE and latest is not None:
            raise RunInProgressError(
                f"{latest.describe()} holds the lease on {output.url} until {latest.expires_at:%Y-%m-%d %H:%M:%S}Z "
                "and is alive: runs of one output never overlap, so this run stopped before doing anything. If that "
                "run is in fact dead on a host this one cannot see, its lease lapses by itself at that time; "
                "`docroute unlock JOB` ends it now."
            )
        generation = (latest.generation + 1) if latest is not None else 1
        record = LeaseRecord(
            generation=generation,
            lease_id=uuid.uuid4().hex,
            run_id=run_id,
            flow_run_id=flow_run_id,
            host=me.host,
            pid=me.pid,
            boot_id=me.boot_id,
            pid_namespace=me.pid_namespace,
            process_started=me.process_started,
            acquired_at=now,
            renewed_at=now,
            expires_at=now + timedelta(seconds=ttl_s),
            ttl_s=ttl_s,
            took_over=latest.generation if latest is not None and verdict.dead else None,
        )
        data = record.model_dump_json(indent=2).encode()
        if not create_exclusive(output, output.layout.lease(generation), data):
            watched, deadline = None, None
            continue  # another run took this generation first: look again (it is most likely alive)
        if any(g > generation for g in _generations(output)):
            # we re-created a pruned old generation from a stale look: the newer one stands
            _remove(output, generation)
            watched, deadline = None, None
            continue
        takeover = None
        if latest is not None and verdict.dead:
            marked = mark_flow_run_crashed(
                latest.flow_run_id,
                f"docroute: run {run_id} found this run dead ({verdict.value}) and took over its output",
            )
            takeover = Takeover(latest, verdict, marked)
        return OutputLease(output, record, takeover)


def _remove(output: OutputSpec, generation: int) -> None:
    fs, path = url_to_fs(output.layout.lease(generation), **output.fsspec_options())
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path)


def force_release(output: OutputSpec, why: str) -> LeaseRecord | None:
    """End the current lease whoever holds it (`docroute unlock`); returns the lease that was ended, if any.

    Writes a newer generation that is released from birth: the next run starts at once, and a holder that was in
    fact alive finds it at its next renewal and stops before committing.
    """
    while True:
        latest = newest_lease(output)
        if latest is None or latest.released_at is not None:
            return None
        now = datetime.now(UTC)
        me = ProcessIdentity.current()
        record = LeaseRecord(
            generation=latest.generation + 1,
            lease_id=uuid.uuid4().hex,
            run_id="docroute-unlock",
            host=me.host,
            pid=me.pid,
            acquired_at=now,
            renewed_at=now,
            expires_at=now,
            ttl_s=0,
            released_at=now,
            released_by=f"forced: {why}",
            took_over=latest.generation,
        )
        if create_exclusive(output, output.layout.lease(record.generation), record.model_dump_json(indent=2).encode()):
            return latest

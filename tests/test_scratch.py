"""Run scratch folders: removed on every exit that runs code, swept after a SIGKILL, never swept while alive.

The deaths are real: a child Python process enters `run_scratch()` and is killed with SIGKILL, which runs no
`finally` and no `atexit`, exactly as the OOM killer would; only the kernel's release of its lock is left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from docroute.tasks.store.scratch import LOCK_NAME, SCRATCH_PREFIX, UNLOCKED_GRACE_S, run_scratch, sweep_stale_scratch

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the child processes are killed with POSIX signals")

CHILD = """
import sys, time
from docroute.tasks.store.scratch import run_scratch
with run_scratch() as scratch:
    (scratch / "spill.arrow").write_bytes(b"x" * 1000)
    print(scratch, flush=True)
    if sys.argv[1] == "exit":
        sys.exit(3)
    time.sleep(120)
"""


def _child(tmp_path: Path, mode: str = "sleep") -> tuple[subprocess.Popen[str], Path]:
    """A process holding a scratch folder under tmp_path (through TMPDIR, as a run would), and that folder."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, mode], stdout=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    assert child.stdout is not None
    line = child.stdout.readline().strip()
    assert line, f"the child printed no folder (exit code {child.poll()})"
    return child, Path(line)


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    """Children a test starts; any still alive at the end are killed, so no test leaves a sleeper behind."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for child in started:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=30)


def test_a_sigkilled_runs_folder_stays_until_swept_and_a_live_one_is_never_swept(
    tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    doomed, doomed_folder = _child(tmp_path)
    alive, alive_folder = _child(tmp_path)
    children += [doomed, alive]
    assert doomed_folder.parent == tmp_path and doomed_folder.name.startswith(SCRATCH_PREFIX)
    assert (doomed_folder / LOCK_NAME).is_file() and (doomed_folder / "spill.arrow").is_file()

    assert sweep_stale_scratch(tmp_path) == 0  # both owners are alive
    assert doomed_folder.is_dir() and alive_folder.is_dir()

    doomed.send_signal(signal.SIGKILL)
    assert doomed.wait(timeout=30) == -signal.SIGKILL
    assert (doomed_folder / "spill.arrow").is_file()  # nothing ran in the dead process: the folder leaked

    assert sweep_stale_scratch(tmp_path) == 1
    assert not doomed_folder.exists()
    assert (alive_folder / "spill.arrow").is_file() and alive.poll() is None  # the live run keeps its folder
    assert sweep_stale_scratch(tmp_path) == 0


def test_sys_exit_and_ctrl_c_in_a_real_process_remove_the_folder(
    tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    exiting, exiting_folder = _child(tmp_path, "exit")
    interrupted, interrupted_folder = _child(tmp_path)
    children += [exiting, interrupted]
    assert exiting.wait(timeout=30) == 3
    interrupted.send_signal(signal.SIGINT)  # KeyboardInterrupt inside the with block
    assert interrupted.wait(timeout=30) != 0
    assert not exiting_folder.exists() and not interrupted_folder.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt(), SystemExit(1)])
def test_every_exit_that_runs_code_removes_the_folder(tmp_path: Path, error: BaseException) -> None:
    with pytest.raises(type(error)), run_scratch(tmp_path) as scratch:
        (scratch / "state").mkdir()
        (scratch / "state" / "bucket-0.arrow").write_bytes(b"spill")
        raise error
    assert not scratch.exists()
    with run_scratch(tmp_path) as scratch:
        pass
    assert not scratch.exists() and list(tmp_path.iterdir()) == []


def test_a_sweep_in_the_owning_process_leaves_its_folder_alone(tmp_path: Path) -> None:
    with run_scratch(tmp_path) as scratch:
        assert sweep_stale_scratch(tmp_path) == 0  # flock locks belong to the open file, not to the process
        assert scratch.is_dir()
        scratch.rename(tmp_path / f"{SCRATCH_PREFIX}moved")  # the run's code removed it itself: exit must not fail
    assert list(tmp_path.iterdir()) == [tmp_path / f"{SCRATCH_PREFIX}moved"]


def test_lockless_folders_are_stale_only_once_old_and_other_names_are_never_touched(tmp_path: Path) -> None:
    young = tmp_path / f"{SCRATCH_PREFIX}young"  # an owner between mkdtemp and its lock
    old = tmp_path / f"{SCRATCH_PREFIX}old"  # a TemporaryDirectory left by a version without locks
    other = tmp_path / "docroute-memflat-1"
    for folder in (young, old, other):
        (folder / "state").mkdir(parents=True)
    (tmp_path / f"{SCRATCH_PREFIX}file").write_text("not a folder")
    (tmp_path / f"{SCRATCH_PREFIX}link").symlink_to(other)
    an_hour_ago = time.time() - max(3600, 2 * UNLOCKED_GRACE_S)
    for folder in (old, other):
        os.utime(folder, (an_hour_ago, an_hour_ago))

    assert sweep_stale_scratch(tmp_path) == 1
    assert not old.exists() and young.is_dir() and other.is_dir()
    assert (tmp_path / f"{SCRATCH_PREFIX}file").is_file() and (tmp_path / f"{SCRATCH_PREFIX}link").is_symlink()


def test_a_sweep_tolerates_folders_vanishing_and_a_missing_root(tmp_path: Path) -> None:
    from docroute.tasks.store import scratch as scratch_module

    assert scratch_module._remove_if_stale(tmp_path / f"{SCRATCH_PREFIX}gone", time.time()) is False
    assert sweep_stale_scratch(tmp_path / "no-such-folder") == 0

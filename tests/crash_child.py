"""Run one docroute job in this process and SIGKILL it at a named step: how the crash tests die for real.

Usage: python crash_child.py JOB [KILL_POINT] [--start-at EPOCH_SECONDS]

KILL_POINT is `module:attribute[@nth][+after]`: the process sends itself SIGKILL on the nth call (default 1) of that
function, before it runs (or right after it returns, with `+after`). Nothing in docroute knows about this: the
function is replaced from outside, and SIGKILL runs no `finally`, no `atexit` and no Prefect state hook, exactly
as the OOM killer or a lost node would. `none` runs the job to the end. `--start-at` makes the process wait until
that wall-clock time before taking the output's lease, so two processes can race for it at the same instant.

The job runs with the default local Prefect API (whatever PREFECT_HOME the parent set; no PREFECT_API_URL).
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(point: str) -> None:
    after = point.endswith("+after")
    point = point.removesuffix("+after")
    target, _, nth_text = point.partition("@")
    nth = int(nth_text or "1")
    module_name, _, attribute = target.partition(":")
    owner: Any = importlib.import_module(module_name)
    *path, name = attribute.split(".")
    for part in path:
        owner = getattr(owner, part)
    real: Callable[..., Any] = getattr(owner, name)
    calls = 0
    lock = threading.Lock()

    def killing(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        with lock:
            calls += 1
            now = calls
        if now == nth and not after:
            print(f"crash_child: SIGKILL before {point} (call {now})", file=sys.stderr)
            _die()
        result = real(*args, **kwargs)
        if now == nth and after:
            print(f"crash_child: SIGKILL after {point} (call {now})", file=sys.stderr)
            _die()
        return result

    setattr(owner, name, killing)


def _start_at(epoch: float) -> None:
    from docroute.flows import process

    real = process.acquire_lease

    def waiting(*args: Any, **kwargs: Any) -> Any:
        time.sleep(max(0.0, epoch - time.time()))
        return real(*args, **kwargs)

    process.acquire_lease = waiting  # type: ignore[assignment]


def main(argv: list[str]) -> int:
    job = argv[1]
    point = argv[2] if len(argv) > 2 else "none"
    if "--start-at" in argv:
        _start_at(float(argv[argv.index("--start-at") + 1]))
    if point != "none":
        _arm(point)
    from docroute.flows.process import process_documents
    from docroute.flows.run_liveness import tagged_with_this_process

    with tagged_with_this_process():  # as `docroute run` does
        summary = process_documents(job)
    print(f"crash_child: run {summary.run_id} processed {summary.documents}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

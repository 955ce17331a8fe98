"""Compact one job's output in this process and SIGKILL it at a named step (see crash_child.py for the KILL_POINT
syntax): how tests/test_compact.py kills a compaction for real.

It runs the compaction's own sequence (`tasks/store/compact.py compact`, the one the flow runs with each step as a
Prefect task) without Prefect's API: nothing the compaction relies on after a crash lives in Prefect, and an
ephemeral API per child would cost the test most of its time.

Usage: python compact_child.py JOB [KILL_POINT]    (retention 0: replaced parts are deleted at once)
"""

from __future__ import annotations

import sys

from crash_child import _arm


def main(argv: list[str]) -> int:
    job = argv[1]
    point = argv[2] if len(argv) > 2 else "none"
    if point != "none":
        _arm(point)
    import uuid
    from pathlib import Path

    from docroute.schemas.load import load_job
    from docroute.tasks.store.compact import compact

    report = compact(load_job(Path(job)), compaction_id=uuid.uuid4().hex, retention_hours=0)
    print(f"crash_child: compaction {report.compaction_id} {report.action.value}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

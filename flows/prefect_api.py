"""Start Prefect's ephemeral API while the CLI imports the pipeline, not after.

Without `PREFECT_API_URL`, the first Prefect client of a process starts a temporary API server in a subprocess
(`SubprocessASGIServer`) and waits for its health check: 3–4 s on two cores with an existing database, on top of
the 3–4 s the CLI then spends importing the pipeline (scikit-learn, pyarrow, the engines). The two do not depend
on each other, so the CLI starts the server in a thread first and joins it before the flow runs; the flow's client
then finds Prefect's own singleton already running and uses it. Nothing is started when an API URL is configured
(a server or Prefect Cloud) or ephemeral mode is off, and a start that fails here is simply tried again, with
Prefect's own error, by the flow's client.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApiStart:
    """A background start of the ephemeral API, or nothing to wait for."""

    thread: threading.Thread | None

    def wait(self) -> None:
        """Block until the server answers its health check (or its start gave up)."""
        if self.thread is not None:
            self.thread.join()


class _InFlight:
    """The start this process has under way, if any (one at a time: see `start_ephemeral_api_early`)."""

    lock = threading.Lock()
    thread: threading.Thread | None = None


def start_ephemeral_api_early() -> ApiStart:
    """Begin starting Prefect's ephemeral API in a thread when this process would start one anyway.

    A call while an earlier start is still under way returns that start: Prefect's server singleton counts as
    running from the moment its subprocess is launched, so a second `start()` would return before it answers.
    The settings are read on every call (tests and embedding code change them between commands).
    """
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled:
        return ApiStart(thread=None)
    with _InFlight.lock:
        if _InFlight.thread is None or not _InFlight.thread.is_alive():
            _InFlight.thread = threading.Thread(target=_start, name="docroute-prefect-api-start", daemon=True)
            _InFlight.thread.start()
        return ApiStart(thread=_InFlight.thread)


def _start() -> None:
    from prefect.server.api.server import SubprocessASGIServer

    try:
        SubprocessASGIServer().start()
    except Exception as exc:  # the flow's own client starts it again and raises Prefect's error if it still fails
        _log.debug("early start of Prefect's ephemeral API failed: %s", exc)

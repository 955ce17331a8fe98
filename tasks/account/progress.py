"""Progress bars in the terminal for the long commands (`run`, `calibrate`, `evaluate`, `train`, `compact`).

Only the CLI knows whether a person is watching (its stderr is a terminal), and the bars advance deep inside flows
whose parameters Prefect records and shows in the UI; so the CLI switches the display on around the flow call
(`terminal_progress`) and a stage asks for a `bar` wherever it counts work. With the display off (a pipe, a log
file, a scheduled deployment, a test) a bar is a no-op, so nothing reaches logs that was not asked for.

rich's display is thread-safe, so a bar may be advanced from a task runner's threads as well as the flow's own.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID


class _Watched:
    """The display bars go to while the CLI shows them (None: nobody watches); one per process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.display: Progress | None = None


_watched = _Watched()


class Bar:
    """One stage's bar (a no-op when no terminal watches): `advance` as units finish, `total` when it is learned."""

    def __init__(self, display: Progress | None, task: TaskID | None) -> None:
        self._display = display
        self._task = task

    @property
    def visible(self) -> bool:
        """Whether a terminal shows this bar (work may then be cut finer so that it moves)."""
        return self._task is not None

    def advance(self, units: int = 1) -> None:
        if self._display is not None and self._task is not None:
            self._display.advance(self._task, units)

    def set_total(self, total: int) -> None:
        if self._display is not None and self._task is not None:
            self._display.update(self._task, total=max(total, 0))

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()

    def finish(self) -> None:
        """Stop the clock on this bar; it stays on screen with its final count."""
        if self._display is not None and self._task is not None:
            self._display.stop_task(self._task)


def bar(description: str, total: int | None) -> Bar:
    """A bar for `total` units of work (None: unknown yet), shown only while `terminal_progress` is on."""
    with _watched.lock:
        display = _watched.display
    if display is None:
        return Bar(None, None)
    return Bar(display, display.add_task(description, total=total))


def terminal_console() -> Console | None:
    """stderr's console when it is a terminal, else None (progress stays off)."""
    from rich.console import Console

    console = Console(stderr=True)
    return console if console.is_terminal else None


@contextmanager
def terminal_progress(console: Console | None) -> Iterator[None]:
    """Show every bar the enclosed work opens on `console`; with None, bars stay silent."""
    if console is None:
        yield
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    display = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        redirect_stdout=False,  # Prefect's log handler keeps its own stream; redirecting would garble both
        redirect_stderr=False,
    )
    with display:
        with _watched.lock:
            _watched.display = display
        try:
            yield
        finally:
            with _watched.lock:
                _watched.display = None

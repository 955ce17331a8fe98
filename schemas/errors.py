"""The one base of every error docroute raises on purpose, so a caller can catch them all in one place.

The CLI, or a program that embeds docroute, writes ``except DocrouteError`` to tell "docroute refused, and says why"
apart from a bug. The human message is the exception's text (``str(exc)``): it names the file, field or run and the
problem, so a caller shows it as it is. Subclasses say what kind of failure it is:

- ``InputError``: something the user gave cannot be used (a job file, an examples, labels or candidates file, a price
  the job does not set); fixing the input fixes the run, and trying again without changing it fails again.
- ``StateError``: the output folder is not in a state this run can work in (another live run holds its lease, a head
  the router names is gone).
- ``SourceError``: the job's source cannot be listed or read (a missing folder or bucket, no permission, the store
  unreachable after retries).
- ``StorageError``: the output cannot be written or read back (no permission, a full disk, the store unreachable).
- engine failures (``EngineError`` in engines/base.py and its subclasses): ``TransientError`` marks the ones that
  a later run may not meet (a server down, a slot not free), the rest need a person (a missing model, a bad key).
- the rest derive from ``DocrouteError`` directly: model answers that do not fit, a missing runner integration or
  concurrency limit.

Each class carries the exit code the CLI ends with (``ExitCode``), so a scheduler can tell "fix the job file" from
"another run holds the output" from "try again later" without reading the message. A frontier budget that runs out
is not an error: the rows it could not pay for are deferred (`route_outcome` budget_exhausted) and the run succeeds.

Every docroute exception also keeps the built-in base it had before (``ValueError``, ``RuntimeError``,
``FileNotFoundError``, ``KeyError``), so code that caught those still catches the same errors. This module is the lowest
layer: it imports nothing from docroute.
"""

from __future__ import annotations

from enum import IntEnum
from typing import ClassVar


class ExitCode(IntEnum):
    """How `docroute` ends; a scheduler's retry rule can key on these."""

    OK = 0
    FAILED = 1  # a failure docroute did not classify (a bug, or a library's own error)
    INPUT = 2  # fix the job file or the file it names, then run again
    STATE = 3  # the output is busy (another live run holds its lease) or not usable as it is
    SOURCE = 4  # the source cannot be listed or read
    STORAGE = 5  # the output cannot be written or read
    ENGINE = 6  # a model back end cannot be used as configured
    TEMPORARY = 75  # sysexits' EX_TEMPFAIL: the same run later may well succeed


class DocrouteError(Exception):
    """Base of every error docroute raises on purpose; ``str(exc)`` is the message to show a person."""

    exit_code: ClassVar[ExitCode] = ExitCode.FAILED


class InputError(DocrouteError):
    """Something the user gave (a job file, an examples/labels/candidates file, a setting) cannot be used."""

    exit_code = ExitCode.INPUT


class StateError(DocrouteError):
    """The output's state does not allow this run (a lease another run holds, a head file that is gone)."""

    exit_code = ExitCode.STATE


class SourceError(DocrouteError):
    """The job's source cannot be listed or read."""

    exit_code = ExitCode.SOURCE


class StorageError(DocrouteError):
    """The output cannot be written or read back."""

    exit_code = ExitCode.STORAGE


class TransientError(DocrouteError):
    """Mixed into a failure that the same run, started again later, may not meet (a server down, a slot busy)."""

    exit_code = ExitCode.TEMPORARY

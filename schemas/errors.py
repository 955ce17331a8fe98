"""The one base of every error docroute raises on purpose, so a caller can catch them all in one place.

The CLI, or a program that embeds docroute, writes ``except DocrouteError`` to tell "docroute refused, and says why"
apart from a bug. The human message is the exception's text (``str(exc)``): it names the file, field or run and the
problem, so a caller shows it as it is. Subclasses say what kind of failure it is:

- ``InputError``: something the user gave cannot be used (a job file, an examples, labels or candidates file, a price
  the job does not set); fixing the input fixes the run, and trying again without changing it fails again.
- ``StateError``: the output folder is not in a state this run can work in (another live run holds its lease, a head
  the router names is gone).
- the rest derive from ``DocrouteError`` directly: engine failures (``EngineError`` and its subclasses), model answers
  that do not fit, a missing runner integration or concurrency limit.

Every docroute exception also keeps the built-in base it had before (``ValueError``, ``RuntimeError``,
``FileNotFoundError``, ``KeyError``), so code that caught those still catches the same errors. This module is the lowest
layer: it imports nothing from docroute.
"""

from __future__ import annotations


class DocrouteError(Exception):
    """Base of every error docroute raises on purpose; ``str(exc)`` is the message to show a person."""


class InputError(DocrouteError):
    """Something the user gave (a job file, an examples/labels/candidates file, a setting) cannot be used."""


class StateError(DocrouteError):
    """The output's state does not allow this run (a lease another run holds, a head file that is gone)."""

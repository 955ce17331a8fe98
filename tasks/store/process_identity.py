"""Who a process is, for good: host, boot, PID namespace, PID and start time, read from /proc.

A PID alone is reused; with the process's start time (clock ticks since boot) it names one process for the life of
the machine. Two records can only be compared when they were taken on the same host, boot and PID namespace: only
then can one process look the other up in its own process table. Without /proc (macOS, Windows) the start time and
namespace are unknown and nothing is ever declared dead from here: callers fall back to time-based evidence.
"""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path


def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="ascii").strip()
    except OSError:
        return None


def _pid_namespace() -> str | None:
    try:
        return str(Path("/proc/self/ns/pid").readlink())
    except OSError:
        return None


def process_started(pid: int) -> str | None:
    """Start time of a process in clock ticks since boot, or None when no such process (or no /proc)."""
    stat = _read_text(f"/proc/{pid}/stat")
    if stat is None:
        return None
    # the command name (field 2) may hold spaces and parentheses: fields after the last ")" are fixed
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


@dataclass(frozen=True)
class ProcessIdentity:
    host: str
    pid: int
    boot_id: str | None
    pid_namespace: str | None
    process_started: str | None

    @classmethod
    def current(cls) -> ProcessIdentity:
        pid = os.getpid()
        return cls(
            socket.gethostname(),
            pid,
            _read_text("/proc/sys/kernel/random/boot_id"),
            _pid_namespace(),
            process_started(pid),
        )

    @property
    def machine_key(self) -> str | None:
        """A short digest of host, boot and PID namespace: equal keys mean one process table; None without /proc."""
        if self.boot_id is None or self.pid_namespace is None:
            return None
        digest = hashlib.sha256(f"{self.host}\0{self.boot_id}\0{self.pid_namespace}".encode())
        return digest.hexdigest()[:12]

    def sees(self, host: str, boot_id: str | None, pid_namespace: str | None) -> bool:
        """Whether this process can look at another's process table: same host, same boot, same PID namespace."""
        return (
            self.boot_id is not None
            and self.pid_namespace is not None
            and host == self.host
            and boot_id == self.boot_id
            and pid_namespace == self.pid_namespace
        )


def is_gone(pid: int, started: str) -> bool:
    """Whether the process that had this PID and start time has ended (its PID is free or names another process).

    Only meaningful for a process seen from the same machine key (`ProcessIdentity.sees`).
    """
    return process_started(pid) != started

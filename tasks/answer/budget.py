"""The per-run frontier budget: reserve before calling, settle after, never exceed.

A reservation is an upper bound on the call's cost (prompt bytes bound its tokens, max_tokens bounds the output),
so however many shards escalate at once the settled total cannot pass the cap. Shard tasks of one run share a
budget through `run_budget` while they run as threads of one process (the default runner); shards in other
processes (Dask, Ray) each spend an allowance the flow grants from the cap (`AllowanceBook`).

Reservations are made per provider call, just before it is sent, and settled the moment it returns
(tasks/answer/escalate.py `BudgetGate`). A call that does not fit waits (`reserve`, on the caller's event loop, without
blocking it) while other calls hold reservations, since they give back what they did not spend; it is refused
only when no call is in flight and it still does not fit. So by the time anything is refused, the spend is
within one call's bound of the cap. Waiters are served first come, first served: a call never overtakes an
earlier one, so an order of requests (escalations before audits) is an order of claims on the budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from dataclasses import dataclass, field


@dataclass(eq=False)
class _Waiter:
    """A call waiting for budget: woken on its own event loop (budgets are shared by threads with their loops)."""

    loop: asyncio.AbstractEventLoop
    event: asyncio.Event = field(default_factory=asyncio.Event)

    def wake(self) -> None:
        with contextlib.suppress(RuntimeError):  # its loop has closed: nobody is waiting any more
            self.loop.call_soon_threadsafe(self.event.set)


@dataclass
class FrontierBudget:
    """Thread-safe spend tracker; `limit_usd` None means no cap."""

    limit_usd: float | None
    spent_usd: float = 0.0
    reserved_usd: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _held: int = field(default=0, repr=False)  # reservations not yet settled: calls in flight
    _waiters: deque[_Waiter] = field(default_factory=deque, repr=False)

    def _fits_locked(self, amount_usd: float) -> bool:
        return self.limit_usd is None or self.spent_usd + self.reserved_usd + amount_usd <= self.limit_usd

    def try_reserve(self, amount_usd: float) -> bool:
        """Hold `amount_usd` for one call; False when it would take the run past its cap. Never waits."""
        if amount_usd < 0:
            raise ValueError("a reservation cannot be negative")
        with self._lock:
            if not self._fits_locked(amount_usd):
                return False
            self.reserved_usd += amount_usd
            self._held += 1
            return True

    async def reserve(self, amount_usd: float) -> bool:
        """Hold `amount_usd` for one call, waiting while calls in flight may give budget back; False: it cannot fit.

        Awaited on the caller's event loop, which keeps running while it waits. Callers are served in arrival
        order; each is refused only when it is first in line, does not fit, and no reservation is held (nothing
        in flight will free any).
        """
        if amount_usd < 0:
            raise ValueError("a reservation cannot be negative")
        waiter = _Waiter(asyncio.get_running_loop())
        with self._lock:
            self._waiters.append(waiter)
        try:
            while True:
                with self._lock:
                    if self._waiters[0] is waiter:
                        if self._fits_locked(amount_usd):
                            self.reserved_usd += amount_usd
                            self._held += 1
                            return True
                        if self._held == 0:
                            return False
                    waiter.event.clear()  # a settle from now on sets it again: no wake-up can be lost
                await waiter.event.wait()
        finally:
            with self._lock:
                self._waiters.remove(waiter)
                if self._waiters:
                    self._waiters[0].wake()  # the next in line may fit now

    def settle(self, reserved_usd: float, actual_usd: float) -> None:
        """Release a reservation and record what the call really cost."""
        with self._lock:
            self.reserved_usd = max(0.0, self.reserved_usd - reserved_usd)
            self.spent_usd += actual_usd
            self._held = max(0, self._held - 1)
            if self._held == 0:
                self.reserved_usd = 0.0  # nothing in flight: drop the rounding dust of many float subtractions
            if self._waiters:
                self._waiters[0].wake()

    @property
    def in_flight(self) -> int:
        """Reservations held now: calls sent (or about to be) and not yet settled."""
        with self._lock:
            return self._held

    @property
    def remaining_usd(self) -> float | None:
        with self._lock:
            if self.limit_usd is None:
                return None
            return max(0.0, self.limit_usd - self.spent_usd - self.reserved_usd)


_BUDGETS: dict[str, FrontierBudget] = {}
_BUDGETS_LOCK = threading.Lock()


def run_budget(run_id: str, limit_usd: float | None) -> FrontierBudget:
    """Return the run's shared budget, creating it on first use."""
    with _BUDGETS_LOCK:
        budget = _BUDGETS.get(run_id)
        if budget is None:
            budget = _BUDGETS[run_id] = FrontierBudget(limit_usd)
        return budget


def release_run_budget(run_id: str) -> FrontierBudget | None:
    """Forget a finished run's budget (returns it for the ledger)."""
    with _BUDGETS_LOCK:
        return _BUDGETS.pop(run_id, None)


@dataclass
class AllowanceBook:
    """Splits a run's frontier cap among shards running in other processes (Dask, Ray), which share no memory.

    Each shard gets an allowance when submitted: the cap's unpromised part divided among the free slots. When a
    shard ends, what it did not spend comes back for the next ones. Allowances never add up to more than the cap,
    so the run cannot pass it, whatever the shards do at once.
    """

    limit_usd: float
    slots: int
    spent_usd: float = 0.0
    _outstanding: dict[int, float] = field(default_factory=dict)

    def grant(self, shard_index: int) -> float:
        """Promise `shard_index` its share of what is left."""
        free = max(0.0, self.limit_usd - self.spent_usd - sum(self._outstanding.values()))
        share = free / max(1, self.slots - len(self._outstanding))
        self._outstanding[shard_index] = share
        return share

    def settle(self, shard_index: int, spent_usd: float | None) -> None:
        """Record what a finished shard spent; the rest of its allowance is free again.

        None means the spend is unknown (the shard failed for good): the whole allowance counts as spent.
        """
        allowance = self._outstanding.pop(shard_index, 0.0)
        self.spent_usd += allowance if spent_usd is None else spent_usd

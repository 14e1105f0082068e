"""Replica choice, per call: power of two choices by least in-flight (the router's own count of the calls
it has running on each replica, exact and current, unlike a count reported seconds ago)."""

from __future__ import annotations

import random
import time
from collections.abc import Collection, Sequence

from ..wire.fleet import Description

__all__ = ["AFFINITY_SLACK", "Replica", "pick"]

#: calls in flight by which a preferred replica (it holds the run's state) may exceed the usual choice and
#: still be chosen: a few queued calls cost less than resending the state, a hot spot more.
AFFINITY_SLACK = 2


class Replica:
    """One peer of a pool, with the router's counters for it."""

    __slots__ = (
        "addr",
        "calls",
        "description",
        "down_until",
        "errors",
        "in_flight",
        "live",
        "pool",
        "retries",
    )

    def __init__(self, pool: str, addr: str) -> None:
        self.pool = pool
        self.addr = addr
        self.in_flight = 0
        self.calls = 0
        self.errors = 0
        self.retries = 0
        #: monotonic time before which the replica is avoided (refused a call, failed Describe, not ready)
        self.down_until = 0.0
        self.description: Description | None = None
        #: its last Describe answered and said ready (what the router's own readiness counts)
        self.live = False

    def up(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) >= self.down_until

    def __repr__(self) -> str:
        return f"Replica({self.pool}, {self.addr}, in_flight={self.in_flight})"


def pick(
    replicas: Sequence[Replica],
    exclude: Collection[Replica] = (),
    rng: random.Random | None = None,
    prefer: Replica | None = None,
) -> Replica | None:
    """Two replicas at random among those up and not in ``exclude``, the one with fewer calls in flight;
    when none is up, among the rest not excluded (better to try than to refuse); None when all are excluded.
    ``prefer``, when among those and not busier than that choice by more than ``AFFINITY_SLACK``, instead.
    """
    now = time.monotonic()
    cands = [r for r in replicas if r not in exclude and r.down_until <= now]
    if not cands:
        cands = [r for r in replicas if r not in exclude]
    n = len(cands)
    if n <= 1:
        return cands[0] if cands else None
    # two distinct indexes, uniformly: random.sample costs several times as much, on every call
    draw = (rng or random).random
    i = int(draw() * n)
    j = int(draw() * (n - 1))
    a, b = cands[i], cands[j + 1 if j >= i else j]
    choice = a if a.in_flight <= b.in_flight else b
    if prefer is not None and prefer in cands and prefer.in_flight <= choice.in_flight + AFFINITY_SLACK:
        return prefer
    return choice

"""Which pools may serve a request: pure functions of what the pools said they serve (``Describe``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..engine.service import EMPTY_WORKFLOW
from ..wire.errors import PeerStatusError, Status

__all__ = ["PoolView", "RoutingTable", "parse_pool"]

#: distinct step-id lists whose answer is kept (a table lives until the next refresh).
CACHE_SIZE = 1024


@dataclass(frozen=True)
class PoolView:
    """What one pool serves: the union of its replicas' descriptions."""

    name: str
    #: step id -> the event types it accepts
    steps: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: workflow name -> its default step ids
    workflows: dict[str, tuple[str, ...]] = field(default_factory=dict)


def _ticks(ids: Iterable[str]) -> str:
    return ", ".join(f"`{i}`" for i in ids)


class RoutingTable:
    """step id -> pools, workflow name -> pools; ``pools_for`` answers a request. Immutable: a refresh
    builds a new table."""

    def __init__(self, views: Iterable[PoolView] = ()) -> None:
        self.views = {v.name: v for v in views}
        steps: dict[str, list[str]] = {}
        workflows: dict[str, list[str]] = {}
        for name in sorted(self.views):
            view = self.views[name]
            for sid in view.steps:
                steps.setdefault(sid, []).append(name)
            for wf in view.workflows:
                workflows.setdefault(wf, []).append(name)
        self.step_pools = {k: tuple(v) for k, v in steps.items()}
        self.workflow_pools = {k: tuple(v) for k, v in workflows.items()}
        self._cache: dict[tuple[str, ...], tuple[str, ...]] = {}

    def pools_for(self, workflow_name: str, step_ids: Sequence[str]) -> tuple[str, ...]:
        """The pools that serve every id of ``step_ids`` (empty: the pools that have ``workflow_name``),
        sorted; else ``PeerStatusError``: NOT_FOUND naming the ids no pool serves (a single one in the
        very words a peer uses), or INTERNAL as a peer answers an empty step list for a workflow it lacks.
        """
        if not step_ids:
            pools = self.workflow_pools.get(workflow_name)
            if not pools:
                raise PeerStatusError(Status.INTERNAL, EMPTY_WORKFLOW)
            return pools
        key = tuple(step_ids)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        ids = list(dict.fromkeys(step_ids))
        unserved = [s for s in ids if s not in self.step_pools]
        if len(unserved) == 1:
            raise PeerStatusError(Status.NOT_FOUND, f"unknown step id `{unserved[0]}`")
        if unserved:
            raise PeerStatusError(
                Status.NOT_FOUND, f"unknown step ids {_ticks(unserved)}: no pool serves them"
            )
        common = set(self.step_pools[ids[0]])
        for sid in ids[1:]:
            common.intersection_update(self.step_pools[sid])
        if not common:
            where = "; ".join(f"`{s}` in {', '.join(self.step_pools[s])}" for s in ids)
            raise PeerStatusError(Status.NOT_FOUND, f"no pool serves all of step ids {_ticks(ids)} ({where})")
        out = tuple(sorted(common))
        if len(self._cache) >= CACHE_SIZE:
            self._cache.clear()
        self._cache[key] = out
        return out

    def routes(self) -> dict[str, object]:
        """The table for ``/v1/info``."""
        return {
            "steps": dict(sorted(self.step_pools.items())),
            "workflows": dict(sorted(self.workflow_pools.items())),
        }


def parse_pool(spec: str) -> tuple[str, list[str]]:
    """``NAME=HOST:PORT[,HOST:PORT...]`` (``--pool``) -> (name, addresses)."""
    name, sep, rest = spec.partition("=")
    name = name.strip()
    addrs = [a.strip() for a in rest.split(",") if a.strip()]
    if not sep or not name or not addrs:
        raise ValueError(f"invalid pool {spec!r}: expected NAME=HOST:PORT[,HOST:PORT...]")
    for a in addrs:
        host, colon, port = a.rpartition(":")
        if not colon or not host or not port.isdigit():
            raise ValueError(f"invalid pool {spec!r}: {a!r} is not HOST:PORT")
    return name, addrs

"""What the relay (``blazen_peer._relay``, the Rust data plane of ``blazen-peer route``) asks Python: where an
Invoke or Stream goes, whether a refused one goes elsewhere, and what its end teaches.

The relay calls ``RelayPolicy.decide`` once per call, on its own thread with the GIL, with the request
bytes and the three metadata values the router reads (``METADATA``: the caller's node id, request id and
token). The answer is a ``RelayCall`` with its first ``Target`` (the replica, by the same choice as the
grpcio path: ``Router.candidates`` then ``balance.pick``, and the hop metadata) or None: "hand it to the
grpcio server" - a call the admission refuses (the grpcio server refuses it the same way), a request that
does not decode, step ids no single pool serves (a split run), no replica at all. The relay then calls
``RelayCall.retry`` on a refusal (the one rule, ``forward.status_refused_before_running``), which gives the
next target or None, and ``RelayCall.finish`` once at the end, which keeps the in-flight counts, the
metrics and the ref owners exactly as the grpcio path does (``Router.refused``, ``Router.learn_refs``).
One call into Python before a call is forwarded, none while it runs: each costs the relay the GIL and a
crossing of the language boundary, on the caller's critical path.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc

from ..admin.logs import new_request_id
from ..admin.metrics import CallStats
from ..transport.grpc_server import decode_message
from ..wire.errors import PeerError, Status
from ..wire.messages import SubWorkflowRequest
from ..wire.protocol import (
    AUTHORIZATION_METADATA,
    NODE_ID_METADATA,
    PATH_STREAM,
    REQUEST_ID_METADATA,
)
from .balance import Replica, pick
from .forward import Router, final_frame, hop_metadata, status_refused_before_running, view

__all__ = ["METADATA", "RelayCall", "RelayPolicy", "Target"]

_CODES = {c.value[0]: c for c in grpc.StatusCode}
_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}

#: the metadata ``decide`` is given, in its order: the relay reads just these of a call's headers (the last
#: node id and request id, the first token: as the grpcio admission reads them).
METADATA = (NODE_ID_METADATA, REQUEST_ID_METADATA, AUTHORIZATION_METADATA)

#: where a call goes: (replica address, the name its TLS certificate is checked against or None, hop metadata)
Target = tuple[str, str | None, list[tuple[str, str]]]


#: ``(admit, release, stats)`` of one method: the admission's gate (``admit(authorization)`` -> None or the
#: refusal) and its metrics recorder.
Gate = tuple[Callable[[Any], "tuple[Status, str] | None"], Callable[[], None], CallStats]


class RelayCall:
    """One forwarded call: its replica, and what the relay reports back."""

    __slots__ = ("_cands", "_gate", "_policy", "_start", "_stream", "_tried", "metadata", "replica")

    def __init__(
        self,
        policy: RelayPolicy,
        gate: Gate,
        cands: Sequence[Replica],
        replica: Replica,
        metadata: list[tuple[str, str]],
        stream: bool,
    ) -> None:
        self._policy = policy
        self._gate = gate
        self._cands = cands
        self._tried: list[Replica] = []
        self._stream = stream
        self._start = time.perf_counter()
        self.metadata = metadata
        self.replica: Replica | None = replica
        replica.in_flight += 1
        replica.calls += 1

    def target(self, replica: Replica) -> Target:
        addr = replica.addr
        return addr, self._policy.server_name(addr), self.metadata

    def retry(self, code: int, details: str) -> Target | None:
        """The replica answered ``code`` before any message (or could not be reached): the next target when
        it refused before running and another replica is left; None: ``code`` is the caller's answer."""
        replica = self.replica
        status = _CODES.get(code, grpc.StatusCode.UNKNOWN)
        if replica is None or not status_refused_before_running(status, details):
            return None
        replica.errors += 1
        replica.in_flight -= 1
        self._policy.router.refused(replica, status)
        self._tried.append(replica)
        nxt = pick(self._cands, self._tried)
        self.replica = nxt
        if nxt is None:  # none left: the last refusal is the answer
            return None
        nxt.in_flight += 1
        nxt.calls += 1
        return self.target(nxt)

    def finish(self, code: int, details: str, last: bytes | None) -> None:
        """The call ended with ``code``; ``last``: its last response message (the Invoke reply, the
        Stream's final frame), whose session refs now live on the replica."""
        replica = self.replica
        if replica is not None:
            self.replica = None
            replica.in_flight -= 1
            if code not in (0, 1):  # an error, not the caller's cancellation
                replica.errors += 1
            if last is not None:
                payload = final_frame(last) if self._stream else view(last)
                if payload is not None:
                    self._policy.router.learn_refs(replica, payload)
        _, release, stats = self._gate
        release()
        stats.finish(_NAMES.get(code, "UNKNOWN"), time.perf_counter() - self._start)


class RelayPolicy:
    """``decide`` for the relay. ``gates``: the main listener's admission of Invoke and Stream;
    ``server_name(addr)``: the name a replica's certificate is checked against (None: its host)."""

    def __init__(
        self, router: Router, gates: Mapping[str, Gate], server_name: Callable[[str], str | None]
    ) -> None:
        self.router = router
        self.gates = gates
        self.server_name = server_name

    def decide(
        self, path: str, request: bytes, caller: str | None, rid: str | None, authorization: str | None
    ) -> tuple[RelayCall, Target] | None:
        gate = self.gates.get(path)
        if gate is None:
            return None
        admit, release, stats = gate
        if admit(authorization) is not None:
            return None  # refused: the grpcio server refuses it the same way, and counts it
        try:
            req = decode_message(request, SubWorkflowRequest.decode)
            cands = self.router.candidates(req)
        except PeerError:  # a version, a step id or a split run: the grpcio server's answer
            release()
            return None
        replica = pick(cands)
        if replica is None:
            release()
            return None
        stats.start()
        md = hop_metadata(caller, self.router.pools, rid or new_request_id())
        call = RelayCall(self, gate, cands, replica, md, path == PATH_STREAM)
        return call, call.target(replica)

"""What the relay (``blazen_peer._relay``, the Rust data plane of ``blazen-peer route``) asks Python: where an
Invoke or Stream goes, whether a refused one goes elsewhere, and what its end teaches.

The relay calls ``RelayPolicy.decide`` once per call, on its own thread with the GIL, with the request
bytes and the caller's metadata. The answer is a ``RelayCall`` (the replica, by the same choice as the
grpcio path: ``Router.candidates`` then ``balance.pick``, and the hop metadata) or None: "hand it to the
grpcio server" - a call the admission refuses (the grpcio server refuses it the same way), a request that
does not decode, step ids no single pool serves (a split run), no replica at all. The relay then calls
``RelayCall.retry`` on a refusal (the one rule, ``forward.status_refused_before_running``) and
``RelayCall.finish`` once at the end, which keeps the in-flight counts, the metrics and the ref owners
exactly as the grpcio path does (``Router.refused``, ``Router.learn_refs``).
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

__all__ = ["RelayCall", "RelayPolicy"]

_CODES = {c.value[0]: c for c in grpc.StatusCode}
_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}


#: ``(admit, release, stats)`` of one method: the admission's gate (``admit(authorization)`` -> None or the
#: refusal) and its metrics recorder.
Gate = tuple[Callable[[Any], "tuple[Status, str] | None"], Callable[[], None], CallStats]


class RelayCall:
    """One forwarded call: its replica (``target``), and what the relay reports back."""

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

    def target(self) -> tuple[str, str | None, list[tuple[str, str]]]:
        """(replica address, TLS server name or None, hop metadata)."""
        assert self.replica is not None
        addr = self.replica.addr
        return addr, self._policy.server_name(addr), self.metadata

    def retry(self, code: int, details: str) -> bool:
        """The replica answered ``code`` before any message (or could not be reached): True when it refused
        before running and another replica is now the target; False: ``code`` is the caller's answer."""
        replica = self.replica
        status = _CODES.get(code, grpc.StatusCode.UNKNOWN)
        if replica is None or not status_refused_before_running(status, details):
            return False
        replica.errors += 1
        replica.in_flight -= 1
        self._policy.router.refused(replica, status)
        self._tried.append(replica)
        nxt = pick(self._cands, self._tried)
        self.replica = nxt
        if nxt is None:  # none left: the last refusal is the answer
            return False
        nxt.in_flight += 1
        nxt.calls += 1
        return True

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

    def decide(self, path: str, request: bytes, metadata: list[tuple[str, str]]) -> RelayCall | None:
        gate = self.gates.get(path)
        if gate is None:
            return None
        caller = rid = authorization = None
        for key, value in metadata:
            if key == NODE_ID_METADATA:
                caller = value
            elif key == REQUEST_ID_METADATA:
                rid = value
            elif key == AUTHORIZATION_METADATA and authorization is None:
                authorization = value
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
        return RelayCall(self, gate, cands, replica, md, path == PATH_STREAM)

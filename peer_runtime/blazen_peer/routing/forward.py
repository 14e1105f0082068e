"""The forwarding: each call to the router goes, bytes unchanged, to one replica of a pool that serves it.

* Invoke / Stream: the pools that serve every requested step id (or the named workflow), then one replica
  by power of two choices; a replica that refused before running anything (connection refused, draining,
  its admission's concurrency limit) is replaced by another, invisibly; any other failure is the caller's
  answer, never re-run. The caller's node id and request id go along, with the router's token; the
  caller's deadline is the hop's; a cancelled call cancels the hop. Step ids that no single pool serves
  but the pools do together make a split run: the router routes the events itself (``routing.split``).
* Deref / Release: straight to the replica seen holding the ref in a response; a ref not seen (another
  router, a restart, an evicted entry) is asked of every replica of every pool at once.

``router_methods`` serves this as the BlazenPeer gRPC service (generic bytes handlers: the request is
decoded to route it, never re-encoded); ``RouterService`` as the decoded-message service the HTTP/JSON
shim calls.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol, cast

import grpc

from ..admin.drain import DRAINING_MESSAGE
from ..admin.logs import current_request_id
from ..engine.service import check_version
from ..transport.grpc_server import GRPC_CODES, decode_message
from ..wire.envelope import unwrap, wrap
from ..wire.errors import PeerError, PeerStatusError, Status
from ..wire.messages import (
    DerefRequest,
    DerefResponse,
    ReleaseRequest,
    ReleaseResponse,
    SubWorkflowRequest,
    SubWorkflowResponse,
)
from ..wire.protocol import (
    CONCURRENCY_REFUSED,
    FORWARDED_METADATA,
    NODE_ID_METADATA,
    PATH_DEREF,
    PATH_INVOKE,
    PATH_RELEASE,
    PATH_STREAM,
    REQUEST_ID_METADATA,
)
from .balance import Replica, pick
from .pools import DOWN_SECS, PoolSet
from .refs import RefOwners, response_ref_ids

__all__ = [
    "Router",
    "RouterService",
    "UpstreamError",
    "refused_before_running",
    "router_methods",
    "status_refused_before_running",
]

_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
_NOT_FOUND = grpc.StatusCode.NOT_FOUND
_DRAINING = DRAINING_MESSAGE.split(":", 1)[0]


class UpstreamError(PeerError):
    """A replica's non-OK answer (or the router's own, e.g. no replica left), passed to the caller as is."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def status_refused_before_running(code: grpc.StatusCode, details: str) -> bool:
    """True only when the replica cannot have started the call: the connection never opened, the peer's
    drain refused it, or its admission's concurrency limit did. A call cut off after it was sent (reset,
    GOAWAY after the grace, a timeout) may have run and is never retried. The one rule of both data
    planes (this module's grpcio path and the relay, ``routing.relay``)."""
    if code == _UNAVAILABLE:
        low = details.lower()
        return details.startswith(_DRAINING) or "failed to connect" in low or "connection refused" in low
    return code == grpc.StatusCode.RESOURCE_EXHAUSTED and details.startswith(CONCURRENCY_REFUSED)


def refused_before_running(exc: grpc.aio.AioRpcError) -> bool:
    """``status_refused_before_running`` of a grpcio call's error."""
    return status_refused_before_running(exc.code(), exc.details() or "")


def view(msg: bytes) -> bytes:
    """The payload of an envelope without copying it (``unwrap`` only indexes and slices, and a slice of a
    memoryview is a view): the router reads a few bytes of replies that may be megabytes."""
    return unwrap(cast(bytes, memoryview(msg)))


def final_frame(msg: bytes) -> bytes | None:
    """The ``SubWorkflowResponse`` of a ``Final`` stream frame (variant 1), else None."""
    payload = view(msg)
    return payload[1:] if len(payload) > 0 and payload[0] == 1 else None


class SplitRuns(Protocol):
    """Runs whose steps no single pool serves (``routing.split``)."""

    def applies(self, req: SubWorkflowRequest, refusal: PeerStatusError) -> bool: ...

    async def invoke(
        self, req: SubWorkflowRequest, metadata: list[tuple[str, str]], time_left: float | None
    ) -> SubWorkflowResponse: ...

    def stream(
        self, req: SubWorkflowRequest, metadata: list[tuple[str, str]], time_left: float | None
    ) -> AsyncIterator[bytes]: ...


class Router:
    def __init__(self, pools: PoolSet, owners: RefOwners | None = None) -> None:
        self.pools = pools
        self.owners = owners if owners is not None else RefOwners()
        #: runs the step ids of a request that no single pool serves, when set (``routing.split``).
        self.split: SplitRuns | None = None

    # -- choice ----------
    def candidates(self, req: SubWorkflowRequest) -> Sequence[Replica]:
        check_version(req.envelope_version)  # a peer checks the version before the step ids
        names = self.pools.table.pools_for(req.workflow_name, req.step_ids)
        pools = self.pools.pools
        found = pools.get(names[0], ()) if len(names) == 1 else [r for n in names for r in pools.get(n, ())]
        if not found:  # the pools serve it but have no replica this moment (all pods replaced): retry later
            raise PeerStatusError(Status.UNAVAILABLE, f"pool {', '.join(names)} has no ready replica")
        return found

    def refused(self, replica: Replica, code: grpc.StatusCode) -> None:
        """``replica`` refused a call before running it (``status_refused_before_running``)."""
        replica.retries += 1
        if code == _UNAVAILABLE:  # gone or draining (a busy one is only skipped for this call)
            replica.down_until = time.monotonic() + DOWN_SECS
            self.pools.refresh_soon()

    def learn_refs(self, replica: Replica, response: bytes) -> None:
        """The session refs of a ``SubWorkflowResponse`` payload now live on ``replica``: deref and
        release of them go straight there."""
        ids = response_ref_ids(response)
        if ids:
            self.owners.remember(ids, replica.addr)

    @staticmethod
    def _timeout(deadline: float | None) -> float | None:
        if deadline is None:
            return None
        left = deadline - time.monotonic()
        if left <= 0:
            raise UpstreamError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        return left

    @staticmethod
    def _none_left(cands: Sequence[Replica], last: grpc.aio.AioRpcError | None) -> UpstreamError:
        if last is not None:
            return UpstreamError(last.code(), last.details() or "")
        pools = ", ".join(sorted({r.pool for r in cands}))  # never empty: candidates() refuses that
        return UpstreamError(_UNAVAILABLE, f"no replica of pool {pools} is reachable")

    # -- Invoke ----------
    async def unary(
        self,
        cands: Sequence[Replica],
        path: str,
        request: bytes,
        metadata: list[tuple[str, str]],
        deadline: float | None,
        on_pick: Callable[[Replica], None] | None = None,
        prefer: Replica | None = None,
    ) -> tuple[bytes, Replica]:
        """``path`` on one replica of ``cands`` (power of two choices, or ``prefer`` unless much busier),
        another one when it refused before running anything; the reply and the replica that answered it.
        ``on_pick`` sees each replica before the call goes out."""
        tried: list[Replica] = []
        last: grpc.aio.AioRpcError | None = None
        while True:
            replica = pick(cands, tried, prefer=prefer)
            if replica is None:
                raise self._none_left(cands, last)
            if on_pick is not None:
                on_pick(replica)
            call = self.pools.channel(replica.addr).unary_unary(path)
            replica.in_flight += 1
            replica.calls += 1
            try:
                raw: bytes = await call(request, metadata=metadata, timeout=self._timeout(deadline))
            except grpc.aio.AioRpcError as exc:
                replica.errors += 1
                if refused_before_running(exc):
                    self.refused(replica, exc.code())
                    tried.append(replica)
                    last = exc
                    continue
                raise UpstreamError(exc.code(), exc.details() or "") from None
            finally:
                replica.in_flight -= 1
            return raw, replica

    async def invoke(
        self,
        request: bytes,
        req: SubWorkflowRequest,
        metadata: list[tuple[str, str]],
        time_left: float | None,
    ) -> bytes:
        try:
            cands = self.candidates(req)
        except PeerStatusError as exc:
            if self.split is None or not self.split.applies(req, exc):
                raise
            return wrap((await self.split.invoke(req, metadata, time_left)).encode_within_limit())
        deadline = None if time_left is None else time.monotonic() + time_left
        raw, replica = await self.unary(cands, PATH_INVOKE, request, metadata, deadline)
        self.learn_refs(replica, view(raw))
        return raw

    # -- Stream ----------
    async def stream(
        self,
        request: bytes,
        req: SubWorkflowRequest,
        metadata: list[tuple[str, str]],
        time_left: float | None,
    ) -> AsyncIterator[bytes]:
        try:
            cands = self.candidates(req)
        except PeerStatusError as exc:
            if self.split is None or not self.split.applies(req, exc):
                raise
            async for frame in self.split.stream(req, metadata, time_left):
                yield frame
            return
        deadline = None if time_left is None else time.monotonic() + time_left
        tried: list[Replica] = []
        last: grpc.aio.AioRpcError | None = None
        while True:
            replica = pick(cands, tried)
            if replica is None:
                raise self._none_left(cands, last)
            call = self.pools.channel(replica.addr).unary_stream(PATH_STREAM)(
                request, metadata=metadata, timeout=self._timeout(deadline)
            )
            replica.in_flight += 1
            replica.calls += 1
            try:
                try:
                    msg = await call.read()
                except grpc.aio.AioRpcError as exc:
                    # Nothing was received: a refusal before running goes to another replica.
                    replica.errors += 1
                    if refused_before_running(exc):
                        self.refused(replica, exc.code())
                        tried.append(replica)
                        last = exc
                        continue
                    raise UpstreamError(exc.code(), exc.details() or "") from None
                try:
                    while msg is not grpc.aio.EOF:
                        final = final_frame(msg)
                        if final is not None:
                            self.learn_refs(replica, final)
                        yield msg
                        msg = await call.read()
                except grpc.aio.AioRpcError as exc:
                    replica.errors += 1
                    raise UpstreamError(exc.code(), exc.details() or "") from None
                return
            finally:
                replica.in_flight -= 1
                if not call.done():
                    call.cancel()

    # -- Deref / Release ----------
    async def ref_call(
        self,
        path: str,
        request: bytes,
        ref_uuid: str,
        metadata: list[tuple[str, str]],
        time_left: float | None,
    ) -> bytes:
        """``path`` (deref or release) for ``ref_uuid``: its owner if known, else every replica."""
        ref = uuid.UUID(ref_uuid).bytes
        release = path == PATH_RELEASE
        deadline = None if time_left is None else time.monotonic() + time_left
        owner = self.pools.by_addr.get(self.owners.owner(ref) or "")
        if owner is not None:
            try:
                raw = await self._one(owner, path, request, metadata, self._timeout(deadline))
            except grpc.aio.AioRpcError as exc:
                if exc.code() != _NOT_FOUND and not refused_before_running(exc):
                    raise UpstreamError(exc.code(), exc.details() or "") from None
                self.owners.forget(ref)
            else:
                if release:
                    self.owners.forget(ref)
                return raw
        return await self._ask_all(path, request, ref, ref_uuid, metadata, self._timeout(deadline), owner)

    async def _one(
        self,
        replica: Replica,
        path: str,
        request: bytes,
        metadata: list[tuple[str, str]],
        time_left: float | None,
    ) -> bytes:
        replica.in_flight += 1
        replica.calls += 1
        try:
            raw: bytes = await self.pools.channel(replica.addr).unary_unary(path)(
                request, metadata=metadata, timeout=time_left
            )
            return raw
        except grpc.aio.AioRpcError as exc:
            if exc.code() != _NOT_FOUND:
                replica.errors += 1
            raise
        finally:
            replica.in_flight -= 1

    async def _ask_all(
        self,
        path: str,
        request: bytes,
        ref: bytes,
        ref_uuid: str,
        metadata: list[tuple[str, str]],
        time_left: float | None,
        skip: Replica | None,
    ) -> bytes:
        release = path == PATH_RELEASE
        # Marked forwarded: a peer asked here does not ask its own siblings too (the router asks them all).
        md = [*metadata, (FORWARDED_METADATA, "1")]
        tasks = {
            asyncio.ensure_future(self._one(r, path, request, md, time_left)): r
            for r in self.pools.replicas
            if r is not skip
        }
        fallback: bytes | None = None
        failure: grpc.aio.AioRpcError | None = None
        pending = set(tasks)
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    exc = t.exception()
                    if exc is not None:
                        if not isinstance(exc, grpc.aio.AioRpcError):
                            raise exc
                        if exc.code() != _NOT_FOUND and failure is None:
                            failure = exc
                        continue
                    raw = t.result()
                    if not release:
                        self.owners.remember([ref], tasks[t].addr)
                        return raw
                    if ReleaseResponse.decode(unwrap(raw)).released:
                        self.owners.forget(ref)
                        return raw
                    fallback = raw
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()
                elif not t.cancelled():
                    t.exception()  # retrieved: the answers after the first that counted
        if fallback is not None:
            return fallback
        if failure is not None:
            raise UpstreamError(failure.code(), failure.details() or "")
        raise UpstreamError(_NOT_FOUND, f"session ref {ref_uuid} not found")


# -- the gRPC face ---------------------------------------------------------------------------------------


def _caller(context: Any) -> str | None:
    for k, v in context.invocation_metadata() or ():
        if k == NODE_ID_METADATA:
            return str(v)
    return None


def hop_metadata(caller: str | None, pools: PoolSet, rid: str | None = None) -> list[tuple[str, str]]:
    """The caller's node id, the request id (``rid``, else the caller's or the one the router's admission
    made up, so the router's and the peer's log lines of a call share it), and the router's token."""
    md = [(NODE_ID_METADATA, caller)] if caller else []
    rid = rid or current_request_id()
    if rid:
        md.append((REQUEST_ID_METADATA, rid))
    md.extend(pools.metadata())
    return md


def _fail(context: Any, code: grpc.StatusCode, details: str) -> None:
    context.set_code(code)
    context.set_details(details)


def router_methods(router: Router) -> dict[str, grpc.RpcMethodHandler]:
    """The four BlazenPeer methods, forwarded (generic bytes handlers, wrapped by the admission)."""
    pools = router.pools

    def metadata(context: Any) -> list[tuple[str, str]]:
        return hop_metadata(_caller(context), pools)

    async def invoke(request: bytes, context: Any) -> bytes | None:
        try:
            req = decode_message(request, SubWorkflowRequest.decode)
            return await router.invoke(request, req, metadata(context), context.time_remaining())
        except PeerStatusError as exc:
            _fail(context, GRPC_CODES[exc.status], exc.message)
        except UpstreamError as exc:
            _fail(context, exc.code, exc.details)
        return None

    async def stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
        try:
            req = decode_message(request, SubWorkflowRequest.decode)
            async for msg in router.stream(request, req, metadata(context), context.time_remaining()):
                yield msg
        except PeerStatusError as exc:
            _fail(context, GRPC_CODES[exc.status], exc.message)
        except UpstreamError as exc:
            _fail(context, exc.code, exc.details)

    def ref_method(path: str, decoder: Any) -> grpc.RpcMethodHandler:
        async def handler(request: bytes, context: Any) -> bytes | None:
            try:
                req = decode_message(request, decoder)
                check_version(req.envelope_version)
                return await router.ref_call(
                    path, request, req.ref_uuid, metadata(context), context.time_remaining()
                )
            except PeerStatusError as exc:
                _fail(context, GRPC_CODES[exc.status], exc.message)
            except UpstreamError as exc:
                _fail(context, exc.code, exc.details)
            return None

        return grpc.unary_unary_rpc_method_handler(handler)

    return {
        PATH_INVOKE: grpc.unary_unary_rpc_method_handler(invoke),
        PATH_STREAM: grpc.unary_stream_rpc_method_handler(stream),
        PATH_DEREF: ref_method(PATH_DEREF, DerefRequest.decode),
        PATH_RELEASE: ref_method(PATH_RELEASE, ReleaseRequest.decode),
    }


# -- the HTTP face ---------------------------------------------------------------------------------------

_STATUS_BY_NAME = {s.name: s for s in Status}


def _status_error(exc: UpstreamError) -> PeerStatusError:
    return PeerStatusError(_STATUS_BY_NAME.get(exc.code.name, Status.INTERNAL), exc.details)


class RouterService:
    """What the HTTP/JSON shim calls on a router: ``PeerService``'s ``invoke``, ``deref`` and ``release``,
    forwarded over gRPC (the shim's JSON is decoded anyway, so the request is encoded once for the hop)."""

    def __init__(self, router: Router) -> None:
        self.router = router

    def _metadata(self, caller_node_id: str | None) -> list[tuple[str, str]]:
        return hop_metadata(caller_node_id, self.router.pools)

    async def invoke(
        self, req: SubWorkflowRequest, *, caller_node_id: str | None = None
    ) -> SubWorkflowResponse:
        try:
            raw = await self.router.invoke(wrap(req.encode()), req, self._metadata(caller_node_id), None)
        except UpstreamError as exc:
            raise _status_error(exc) from None
        return SubWorkflowResponse.decode(unwrap(raw))

    async def _ref(self, path: str, request: bytes, ref_uuid: str) -> bytes:
        try:
            return unwrap(await self.router.ref_call(path, request, ref_uuid, self._metadata(None), None))
        except UpstreamError as exc:
            raise _status_error(exc) from None

    async def deref(self, ref_uuid: str, *, version: int = 1) -> bytes:
        check_version(version)
        raw = await self._ref(PATH_DEREF, wrap(DerefRequest(ref_uuid, version).encode()), ref_uuid)
        return DerefResponse.decode(raw).payload

    async def release(self, ref_uuid: str, *, version: int = 1) -> bool:
        check_version(version)
        raw = await self._ref(PATH_RELEASE, wrap(ReleaseRequest(ref_uuid, version).encode()), ref_uuid)
        return ReleaseResponse.decode(raw).released

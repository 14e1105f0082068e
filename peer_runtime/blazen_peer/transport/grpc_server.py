"""The gRPC service ``blazen.peer.v1.BlazenPeer`` on grpc.aio, with generic handlers and raw-bytes framing."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import grpc

from ..engine.service import PeerService
from ..wire.envelope import EnvelopeDecodeError, unwrap, wrap
from ..wire.errors import PeerStatusError, Status, exception_text
from ..wire.messages import (
    DerefRequest,
    DerefResponse,
    ReleaseRequest,
    ReleaseResponse,
    SubWorkflowEvent,
    SubWorkflowRequest,
    SubWorkflowResponse,
    encode_stream_event,
    encode_stream_final,
)
from ..wire.postcard import PostcardDecodeError
from ..wire.protocol import (
    FORWARDED_METADATA,
    MAX_MESSAGE_BYTES,
    NODE_ID_METADATA,
    PATH_DEREF,
    PATH_INVOKE,
    PATH_RELEASE,
    PATH_STREAM,
)

log = logging.getLogger("blazen_peer.grpc")

#: ``wrap(handler, full_method_name) -> handler``: applied once to each BlazenPeer method handler when a gRPC
#: server is built (the admission). A handler wrapper rather than a grpc.aio interceptor: grpc.aio runs an
#: interceptor chain as extra coroutines on every call, which shows at concurrency 32 (docs/benchmarks.md).
MethodWrapper = Callable[[grpc.RpcMethodHandler, str], grpc.RpcMethodHandler]
# grpcio's own receive limit sits above tonic's, so an oversized request gets tonic's exact status and
# message.
GRPC_RECEIVE_LIMIT = 2 * MAX_MESSAGE_BYTES
#: events a stream buffers ahead of its client before the run waits
STREAM_QUEUE_EVENTS = 64

#: each ``Status`` as the gRPC status code.
GRPC_CODES = {s: getattr(grpc.StatusCode, s.name) for s in Status}


def _too_large(n: int) -> str:
    return (
        f"Error, decoded message length too large: found {n} bytes, the limit is: {MAX_MESSAGE_BYTES} bytes"
    )


def _metadata_value(context: grpc.aio.ServicerContext, key: str) -> str | None:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else v.decode("latin-1")
    return None


class _Abort(Exception):
    def __init__(self, status: Status, message: str) -> None:
        self.status = status
        self.message = message


def _decode(request: bytes, decoder):
    if len(request) > MAX_MESSAGE_BYTES:
        raise _Abort(Status.OUT_OF_RANGE, _too_large(len(request)))
    try:
        return decoder(unwrap(request))
    except PostcardDecodeError as exc:
        raise _Abort(Status.INVALID_ARGUMENT, f"postcard decode failed: {exc}") from None
    except EnvelopeDecodeError as exc:
        raise _Abort(Status.INTERNAL, f"failed to decode Protobuf message: {exc}") from None


def decode_message(request: bytes, decoder: Callable[[bytes], Any]) -> Any:
    """``request`` (a protobuf envelope) decoded by ``decoder``, or ``PeerStatusError`` with the status and
    message a peer answers (size, envelope, postcard), for callers outside this module (the router)."""
    try:
        return _decode(request, decoder)
    except _Abort as exc:
        raise PeerStatusError(exc.status, exc.message) from None


class BlazenPeerServicer:
    """The four methods. Errors are set with ``set_code``/``set_details`` and an empty return, which grpc.aio
    sends as a trailers-only response (same bytes as ``abort``, without raising through the stack)."""

    def __init__(self, service: PeerService) -> None:
        self.service = service

    @staticmethod
    def _fail(context: grpc.aio.ServicerContext, status: Status, message: str) -> None:
        context.set_code(GRPC_CODES[status])
        context.set_details(message)

    async def invoke(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes | None:
        try:
            req = _decode(request, SubWorkflowRequest.decode)
            caller = _metadata_value(context, NODE_ID_METADATA)
            if caller is not None and log.isEnabledFor(logging.DEBUG):
                log.debug("InvokeSubWorkflow %r from %s", req.workflow_name, caller)
            resp = await self.service.invoke(req, caller_node_id=caller)
        except PeerStatusError as exc:
            self._fail(context, exc.status, exc.message)
            return None
        except _Abort as exc:
            self._fail(context, exc.status, exc.message)
            return None
        return wrap(resp.encode_within_limit())

    async def stream(self, request: bytes, context: grpc.aio.ServicerContext):
        try:
            req = _decode(request, SubWorkflowRequest.decode)
        except _Abort as exc:
            self._fail(context, exc.status, exc.message)
            return
        caller = _metadata_value(context, NODE_ID_METADATA)
        service = self.service
        # Bounded: a client that reads slowly holds the run back (the runner awaits on_event) instead of
        # letting events pile up here.
        queue: asyncio.Queue[SubWorkflowEvent | SubWorkflowResponse | PeerStatusError] = asyncio.Queue(
            STREAM_QUEUE_EVENTS
        )
        seq = 0
        closed = False

        async def on_event(step_id: str, event: dict, ctx: Any) -> None:
            nonlocal seq
            if closed:  # the stream has ended: a run abandoned at its timeout stops at its next event
                raise asyncio.CancelledError
            body = service.encode_event(step_id, event, ctx)
            await queue.put(SubWorkflowEvent(seq, step_id, event["type"], body, int(time.time() * 1000)))
            seq += 1

        async def run() -> None:
            try:
                final: SubWorkflowResponse | PeerStatusError = await service.invoke(
                    req, caller_node_id=caller, on_event=on_event
                )
            except PeerStatusError as exc:
                final = exc
            except Exception as exc:  # an engine bug must still end the stream with a status
                log.exception("StreamSubWorkflowEvents %r failed", req.workflow_name)
                final = PeerStatusError(Status.INTERNAL, f"internal error: {exception_text(exc)}")
            await queue.put(final)

        task = asyncio.ensure_future(run())
        try:
            while True:
                item = await queue.get()
                if isinstance(item, PeerStatusError):
                    self._fail(context, item.status, item.message)
                    return
                if isinstance(item, SubWorkflowResponse):
                    yield wrap(encode_stream_final(item))
                    return
                yield wrap(encode_stream_event(item))
        finally:
            closed = True
            if not task.done():
                task.cancel()
            while not queue.empty():  # wakes a run waiting on the full queue, to see ``closed``
                queue.get_nowait()

    async def deref(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes | None:
        try:
            req = _decode(request, DerefRequest.decode)
            forwarded = _metadata_value(context, FORWARDED_METADATA) == "1"
            payload = await self.service.deref(
                req.ref_uuid, version=req.envelope_version, forwarded=forwarded
            )
        except (PeerStatusError, _Abort) as exc:
            self._fail(context, exc.status, exc.message)
            return None
        if len(payload) > MAX_MESSAGE_BYTES - 16:
            self._fail(
                context,
                Status.OUT_OF_RANGE,
                f"session ref {req.ref_uuid} payload of {len(payload)} bytes exceeds "
                f"the {MAX_MESSAGE_BYTES}-byte "
                "message limit",
            )
            return None
        return wrap(DerefResponse(payload).encode())

    async def release(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes | None:
        try:
            req = _decode(request, ReleaseRequest.decode)
            forwarded = _metadata_value(context, FORWARDED_METADATA) == "1"
            released = await self.service.release(
                req.ref_uuid, version=req.envelope_version, forwarded=forwarded
            )
        except (PeerStatusError, _Abort) as exc:
            self._fail(context, exc.status, exc.message)
            return None
        return wrap(ReleaseResponse(released).encode())


async def _unimplemented(request_iterator, context: grpc.aio.ServicerContext) -> None:
    context.set_code(grpc.StatusCode.UNIMPLEMENTED)
    context.set_details("")


def peer_methods(service: PeerService) -> dict[str, grpc.RpcMethodHandler]:
    """The four BlazenPeer method handlers around ``service``, by full method path."""
    servicer = BlazenPeerServicer(service)
    return {
        PATH_INVOKE: grpc.unary_unary_rpc_method_handler(servicer.invoke),
        PATH_STREAM: grpc.unary_stream_rpc_method_handler(servicer.stream),
        PATH_DEREF: grpc.unary_unary_rpc_method_handler(servicer.deref),
        PATH_RELEASE: grpc.unary_unary_rpc_method_handler(servicer.release),
    }


class _Handlers(grpc.GenericRpcHandler):
    def __init__(
        self, methods: Mapping[str, grpc.RpcMethodHandler], wrap: MethodWrapper | None = None
    ) -> None:
        self._methods = dict(methods)
        if wrap is not None:
            self._methods = {name: wrap(handler, name) for name, handler in self._methods.items()}
        # Unknown methods: UNIMPLEMENTED with an empty message, as tonic answers.
        self._fallback = grpc.stream_stream_rpc_method_handler(_unimplemented)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        return self._methods.get(handler_call_details.method, self._fallback)


def grpc_server_options(
    extra: Iterable[tuple[str, object]] = (), *, max_connection_age_secs: float = 0.0
) -> list[tuple[str, object]]:
    """Our server options, then ``extra`` (appended, so they win)."""
    options: list[tuple[str, object]] = [
        ("grpc.max_receive_message_length", GRPC_RECEIVE_LIMIT),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.so_reuseport", 0),
    ]
    if max_connection_age_secs > 0:
        # A graceful GOAWAY (calls racing it are still served, unlike after server.stop(), which cancels
        # them) with no limit on the calls already running: while a peer drains, every open channel is
        # asked to reconnect, through the Service, to a replica that stays.
        options.append(("grpc.max_connection_age_ms", int(max_connection_age_secs * 1000)))
    options.extend(extra)
    return options


def create_grpc_server(
    methods: Mapping[str, grpc.RpcMethodHandler],
    *,
    wrap: MethodWrapper | None = None,
    options: Iterable[tuple[str, object]] = (),
    setup: Iterable[Callable[[grpc.aio.Server], None]] = (),
    max_connection_age_secs: float = 0.0,
) -> grpc.aio.Server:
    """An unstarted grpc.aio server with ``methods`` (full path -> handler: ``peer_methods(service)``, a
    router's forwarding handlers, ``blazen.fleet.v1``); the caller adds ports. Each method is wrapped by
    ``wrap`` (the admission); each ``setup`` runs on the server (e.g. adds the gRPC health service)."""
    server = grpc.aio.server(
        options=grpc_server_options(options, max_connection_age_secs=max_connection_age_secs),
        compression=grpc.Compression.NoCompression,
    )
    server.add_generic_rpc_handlers((_Handlers(methods, wrap),))
    for add in setup:
        add(server)
    return server

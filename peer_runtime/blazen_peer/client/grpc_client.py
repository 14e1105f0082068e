"""``BlazenPeerClient``: the gRPC client (grpc.aio), speaking the same bytes as Blazen's Rust client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc

from ..wire.envelope import EnvelopeDecodeError, unwrap, wrap
from ..wire.messages import (
    DerefRequest,
    DerefResponse,
    ReleaseRequest,
    ReleaseResponse,
    SubWorkflowEvent,
    SubWorkflowRequest,
    SubWorkflowResponse,
    decode_stream_frame,
)
from ..wire.postcard import PostcardDecodeError
from ..wire.protocol import (
    AUTHORIZATION_METADATA,
    MAX_MESSAGE_BYTES,
    NODE_ID_METADATA,
    PATH_DEREF,
    PATH_INVOKE,
    PATH_RELEASE,
    PATH_STREAM,
)
from ._common import TlsFiles, build_request, check_response, normalize_uuid, open_tls_files, tls_parts
from .errors import PeerEncodeError, PeerTlsError, PeerTransportError, error_for_status

if TYPE_CHECKING:
    from ..pki.reload import ReloadingTlsSource

# How long calls already running on a channel replaced after a certificate reload may go on.
RELOAD_GRACE_SECS = 30.0


def _target(endpoint: str) -> tuple[str, bool]:
    if endpoint.startswith("https://"):
        return endpoint[len("https://") :].rstrip("/"), True
    if endpoint.startswith("http://"):
        return endpoint[len("http://") :].rstrip("/"), False
    if "://" in endpoint:
        raise PeerTransportError(f"unsupported endpoint scheme in {endpoint!r}")
    return endpoint.rstrip("/"), False


class BlazenPeerClient:
    def __init__(
        self,
        channel: grpc.aio.Channel,
        node_id: str,
        metadata: list[tuple[str, str]],
        *,
        reopen: Any = None,
        tls_source: ReloadingTlsSource | None = None,
    ) -> None:
        self.node_id = node_id
        self._metadata = tuple(metadata)
        self._bind(channel)
        self._tls_source = tls_source
        self._retiring: dict[grpc.aio.Channel, asyncio.Future[Any]] = {}
        if tls_source is not None and reopen is not None:
            loop = asyncio.get_running_loop()

            def on_reload(_material: object) -> None:
                # The source polls its files in a thread; the channel is swapped on the event loop.
                loop.call_soon_threadsafe(self._reopen, reopen)

            tls_source.add_listener(on_reload)
            tls_source.start()

    def _bind(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel
        self._invoke = channel.unary_unary(PATH_INVOKE)
        self._stream = channel.unary_stream(PATH_STREAM)
        self._deref = channel.unary_unary(PATH_DEREF)
        self._release = channel.unary_unary(PATH_RELEASE)

    def _reopen(self, open_channel: Any) -> None:
        # A channel keeps the credentials it was built with: new calls go to a new channel carrying the
        # reloaded certificate; calls running on the old one finish within the grace.
        old = self._channel
        self._bind(open_channel())
        task = asyncio.ensure_future(old.close(grace=RELOAD_GRACE_SECS))
        self._retiring[old] = task
        task.add_done_callback(lambda _t: self._retiring.pop(old, None))

    @property
    def tls_generation(self) -> int | None:
        """How many certificate sets the client has used (1 at connect), None without ``tls_files``."""
        return self._tls_source.generation if self._tls_source is not None else None

    @classmethod
    async def connect(
        cls,
        endpoint: str,
        node_id: str,
        *,
        tls: Any = None,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        tls_files: TlsFiles | None = None,
        token: str | None = None,
        server_name: str | None = None,
        connect_timeout: float = 10.0,
    ) -> BlazenPeerClient:
        """Connect eagerly (as Blazen's client does). ``endpoint``: ``http://H:P`` (plaintext) or ``https://H:P``
        (TLS; system roots unless ``tls``/``root_certificates`` say otherwise). ``token`` is sent as
        ``authorization: Bearer <token>``; ``node_id`` as ``x-blazen-peer-node-id``.

        ``tls_files``: a directory holding ``tls.crt``, ``tls.key`` and ``ca.crt`` (a mounted client Secret)
        or a ``(cert, key, ca)`` tuple of paths. They are validated now and followed afterwards as the server
        follows its own (``blazen_peer.pki.reload``): when they change, new calls use a channel with the new
        certificate and trust, calls in flight finish on the old one."""
        target, secure = _target(endpoint)
        source = None
        if tls_files is not None:
            if tls is not None or root_certificates or certificate_chain or private_key:
                raise PeerTlsError(
                    "give either tls_files or PEM data (tls=, root_certificates=...), not both"
                )
            source = open_tls_files(tls_files)
        parts = tls_parts(tls, root_certificates, certificate_chain, private_key)
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", -1),
        ]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        reopen = None
        if source is not None:
            tls_source = source

            def reopen() -> grpc.aio.Channel:
                return grpc.aio.secure_channel(target, tls_source.grpc_channel_credentials(), options=options)

            channel = reopen()
        elif secure or parts is not None:
            root, chain, key = parts if parts is not None else (None, None, None)
            creds = grpc.ssl_channel_credentials(
                root_certificates=root, private_key=key, certificate_chain=chain
            )
            channel = grpc.aio.secure_channel(target, creds, options=options)
        else:
            channel = grpc.aio.insecure_channel(target, options=options)
        metadata = [(NODE_ID_METADATA, node_id)]
        if token:
            metadata.append((AUTHORIZATION_METADATA, f"Bearer {token}"))
        try:
            reason = await asyncio.wait_for(_connect(channel), connect_timeout)
        except TimeoutError:
            reason = f"no connection within {connect_timeout:g} s"
        if reason is not None:
            await channel.close()
            raise PeerTransportError(f"transport error: cannot connect to {endpoint}: {reason}")
        return cls(channel, node_id, metadata, reopen=reopen, tls_source=source)

    async def _call(self, method: Any, name: str, payload: bytes, deadline: float | None) -> bytes:
        try:
            raw = await method(wrap(payload), metadata=self._metadata, timeout=deadline)
        except grpc.aio.AioRpcError as exc:
            raise error_for_status(exc.code().name, exc.details() or "", name) from None
        return _unwrap(raw)

    async def invoke_sub_workflow(
        self,
        request: SubWorkflowRequest | str,
        step_ids: list[str] | None = None,
        input: Any = None,
        timeout_secs: int | None = None,
        *,
        raise_on_error: bool = False,
        deadline: float | None = None,
    ) -> SubWorkflowResponse:
        """Pass a ``SubWorkflowRequest``, or the workflow name plus ``step_ids``/``input``/``timeout_secs``.
        A workflow error comes back in ``response.error`` unless ``raise_on_error`` (then
        ``PeerWorkflowError``)."""
        req = build_request(request, step_ids, input, timeout_secs)
        raw = await self._call(self._invoke, "invoke", req.encode(), deadline)
        return check_response(_decode(SubWorkflowResponse.decode, raw), raise_on_error)

    async def stream_sub_workflow_events(
        self,
        request: SubWorkflowRequest | str,
        step_ids: list[str] | None = None,
        input: Any = None,
        timeout_secs: int | None = None,
        *,
        deadline: float | None = None,
    ) -> AsyncIterator[SubWorkflowEvent | SubWorkflowResponse]:
        """Yields one ``SubWorkflowEvent`` per event a step emitted, then the final
        ``SubWorkflowResponse``."""
        req = build_request(request, step_ids, input, timeout_secs)
        call = self._stream(wrap(req.encode()), metadata=self._metadata, timeout=deadline)
        try:
            async for raw in call:
                item = _decode(decode_stream_frame, _unwrap(raw))
                if isinstance(item, SubWorkflowResponse):
                    check_response(item, False)
                yield item
        except grpc.aio.AioRpcError as exc:
            raise error_for_status(exc.code().name, exc.details() or "", "stream") from None
        finally:
            call.cancel()

    async def deref_session_ref(self, ref_uuid: Any, *, deadline: float | None = None) -> bytes:
        req = DerefRequest(normalize_uuid(ref_uuid))
        raw = await self._call(self._deref, "deref", req.encode(), deadline)
        return _decode(DerefResponse.decode, raw).payload

    async def release_session_ref(self, ref_uuid: Any, *, deadline: float | None = None) -> bool:
        req = ReleaseRequest(normalize_uuid(ref_uuid))
        raw = await self._call(self._release, "release", req.encode(), deadline)
        return _decode(ReleaseResponse.decode, raw).released

    async def close(self) -> None:
        if self._tls_source is not None:
            self._tls_source.stop()
        await self._channel.close()
        for old in list(self._retiring):
            await old.close()  # no grace left: the caller closes the client

    async def __aenter__(self) -> BlazenPeerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


_READY = grpc.ChannelConnectivity.READY
_FAILED = grpc.ChannelConnectivity.TRANSIENT_FAILURE
_SHUTDOWN = grpc.ChannelConnectivity.SHUTDOWN


async def _connect(channel: grpc.aio.Channel) -> str | None:
    """None once the channel is ready; at its first failure (refused, unresolvable, TLS handshake) the
    reason. ``channel_ready()`` would instead retry with backoff until the timeout and say nothing more."""
    state = channel.get_state(try_to_connect=True)
    while state not in (_READY, _FAILED, _SHUTDOWN):
        await channel.wait_for_state_change(state)
        state = channel.get_state(try_to_connect=True)
    if state == _READY:
        return None
    # The connectivity API carries no reason; a call that does not wait for the channel reports the
    # transport's own (e.g. "Connection refused", "CERTIFICATE_VERIFY_FAILED").
    try:
        await channel.unary_unary("/grpc.health.v1.Health/Check")(b"", wait_for_ready=False, timeout=5)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            return exc.details() or exc.code().name
    # The call got through, so the server is reachable after all (the failure was transient).
    return None if channel.get_state() == _READY else "the channel is in TRANSIENT_FAILURE"


def _unwrap(raw: bytes) -> bytes:
    try:
        return unwrap(raw)
    except EnvelopeDecodeError as exc:
        raise PeerEncodeError(f"protobuf decode failed: {exc}") from None


def _decode(decoder: Any, payload: bytes) -> Any:
    try:
        return decoder(payload)
    except PostcardDecodeError as exc:
        raise PeerEncodeError(f"postcard decode failed: {exc}") from None

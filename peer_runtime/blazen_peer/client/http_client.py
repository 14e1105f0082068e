"""``HttpPeerClient``: the HTTP/JSON client, speaking what Blazen's ``HttpPeerClient`` speaks."""

from __future__ import annotations

import ssl as _ssl
from typing import TYPE_CHECKING, Any

import aiohttp

from ..wire import json_form
from ..wire.messages import DerefRequest, ReleaseRequest, SubWorkflowRequest, SubWorkflowResponse
from ..wire.protocol import AUTHORIZATION_HEADER, NODE_ID_HEADER, ROUTE_DEREF, ROUTE_INVOKE, ROUTE_RELEASE
from ._common import TlsFiles, build_request, check_response, normalize_uuid, open_tls_files, tls_parts
from .errors import PeerEncodeError, PeerTlsError, PeerTransportError, error_for_http

if TYPE_CHECKING:
    from ..pki.reload import ReloadingTlsSource

ROUTES = {"invoke": ROUTE_INVOKE, "deref": ROUTE_DEREF, "release": ROUTE_RELEASE}


class HttpPeerClient:
    def __init__(
        self,
        base_url: str,
        node_id: str,
        *,
        token: str | None,
        ssl: Any,
        timeout: float,
        tls_source: ReloadingTlsSource | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.node_id = node_id
        self._headers = {"Content-Type": "application/json", NODE_ID_HEADER: node_id}
        if token:
            self._headers[AUTHORIZATION_HEADER] = f"Bearer {token}"
        self._ssl = ssl
        self._tls_source = tls_source
        self._ssl_generation = 0
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=min(10.0, timeout))
        self._session: aiohttp.ClientSession | None = None
        if tls_source is not None:
            tls_source.start()

    @property
    def tls_generation(self) -> int | None:
        """The certificate set in use (1, then one more per reload), None without ``tls_files``."""
        return self._tls_source.generation if self._tls_source is not None else None

    def _current_ssl(self) -> Any:
        """The client context of the current certificate files: a new context per generation, so aiohttp
        opens new connections with it (its pool is keyed by the context) and requests on the old ones
        finish."""
        source = self._tls_source
        if source is not None and source.generation != self._ssl_generation:
            material = source.material
            ctx = _ssl.create_default_context(cadata=(material.ca_pem or b"").decode("ascii"))
            if material.cert_chain_pem is not None and material.private_key_pem is not None:
                ctx = _client_identity(ctx, material.cert_chain_pem, material.private_key_pem)
            self._ssl, self._ssl_generation = ctx, source.generation
        return self._ssl

    @classmethod
    def new_http(
        cls,
        base_url: str,
        node_id: str,
        *,
        tls: Any = None,
        ssl: _ssl.SSLContext | None = None,
        tls_files: TlsFiles | None = None,
        token: str | None = None,
        timeout: float = 60.0,
    ) -> HttpPeerClient:
        """No I/O happens until the first call. ``tls``: what ``load_client_tls()`` returns (CA, optional
        identity); ``ssl``: a ready ``SSLContext``; ``tls_files``: a directory with ``tls.crt``, ``tls.key``
        and ``ca.crt`` (a mounted client Secret) or ``(cert, key, ca)`` paths, validated now and followed
        as ``BlazenPeerClient`` follows them: after a change, new connections carry the new certificate
        and trust, requests already sent finish. ``token`` goes out as ``Authorization: Bearer``."""
        if tls_files is not None:
            if tls is not None or ssl is not None:
                raise PeerTlsError("give either tls_files or tls=/ssl=, not both")
            source = open_tls_files(tls_files)
            return cls(base_url, node_id, token=token, ssl=None, timeout=timeout, tls_source=source)
        if ssl is None:
            parts = tls_parts(tls, None, None, None)
            if parts is not None:
                root, chain, key = parts
                ssl = _ssl.create_default_context(cadata=root.decode() if root else None)
                if chain is not None and key is not None:
                    ssl = _client_identity(ssl, chain, key)
        return cls(base_url, node_id, token=token, ssl=ssl, timeout=timeout)

    def _sess(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def _post(self, method: str, body: str) -> Any:
        route = ROUTES[method]
        try:
            async with self._sess().post(
                self.base_url + route, data=body.encode(), headers=self._headers, ssl=self._current_ssl()
            ) as resp:
                raw = await resp.read()
                status = resp.status
        except aiohttp.ClientError as exc:
            raise PeerTransportError(f"http transport: request failed: {exc}") from None
        except TimeoutError:
            raise PeerTransportError(f"http transport: {route} timed out") from None
        if not 200 <= status < 300:
            try:
                detail = json_form.loads(raw)["error"]
            except (json_form.JsonFormError, KeyError, TypeError):
                detail = raw.decode("utf-8", "replace")
            raise error_for_http(status, f"HTTP {status} from {route}: {detail}", method)
        try:
            return json_form.loads(raw)
        except json_form.JsonFormError as exc:  # a hostile server's deep nesting included
            raise PeerEncodeError(f"json deserialize: {exc}") from None

    async def invoke_sub_workflow(
        self,
        request: SubWorkflowRequest | str,
        step_ids: list[str] | None = None,
        input: Any = None,
        timeout_secs: int | None = None,
        *,
        raise_on_error: bool = False,
    ) -> SubWorkflowResponse:
        req = build_request(request, step_ids, input, timeout_secs)
        obj = await self._post("invoke", json_form.request_to_json(req))
        return check_response(_parse(json_form.response_from_json, obj), raise_on_error)

    async def deref_session_ref(self, ref_uuid: Any) -> bytes:
        req = DerefRequest(normalize_uuid(ref_uuid))
        obj = await self._post("deref", json_form.ref_request_to_json(req))
        return _parse(json_form.deref_response_from_json, obj).payload

    async def release_session_ref(self, ref_uuid: Any) -> bool:
        req = ReleaseRequest(normalize_uuid(ref_uuid))
        obj = await self._post("release", json_form.ref_request_to_json(req))
        return _parse(json_form.release_response_from_json, obj).released

    async def close(self) -> None:
        if self._tls_source is not None:
            self._tls_source.stop()
        if self._session is not None:
            await self._session.close()

    async def __aenter__(self) -> HttpPeerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _parse(fn: Any, obj: Any) -> Any:
    try:
        return fn(obj)
    except json_form.JsonFormError as exc:
        raise PeerEncodeError(f"json deserialize: {exc}") from None


def _client_identity(ctx: _ssl.SSLContext, chain: bytes, key: bytes) -> _ssl.SSLContext:
    import os
    import tempfile

    # ssl can only load an identity from files; write them to a private temp dir for the call.
    with tempfile.TemporaryDirectory() as d:
        cert_path, key_path = os.path.join(d, "c.pem"), os.path.join(d, "k.pem")
        for path, data in ((cert_path, chain), (key_path, key)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        ctx.load_cert_chain(cert_path, key_path)
    return ctx

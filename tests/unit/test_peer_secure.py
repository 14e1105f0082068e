"""A real ``BlazenPeerServer`` composed by ``blazen_peer.app``: the auth matrix on both
transports, secure by default, the plaintext listener, health/readiness/metrics/info, limits, drain,
session-ref forwarding over mTLS + token, log redaction."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from blazen_peer import BlazenPeerServer
from blazen_peer.admin.logs import configure_json_logging
from blazen_peer.pki.tls import cert_fingerprint
from blazen_peer.security.policy import INSECURE_MESSAGE
from blazen_peer.wire.envelope import unwrap, wrap
from blazen_peer.wire.errors import PeerInsecureConfigError, PeerTlsError
from blazen_peer.wire.messages import (
    DerefRequest,
    DerefResponse,
    ReleaseRequest,
    ReleaseResponse,
    SubWorkflowRequest,
    SubWorkflowResponse,
)
from blazen_peer.wire.protocol import (
    PATH_DEREF,
    PATH_INVOKE,
    PATH_RELEASE,
    PATH_STREAM,
    ROUTE_DEREF,
    ROUTE_INVOKE,
    ROUTE_RELEASE,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.peers import (
    STEP_MODULE,
    TOKEN,
    client_ssl,
    http_get,
    metric,
    start_peer,
    tls_client,
    write_steps,
)
from tests.support.pki import Pki

INVOKE = PATH_INVOKE
DEREF = PATH_DEREF
RELEASE = PATH_RELEASE
STREAM = PATH_STREAM
HTTP_INVOKE = ROUTE_INVOKE


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.fixture
def steps_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.syspath_prepend(str(write_steps(tmp_path / "steps")))
    return f"{STEP_MODULE}:REG"


@pytest.fixture
async def make_peer(steps_on_path: str) -> AsyncIterator[Callable[..., Any]]:
    started: list[BlazenPeerServer] = []

    async def make(**cfg: Any) -> BlazenPeerServer:
        server = await start_peer(**{"node_id": "secure-0", "entrypoint": steps_on_path, **cfg})
        started.append(server)
        return server

    yield make
    for s in started:
        await s.stop(grace=0)


def tls_cfg(pki: Pki, **extra: Any) -> dict[str, Any]:
    return {"tls_cert": pki.cert, "tls_key": pki.key, "tls_ca": pki.ca_file, "token": TOKEN, **extra}


def req(steps: list[str], data: Any = None, name: str = "wf") -> bytes:
    return wrap(SubWorkflowRequest.new(name, steps, data if data is not None else {"x": 1}).encode())


def grpc_creds(pki: Pki, files: tuple[Path, Path, Path] | None) -> grpc.ChannelCredentials:
    if files is None:
        return grpc.ssl_channel_credentials(pki.ca_pem)
    return grpc.ssl_channel_credentials(pki.ca_pem, files[1].read_bytes(), files[0].read_bytes())


async def grpc_call(
    port: int,
    creds: grpc.ChannelCredentials | None,
    payload: bytes,
    *,
    token: str | None = None,
    method: str = INVOKE,
    node_id: str = "caller-1",
    timeout: float = 20,  # noqa: ASYNC109 (the gRPC deadline)
) -> tuple[grpc.StatusCode, str, bytes | None]:
    md = [("x-blazen-peer-node-id", node_id)]
    if token is not None:
        md.append(("authorization", f"Bearer {token}"))
    target = f"127.0.0.1:{port}"
    opts = [("grpc.ssl_target_name_override", "localhost")]
    channel = (
        grpc.aio.secure_channel(target, creds, options=opts)
        if creds is not None
        else grpc.aio.insecure_channel(target)
    )
    async with channel:
        try:
            raw = await channel.unary_unary(method)(payload, metadata=md, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or "", None
    return grpc.StatusCode.OK, "", unwrap(raw)


async def http_post(
    port: int, ctx: ssl.SSLContext | None, body: Any, *, token: str | None = None, path: str = HTTP_INVOKE
) -> tuple[int, dict]:
    headers = {"content-type": "application/json", "x-blazen-peer-node-id": "browser-1"}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    scheme = "https" if ctx is not None else "http"
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"{scheme}://localhost:{port}{path}",
            data=json.dumps(body).encode(),
            headers=headers,
            ssl=ctx if ctx is not None else False,
        ) as r,
    ):
        return r.status, json.loads(await r.text())


def http_body(steps: list[str], data: Any = None) -> dict:
    payload = json.dumps(data if data is not None else {"x": 1}).encode()
    return {
        "envelope_version": 1,
        "workflow_name": "wf",
        "step_ids": steps,
        "input_json": list(payload),
        "timeout_secs": None,
    }


# -- secure by default ------------------------------------------------------------------------------------


async def test_refuses_to_start_with_neither_tls_nor_token(make_peer) -> None:
    with pytest.raises(PeerInsecureConfigError) as err:
        await make_peer()
    assert str(err.value) == INSECURE_MESSAGE
    assert "--insecure" in str(err.value)
    server = await make_peer(insecure=True)  # the explicit opt-out
    code, _, _ = await grpc_call(server.grpc_port, None, req(["echo"]))
    assert code == grpc.StatusCode.OK


async def test_token_alone_or_tls_alone_is_enough(make_peer, pki: Pki) -> None:
    tok = await make_peer(token=TOKEN)
    assert (await grpc_call(tok.grpc_port, None, req(["echo"]), token=TOKEN))[0] == grpc.StatusCode.OK
    assert (await grpc_call(tok.grpc_port, None, req(["echo"])))[0] == grpc.StatusCode.UNAUTHENTICATED
    tls = await make_peer(tls_cert=pki.cert, tls_key=pki.key, tls_ca=pki.ca_file)
    creds = grpc_creds(pki, pki.client_files)
    assert (await grpc_call(tls.grpc_port, creds, req(["echo"])))[0] == grpc.StatusCode.OK


async def test_bad_tls_configuration_fails_at_start(make_peer, pki: Pki) -> None:
    with pytest.raises(PeerTlsError, match="go together"):
        await make_peer(tls_cert=pki.cert, token=TOKEN)
    with pytest.raises(PeerTlsError, match="TLS configuration error"):
        await make_peer(tls_cert=pki.cert, tls_key=str(pki.foreign_files[1]), tls_ca=pki.ca_file)


async def test_start_waits_for_tls_files_that_are_not_there_yet(make_peer, pki: Pki, tmp_path: Path) -> None:
    # As in a pod whose Secret cert-manager has not filled yet: the files appear after the process started.
    late = tmp_path / "late-tls"
    paths = {name: late / name for name in ("tls.crt", "tls.key", "ca.crt")}

    await _starts_once_tls_files_are_published(make_peer, pki, late, paths)


async def _starts_once_tls_files_are_published(
    make_peer, pki: Pki, folder: Path, paths: dict[str, Path]
) -> None:
    """Starts a peer on ``paths`` while a thread publishes the PEM files 1.5 s later (creating ``folder``
    if it is not there), then calls it over mutual TLS."""

    def publish() -> None:  # in a thread: start() blocks the loop while it waits
        time.sleep(1.5)
        folder.mkdir(exist_ok=True)
        for name, src in (("tls.crt", pki.cert), ("tls.key", pki.key), ("ca.crt", pki.ca_file)):
            # each file appears whole, as the kubelet's rename makes it (a file seen empty is invalid)
            tmp = paths[name].with_suffix(".tmp")
            tmp.write_bytes(Path(src).read_bytes())
            tmp.replace(paths[name])

    publisher = asyncio.get_running_loop().run_in_executor(None, publish)
    peer = await make_peer(
        tls_cert=str(paths["tls.crt"]),
        tls_key=str(paths["tls.key"]),
        tls_ca=str(paths["ca.crt"]),
        tls_wait_secs=30,
    )
    await publisher
    creds = grpc_creds(pki, pki.client_files)
    assert (await grpc_call(peer.grpc_port, creds, req(["echo"])))[0] == grpc.StatusCode.OK


async def test_start_waits_for_tls_files_there_but_empty(make_peer, pki: Pki, tmp_path: Path) -> None:
    # A kubernetes.io/tls Secret stub (the operator creates it before cert-manager fills it): the kubelet
    # projects its keys as empty files, and the peer must wait for them as for missing ones, not exit.
    late = tmp_path / "stub-tls"
    late.mkdir()
    paths = {name: late / name for name in ("tls.crt", "tls.key", "ca.crt")}
    for path in paths.values():
        path.write_bytes(b"")
    await _starts_once_tls_files_are_published(make_peer, pki, late, paths)


async def test_start_gives_up_on_missing_tls_files_after_the_wait(make_peer, tmp_path: Path) -> None:
    missing = tmp_path / "never"
    with pytest.raises(PeerTlsError):
        await make_peer(
            tls_cert=str(missing / "tls.crt"),
            tls_key=str(missing / "tls.key"),
            token=TOKEN,
            tls_wait_secs=0.5,
        )


# -- the auth matrix ----------------------------------------------------------------------------------------


async def test_grpc_auth_matrix(make_peer, pki: Pki) -> None:
    server = await make_peer(**tls_cfg(pki))
    port = server.grpc_port
    rejected_handshake = {grpc.StatusCode.UNAVAILABLE}
    cases = {
        "no client cert": (grpc_creds(pki, None), TOKEN, rejected_handshake),
        "cert from another CA": (grpc_creds(pki, pki.foreign_files), TOKEN, rejected_handshake),
        "expired cert": (grpc_creds(pki, pki.expired_files), TOKEN, rejected_handshake),
        "plaintext to the TLS port": (None, TOKEN, rejected_handshake),
        "no token": (grpc_creds(pki, pki.client_files), None, {grpc.StatusCode.UNAUTHENTICATED}),
        "wrong token": (grpc_creds(pki, pki.client_files), "x" + TOKEN, {grpc.StatusCode.UNAUTHENTICATED}),
        "right cert and token": (grpc_creds(pki, pki.client_files), TOKEN, {grpc.StatusCode.OK}),
    }
    for name, (creds, token, expected) in cases.items():
        code, details, body = await grpc_call(port, creds, req(["echo"]), token=token, timeout=15)
        assert code in expected, (name, code, details)
        if code == grpc.StatusCode.UNAUTHENTICATED:
            assert "bearer token" in details
            assert TOKEN not in details
        if code == grpc.StatusCode.OK:
            assert SubWorkflowResponse.decode(body).result_value() == {"x": 1, "caller": "caller-1"}
    # Our own client, as a step-calling peer would use it.
    client = await tls_client(port, pki, "peer-b")
    async with client:
        resp = await client.invoke_sub_workflow("wf", ["echo"], {"x": 2})
        assert resp.result_value() == {"x": 2, "caller": "peer-b"}
    # Health probes need no token (kubelet sends none) but still need the client certificate.
    async with grpc.aio.secure_channel(
        f"127.0.0.1:{port}",
        grpc_creds(pki, pki.client_files),
        options=[("grpc.ssl_target_name_override", "localhost")],
    ) as ch:
        got = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
        assert got.status == health_pb2.HealthCheckResponse.SERVING


async def test_http_auth_matrix(make_peer, pki: Pki) -> None:
    server = await make_peer(**tls_cfg(pki))
    port = server.http_port
    body = http_body(["echo"])
    # Client certificates are optional on the shim (browsers), the token is not.
    assert await http_post(port, client_ssl(pki), body, token=TOKEN) == (
        200,
        {
            "envelope_version": 1,
            "state_json": {},
            "result_json": list(b'{"caller":"browser-1","x":1}'),
            "remote_refs": {},
            "error": None,
        },
    )
    assert (await http_post(port, client_ssl(pki, pki.client_files), body, token=TOKEN))[0] == 200
    status, err = await http_post(port, client_ssl(pki), body, token=None)
    assert (status, err["error"].startswith("missing bearer token")) == (401, True)
    status, err = await http_post(port, client_ssl(pki), body, token=TOKEN + "x")
    assert (status, err) == (401, {"error": "invalid bearer token"})
    # A client certificate that is sent must verify: another CA's or an expired one ends the handshake.
    for files in (pki.foreign_files, pki.expired_files):
        with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
            await http_post(port, client_ssl(pki, files), body, token=TOKEN)
    # Plain HTTP to the HTTPS port is no way in either.
    with pytest.raises(aiohttp.ClientError):
        await http_post(port, None, body, token=TOKEN)


async def test_plaintext_listener_for_blazen_clients(make_peer, pki: Pki) -> None:
    """Blazen's own clients send neither TLS nor a token: the explicit plaintext listener takes them (its
    own grpc.aio server without the token check), with drain, limits and metrics still on."""
    server = await make_peer(**tls_cfg(pki, plaintext_grpc_addr="127.0.0.1:0", max_concurrent_workflows=1))
    code, _, body = await grpc_call(server.plaintext_grpc_port, None, req(["echo"]), node_id="blazen-rs")
    assert code == grpc.StatusCode.OK
    assert SubWorkflowResponse.decode(body).result_value() == {"x": 1, "caller": "blazen-rs"}
    # The limit is shared with the TLS listener.
    slow = asyncio.ensure_future(grpc_call(server.plaintext_grpc_port, None, req(["slow"], {"secs": 1.5})))
    await _until(lambda: server.runtime.limiter.in_use == 1)
    code, details, _ = await grpc_call(
        server.grpc_port, grpc_creds(pki, pki.client_files), req(["echo"]), token=TOKEN
    )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details == "too many concurrent sub-workflows: the limit of 1 is reached, retry later"
    assert (await slow)[0] == grpc.StatusCode.OK
    _, text = await http_get(f"http://127.0.0.1:{server.admin_port}/metrics")
    assert metric(text, "blazen_peer_calls_total", transport="grpc-plaintext", code="OK") == 2
    assert metric(text, "blazen_peer_calls_total", transport="grpc", code="RESOURCE_EXHAUSTED") == 1


async def _until(cond: Callable[[], bool], limit: float = 15) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    while not cond():
        if loop.time() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


# -- admin: health, readiness, metrics, info ---------------------------------------------------------------


async def test_admin_endpoints_and_metrics(make_peer, pki: Pki) -> None:
    server = await make_peer(**tls_cfg(pki))
    admin = f"http://127.0.0.1:{server.admin_port}"
    assert await http_get(admin + "/healthz") == (200, '{"alive": true}')
    assert await http_get(admin + "/readyz") == (200, '{"ready": true, "reason": "ready"}')
    status, info = await http_get(admin + "/v1/info")
    assert status == 200
    body = json.loads(info)
    tls = body.pop("tls")
    assert body == {
        "node_id": "secure-0",
        "steps": ["echo", "slow", "keep", "blob", "chatty", "fill"],
        "envelope_version": 1,
        "ready": True,
        "session_refs": 0,
    }
    assert (tls["client_auth"], tls["outbound_trust"]) == ("require", "ca-bundle")
    # what it trusts and serves, which the operator follows during a CA rotation
    assert tls["trusted_sha256"] == [cert_fingerprint(pki.ca.cert)]
    assert tls["leaf_sha256"] == cert_fingerprint(pki.server.cert)
    assert tls["leaf_root_sha256"] == cert_fingerprint(pki.ca.cert)
    creds = grpc_creds(pki, pki.client_files)
    code, _, _body = await grpc_call(server.grpc_port, creds, req(["keep"], {"data": "hello"}), token=TOKEN)
    assert code == grpc.StatusCode.OK
    # the kept ref shows in what the operator reads (it becomes the pod's deletion cost)
    assert json.loads((await http_get(admin + "/v1/info"))[1])["session_refs"] == 1
    await grpc_call(server.grpc_port, creds, req(["echo"]), token="nope")
    await http_post(server.http_port, client_ssl(pki), http_body(["echo"]), token=TOKEN)
    await http_post(server.http_port, client_ssl(pki), http_body(["nope"]), token=TOKEN)
    _, text = await http_get(admin + "/metrics")
    calls = "blazen_peer_calls_total"
    assert metric(text, calls, transport="grpc", method="InvokeSubWorkflow", code="OK") == 1
    assert metric(text, calls, transport="grpc", method="InvokeSubWorkflow", code="UNAUTHENTICATED") == 1
    assert metric(text, calls, transport="http", method="InvokeSubWorkflow", code="200") == 1
    assert metric(text, calls, transport="http", method="InvokeSubWorkflow", code="404") == 1
    hist = "blazen_peer_call_duration_seconds_count"
    assert metric(text, hist, transport="grpc", method="InvokeSubWorkflow") == 2
    assert metric(text, "blazen_peer_in_flight_calls", transport="grpc", method="InvokeSubWorkflow") == 0
    assert metric(text, "blazen_peer_session_refs") == 1
    assert metric(text, "blazen_peer_session_ref_bytes") == 5
    not_after = pki.server.cert.not_valid_after_utc.timestamp()
    assert metric(text, "blazen_peer_tls_cert_not_after_seconds", listener="peer") == not_after
    assert metric(text, "blazen_peer_tls_reloads_total", listener="peer") == 0
    # A reload shows in the metrics.
    pki.rotate(4242)
    assert server.runtime.tls.check_now()
    _, text = await http_get(admin + "/metrics")
    assert metric(text, "blazen_peer_tls_reloads_total", listener="peer") == 1


async def test_readiness_follows_start_and_drain(make_peer, pki: Pki) -> None:
    """stop(): not ready at once but still serving through the admit window, then the listeners close
    (GOAWAY on the open channel) while the in-flight call finishes."""
    server = await make_peer(**tls_cfg(pki, shutdown_grace_secs=10, shutdown_admit_secs=1.5))
    state = server.runtime
    assert state.readiness.ready
    assert server.ready
    creds = grpc_creds(pki, pki.client_files)
    opts = [("grpc.ssl_target_name_override", "localhost")]
    md = [("authorization", f"Bearer {TOKEN}")]
    async with grpc.aio.secure_channel(f"127.0.0.1:{server.grpc_port}", creds, options=opts) as held:
        invoke = held.unary_unary(INVOKE)
        slow = asyncio.ensure_future(invoke(req(["slow"], {"secs": 3.0}), metadata=md, timeout=30))
        await _until(lambda: state.drainer.in_flight == 1)
        t0 = time.monotonic()
        stopping = asyncio.ensure_future(server.stop())
        await _until(lambda: state.drainer.draining)
        # Admit window: not ready anywhere, yet new calls are served on both transports, on the open
        # channel and on new connections (endpoints are still catching up).
        assert await http_get(f"http://127.0.0.1:{server.admin_port}/readyz") == (
            503,
            '{"ready": false, "reason": "draining"}',
        )
        got = await health_pb2_grpc.HealthStub(held).Check(health_pb2.HealthCheckRequest(service=""))
        assert got.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert SubWorkflowResponse.decode(unwrap(await invoke(req(["echo"]), metadata=md))).result_value()
        code, _, _ = await grpc_call(server.grpc_port, creds, req(["echo"]), token=TOKEN)
        assert code == grpc.StatusCode.OK
        status, body = await http_post(server.http_port, client_ssl(pki), http_body(["echo"]), token=TOKEN)
        assert (status, body["error"], json.loads(bytes(body["result_json"]))["x"]) == (200, None, 1), body
        assert time.monotonic() - t0 < 1.5, "the admit window checks took too long to mean anything"
        # After the window: GOAWAY moves the held channel off READY while the slow call still runs, and the
        # listeners are closed to new connections.
        await _until(lambda: held.get_state() != grpc.ChannelConnectivity.READY, limit=5)
        assert not slow.done()
        code, _, _ = await grpc_call(server.grpc_port, creds, req(["echo"]), token=TOKEN, timeout=2)
        assert code == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(aiohttp.ClientConnectionError):
            await http_post(server.http_port, client_ssl(pki), http_body(["echo"]), token=TOKEN)
        assert SubWorkflowResponse.decode(unwrap(await slow)).result_value() == {"slept": 3.0}
    await asyncio.wait_for(stopping, 30)
    assert state.drainer.clean is True
    assert time.monotonic() - t0 < 5


async def test_stopping_peer_answers_for_its_refs_until_they_are_released(make_peer, pki: Pki) -> None:
    """After the admit window a peer that holds session refs refuses new sub-workflows but keeps its gRPC
    listener open for deref/release (a sibling forwards them), and closes once its refs are gone."""
    a = await make_peer(**tls_cfg(pki, node_id="peer-a", shutdown_grace_secs=20, shutdown_admit_secs=0.3))
    b = await make_peer(**tls_cfg(pki, node_id="peer-b", forward_peers=(f"127.0.0.1:{a.grpc_port}",)))
    creds = grpc_creds(pki, pki.client_files)
    code, _, body = await grpc_call(a.grpc_port, creds, req(["keep"], {"data": "held by a"}), token=TOKEN)
    assert code == grpc.StatusCode.OK
    ref = SubWorkflowResponse.decode(body).result_value()["ref"]
    t0 = time.monotonic()
    stopping = asyncio.ensure_future(a.stop())
    await asyncio.sleep(0.6)  # past the window
    code, details, _ = await grpc_call(a.grpc_port, creds, req(["echo"]), token=TOKEN)
    assert (code, details.startswith("draining")) == (grpc.StatusCode.UNAVAILABLE, True)
    deref = wrap(DerefRequest(ref).encode())
    code, _, body = await grpc_call(b.grpc_port, creds, deref, token=TOKEN, method=DEREF)
    assert code == grpc.StatusCode.OK
    assert DerefResponse.decode(body).payload == b"held by a"
    assert not stopping.done()
    release = wrap(ReleaseRequest(ref).encode())
    code, _, body = await grpc_call(b.grpc_port, creds, release, token=TOKEN, method=RELEASE)
    assert code == grpc.StatusCode.OK
    assert ReleaseResponse.decode(body).released is True
    await asyncio.wait_for(stopping, 5)  # closed once the refs were gone, long before the 20 s grace
    assert time.monotonic() - t0 < 6
    assert a.runtime.drainer.clean is True


async def test_grace_bounds_the_http_shim_too(make_peer, pki: Pki) -> None:
    """An HTTP request still running when the grace is over is cancelled: stop() returns within the grace
    (aiohttp alone would wait 60 s)."""
    server = await make_peer(**tls_cfg(pki, shutdown_grace_secs=1.0))
    state = server.runtime
    slow = asyncio.ensure_future(
        http_post(server.http_port, client_ssl(pki), http_body(["slow"], {"secs": 30}), token=TOKEN)
    )
    await _until(lambda: state.drainer.in_flight == 1)
    t0 = time.monotonic()
    await asyncio.wait_for(server.stop(), 10)
    assert time.monotonic() - t0 < 3
    assert state.drainer.clean is False
    with pytest.raises(aiohttp.ClientError):
        await slow


# -- limits ------------------------------------------------------------------------------------------------


async def test_concurrency_limit_on_both_transports(make_peer, pki: Pki) -> None:
    server = await make_peer(**tls_cfg(pki, max_concurrent_workflows=2))
    creds = grpc_creds(pki, pki.client_files)
    busy = [
        asyncio.ensure_future(grpc_call(server.grpc_port, creds, req(["slow"], {"secs": 2}), token=TOKEN))
        for _ in range(2)
    ]
    await _until(lambda: server.runtime.limiter.in_use == 2)
    code, details, _ = await grpc_call(server.grpc_port, creds, req(["echo"]), token=TOKEN)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "the limit of 2 is reached" in details
    status, err = await http_post(server.http_port, client_ssl(pki), http_body(["echo"]), token=TOKEN)
    assert (status, "the limit of 2 is reached" in err["error"]) == (429, True)
    # Unauthenticated calls are refused before they could take a slot.
    assert (await grpc_call(server.grpc_port, creds, req(["echo"])))[0] == grpc.StatusCode.UNAUTHENTICATED
    # Deref and release share the limit (issue #10): they hold payloads or fan out to every sibling.
    for method, body in ((PATH_DEREF, DerefRequest(_UUID)), (PATH_RELEASE, ReleaseRequest(_UUID))):
        code, details, _ = await grpc_call(
            server.grpc_port, creds, wrap(body.encode()), token=TOKEN, method=method
        )
        assert (code, "the limit of 2 is reached" in details) == (grpc.StatusCode.RESOURCE_EXHAUSTED, True)
    for route in (ROUTE_DEREF, ROUTE_RELEASE):
        status, err = await http_post(
            server.http_port, client_ssl(pki), {"ref_uuid": _UUID}, token=TOKEN, path=route
        )
        assert (status, "the limit of 2 is reached" in err["error"]) == (429, True)
    assert server.runtime.limiter.in_use == 2
    for task in busy:
        assert (await task)[0] == grpc.StatusCode.OK
    assert server.runtime.limiter.in_use == 0
    assert (await grpc_call(server.grpc_port, creds, req(["echo"]), token=TOKEN))[0] == grpc.StatusCode.OK
    code, _, _ = await grpc_call(
        server.grpc_port, creds, wrap(DerefRequest(_UUID).encode()), token=TOKEN, method=DEREF
    )
    assert code == grpc.StatusCode.NOT_FOUND


_UUID = "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b"


async def test_ref_cache_and_request_size_limits(make_peer, pki: Pki) -> None:
    server = await make_peer(**tls_cfg(pki, ref_max_count=1, ref_max_bytes=100, http_max_body_bytes=2048))
    creds = grpc_creds(pki, pki.client_files)
    port = server.grpc_port
    # Refs the result needs but the cache cannot hold: RESOURCE_EXHAUSTED / 429, naming the limit.
    code, details, _ = await grpc_call(port, creds, req(["blob"], {"n": 500}), token=TOKEN)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "session ref byte limit reached" in details
    assert "--ref-max-bytes" in details
    assert (await grpc_call(port, creds, req(["blob"], {"n": 10}), token=TOKEN))[0] == grpc.StatusCode.OK
    code, details, _ = await grpc_call(port, creds, req(["blob"], {"n": 10}), token=TOKEN)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "session ref limit reached: 1 refs held" in details
    assert "--ref-max-count" in details
    status, err = await http_post(
        server.http_port, client_ssl(pki), http_body(["blob"], {"n": 10}), token=TOKEN
    )
    assert (status, "--ref-max-count" in err["error"]) == (429, True)
    assert server.refs.count == 1
    # Request size: tonic's limit, status and wording on gRPC (Blazen's clients know them: wire compatibility
    # wins over "429 for every limit"), the body cap on HTTP: 429 naming the flag.
    big = req(["echo"], {"pad": "a" * (4 * 1024 * 1024)})
    code, details, _ = await grpc_call(port, creds, big, token=TOKEN)
    assert code == grpc.StatusCode.OUT_OF_RANGE
    assert details.startswith("Error, decoded message length too large: found ")
    assert details.endswith("the limit is: 4194304 bytes")
    for path in (HTTP_INVOKE, "/v1/peer/deref_session_ref", "/v1/peer/release_session_ref"):
        status, err = await http_post(
            server.http_port,
            client_ssl(pki),
            http_body(["echo"], {"pad": "a" * 4000}),
            token=TOKEN,
            path=path,
        )
        assert (status, err) == (
            429,
            {"error": "Maximum request body size 2048 exceeded (--http-max-body-bytes)"},
        )
    _, text = await http_get(f"http://127.0.0.1:{server.admin_port}/metrics")
    calls = "blazen_peer_calls_total"
    assert metric(text, calls, transport="http", method="InvokeSubWorkflow", code="429") == 2
    assert metric(text, calls, transport="http", method="DerefSessionRef", code="429") == 1


async def test_ref_cache_full_inside_a_step_on_both_transports(make_peer, pki: Pki) -> None:
    """A step's own insert over --ref-max-bytes / --ref-max-count that the step does not catch answers the
    whole call RESOURCE_EXHAUSTED / 429 naming the flag (invoke and stream); the run's context-drop refs
    are dropped. A step that catches the refusal carries on: OK / 200."""
    server = await make_peer(**tls_cfg(pki, ref_max_count=3, ref_max_bytes=100))
    creds = grpc_creds(pki, pki.client_files)
    port, hport, hctx = server.grpc_port, server.http_port, client_ssl(pki)
    refs = server.refs

    code, _, body = await grpc_call(port, creds, req(["fill"], {"size": 10}), token=TOKEN)
    assert code == grpc.StatusCode.OK
    assert SubWorkflowResponse.decode(body).error is None
    assert (refs.count, refs.bytes_used) == (1, 10)
    # The bytes cap, hit inside the step.
    too_big = "session ref byte limit reached: 17 bytes held + 200 new > cap 100 (--ref-max-bytes)"
    code, details, _ = await grpc_call(port, creds, req(["fill"], {"size": 200}), token=TOKEN)
    assert (code, details) == (grpc.StatusCode.RESOURCE_EXHAUSTED, too_big)
    status, err = await http_post(hport, hctx, http_body(["fill"], {"size": 200}), token=TOKEN)
    assert (status, err) == (429, {"error": too_big})
    code, details = await _stream_call(port, creds, req(["fill"], {"size": 200}))
    assert (code, details) == (grpc.StatusCode.RESOURCE_EXHAUSTED, too_big)
    assert (refs.count, refs.bytes_used) == (1, 10)  # each failed run's scratch ref was dropped
    # ... caught by the step: the run succeeds.
    code, _, body = await grpc_call(port, creds, req(["fill"], {"size": 200, "catch": True}), token=TOKEN)
    resp = SubWorkflowResponse.decode(body)
    assert (code, resp.error, resp.result_value()) == (grpc.StatusCode.OK, None, {"refused": too_big})
    # The count cap, hit inside the step.
    status, ok = await http_post(hport, hctx, http_body(["fill"], {"size": 10}), token=TOKEN)
    assert (status, ok["error"]) == (200, None)
    assert refs.count == 2
    full = "session ref limit reached: 3 refs held, the cap is 3 (--ref-max-count)"
    code, details, _ = await grpc_call(port, creds, req(["fill"], {"size": 10}), token=TOKEN)
    assert (code, details) == (grpc.StatusCode.RESOURCE_EXHAUSTED, full)
    status, err = await http_post(hport, hctx, http_body(["fill"], {"size": 10}), token=TOKEN)
    assert (status, err) == (429, {"error": full})
    status, ok = await http_post(hport, hctx, http_body(["fill"], {"size": 10, "catch": True}), token=TOKEN)
    assert (status, ok["error"], json.loads(bytes(ok["result_json"]))) == (200, None, {"refused": full})
    assert (refs.count, refs.bytes_used) == (2, 20)
    _, text = await http_get(f"http://127.0.0.1:{server.admin_port}/metrics")
    calls = "blazen_peer_calls_total"
    assert metric(text, calls, transport="grpc", method="InvokeSubWorkflow", code="RESOURCE_EXHAUSTED") == 2
    assert metric(text, calls, transport="http", method="InvokeSubWorkflow", code="429") == 2


async def _stream_call(port: int, creds: grpc.ChannelCredentials, payload: bytes) -> tuple[Any, str]:
    opts = [("grpc.ssl_target_name_override", "localhost")]
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=opts) as ch:
        call = ch.unary_stream(STREAM)(payload, metadata=[("authorization", f"Bearer {TOKEN}")], timeout=20)
        try:
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


# -- forwarding under TLS + token ---------------------------------------------------------------------------


async def test_session_ref_forwarding_over_mtls_with_token(make_peer, tmp_path: Path) -> None:
    """Siblings are dialled by IP; the certificates name only DNS names, so the forwarding channel must
    override the target name (first DNS SAN of the peer's own cert), present the peer's own certificate
    as its client certificate, and send the token. After a reload the channels are rebuilt."""
    from tests.support.pki import CA, KubeletSecretDir, secret_files

    ca = CA("fleet-ca")
    dirs = {}
    for name in ("a", "b"):
        d = KubeletSecretDir(tmp_path / f"tls-{name}")
        d.write(secret_files(ca.issue(f"peer-{name}", dns=("peers.fleet.svc", f"peer-{name}.x"), ips=()), ca))
        dirs[name] = d

    def cfg(name: str, **extra: Any) -> dict[str, Any]:
        d = dirs[name]
        return {
            "node_id": f"peer-{name}",
            "tls_cert": str(d.path("tls.crt")),
            "tls_key": str(d.path("tls.key")),
            "tls_ca": str(d.path("ca.crt")),
            "token": TOKEN,
            "http_addr": None,
            **extra,
        }

    b = await make_peer(**cfg("b"))
    a = await make_peer(**cfg("a", forward_peers=(f"127.0.0.1:{b.grpc_port}",)))
    assert a.runtime.forward_server_name == "peers.fleet.svc"
    leaf = ca.issue("caller", server=False)
    creds = grpc.ssl_channel_credentials(ca.cert_pem, leaf.key_pem, leaf.cert_pem)

    async def call(port: int, payload: bytes, method: str = INVOKE) -> tuple[grpc.StatusCode, bytes | None]:
        async with grpc.aio.secure_channel(
            f"127.0.0.1:{port}", creds, options=[("grpc.ssl_target_name_override", "peers.fleet.svc")]
        ) as ch:
            md = [("authorization", f"Bearer {TOKEN}")]
            try:
                return grpc.StatusCode.OK, unwrap(
                    await ch.unary_unary(method)(payload, metadata=md, timeout=20)
                )
            except grpc.aio.AioRpcError as exc:
                return exc.code(), None

    code, body = await call(b.grpc_port, req(["keep"], {"data": "held by b"}))
    assert code == grpc.StatusCode.OK
    ref = SubWorkflowResponse.decode(body).result_value()["ref"]
    code, body = await call(a.grpc_port, wrap(DerefRequest(ref).encode()), DEREF)
    assert code == grpc.StatusCode.OK
    assert DerefResponse.decode(body).payload == b"held by b"
    # A's certificate rotates: the forwarding channels are rebuilt and forwarding keeps working.
    dirs["a"].write(secret_files(ca.issue("peer-a2", dns=("peers.fleet.svc",), ips=()), ca))
    forwarder = a._forwarder
    old_channels = forwarder.channels.open_channels
    assert a.runtime.tls.check_now()
    await _until(lambda: forwarder.channels.open_channels != old_channels)
    code, body = await call(a.grpc_port, wrap(DerefRequest(ref).encode()), DEREF)
    assert code == grpc.StatusCode.OK
    assert DerefResponse.decode(body).payload == b"held by b"
    # B only accepted the forwarded calls because they carried the token and a CA-signed client cert.
    _, text = await http_get(f"http://127.0.0.1:{b.admin_port}/metrics")
    assert metric(text, "blazen_peer_calls_total", transport="grpc", method="DerefSessionRef", code="OK") == 2


# -- logs ---------------------------------------------------------------------------------------------------


async def test_json_logs_carry_caller_and_request_id_and_never_secrets(make_peer, pki: Pki) -> None:
    stream = io.StringIO()
    holder: list[BlazenPeerServer] = []
    handler = configure_json_logging(
        node_id="secure-0",
        level="INFO",
        stream=stream,
        secrets=lambda: holder[0].runtime.secrets() if holder else [],
    )
    try:
        server = await make_peer(**tls_cfg(pki))
        holder.append(server)
        creds = grpc_creds(pki, pki.client_files)
        key_pem = pki.server.key_pem.decode()
        data = {"header": f"authorization: Bearer {TOKEN}", "blob": f"token={TOKEN} key={key_pem}"}
        code, _, _ = await grpc_call(
            server.grpc_port, creds, req(["chatty"], data), token=TOKEN, node_id="n-7"
        )
        assert code == grpc.StatusCode.OK
        await grpc_call(server.grpc_port, creds, req(["echo"]), token="wrong-" + TOKEN, node_id="n-8")
        await http_post(server.http_port, client_ssl(pki), http_body(["chatty"], data), token=TOKEN)
    finally:
        logging.getLogger().removeHandler(handler)
    out = stream.getvalue()
    records = [json.loads(line) for line in out.splitlines()]
    assert TOKEN not in out
    assert "PRIVATE KEY-----\n" not in out
    assert key_pem.splitlines()[1] not in out
    step_logs = [r for r in records if r["logger"] == "secure_peer_steps"]
    assert len(step_logs) == 2
    assert step_logs[0]["caller_node_id"] == "n-7"
    assert step_logs[1]["caller_node_id"] == "browser-1"
    assert "[REDACTED]" in step_logs[0]["msg"]
    rejected = [r for r in records if "rejected unauthenticated" in r["msg"]]
    assert len(rejected) == 1
    assert rejected[0]["caller_node_id"] == "n-8"
    ids = {r["request_id"] for r in step_logs + rejected}
    assert len(ids) == 3
    assert all(ids)
    assert all(r["node_id"] == "secure-0" for r in records)

from __future__ import annotations

import asyncio
import datetime as dt

import grpc
import pytest
from aiohttp.test_utils import TestClient, TestServer
from blazen_peer.admin.app import make_admin_app
from blazen_peer.admin.health import (
    AioReadinessHealthServicer,
    add_health_servicer,
)
from blazen_peer.admin.metrics import PeerMetrics, method_label
from blazen_peer.admin.readiness import Readiness
from blazen_peer.pki.reload import ReloadingTlsSource
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.support.pki import CA, KubeletSecretDir, secret_files


def test_readiness_transitions_and_listeners():
    r = Readiness()
    seen = []
    r.add_listener(seen.append)
    assert (r.ready, r.reason) == (False, "starting")
    r.set_ready()
    r.set_ready()  # no change, no event
    assert (r.ready, r.reason) == (True, "ready")
    r.set_draining()
    assert (r.ready, r.reason, r.draining) == (False, "draining", True)
    r.set_ready()  # draining is final
    assert r.ready is False
    assert seen == [True, False]


def test_readiness_blocker_holds_it_back_with_its_reason():
    r = Readiness()
    seen = []
    r.add_listener(seen.append)
    r.set_blocker("pools without a live replica: gpu")
    assert (r.ready, r.reason) == (False, "starting")
    r.set_ready()
    assert (r.ready, r.reason) == (False, "pools without a live replica: gpu")
    r.set_blocker(None)
    assert (r.ready, r.reason) == (True, "ready")
    r.set_blocker("pools without a live replica: cpu")
    r.set_draining()
    assert (r.ready, r.reason) == (False, "draining")
    r.set_blocker(None)  # draining stays final
    assert r.ready is False
    assert seen == [True, False]


async def test_admin_endpoints():
    ready = Readiness()
    metrics = PeerMetrics()
    steps = ["my_app::analyze"]
    app = make_admin_app(
        readiness=ready,
        metrics=metrics,
        info=lambda: {"node_id": "peer-0", "steps": list(steps), "envelope_version": 1},
    )
    async with TestClient(TestServer(app)) as client:
        r = await client.get("/healthz")
        assert r.status == 200
        r = await client.get("/readyz")
        assert r.status == 503
        assert (await r.json())["reason"] == "starting"
        info = await (await client.get("/v1/info")).json()
        assert info == {
            "node_id": "peer-0",
            "steps": ["my_app::analyze"],
            "envelope_version": 1,
            "ready": False,
        }
        ready.set_ready()
        steps.append("my_app::summarize")
        assert (await client.get("/readyz")).status == 200
        info = await (await client.get("/v1/info")).json()
        assert info["ready"] is True
        assert info["steps"] == ["my_app::analyze", "my_app::summarize"]
        ready.set_draining()
        r = await client.get("/readyz")
        assert r.status == 503
        assert (await r.json())["reason"] == "draining"
        assert (await (await client.get("/v1/info")).json())["ready"] is False
        assert (await client.get("/healthz")).status == 200  # draining is not dead


async def test_info_callback_and_liveness():
    alive = [True]
    app = make_admin_app(
        readiness=Readiness(),
        metrics=PeerMetrics(),
        info=lambda: {"node_id": "n1", "steps": ["a"], "envelope_version": 1, "ready": True},
        liveness=lambda: alive[0],
    )
    async with TestClient(TestServer(app)) as client:
        info = await (await client.get("/v1/info")).json()
        assert info == {"node_id": "n1", "steps": ["a"], "envelope_version": 1, "ready": False}
        alive[0] = False
        assert (await client.get("/healthz")).status == 503


async def test_metrics_exposition(tmp_path):
    ca = CA("metrics-ca")
    d = KubeletSecretDir(tmp_path / "tls")
    leaf = ca.issue(serial=99, not_after=dt.datetime(2031, 1, 2, tzinfo=dt.UTC))
    d.write(secret_files(leaf, ca))
    src = ReloadingTlsSource(d.path("tls.crt"), d.path("tls.key"), d.path("ca.crt"))
    a, b = PeerMetrics(), PeerMetrics()  # separate registries: no duplicate-timeseries error
    a.track_refs(lambda: (3, 4096))
    a.track_tls(src)
    for metrics, transport, path, code, seconds in (
        (a, "grpc", "/blazen.peer.v1.BlazenPeer/InvokeSubWorkflow", "OK", 0.02),
        (a, "http", "/some/scanner/path", "404", 0.001),
        (b, "grpc", "/blazen.peer.v1.BlazenPeer/InvokeSubWorkflow", "OK", 0.02),
    ):
        stats = metrics.stats(transport, method_label(path))
        stats.start()
        stats.finish(code, seconds)
    d.write(secret_files(ca.issue(serial=100, not_after=dt.datetime(2032, 1, 2, tzinfo=dt.UTC)), ca))
    assert src.check_now()
    app = make_admin_app(readiness=Readiness(), metrics=a, info=dict)
    async with TestClient(TestServer(app)) as client:
        r = await client.get("/metrics")
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }
    assert samples[("blazen_peer_session_refs", ())] == 3
    assert samples[("blazen_peer_session_ref_bytes", ())] == 4096
    assert (
        samples[("blazen_peer_tls_cert_not_after_seconds", (("listener", "grpc"),))]
        == dt.datetime(2032, 1, 2, tzinfo=dt.UTC).timestamp()
    )
    assert samples[("blazen_peer_tls_reloads_total", (("listener", "grpc"),))] == 1
    assert samples[("blazen_peer_tls_reload_failures_total", (("listener", "grpc"),))] == 0
    key = (
        "blazen_peer_calls_total",
        (("code", "OK"), ("method", "InvokeSubWorkflow"), ("transport", "grpc")),
    )
    assert samples[key] == 1
    other = ("blazen_peer_calls_total", (("code", "404"), ("method", "other"), ("transport", "http")))
    assert samples[other] == 1  # unknown paths fold into one label value


async def test_aio_health_follows_readiness():
    ready = Readiness()
    server = grpc.aio.server()
    add_health_servicer(server, AioReadinessHealthServicer(ready))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            req = health_pb2.HealthCheckRequest(service="blazen.peer.v1.BlazenPeer")
            resp = await stub.Check(req)
            assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))
            stream = watch.__aiter__()
            assert (await stream.__anext__()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            ready.set_ready()
            first = await asyncio.wait_for(stream.__anext__(), 5)
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            assert (await stub.Check(req)).status == health_pb2.HealthCheckResponse.SERVING
            ready.set_draining()
            second = await asyncio.wait_for(stream.__anext__(), 5)
            assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await stub.Check(health_pb2.HealthCheckRequest(service="nope"))
            assert ei.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await server.stop(None)

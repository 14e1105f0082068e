"""The router's Kubernetes discovery, the parts that need no API server: the BlazenPeer + EndpointSlice ->
pools mapping, the flags and their in-cluster defaults, the watch client's limits and recovery against a
scripted HTTP server on loopback (a hostile or broken API server), and PoolSet's dynamic membership."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiohttp import web
from blazen_peer.cli import main
from blazen_peer.config import PeerConfig
from blazen_peer.router import pool_source
from blazen_peer.routing import kube
from blazen_peer.routing.discovery import KubeAccess, kube_access
from blazen_peer.routing.endpoints import fleet_pools, slice_addresses
from blazen_peer.routing.kube import KubeApi, KubeError, ResourceWatch
from blazen_peer.routing.pools import PoolSet


def peer(pool: str | None, name: str = "p") -> dict[str, Any]:
    labels = {"blazen.dev/fleet": "f"} | ({"blazen.dev/pool": pool} if pool else {})
    return {"metadata": {"name": name, "namespace": "ns", "labels": labels}}


def eps(pool: str, endpoints: list[dict[str, Any]], port: int = 50051, name: str = "s") -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"blazen.dev/fleet": "f", "blazen.dev/pool": pool}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080}, {"name": "grpc", "port": port}],
        "endpoints": endpoints,
    }


def ep(addr: str, **conditions: Any) -> dict[str, Any]:
    return {"addresses": [addr], "conditions": conditions}


# ---------------------------------------------------------------------------------------------- mapping
def test_ready_unset_counts_as_ready_false_and_terminating_do_not() -> None:
    s = eps(
        "cpu",
        [
            {"addresses": ["10.0.0.1"]},  # no conditions at all
            ep("10.0.0.2", ready=True),
            ep("10.0.0.3", ready=False),
            ep("10.0.0.4", ready=True, terminating=True),
            ep("10.0.0.5", terminating=False),
            ep("10.0.0.6", ready=None),
        ],
    )
    assert slice_addresses(s) == ["10.0.0.1:50051", "10.0.0.2:50051", "10.0.0.5:50051", "10.0.0.6:50051"]


def test_port_named_grpc_first_address_ipv6_bracketed() -> None:
    s = eps("cpu", [{"addresses": ["fd00::1", "fd00::2"]}, ep("not-an-ip"), {"addresses": []}], port=7000)
    assert slice_addresses(s) == ["[fd00::1]:7000"]
    no_grpc = {**s, "ports": [{"name": "http", "port": 8080}]}
    assert slice_addresses(no_grpc) == []
    for bad in ({"name": "grpc", "port": "50051"}, {"name": "grpc", "port": 0}, {"name": "grpc"}):
        assert slice_addresses({**s, "ports": [bad]}) == []


def test_pools_from_peers_replicas_from_slices_deduplicated() -> None:
    peers = [peer("cpu", "f-cpu"), peer("gpu", "f-gpu"), peer(None, "stray")]
    slices = [
        eps("cpu", [ep("10.0.0.2"), ep("10.0.0.1")], name="f-cpu-abc"),
        eps("cpu", [ep("10.0.0.1"), ep("10.0.0.2")], name="f-cpu-peers-xyz"),  # the headless Service's
        eps("gone", [ep("10.0.9.9")], name="f-gone-1"),  # its BlazenPeer was deleted
    ]
    assert fleet_pools(peers, slices) == {"cpu": ["10.0.0.1:50051", "10.0.0.2:50051"], "gpu": []}
    assert fleet_pools([], slices) == {}
    # the same address on another port (its own slice, as a Service's second port gets) is another replica
    slices.append(eps("cpu", [ep("10.0.0.1")], port=50052, name="f-cpu-def"))
    assert fleet_pools(peers, slices)["cpu"] == ["10.0.0.1:50051", "10.0.0.1:50052", "10.0.0.2:50051"]
    # junk where objects should be is skipped, never an exception
    assert fleet_pools([{"metadata": None}, {}], [{"metadata": {"labels": {"blazen.dev/pool": "x"}}}]) == {}
    assert (
        slice_addresses({"ports": [{"name": "grpc", "port": 1}], "endpoints": ["x", {"conditions": 1}]}) == []
    )


# ---------------------------------------------------------------------------------------------- flags
def test_fleet_and_pool_are_mutually_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["route", "--insecure", "--pool", "cpu=h:1", "--fleet", "f", "--kube-api-url", "http://h:1"])
    assert exit_.value.code == 2
    assert "--pool and --fleet are mutually exclusive" in capsys.readouterr().err


def test_kube_access_defaults_come_from_the_service_account(tmp_path: Path) -> None:
    sa = tmp_path / "sa"
    sa.mkdir()
    env = {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}
    none: dict[str, Any] = {"namespace": None, "url": None, "token_file": None, "ca_file": None}
    with pytest.raises(ValueError, match="--fleet-namespace is required"):
        kube_access("f", **none, environ=env, sa_dir=sa)
    (sa / "namespace").write_text("team-a\n")
    with pytest.raises(ValueError, match="--kube-api-url is required"):
        kube_access("f", **none, environ={}, sa_dir=sa)
    with pytest.raises(ValueError, match="--kube-token-file is required"):
        kube_access("f", **none, environ=env, sa_dir=sa)
    (sa / "token").write_text("t")
    with pytest.raises(ValueError, match="--kube-ca is required"):
        kube_access("f", **none, environ=env, sa_dir=sa)
    (sa / "ca.crt").write_text("c")
    assert kube_access("f", **none, environ=env, sa_dir=sa) == KubeAccess(
        "f", "team-a", "https://[fd00::1]:443", str(sa / "token"), str(sa / "ca.crt")
    )
    with pytest.raises(ValueError, match="--kube-ca: /nope is not a file"):
        kube_access("f", **{**none, "ca_file": "/nope"}, environ=env, sa_dir=sa)
    with pytest.raises(ValueError, match="must be an http"):
        kube_access("f", **{**none, "url": "h:1"}, environ=env, sa_dir=sa)
    # a plain-HTTP API (kubectl proxy) needs no CA
    cfg = PeerConfig(
        fleet="f",
        fleet_namespace="n",
        kube_api_url="http://127.0.0.1:8001",
        kube_token_file=str(sa / "token"),
    )
    assert pool_source(cfg) == KubeAccess("f", "n", "http://127.0.0.1:8001", str(sa / "token"), None)


# ---------------------------------------------------------------------------------------------- client
Handler = Callable[[web.Request], Any]


class FakeApi:
    """A scripted API server on loopback: ``routes[(path, watch?)]`` answers; every request is recorded."""

    def __init__(self) -> None:
        self.handlers: dict[tuple[str, bool], Handler] = {}
        self.requests: list[web.Request] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request)
        handler = self.handlers[(request.path, request.query.get("watch") == "true")]
        return await handler(request)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"


@pytest.fixture
async def fake() -> AsyncIterator[FakeApi]:
    f = FakeApi()
    await f.start()
    yield f
    assert f.runner is not None
    await f.runner.cleanup()


def lst(items: list[dict[str, Any]], rv: str) -> Handler:
    async def h(request: web.Request) -> web.Response:
        return web.json_response({"kind": "List", "metadata": {"resourceVersion": rv}, "items": items})

    return h


def obj(name: str, rv: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns", "resourceVersion": rv}}


async def stream(request: web.Request, chunks: list[bytes], hold: float = 0) -> web.StreamResponse:
    resp = web.StreamResponse()
    await resp.prepare(request)
    for c in chunks:
        await resp.write(c)
    await asyncio.sleep(hold)
    return resp


def line(kind: str, o: dict[str, Any]) -> bytes:
    return json.dumps({"type": kind, "object": o}).encode() + b"\n"


async def test_an_endless_watch_line_is_refused_without_buffering_it(fake: FakeApi) -> None:
    sent = 0

    async def endless(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        resp = web.StreamResponse()
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError):
            while True:  # no newline, ever, until the client hangs up
                await resp.write(b"x" * 65536)
                sent += 65536
        return resp

    fake.handlers[("/p", True)] = endless
    api = KubeApi(fake.url, token_file=None, ca_file=None, max_line_bytes=1 << 20)
    with pytest.raises(KubeError, match="larger than 1048576 bytes"):
        await anext(aiter(api.watch("/p", "a=b", "1", 60)))
    await api.close()
    assert sent < 16 << 20  # refused after about a megabyte, not after the server gave up


async def test_an_oversized_list_and_junk_are_refused(fake: FakeApi, tmp_path: Path) -> None:
    fake.handlers[("/big", False)] = lst([obj(f"o{i}", "1") for i in range(2000)], "5")

    async def junk(request: web.Request) -> web.Response:
        return web.Response(body=b"[1, 2]", content_type="application/json")

    async def denied(request: web.Request) -> web.Response:
        return web.json_response({"kind": "Status", "message": "blazenpeers is forbidden: no"}, status=403)

    fake.handlers[("/junk", False)] = junk
    fake.handlers[("/denied", False)] = denied
    token = tmp_path / "token"
    token.write_text("first\n")
    api = KubeApi(fake.url, token_file=str(token), ca_file=None, max_body_bytes=10_000)
    with pytest.raises(KubeError, match="a list larger than 10000 bytes"):
        await api.list("/big", "a=b")
    with pytest.raises(KubeError, match="not a list"):
        await api.list("/junk", "a=b")
    token.write_text("second\n")  # a rotated token is used from the next request on
    with pytest.raises(KubeError, match="HTTP 403: blazenpeers is forbidden: no"):
        await api.list("/denied", "a=b")
    await api.close()
    assert [r.headers["Authorization"] for r in fake.requests] == ["Bearer first"] * 2 + ["Bearer second"]
    assert fake.requests[0].query["labelSelector"] == "a=b"
    assert fake.requests[0].headers["Accept-Encoding"] == "identity"  # the limits count what is sent


async def test_a_stalled_watch_is_abandoned(fake: FakeApi, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kube, "WATCH_GRACE_SECS", 0.5)

    async def stalled(request: web.Request) -> web.StreamResponse:
        return await stream(request, [line("ADDED", obj("a", "2"))], hold=3)

    fake.handlers[("/p", True)] = stalled
    api = KubeApi(fake.url, token_file=None, ca_file=None)
    seen = []

    async def consume() -> None:
        async for kind, o in api.watch("/p", "a=b", "1", 1):
            seen.append((kind, o["metadata"]["name"]))

    with pytest.raises(KubeError, match="stalled"):
        await consume()
    await api.close()
    assert seen == [("ADDED", "a")]
    q = fake.requests[0].query
    assert (q["watch"], q["allowWatchBookmarks"], q["resourceVersion"], q["timeoutSeconds"]) == (
        "true",
        "true",
        "1",
        "1",
    )


async def test_watch_resumes_from_the_last_version_relists_on_gone_and_keeps_objects_on_errors(
    fake: FakeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kube, "BACKOFF_FIRST_SECS", 0.01)
    monkeypatch.setattr(kube, "BACKOFF_MAX_SECS", 0.05)
    lists = iter([lst([obj("a", "1")], "10"), lst([obj("b", "30")], "30")])
    script: list[Handler] = []

    async def listing(request: web.Request) -> web.Response:
        return await next(lists)(request)

    async def watching(request: web.Request) -> web.StreamResponse:
        return await script.pop(0)(request) if script else await stream(request, [], hold=3)

    async def events(request: web.Request) -> web.StreamResponse:
        bookmark = {"metadata": {"resourceVersion": "12"}}
        return await stream(request, [line("ADDED", obj("c", "11")), line("BOOKMARK", bookmark)], hold=1.1)

    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=500, text="etcd is down")

    async def gone(request: web.Request) -> web.StreamResponse:
        status = {"kind": "Status", "code": 410, "message": "too old resource version: 12 (25)"}
        return await stream(request, [line("ERROR", status)])

    script[:] = [events, broken, gone]
    fake.handlers[("/p", False)] = listing
    fake.handlers[("/p", True)] = watching
    changes: list[list[str]] = []
    w = ResourceWatch(KubeApi(fake.url, token_file=None, ca_file=None), "/p", "a=b", lambda: None)
    w.on_change = lambda: changes.append(sorted(w.objects))
    task = asyncio.ensure_future(w.run())
    try:
        for _ in range(200):
            if len(changes) >= 3:
                break
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await w.api.close()
    # listed, then an event; the 500 kept what was known; 410 Gone -> a new list replaced it
    assert changes[:3] == [["ns/a"], ["ns/a", "ns/c"], ["ns/b"]]
    watches = [r.query["resourceVersion"] for r in fake.requests if r.query.get("watch")]
    assert watches[:4] == ["10", "12", "12", "30"]  # from the list, then from the bookmark, then the relist
    assert w.health.errors == 1
    assert w.health.lists == 2
    assert "HTTP 500: etcd is down" in (w.health.last_error or "")


# ---------------------------------------------------------------------------------------------- PoolSet
async def test_poolset_update_keeps_replicas_that_stay_and_drops_the_others() -> None:
    pools = PoolSet({"cpu": ["127.0.0.1:1", "127.0.0.1:2"]}, describe_timeout=0.5)
    seen_unready: list[list[str]] = []
    pools._on_refresh = seen_unready.append
    a, b = pools.pools["cpu"]
    a.in_flight = 3
    pools.update({"cpu": ["127.0.0.1:1", "127.0.0.1:3"], "gpu": []})
    assert pools.pools["cpu"][0] is a
    assert a.in_flight == 3
    assert [r.addr for r in pools.pools["cpu"]] == ["127.0.0.1:1", "127.0.0.1:3"]
    assert pools.by_addr.get("127.0.0.1:2") is None
    assert not b.up()  # a call that had picked it goes elsewhere on a retry
    assert pools.empty_pools() == ["gpu"]
    assert seen_unready[-1] == ["cpu", "gpu"]
    await pools.close()


async def test_a_left_replica_channel_closes_once_its_calls_ended() -> None:
    """A real call in flight on a replica that leaves finishes; its channel is closed after, not before."""
    from blazen_peer.client import BlazenPeerClient

    from tests.router.conftest import start_fleet, stop_fleet

    fleet = await start_fleet()
    try:
        pools = fleet.router.pools
        assert pools is not None
        gone = pools.pools["cpu"][0]
        channel = pools.channel(gone.addr)
        client = await BlazenPeerClient.connect(f"http://127.0.0.1:{fleet.router.grpc_port}", "c")
        calls = [
            asyncio.ensure_future(client.invoke_sub_workflow("wf", ["cpu.slow"], {"secs": 1.0}))
            for _ in range(8)
        ]
        await asyncio.sleep(0.3)
        assert gone.in_flight > 0  # picked by some of the calls
        pools.update({"cpu": [r.addr for r in pools.pools["cpu"][1:]], "gpu": fleet.pools["gpu"]})
        assert gone.addr not in pools.channels.open_channels
        results = await asyncio.gather(*calls)
        assert all(r.error is None for r in results)  # none cut off by the removal
        assert {r.result_value()["node"] for r in results} == {"cpu-0", "cpu-1"}
        await asyncio.sleep(0.2)
        assert channel.get_state() == grpc.ChannelConnectivity.SHUTDOWN
        # later calls go to the replica that stays
        nodes = {
            (await client.invoke_sub_workflow("wf", ["cpu.parse"])).result_value()["node"] for _ in range(10)
        }
        assert nodes == {"cpu-1"}
        await client.close()
    finally:
        await stop_fleet(fleet)

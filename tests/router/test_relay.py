"""The relay (``--data-plane relay``, the default): ``blazen_peer._relay`` owns the router's ``--grpc-addr``,
forwards Invoke and Stream itself after one Python decision per call, and hands everything else to the
grpcio server on a private unix socket. Real peers and routers on loopback, real gRPC clients; the other
router tests (routing, balance, refs, split, secure) run through the relay as well."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from blazen_peer._relay import Relay
from blazen_peer.client import PeerError, PeerTransportError, PeerUnknownStepError
from blazen_peer.routing.relay import METADATA, RelayCall, RelayPolicy, Target
from blazen_peer.wire.envelope import wrap
from blazen_peer.wire.messages import SubWorkflowRequest
from blazen_peer.wire.protocol import PATH_INVOKE

from tests.support.peers import start_router, tls_client
from tests.support.pki import Pki

from .conftest import Fleet, start_fleet, stop_fleet, tls_config


class Decisions:
    """What the relay's policy decided, call by call (the real policy, observed)."""

    def __init__(self, policy: RelayPolicy) -> None:
        self.made: list[RelayCall | None] = []
        real = policy.decide

        def decide(
            path: str, request: bytes, caller: str | None, rid: str | None, authorization: str | None
        ) -> tuple[RelayCall, Target] | None:
            decided = real(path, request, caller, rid, authorization)
            self.made.append(decided[0] if decided is not None else None)
            return decided

        policy.decide = decide  # type: ignore[method-assign]

    @property
    def relayed(self) -> int:
        return sum(c is not None for c in self.made)


def decisions(fleet: Fleet) -> Decisions:
    assert fleet.router.relay_policy is not None
    return Decisions(fleet.router.relay_policy)


def request(step: str, **event: Any) -> bytes:
    req = SubWorkflowRequest("wf", [step], json.dumps(event).encode())
    return wrap(req.encode())


@pytest.fixture
async def fleet() -> Iterator[Fleet]:
    f = await start_fleet()
    try:
        yield f
    finally:
        await stop_fleet(f)


async def test_invoke_bytes_come_back_unchanged_and_the_relay_forwarded_them(fleet: Fleet) -> None:
    seen = decisions(fleet)
    raw = request("cpu.parse", x=7)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{fleet.router.grpc_port}") as ch:
        via_router = await ch.unary_unary(PATH_INVOKE)(raw, timeout=10)
    assert seen.relayed == 1
    direct = []
    for peer in fleet.cpu:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{peer.grpc_port}") as ch:
            direct.append(await ch.unary_unary(PATH_INVOKE)(raw, timeout=10))
    # the relay's answer is, byte for byte, what one replica answers to the same request (it names itself)
    assert via_router in direct
    assert all(r.in_flight == 0 for r in fleet.router.pools.replicas)


async def test_a_request_larger_than_the_replicas_flow_control_window_arrives_whole(fleet: Fleet) -> None:
    # The relay hands the request to h2 at once (no wait for window capacity): 3 MiB, far past a replica's
    # first 64 KiB window, must still arrive whole and the answer come back unchanged.
    seen = decisions(fleet)
    raw = request("cpu.parse", x="a" * (3 << 20))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{fleet.router.grpc_port}") as ch:
        via_router = await ch.unary_unary(PATH_INVOKE)(raw, timeout=30)
    assert seen.relayed == 1
    assert len(via_router) > 3 << 20
    assert b'"x":"' + b"a" * (3 << 20) + b'"' in via_router


async def test_oversized_metadata_is_refused_before_python_sees_it(fleet: Fleet) -> None:
    # Headers arrive before any credential is checked: the relay bounds them as grpcio does (16 KiB), not at
    # h2's default of 16 MiB per stream, and Python never decodes such a call.
    seen = decisions(fleet)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{fleet.router.grpc_port}") as ch:
        invoke = ch.unary_unary(PATH_INVOKE)
        with pytest.raises(grpc.aio.AioRpcError):
            await invoke(request("cpu.parse"), metadata=[("x-padding", "p" * (64 << 10))], timeout=10)
        assert seen.made == []
        assert await invoke(request("cpu.parse"), timeout=10)  # the listener lives on
    assert seen.relayed == 1


async def test_the_deadline_and_the_cancellation_reach_the_replica(fleet: Fleet) -> None:
    seen = decisions(fleet)
    client = await fleet.client()
    try:
        start = time.monotonic()
        with pytest.raises(PeerTransportError, match=r"(?i)deadline"):
            await client.invoke_sub_workflow("wf", ["cpu.slow"], {"secs": 30}, deadline=0.5)
        assert time.monotonic() - start < 5
        assert await fleet.wait_cpu_in_use(0) == 0  # the replica got the deadline too: its call ends
        task = asyncio.ensure_future(client.invoke_sub_workflow("wf", ["cpu.slow"], {"secs": 30}))
        assert await fleet.wait_cpu_in_use(1) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # both ended on the replica: the RST_STREAM went along
        assert await fleet.wait_cpu_in_use(0) == 0
        assert seen.relayed == 2, seen.made
        assert all(r.in_flight == 0 for r in fleet.router.pools.replicas)
        assert fleet.router.runtime.limiter.in_use == 0
    finally:
        await client.close()


async def test_streams_and_refs_go_through_the_relay_and_deref_through_the_unix_hop(fleet: Fleet) -> None:
    seen = decisions(fleet)
    client = await fleet.client()
    try:
        frames = [f async for f in client.stream_sub_workflow_events("wf", ["cpu.keep"], {"data": "kept"})]
        assert frames
        assert seen.relayed == 1
        # the ref of the Invoke reply is learnt by the relay's finish: deref goes straight to its owner
        resp = await client.invoke_sub_workflow("wf", ["gpu.keep"], {"data": "v"})
        ref = resp.result_value()["ref"]
        assert seen.relayed == 2
        assert fleet.router.router.owners.owner(uuid.UUID(ref).bytes) is not None
        assert await client.deref_session_ref(ref) == b"v"
        assert await client.release_session_ref(ref) is True
        assert seen.relayed == 2  # deref and release were the grpcio server's (they never reach decide)
    finally:
        await client.close()


async def test_the_grpcio_server_listens_only_on_a_private_unix_socket(fleet: Fleet) -> None:
    directory = fleet.router._relay_dir
    assert directory is not None
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert os.listdir(directory) == ["grpc.sock"]


async def test_a_split_run_is_handed_to_the_grpcio_server(fleet: Fleet) -> None:
    seen = decisions(fleet)
    client = await fleet.client()
    try:
        # cpu.chain1 then gpu.infer: no single pool serves both
        with pytest.raises(PeerUnknownStepError):  # the split runner's answer: no pool serves both steps
            await client.invoke_sub_workflow("wf", ["cpu.parse", "gpu.infer"], {"x": 1})
        assert seen.made == [None]  # (test_split runs split runs end to end, through the relay too)
    finally:
        await client.close()


async def test_a_refused_replica_is_replaced_a_started_call_never_rerun() -> None:
    fleet = await start_fleet({"max_concurrent_workflows": 1})
    seen = decisions(fleet)
    client = await fleet.client()
    try:
        # both replicas take one call each; cpu.slow holds cpu-0 and cpu-1 in turn
        busy = asyncio.ensure_future(client.invoke_sub_workflow("wf", ["cpu.slow"], {"secs": 1.5}))
        assert await fleet.wait_cpu_in_use(1) == 1
        nodes = [
            (await client.invoke_sub_workflow("wf", ["cpu.parse"])).result_value()["node"] for _ in range(10)
        ]
        held = next(p.node_id for p in fleet.cpu if p.runtime.limiter.in_use == 1)
        assert held not in nodes  # refused (RESOURCE_EXHAUSTED before running) -> the other one, invisibly
        await busy
        # A call that failed after it was sent (its deadline) is the caller's answer: it ran once.
        before = sum(r.calls for r in fleet.router.pools.replicas)
        with pytest.raises(PeerTransportError, match=r"(?i)deadline"):
            await client.invoke_sub_workflow("wf", ["cpu.slow"], {"secs": 5}, deadline=0.3)
        assert sum(r.calls for r in fleet.router.pools.replicas) == before + 1
        assert seen.relayed >= 12
    finally:
        await client.close()
        await stop_fleet(fleet)


async def test_a_draining_replica_loses_no_call() -> None:
    fleet = await start_fleet({"shutdown_admit_secs": 0.0})
    seen = decisions(fleet)
    client = await fleet.client()
    try:
        kept = None
        while kept is None:  # a ref held by cpu-0 keeps its listener open while it drains
            resp = await client.invoke_sub_workflow("wf", ["cpu.keep"], {"data": "v"})
            if resp.result_value()["node"] == "cpu-0":
                kept = resp.result_value()["ref"]
        stopping = asyncio.ensure_future(fleet.cpu[0].stop(grace=30))
        await asyncio.sleep(0.2)
        results = await asyncio.gather(
            *(client.invoke_sub_workflow("wf", ["cpu.parse"]) for _ in range(30)), return_exceptions=True
        )
        assert [r if isinstance(r, Exception) else r.result_value()["node"] for r in results] == [
            "cpu-1"
        ] * 30  # 0 failed
        assert seen.relayed >= 30
        assert await client.release_session_ref(kept) is True
        await asyncio.wait_for(stopping, 10)
    finally:
        await client.close()
        await stop_fleet(fleet)


async def test_data_plane_grpcio_keeps_the_python_path() -> None:
    fleet = await start_fleet(data_plane="grpcio")
    client = await fleet.client()
    try:
        assert fleet.router.relay is None
        assert (
            (await client.invoke_sub_workflow("wf", ["cpu.parse"])).result_value()["node"].startswith("cpu")
        )
    finally:
        await client.close()
        await stop_fleet(fleet)


# -- the listener: TLS, client certificates, reload, cap, handshake timeout --------------------------------


@pytest.fixture
async def secure_fleet(tmp_path: Path) -> Iterator[tuple[Fleet, Pki]]:
    pki = Pki(tmp_path / "pki")
    fleet = await start_fleet(tls_config(pki), **tls_config(pki))
    try:
        yield fleet, pki
    finally:
        await stop_fleet(fleet)


def _handshake(port: int, pki: Pki, identity: bool) -> bytes:
    """A TLS (h2) handshake with the router; the certificate it served. Raises when it refuses."""
    ctx = ssl.create_default_context(cadata=pki.ca_pem.decode())
    ctx.set_alpn_protocols(["h2"])
    if identity:
        crt, key, _ = pki.client_files
        ctx.load_cert_chain(str(crt), str(key))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        # TLS 1.3: a refused client certificate shows at the first read
        tls.recv(1)
        cert = tls.getpeercert(binary_form=True)
        assert cert is not None
        return cert


async def test_mtls_the_client_certificate_is_required(secure_fleet) -> None:
    fleet, pki = secure_fleet
    seen = decisions(fleet)
    client = await tls_client(fleet.router.grpc_port, pki, "secure-caller")
    try:
        assert (
            (await client.invoke_sub_workflow("wf", ["cpu.parse"])).result_value()["node"].startswith("cpu")
        )
        assert seen.relayed == 1
    finally:
        await client.close()
    port = fleet.router.grpc_port
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        await asyncio.to_thread(_handshake, port, pki, False)
    assert await asyncio.to_thread(_handshake, port, pki, True)
    # a caller with the certificate but no token is refused by the admission (handed to grpcio, which says so)
    anonymous = await tls_client(port, pki, "secure-caller", token=None)
    try:
        with pytest.raises(PeerError, match=r"(?i)token"):
            await anonymous.invoke_sub_workflow("wf", ["cpu.parse"])
    finally:
        await anonymous.close()


async def test_a_reloaded_certificate_is_served_to_new_connections(secure_fleet) -> None:
    fleet, pki = secure_fleet
    port = fleet.router.grpc_port
    from cryptography import x509

    def serial() -> int:
        return x509.load_der_x509_certificate(_handshake(port, pki, True)).serial_number

    assert await asyncio.to_thread(serial) == 1001
    pki.rotate(2002)
    for _ in range(100):
        if await asyncio.to_thread(serial) == 2002:
            break
        await asyncio.sleep(0.1)
    assert await asyncio.to_thread(serial) == 2002


def _closed_without_a_word(port: int, secs: float) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=secs) as s:
        try:
            return s.recv(1) == b""
        except TimeoutError:
            return False


def _closed_within(s: socket.socket, secs: float) -> bool:
    """Whether the server closes ``s`` within ``secs`` (whatever it sent before, e.g. its SETTINGS)."""
    s.settimeout(secs)
    try:
        while s.recv(4096):
            pass
    except TimeoutError:
        return False
    return True


async def test_the_connection_cap_and_the_handshake_timeout() -> None:
    fleet = await start_fleet(max_connections=2, idle_timeout_secs=0.5)
    port = fleet.router.grpc_port
    try:
        # Two connections that never send their preface hold the cap; the third is closed at accept.
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        await asyncio.sleep(0.1)
        assert await asyncio.to_thread(_closed_without_a_word, port, 0.3)
        # ...and they are dropped once the handshake timeout is over, which frees the cap.
        start = time.monotonic()
        assert all([await asyncio.to_thread(_closed_within, s, 3) for s in held])
        assert time.monotonic() - start < 3
        for s in held:
            s.close()
        client = await fleet.client()
        try:
            assert (await client.invoke_sub_workflow("wf", ["cpu.parse"])).error is None
        finally:
            await client.close()
    finally:
        await stop_fleet(fleet)


async def test_a_router_on_its_own_serves_only_what_its_config_allows(tmp_path: Path) -> None:
    # TLS configured: the relay speaks TLS only; a plaintext HTTP/2 caller gets nothing.
    pki = Pki(tmp_path / "pki")
    router = await start_router({"cpu": ["127.0.0.1:1"]}, **tls_config(pki))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{router.grpc_port}") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await ch.unary_unary(PATH_INVOKE)(request("cpu.parse"), timeout=3)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await router.stop(grace=0)


def test_a_relay_stopped_right_after_it_started_stops() -> None:
    # A stop that comes before the relay's thread began serving (a router started and stopped at once, as a
    # test under load or a pod killed while starting does) must still end it, not leave stop() joining
    # forever.
    for _ in range(20):
        relay = Relay(
            object(),
            [PATH_INVOKE],
            "/nonexistent.sock",
            metadata=METADATA,
            tls=None,
            hop_tls=None,
            max_connections=10,
            handshake_timeout=1.0,
            max_connection_age=0.0,
            max_request_bytes=1 << 20,
        )
        relay.start("127.0.0.1:0")
        stopper = threading.Thread(target=relay.stop, args=(0.0,), daemon=True)
        stopper.start()
        stopper.join(10)
        assert not stopper.is_alive(), "Relay.stop() did not return: the stop was lost"

"""A secure fleet: peers and router with TLS (mTLS) and a bearer token. The hop to the pools uses the
forwarding credentials (the router's certificate as client identity, its token); ``Describe`` is on the
peers' authenticated port only, behind the same admission."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from blazen_peer.client import BlazenPeerClient, PeerTransportError, PeerUnknownStepError
from blazen_peer.wire.envelope import unwrap
from blazen_peer.wire.fleet import Description
from blazen_peer.wire.protocol import PATH_DESCRIBE

from tests.support.peers import TOKEN, start_router, tls_client
from tests.support.pki import Pki, write_pem_files

from .conftest import start_fleet, stop_fleet, tls_config


@pytest.fixture
async def secure_fleet(tmp_path: Path):
    pki = Pki(tmp_path / "pki")
    peer = {**tls_config(pki), "plaintext_grpc_addr": "127.0.0.1:0"}
    fleet = await start_fleet(peer, **tls_config(pki), plaintext_grpc_addr="127.0.0.1:0")
    try:
        yield fleet, pki
    finally:
        await stop_fleet(fleet)


async def test_calls_through_a_tls_router_to_tls_pools(secure_fleet) -> None:
    fleet, pki = secure_fleet
    client = await tls_client(fleet.router.grpc_port, pki, "secure-caller")
    try:
        assert (await client.invoke_sub_workflow("wf", ["gpu.infer"])).result_value()["node"] == "gpu-0"
        ref = (await client.invoke_sub_workflow("wf", ["cpu.keep"], {"data": "s"})).result_value()["ref"]
        assert await client.deref_session_ref(ref) == b"s"
    finally:
        await client.close()
    # the router described every replica over the authenticated port
    assert all(r.description is not None for r in fleet.router.pools.replicas)
    # no token: refused by the router's own admission, as by a peer's
    anonymous = await tls_client(fleet.router.grpc_port, pki, "secure-caller", token=None)
    try:
        with pytest.raises(PeerTransportError) as err:
            await anonymous.invoke_sub_workflow("wf", ["gpu.infer"])
        assert err.value.code == "UNAUTHENTICATED"
    finally:
        await anonymous.close()
    # the plaintext opt-in (Blazen's own clients: no TLS, no token) routes too
    plain = await BlazenPeerClient.connect(f"http://127.0.0.1:{fleet.router.plaintext_grpc_port}", "blazen")
    try:
        assert (await plain.invoke_sub_workflow("gpu-flow", [])).result_value()["node"] == "gpu-0"
    finally:
        await plain.close()


async def test_describe_needs_the_authenticated_port_and_the_token(secure_fleet) -> None:
    fleet, pki = secure_fleet
    peer = fleet.gpu[0]
    creds = grpc.ssl_channel_credentials(pki.ca_pem, pki.client.key_pem, pki.client.cert_pem)
    opts = [("grpc.ssl_target_name_override", "localhost")]
    async with grpc.aio.secure_channel(f"127.0.0.1:{peer.grpc_port}", creds, options=opts) as ch:
        describe = ch.unary_unary(PATH_DESCRIBE)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await describe(b"", timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        raw = await describe(b"", metadata=[("authorization", f"Bearer {TOKEN}")], timeout=10)
    desc = Description.decode(unwrap(raw))
    assert desc.node_id == "gpu-0"
    assert desc.ready
    assert sorted(desc.steps) == ["gpu.infer", "gpu.keep", "shared.echo"]
    assert desc.steps["gpu.infer"] == ("blazen::StartEvent",)
    assert desc.workflows == {"gpu-flow": ("gpu.infer",)}
    # not on the plaintext listener, whatever the caller sends
    async with grpc.aio.insecure_channel(f"127.0.0.1:{peer.plaintext_grpc_port}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ch.unary_unary(PATH_DESCRIBE)(
                b"", metadata=[("authorization", f"Bearer {TOKEN}")], timeout=10
            )
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_the_router_does_not_serve_describe(secure_fleet) -> None:
    fleet, _ = secure_fleet
    async with grpc.aio.insecure_channel(f"127.0.0.1:{fleet.router.plaintext_grpc_port}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ch.unary_unary(PATH_DESCRIBE)(b"", timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_pools_with_their_own_certificate_name_need_pool_server_name(tmp_path: Path) -> None:
    # The pools' certificates name only pool.example (no localhost, no IP): by default the router checks them
    # against its own certificate's name and refuses them; --pool-server-name says what to expect.
    pki = Pki(tmp_path / "pki")
    leaf = pki.ca.issue("pool", dns=("pool.example",), ips=())
    crt, key, ca = write_pem_files(tmp_path / "pool-tls", leaf, pki.ca)
    peer = {"tls_cert": str(crt), "tls_key": str(key), "tls_ca": str(ca), "token": TOKEN, "insecure": False}
    fleet = await start_fleet(peer, **tls_config(pki))
    strict = await start_router(fleet.pools, **tls_config(pki), pool_server_name="pool.example")
    try:
        # the default router could not describe a single replica: nothing is routable through it
        assert all(r.description is None for r in fleet.router.pools.replicas)
        client = await tls_client(fleet.router.grpc_port, pki, "secure-caller")
        try:
            with pytest.raises(PeerUnknownStepError):
                await client.invoke_sub_workflow("wf", ["gpu.infer"])
        finally:
            await client.close()
        assert all(r.description is not None for r in strict.pools.replicas)
        named = await tls_client(strict.grpc_port, pki, "secure-caller")
        try:
            assert (await named.invoke_sub_workflow("wf", ["gpu.infer"])).result_value()["node"] == "gpu-0"
        finally:
            await named.close()
    finally:
        await strict.stop(grace=0)
        await stop_fleet(fleet)

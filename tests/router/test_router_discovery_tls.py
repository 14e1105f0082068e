"""Discovered pools over TLS: each pool's replicas are checked against their own BlazenPeer's Service name
(``<peer>.<namespace>.svc``, in every BlazenPeer's certificate), so one router reaches pools whose
certificates name different Services - and a replica whose certificate names another pool is refused."""

from __future__ import annotations

from pathlib import Path

import grpc
from blazen_peer.routing.endpoints import pool_server_names
from blazen_peer.routing.pools import PoolSet

from tests.support.peers import TOKEN, start_peer
from tests.support.pki import CA, write_pem_files

from .conftest import build_registry


def peer_object(pool: str) -> dict:
    labels = {"blazen.dev/fleet": "f", "blazen.dev/pool": pool}
    return {"metadata": {"name": f"f-{pool}", "namespace": "team", "labels": labels}}


async def test_each_discovered_pool_is_checked_against_its_own_name(tmp_path: Path) -> None:
    ca = CA("namespace-ca")
    reg = build_registry()
    peers = {}
    for pool, names in (
        ("cpu", ["f-cpu.team.svc"]),
        ("gpu", ["f-gpu.team.svc"]),
        ("bad", ["f-cpu.team.svc"]),
    ):
        crt, key, ca_file = write_pem_files(tmp_path / pool, ca.issue(pool, dns=names, ips=()), ca)
        peers[pool] = await start_peer(
            reg, node_id=pool, tls_cert=str(crt), tls_key=str(key), tls_ca=str(ca_file), token=TOKEN
        )
    router_id = ca.issue("router", dns=["f.team.svc"], ips=())
    creds = grpc.ssl_channel_credentials(ca.cert_pem, router_id.key_pem, router_id.cert_pem)
    pools = PoolSet(
        {},
        credentials=lambda: creds,
        metadata=lambda: [("authorization", f"Bearer {TOKEN}")],
        # what a router without --pool-server-name has: its own first DNS name, which no pool's cert has
        options=lambda: [("grpc.ssl_target_name_override", "f.team.svc")],
    )
    try:
        addrs = {pool: [f"127.0.0.1:{p.grpc_port}"] for pool, p in peers.items()}
        names = pool_server_names([peer_object(p) for p in addrs])
        assert names == {"bad": "f-bad.team.svc", "cpu": "f-cpu.team.svc", "gpu": "f-gpu.team.svc"}
        pools.update(addrs, names)
        await pools.refresh()
        assert pools.unready_pools() == ["bad"]  # its certificate names f-cpu, not f-bad
        assert {r.pool: r.description.node_id for r in pools.replicas if r.description} == {
            "cpu": "cpu",
            "gpu": "gpu",
        }
    finally:
        await pools.close()
        for p in peers.values():
            await p.stop(grace=0)

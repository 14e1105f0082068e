"""The hop from the router to its pools with credentials of its own (``--pool-tls-cert/--pool-tls-key/
--pool-tls-ca``, ``--pool-token-file``): a router whose serving identity (certificate and token) the pools do
not accept reaches them with the hop identity, and follows the hop files when they change."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from blazen_peer.client import PeerTransportError, PeerUnknownStepError
from blazen_peer.router import BlazenRouterServer

from tests.support.peers import TOKEN, http_get, metric, start_router, tls_client
from tests.support.pki import KubeletSecretDir, Pki, secret_files

from .conftest import Fleet, start_fleet, stop_fleet

ROUTER_TOKEN = "router-callers-token-6b1d0e"


def serving(pki: Pki) -> dict[str, Any]:
    """The router's own identity, from a CA the pools do not trust, and its callers' token."""
    return {"tls_cert": pki.cert, "tls_key": pki.key, "tls_ca": pki.ca_file, "token": ROUTER_TOKEN}


async def routed_node(router: BlazenRouterServer, pki: Pki) -> str:
    client = await tls_client(router.grpc_port, pki, "hop-caller", token=ROUTER_TOKEN)
    try:
        return (await client.invoke_sub_workflow("wf", ["gpu.infer"])).result_value()["node"]
    finally:
        await client.close()


async def start_hop_router(
    fleet: Fleet, router_pki: Pki, hop: KubeletSecretDir, hop_token: Path
) -> BlazenRouterServer:
    """A router for ``fleet``'s pools with the serving identity of ``serving``, whose hop to the pools uses
    the client Secret ``hop`` and the token file ``hop_token``."""
    return await start_router(
        fleet.pools,
        **serving(router_pki),
        pool_tls_cert=str(hop.path("tls.crt")),
        pool_tls_key=str(hop.path("tls.key")),
        pool_tls_ca=str(hop.path("ca.crt")),
        pool_token_file=str(hop_token),
        pool_refresh_secs=0.2,
    )


async def ready_within(router: BlazenRouterServer, ready: bool, limit: float = 15.0) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        status, _ = await http_get(f"http://127.0.0.1:{router.admin_port}/readyz")
        if (status == 200) == ready:
            return True
        await asyncio.sleep(0.1)
    return False


@pytest.fixture
async def pools(tmp_path: Path):
    pool_pki = Pki(tmp_path / "pools")
    peer = {
        "tls_cert": pool_pki.cert,
        "tls_key": pool_pki.key,
        "tls_ca": pool_pki.ca_file,
        "token": TOKEN,
        "insecure": False,
    }
    router_pki = Pki(tmp_path / "router")
    # the fixture's own router has the serving identity only: the pools refuse it
    fleet = await start_fleet(peer, **serving(router_pki), pool_refresh_secs=0.2)
    try:
        yield fleet, pool_pki, router_pki
    finally:
        await stop_fleet(fleet)


async def test_the_hop_identity_reaches_pools_that_refuse_the_serving_one(pools, tmp_path: Path) -> None:
    fleet, pool_pki, router_pki = pools
    # default (today's behaviour): the hop reuses the serving identity, which the pools refuse
    assert all(r.description is None for r in fleet.router.pools.replicas)
    assert await ready_within(fleet.router, ready=False)
    with pytest.raises(PeerUnknownStepError):
        await routed_node(fleet.router, router_pki)

    hop_token = tmp_path / "hop-token"
    hop_token.write_text(TOKEN + "\n")
    hop_client = pool_pki.ca.issue("router-hop", server=False)
    hop = KubeletSecretDir(tmp_path / "hop")
    hop.write(secret_files(hop_client, pool_pki.ca))
    router = await start_hop_router(fleet, router_pki, hop, hop_token)
    try:
        assert all(r.description is not None for r in router.pools.replicas)
        assert await ready_within(router, ready=True)
        assert await routed_node(router, router_pki) == "gpu-0"
        # the router's callers still need the router's own token, not the hop's
        assert router.runtime is not None
        assert router.runtime.tokens is not None
        assert router.runtime.tokens.check_token(ROUTER_TOKEN)
        assert not router.runtime.tokens.check_token(TOKEN)
        assert TOKEN in router.runtime.secrets()  # the hop token is redacted from the logs too
        _, text = await http_get(f"http://127.0.0.1:{router.admin_port}/metrics")
        not_after = metric(text, "blazen_peer_tls_cert_not_after_seconds", listener="pool-hop")
        assert not_after == hop_client.cert.not_valid_after_utc.timestamp()
    finally:
        await router.stop(grace=0)


async def test_the_hop_follows_its_certificate_and_token_files(pools, tmp_path: Path) -> None:
    fleet, pool_pki, router_pki = pools
    hop_token = tmp_path / "hop-token"
    hop_token.write_text("not-the-pools-token")
    good = pool_pki.ca.issue("router-hop", server=False)
    # Trusting both CAs lets a leaf of the router's CA be loaded as hop identity; the pools refuse it.
    both = pool_pki.ca.cert_pem + router_pki.ca.cert_pem
    hop = KubeletSecretDir(tmp_path / "hop")
    hop.write(secret_files(good, both))
    router = await start_hop_router(fleet, router_pki, hop, hop_token)
    try:
        # a token the pools refuse: nothing described, not ready
        assert all(r.description is None for r in router.pools.replicas)
        assert await ready_within(router, ready=False)
        hop_token.write_text(TOKEN)
        assert await ready_within(router, ready=True)
        assert await routed_node(router, router_pki) == "gpu-0"

        # a certificate the pools refuse: the reload opens new channels, which the pools turn down
        hop.write(secret_files(router_pki.ca.issue("router-hop", server=False), both))
        assert await ready_within(router, ready=False)
        with pytest.raises(PeerTransportError) as err:  # the steps are still known; no replica takes the call
            await routed_node(router, router_pki)
        assert err.value.code == "UNAVAILABLE"
        hop.write(secret_files(good, both))
        assert await ready_within(router, ready=True)
        assert await routed_node(router, router_pki) == "gpu-0"
    finally:
        await router.stop(grace=0)


async def test_hop_flags_that_do_not_go_together_fail_at_start(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    with pytest.raises(Exception, match="--pool-tls-cert and --pool-tls-key go together"):
        await start_router({"p": ["127.0.0.1:1"]}, insecure=True, pool_tls_cert=pki.cert)
    with pytest.raises(Exception, match="--pool-tls-ca needs a client certificate"):
        await start_router({"p": ["127.0.0.1:1"]}, insecure=True, pool_tls_ca=pki.ca_file)

"""Session refs through the router: deref and release go to the replica that made the ref, whichever pool
it is in; a router that never saw the ref (another router replica, a restart) finds it by asking them all."""

from __future__ import annotations

import pytest
from blazen_peer.client import BlazenPeerClient, PeerSessionRefNotFoundError

from tests.support.peers import start_router

from .conftest import Fleet


async def test_deref_and_release_through_the_router_for_refs_of_either_pool(fleet: Fleet) -> None:
    client = await fleet.client()
    try:
        refs = {}
        for step, data in (("cpu.keep", "from-cpu"), ("gpu.keep", "from-gpu")):
            resp = await client.invoke_sub_workflow("wf", [step], {"data": data})
            assert resp.error is None
            refs[data] = resp.result_value()["ref"]
            assert refs[data] in resp.remote_refs
        owners = fleet.router.router.owners
        assert len(owners) >= 2
        for data, ref in refs.items():
            assert await client.deref_session_ref(ref) == data.encode()
        # straight to the owner: no other replica was asked
        calls_before = {r.addr: r.calls for r in fleet.router.pools.replicas}
        assert await client.deref_session_ref(refs["from-cpu"]) == b"from-cpu"
        calls_after = {r.addr: r.calls for r in fleet.router.pools.replicas}
        assert sum(calls_after.values()) - sum(calls_before.values()) == 1
        for ref in refs.values():
            assert await client.release_session_ref(ref) is True
            with pytest.raises(PeerSessionRefNotFoundError):
                await client.deref_session_ref(ref)
            assert await client.release_session_ref(ref) is False
    finally:
        await client.close()


async def test_a_router_that_never_saw_a_ref_finds_its_owner(fleet: Fleet) -> None:
    client = await fleet.client()
    other = await start_router(fleet.pools, insecure=True, node_id="router-1")
    try:
        ref = (await client.invoke_sub_workflow("wf", ["gpu.keep"], {"data": "g"})).result_value()["ref"]
        ref_cpu = (await client.invoke_sub_workflow("wf", ["cpu.keep"], {"data": "c"})).result_value()["ref"]
        assert len(other.router.owners) == 0
        second = await BlazenPeerClient.connect(f"http://127.0.0.1:{other.grpc_port}", "caller-2")
        try:
            assert await second.deref_session_ref(ref) == b"g"
            assert await second.deref_session_ref(ref_cpu) == b"c"
            assert len(other.router.owners) == 2  # learnt: the next deref goes straight there
            assert await second.release_session_ref(ref) is True
            assert await second.release_session_ref(ref_cpu) is True
            with pytest.raises(PeerSessionRefNotFoundError) as err:
                await second.deref_session_ref(ref)
            assert f"session ref {ref} not found" in str(err.value)
        finally:
            await second.close()
    finally:
        await client.close()
        await other.stop(grace=0)

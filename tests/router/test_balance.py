"""Per-call balance over a pool's replicas, and retries only where nothing can have run: a replica that
drains or goes away under load costs the callers nothing."""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc
import pytest
from blazen_peer.client import BlazenPeerClient, PeerError

from tests.support.peers import http_get, metric

from .conftest import Fleet, start_fleet, stop_fleet


async def test_400_calls_on_one_channel_spread_over_both_replicas(fleet: Fleet) -> None:
    client = await fleet.client()  # one client, one channel, one HTTP/2 connection to the router
    nodes: Counter[str] = Counter()

    async def worker(n: int) -> None:
        for _ in range(n):
            nodes[(await client.invoke_sub_workflow("wf", ["cpu.parse"])).result_value()["node"]] += 1

    try:
        await asyncio.gather(*(worker(50) for _ in range(8)))
    finally:
        await client.close()
    assert sum(nodes.values()) == 400
    for node in ("cpu-0", "cpu-1"):
        assert 160 <= nodes[node] <= 240, nodes  # each 40-60 %


async def test_a_replica_draining_mid_load_fails_no_call() -> None:
    # As in a pod: SIGTERM -> not ready, calls still admitted for the admit window, then the listeners close
    # (running calls finish within the grace). The router learns "not ready" from Describe within its refresh
    # period, shorter than the window, and stops sending before the listeners go.
    fleet = await start_fleet({"shutdown_admit_secs": 1.0}, pool_refresh_secs=0.2)
    client = await fleet.client()
    served: Counter[str] = Counter()
    failures: list[str] = []
    started = asyncio.Event()
    drained = asyncio.Event()

    async def worker() -> None:
        while not drained.is_set() or sum(served.values()) < 800:
            try:
                resp = await client.invoke_sub_workflow("wf", ["cpu.slow"], {"secs": 0.01})
            except PeerError as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
                continue
            if resp.error is not None:
                failures.append(resp.error)
            else:
                served[resp.result_value()["node"]] += 1
                if sum(served.values()) >= 150:
                    started.set()

    async def drain_one() -> None:
        await started.wait()
        await fleet.cpu[0].stop(grace=5)
        drained.set()

    try:
        await asyncio.gather(*(worker() for _ in range(16)), drain_one())
        assert failures == [], failures[:3]
        assert served["cpu-0"] > 0
        assert served["cpu-1"] > 300, served
        status, body = await http_get(f"http://127.0.0.1:{fleet.router.admin_port}/metrics")
        assert status == 200
        addr = f"127.0.0.1:{fleet.cpu[0].grpc_port}"
        assert metric(body, "blazen_router_replica_up", pool="cpu", replica=addr) == 0
    finally:
        await client.close()
        await stop_fleet(fleet)


async def test_calls_a_draining_replica_refuses_go_to_another(tmp_path) -> None:
    # A draining peer that still holds a session ref keeps its listener open for deref/release but refuses
    # new sub-workflows ("draining", UNAVAILABLE): the router sends those elsewhere, the caller sees nothing.
    fleet = await start_fleet({"shutdown_admit_secs": 0.0})
    client = await fleet.client()
    try:
        kept = None
        while kept is None:  # a ref held by cpu-0
            resp = await client.invoke_sub_workflow("wf", ["cpu.keep"], {"data": "v"})
            if resp.result_value()["node"] == "cpu-0":
                kept = resp.result_value()["ref"]
        stopping = asyncio.ensure_future(fleet.cpu[0].stop(grace=30))
        await asyncio.sleep(0.2)
        nodes: Counter[str] = Counter()
        for _ in range(20):
            nodes[(await client.invoke_sub_workflow("wf", ["cpu.parse"])).result_value()["node"]] += 1
        assert nodes == {"cpu-1": 20}
        addr = f"127.0.0.1:{fleet.cpu[0].grpc_port}"
        retried = next(r for r in fleet.router.pools.pools["cpu"] if r.addr == addr).retries
        assert retried >= 1
        # the ref is still served by its draining owner, then released (which lets it exit)
        assert await client.deref_session_ref(kept) == b"v"
        assert await client.release_session_ref(kept) is True
        await asyncio.wait_for(stopping, 10)
    finally:
        await client.close()
        await stop_fleet(fleet)


async def test_a_replica_that_is_gone_is_skipped_without_failing_a_call() -> None:
    fleet = await start_fleet()
    gone = fleet.cpu[1]
    await gone.stop(grace=0)  # the router has not refreshed: it still lists it
    client = await fleet.client()
    try:
        nodes = Counter(
            [
                (await client.invoke_sub_workflow("wf", ["cpu.parse"])).result_value()["node"]
                for _ in range(40)
            ]
        )
        assert nodes == {"cpu-0": 40}
    finally:
        await client.close()
        await stop_fleet(fleet)


async def test_a_full_replica_is_retried_elsewhere_but_a_started_call_is_never_rerun() -> None:
    # cpu-0 admits one call at a time: a second one is refused RESOURCE_EXHAUSTED before it runs (retried on
    # cpu-1); a call that failed after it was sent (its deadline) is the caller's answer, not re-run.
    fleet = await start_fleet({"max_concurrent_workflows": 1})
    client = await fleet.client()
    try:
        slow = [
            asyncio.ensure_future(client.invoke_sub_workflow("wf", ["cpu.slow"], {"secs": 1.0}))
            for _ in range(2)
        ]
        await asyncio.sleep(0.3)  # one on each replica now, both full
        assert [p.runtime.limiter.in_use for p in fleet.cpu] == [1, 1]
        results = await asyncio.gather(*slow)
        assert sorted(r.result_value()["node"] for r in results) == ["cpu-0", "cpu-1"]
        # both full again: a third call is refused by both before running, and the caller sees the refusal
        slow = [
            asyncio.ensure_future(client.invoke_sub_workflow("wf", ["cpu.slow"], {"secs": 1.0}))
            for _ in range(2)
        ]
        await asyncio.sleep(0.3)
        with pytest.raises(PeerError) as refused:
            await client.invoke_sub_workflow("wf", ["cpu.parse"])
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED.name
        await asyncio.gather(*slow)
        calls = sum(r.calls for r in fleet.router.pools.pools["cpu"])
        assert calls == 2 + 2 + 2  # the refused third call was tried once on each replica, no more
    finally:
        await client.close()
        await stop_fleet(fleet)


async def test_a_stream_refused_before_its_first_frame_goes_to_another_replica() -> None:
    # cpu-0 is kept full by a call that did not come through the router (the router's own in-flight counts
    # cannot see it): streams the router sends there are refused before running and go to cpu-1.
    fleet = await start_fleet({"max_concurrent_workflows": 1})
    direct = await BlazenPeerClient.connect(f"http://127.0.0.1:{fleet.cpu[0].grpc_port}", "direct")
    client = await fleet.client()
    try:
        busy = asyncio.ensure_future(direct.invoke_sub_workflow("wf", ["cpu.slow"], {"secs": 5}))
        while fleet.cpu[0].runtime.limiter.in_use == 0:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        for _ in range(20):
            items = [i async for i in client.stream_sub_workflow_events("wf", ["cpu.parse"])]
            assert items[-1].result_value()["node"] == "cpu-1"
        full = next(r for r in fleet.router.pools.pools["cpu"] if r.addr == fleet.pools["cpu"][0])
        assert full.retries > 0  # each call had even odds of trying cpu-0 first: 20 misses are 1 in 10^6
        busy.cancel()
    finally:
        await client.close()
        await direct.close()
        await stop_fleet(fleet)

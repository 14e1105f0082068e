"""The fleet's callers' certificate (``<fleet>-client-tls``, what the operator gives a BlazenFleet's callers
when its router verifies client certificates) against real peers and a real router on loopback: it reaches
the pools through the router, a run split over two pools included, and a pool refuses it as the router's
identity (RunStep / EndRun). The certificates are issued as the operator's Certificates ask (names, usages)
and the pools told who the router is as the operator tells them (--fleet-router-identity)."""

from __future__ import annotations

import copy
import uuid
from pathlib import Path
from typing import Any

import grpc
from blazen_operator import fleet_spec as fs
from blazen_operator.builders import Fleet, Peer, workload
from blazen_operator.builders import fleet as bf
from blazen_operator.builders import router as br
from blazen_peer import StepRegistry
from blazen_peer.wire.envelope import wrap
from blazen_peer.wire.fleet import EndRunRequest
from blazen_peer.wire.protocol import PATH_END_RUN, PATH_RUN_STEP

from tests.router.test_split_auth import call, run_step, tls
from tests.support.peers import running_peer, start_router, tls_client
from tests.support.pki import Issued, Pki

FLEET = Fleet(
    name="demo",
    namespace="ns",
    uid="u-1",
    spec=fs.parse_spec(
        {
            "image": "img:1",
            "entrypoint": "steps",
            "pools": [{"name": "one", "steps": ["a", "hello"]}, {"name": "two", "steps": ["b"]}],
        }
    ),
)
RAN: list[str] = []


def issued_as(pki: Pki, certificate: dict[str, Any], *, loopback: bool) -> Issued:
    """A leaf of the fleet's CA as cert-manager issues ``certificate`` (its names and usages); ``loopback``
    adds what a test server needs to be reached on 127.0.0.1 (an extra DNS name and IP, no other change)."""
    spec = certificate["spec"]
    return pki.ca.issue(
        spec["commonName"],
        dns=(*spec.get("dnsNames", ()), *(("localhost",) if loopback else ())),
        ips=("127.0.0.1",) if loopback else (),
        server="server auth" in spec["usages"],
        client="client auth" in spec["usages"],
    )


def pool_router_identity(name: str) -> tuple[str, ...]:
    """What the operator tells a pool of FLEET about its router."""
    pool = next(p for p in FLEET.spec.pools if p.name == name)
    body = copy.deepcopy(bf.pool_peer(FLEET, pool))
    body["spec"]["replicas"] = 1
    args = workload.peer_args(Peer.from_body(body))
    return tuple(args[args.index("--fleet-router-identity") + 1].split(","))


def registry() -> StepRegistry:
    reg = StepRegistry()

    @reg.step("a")
    async def a(event: dict, ctx: Any) -> dict:
        RAN.append(f"a:{event.get('who', 'router')}")
        ctx.state["a"] = ctx.node_id
        return {"type": "Mid"}

    @reg.step("hello")
    async def hello(event: dict, ctx: Any) -> dict:
        return {"type": "blazen::StopEvent", "result": ctx.node_id}

    @reg.step("b", accepts=["Mid"])
    async def b(event: dict, ctx: Any) -> dict:
        return {"type": "blazen::StopEvent", "result": [ctx.state["a"], ctx.node_id]}

    return reg


async def test_the_fleet_client_certificate_reaches_the_pools_through_the_router_only(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    caller = issued_as(pki, br.client_certificate(FLEET), loopback=False)
    router = issued_as(pki, br.certificate(FLEET), loopback=True)
    (tmp_path / "router.crt").write_bytes(router.cert_pem)
    (tmp_path / "router.key").write_bytes(router.key_pem)
    router_files = {"tls_cert": str(tmp_path / "router.crt"), "tls_key": str(tmp_path / "router.key")}
    identity = pool_router_identity("one")
    assert identity == pool_router_identity("two") == ("demo.ns.svc",)
    RAN.clear()
    async with (
        running_peer(
            registry(), node_id="p1", steps=["a", "hello"], **tls(pki, fleet_router_identity=identity)
        ) as p1,
        running_peer(registry(), node_id="p2", steps=["b"], **tls(pki, fleet_router_identity=identity)) as p2,
    ):
        # the fleet's callers present it to a pool as if they were the router: refused, nothing runs
        for path, body in (
            (PATH_RUN_STEP, run_step("caller")),
            (PATH_END_RUN, wrap(EndRunRequest(str(uuid.uuid4())).encode())),
        ):
            err = await call(p1.grpc_port, pki, caller, path, body)
            assert isinstance(err, grpc.aio.AioRpcError), path
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err
            assert "demo.ns.svc" in (err.details() or "")
        assert RAN == []

        server = await start_router(
            {"one": [f"127.0.0.1:{p1.grpc_port}"], "two": [f"127.0.0.1:{p2.grpc_port}"]},
            **tls(pki, **router_files),
            pool_tls_cert=router_files["tls_cert"],
            pool_tls_key=router_files["tls_key"],
            pool_server_name="localhost",
        )
        try:
            client = await tls_client(server.grpc_port, pki, "fleet-caller", leaf=caller)
            try:
                one = await client.invoke_sub_workflow("wf", ["hello"])  # one pool: forwarded as it is
                split = await client.invoke_sub_workflow("wf", ["a", "b"])  # two: the router runs each step
            finally:
                await client.close()
        finally:
            await server.stop(grace=0)
    assert one.error is None, one.error
    assert one.result_value() == "p1"
    assert split.error is None, split.error
    assert split.result_value() == ["p1", "p2"]
    assert RAN == ["a:router"]

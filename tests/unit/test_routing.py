"""The router's pure parts: the routing table (pool choice), replica choice, the ref-owner map and the
ref ids read from a response, pool flags, the Describe body, and which refusals are safe to retry."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter

import grpc
import pytest
from blazen_peer import PeerConfig
from blazen_peer.admin.drain import DRAINING_MESSAGE
from blazen_peer.admission import ConcurrencyLimiter
from blazen_peer.cli import build_parser, main
from blazen_peer.config import ROUTER_FLAGS, config_from
from blazen_peer.router import BlazenRouterServer, parse_pools
from blazen_peer.routing.balance import Replica, pick
from blazen_peer.routing.forward import Router, refused_before_running
from blazen_peer.routing.pools import PoolSet
from blazen_peer.routing.refs import RefOwners, response_ref_ids
from blazen_peer.routing.table import PoolView, RoutingTable, parse_pool
from blazen_peer.wire.errors import PeerStatusError, Status
from blazen_peer.wire.fleet import Description, DescriptionError
from blazen_peer.wire.messages import RemoteRefDescriptor, SubWorkflowRequest, SubWorkflowResponse

START = ("blazen::StartEvent",)


def table() -> RoutingTable:
    return RoutingTable(
        [
            PoolView("cpu", {"a": START, "b": START, "both": START}, {"chain": ("a", "b")}),
            PoolView("gpu", {"g": START, "both": START}, {"infer": ("g",)}),
            PoolView("big", {"a": START, "b": START, "g": START}, {}),
        ]
    )


def test_pools_for_step_ids() -> None:
    t = table()
    assert t.pools_for("wf", ["a"]) == ("big", "cpu")
    assert t.pools_for("wf", ["a", "b", "a"]) == ("big", "cpu")
    assert t.pools_for("wf", ["g"]) == ("big", "gpu")
    assert t.pools_for("wf", ["a", "g"]) == ("big",)
    assert t.pools_for("wf", ["both"]) == ("cpu", "gpu")


def test_pools_for_an_empty_step_list_is_by_workflow_name() -> None:
    t = table()
    assert t.pools_for("chain", []) == ("cpu",)
    assert t.pools_for("infer", []) == ("gpu",)
    with pytest.raises(PeerStatusError) as err:
        t.pools_for("nothing", [])
    assert err.value.status is Status.INTERNAL
    assert err.value.message.startswith("workflow build failed:")


def test_unserved_step_ids_are_not_found_and_named() -> None:
    t = table()
    with pytest.raises(PeerStatusError) as err:
        t.pools_for("wf", ["a", "x"])
    assert (err.value.status, err.value.message) == (Status.NOT_FOUND, "unknown step id `x`")
    with pytest.raises(PeerStatusError) as err:
        t.pools_for("wf", ["y", "a", "x", "y"])
    assert err.value.message == "unknown step ids `y`, `x`: no pool serves them"
    with pytest.raises(PeerStatusError) as err:
        RoutingTable([PoolView("cpu", {"a": START}), PoolView("gpu", {"g": START})]).pools_for(
            "wf", ["a", "g"]
        )
    assert err.value.status is Status.NOT_FOUND
    assert err.value.message == "no pool serves all of step ids `a`, `g` (`a` in cpu; `g` in gpu)"
    assert RoutingTable().step_pools == {}


def test_the_answer_for_a_step_list_is_cached_and_bounded() -> None:
    t = table()
    for i in range(3000):
        t.pools_for("wf", ["a"] * (1 + i % 50) + ["b"])
    assert len(t._cache) <= 1024
    assert t.pools_for("wf", ["a", "b"]) == ("big", "cpu")


def test_pick_prefers_the_replica_with_fewer_calls_in_flight() -> None:
    a, b = Replica("p", "a:1"), Replica("p", "b:1")
    a.in_flight = 5
    assert all(pick([a, b], rng=random.Random(i)) is b for i in range(50))


def test_pick_spreads_equal_replicas_evenly() -> None:
    replicas = [Replica("p", f"r{i}:1") for i in range(4)]
    rng = random.Random(7)
    counts = Counter(pick(replicas, rng=rng).addr for _ in range(8000))
    assert all(1700 <= n <= 2300 for n in counts.values()), counts


def test_pick_skips_excluded_and_down_replicas_but_tries_a_down_one_last() -> None:
    a, b, c = Replica("p", "a:1"), Replica("p", "b:1"), Replica("p", "c:1")
    b.down_until = time.monotonic() + 60
    for i in range(30):
        assert pick([a, b, c], exclude=[a], rng=random.Random(i)) is c
    assert pick([a, b, c], exclude=[a, c]) is b  # nothing up is left: better to try than to refuse
    assert pick([a, b, c], exclude=[a, b, c]) is None
    assert pick([]) is None


def test_ref_owner_map_remembers_forgets_and_is_bounded() -> None:
    owners = RefOwners(capacity=3)
    refs = [uuid.uuid4().bytes for _ in range(5)]
    owners.remember(refs[:2], "a:1")
    owners.remember(refs[2:3], "b:1")
    assert owners.owner(refs[0]) == "a:1"
    assert owners.owner(refs[2]) == "b:1"
    owners.remember(refs[0:1], "a:1")  # seen again: most recent
    owners.remember(refs[3:5], "c:1")
    assert len(owners) == 3
    assert owners.owner(refs[1]) is None  # the least recently seen went first
    assert owners.owner(refs[2]) is None
    assert owners.owner(refs[0]) == "a:1"
    owners.forget(refs[0])
    assert owners.owner(refs[0]) is None
    assert len(owners) == 2


def test_response_ref_ids_reads_just_the_ref_ids() -> None:
    ids = [str(uuid.uuid4()) for _ in range(3)]
    resp = SubWorkflowResponse(
        state_json={"k": b'{"v": 1}'},
        result_json=b'{"big": "' + b"x" * 300 + b'"}',
        remote_refs={i: RemoteRefDescriptor("node-ü", "Tag", 1 << 40) for i in ids},
        error=None,
    )
    assert response_ref_ids(resp.encode()) == [uuid.UUID(i).bytes for i in ids]
    assert response_ref_ids(memoryview(resp.encode())) == [uuid.UUID(i).bytes for i in ids]
    assert response_ref_ids(SubWorkflowResponse(result_json=b"null").encode()) == []
    assert response_ref_ids(SubWorkflowResponse(error="boom").encode()) == []
    assert response_ref_ids(resp.encode()[:40]) == []  # truncated: none, no exception
    assert response_ref_ids(b"") == []


def test_parse_pool_flags() -> None:
    assert parse_pool("cpu=10.0.0.1:50051, 10.0.0.2:50051") == ("cpu", ["10.0.0.1:50051", "10.0.0.2:50051"])
    assert parse_pools(("cpu=h:1", "gpu=[::1]:2")) == {"cpu": ["h:1"], "gpu": ["[::1]:2"]}
    for bad in ("cpu", "=h:1", "cpu=", "cpu=h", "cpu=h:port", "cpu=:1"):
        with pytest.raises(ValueError, match="invalid pool"):
            parse_pool(bad)
    with pytest.raises(ValueError, match="given twice"):
        parse_pools(("cpu=h:1", "cpu=h:2"))
    with pytest.raises(ValueError, match="at least one --pool"):
        parse_pools(())


def test_a_router_refuses_an_entrypoint() -> None:
    with pytest.raises(ValueError, match="runs no steps"):
        BlazenRouterServer(config=PeerConfig(pool=("p=h:1",), entrypoint="my_steps"))
    with pytest.raises(ValueError, match=r"one of --pool .* or --fleet NAME"):
        BlazenRouterServer(config=PeerConfig())


def test_description_round_trip_and_tolerance() -> None:
    d = Description("n", {"a": START}, {"wf": ("a",)}, 3, False)
    assert Description.decode(d.encode()) == d
    # a newer peer's extra keys are ignored, missing ones take defaults
    assert Description.decode(b'{"node_id": "x", "future": 1}') == Description("x")
    for bad in (b"", b"[]", b'{"steps": [{"accepts": []}]}', b"\xff"):
        with pytest.raises(DescriptionError):
            Description.decode(bad)


class _Err(grpc.aio.AioRpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def test_only_refusals_before_running_are_retried() -> None:
    full = ConcurrencyLimiter(1).message
    assert refused_before_running(_Err(grpc.StatusCode.RESOURCE_EXHAUSTED, full))
    assert refused_before_running(_Err(grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE))
    assert refused_before_running(
        _Err(
            grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; last error: Connection refused"
        )
    )
    # may have run: never again
    for code, details in (
        (grpc.StatusCode.UNAVAILABLE, "Socket closed"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "session ref limit reached: 3 refs held, the cap is 3"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "all 4 sync step threads are busy"),
        (grpc.StatusCode.CANCELLED, "CANCELLED"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"),
        (grpc.StatusCode.INTERNAL, "boom"),
    ):
        assert not refused_before_running(_Err(code, details))


def test_route_flags_and_env_twins() -> None:
    parser = build_parser()
    args = parser.parse_args(
        ["route", "--pool", "cpu=a:1,b:2", "--pool", "gpu=c:3", "--pool-refresh-secs", "2"]
    )
    cfg = config_from(args, {}, ROUTER_FLAGS)
    assert cfg.pool == ("cpu=a:1,b:2", "gpu=c:3")
    assert cfg.pool_refresh_secs == 2.0
    env = {"BLAZEN_PEER_POOL": "cpu=a:1,b:2; gpu=c:3", "BLAZEN_PEER_ENTRYPOINT": "ignored"}
    cfg = config_from(parser.parse_args(["route"]), env, ROUTER_FLAGS)
    assert parse_pools(cfg.pool) == {"cpu": ["a:1", "b:2"], "gpu": ["c:3"]}
    assert cfg.entrypoint is None  # serve's flags about steps are not the router's
    env = {"BLAZEN_PEER_POOL_TOKEN_FILE": "/hop/token", "BLAZEN_PEER_POOL_TLS_CA": "/hop/ca.crt"}
    cfg = config_from(
        parser.parse_args(["route", "--pool-tls-cert", "c", "--pool-tls-key", "k"]), env, ROUTER_FLAGS
    )
    assert (cfg.pool_tls_cert, cfg.pool_tls_key, cfg.pool_tls_ca) == ("c", "k", "/hop/ca.crt")
    assert cfg.pool_token_file == "/hop/token"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--pool-token-file", "x"])  # the hop is the router's alone
    with pytest.raises(SystemExit):
        parser.parse_args(["route", "--entrypoint", "x"])
    assert {f.attr for f in ROUTER_FLAGS} <= PeerConfig.field_names()


def test_route_without_a_pool_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["route", "--insecure"])
    assert exit_.value.code == 2
    assert "one of --pool NAME=HOST:PORT[,HOST:PORT...] or --fleet NAME" in capsys.readouterr().err


def test_pick_prefers_the_replica_holding_the_run_unless_much_busier() -> None:
    a, b, c = Replica("p", "a:1"), Replica("p", "b:1"), Replica("p", "c:1")
    a.in_flight = 2  # AFFINITY_SLACK more than the others
    assert all(pick([a, b, c], rng=random.Random(i), prefer=a) is a for i in range(50))
    a.in_flight = 3
    assert all(pick([a, b, c], rng=random.Random(i), prefer=a) is not a for i in range(50))
    a.in_flight = 0
    assert pick([a, b, c], exclude=[a], prefer=a) is not a  # it refused this call already


async def test_a_pool_replaced_by_replicas_not_yet_described_keeps_routing_its_steps() -> None:
    """A rolling update can leave a pool with only pods that joined moments ago: until they describe
    themselves, the pool still serves what it served (Kubernetes calls them ready), not NOT_FOUND."""
    # ports nothing listens on: the joined replicas' Describe fails, as a pod still starting would
    pools = PoolSet({"cpu": ["127.0.0.1:9"]}, describe_timeout=0.5)
    old = pools.pools["cpu"][0]
    old.description = Description("old", {"examples::echo": ()}, {"wf": ("examples::echo",)})
    old.live = True
    pools.update({"cpu": ["127.0.0.1:9"]})
    assert pools.table.pools_for("", ["examples::echo"]) == ("cpu",)
    try:
        pools.update({"cpu": ["127.0.0.1:1"]})
        assert pools.table.pools_for("", ["examples::echo"]) == ("cpu",)
        assert pools.table.pools_for("wf", []) == ("cpu",)
        await asyncio.gather(*pools._background)  # their Describe failed: still the pool's last view
        assert pools.table.pools_for("", ["examples::echo"]) == ("cpu",)
        # no replica at all for a moment: the pool still serves the step, it is just unreachable
        pools.update({"cpu": []})
        with pytest.raises(PeerStatusError, match="pool cpu has no ready replica") as err:
            Router(pools).candidates(SubWorkflowRequest("", ["examples::echo"]))
        assert err.value.status == Status.UNAVAILABLE
        # an unknown step is still NOT_FOUND, and a pool removed takes its steps with it
        with pytest.raises(PeerStatusError, match="unknown step id `other`"):
            pools.table.pools_for("", ["other"])
        pools.update({})
        with pytest.raises(PeerStatusError, match="unknown step id `examples::echo`"):
            pools.table.pools_for("", ["examples::echo"])
    finally:
        await pools.close()

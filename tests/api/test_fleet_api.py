"""BlazenFleet against a real kube-apiserver + etcd + kube-controller-manager, the operator under the Helm
chart's RBAC (tests/api/conftest.py): schema validation, pools as BlazenPeers and the router's children with
owner references, status from the pools' reports, hand scaling that the fleet does not undo, pruning and
garbage collection."""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from blazen_operator import kinds
from blazen_operator.apply import Api, ApiError, path_for
from blazen_operator.fleet_reconcile import FleetReconciler

from tests.api.test_operator_api import BP, FLEET_VERBS, _mark_pods_ready, cond, get, merge_patch
from tests.support.controlplane import eventually

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.api

SPEC: dict[str, Any] = {
    "image": "reg.local/peer:1",
    "entrypoint": "blazen_examples.steps",
    "pools": [
        {"name": "cpu", "replicas": 2, "steps": ["examples::echo", "examples::tokenize"]},
        {"name": "gpu", "steps": ["examples::gpu_info"], "hardware": {"gpu": 1}},
    ],
}


def fleet_manifest(name: str, namespace: str, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": BP,
        "kind": "BlazenFleet",
        "metadata": {"name": name, "namespace": namespace, "labels": {"team": "ml"}},
        "spec": copy.deepcopy(spec or SPEC),
    }


def create_fleet(api: Api, body: dict[str, Any], **query: str) -> dict[str, Any]:
    return api.request(
        "POST", path_for(BP, "BlazenFleet", body["metadata"]["namespace"]), body=body, query=query or None
    )


def fleet(api: Api, ns: str, name: str = "demo") -> dict[str, Any]:
    out = api.get(BP, "BlazenFleet", ns, name)
    assert out is not None
    return out


# ------------------------------------------------------------------------------------------------ schema


def _with(path: str, value: Any) -> dict[str, Any]:
    spec = copy.deepcopy(SPEC)
    node: Any = spec
    keys = path.split(".")
    for key in keys[:-1]:
        node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
    if value is None:
        node.pop(keys[-1], None)
    else:
        node[keys[-1]] = value
    return spec


@pytest.mark.parametrize(
    ("spec", "name", "expected"),
    [
        (_with("pools", []), "demo", "spec.pools"),
        (_with("pools", [{"name": "cpu"}, {"name": "cpu"}]), "demo", "spec.pools[1]"),
        (_with("pools", [{"name": "router"}]), "demo", "spec.pools"),
        (_with("pools", [{"name": "client"}]), "demo", "spec.pools"),
        (_with("router", {"maxConcurrentWorkflows": -1}), "demo", "spec.router.maxConcurrentWorkflows"),
        (_with("pools", [{"name": "Bad_Name"}]), "demo", "spec.pools[0].name"),
        (_with("image", None), "demo", "spec.image"),
        (_with("entrypoint", None), "demo", "spec.entrypoint"),
        (
            _with("pools", [{"name": "a", "image": "x:1"}]) | {"image": None},
            "demo",
            "spec.router.image",
        ),
        (_with("tls", {"enabled": False}), "demo", "spec.auth.tokenSecretRef"),
        (
            _with("router", {"plaintextGrpc": {"enabled": True}}),
            "demo",
            "spec.router.plaintextGrpc.allowedFrom",
        ),
        (_with("router", {"http": {"corsOrigins": ["https://a.example"]}}), "demo", "spec.router.http.auth"),
        (_with("router", {"http": {"auth": "Token"}}), "demo", "spec.router.http.auth"),
        (_with("pools.0.replicas", -1), "demo", "spec.pools[0].replicas"),
        (_with("pools.0.steps", ["a b"]), "demo", "spec.pools[0].steps[0]"),
        (_with("pools.1.hardware", {"gpu": 65}), "demo", "spec.pools[1].hardware.gpu"),
        (SPEC, "f" * 49, "spec.pools"),
        (SPEC, "f" * 51, "metadata.name"),
    ],
)
def test_invalid_fleets_are_rejected_with_field_messages(api, namespace, spec, name, expected):
    spec = {k: v for k, v in spec.items() if v is not None}
    with pytest.raises(ApiError) as err:
        create_fleet(api, fleet_manifest(name, namespace, spec))
    assert err.value.status == 422, err.value
    assert expected in err.value.message, err.value.message


def test_a_pool_cannot_set_the_fleet_wide_tls(api, namespace):
    """tls and auth are the fleet's (the router's identity and token must be every pool's): a pool's is an
    unknown field, refused under strict validation."""
    spec = _with("pools.0.tls", {"enabled": False})
    with pytest.raises(ApiError) as err:
        create_fleet(api, fleet_manifest("demo", namespace, spec), fieldValidation="Strict")
    assert 'unknown field "spec.pools[0].tls"' in err.value.message, err.value.message


def test_the_example_fleet_passes_the_api_servers_validation(api, namespace):
    (doc,) = [d for d in yaml.safe_load_all((ROOT / "examples" / "fleet.yaml").read_text()) if d]
    doc["metadata"]["namespace"] = namespace
    create_fleet(api, doc, dryRun="All", fieldValidation="Strict")


# ------------------------------------------------------------------------------------------------ reconcile


def _owned_by(obj: dict[str, Any], uid: str) -> bool:
    refs = obj["metadata"].get("ownerReferences") or []
    return any(r["uid"] == uid and r.get("controller") and r.get("blockOwnerDeletion") for r in refs)


ROUTER_CHILDREN = [
    ("Deployment", "demo-router", "apps/v1"),
    ("Service", "demo", "v1"),
    ("ServiceAccount", "demo-router", "v1"),
    ("Role", "demo-router", "rbac.authorization.k8s.io/v1"),
    ("RoleBinding", "demo-router", "rbac.authorization.k8s.io/v1"),
    ("Certificate", "demo-router-tls", "cert-manager.io/v1"),
    ("Secret", "demo-router-tls", "v1"),
    # the fleet's callers' client certificate (the router verifies client certificates)
    ("Certificate", "demo-client-tls", "cert-manager.io/v1"),
    ("Secret", "demo-client-tls", "v1"),
    ("PodDisruptionBudget", "demo-router", "policy/v1"),
    ("NetworkPolicy", "demo-router", "networking.k8s.io/v1"),
]


def test_a_fleet_makes_its_pools_and_router_owned_by_it(api, operator, namespace):
    created = create_fleet(
        api, fleet_manifest("demo", namespace, {**SPEC, "router": {"maxConcurrentWorkflows": 200}})
    )
    uid = created["metadata"]["uid"]
    for pool in ("cpu", "gpu"):
        bp = eventually(lambda pool=pool: get(api, "BlazenPeer", namespace, f"demo-{pool}"), what=pool)
        assert _owned_by(bp, uid)
        assert bp["metadata"]["labels"]["blazen.dev/fleet"] == "demo"
        assert bp["metadata"]["labels"]["blazen.dev/pool"] == pool
        assert bp["metadata"]["labels"]["team"] == "ml"
    assert get(api, "BlazenPeer", namespace, "demo-cpu")["spec"]["replicas"] == 2
    assert get(api, "BlazenPeer", namespace, "demo-gpu")["spec"]["hardware"]["gpu"] == 1
    for kind, name, version in ROUTER_CHILDREN:
        obj = eventually(lambda k=kind, n=name, v=version: api.get(v, k, namespace, n), what=f"{kind} {name}")
        assert _owned_by(obj, uid), (kind, name)
    # the pools are BlazenPeers: their own children, by the BlazenPeer builders, labelled for the router
    for svc in ("demo-cpu", "demo-cpu-peers"):
        obj = eventually(lambda s=svc: get(api, "Service", namespace, s), what=svc)
        assert obj["metadata"]["labels"]["blazen.dev/fleet"] == "demo"
        assert obj["metadata"]["labels"]["blazen.dev/pool"] == "cpu"
    dep = eventually(lambda: get(api, "Deployment", namespace, "demo-gpu"), what="gpu pool deployment")
    gpu_pod = dep["spec"]["template"]["spec"]
    assert gpu_pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    cert = eventually(lambda: get(api, "Certificate", namespace, "demo-cpu-tls"), what="pool certificate")
    assert f"demo-cpu.{namespace}.svc" in cert["spec"]["dnsNames"]  # what the router checks (--fleet)
    role = api.get("rbac.authorization.k8s.io/v1", "Role", namespace, "demo-router")
    assert {r["resources"][0]: r["verbs"] for r in role["rules"]} == {
        "blazenpeers": ["get", "list", "watch"],
        "endpointslices": ["get", "list", "watch"],
    }
    router = api.get("apps/v1", "Deployment", namespace, "demo-router")
    args = router["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:3] == ["route", "--fleet", "demo"]
    assert args[args.index("--max-concurrent-workflows") + 1] == "200"
    # the callers' certificate: client auth only, the router's issuer
    client = get(api, "Certificate", namespace, "demo-client-tls")
    assert "server auth" not in client["spec"]["usages"]
    assert (
        client["spec"]["issuerRef"]
        == get(api, "Certificate", namespace, "demo-router-tls")["spec"]["issuerRef"]
    )
    # the router's endpoint and the callers' Secret are in the status from the first pass
    status = eventually(lambda: fleet(api, namespace).get("status"), what="fleet status")
    assert status["endpoints"]["grpc"] == f"demo.{namespace}.svc:50051"
    assert status["certificate"]["clientSecretName"] == "demo-client-tls"


@pytest.fixture
def info_servers() -> Iterator[dict[str, int]]:
    """Two real HTTP servers on loopback answering /v1/info as the pods of each pool would: the cpu pool's
    serve what it was told, the gpu pool's not examples::count. Pool name -> port."""
    answers = {"cpu": ["examples::echo", "examples::tokenize"], "gpu": ["examples::gpu_info"]}
    servers = {}
    for pool, steps in answers.items():
        body = json.dumps({"steps": steps, "session_refs": 0}).encode()

        class Info(BaseHTTPRequestHandler):
            payload = body

            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(self.payload)))
                self.end_headers()
                self.wfile.write(self.payload)

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Info)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers[pool] = server
    try:
        yield {pool: srv.server_address[1] for pool, srv in servers.items()}
    finally:
        for srv in servers.values():
            srv.shutdown()
            srv.server_close()


def test_status_routes_steps_and_names_the_unserved_ones(api, operator, namespace, info_servers):
    spec = copy.deepcopy(SPEC)
    spec["pools"][0]["ports"] = {"admin": info_servers["cpu"]}
    spec["pools"][1]["ports"] = {"admin": info_servers["gpu"]}
    spec["pools"][1]["steps"] = ["examples::gpu_info", "examples::count"]
    spec["router"] = {"replicas": 1}
    create_fleet(api, fleet_manifest("demo", namespace, spec))

    def status() -> dict[str, Any]:
        return fleet(api, namespace).get("status") or {}

    # not routable while nothing is ready
    eventually(lambda: cond(fleet(api, namespace), "Routable") is not None, what="Routable condition")
    assert cond(fleet(api, namespace), "Routable")["status"] == "False"
    # four pods: cpu 2, gpu 1, router 1; the kubelet's part played by the test
    eventually(lambda: len(api.collect("v1", "Pod", namespace).items) == 4, what="four pods")
    _mark_pods_ready(
        api,
        namespace,
        ips={p["metadata"]["name"]: "127.0.0.1" for p in api.collect("v1", "Pod", namespace).items},
    )

    def routed() -> bool:
        st = status()
        assert st.get("routes") == {
            "examples::echo": ["cpu"],
            "examples::gpu_info": ["gpu"],
            "examples::tokenize": ["cpu"],
        }, st
        # one ready pod of a pool already gives its routes; the pool's count follows its BlazenPeer's status
        ready = {p["name"]: (p["replicas"], p.get("readyReplicas")) for p in st["pools"]}
        return ready == {"cpu": (2, 2), "gpu": (1, 1)}

    eventually(routed, timeout=60, what="routing table from the pools' served steps, every pod ready")
    st = status()
    pools = {p["name"]: p for p in st["pools"]}
    assert pools["gpu"]["unservedSteps"] == ["examples::count"]
    assert "unservedSteps" not in pools["cpu"]
    assert st["readyPools"] == "2/2"
    f = fleet(api, namespace)
    assert cond(f, "Degraded")["reason"] == "StepsNotServed"
    assert "gpu: examples::count" in cond(f, "Degraded")["message"]
    eventually(lambda: cond(fleet(api, namespace), "Routable")["status"] == "True", what="routable")
    reasons = {
        e["reason"]
        for e in api.collect("v1", "Event", namespace).items
        if e["involvedObject"]["kind"] == "BlazenFleet" and e["involvedObject"]["name"] == "demo"
    }
    assert {"StepsNotServed", "Routable"} <= reasons, reasons


def _scale(api: Api, namespace: str, name: str, replicas: int) -> None:
    """What `kubectl scale bp/<name>` and an HPA do: the scale subresource."""
    merge_patch(api, "BlazenPeer", namespace, name, {"spec": {"replicas": replicas}}, "scale")


def test_a_pool_scaled_on_its_own_stays_scaled_until_the_fleet_changes_its_replicas(api, operator, namespace):
    create_fleet(api, fleet_manifest("demo", namespace))
    eventually(lambda: get(api, "BlazenPeer", namespace, "demo-cpu"), what="cpu pool")
    eventually(lambda: get(api, "Deployment", namespace, "demo-cpu")["spec"]["replicas"] == 2, what="2 pods")
    _scale(api, namespace, "demo-cpu", 5)
    eventually(lambda: get(api, "Deployment", namespace, "demo-cpu")["spec"]["replicas"] == 5, what="scaled")
    # another fleet change makes a full pass, which applies the pool; the pool keeps its 5
    merge_patch(api, "BlazenFleet", namespace, "demo", {"spec": {"env": [{"name": "A", "value": "1"}]}})
    eventually(
        lambda: (
            get(api, "BlazenPeer", namespace, "demo-cpu")["spec"].get("env") == [{"name": "A", "value": "1"}]
        ),
        what="the fleet's env reached the pool",
    )
    # ... and the resync passes after it (every 3 s in these tests): a must-not-happen needs a wait
    time.sleep(7)
    assert get(api, "BlazenPeer", namespace, "demo-cpu")["spec"]["replicas"] == 5
    # the fleet's own value changes: the fleet writes it
    pools = copy.deepcopy(SPEC["pools"])
    pools[0]["replicas"] = 3
    merge_patch(api, "BlazenFleet", namespace, "demo", {"spec": {"pools": pools}})
    eventually(
        lambda: get(api, "BlazenPeer", namespace, "demo-cpu")["spec"]["replicas"] == 3, what="fleet's 3"
    )
    # a pool's spec edited by hand is put back (only replicas is the scaler's)
    merge_patch(api, "BlazenPeer", namespace, "demo-cpu", {"spec": {"image": "other:2"}})
    eventually(
        lambda: get(api, "BlazenPeer", namespace, "demo-cpu")["spec"]["image"] == "reg.local/peer:1",
        what="drift reverted",
    )


def test_removed_pool_is_pruned_and_deletion_cascades(api, operator, operator_calls, namespace):
    operator_calls.calls.clear()
    created = create_fleet(api, fleet_manifest("demo", namespace))
    eventually(lambda: get(api, "BlazenPeer", namespace, "demo-gpu"), what="gpu pool")
    eventually(lambda: fleet(api, namespace).get("status"), what="status")
    merge_patch(api, "BlazenFleet", namespace, "demo", {"spec": {"pools": [SPEC["pools"][0]]}})
    eventually(lambda: get(api, "BlazenPeer", namespace, "demo-gpu") is None, what="gpu pool pruned")
    assert get(api, "BlazenPeer", namespace, "demo-cpu") is not None
    # token-only: the router verifies no client certificate, the callers' certificate and Secret go
    merge_patch(
        api,
        "BlazenFleet",
        namespace,
        "demo",
        {"spec": {"tls": {"enabled": False}, "auth": {"tokenSecretRef": {"name": "tok"}}}},
    )
    for kind, version in (("Certificate", "cert-manager.io/v1"), ("Secret", "v1")):
        eventually(
            lambda k=kind, v=version: api.get(v, k, namespace, "demo-client-tls") is None,
            what=f"{kind} demo-client-tls pruned",
        )
    eventually(
        lambda: "certificate" not in fleet(api, namespace)["status"], what="no certificate in the status"
    )
    # a pool deleted by hand comes back
    api.delete(BP, "BlazenPeer", namespace, "demo-cpu")
    eventually(
        lambda: (
            (bp := get(api, "BlazenPeer", namespace, "demo-cpu")) is not None
            and bp["metadata"]["uid"] != created["metadata"]["uid"]
            and not bp["metadata"].get("deletionTimestamp")
        ),
        what="pool recreated",
    )
    used = {c for c in operator_calls.calls if c in FLEET_VERBS}
    assert used == FLEET_VERBS, sorted(FLEET_VERBS - used)
    # the fleet goes: the garbage collector takes everything it owned, pools' children included
    api.delete(BP, "BlazenFleet", namespace, "demo")

    def all_gone() -> bool:
        left = [n for k, n, v in ROUTER_CHILDREN if api.get(v, k, namespace, n) is not None]
        left += [n for n in ("demo-cpu",) if get(api, "BlazenPeer", namespace, n) is not None]
        left += [n for n in ("demo-cpu",) if get(api, "Deployment", namespace, n) is not None]
        assert not left, left
        return True

    eventually(all_gone, timeout=90, what="garbage collection of the fleet's objects")


def test_a_pass_over_an_unchanged_fleet_writes_nothing_and_drift_is_reverted(
    api, operator, namespace, namespace_requests, fleet_pass_requests
):
    """A BlazenFleet's passes (the resync every 3 s, its pools' and children's events) write nothing once it
    has settled, as a BlazenPeer's do: not its pools, not the router's children or certificate stub, not its
    status. What someone edits by hand is still put back."""
    create_fleet(api, fleet_manifest("demo", namespace))
    for kind, name, version in ROUTER_CHILDREN:
        eventually(lambda k=kind, n=name, v=version: api.get(v, k, namespace, n), what=f"{kind} {name}")
    eventually(lambda: cond(fleet(api, namespace), "Ready") is not None, what="fleet status")
    window = 3 * operator.resync_seconds + 1
    namespace_requests.assert_passes_write_nothing("/blazenfleets/demo", window=window)
    _assert_passes_list_only_router_pods(fleet_pass_requests, namespace, window)

    # drift: the router's Service port, the stub's labels and a pool's spec, each edited by hand, come back
    svc = get(api, "Service", namespace, "demo")
    ports = copy.deepcopy(svc["spec"]["ports"])
    ports[0]["port"] = 1234
    merge_patch(api, "Service", namespace, "demo", {"spec": {"ports": ports}}, api_version="v1")
    unlabel = {"metadata": {"labels": {"blazen.dev/fleet": None}}}
    merge_patch(api, "Secret", namespace, "demo-router-tls", unlabel, api_version="v1")
    merge_patch(api, "BlazenPeer", namespace, "demo-gpu", {"spec": {"image": "other:2"}})
    eventually(lambda: get(api, "Service", namespace, "demo")["spec"]["ports"] == svc["spec"]["ports"])
    eventually(
        lambda: (
            get(api, "Secret", namespace, "demo-router-tls")["metadata"]["labels"]["blazen.dev/fleet"]
            == "demo"
        ),
        what="stub label back",
    )
    eventually(lambda: get(api, "BlazenPeer", namespace, "demo-gpu")["spec"]["image"] == SPEC["image"])
    # ... and the passes are quiet again
    namespace_requests.assert_passes_write_nothing("/blazenfleets/demo", window=window)
    _assert_passes_list_only_router_pods(fleet_pass_requests, namespace, window)


@pytest.fixture
def fleet_pass_requests(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, str, str]]:
    """The requests the operator sends from within a BlazenFleet pass (in its worker thread), timed."""
    calls: list[tuple[float, str, str]] = []
    inside = threading.local()
    reconcile, request = FleetReconciler.reconcile, Api.request

    def in_pass(self: FleetReconciler, namespace: str, name: str) -> Any:
        inside.on = True
        try:
            return reconcile(self, namespace, name)
        finally:
            inside.on = False

    def recorded(self: Api, method: str, path: str, **kw: Any) -> dict[str, Any]:
        if getattr(inside, "on", False):
            calls.append((time.monotonic(), method, path.split("?")[0]))
        return request(self, method, path, **kw)

    monkeypatch.setattr(FleetReconciler, "reconcile", in_pass)
    monkeypatch.setattr(Api, "request", recorded)
    return calls


def _assert_passes_list_only_router_pods(
    calls: list[tuple[float, str, str]], namespace: str, window: float
) -> None:
    """Over the last ``window`` (>= 3 fleet passes, as assert_passes_write_nothing just found), the fleet's
    passes listed nothing but the router's pods (observe_pods: at most once per resync period): its pools
    and children, the pruned ones included, come from the child cache the watches feed."""
    since = time.monotonic() - window
    recent = [(m, p) for t, m, p in calls if t >= since]
    passes = [p for m, p in recent if m == "GET" and p.endswith("/blazenfleets/demo")]
    collections = {path_for(k.api_version, k.kind, namespace) for k in kinds.KINDS if not k.cluster_scoped}
    lists = {p for m, p in recent if m == "GET" and p in collections}
    assert len(passes) >= 2, passes
    assert lists <= {path_for("v1", "Pod", namespace)}, lists

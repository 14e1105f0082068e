"""BlazenFleet: the spec models (built from the BlazenPeer's), the pool and router builders, and the status,
all pure functions."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from blazen_operator import crdgen, kinds, reconcile
from blazen_operator import fleet_spec as fs
from blazen_operator import fleet_status as fst
from blazen_operator import spec as s
from blazen_operator import status as st
from blazen_operator.builders import Fleet, Peer, certs, desired, router_desired, workload
from blazen_operator.builders import fleet as bf
from blazen_operator.builders import router as br
from blazen_operator.builders.common import OperatorIdentity, labels
from pydantic import ValidationError

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fleet.yaml"
BASE: dict[str, Any] = {
    "image": "img:1",
    "entrypoint": "steps.mod",
    "pools": [
        {"name": "cpu", "replicas": 2, "steps": ["a", "b"]},
        {"name": "gpu", "steps": ["g"], "hardware": {"gpu": 1}, "image": "img:gpu"},
    ],
}


def fleet(spec: dict[str, Any] | None = None, **kw: Any) -> Fleet:
    return Fleet(
        name="demo", namespace="ns", uid="u-1", spec=fs.parse_spec(copy.deepcopy(spec or BASE)), **kw
    )


def pool(f: Fleet, name: str) -> fs.FleetPool:
    return next(p for p in f.spec.pools if p.name == name)


# ------------------------------------------------------------------------------------------------ spec


def test_every_inherited_field_is_the_blazenpeer_field_made_optional() -> None:
    """One definition per field: the fleet's and the pools' copies have the BlazenPeer field's schema."""
    peer = crdgen.model_schema(s.BlazenPeerSpec)["properties"]
    for model in (fs.BlazenFleetSpec, fs.FleetPool):
        props = crdgen.model_schema(model)["properties"]
        for name in fs.INHERITED:
            alias = s.BlazenPeerSpec.model_fields[name].alias or name
            want = {k: v for k, v in peer[alias].items() if k != "default"}
            assert props[alias] == want, (model.__name__, alias)
            assert "default" not in props[alias], "an inherited field must not be defaulted at fleet level"
    # every BlazenPeer field is inherited, fleet-wide (tls, auth) or the pool's own (replicas)
    assert set(fs.INHERITED) | {"tls", "auth", "replicas"} == set(s.BlazenPeerSpec.model_fields)
    assert not {"tls", "auth"} & set(fs.FleetPool.model_fields)


def test_router_fields_are_the_blazenpeer_fields() -> None:
    peer = crdgen.model_schema(s.BlazenPeerSpec)["properties"]
    router = crdgen.model_schema(fs.FleetRouter)["properties"]
    for alias in ("http", "ports", "plaintextGrpc", "networkPolicy", "pod", "probes", "resources"):
        assert router[alias] == peer[alias], alias


def test_pool_names_unique_and_not_router() -> None:
    spec = copy.deepcopy(BASE)
    spec["pools"].append({"name": "cpu"})
    with pytest.raises(ValidationError, match="unique"):
        fs.parse_spec(spec)
    for reserved in ("router", "client"):  # <fleet>-router, <fleet>-client-tls are the fleet's
        spec["pools"][-1] = {"name": reserved}
        with pytest.raises(ValidationError, match="reserved"):
            fs.parse_spec(spec)
    with pytest.raises(ValidationError, match="pools"):
        fs.parse_spec({**BASE, "pools": []})


def test_crd_lists_pools_as_a_map_keyed_by_name() -> None:
    crd = crdgen.build_fleet_crd()
    pools = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"][
        "pools"
    ]
    assert pools["x-kubernetes-list-type"] == "map"
    assert pools["x-kubernetes-list-map-keys"] == ["name"]
    assert pools["minItems"] == 1
    assert pools["items"]["properties"]["name"]["pattern"] == fs.POOL_NAME_PATTERN
    assert crd["spec"]["names"]["shortNames"] == ["bf"]


# ------------------------------------------------------------------------------------------------ pools


def test_pool_overrides_the_fleet_field_by_field() -> None:
    f = fleet({**BASE, "env": [{"name": "A", "value": "1"}], "pod": {"terminationGracePeriodSeconds": 60}})
    cpu, gpu = bf.pool_spec(f, pool(f, "cpu")), bf.pool_spec(f, pool(f, "gpu"))
    assert (cpu.image, gpu.image) == ("img:1", "img:gpu")
    assert (cpu.steps, gpu.steps) == (["a", "b"], ["g"])
    assert (cpu.hardware.gpu, gpu.hardware.gpu) == (0, 1)
    assert cpu.env == gpu.env == [s.EnvVar(name="A", value="1")]
    assert cpu.pod.termination_grace_period_seconds == 60
    assert (cpu.replicas, gpu.replicas) == (2, 1)


def test_pool_is_a_blazenpeer_owned_and_labelled_by_the_fleet_without_replicas() -> None:
    f = fleet()
    bp = bf.pool_peer(f, pool(f, "cpu"))
    assert (bp["kind"], bp["metadata"]["name"]) == ("BlazenPeer", "demo-cpu")
    (ref,) = bp["metadata"]["ownerReferences"]
    assert ref == {
        "apiVersion": "blazen.dev/v1alpha1",
        "kind": "BlazenFleet",
        "name": "demo",
        "uid": "u-1",
        "controller": True,
        "blockOwnerDeletion": True,
    }
    assert bp["metadata"]["labels"]["blazen.dev/fleet"] == "demo"
    assert bp["metadata"]["labels"]["blazen.dev/pool"] == "cpu"
    assert "replicas" not in bp["spec"], "spec.replicas is written apart, so scaling the pool is not undone"
    s.parse_spec(bp["spec"])  # a valid BlazenPeer spec


def test_pool_children_carry_the_fleet_and_pool_labels_only() -> None:
    """Both Services (and so their EndpointSlices) carry blazen.dev/fleet and blazen.dev/pool; no other
    blazen.dev/ label of the BlazenPeer is passed on."""
    f = fleet()
    bp = bf.pool_peer(f, pool(f, "cpu"))
    bp["metadata"]["labels"]["blazen.dev/other"] = "x"
    bp["spec"]["replicas"] = 2
    peer = Peer.from_body(bp)
    services = [c.manifest for c in desired(peer) if c.manifest["kind"] == "Service"]
    assert [m["metadata"]["name"] for m in services] == ["demo-cpu", "demo-cpu-peers"]
    for m in services:
        assert m["metadata"]["labels"]["blazen.dev/fleet"] == "demo"
        assert m["metadata"]["labels"]["blazen.dev/pool"] == "cpu"
        assert "blazen.dev/other" not in m["metadata"]["labels"]
    # a standalone BlazenPeer's children get neither
    alone = Peer(name="p", namespace="ns", spec=s.parse_spec({"image": "i", "entrypoint": "m"}))
    assert not {k for k in labels(alone) if k.startswith("blazen.dev/") and k != "blazen.dev/peer"}


def test_pool_certificates_carry_the_name_the_router_checks() -> None:
    """With --fleet the router checks each pool's certificate for <peer>.<namespace>.svc (its own default):
    the operator passes no --pool-server-name, which would replace it with one name for every pool."""
    f = fleet()
    for name in ("cpu", "gpu"):
        bp = bf.pool_peer(f, pool(f, name))
        bp["spec"]["replicas"] = 1
        assert f"demo-{name}.ns.svc" in certs.dns_names(Peer.from_body(bp))
    assert "--pool-server-name" not in br.router_args(f, br.router_peer(f))


def test_router_is_added_to_a_pool_allowed_from_list_only_when_it_has_one() -> None:
    spec = copy.deepcopy(BASE)
    spec["pools"][0]["networkPolicy"] = {"allowedFrom": [{"podSelector": {"matchLabels": {"app": "x"}}}]}
    f = fleet(spec)
    allowed = bf.pool_spec(f, pool(f, "cpu")).network_policy.allowed_from
    assert [a.pod_selector for a in allowed] == [
        {"matchLabels": {"app": "x"}},
        {"matchLabels": {"app.kubernetes.io/name": "blazen-router", "app.kubernetes.io/instance": "demo"}},
    ]
    assert bf.pool_spec(f, pool(f, "gpu")).network_policy.allowed_from == []


def test_replicas_are_written_at_creation_and_when_the_fleet_value_changes() -> None:
    f = fleet()
    cpu = pool(f, "cpu")
    assert bf.replicas_due(f, cpu, None)
    patch = bf.replicas_patch(f, cpu)
    assert patch["spec"] == {"replicas": 2}
    assert patch["metadata"]["annotations"] == {bf.FLEET_REPLICAS_ANNOTATION: "2"}
    # scaled by hand to 5 after the fleet wrote 2: not due
    live = {"metadata": {"annotations": {bf.FLEET_REPLICAS_ANNOTATION: "2"}}, "spec": {"replicas": 5}}
    assert not bf.replicas_due(f, cpu, live)
    # the fleet now says 3: due
    spec = copy.deepcopy(BASE)
    spec["pools"][0]["replicas"] = 3
    f3 = fleet(spec)
    assert bf.replicas_due(f3, pool(f3, "cpu"), live)


# ------------------------------------------------------------------------------------------------ router


def objects(f: Fleet) -> dict[tuple[str, str], dict[str, Any]]:
    return {(c.manifest["kind"], c.manifest["metadata"]["name"]): c.manifest for c in router_desired(f)}


def test_router_children_names_and_ownership() -> None:
    f = fleet(**{"operator": OperatorIdentity("ops", (("app", "op"),))})
    got = objects(f)
    assert sorted(got) == [
        ("Certificate", "demo-client-tls"),
        ("Certificate", "demo-router-tls"),
        ("Deployment", "demo-router"),
        ("NetworkPolicy", "demo-router"),
        ("PodDisruptionBudget", "demo-router"),
        ("Role", "demo-router"),
        ("RoleBinding", "demo-router"),
        ("Secret", "demo-client-tls"),
        ("Secret", "demo-router-tls"),
        ("Service", "demo"),
        ("ServiceAccount", "demo-router"),
    ]
    for (_, name), m in got.items():
        (ref,) = m["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["uid"], ref["controller"]) == ("BlazenFleet", "u-1", True)
        assert m["metadata"]["labels"]["blazen.dev/fleet"] == "demo"
        # the callers' certificate is the fleet's, not the router's
        component = m["metadata"]["labels"].get("blazen.dev/component")
        assert component == (None if name == "demo-client-tls" else "router"), name


def test_router_role_is_read_only_discovery() -> None:
    role = objects(fleet())[("Role", "demo-router")]
    assert role["rules"] == [
        {"apiGroups": ["blazen.dev"], "resources": ["blazenpeers"], "verbs": ["get", "list", "watch"]},
        {
            "apiGroups": ["discovery.k8s.io"],
            "resources": ["endpointslices"],
            "verbs": ["get", "list", "watch"],
        },
    ]
    # RBAC escalation: the operator may grant only what it holds itself
    held = {(g, r): set(v) for g, r, v in kinds.rbac_rules(cluster_scoped=False)}
    for rule in role["rules"]:
        for res in rule["resources"]:
            assert set(rule["verbs"]) <= held[(rule["apiGroups"][0], res)], res


def test_router_certificate_is_server_and_client_identity() -> None:
    cert = objects(fleet())[("Certificate", "demo-router-tls")]
    assert {"server auth", "client auth"} <= set(cert["spec"]["usages"])
    assert "demo.ns.svc" in cert["spec"]["dnsNames"]
    assert cert["spec"]["issuerRef"] == {"name": "blazen-ca", "kind": "Issuer", "group": "cert-manager.io"}


def test_the_fleet_gives_its_callers_a_client_certificate_of_the_routers_issuer() -> None:
    """What a standalone BlazenPeer's <peer>-client-tls is, for the fleet: client auth only, the router's
    issuer, its Secret pre-created as an owned stub (garbage-collected with the fleet), named in the status.
    It carries no DNS name, so it is never the router identity the pools trust (a DNS name of the
    router's own certificate)."""
    f = fleet()
    objs = objects(f)
    cert = objs[("Certificate", "demo-client-tls")]
    router_cert = objs[("Certificate", "demo-router-tls")]
    assert cert["spec"]["secretName"] == "demo-client-tls"
    assert cert["spec"]["commonName"] == "demo-client.ns"
    assert "server auth" not in cert["spec"]["usages"]
    assert "client auth" in cert["spec"]["usages"]
    assert cert["spec"]["issuerRef"] == router_cert["spec"]["issuerRef"]
    assert "dnsNames" not in cert["spec"]
    assert "uris" not in cert["spec"]
    assert cert["spec"]["secretTemplate"]["labels"]["blazen.dev/fleet"] == "demo"
    stub = next(c for c in router_desired(f) if c.key == ("v1", "Secret", "demo-client-tls"))
    assert stub.create_only
    assert stub.manifest["type"] == "kubernetes.io/tls"
    assert stub.manifest["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert "demo-client-tls" in br.secret_names(f), "pruned by name when no longer wanted"
    # the pools' router identity is one of the router certificate's names, not the callers'
    bp = bf.pool_peer(f, pool(f, "cpu"))
    bp["spec"]["replicas"] = 1
    args = workload.peer_args(Peer.from_body(bp))
    identity = args[args.index("--fleet-router-identity") + 1]
    assert identity in router_cert["spec"]["dnsNames"]
    assert identity != cert["spec"]["commonName"]
    status = fst.compute(fst.ObservedFleet(generation=1, fleet=f))
    assert status["certificate"]["clientSecretName"] == "demo-client-tls"
    # the pools' own client certificates keep their names, distinct from the fleet's
    assert "demo-cpu-client-tls" in certs.stub_names(Peer.from_body(bp))


@pytest.mark.parametrize(
    ("security", "client_cert"),
    [
        ({}, True),
        # a user issuer with a CA bundle: the router requires client certificates of it
        (
            {
                "tls": {
                    "issuerRef": {"name": "corp", "kind": "ClusterIssuer"},
                    "trustBundle": {"configMap": {"name": "roots"}},
                }
            },
            True,
        ),
        # an issuer without a CA bundle: the router asks for none (the token authenticates)
        (
            {
                "tls": {"issuerRef": {"name": "acme", "kind": "ClusterIssuer"}},
                "auth": {"tokenSecretRef": {"name": "tok"}},
            },
            False,
        ),
        ({"tls": {"enabled": False}, "auth": {"tokenSecretRef": {"name": "tok"}}}, False),
    ],
    ids=["namespace-ca", "issuer-with-bundle", "issuer-without-ca", "token-only"],
)
def test_the_callers_certificate_exists_exactly_when_the_router_verifies_client_certificates(
    security: dict[str, Any], client_cert: bool
) -> None:
    f = fleet({**copy.deepcopy(BASE), **security})
    objs = objects(f)
    router_args = _container(objs[("Deployment", "demo-router")])[0]["args"]
    verifies = "--tls-client-auth" in router_args and (
        router_args[router_args.index("--tls-client-auth") + 1] == "require"
    )
    assert verifies == client_cert
    assert (("Certificate", "demo-client-tls") in objs) == client_cert
    assert (("Secret", "demo-client-tls") in objs) == client_cert
    status = fst.compute(fst.ObservedFleet(generation=1, fleet=f))
    assert (status.get("certificate") or {}).get("clientSecretName") == (
        "demo-client-tls" if client_cert else None
    )
    if client_cert:
        cert, router_cert = objs[("Certificate", "demo-client-tls")], objs[("Certificate", "demo-router-tls")]
        assert cert["spec"]["issuerRef"] == router_cert["spec"]["issuerRef"]


def test_router_max_concurrent_workflows_reaches_its_args() -> None:
    def args(router: dict[str, Any] | None) -> list[str]:
        spec = {**copy.deepcopy(BASE), **({"router": router} if router is not None else {})}
        return _container(objects(fleet(spec))[("Deployment", "demo-router")])[0]["args"]

    assert "--max-concurrent-workflows" not in args(None), "unset: the runtime's default"
    for n in (0, 500):
        got = args({"maxConcurrentWorkflows": n})
        assert got[got.index("--max-concurrent-workflows") + 1] == str(n)
    with pytest.raises(ValidationError) as err:
        fs.parse_spec({**BASE, "router": {"maxConcurrentWorkflows": -1}})
    # what the status says of an object that reached the operator some other way
    assert reconcile.validation_message(err.value).startswith("spec.router.maxConcurrentWorkflows:")
    # the CRD refuses it with the API server's message naming spec.router.maxConcurrentWorkflows
    schema = crdgen.model_schema(fs.BlazenFleetSpec)
    prop = schema["properties"]["router"]["properties"]["maxConcurrentWorkflows"]
    assert prop["type"] == "integer"
    assert prop["minimum"] == 0


def test_router_pod_is_a_peer_pod_running_route() -> None:
    """Same security context, probes, drain, grace and mounts as a peer's pod; only the role differs."""
    spec = copy.deepcopy(BASE)
    spec["auth"] = {"tokenSecretRef": {"name": "tok"}}
    spec["router"] = {"pod": {"terminationGracePeriodSeconds": 40, "drainAdmitSeconds": 12}}
    f = fleet(spec)
    dep = objects(f)[("Deployment", "demo-router")]
    pod = dep["spec"]["template"]["spec"]
    (ctr,) = pod["containers"]
    assert ctr["name"] == "router"
    assert ctr["image"] == "img:1"
    assert ctr["args"][:3] == ["route", "--fleet", "demo"]
    assert "--entrypoint" not in ctr["args"]
    assert "--steps" not in ctr["args"]
    assert ctr["args"][ctr["args"].index("--shutdown-grace-secs") + 1] == "39"
    assert ctr["args"][ctr["args"].index("--shutdown-admit-secs") + 1] == "12"
    assert ctr["args"][ctr["args"].index("--token-file") + 1] == "/etc/blazen/token/token"
    assert pod["terminationGracePeriodSeconds"] == 40
    assert pod["serviceAccountName"] == "demo-router"
    assert pod["automountServiceAccountToken"] is True  # it watches the API
    rp = br.router_peer(f)
    peer_like = workload.pod_template(rp)
    assert ctr["securityContext"] == peer_like["spec"]["containers"][0]["securityContext"]
    assert pod["securityContext"] == peer_like["spec"]["securityContext"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert ctr[probe] == peer_like["spec"]["containers"][0][probe]
    assert pod["volumes"] == peer_like["spec"]["volumes"]
    assert {"tmp", "home", "tls", "token"} <= {v["name"] for v in pod["volumes"]}
    assert dep["spec"]["template"]["metadata"]["labels"] == {
        "app.kubernetes.io/name": "blazen-router",
        "app.kubernetes.io/instance": "demo",
        "app.kubernetes.io/managed-by": "blazen-operator",
        "app.kubernetes.io/part-of": "blazen-fleet",
        "blazen.dev/fleet": "demo",
        "blazen.dev/component": "router",
    }
    assert dep["spec"]["replicas"] == 2


def test_router_image_override_and_refresh_below_the_pools_drain() -> None:
    spec = copy.deepcopy(BASE)
    spec["router"] = {"image": "router:2"}
    spec["pools"][1]["pod"] = {"drainAdmitSeconds": 4}
    f = fleet(spec)
    ctr = objects(f)[("Deployment", "demo-router")]["spec"]["template"]["spec"]["containers"][0]
    assert ctr["image"] == "router:2"
    assert ctr["args"][ctr["args"].index("--pool-refresh-secs") + 1] == "2"


def test_router_service_and_plaintext_opt_in_fenced() -> None:
    spec = copy.deepcopy(BASE)
    spec["router"] = {
        "plaintextGrpc": {"enabled": True, "allowedFrom": [{"podSelector": {"matchLabels": {"c": "1"}}}]}
    }
    got = objects(fleet(spec))
    svc = got[("Service", "demo")]
    assert [p["name"] for p in svc["spec"]["ports"]] == ["grpc", "http", "grpc-plain", "admin"]
    assert svc["spec"]["selector"] == {
        "app.kubernetes.io/name": "blazen-router",
        "app.kubernetes.io/instance": "demo",
    }
    ingress = got[("NetworkPolicy", "demo-router")]["spec"]["ingress"]
    plain = [r for r in ingress if r["ports"] == [{"port": 50052, "protocol": "TCP"}]]
    assert plain == [
        {
            "ports": [{"port": 50052, "protocol": "TCP"}],
            "from": [{"podSelector": {"matchLabels": {"c": "1"}}}],
        }
    ]
    # without the opt-in no plaintext port anywhere
    default = objects(fleet())
    assert "grpc-plain" not in [p["name"] for p in default[("Service", "demo")]["spec"]["ports"]]
    assert (
        "--plaintext-grpc-addr"
        not in default[("Deployment", "demo-router")]["spec"]["template"]["spec"]["containers"][0]["args"]
    )


def test_router_admin_port_fenced_like_a_peers() -> None:
    op = OperatorIdentity("ops", (("app", "op"),))
    f = fleet(operator=op)
    ingress = objects(f)[("NetworkPolicy", "demo-router")]["spec"]["ingress"]
    admin = [r for r in ingress if r["ports"] == [{"port": 9090, "protocol": "TCP"}]]
    assert len(admin) == 1
    assert admin[0]["from"][0] == op.network_peer()


def test_single_router_has_no_pdb_and_tls_off_has_no_certificate() -> None:
    spec = copy.deepcopy(BASE)
    spec["router"] = {"replicas": 1}
    spec["tls"] = {"enabled": False}
    spec["auth"] = {"tokenSecretRef": {"name": "tok"}}
    got = objects(fleet(spec))
    assert ("PodDisruptionBudget", "demo-router") not in got
    assert ("Certificate", "demo-router-tls") not in got
    ctr = got[("Deployment", "demo-router")]["spec"]["template"]["spec"]["containers"][0]
    assert "--tls-cert" not in ctr["args"]


# ------------------------------------------------------------------------------------------------ status


def peer_obj(
    replicas: int, ready: int, served: list[str] | None, ok: bool = True, **conds: str
) -> dict[str, Any]:
    conditions = [{"type": "Ready", "status": "True" if ok else "False", "reason": "x"}]
    conditions += [{"type": t, "status": "True", "reason": r, "message": "m"} for t, r in conds.items()]
    status: dict[str, Any] = {"readyReplicas": ready, "conditions": conditions}
    if served is not None:
        status["servedSteps"] = served
    return {"spec": {"replicas": replicas}, "status": status}


def router_dep(f: Fleet, ready: int) -> dict[str, Any]:
    dep = objects(f)[("Deployment", "demo-router")]
    n = f.spec.router.replicas
    dep["metadata"]["generation"] = 1
    dep["status"] = {
        "observedGeneration": 1,
        "replicas": n,
        "readyReplicas": ready,
        "updatedReplicas": n,
        "availableReplicas": ready,
    }
    return dep


READY_CERT = {"metadata": {"generation": 1}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}}


def test_status_routing_table_and_ready() -> None:
    f = fleet()
    o = fst.ObservedFleet(
        generation=3,
        fleet=f,
        peers=(("cpu", peer_obj(2, 2, ["a", "b"])), ("gpu", peer_obj(1, 1, ["g"]))),
        deployment=router_dep(f, 2),
        certificate=READY_CERT,
    )
    out = fst.compute(o)
    assert out["routes"] == {"a": ["cpu"], "b": ["cpu"], "g": ["gpu"]}
    assert out["readyPools"] == "2/2"
    assert out["pools"][0] == {
        "name": "cpu",
        "peer": "demo-cpu",
        "replicas": 2,
        "readyReplicas": 2,
        "ready": True,
        "servedSteps": ["a", "b"],
    }
    assert out["endpoints"] == {"grpc": "demo.ns.svc:50051", "http": "https://demo.ns.svc:8080"}
    conds = {c["type"]: (c["status"], c["reason"]) for c in out["conditions"]}
    assert conds == {
        "Ready": ("True", "AllReady"),
        "Routable": ("True", "Routable"),
        "Degraded": ("False", "AsExpected"),
    }
    assert out["phase"] == "Ready"
    fs.BlazenFleetStatus.model_validate(out)


def test_status_unserved_steps_and_unready_pool() -> None:
    f = fleet()
    o = fst.ObservedFleet(
        generation=1,
        fleet=f,
        # the pool says StepsNotServed itself: the fleet says it once, with the pool and its steps
        peers=(
            ("cpu", peer_obj(2, 2, ["a"], Degraded="StepsNotServed")),
            ("gpu", peer_obj(1, 0, None, ok=False)),
        ),
        deployment=router_dep(f, 2),
        certificate=READY_CERT,
    )
    out = fst.compute(o)
    cpu = out["pools"][0]
    assert cpu["unservedSteps"] == ["b"]
    assert out["routes"] == {"a": ["cpu"]}
    conds = {c["type"]: c for c in out["conditions"]}
    assert (conds["Degraded"]["status"], conds["Degraded"]["reason"]) == ("True", "StepsNotServed")
    assert "cpu: b" in conds["Degraded"]["message"]
    assert "PoolDegraded" not in conds["Degraded"]["message"]
    assert (conds["Routable"]["status"], conds["Routable"]["reason"]) == ("False", "PoolsNotReady")
    assert "gpu" in conds["Routable"]["message"]
    assert out["phase"] == "Degraded"
    events = {(e.type, e.reason) for e in fst.transitions({}, out)}
    assert ("Warning", "StepsNotServed") in events


def test_status_router_not_ready_and_pool_degraded() -> None:
    f = fleet()
    o = fst.ObservedFleet(
        generation=1,
        fleet=f,
        peers=(("cpu", peer_obj(2, 2, ["a", "b"], Degraded="ProgressDeadlineExceeded")), ("gpu", None)),
        deployment=router_dep(f, 0),
        certificate=None,
    )
    out = fst.compute(o)
    conds = {c["type"]: c for c in out["conditions"]}
    assert conds["Routable"]["reason"] == "RouterNotReady"
    assert conds["Degraded"]["reason"] == "PoolDegraded"
    assert "pool cpu: ProgressDeadlineExceeded" in conds["Degraded"]["message"]
    assert out["pools"][1]["name"] == "gpu"
    assert "readyReplicas" not in out["pools"][1]


def test_status_events_on_routes_and_routability_changes() -> None:
    f = fleet()
    first = fst.compute(
        fst.ObservedFleet(
            generation=1,
            fleet=f,
            peers=(("cpu", peer_obj(2, 2, ["a", "b"])), ("gpu", peer_obj(1, 1, ["g"]))),
            deployment=router_dep(f, 2),
            certificate=READY_CERT,
        )
    )
    second = fst.compute(
        fst.ObservedFleet(
            generation=1,
            fleet=f,
            peers=(("cpu", peer_obj(2, 2, ["a", "b"])), ("gpu", peer_obj(1, 0, ["g"], ok=False))),
            deployment=router_dep(f, 2),
            certificate=READY_CERT,
        ),
        first,
    )
    events = {(e.type, e.reason) for e in fst.transitions(first, second)}
    assert ("Warning", "PoolsNotReady") in events
    assert ("Normal", "RoutesChanged") in events


def test_invalid_spec_status_names_the_field() -> None:
    out = fst.compute(fst.ObservedFleet(generation=2, fleet=None, invalid="spec.pools.0.image: missing"))
    assert out["phase"] == "Invalid"
    assert {c["type"]: c["reason"] for c in out["conditions"]} == {
        "Ready": "InvalidSpec",
        "Degraded": "InvalidSpec",
    }


def test_the_example_fleet_renders_a_cpu_pool_a_gpu_pool_and_the_router(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import yaml
    from blazen_operator.cli import main

    assert main(["render", "-f", str(EXAMPLE), "-n", "demo"]) == 0
    objs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(capsys.readouterr().out) if d}
    cpu, gpu = objs[("Deployment", "examples-cpu")], objs[("Deployment", "examples-gpu")]
    assert cpu["spec"]["replicas"] == 2
    assert "nvidia.com/gpu" not in cpu["spec"]["template"]["spec"]["containers"][0]["resources"].get(
        "limits", {}
    )
    assert gpu["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["spec"]["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    images = {
        d["spec"]["template"]["spec"]["containers"][0]["image"]
        for k, d in objs.items()
        if k[0] == "Deployment"
    }
    assert images == {"blazen-fleet/example-steps:dev"}, "one image: both pools and the router"
    router = objs[("Deployment", "examples-router")]["spec"]["template"]["spec"]["containers"][0]
    assert router["args"][:3] == ["route", "--fleet", "examples"]
    assert objs[("Service", "examples")]["spec"]["selector"]["app.kubernetes.io/name"] == "blazen-router"


def test_pools_trust_their_router_to_run_split_steps_with_mutual_tls_only() -> None:
    f = fleet()
    bp = bf.pool_peer(f, pool(f, "cpu"))
    bp["spec"]["replicas"] = 1
    args = workload.peer_args(Peer.from_body(bp))
    assert args[args.index("--fleet-router-identity") + 1] == "demo.ns.svc"
    assert "demo.ns.svc" in objects(f)[("Certificate", "demo-router-tls")]["spec"]["dnsNames"]
    # token-only fleets: no client certificate to name the router by
    spec = copy.deepcopy(BASE)
    spec["tls"] = {"enabled": False}
    spec["auth"] = {"tokenSecretRef": {"name": "tok"}}
    g = fleet(spec)
    bp = bf.pool_peer(g, pool(g, "cpu"))
    bp["spec"]["replicas"] = 1
    assert "--fleet-router-identity" not in workload.peer_args(Peer.from_body(bp))
    alone = Peer(name="p", namespace="ns", spec=s.parse_spec({"image": "i", "entrypoint": "m"}))
    assert "--fleet-router-identity" not in workload.peer_args(alone)
    assert "--fleet-router-token-file" not in workload.peer_args(alone)


def _container(deployment: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the container, its volumes by name) of a Deployment."""
    pod = deployment["spec"]["template"]["spec"]
    return pod["containers"][0], {v["name"]: v for v in pod["volumes"]}


def _mounted_file(container: dict[str, Any], volumes: dict[str, Any], path: str) -> tuple[str, str]:
    """(Secret name, key) of the Secret file the container sees at ``path``."""
    for m in container["volumeMounts"]:
        if path.startswith(m["mountPath"] + "/"):
            secret = volumes[m["name"]]["secret"]
            rel = path[len(m["mountPath"]) + 1 :]
            key = next(i["key"] for i in secret["items"] if i["path"] == rel)
            return secret["secretName"], key
    raise AssertionError(f"nothing mounted at {path}")


@pytest.mark.parametrize(
    "security",
    [
        {"tls": {"enabled": False}, "auth": {"tokenSecretRef": {"name": "tok"}}},
        # an issuer without a CA bundle: the pools ask for no client certificate, the token is required
        {
            "tls": {"issuerRef": {"name": "acme", "kind": "ClusterIssuer"}},
            "auth": {"tokenSecretRef": {"name": "tok"}},
        },
    ],
    ids=["token-only", "issuer-without-ca"],
)
def test_pools_without_client_certificates_know_their_router_by_a_token_of_its_own(
    security: dict[str, Any],
) -> None:
    """The shared bearer token is every caller's: the router gets a second token, generated once by the
    operator into a Secret of the fleet, which the router sends and every pool requires on RunStep."""
    spec = {**copy.deepcopy(BASE), **security}
    f = fleet(spec)
    token = ("Secret", "demo-router-token")
    objs = objects(f)
    assert objs[token]["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert not {"data", "stringData"} & set(objs[token]), "render shows no token"
    child = next(
        c for c in router_desired(f) if (c.manifest["kind"], c.manifest["metadata"]["name"]) == token
    )
    assert child.create_only, "generated once, never rewritten by a later pass"
    first, second = child.creation()["stringData"]["token"], child.creation()["stringData"]["token"]
    assert first != second, "a fresh random value at creation"
    assert len(first) >= 32
    assert token[1] in br.secret_names(f)

    router, rvols = _container(objs[("Deployment", "demo-router")])
    rpath = router["args"][router["args"].index("--fleet-router-token-file") + 1]
    assert _mounted_file(router, rvols, rpath) == ("demo-router-token", "token")
    for name in ("cpu", "gpu"):
        bp = bf.pool_peer(f, pool(f, name))
        bp["spec"]["replicas"] = 1
        peer = Peer.from_body(bp)
        container, vols = _container(workload.deployment(peer))
        args = container["args"]
        assert "--fleet-router-identity" not in args
        path = args[args.index("--fleet-router-token-file") + 1]
        assert _mounted_file(container, vols, path) == ("demo-router-token", "token")
        # ...and not the shared token's file
        assert path != args[args.index("--token-file") + 1]

    # mutual TLS: the certificate names the router, no token Secret, no flag on either side
    m = fleet()
    assert ("Secret", "demo-router-token") not in objects(m)
    router, _ = _container(objects(m)[("Deployment", "demo-router")])
    assert "--fleet-router-token-file" not in router["args"]
    bp = bf.pool_peer(m, pool(m, "cpu"))
    bp["spec"]["replicas"] = 1
    assert "--fleet-router-token-file" not in workload.peer_args(Peer.from_body(bp))


def test_no_routes_is_no_routes_field() -> None:
    """An empty map would be emptied by server-side apply into null, which the status schema refuses."""
    f = fleet()
    out = fst.compute(fst.ObservedFleet(generation=1, fleet=f, peers=(("cpu", None), ("gpu", None))))
    assert "routes" not in out


def _router_pod(name: str, info: Any, ready: bool = True) -> st.PodReport:
    return st.PodReport(name, ready, info)


def _split_info(runs: dict[str, Any], steps: dict[str, Any]) -> dict[str, Any]:
    return {"router": {"pools": {}, "split": {"runs": runs, "steps": steps}}}


def test_status_shows_the_routers_split_runs_summed_over_its_ready_pods() -> None:
    f = fleet()
    pods = (
        _router_pod("r-0", _split_info({"ok": 3, "error": 1}, {"cpu": 6, "gpu": 3})),
        _router_pod("r-1", _split_info({"ok": 2, "timeout": 1}, {"cpu": 2})),
        _router_pod("r-2", _split_info({"ok": 100}, {"cpu": 100}), ready=False),  # not counted: not ready
        _router_pod("r-3", None),  # did not answer
        # a router of another version, or garbage: ignored, never a failed pass
        _router_pod("r-4", {"router": {"split": {"runs": {"ok": "many", "x": -1, "y": True}, "steps": []}}}),
    )
    out = fst.compute(
        fst.ObservedFleet(generation=1, fleet=f, peers=(("cpu", None), ("gpu", None)), router_pods=pods)
    )
    assert out["router"]["splitRuns"] == {"error": 1, "ok": 5, "timeout": 1}
    assert out["router"]["splitSteps"] == {"cpu": 8, "gpu": 3}
    # the status model (and so the CRD) carries them
    fs.BlazenFleetStatus.model_validate(out)

    # no router pod reported split counters (none ready, an older router): absent, not zero
    for reports in ((), (_router_pod("r-0", {"router": {"pools": {}}}),), pods[2:4]):
        out = fst.compute(fst.ObservedFleet(generation=1, fleet=f, router_pods=reports))
        assert "splitRuns" not in out["router"]
        assert "splitSteps" not in out["router"]
    # a router that reported and has split nothing yet: zero runs, said as such
    out = fst.compute(
        fst.ObservedFleet(generation=1, fleet=f, router_pods=(_router_pod("r", _split_info({}, {})),))
    )
    assert out["router"]["splitRuns"] == {}


class _Pods:
    """The Pod list of a fake API: counts the lists."""

    def __init__(self, pods: list[dict[str, Any]]) -> None:
        self.pods = pods
        self.lists: list[tuple[str, str]] = []

    def each(
        self, api_version: str, kind: str, namespace: str, selector: str, restarted: Any = None
    ) -> list[dict[str, Any]]:
        assert (api_version, kind) == ("v1", "Pod")
        self.lists.append((namespace, selector))
        return self.pods


def test_router_pods_are_read_as_a_peers_at_the_bounded_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    """One mechanism (reconcile.observe_pods) for a BlazenPeer's pods and a fleet's router pods: /v1/info
    read again only when the rollout moved or after recheck_seconds, however many passes."""
    from blazen_operator import reconcile

    reads: list[list[str]] = []

    def infos(urls: Any) -> list[Any]:
        reads.append(list(urls))
        return [_split_info({"ok": 1}, {"cpu": 1}) for _ in urls]

    monkeypatch.setattr(reconcile, "read_peer_infos", infos)
    f = fleet()
    pod = {
        "metadata": {"name": "demo-router-x"},
        "status": {"podIP": "10.0.0.7", "conditions": [{"type": "Ready", "status": "True"}]},
    }
    api = _Pods([pod])
    deployment = {"metadata": {"uid": "d-1"}, "status": {"readyReplicas": 1}}

    def observe(seen: Any, recheck: float = 60.0) -> Any:
        return reconcile.observe_pods(
            api,
            seen,
            deployment,
            "ns",
            br.selector_string(f),
            f.spec.router.ports.admin,
            recheck,
        )

    seen = observe(None)
    assert api.lists == [("ns", "app.kubernetes.io/instance=demo,app.kubernetes.io/name=blazen-router")]
    assert reads == [[f"http://10.0.0.7:{f.spec.router.ports.admin}/v1/info"]]
    assert fst.split_counts(seen.reports, "runs") == {"ok": 1}
    for _ in range(5):
        assert observe(seen) is seen
    assert len(reads) == 1
    deployment["status"] = {"readyReplicas": 2}  # the rollout moved: read again
    seen = observe(seen)
    assert len(reads) == 2
    assert observe(seen, recheck=0.0) is not seen  # the period passed
    assert len(reads) == 3

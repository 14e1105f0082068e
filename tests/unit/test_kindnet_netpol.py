"""kindnet-lite's NetworkPolicy enforcer: render() (policies + pods + namespaces -> iptables-restore text).

The tests don't compare rule text: they evaluate the rendered chain for a new connection (source, destination,
protocol, port) the way the kernel walks it, and assert who may reach what.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import shlex
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from blazen_operator.builders import Peer, workload
from blazen_operator.builders.common import OperatorIdentity
from blazen_operator.spec import parse_spec

ROOT = Path(__file__).resolve().parents[2]
ENFORCER = ROOT / "images" / "kindnet-lite" / "netpol.py"
NODE, OTHER_NODE = "n1", "n2"
NODE_IPS = ["172.18.0.2", "172.18.0.3"]


@pytest.fixture(scope="module")
def np() -> ModuleType:
    """The enforcer, loaded from its file (it is not a package: the image runs it as a script)."""
    spec = importlib.util.spec_from_file_location("kindnet_netpol", ENFORCER)
    assert spec
    assert spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------ objects as the API lists them


def ns(name: str, **lbls: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name, **lbls}}}


def pod(
    name: str,
    ip: str | None,
    namespace: str = "app",
    node: str = NODE,
    labels: dict[str, str] | None = None,
    ports: list[dict[str, Any]] | None = None,
    host_network: bool = False,
    phase: str = "Running",
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
        "spec": {
            "nodeName": node,
            "hostNetwork": host_network,
            "containers": [{"name": "c", "ports": ports or []}],
        },
        "status": {"phase": phase, "podIP": ip, "podIPs": [{"ip": ip}] if ip else []},
    }


def policy(
    name: str, namespace: str = "app", selector: dict[str, Any] | None = None, **spec: Any
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"podSelector": selector if selector is not None else {}, **spec},
    }


SERVER = pod("server", "10.244.1.10", labels={"app": "server"})
FRIEND = pod("friend", "10.244.1.11", labels={"role": "friend"})
STRANGER = pod("stranger", "10.244.1.12")
REMOTE_FRIEND = pod("remote-friend", "10.244.2.11", node=OTHER_NODE, labels={"role": "friend"})
OTHER_NS_FRIEND = pod("friend", "10.244.2.20", namespace="other", node=OTHER_NODE, labels={"role": "friend"})
NAMESPACES = [ns("app", team="a"), ns("other", team="b"), ns("third")]
PODS = [SERVER, FRIEND, STRANGER, REMOTE_FRIEND, OTHER_NS_FRIEND]
FROM_FRIENDS = [{"from": [{"podSelector": {"matchLabels": {"role": "friend"}}}]}]


# ------------------------------------------------------------ the kernel's walk of the chain, new connections


def _matches(tokens: list[str], src: str, dst: str, proto: str, port: int) -> bool:
    i = 0
    while i < len(tokens):
        opt = tokens[i]
        if opt in ("-s", "-d"):
            addr = src if opt == "-s" else dst
            if ipaddress.ip_address(addr) not in ipaddress.ip_network(tokens[i + 1]):
                return False
            i += 2
        elif opt == "-p":
            if tokens[i + 1] != proto:
                return False
            i += 2
        elif opt == "--dport":
            lo, _, hi = tokens[i + 1].partition(":")
            if not int(lo) <= port <= int(hi or lo):
                return False
            i += 2
        elif opt == "-m" and tokens[i + 1] == "conntrack":
            assert tokens[i + 2 : i + 4] == ["--ctstate", "RELATED,ESTABLISHED"], tokens
            return False  # a new connection is neither
        elif opt == "-m" and tokens[i + 1] == "comment":
            i += 4
        elif opt == "-m" and tokens[i + 1] in ("tcp", "udp", "sctp"):
            i += 2
        else:
            raise AssertionError(f"the test's evaluator does not know {opt!r} in {tokens}")
    return True


def admits(rules: str, src: str, dst: str, port: int, proto: str = "tcp") -> bool:
    """Does a new connection src -> dst:port get through KINDNET-NETPOL? RETURN: yes; DROP: no; the end of
    the chain (not isolated): yes."""
    lines = rules.splitlines()
    assert lines[:2] == ["*filter", ":KINDNET-NETPOL - [0:0]"], rules
    assert lines[-1] == "COMMIT", rules
    for line in lines[2:-1]:
        tokens = shlex.split(line)
        assert tokens[:2] == ["-A", "KINDNET-NETPOL"], line
        assert tokens[-2] == "-j", line
        if _matches(tokens[2:-2], src, dst, proto, port):
            assert tokens[-1] in ("RETURN", "DROP"), line
            return tokens[-1] == "RETURN"
    return True


def render(np: ModuleType, policies: list[dict[str, Any]], pods: list[dict[str, Any]] = PODS) -> str:
    return np.render(policies, pods, NAMESPACES, NODE, NODE_IPS)


def ip(p: dict[str, Any]) -> str:
    return p["status"]["podIP"]


def reachable(rules: str, dst: dict[str, Any], port: int, proto: str = "tcp") -> set[str]:
    """Which of the pods reach dst:port."""
    return {
        f"{p['metadata']['namespace']}/{p['metadata']['name']}"
        for p in PODS
        if p is not dst and admits(rules, ip(p), ip(dst), port, proto)
    }


EVERYONE = {"app/friend", "app/stranger", "app/remote-friend", "other/friend"}


# ------------------------------------------------------------ selection and isolation


def test_no_policy_isolates_nothing(np: ModuleType) -> None:
    rules = render(np, [])
    assert reachable(rules, SERVER, 80) == EVERYONE
    assert "DROP" not in rules


def test_pod_selector_admits_the_labelled_pods_of_the_policys_namespace_only(np: ModuleType) -> None:
    pol = policy("p", selector={"matchLabels": {"app": "server"}}, ingress=FROM_FRIENDS)
    rules = render(np, [pol])
    # From this node and from another; not a same-labelled pod of another namespace.
    assert reachable(rules, SERVER, 80) == {"app/friend", "app/remote-friend"}
    # Pods the policy does not select stay open.
    assert reachable(rules, FRIEND, 80) == EVERYONE - {"app/friend"} | {"app/server"}


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        pytest.param({"namespaceSelector": {"matchLabels": {"team": "b"}}}, {"other/friend"}, id="namespace"),
        pytest.param({"namespaceSelector": {}}, EVERYONE, id="all namespaces"),
        pytest.param(
            {
                "namespaceSelector": {"matchLabels": {"team": "a"}},
                "podSelector": {"matchLabels": {"role": "friend"}},
            },
            {"app/friend", "app/remote-friend"},
            id="namespace AND pod",
        ),
        pytest.param(
            {"namespaceSelector": {}, "podSelector": {"matchLabels": {"role": "friend"}}},
            {"app/friend", "app/remote-friend", "other/friend"},
            id="friends anywhere",
        ),
        pytest.param(
            {"podSelector": {}}, {"app/friend", "app/stranger", "app/remote-friend"}, id="own namespace"
        ),
        pytest.param(
            {"ipBlock": {"cidr": "10.244.2.0/24"}}, {"app/remote-friend", "other/friend"}, id="ipBlock"
        ),
        pytest.param(
            {"ipBlock": {"cidr": "10.244.0.0/16", "except": ["10.244.1.0/24", "10.244.2.20/32"]}},
            {"app/remote-friend"},
            id="ipBlock except",
        ),
    ],
)
def test_from_peers(np: ModuleType, peer: dict[str, Any], expected: set[str]) -> None:
    rules = render(np, [policy("p", selector={"matchLabels": {"app": "server"}}, ingress=[{"from": [peer]}])])
    assert reachable(rules, SERVER, 80) == expected


def test_two_peers_in_one_rule_are_or(np: ModuleType) -> None:
    peers = [
        {"namespaceSelector": {"matchLabels": {"team": "b"}}},
        {"podSelector": {"matchLabels": {"role": "x"}}},
    ]
    stranger_x = pod("stranger", "10.244.1.12", labels={"role": "x"})
    pods = [SERVER, FRIEND, stranger_x, REMOTE_FRIEND, OTHER_NS_FRIEND]
    rules = np.render([policy("p", ingress=[{"from": peers}])], pods, NAMESPACES, NODE, NODE_IPS)
    assert admits(rules, ip(OTHER_NS_FRIEND), ip(SERVER), 80)
    assert admits(rules, ip(stranger_x), ip(SERVER), 80)
    assert not admits(rules, ip(FRIEND), ip(SERVER), 80)


def test_empty_from_admits_everyone_and_no_rules_admit_no_one(np: ModuleType) -> None:
    open_rule = render(np, [policy("p", ingress=[{"ports": [{"port": 80}]}])])
    assert reachable(open_rule, SERVER, 80) == EVERYONE
    assert not reachable(open_rule, SERVER, 81)
    assert admits(open_rule, "192.0.2.7", ip(SERVER), 80)  # not a pod: still "everyone"

    deny_all = render(np, [policy("p", policyTypes=["Ingress"])])
    assert not reachable(deny_all, SERVER, 80)
    assert not reachable(deny_all, FRIEND, 443)


@pytest.mark.parametrize(
    ("types", "isolated"),
    [
        pytest.param(["Egress"], False, id="Egress only: not isolated for ingress"),
        pytest.param(["Ingress", "Egress"], True, id="both"),
        pytest.param(None, True, id="unset: Ingress"),
    ],
)
def test_policy_types(np: ModuleType, types: list[str] | None, isolated: bool) -> None:
    spec: dict[str, Any] = {"egress": [{}]}
    if types is not None:
        spec["policyTypes"] = types
    rules = render(np, [policy("p", selector={"matchLabels": {"app": "server"}}, **spec)])
    assert (reachable(rules, SERVER, 80) == set()) is isolated
    assert (reachable(rules, SERVER, 80) == EVERYONE) is not isolated


def test_allowed_is_the_union_of_every_selecting_policy(np: ModuleType) -> None:
    friends_on_80 = policy("a", ingress=[{**FROM_FRIENDS[0], "ports": [{"port": 80}]}])
    other_ns_on_443 = policy(
        "b",
        selector={"matchLabels": {"app": "server"}},
        ingress=[{"from": [{"namespaceSelector": {"matchLabels": {"team": "b"}}}], "ports": [{"port": 443}]}],
    )
    rules = render(np, [friends_on_80, other_ns_on_443])
    assert reachable(rules, SERVER, 80) == {"app/friend", "app/remote-friend"}
    assert reachable(rules, SERVER, 443) == {"other/friend"}
    assert reachable(rules, SERVER, 8080) == set()
    # A policy of another namespace never selects this pod.
    elsewhere = policy("c", namespace="other", ingress=[])
    assert reachable(render(np, [elsewhere]), SERVER, 80) == EVERYONE


@pytest.mark.parametrize(
    ("expr", "selected"),
    [
        ({"key": "app", "operator": "In", "values": ["server", "db"]}, {"server"}),
        ({"key": "app", "operator": "NotIn", "values": ["server"]}, {"friend", "stranger"}),
        ({"key": "role", "operator": "Exists"}, {"friend"}),
        ({"key": "role", "operator": "DoesNotExist"}, {"server", "stranger"}),
    ],
    ids=["In", "NotIn (also pods without the key)", "Exists", "DoesNotExist"],
)
def test_match_expressions_select_the_isolated_pods(
    np: ModuleType, expr: dict[str, Any], selected: set[str]
) -> None:
    rules = render(np, [policy("p", selector={"matchExpressions": [expr]})])
    local = [SERVER, FRIEND, STRANGER]
    isolated = {p["metadata"]["name"] for p in local if not admits(rules, "10.244.3.3", ip(p), 80)}
    assert isolated == selected


def test_match_labels_and_expressions_must_all_hold(np: ModuleType) -> None:
    sel = {"matchLabels": {"role": "friend"}, "matchExpressions": [{"key": "tier", "operator": "Exists"}]}
    tiered = pod("tiered", "10.244.1.13", labels={"role": "friend", "tier": "1"})
    pods = [SERVER, FRIEND, tiered]
    rules = np.render([policy("p", selector=sel)], pods, NAMESPACES, NODE, NODE_IPS)
    assert admits(rules, "10.244.3.3", ip(FRIEND), 80)
    assert not admits(rules, "10.244.3.3", ip(tiered), 80)


# ------------------------------------------------------------ ports


def test_ports_protocols_ranges_and_named_ports(np: ModuleType) -> None:
    server = pod(
        "server",
        "10.244.1.10",
        labels={"app": "server"},
        ports=[
            {"name": "grpc", "containerPort": 50051},
            {"name": "dns", "containerPort": 53, "protocol": "UDP"},
        ],
    )
    ports = [
        {"port": "grpc"},  # named, TCP by default
        {"port": "dns", "protocol": "UDP"},
        {"port": "dns"},  # no TCP port named dns on this pod: admits nothing
        {"port": 9000, "endPort": 9010},
        {"protocol": "SCTP"},  # every SCTP port
        {"port": "8080"},  # a number spelled as a string
    ]
    rules = np.render(
        [policy("p", ingress=[{"ports": ports}])], [server, STRANGER], NAMESPACES, NODE, NODE_IPS
    )
    src, dst = ip(STRANGER), ip(server)
    assert admits(rules, src, dst, 50051)
    assert not admits(rules, src, dst, 50051, "udp")
    assert admits(rules, src, dst, 53, "udp")
    assert not admits(rules, src, dst, 53, "tcp")
    assert [p for p in range(8990, 9020) if admits(rules, src, dst, p)] == list(range(9000, 9011))
    assert admits(rules, src, dst, 1234, "sctp")
    assert admits(rules, src, dst, 8080)
    assert not admits(rules, src, dst, 80)


def test_a_rule_whose_named_ports_all_miss_admits_nothing(np: ModuleType) -> None:
    rules = render(np, [policy("p", ingress=[{"ports": [{"port": "metrics"}]}])])
    assert reachable(rules, SERVER, 9090) == set()


# ------------------------------------------------------------ which pods, which sources


def test_only_this_nodes_pods_are_programmed(np: ModuleType) -> None:
    rules = render(np, [policy("p", ingress=FROM_FRIENDS)])
    assert not admits(rules, ip(STRANGER), ip(SERVER), 80)
    # REMOTE_FRIEND's node programs its own chain; this node's leaves it alone.
    assert admits(rules, ip(STRANGER), ip(REMOTE_FRIEND), 80)


def test_host_network_finished_and_addressless_pods(np: ModuleType) -> None:
    host = pod("host", "172.18.0.9", host_network=True, labels={"role": "friend"})
    done = pod("done", "10.244.1.30", phase="Succeeded", labels={"role": "friend"})
    pending = pod("pending", None, labels={"role": "friend"})
    pods = [SERVER, host, done, pending]
    rules = np.render([policy("p", ingress=FROM_FRIENDS)], pods, NAMESPACES, NODE, NODE_IPS)
    # Neither a finished pod's address (it may be reused) nor a hostNetwork pod's is a pod source.
    assert not admits(rules, ip(done), ip(SERVER), 80)
    assert not admits(rules, ip(host), ip(SERVER), 80)
    # A hostNetwork pod is never isolated (it has the node's address).
    assert admits(rules, ip(STRANGER), ip(host), 80)
    assert "pending" not in rules


def test_replies_nodes_and_the_pod_itself_always_pass(np: ModuleType) -> None:
    rules = render(np, [policy("p", policyTypes=["Ingress"])])
    first = rules.splitlines()[2]
    assert "--ctstate RELATED,ESTABLISHED -j RETURN" in first  # before any DROP: replies to allowed traffic
    for node_ip in NODE_IPS:  # kubelet probes, hostNetwork pods
        assert admits(rules, node_ip, ip(SERVER), 8080)
    assert admits(rules, ip(SERVER), ip(SERVER), 8080)  # hairpin through its own Service
    assert not admits(rules, "172.18.0.99", ip(SERVER), 8080)


def test_deleting_the_policy_reopens_the_port(np: ModuleType) -> None:
    fenced = render(np, [policy("p", ingress=[{**FROM_FRIENDS[0], "ports": [{"port": 50052}]}])])
    assert not admits(fenced, ip(STRANGER), ip(SERVER), 50052)
    reopened = render(np, [])
    assert admits(reopened, ip(STRANGER), ip(SERVER), 50052)


def test_output_is_stable(np: ModuleType) -> None:
    """The loop re-applies only when the text changes: the same inputs in another order give the same text."""
    pols = [policy("a", ingress=FROM_FRIENDS), policy("b", ingress=[{"ports": [{"port": 1}]}])]
    assert render(np, pols) == np.render(pols[::-1], PODS[::-1], NAMESPACES[::-1], NODE, NODE_IPS[::-1])


def test_ipblock_except_as_disjoint_cidrs(np: ModuleType) -> None:
    cidrs = np.ipblock_cidrs(
        {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16", "10.1.2.0/24", "10.200.0.0/13"]}
    )
    nets = [ipaddress.ip_network(c) for c in cidrs]
    for addr, inside in [
        ("10.0.0.1", True),
        ("10.1.0.1", False),
        ("10.1.2.3", False),
        ("10.2.0.0", True),
        ("10.203.4.5", False),
        ("10.255.255.255", True),
        ("11.0.0.0", False),
    ]:
        assert any(ipaddress.ip_address(addr) in n for n in nets) is inside, addr
    assert np.ipblock_cidrs({"cidr": "10.1.0.0/16", "except": ["10.0.0.0/8"]}) == []
    assert np.ipblock_cidrs({"cidr": "fd00::/8"}) == []  # IPv6: not programmed


# ------------------------------------------------------------ the operator's own policy


OPERATOR_LABELS = {"app.kubernetes.io/name": "blazen-operator", "app.kubernetes.io/instance": "bo"}
OPERATOR = OperatorIdentity(namespace="blazen-system", pod_labels=tuple(sorted(OPERATOR_LABELS.items())))


def operator_policy(**spec: Any) -> dict[str, Any]:
    p = Peer(
        name="bp",
        namespace="app",
        uid="uid-1",
        labels={},
        spec=parse_spec({"image": "reg/peer:1", "entrypoint": "pkg.steps", **spec}),
        operator=OPERATOR,
    )
    pol = workload.network_policy(p)
    assert pol is not None
    # Peer pods carry the selector labels the policy uses.
    peer_pod = pod("bp-0", "10.244.1.40", labels=dict(pol["spec"]["podSelector"]["matchLabels"]))
    return {"policy": pol, "pod": peer_pod}


def test_the_operators_default_policy_fences_the_admin_port_and_the_plaintext_port(np: ModuleType) -> None:
    made = operator_policy(
        plaintextGrpc={"enabled": True, "allowedFrom": [{"podSelector": {"matchLabels": {"role": "friend"}}}]}
    )
    operator_pod = pod(
        "op", "10.244.2.50", namespace="blazen-system", node=OTHER_NODE, labels=OPERATOR_LABELS
    )
    impostor = pod(
        "impostor", "10.244.1.51", labels=OPERATOR_LABELS
    )  # the operator's labels, wrong namespace
    monitor = pod("prom", "10.244.1.52", labels={"blazen.dev/monitoring": "true"})
    monitor_elsewhere = pod(
        "prom", "10.244.2.53", namespace="other", node=OTHER_NODE, labels={"blazen.dev/monitoring": "true"}
    )
    extra = [operator_pod, impostor, monitor, monitor_elsewhere]
    peer_pod, pods = made["pod"], [*PODS, *extra, made["pod"]]
    namespaces = [*NAMESPACES, ns("blazen-system")]
    rules = np.render([made["policy"]], pods, namespaces, NODE, NODE_IPS)

    def who(port: int) -> set[str]:
        return reachable(rules, peer_pod, port) - {"app/server"}

    assert who(50052) == {"app/friend", "app/remote-friend"}  # plaintext: the labelled pods of its namespace
    assert who(50051) == EVERYONE  # mTLS (+ token): everyone
    assert who(8080) == EVERYONE  # the HTTPS shim (http.enabled defaults to true): client cert or token
    assert who(8081) == set()  # nothing else is open
    # admin (/metrics, /v1/info): the operator's pods and this namespace's monitoring, nobody else
    dst = ip(peer_pod)
    assert who(9090) == set()
    assert admits(rules, ip(operator_pod), dst, 9090)
    assert admits(rules, ip(monitor), dst, 9090)
    assert not admits(rules, ip(impostor), dst, 9090)
    assert not admits(rules, ip(monitor_elsewhere), dst, 9090)
    assert not admits(rules, ip(operator_pod), dst, 50052)
    # the kubelet's probes come from a node address: always admitted, so the pod stays Ready
    for node_ip in NODE_IPS:
        assert admits(rules, node_ip, dst, 9090)


def test_the_operators_policy_with_network_policy_enabled_fences_mtls_too(np: ModuleType) -> None:
    made = operator_policy(
        networkPolicy={"enabled": True, "allowedFrom": [{"podSelector": {"matchLabels": {"role": "friend"}}}]}
    )
    sibling = pod("bp-1", "10.244.2.41", node=OTHER_NODE, labels=made["pod"]["metadata"]["labels"])
    pods = [*PODS, made["pod"], sibling]
    rules = np.render([made["policy"]], pods, NAMESPACES, NODE, NODE_IPS)
    dst = ip(made["pod"])
    assert admits(rules, ip(FRIEND), dst, 50051)
    assert admits(rules, ip(sibling), dst, 50051)  # its own replicas (session-ref forwarding)
    assert not admits(rules, ip(STRANGER), dst, 50051)
    assert not admits(rules, ip(STRANGER), dst, 9090)


# ------------------------------------------------------------ keeping kube-proxy behind us in FORWARD


class FakeForward:
    """FORWARD as `iptables -S/-I/-D` see it; records every state so a gap would show."""

    def __init__(self, rules: list[str]) -> None:
        self.rules = list(rules)
        self.states: list[list[str]] = []

    def __call__(
        self, *args: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        cmd, op, rest = args[0], args[1], list(args[2:])
        assert (cmd, rest[0]) == ("iptables", "FORWARD"), args
        out, rc = "", 0
        if op == "-S":
            out = "\n".join(["-P FORWARD ACCEPT", *(f"-A FORWARD {r}" for r in self.rules)]) + "\n"
        elif op == "-I":
            self.rules.insert(int(rest[1]) - 1, " ".join(rest[2:]))
        elif op == "-D":
            spec = " ".join(rest[1:])
            if spec in self.rules:
                self.rules.remove(spec)
            else:
                rc = 1
        self.states.append(list(self.rules))
        return subprocess.CompletedProcess(args, rc, out, "")


KUBE = ["-m conntrack --ctstate NEW -j KUBE-PROXY-FIREWALL", "-j KUBE-FORWARD"]


@pytest.mark.parametrize(
    "start",
    [
        [],
        KUBE,
        ["-j KINDNET-NETPOL", *KUBE],
        [*KUBE, "-j KINDNET-NETPOL"],
        ["-j KINDNET-NETPOL", *KUBE, "-j KINDNET-NETPOL"],
        [*KUBE, "-m comment --comment kindnet-lite-netpol -j KINDNET-NETPOL", "-j KINDNET-NETPOL"],
    ],
    ids=["empty", "kube-proxy only", "already first", "behind kube-proxy", "duplicate", "both spellings"],
)
def test_our_jump_ends_up_first_once_and_never_goes_missing(
    np: ModuleType, monkeypatch: pytest.MonkeyPatch, start: list[str]
) -> None:
    fake = FakeForward(start)
    monkeypatch.setattr(np, "iptables", fake)
    had_jump = any(r.endswith("-j KINDNET-NETPOL") for r in start)
    for _ in range(3):  # converges within two passes
        np.ensure_jump_first()
    ours = [r for r in fake.rules if r.endswith("-j KINDNET-NETPOL")]
    assert ours == fake.rules[:1], fake.rules
    assert [r for r in fake.rules if r not in ours] == [
        r for r in start if not r.endswith("-j KINDNET-NETPOL")
    ]
    if had_jump:
        assert all(any(r.endswith("-j KINDNET-NETPOL") for r in s) for s in fake.states), fake.states

"""kindnet-lite's ingress NetworkPolicy enforcer (networking.k8s.io/v1), with iptables.

Real kindnetd enforces NetworkPolicy; without this, the policies the operator writes around a BlazenPeer's
plaintext gRPC port would be accepted here and mean nothing. Every few seconds it lists NetworkPolicies,
Pods, Namespaces and Nodes with the DaemonSet's ServiceAccount and, for the pods on this node, writes one
filter chain, KINDNET-NETPOL (jumped to first from FORWARD), with iptables-restore --noflush: the chain is
replaced in one transaction, nothing else is touched.

Semantics, as Kubernetes defines them:
  * a pod selected by any policy of its namespace whose policyTypes include Ingress is isolated; what it
    admits is the union of those policies' ingress rules; a rule admits its `from` peers (empty: everyone)
    on its `ports` (empty: every port);
  * peers: podSelector (this namespace), namespaceSelector, both (AND), ipBlock with except;
  * ports: number, endPort range, protocol TCP/UDP/SCTP, named ports (looked up on the destination pod).
Also: replies to admitted connections (conntrack ESTABLISHED,RELATED), a pod's traffic to itself (hairpin
through its Service) and traffic from any node's address (kubelet probes, hostNetwork pods) always pass.

Not done: egress rules (policies are read for Ingress only), IPv6, and the same few-second window as any
polling implementation: a new pod is open until its IP is in the API and the next sync ran, and a new
client pod is not yet admitted. Connections already established when a policy changes are kept.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import ssl
import subprocess
import time
from collections.abc import Iterable, Mapping
from typing import Any

Obj = Mapping[str, Any]
# One thing an isolated pod admits: (source CIDR, protocol, destination port or "lo:hi"); None = any.
Allow = tuple[str | None, str | None, str | None]

CHAIN = "KINDNET-NETPOL"


def labels(obj: Obj) -> Mapping[str, str]:
    return obj.get("metadata", {}).get("labels") or {}


def selects(selector: Obj, lbls: Mapping[str, str]) -> bool:
    """A LabelSelector: every matchLabels pair and matchExpression holds; {} selects everything."""
    if any(lbls.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In":
            ok = key in lbls and lbls[key] in values
        elif op == "NotIn":
            ok = key not in lbls or lbls[key] not in values
        elif op == "Exists":
            ok = key in lbls
        elif op == "DoesNotExist":
            ok = key not in lbls
        else:  # the API rejects any other operator
            ok = False
        if not ok:
            return False
    return True


def pod_ip(pod: Obj) -> str | None:
    """The pod's IPv4 address while it may hold one. hostNetwork pods share the node's address and are
    outside NetworkPolicy; a finished pod's address may already belong to a new pod."""
    spec, status = pod.get("spec", {}), pod.get("status", {})
    if spec.get("hostNetwork") or status.get("phase") in ("Succeeded", "Failed"):
        return None
    for ip in [status.get("podIP"), *(a.get("ip") for a in status.get("podIPs") or [])]:
        if ip and ipaddress.ip_address(ip).version == 4:
            return ip
    return None


def policy_types(policy: Obj) -> list[str]:
    spec = policy.get("spec", {})
    # The API server fills this in; the fallback is its defaulting rule.
    return spec.get("policyTypes") or ["Ingress", *(["Egress"] if spec.get("egress") else [])]


def ipblock_cidrs(block: Obj) -> list[str]:
    """cidr minus every except, as disjoint CIDRs: one iptables rule can't say "in A but not in B or C"."""
    nets = [ipaddress.ip_network(block["cidr"], strict=False)]
    if nets[0].version != 4:
        return []
    for text in block.get("except") or []:
        hole = ipaddress.ip_network(text, strict=False)
        kept: list[Any] = []
        for net in nets:
            if hole.version != net.version or not net.overlaps(hole):
                kept.append(net)
            elif not net.subnet_of(hole):
                kept.extend(net.address_exclude(hole))
        nets = kept
    return sorted(str(n) for n in nets)


def peer_sources(
    peer: Obj, policy_ns: str, pods: Iterable[Obj], ns_labels: Mapping[str, Mapping[str, str]]
) -> list[str]:
    """The source CIDRs one `from` entry stands for."""
    if "ipBlock" in peer:
        return ipblock_cidrs(peer["ipBlock"])
    ns_sel, pod_sel = peer.get("namespaceSelector"), peer.get("podSelector")
    out = []
    for pod in pods:
        ip, ns = pod_ip(pod), pod["metadata"]["namespace"]
        if ip is None:
            continue
        # No namespaceSelector: the policy's own namespace. No podSelector: every pod of those namespaces.
        in_ns = ns == policy_ns if ns_sel is None else selects(ns_sel, ns_labels.get(ns, {}))
        if in_ns and (pod_sel is None or selects(pod_sel, labels(pod))):
            out.append(f"{ip}/32")
    return out


def named_port(pod: Obj, name: str, protocol: str) -> int | None:
    spec = pod.get("spec", {})
    for c in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
        for p in c.get("ports") or []:
            if p.get("name") == name and (p.get("protocol") or "TCP").lower() == protocol:
                return int(p["containerPort"])
    return None


def rule_ports(rule: Obj, pod: Obj) -> list[tuple[str | None, str | None]]:
    """(protocol, port) pairs a rule admits on this pod; [(None, None)] = every port."""
    if not rule.get("ports"):
        return [(None, None)]
    out: list[tuple[str | None, str | None]] = []
    for entry in rule["ports"]:
        proto = (entry.get("protocol") or "TCP").lower()
        port = entry.get("port")
        if port is None:
            out.append((proto, None))
            continue
        if isinstance(port, str) and not port.isdigit():
            port = named_port(pod, port, proto)
            if port is None:  # this pod has no such port: the entry admits nothing here
                continue
        end = entry.get("endPort")
        out.append((proto, f"{port}:{end}" if end else str(port)))
    return out


def allowed_ingress(
    pod: Obj, policies: Iterable[Obj], pods: list[Obj], ns_labels: Mapping[str, Mapping[str, str]]
) -> list[Allow] | None:
    """What the pod admits, or None when no Ingress policy selects it (it is not isolated)."""
    ns = pod["metadata"]["namespace"]
    selecting = [
        p
        for p in policies
        if p["metadata"]["namespace"] == ns
        and "Ingress" in policy_types(p)
        and selects(p["spec"].get("podSelector") or {}, labels(pod))
    ]
    if not selecting:
        return None
    allows: set[Allow] = set()
    for policy in selecting:
        for rule in policy["spec"].get("ingress") or []:
            peers = rule.get("from")
            sources: list[str | None] = (
                [s for peer in peers for s in peer_sources(peer, ns, pods, ns_labels)] if peers else [None]
            )
            allows.update((src, proto, port) for src in sources for proto, port in rule_ports(rule, pod))
    return sorted(allows, key=lambda a: tuple(x or "" for x in a))


def render(
    policies: list[Obj], pods: list[Obj], namespaces: list[Obj], node_name: str, node_ips: Iterable[str]
) -> str:
    """The iptables-restore input (--noflush) enforcing the policies for the pods on node_name.

    In KINDNET-NETPOL a packet for an isolated pod either RETURNs (admitted: FORWARD goes on as if we were
    not there) or is DROPped (a connect times out, as with most CNIs); other pods' packets fall through.
    """
    ns_labels = {n["metadata"]["name"]: labels(n) for n in namespaces}
    lines = [
        "*filter",
        f":{CHAIN} - [0:0]",
        f"-A {CHAIN} -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
        *(f"-A {CHAIN} -s {ip}/32 -j RETURN" for ip in sorted(set(node_ips))),
    ]
    local = [p for p in pods if p.get("spec", {}).get("nodeName") == node_name and pod_ip(p)]
    for pod in sorted(local, key=lambda p: (p["metadata"]["namespace"], p["metadata"]["name"])):
        allows = allowed_ingress(pod, policies, pods, ns_labels)
        if allows is None:
            continue
        dst = f"-d {pod_ip(pod)}/32"
        lines.append(f"-A {CHAIN} {dst} -s {pod_ip(pod)}/32 -j RETURN")
        for src, proto, port in allows:
            match = [dst]
            if src:
                match.append(f"-s {src}")
            if proto:
                match.append(f"-p {proto}")
            if proto and port:
                match.append(f"-m {proto} --dport {port}")
            lines.append(f"-A {CHAIN} {' '.join(match)} -j RETURN")
        meta = pod["metadata"]
        lines.append(f'-A {CHAIN} {dst} -m comment --comment "{meta["namespace"]}/{meta["name"]}" -j DROP')
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def node_ips(nodes: Iterable[Obj]) -> list[str]:
    return [
        a["address"]
        for n in nodes
        for a in n.get("status", {}).get("addresses") or []
        if a.get("type") == "InternalIP" and ipaddress.ip_address(a["address"]).version == 4
    ]


# ---- the loop: everything below talks to the API server or the kernel -------------------------------------

SA = "/var/run/secrets/kubernetes.io/serviceaccount"


class Api:
    """GETs lists from the API server over one kept-alive connection (a fresh TLS handshake four times
    every 2 s on every node would be most of this program's cost)."""

    def __init__(self) -> None:
        self.host = os.environ.get("CONTROL_PLANE_ENDPOINT") or (
            f"{os.environ['KUBERNETES_SERVICE_HOST']}:{os.environ['KUBERNETES_SERVICE_PORT']}"
        )
        self.tls = ssl.create_default_context(cafile=f"{SA}/ca.crt")
        self.conn: http.client.HTTPSConnection | None = None

    def items(self, path: str) -> list[Obj]:
        with open(f"{SA}/token") as f:  # re-read: the kubelet rotates it
            headers = {"Authorization": f"Bearer {f.read().strip()}"}
        try:
            return self._get(path, headers)
        except (OSError, http.client.HTTPException):  # the server may have closed the idle connection
            return self._get(path, headers)

    def _get(self, path: str, headers: dict[str, str]) -> list[Obj]:
        if self.conn is None:
            self.conn = http.client.HTTPSConnection(self.host, context=self.tls, timeout=10)
        try:
            # resourceVersion=0: served from the API server's watch cache, not a quorum read of etcd.
            self.conn.request("GET", f"{path}?resourceVersion=0", headers=headers)
            resp = self.conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = None
            raise
        if resp.status != 200:
            raise RuntimeError(f"GET {path}: HTTP {resp.status} {body[:200]!r}")
        return json.loads(body)["items"]


def iptables(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [args[0], "-w", "5", *args[1:]]
    return subprocess.run(cmd, input=stdin, text=True, capture_output=True, check=check)


# Two spellings of one jump, so that it can move to the top without a moment of not being there: insert
# the spelling that is absent, then delete the other one by its spec.
JUMPS = (f"-j {CHAIN}", f"-m comment --comment kindnet-lite-netpol -j {CHAIN}")


def ensure_jump_first() -> None:
    """Our jump goes before kube-proxy's, which it also inserts at the top: KUBE-FORWARD accepts
    masquerade-marked packets (a NodePort connection from outside, say) before we would see them."""
    listed = iptables("iptables", "-S", "FORWARD").stdout.splitlines()
    rules = [r.removeprefix("-A FORWARD ") for r in listed if r.startswith("-A FORWARD ")]
    ours = [r for r in rules if r in JUMPS]
    if len(ours) == 1 and rules[0] == ours[0]:
        return
    absent = [j for j in JUMPS if j not in ours]
    if absent:
        iptables("iptables", "-I", "FORWARD", "1", *absent[0].split())
        stale = next(j for j in JUMPS if j != absent[0])
    else:  # both spellings (an interrupted pass): keep the top one if it is ours; the next pass moves it
        stale = next(j for j in JUMPS if j != rules[0]) if rules[0] in JUMPS else JUMPS[1]
    while iptables("iptables", "-D", "FORWARD", *stale.split(), check=False).returncode == 0:
        pass


def main() -> None:
    node = os.environ["NODE_NAME"]
    every = float(os.environ.get("NETPOL_RESYNC_SECONDS", "2"))
    api = Api()
    applied, applied_at = "", 0.0
    print(f"netpol: enforcing ingress NetworkPolicies for the pods on {node}, every {every:g} s", flush=True)
    while True:
        try:
            text = render(
                api.items("/apis/networking.k8s.io/v1/networkpolicies"),
                api.items("/api/v1/pods"),
                api.items("/api/v1/namespaces"),
                node,
                node_ips(api.items("/api/v1/nodes")),
            )
            # Re-applied now and then unchanged too: it also puts back a chain or jump someone removed.
            if text != applied or time.monotonic() - applied_at > 30:
                iptables("iptables-restore", "--noflush", stdin=text)
                if text != applied:
                    rules = [line for line in text.splitlines() if line.startswith("-A ")]
                    isolated = sum(line.endswith(" -j DROP") for line in rules)
                    print(f"netpol: {isolated} isolated pod(s), {len(rules)} rule(s)", flush=True)
                applied, applied_at = text, time.monotonic()
            ensure_jump_first()
        except Exception as exc:  # keep the last rules and retry: failing open or closed would both be worse
            detail = exc.stderr.strip() if isinstance(exc, subprocess.CalledProcessError) else ""
            print(f"netpol: sync failed: {exc!r} {detail}", flush=True)
        time.sleep(every)


if __name__ == "__main__":
    main()

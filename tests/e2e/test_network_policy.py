"""NetworkPolicy on the kind cluster: kindnet-lite's enforcer (images/kindnet-lite) against the policy the
operator writes around a BlazenPeer's unauthenticated plaintext gRPC port, and a hand-written one.

Clients are long-running pods probed with `kubectl exec`: a TCP connect that completes is "open", one that
times out is "timeout" (the enforcer drops, so a blocked connect hangs rather than being refused).
"""

from __future__ import annotations

import json
import textwrap
import time

from .conftest import CPU_NODE, GPU_NODE, apply, kubectl, kubectl_json, wait_until
from .test_peers import CPU_STEPS, IMAGE, peer, pods, status, wait_ready

LABEL = "blazen-e2e/plaintext"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}

PROBE = textwrap.dedent(
    """
    import socket, sys
    try:
        socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
        print("open")
    except TimeoutError:
        print("timeout")
    except ConnectionRefusedError:
        print("refused")
    """
)

# A real unauthenticated call over the plaintext port with the runtime's own client.
PLAINTEXT_CALL = textwrap.dedent(
    """
    import asyncio, json, sys
    from blazen_peer.client import BlazenPeerClient

    async def main():
        async with await BlazenPeerClient.connect(f"http://{sys.argv[1]}", "e2e-plain") as c:
            resp = await c.invoke_sub_workflow("examples", ["examples::echo"], {"n": 7}, timeout_secs=20)
        print(json.dumps({"error": resp.error and str(resp.error), "result": resp.result_value()}))

    asyncio.run(main())
    """
)


def python_pod(
    ns: str, name: str, node: str, command: list[str], labels: dict[str, str] | None = None
) -> None:
    """A pod of the example image running `command` on `node` (the GPU-pool node needs its toleration)."""
    apply(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": labels or {}},
            "spec": {
                "nodeName": node,
                "tolerations": [GPU_TOLERATION],
                "terminationGracePeriodSeconds": 0,
                "containers": [
                    {
                        "name": "c",
                        "image": IMAGE,
                        "imagePullPolicy": "Never",
                        "command": command,
                        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}},
                    }
                ],
            },
        },
        ns,
    )


def client_pod(ns: str, name: str, node: str, labels: dict[str, str] | None = None) -> None:
    """A pod that only sleeps, to exec probes in."""
    python_pod(ns, name, node, ["sleep", "3600"], labels)


def running(ns: str, *names: str) -> None:
    for name in names:
        wait_until(
            f"pod {ns}/{name} Running",
            lambda name=name: kubectl_json("-n", ns, "get", "pod", name)["status"].get("phase") == "Running",
            timeout=120,
        )


def probe(ns: str, pod: str, host: str, port: int, timeout: float = 3) -> str:
    """A TCP connect from the pod: "open", "timeout" or "refused"."""
    out = kubectl("-n", ns, "exec", pod, "--", "python", "-c", PROBE, host, str(port), str(timeout))
    return out.strip()


def eventually(ns: str, pod: str, host: str, port: int, want: str, timeout: float = 60) -> None:
    """Probes until the answer is `want`: the enforcer syncs every 2 s, and a new pod becomes a known source
    only once its IP is in the API."""
    seen: list[str] = []

    def check() -> bool:
        seen.append(probe(ns, pod, host, port))
        return seen[-1] == want

    try:
        wait_until(f"{ns}/{pod} -> {host}:{port} {want}", check, timeout=timeout, interval=1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last probes: {seen[-5:]}") from None


def test_the_operators_policy_fences_the_plaintext_port(operator: str, namespace: str) -> None:
    """plaintextGrpc.allowedFrom = pods labelled LABEL=yes: they reach 50052 (TCP and a real call), from the
    peer's node and from another; an unlabelled pod, and a labelled pod of another namespace, time out. The
    operator's policy (networkPolicy.allowedFrom unset) leaves gRPC over mTLS and the HTTPS shim open to every
    pod; the plain-HTTP admin port is fenced (test below)."""
    allowed_from = [{"podSelector": {"matchLabels": {LABEL: "yes"}}}]
    apply(peer("fenced", plaintextGrpc={"enabled": True, "allowedFrom": allowed_from}), namespace)
    other_ns = f"{namespace}-other"
    kubectl("create", "namespace", other_ns)
    try:
        client_pod(namespace, "labelled", CPU_NODE, {LABEL: "yes"})
        client_pod(namespace, "labelled-remote", GPU_NODE, {LABEL: "yes"})
        client_pod(namespace, "stranger", CPU_NODE)
        client_pod(other_ns, "labelled-elsewhere", GPU_NODE, {LABEL: "yes"})
        wait_ready(namespace, "fenced")
        running(namespace, "labelled", "labelled-remote", "stranger")
        running(other_ns, "labelled-elsewhere")

        pol = kubectl_json("-n", namespace, "get", "networkpolicy", "-l", "app.kubernetes.io/instance=fenced")
        assert len(pol["items"]) == 1, pol
        (peer_pod,) = pods(namespace, "fenced")
        assert peer_pod["spec"]["nodeName"] == CPU_NODE  # so "labelled-remote" crosses nodes
        svc = f"fenced.{namespace}.svc"
        pod_ip = peer_pod["status"]["podIP"]

        # The fence is up: an unlabelled pod on the peer's own node times out, by Service and by pod IP.
        eventually(namespace, "stranger", svc, 50052, "timeout")
        assert probe(namespace, "stranger", pod_ip, 50052) == "timeout"
        # Labelled pods get through, on the same node and across nodes.
        for client in ("labelled", "labelled-remote"):
            eventually(namespace, client, svc, 50052, "open")
            assert probe(namespace, client, pod_ip, 50052) == "open"
        # podSelector alone means "in the policy's namespace": the label elsewhere does not count.
        eventually(other_ns, "labelled-elsewhere", svc, 50051, "open")  # it can reach the peer at all
        assert probe(other_ns, "labelled-elsewhere", pod_ip, 50052) == "timeout"
        # What the operator's policy leaves open, the stranger reaches: mTLS gRPC, the HTTPS shim; not admin.
        for port in (50051, 8080):
            assert probe(namespace, "stranger", svc, port) == "open", port
        assert probe(namespace, "stranger", pod_ip, 9090) == "timeout"
        # Still fenced after all that (no flapping), and a real plaintext call from a labelled pod works.
        assert probe(namespace, "stranger", svc, 50052) == "timeout"
        out = kubectl(
            "-n", namespace, "exec", "labelled-remote", "--", "python", "-c", PLAINTEXT_CALL, f"{svc}:50052"
        )
        assert json.loads(out.strip().splitlines()[-1]) == {"error": None, "result": {"n": 7}}, out
    finally:
        kubectl("delete", "namespace", other_ns, "--wait=false", check=False)


# hack/deploy-operator.sh installs the chart as release "blazen-operator" in blazen-system.
OPERATOR_LABELS = {
    "app.kubernetes.io/name": "blazen-operator",
    "app.kubernetes.io/instance": "blazen-operator",
}
RESYNC_SECONDS = 60  # the chart's default operator.resyncSeconds


def test_the_default_policy_fences_the_admin_port_to_the_operator_and_monitoring(
    operator: str, namespace: str
) -> None:
    """A BlazenPeer with no networkPolicy settings gets a policy: its plain-HTTP admin port (/metrics,
    /v1/info) admits the operator's pods and this namespace's pods labelled blazen.dev/monitoring=true, and
    times out for anyone else, including a pod that copies the operator's labels in another namespace. The
    kubelet's probes (from the node) keep the pod Ready, and the operator keeps reading /v1/info through the
    fence: status.servedSteps stays known across more than a resync period."""
    apply(peer("fenced-admin"), namespace)
    client_pod(namespace, "monitor", CPU_NODE, {"blazen.dev/monitoring": "true"})
    client_pod(namespace, "stranger", GPU_NODE)
    client_pod(namespace, "impostor", CPU_NODE, OPERATOR_LABELS)  # the operator's labels, wrong namespace
    wait_ready(namespace, "fenced-admin")
    running(namespace, "monitor", "stranger", "impostor")
    pol = kubectl_json("-n", namespace, "get", "networkpolicy", "fenced-admin")
    assert pol["spec"]["policyTypes"] == ["Ingress"]
    (peer_pod,) = pods(namespace, "fenced-admin")
    pod_ip = peer_pod["status"]["podIP"]

    eventually(namespace, "stranger", pod_ip, 9090, "timeout")
    assert probe(namespace, "impostor", pod_ip, 9090) == "timeout"
    eventually(namespace, "monitor", pod_ip, 9090, "open")
    for port in (50051, 8080):  # networkPolicy.allowedFrom unset: gRPC (mTLS) and the shim stay open
        assert probe(namespace, "stranger", pod_ip, port) == "open", port

    # The fence is up; the operator's /v1/info reads must keep getting through it: every status sample over
    # more than a resync period knows the served steps, and the pod stayed Ready without a restart.
    def steps_known() -> bool:
        st = status(namespace, "fenced-admin")
        assert st.get("servedSteps") == sorted(CPU_STEPS), st
        assert st.get("stepsUnknownPods") == 0, st
        return True

    wait_until("servedSteps known", steps_known, timeout=120)
    samples = 0
    deadline = time.monotonic() + RESYNC_SECONDS + 15
    while time.monotonic() < deadline:
        steps_known()
        samples += 1
        time.sleep(5)
    assert samples >= 10
    (after,) = pods(namespace, "fenced-admin")
    assert after["metadata"]["uid"] == peer_pod["metadata"]["uid"]
    statuses = after["status"]["containerStatuses"]
    restarted = [(c["name"], c.get("lastState")) for c in statuses if c["restartCount"]]
    assert not restarted, restarted  # why the kubelet restarted it (a probe through the fence, OOM...)
    assert probe(namespace, "stranger", pod_ip, 9090) == "timeout", "still fenced"


def test_a_policy_takes_effect_and_deleting_it_reopens_the_port(operator: str, namespace: str) -> None:
    """A hand-written deny-all ingress policy (no operator involved) closes a pod within seconds, for a
    client on another node; deleting it reopens the port."""
    python_pod(namespace, "server", GPU_NODE, ["python", "-m", "http.server", "8000"], {"app": "server"})
    client_pod(namespace, "client", CPU_NODE)
    running(namespace, "server", "client")
    server_ip = kubectl_json("-n", namespace, "get", "pod", "server")["status"]["podIP"]
    eventually(namespace, "client", server_ip, 8000, "open")

    deny = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "deny-ingress"},
        "spec": {"podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Ingress"]},
    }
    apply(deny, namespace)
    eventually(namespace, "client", server_ip, 8000, "timeout", timeout=30)
    kubectl("-n", namespace, "delete", "networkpolicy", "deny-ingress")
    eventually(namespace, "client", server_ip, 8000, "open", timeout=30)

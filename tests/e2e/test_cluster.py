"""The cluster itself: three nodes on the offline node image, the GPU pool, networking, DNS, cert-manager."""

from __future__ import annotations

import json
import subprocess

from .conftest import CLUSTER, CPU_NODE, GPU_NODE, K8S_VERSION, apply, kubectl, kubectl_json, wait_until


def test_three_nodes_ready_on_the_offline_image(cluster: str) -> None:
    nodes = kubectl_json("get", "nodes")["items"]
    assert len(nodes) == 3
    for n in nodes:
        ready = {c["type"]: c["status"] for c in n["status"]["conditions"]}["Ready"]
        assert ready == "True", n["metadata"]["name"]
        assert n["status"]["nodeInfo"]["kubeletVersion"] == K8S_VERSION
        assert n["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://")
    roles = sorted(
        "control-plane" if "node-role.kubernetes.io/control-plane" in n["metadata"]["labels"] else "worker"
        for n in nodes
    )
    assert roles == ["control-plane", "worker", "worker"]


def test_gpu_pool_node_is_labelled_tainted_and_advertises_gpus(cluster: str) -> None:
    gpu = kubectl_json("get", "node", GPU_NODE)
    assert gpu["metadata"]["labels"]["nvidia.com/gpu.present"] == "true"
    assert {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"} in gpu["spec"]["taints"]
    assert gpu["status"]["capacity"]["nvidia.com/gpu"] == "4"
    assert gpu["status"]["allocatable"]["nvidia.com/gpu"] == "4"
    cpu = kubectl_json("get", "node", CPU_NODE)
    assert "nvidia.com/gpu.present" not in cpu["metadata"]["labels"]
    assert "nvidia.com/gpu" not in cpu["status"]["capacity"]


def _node_crictl(node: str, *args: str) -> str:
    return subprocess.run(
        ["docker", "exec", node, "crictl", *args], capture_output=True, text=True, check=True, timeout=30
    ).stdout


def test_nodes_carry_the_real_crictl(cluster: str) -> None:
    """crictl built from sigs.k8s.io/cri-tools (not a stand-in) talks CRI to each node's containerd."""
    for node in (f"{CLUSTER}-control-plane", CPU_NODE, GPU_NODE):
        assert _node_crictl(node, "--version").strip() == "crictl version v1.34.0"
        # `kind load` asks `crictl inspecti` to skip images a node already has; pause is on every node.
        tags = [
            t
            for i in json.loads(_node_crictl(node, "images", "-o", "json"))["images"]
            for t in i["repoTags"] or []
        ]
        pause = next(t for t in tags if "/pause:" in t)
        assert pause in json.loads(_node_crictl(node, "inspecti", "-o", "json", pause))["status"]["repoTags"]


def test_system_pods_run(cluster: str) -> None:
    pods = kubectl_json("-n", "kube-system", "get", "pods")["items"]
    by_prefix: dict[str, int] = {}
    for p in pods:
        assert p["status"]["phase"] == "Running", (p["metadata"]["name"], p["status"].get("phase"))
        prefix = p["metadata"]["name"].split("-")[0]
        by_prefix[prefix] = by_prefix.get(prefix, 0) + 1
    assert by_prefix.get("kindnet") == 3
    assert by_prefix.get("coredns") == 2
    assert by_prefix.get("etcd") == 1


def test_pod_network_dns_and_services_across_nodes(namespace: str) -> None:
    """A server pod on the CPU worker, a client pod on the control plane: pod IP, Service VIP and DNS work."""
    # Server: the preloaded etcd image serving plain HTTP /health on a CPU-worker pod; client: the preloaded
    # kube-proxy image (Debian userland with curl) on the control-plane node.
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "etcd", "labels": {"app": "etcd"}},
        "spec": {
            "nodeName": CPU_NODE,
            "containers": [
                {
                    "name": "etcd",
                    "image": kubectl_json("-n", "kube-system", "get", "pod", "-l", "component=etcd")["items"][
                        0
                    ]["spec"]["containers"][0]["image"],
                    "imagePullPolicy": "Never",
                    "command": [
                        "etcd",
                        "--data-dir=/tmp/etcd",
                        "--listen-client-urls=http://0.0.0.0:2379",
                        "--advertise-client-urls=http://127.0.0.1:2379",
                    ],
                    "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                }
            ],
            "volumes": [{"name": "tmp", "emptyDir": {}}],
        },
    }
    apply(pod, namespace)
    apply(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "etcd"},
            "spec": {"selector": {"app": "etcd"}, "ports": [{"port": 80, "targetPort": 2379}]},
        },
        namespace,
    )
    wait_until(
        "etcd pod Ready",
        lambda: kubectl_json("-n", namespace, "get", "pod", "etcd")["status"].get("phase") == "Running",
        timeout=120,
    )
    pod_ip = kubectl_json("-n", namespace, "get", "pod", "etcd")["status"]["podIP"]
    for url in (f"http://{pod_ip}:2379/health", f"http://etcd.{namespace}.svc.cluster.local/health"):
        name = "client-" + str(abs(hash(url)) % 10000)
        apply(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name},
                "spec": {
                    "restartPolicy": "Never",
                    "nodeName": f"{CLUSTER}-control-plane",
                    "tolerations": [{"operator": "Exists"}],
                    "containers": [
                        {
                            "name": "c",
                            "image": f"registry.k8s.io/kube-proxy:{K8S_VERSION}",
                            "imagePullPolicy": "Never",
                            "command": [
                                "curl",
                                "-sS",
                                "--retry",
                                "10",
                                "--retry-all-errors",
                                "--max-time",
                                "5",
                                url,
                            ],
                        }
                    ],
                },
            },
            namespace,
        )
        wait_until(
            f"client {url} to finish",
            lambda name=name: (
                kubectl_json("-n", namespace, "get", "pod", name)["status"].get("phase")
                in ("Succeeded", "Failed")
            ),
            timeout=120,
        )
        phase = kubectl_json("-n", namespace, "get", "pod", name)["status"]["phase"]
        logs = kubectl("-n", namespace, "logs", name)
        assert phase == "Succeeded", (url, logs)
        assert json.loads(logs)["health"] == "true", logs


def test_cert_manager_issues_certificates(namespace: str) -> None:
    for d in ("cert-manager", "cert-manager-webhook", "cert-manager-cainjector"):
        dep = kubectl_json("-n", "cert-manager", "get", "deploy", d)
        assert dep["status"].get("availableReplicas") == 1, d
    apply(
        {
            "apiVersion": "cert-manager.io/v1",
            "kind": "Issuer",
            "metadata": {"name": "ss"},
            "spec": {"selfSigned": {}},
        },
        namespace,
    )
    apply(
        {
            "apiVersion": "cert-manager.io/v1",
            "kind": "Certificate",
            "metadata": {"name": "c"},
            "spec": {
                "secretName": "c-tls",
                "commonName": "c.example",
                "dnsNames": ["c.example"],
                "issuerRef": {"name": "ss", "kind": "Issuer"},
            },
        },
        namespace,
    )
    kubectl("-n", namespace, "wait", "certificate/c", "--for=condition=Ready", "--timeout=120s", timeout=130)
    secret = kubectl_json("-n", namespace, "get", "secret", "c-tls")
    assert set(secret["data"]) >= {"tls.crt", "tls.key", "ca.crt"}

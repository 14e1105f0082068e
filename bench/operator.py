"""The operator at scale: ``python -m bench.operator [--n 10 100 1000]`` (``make bench-operator``).

For each N, on a fresh control plane (tests/support/controlplane.py: etcd, kube-apiserver,
kube-controller-manager) plus kube-scheduler, the kwok controller (fake nodes; pods made Running and Ready,
no kubelet) and cert-manager's controller (the binary the kind cluster's image carries, as a local process, so
Certificates are really issued): the operator runs as its own process under the Helm chart's RBAC (a
ServiceAccount token, not system:masters), N BlazenPeers are created (every GPU_EVERY-th asks for a GPU and
lands on the tainted GPU pool; 2 replicas each) and the run records

* create -> every child exists (per peer, from watch events), and -> every BlazenPeer Ready=True;
* one create at a time on an idle operator -> all its children (SINGLE_CREATES samples);
* the operator's peak RSS (VmHWM), its RSS every RSS_PERIOD seconds, its CPU seconds, and every component's
  CPU seconds;
* API requests per BlazenPeer: the operator's own (the apiserver's audit log, filtered to its ServiceAccount)
  and every client's (apiserver_request_total from /metrics);
* one resync of N unchanged BlazenPeers: the operator's requests (target: no write request) and the objects
  whose resourceVersion moved.

Pods are simulated, so nothing listens on their IPs: kwok takes pod IPs from each fake node's podCIDR, which
here is a loopback range (127.x), and one real ``blazen-peer serve`` listens on the peers' admin port on all
addresses. Every simulated pod's ``/v1/info`` is therefore answered by that one real runtime, so
``status.servedSteps`` is real (``bench::echo``) and ``spec.steps`` is checked against it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import json
import os
import platform
import re
import secrets
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache, partial
from pathlib import Path
from typing import Any

import yaml
from blazen_operator import spec as s
from blazen_operator.apply import Api, path_for
from blazen_operator.builders import Peer, desired
from kubernetes import client, config

from tests.support import controlplane
from tests.support.controlplane import ControlPlane, eventually, install_crds
from tests.support.ports import free_port

ROOT = Path(__file__).resolve().parent.parent

OPERATOR_NS = "blazen-system"
RELEASE = "blazen-operator"
OPERATOR_USER = f"system:serviceaccount:{OPERATOR_NS}:{RELEASE}"  # the chart's ServiceAccount
BENCH_NS = "bench"
SINGLE_NS = "bench-single"
GPU_EVERY = 4  # one peer in four is a GPU peer
SINGLE_CREATES = 10
STEP = "bench::echo"
WRITE_VERBS = {"create", "update", "patch", "delete", "deletecollection"}
CPU_NODES, GPU_NODES = 4, 2
GPUS_PER_NODE = 256
CLK_TCK = os.sysconf("SC_CLK_TCK")
RSS_PERIOD = 5.0  # seconds between samples of the operator's RSS


# ---------------------------------------------------------------------------------------------- toolchain


@cache
def scale_paths() -> dict[str, Path]:
    """kube-scheduler, kwok and cert-manager's controller, as hack/kind-lib.sh places them."""
    script = (
        'source hack/kind-lib.sh; echo "$CACHE_ROOT"; echo "$K8S_VERSION"; echo "$KWOK_VERSION"; '
        'echo "$CERT_MANAGER_VERSION"'
    )
    out = subprocess.run(["bash", "-c", script], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    root, k8s, kwok, cm = out.split()
    cache_root = Path(root)
    return {
        "kube-scheduler": cache_root / f"k8s-{k8s}" / "bin" / "kube-scheduler",
        "kwok": cache_root / f"kwok-{kwok}" / "bin" / "kwok",
        "cert-manager-controller": cache_root / f"cert-manager-{cm}" / "bin" / "controller",
        "helm": Path(
            subprocess.run(
                [str(ROOT / "hack" / "build-helm.sh")], cwd=ROOT, check=True, capture_output=True, text=True
            ).stdout.strip()
        ),
    }


def missing_binaries() -> list[str]:
    return controlplane.missing_binaries() + [n for n, p in scale_paths().items() if not p.exists()]


# ---------------------------------------------------------------------------------------------- processes


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def proc_peak_rss_mb(pid: int) -> float:
    return _proc_status_mb(pid, "VmHWM")


def proc_rss_mb(pid: int) -> float:
    return _proc_status_mb(pid, "VmRSS")


def _proc_status_mb(pid: int, name: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1]) / 1024
    return 0.0


class RssSeries:
    """A process's RSS every ``period`` seconds while the block runs, in a thread: the peak alone does not
    say whether memory is held or only passes through (and whether the heap trim hands it back)."""

    def __init__(self, pid: int, period: float = RSS_PERIOD) -> None:
        self.pid, self.period = pid, period
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-series")

    def __enter__(self) -> RssSeries:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with contextlib.suppress(OSError):  # the process is gone: the series ends
                self.samples.append(round(proc_rss_mb(self.pid), 1))
            if self._stop.wait(self.period):
                return


def kubeconfig(path: Path, server: str, ca: Path, token: str, namespace: str = "default") -> Path:
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": "u", "user": {"token": token}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u", "namespace": namespace}}],
        "current-context": "c",
    }
    path.write_text(json.dumps(cfg))
    return path


def api_for(kubeconfig_path: Path) -> Api:
    cfg = client.Configuration()
    config.load_kube_config(config_file=str(kubeconfig_path), client_configuration=cfg)
    return Api(cfg)


# ---------------------------------------------------------------------------------------------- watches


class Watcher:
    """First time each object of a resource was seen (ADDED) and when each BlazenPeer first turned Ready."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self.seen: dict[tuple[str, str], float] = {}  # (kind, name) -> monotonic time
        self.ready: dict[str, float] = {}
        self._conns: list[http.client.HTTPSConnection] = []
        self._lock = threading.Lock()

    def watch(self, api_version: str, kind: str, namespace: str) -> None:
        ctx = ssl.create_default_context(cafile=str(self.cp.ca))
        conn = http.client.HTTPSConnection("127.0.0.1", self.cp.apiserver_port, context=ctx)
        path = path_for(api_version, kind, namespace) + "?watch=1&timeoutSeconds=3600"
        conn.request("GET", path, headers={"Authorization": f"Bearer {self.cp.token}"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"watch {kind}: {resp.status} {resp.read()[:300]!r}")
        self._conns.append(conn)
        threading.Thread(target=self._read, args=(kind, resp), daemon=True, name=f"watch-{kind}").start()

    def _read(self, kind: str, resp: http.client.HTTPResponse) -> None:
        # close() shuts the socket down under the reader: whatever that raises ends the loop
        with contextlib.suppress(OSError, ValueError, AttributeError, http.client.HTTPException):
            for line in resp:
                now = time.monotonic()
                event = json.loads(line)
                obj = event.get("object") or {}
                name = (obj.get("metadata") or {}).get("name")
                if event.get("type") not in ("ADDED", "MODIFIED") or not name:
                    continue
                with self._lock:
                    self.seen.setdefault((kind, name), now)
                    if kind == s.KIND and is_ready(obj):
                        self.ready.setdefault(name, now)

    def has(self, keys: set[tuple[str, str]]) -> bool:
        with self._lock:
            return all(k in self.seen for k in keys)

    def last_seen(self, keys: set[tuple[str, str]]) -> float:
        with self._lock:
            return max(self.seen[k] for k in keys)

    def ready_times(self) -> dict[str, float]:
        with self._lock:
            return dict(self.ready)

    def close(self) -> None:
        for conn in self._conns:
            with contextlib.suppress(OSError, AttributeError):
                conn.sock.shutdown(socket.SHUT_RDWR)


def is_ready(obj: dict[str, Any]) -> bool:
    conds = (obj.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)


# ---------------------------------------------------------------------------------------------- the cluster


def peer_manifest(name: str, namespace: str, gpu: bool, admin_port: int) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "image": "blazen-fleet/peer-runtime:dev",
        "entrypoint": "bench.steps",
        "steps": [STEP],
        "replicas": 2,
        "ports": {"admin": admin_port},
    }
    if gpu:
        spec["hardware"] = {"gpu": 1}
    return {
        "apiVersion": s.API_VERSION,
        "kind": s.KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def fake_node(name: str, index: int, gpu: bool) -> dict[str, Any]:
    capacity = {"cpu": "1000", "memory": "4Ti", "pods": "2000", "ephemeral-storage": "10Ti"}
    labels = {"kubernetes.io/hostname": name, "type": "kwok", "blazen.dev/pool": "gpu" if gpu else "cpu"}
    node_spec: dict[str, Any] = {"podCIDR": f"127.{100 + index}.0.0/16"}
    if gpu:
        capacity["nvidia.com/gpu"] = str(GPUS_PER_NODE)
        labels["nvidia.com/gpu.present"] = "true"
        node_spec["taints"] = [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels, "annotations": {"kwok.x-k8s.io/node": "fake"}},
        "spec": node_spec,
        "status": {"capacity": capacity, "allocatable": capacity},
    }


@dataclass
class ScaleCluster:
    cp: ControlPlane
    admin: Api
    admin_port: int = 0
    operator: subprocess.Popen | None = None
    operator_metrics_port: int = 0
    operator_liveness_port: int = 0
    operator_env: dict[str, str] = field(default_factory=dict)  # the chart's (MALLOC_ARENA_MAX)
    operator_token: str = ""
    components: dict[str, int] = field(default_factory=dict)  # name -> pid

    @property
    def audit_log(self) -> Path:
        return self.cp.workdir / "audit.log"

    @classmethod
    @contextlib.contextmanager
    def start(cls, workdir: Path, resync_seconds: float | None = 60.0) -> Iterator[ScaleCluster]:
        """Everything up and running; with ``resync_seconds=None`` the operator is left for
        :meth:`start_operator`."""
        if missing := missing_binaries():
            raise RuntimeError(f"binaries missing: {missing}; run `make toolchain-bench`")
        workdir.mkdir(parents=True, exist_ok=True)
        policy = {
            "apiVersion": "audit.k8s.io/v1",
            "kind": "Policy",
            "omitStages": ["RequestReceived", "ResponseStarted"],
            "rules": [{"level": "Metadata", "users": [OPERATOR_USER]}, {"level": "None"}],
        }
        (workdir / "audit-policy.yaml").write_text(json.dumps(policy))
        extra = {
            "kube-apiserver": [
                f"--audit-policy-file={workdir / 'audit-policy.yaml'}",
                f"--audit-log-path={workdir / 'audit.log'}",
                "--audit-log-format=json",
                "--audit-log-maxsize=0",
                # every BlazenPeer has a ClusterIP Service: the API tests' /24 runs out at ~250 peers
                "--service-cluster-ip-range=10.96.0.0/16",
            ],
            # kube-controller-manager's default client limit (20 qps) would be what the benchmark measures, so
            # it gets 100/200 (as kube-scheduler and cert-manager do here). Its endpoint controllers are off:
            # the simulated pods' loopback IPs (see the docstring) are not valid endpoint addresses, and
            # nothing here reads endpoints.
            "kube-controller-manager": [
                "--kube-api-qps=100",
                "--kube-api-burst=200",
                "--controllers=*,-endpoint,-endpointslice,-endpointslicemirroring",
            ],
        }
        with ControlPlane.start(workdir, extra_args=extra) as cp:
            sc = cls(cp=cp, admin=api_for(cp.kubeconfig))
            sc._start(resync_seconds)
            yield sc

    def _start(self, resync_seconds: float | None) -> None:
        paths, cp, wd = scale_paths(), self.cp, self.cp.workdir
        # every CRD the operator watches: its resync loop lists BlazenFleets too
        crds = [
            controlplane.cert_manager_crds(),
            ROOT / "crds" / "blazenpeers.yaml",
            ROOT / "crds" / "blazenfleets.yaml",
        ]
        install_crds(self.admin, crds)
        eventually(
            lambda: self.admin.request("GET", "/apis/blazen.dev/v1alpha1"), what="blazen.dev discovery"
        )

        sched_cfg = {
            "apiVersion": "kubescheduler.config.k8s.io/v1",
            "kind": "KubeSchedulerConfiguration",
            "clientConnection": {"kubeconfig": str(cp.kubeconfig), "qps": 100, "burst": 200},
            "leaderElection": {"leaderElect": False},
        }
        (wd / "scheduler.yaml").write_text(json.dumps(sched_cfg))
        sched_port = free_port()
        cp.spawn(
            "kube-scheduler",
            [
                str(paths["kube-scheduler"]),
                f"--config={wd / 'scheduler.yaml'}",
                f"--authentication-kubeconfig={cp.kubeconfig}",
                f"--authorization-kubeconfig={cp.kubeconfig}",
                f"--secure-port={sched_port}",
                "--bind-address=127.0.0.1",
                "-v=1",
            ],
        )
        for i in range(CPU_NODES + GPU_NODES):
            gpu = i >= CPU_NODES
            name = f"kwok-{'gpu' if gpu else 'cpu'}-{i}"
            self.admin.request("POST", "/api/v1/nodes", body=fake_node(name, i, gpu))
        cp.spawn(
            "kwok",
            [
                str(paths["kwok"]),
                f"--kubeconfig={cp.kubeconfig}",
                "--manage-all-nodes=false",
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                f"--server-address=127.0.0.1:{free_port()}",
                "--node-lease-duration-seconds=40",
            ],
        )
        cp.spawn(
            "cert-manager-controller",
            [
                str(paths["cert-manager-controller"]),
                f"--kubeconfig={cp.kubeconfig}",
                "--leader-elect=false",
                f"--metrics-listen-address=127.0.0.1:{free_port()}",
                # Its default client limit (20 qps, burst 50) throttled issuance at N=100 (waits of over a
                # second in its log): two Certificates per BlazenPeer. Same limit as kube-controller-manager.
                "--kube-api-qps=100",
                "--kube-api-burst=200",
                "-v=1",
            ],
        )

        def nodes_ready() -> bool:
            nodes = self.admin.request("GET", "/api/v1/nodes")["items"]
            return len(nodes) == CPU_NODES + GPU_NODES and all(_node_ready(n) for n in nodes)

        cp.wait_for(nodes_ready, "kwok nodes Ready", 60)

        # The peers' admin port: one real runtime answers /v1/info for every simulated pod (docstring).
        self.admin_port = free_port()
        cp.spawn(
            "info-peer",
            [
                str(Path(sys.executable).with_name("blazen-peer")),
                "serve",
                "--insecure",
                "--entrypoint",
                "bench.steps",
                f"--grpc-addr=127.0.0.1:{free_port()}",
                f"--admin-addr=0.0.0.0:{self.admin_port}",
                "--log-level=WARNING",
            ],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        cp.wait_for(lambda: _http_ok(f"http://127.0.0.1:{self.admin_port}/v1/info"), "info peer", 30)

        self._operator_identity(paths["helm"])
        for ns in (BENCH_NS, SINGLE_NS):
            self.admin.request("POST", "/api/v1/namespaces", body=_namespace(ns))
        if resync_seconds is not None:
            self.start_operator(resync_seconds)

    def start_operator(
        self, resync_seconds: float, server: str | None = None, extra_args: tuple[str, ...] = ()
    ) -> None:
        """The operator as its own process with the chart's identity; ``server`` overrides the API address
        (the watch-stall test puts a proxy there)."""
        cp, wd = self.cp, self.cp.workdir
        kubeconfig(wd / "operator.kubeconfig", server or cp.server, cp.ca, self.operator_token, OPERATOR_NS)
        self.operator_metrics_port = free_port()
        liveness = self.operator_liveness_port = free_port()
        self.operator = cp.spawn(
            "operator",
            [
                sys.executable,
                "-m",
                "blazen_operator",
                "run",
                "--all-namespaces",
                f"--liveness-port={liveness}",
                f"--metrics-port={self.operator_metrics_port}",
                f"--resync-seconds={resync_seconds}",
                *extra_args,
            ],
            env={**os.environ, **self.operator_env, "KUBECONFIG": str(wd / "operator.kubeconfig")},
        )
        cp.wait_for(lambda: _http_ok(f"http://127.0.0.1:{liveness}/healthz"), "operator liveness", 60)
        self.components = {name: p.pid for name, p in cp.procs.items()}

    def _operator_identity(self, helm: Path) -> None:
        """The chart's ServiceAccount, ClusterRoles and bindings, applied as rendered; a token for that
        ServiceAccount (TokenRequest) in the operator's kubeconfig; the environment the chart's Deployment
        sets (the literal values)."""
        rendered = subprocess.run(
            [
                str(helm),
                "template",
                RELEASE,
                str(ROOT / "helm" / "blazen-operator"),
                "--namespace",
                OPERATOR_NS,
                "--show-only",
                "templates/serviceaccount.yaml",
                "--show-only",
                "templates/rbac.yaml",
                "--show-only",
                "templates/deployment.yaml",
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        self.admin.request("POST", "/api/v1/namespaces", body=_namespace(OPERATOR_NS))
        sa_name = None
        for doc in yaml.safe_load_all(rendered):
            if not doc:
                continue
            if doc["kind"] == "Deployment":  # not deployed: the environment its container gets
                (container,) = doc["spec"]["template"]["spec"]["containers"]
                self.operator_env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
                continue
            if doc["kind"] == "ServiceAccount":
                sa_name = doc["metadata"]["name"]
            group, _, version = doc["apiVersion"].rpartition("/")
            plural = {"ServiceAccount": "serviceaccounts"}.get(doc["kind"], doc["kind"].lower() + "s")
            ns = doc["metadata"].get("namespace")
            base = f"/apis/{group}/{version}" if group else f"/api/{version}"
            path = f"{base}/namespaces/{ns}/{plural}" if ns else f"{base}/{plural}"
            self.admin.request("POST", path, body=doc)
        assert sa_name == RELEASE, sa_name
        self.operator_token = self.admin.request(
            "POST",
            f"/api/v1/namespaces/{OPERATOR_NS}/serviceaccounts/{sa_name}/token",
            body={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {}},
        )["status"]["token"]

    # ------------------------------------------------------------------------------------------ observe
    def operator_metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.operator_metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("blazen_operator_"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def reconciles(self) -> float:
        m = self.operator_metrics()
        return sum(v for k, v in m.items() if k.startswith("blazen_operator_reconciles_total"))

    def apiserver_requests(self) -> Counter[str]:
        text = _get_text(self.cp, "/metrics")
        out: Counter[str] = Counter()
        for line in text.splitlines():
            if line.startswith("apiserver_request_total{"):
                verb = re.search(r'verb="([A-Z]+)"', line)
                out[verb.group(1) if verb else "?"] += int(float(line.rsplit(" ", 1)[1]))
        return out

    def audit_offset(self) -> int:
        return self.audit_log.stat().st_size if self.audit_log.exists() else 0

    def operator_requests(self, start: int, end: int | None = None) -> Counter[str]:
        """The operator's requests between two audit-log offsets, by verb (watches excluded: they are
        long-lived, logged when they end)."""
        out: Counter[str] = Counter()
        with self.audit_log.open("rb") as f:
            f.seek(start)
            data = f.read() if end is None else f.read(end - start)
        for line in data.splitlines():
            event = json.loads(line)
            if event.get("user", {}).get("username") != OPERATOR_USER or event["verb"] == "watch":
                continue
            ref = event.get("objectRef") or {}
            sub = f"/{ref['subresource']}" if ref.get("subresource") else ""
            what = ref.get("resource") or event.get("requestURI", "?").split("?")[0]  # discovery: no resource
            out[f"{event['verb']} {what}{sub}"] += 1
        return out

    def resource_versions(self, namespace: str, kinds: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
        out = {}
        for api_version, kind in kinds:
            for item in self.admin.collect(api_version, kind, namespace).items:
                out[(kind, item["metadata"]["name"])] = item["metadata"]["resourceVersion"]
        return out

    def cpu_seconds(self) -> dict[str, float]:
        out = {}
        for name, pid in self.components.items():
            with contextlib.suppress(OSError):
                out[name] = proc_cpu_seconds(pid)
        return out


def _namespace(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


def _node_ready(node: dict[str, Any]) -> bool:
    conds = (node.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def _get_text(cp: ControlPlane, path: str) -> str:
    ctx = ssl.create_default_context(cafile=str(cp.ca))
    req = urllib.request.Request(cp.server + path, headers={"Authorization": f"Bearer {cp.token}"})
    with urllib.request.urlopen(req, timeout=30, context=ctx) as resp:
        return resp.read().decode()


# ---------------------------------------------------------------------------------------------- the run


def child_keys(body: dict[str, Any]) -> set[tuple[str, str]]:
    return {(c.manifest["kind"], c.manifest["metadata"]["name"]) for c in desired(Peer.from_body(body))}


def child_kinds(body: dict[str, Any]) -> list[tuple[str, str]]:
    kinds = {(c.manifest["apiVersion"], c.manifest["kind"]) for c in desired(Peer.from_body(body))}
    return sorted(kinds)


def wait_quiet(sc: ScaleCluster, seconds: float = 3.0, timeout: float = 600.0) -> None:
    """Until the operator's reconcile counter stops moving for ``seconds``."""
    deadline = time.monotonic() + timeout
    last, since = sc.reconciles(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = sc.reconciles()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= seconds:
            return
    raise TimeoutError("the operator never went quiet")


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def single_creates(sc: ScaleCluster, count: int) -> list[float]:
    """Create one BlazenPeer at a time, each on an idle operator (the previous one's reconciles done); seconds
    from the create returning to the last of its children existing."""
    watcher = Watcher(sc.cp)
    probe = sc.admin.request(
        "POST",
        path_for(s.API_VERSION, s.KIND, SINGLE_NS),
        body=peer_manifest("single-0", SINGLE_NS, False, sc.admin_port),
    )
    for api_version, kind in child_kinds(probe):
        watcher.watch(api_version, kind, SINGLE_NS)
    eventually(lambda: watcher.has(child_keys(probe)), timeout=60, what="single-0 children")
    latencies = []
    try:
        for i in range(1, count + 1):
            wait_quiet(sc, seconds=2)
            body = peer_manifest(f"single-{i}", SINGLE_NS, i % GPU_EVERY == 0, sc.admin_port)
            created = sc.admin.request("POST", path_for(s.API_VERSION, s.KIND, SINGLE_NS), body=body)
            t0 = time.monotonic()
            keys = child_keys(created)
            eventually(partial(watcher.has, keys), timeout=60, interval=0.01, what="children")
            latencies.append(watcher.last_seen(keys) - t0)
    finally:
        watcher.close()
    return latencies


def _until(check, deadline: float) -> bool:
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return check()


def _final(sc: ScaleCluster, rss: RssSeries) -> dict[str, Any]:
    """Warning Events in the benchmark namespace, the operator's peak RSS (and its RSS every few seconds
    since it started), CPU and tracebacks so far."""
    events = sc.admin.collect("v1", "Event", BENCH_NS).items
    warnings = Counter(
        f"{e.get('reportingComponent') or (e.get('source') or {}).get('component')}: "
        f"{e['involvedObject'].get('kind')}/{e['involvedObject'].get('name')}: {e.get('reason')}: "
        f"{e.get('message', '')[:160]}"
        for e in events
        if e.get("type") == "Warning"
    )
    assert sc.operator is not None
    return {
        "warning_events": dict(warnings.most_common(20)),
        "warning_event_count": sum(warnings.values()),
        "operator_peak_rss_mb": round(proc_peak_rss_mb(sc.operator.pid), 1),
        f"operator_rss_mb_every_{rss.period:g}s": list(rss.samples),
        "operator_cpu_s": round(proc_cpu_seconds(sc.operator.pid), 1),
        "operator_log_tracebacks": (sc.cp.workdir / "operator.log")
        .read_text(errors="replace")
        .count("Traceback"),
    }


def _pid(sc: ScaleCluster) -> int:
    assert sc.operator is not None
    return sc.operator.pid


def run(n: int, workdir: Path, resync_seconds: float, ready_timeout: float) -> dict[str, Any]:
    result: dict[str, Any] = {"n": n, "resync_seconds": resync_seconds}
    with ScaleCluster.start(workdir, resync_seconds) as sc, RssSeries(_pid(sc)) as rss:
        result["single_create_children_s"] = single_creates(sc, SINGLE_CREATES)
        wait_quiet(sc)

        watcher = Watcher(sc.cp)
        sample = sc.admin.request(
            "GET", path_for(s.API_VERSION, s.KIND, SINGLE_NS, "single-1")
        )  # any peer: the kinds of children
        kinds = child_kinds(sample)
        for api_version, kind in [*kinds, (s.API_VERSION, s.KIND)]:
            watcher.watch(api_version, kind, BENCH_NS)

        cpu0, audit0, req0 = sc.cpu_seconds(), sc.audit_offset(), sc.apiserver_requests()
        rec_start = sc.reconciles()
        created: dict[str, tuple[float, set[tuple[str, str]]]] = {}
        t0 = time.monotonic()

        def create(i: int) -> None:
            body = peer_manifest(f"peer-{i:04d}", BENCH_NS, i % GPU_EVERY == 0, sc.admin_port)
            obj = sc.admin.request("POST", path_for(s.API_VERSION, s.KIND, BENCH_NS), body=body)
            created[obj["metadata"]["name"]] = (time.monotonic(), child_keys(obj))

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(create, range(n)))
        result["create_s"] = time.monotonic() - t0

        def all_children() -> bool:
            return all(watcher.has(keys) for _, keys in created.values())

        # One deadline for the run: past it, the figures reached so far are recorded and the resync skipped.
        deadline = t0 + ready_timeout
        complete = _until(all_children, deadline) and _until(
            lambda: len(watcher.ready_times()) == n, deadline
        )
        watcher.close()
        done = [keys for _, keys in created.values() if watcher.has(keys)]
        result["children_complete"] = len(done)
        if len(done) == n:
            per_peer = [watcher.last_seen(keys) - t for t, keys in created.values()]
            result["all_children_s"] = max(watcher.last_seen(keys) for keys in done) - t0
            result["peer_children_p50_s"] = _pct(per_peer, 0.5)
            result["peer_children_p99_s"] = _pct(per_peer, 0.99)
        ready = watcher.ready_times()
        result["ready_count"] = len(ready)
        ready_peer = [ready[name] - t for name, (t, _) in created.items() if name in ready]
        result["peer_ready_p50_s"] = _pct(ready_peer, 0.5)
        if complete:
            result["all_ready_s"] = max(ready.values()) - t0
            wait_quiet(sc)
        else:
            result["gave_up_after_s"] = ready_timeout
        cpu1, audit1, req1 = sc.cpu_seconds(), sc.audit_offset(), sc.apiserver_requests()
        result["phase_s"] = time.monotonic() - t0
        result["cpu_s_to_quiet"] = {k: round(cpu1[k] - cpu0.get(k, 0), 1) for k in cpu1}
        ops = sc.operator_requests(audit0, audit1)
        result["operator_requests"] = dict(ops.most_common())
        result["operator_requests_per_peer"] = sum(ops.values()) / n
        result["reconciles_per_peer"] = (sc.reconciles() - rec_start) / n
        all_reqs = req1 - req0
        result["apiserver_requests_per_peer"] = sum(all_reqs.values()) / n
        result["apiserver_requests_by_verb"] = dict(all_reqs.most_common())
        if not complete:
            result.update(_final(sc, rss))
            return result

        # one resync of N unchanged BlazenPeers
        rv_kinds = [*kinds, (s.API_VERSION, s.KIND), ("v1", "Event")]
        # the operator is quiet, but cert-manager may still be posting the Events of the last issuances (its
        # client is rate limited): start from a namespace where nothing moves
        rv0 = sc.resource_versions(BENCH_NS, rv_kinds)
        settle_deadline = time.monotonic() + 120
        while time.monotonic() < settle_deadline:
            time.sleep(3)
            rv_now = sc.resource_versions(BENCH_NS, rv_kinds)
            if rv_now == rv0:
                break
            rv0 = rv_now
        base = sc.operator_metrics().get("blazen_operator_last_resync_timestamp_seconds", 0.0)
        audit2, rec0 = sc.audit_offset(), sc.reconciles()
        t_resync = time.monotonic()
        eventually(
            lambda: sc.operator_metrics().get("blazen_operator_last_resync_timestamp_seconds", 0) > base,
            timeout=resync_seconds + 60,
            what="a resync",
        )
        total_peers = n + SINGLE_CREATES + 1
        eventually(lambda: sc.reconciles() >= rec0 + total_peers, timeout=ready_timeout, what="resync pass")
        wait_quiet(sc)
        result["resync_pass_s"] = time.monotonic() - t_resync
        resync_ops = sc.operator_requests(audit2)
        rv1 = sc.resource_versions(BENCH_NS, rv_kinds)
        result["resync_peers"] = total_peers
        result["resync_operator_requests"] = dict(resync_ops.most_common())
        result["resync_write_requests"] = sum(v for k, v in resync_ops.items() if k.split()[0] in WRITE_VERBS)
        result["resync_requests_per_peer"] = round(sum(resync_ops.values()) / total_peers, 2)
        result["resync_changed_objects"] = sorted(
            f"{k}/{n_}" for (k, n_), v in rv1.items() if rv0.get((k, n_)) != v
        )

        result.update(_final(sc, rss))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.operator", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[10, 100, 1000], help="BlazenPeers per run")
    parser.add_argument("--resync-seconds", type=float, default=60.0, help="the operator's (chart default)")
    parser.add_argument("--ready-timeout", type=float, default=900.0, help="give up on a run after this")
    parser.add_argument("--workdir", type=Path, default=None, help="logs and etcd data (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here too")
    args = parser.parse_args(argv)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    base = args.workdir or Path(f"/tmp/bench-operator-{stamp}-{secrets.token_hex(2)}")
    header = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_before": os.getloadavg(),
    }
    print(json.dumps(header), flush=True)
    results = []
    for n in args.n:
        res = run(n, base / f"n{n}", args.resync_seconds, args.ready_timeout)
        res["loadavg_after"] = os.getloadavg()
        results.append(res)
        print(json.dumps(res), flush=True)
    if args.out:
        args.out.write_text(json.dumps({**header, "runs": results}, indent=1))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())

"""A minimal Kubernetes control plane as host processes: etcd, kube-apiserver and kube-controller-manager.

Binaries come from hack/build-etcd.sh and hack/build-k8s.sh (paths from hack/lib.sh, the one place
that computes them). Authentication is a static token file (one admin token in system:masters);
authorization is RBAC; the service-account key pair is generated with `cryptography`. No kubelet or
scheduler: pods are created by the ReplicaSet controller but never run, so Deployments get real status
(replicas, updatedReplicas; readyReplicas 0) and the garbage collector works.

    with ControlPlane.start(workdir) as cp:
        cp.kubeconfig  # path: admin token, the apiserver's self-generated CA
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

from .ports import free_port

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


@cache
def toolchain_paths() -> dict[str, Path]:
    """etcd / kube-apiserver / kube-controller-manager paths, as hack/lib.sh computes them."""
    script = 'source hack/lib.sh; echo "$CACHE_ROOT"; echo "$K8S_VERSION"; echo "$ETCD_VERSION"'
    out = subprocess.run(["bash", "-c", script], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    cache_root, k8s, etcd = out.split()
    k8s_bin = Path(cache_root) / f"k8s-{k8s}" / "bin"
    return {
        "cache_root": Path(cache_root),
        "etcd": Path(cache_root) / f"etcd-{etcd}" / "bin" / "etcd",
        "kube-apiserver": k8s_bin / "kube-apiserver",
        "kube-controller-manager": k8s_bin / "kube-controller-manager",
    }


def cert_manager_crds() -> Path:
    """cert-manager's CRDs as plain YAML (hack/cert-manager-crds.sh caches them from the Go module cache)."""
    out = subprocess.run(
        [str(ROOT / "hack" / "cert-manager-crds.sh")], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    return Path(out.strip().splitlines()[-1])


def missing_binaries() -> list[str]:
    return [name for name, path in toolchain_paths().items() if name != "cache_root" and not path.exists()]


def _write_sa_keys(directory: Path) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    priv = directory / "sa.key"
    pub = directory / "sa.pub"
    priv.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return priv, pub


@dataclass
class ControlPlane:
    workdir: Path
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    # A second, unprivileged user (no groups): the API tests bind the operator's Helm RBAC to it and run the
    # operator as this user, so a call the chart does not grant fails.
    operator_user: str = "blazen-operator"
    operator_token: str = field(default_factory=lambda: secrets.token_hex(16))
    etcd_port: int = field(default_factory=free_port)
    etcd_peer_port: int = field(default_factory=free_port)
    apiserver_port: int = field(default_factory=free_port)
    kcm_port: int = field(default_factory=free_port)
    # extra command-line flags per component ("kube-apiserver", "kube-controller-manager"), appended to ours
    extra_args: dict[str, list[str]] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    startup_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.apiserver_port}"

    @property
    def ca(self) -> Path:
        """The apiserver's self-generated serving chain (leaf + its CA), valid for 127.0.0.1."""
        return self.workdir / "certs" / "apiserver.crt"

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "kubeconfig"

    @property
    def operator_kubeconfig(self) -> Path:
        """A kubeconfig for the unprivileged operator user."""
        return self.workdir / "operator.kubeconfig"

    # ---------------------------------------------------------------------------------------------- start
    @classmethod
    @contextlib.contextmanager
    def start(cls, workdir: Path, **fields: Any):
        cp = cls(workdir=workdir, **fields)
        try:
            cp._start()
            yield cp
        finally:
            cp.stop()

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start a component in its own session, logging to <workdir>/<name>.log; `stop` ends it (last
        started, first stopped)."""
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        log.close()
        self.procs[name] = proc
        return proc

    def _start(self) -> None:
        paths = toolchain_paths()
        if missing := missing_binaries():
            raise RuntimeError(f"control-plane binaries missing: {missing}; run `make toolchain-api`")
        self.workdir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()

        self.spawn(
            "etcd",
            [
                str(paths["etcd"]),
                "--data-dir",
                str(self.workdir / "etcd"),
                "--listen-client-urls",
                f"http://127.0.0.1:{self.etcd_port}",
                "--advertise-client-urls",
                f"http://127.0.0.1:{self.etcd_port}",
                "--listen-peer-urls",
                f"http://127.0.0.1:{self.etcd_peer_port}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{self.etcd_peer_port}",
                "--initial-cluster",
                f"default=http://127.0.0.1:{self.etcd_peer_port}",
                "--unsafe-no-fsync",
                "--quota-backend-bytes",
                str(2 << 30),
                "--log-level",
                "warn",
            ],
        )
        self.wait_for(lambda: self._http_ok(f"http://127.0.0.1:{self.etcd_port}/health"), "etcd", 30)
        self.startup_seconds["etcd"] = time.monotonic() - t0

        (self.workdir / "certs").mkdir(exist_ok=True)
        token_file = self.workdir / "tokens.csv"
        token_file.write_text(
            f'{self.token},admin,admin-uid,"system:masters"\n'
            f"{self.operator_token},{self.operator_user},{self.operator_user}-uid\n"
        )
        sa_key, sa_pub = _write_sa_keys(self.workdir)
        self.spawn(
            "kube-apiserver",
            [
                str(paths["kube-apiserver"]),
                f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
                f"--cert-dir={self.workdir / 'certs'}",
                f"--secure-port={self.apiserver_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                "--endpoint-reconciler-type=none",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--allow-privileged=true",
                f"--token-auth-file={token_file}",
                "--anonymous-auth=false",
                "--authorization-mode=RBAC",
                f"--service-account-issuer={self.server}",
                f"--service-account-key-file={sa_pub}",
                f"--service-account-signing-key-file={sa_key}",
                "--enable-priority-and-fairness=false",
                "-v=1",
                *self.extra_args.get("kube-apiserver", []),
            ],
        )
        t1 = time.monotonic()
        self.wait_for(lambda: self._http_ok(f"{self.server}/readyz", token=self.token), "kube-apiserver", 90)
        self.startup_seconds["kube-apiserver"] = time.monotonic() - t1

        self._write_kubeconfig()
        self.spawn(
            "kube-controller-manager",
            [
                str(paths["kube-controller-manager"]),
                f"--kubeconfig={self.kubeconfig}",
                f"--authentication-kubeconfig={self.kubeconfig}",
                f"--authorization-kubeconfig={self.kubeconfig}",
                f"--service-account-private-key-file={sa_key}",
                "--leader-elect=false",
                "--use-service-account-credentials=false",
                f"--secure-port={self.kcm_port}",
                "--bind-address=127.0.0.1",
                "--concurrent-gc-syncs=5",
                "-v=1",
                *self.extra_args.get("kube-controller-manager", []),
            ],
        )
        t2 = time.monotonic()
        self.wait_for(
            lambda: self._http_ok(f"https://127.0.0.1:{self.kcm_port}/healthz", token=self.token), "kcm", 60
        )
        self.startup_seconds["kube-controller-manager"] = time.monotonic() - t2
        self.startup_seconds["total"] = time.monotonic() - t0

    def _write_kubeconfig(self) -> None:
        self.kubeconfig.write_text(json.dumps(self._kubeconfig("admin", self.token)))
        self.operator_kubeconfig.write_text(
            json.dumps(self._kubeconfig(self.operator_user, self.operator_token))
        )

    def _kubeconfig(self, user: str, token: str) -> dict[str, object]:
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": "api", "cluster": {"server": self.server, "certificate-authority": str(self.ca)}}
            ],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [
                {"name": "api", "context": {"cluster": "api", "user": user, "namespace": "default"}}
            ],
            "current-context": "api",
        }

    def _http_ok(self, url: str, token: str | None = None) -> bool:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(req, timeout=2, context=ctx) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_for(self, check, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    tail = (self.workdir / f"{name}.log").read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail}")
            if check():
                return
            time.sleep(0.2)
        raise TimeoutError(f"{what} not ready after {timeout}s (logs in {self.workdir})")

    # ---------------------------------------------------------------------------------------------- stop
    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            proc = self.procs.pop(name)
            if proc.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


def install_crds(api: Any, paths: list[Path]) -> None:
    """Server-side apply every CustomResourceDefinition in ``paths`` and wait until all are Established."""
    import yaml

    names = []
    for path in paths:
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            name = doc["metadata"]["name"]
            api.request(
                "PATCH",
                f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}",
                query={"fieldManager": "blazen-tests", "force": "true"},
                body=doc,
                content_type="application/apply-patch+yaml",
            )
            names.append(name)

    def established() -> bool:
        for name in names:
            crd = api.request("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
            conds = {c["type"]: c["status"] for c in crd.get("status", {}).get("conditions", [])}
            if conds.get("Established") != "True":
                return False
        return True

    eventually(established, timeout=60, what="CRDs established")


def eventually(check: Callable[[], T], timeout: float = 30.0, interval: float = 0.2, what: str = "") -> T:
    """Poll ``check`` until it returns a truthy value without raising AssertionError/ApiError."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = check()
            if value:
                return value
            last = None
        except (AssertionError, KeyError, TypeError, LookupError) as exc:
            last = exc
        except Exception as exc:  # API errors (e.g. 404 while an object is being created)
            if type(exc).__name__ != "ApiError":
                raise
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what or check}: {last!r}"
            ) from last
        time.sleep(interval)

"""The trust passes (operator/blazen_operator/trust.py) over a small in-memory API server, with real peers on
loopback standing in for the pods: each serves /v1/info from the files a fake kubelet copies from the Secrets
and the trust ConfigMap, and reloads them as a pod does (issue #15 items 2 and 3).

- A user issuer's CA change (tls.issuerRef, no tls.trustBundle) is observed in its leaves' ca.crt and
  overlapped like the namespace CA's: trust old + new, re-issue the other leaves, drop the old.
- Fleet routers' pods gate the namespace CA rotation like the peers' pods do."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from blazen_operator import rotation
from blazen_operator.apply import read_peer_info
from blazen_operator.trust import Trust
from blazen_peer import BlazenPeerServer

from tests.support.kube_fake import Cluster, stored_trust_configmap
from tests.support.peers import STEP_MODULE, TOKEN, start_peer, write_steps
from tests.support.pki import CA, Issued, KubeletSecretDir

DEADLINE = 20.0  # "must not hang" bound on a reload the peer polls every second
MANAGED = {"app.kubernetes.io/managed-by": "blazen-operator"}
BUNDLE = "blazen-trust-issuer-corp"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def fp(ca: CA) -> str:
    return rotation.fingerprint(ca.cert_pem.decode())


def blazen_peer(name: str, **tls: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "ns", "uid": f"{name}-uid"},
        "spec": {
            "image": "img",
            "entrypoint": "m",
            "tls": tls,
            "auth": {"tokenSecretRef": {"name": "tok"}},
        },
    }


class Fleet:
    """The cluster side: Certificates and their Secrets as cert-manager keeps them, pods as the API shows
    them, each pod a real peer whose mounted files ``kubelet()`` brings up to date."""

    def __init__(self, api: Cluster, root: Path) -> None:
        self.api = api
        self.root = root
        self.revision = 0
        self.servers: dict[str, BlazenPeerServer] = {}
        self.dirs: dict[str, tuple[KubeletSecretDir, KubeletSecretDir, str, str]] = {}

    def issue(self, cert: str, issuer: str, ca: CA | None) -> None:
        """What cert-manager does when it issues a leaf: the Secret (ca.crt: the issuing CA, or none, as an
        ACME issuer writes), the Certificate's status (a new revision and notBefore, Issuing cleared)."""
        self.revision += 1
        leaf: Issued = (ca or CA("public-root")).issue(cert)
        data = {"tls.crt": b64(leaf.cert_pem), "tls.key": b64(leaf.key_pem)}
        if ca is not None:
            data["ca.crt"] = b64(ca.cert_pem)
        self.api.objects[("Secret", cert)] = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": cert, "namespace": "ns", "uid": f"{cert}-secret"},
            "data": data,
        }
        self.api.objects[("Certificate", cert)] = {
            "apiVersion": "cert-manager.io/v1",
            "kind": "Certificate",
            "metadata": {
                "name": cert,
                "namespace": "ns",
                "uid": f"{cert}-uid",
                "resourceVersion": str(self.revision),
                "labels": dict(MANAGED),
            },
            "spec": {"secretName": cert, "issuerRef": {"name": issuer, "kind": "Issuer"}},
            "status": {
                "revision": self.revision,
                "notBefore": f"2026-12-01T00:{self.revision:02d}:00Z",
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        }

    def reissue_requested(self) -> list[str]:
        """The Certificates whose Issuing condition the operator set (``cmctl renew``), cleared."""
        out = []
        for method, path, _ in self.api.writes:
            if method == "PATCH" and path.endswith("/status"):
                out.append(path.split("/")[-2])
        self.api.writes.clear()
        return sorted(set(out))

    async def pod(self, name: str, labels: dict[str, str], secret: str, bundle: str) -> None:
        """A ready pod of ``labels`` serving the leaf of ``secret`` and trusting the ConfigMap ``bundle``."""
        tls = KubeletSecretDir(self.root / name / "tls")
        trust = KubeletSecretDir(self.root / name / "trust")
        self.dirs[name] = (tls, trust, secret, bundle)
        self.kubelet(name)
        server = await start_peer(
            node_id=name,
            entrypoint=f"{STEP_MODULE}:REG",
            tls_cert=str(tls.path("tls.crt")),
            tls_key=str(tls.path("tls.key")),
            tls_ca=str(trust.path("ca.crt")),
            tls_client_auth="none",
            token=TOKEN,
            http_addr=None,
        )
        self.servers[name] = server
        self.api.objects[("Pod", name)] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": "ns", "labels": labels},
            "spec": {
                "volumes": [{"name": "trust", "configMap": {"name": bundle}}],
                "containers": [
                    {"name": "peer", "ports": [{"name": "admin", "containerPort": server.admin_port}]}
                ],
            },
            "status": {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]},
        }

    def kubelet(self, name: str) -> None:
        """Bring the pod's two volumes up to date with the Secret and the ConfigMap (atomic swap)."""
        tls, trust, secret, bundle = self.dirs[name]
        data = self.api.objects[("Secret", secret)]["data"]
        tls.write({k: base64.b64decode(data[k]) for k in ("tls.crt", "tls.key")})
        configmap = self.api.objects.get(("ConfigMap", bundle)) or {}
        trust.write({"ca.crt": (configmap.get("data") or {}).get("ca.crt", "").encode()})

    async def reports(self, name: str, trusted: set[str], leaf_root: str) -> None:
        url = f"http://127.0.0.1:{self.servers[name].admin_port}/v1/info"
        start = time.monotonic()
        while True:
            tls = ((await asyncio.to_thread(read_peer_info, url)) or {}).get("tls") or {}
            if set(tls.get("trusted_sha256") or ()) == trusted and tls.get("leaf_root_sha256") == leaf_root:
                return
            assert time.monotonic() - start < DEADLINE, f"{name} reports {tls}"
            await asyncio.sleep(0.1)


@pytest.fixture
async def fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Callable[..., Fleet]]:
    monkeypatch.syspath_prepend(str(write_steps(tmp_path / "steps")))
    made: list[Fleet] = []

    def make(api: Cluster) -> Fleet:
        made.append(Fleet(api, tmp_path / "pods"))
        return made[-1]

    yield make
    for f in made:
        for server in f.servers.values():
            await server.stop(grace=0)


def state(api: Cluster, bundle: str) -> tuple[dict[str, Any], list[str]]:
    cm = api.objects[("ConfigMap", bundle)]
    roots = rotation.split_pem((cm.get("data") or {}).get("ca.crt", ""))
    return json.loads(cm["metadata"]["annotations"]["blazen.dev/ca-rotation"]), [
        rotation.fingerprint(r) for r in roots
    ]


def events(api: Cluster) -> list[str]:
    out = [reason for method, reason, _ in api.writes if method == "EVENT"]
    return out


async def test_a_user_issuers_new_ca_is_overlapped_until_every_leaf_moved_then_dropped(
    fleet: Callable[[Cluster], Fleet],
) -> None:
    old, new = CA("corp-old"), CA("corp-new")
    api = Cluster([blazen_peer("a", issuerRef={"name": "corp"})])
    f = fleet(api)
    f.issue("a-tls", "corp", old)
    f.issue("a-client-tls", "corp", old)
    trust = Trust(api, settle=0)  # type: ignore[arg-type]
    sync: Callable[[], Awaitable[Any]] = lambda: asyncio.to_thread(trust.sync, "ns")  # noqa: E731

    view = await sync()
    assert state(api, BUNDLE)[1] == [fp(old)], "the bundle holds the CA the leaves' ca.crt name"
    assert view.condition("a")[:2] == ("False", "Idle")
    peer_labels = {"app.kubernetes.io/name": "blazen-peer", "app.kubernetes.io/instance": "a"}
    await f.pod("a-0", peer_labels, "a-tls", BUNDLE)
    await f.reports("a-0", {fp(old)}, fp(old))

    # The issuer's CA is replaced and one leaf renews on it: its pod gets the new leaf from its kubelet
    # before the operator saw anything, and keeps serving the old one (the bundle does not vouch for it).
    f.issue("a-tls", "corp", new)
    f.kubelet("a-0")
    api.writes.clear()
    view = await sync()
    st, roots = state(api, BUNDLE)
    assert (st["phase"], st["reason"]) == ("Trusting", "CaChanged")
    assert roots == [fp(old), fp(new)], "old and new roots while leaves move"
    assert "CaChanged" in events(api)
    assert view.condition("a")[:2] == ("True", "Trusting")
    f.kubelet("a-0")
    await f.reports("a-0", {fp(old), fp(new)}, fp(new))  # the held-back leaf is served now

    view = await sync()
    assert state(api, BUNDLE)[0]["phase"] == "Reissuing"
    assert f.reissue_requested() == ["a-client-tls"], "only the leaf still on the old CA is re-issued"
    view = await sync()
    assert state(api, BUNDLE)[0]["phase"] == "Reissuing", "a-client-tls is still on the old CA"
    assert "0 pods" not in view.bundles[BUNDLE].progress
    f.issue("a-client-tls", "corp", new)

    api.writes.clear()
    await sync()
    st, roots = state(api, BUNDLE)
    assert (st["phase"], roots) == ("Dropping", [fp(new)])
    assert "LeavesReissued" in events(api)
    view = await sync()
    assert view.bundles[BUNDLE].waiting == {"a": ["a-0"]}, "the pod still trusts the old root"
    f.kubelet("a-0")
    await f.reports("a-0", {fp(new)}, fp(new))
    api.writes.clear()
    view = await sync()
    st, roots = state(api, BUNDLE)
    assert (st["phase"], roots) == ("Idle", [fp(new)])
    assert "CaRotationComplete" in events(api)
    assert view.condition("a")[:2] == ("False", "Idle")


def namespace_ca_in(api: Cluster, phase: rotation.Phase, gen: int, old: CA, new: CA) -> None:
    """The namespace CA mid-rotation: both CA generations issued, the bundle old + new, the state ``phase``
    with the Issuer on generation ``gen``."""
    for g, ca in ((1, old), (2, new)):
        name = "blazen-ca" if g == 1 else "blazen-ca-2"
        api.objects[("Certificate", name)] = {
            "apiVersion": "cert-manager.io/v1",
            "kind": "Certificate",
            "metadata": {
                "name": name,
                "namespace": "ns",
                "uid": f"{name}-uid",
                "labels": {**MANAGED, "blazen.dev/ca-generation": str(g)},
            },
            "spec": {"isCA": True, "secretName": name},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]},
        }
        api.objects[("Secret", name)] = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "namespace": "ns", "uid": f"{name}-s"},
            "data": {"tls.crt": b64(ca.cert_pem)},
        }
    stored = rotation.Stored(generation=gen, phase=phase, target=2, since="2026-12-01T00:00:00Z")
    bundle = (old.cert_pem + new.cert_pem).decode()
    api.objects[("ConfigMap", "blazen-trust")] = stored_trust_configmap(bundle, stored.annotation())


async def test_fleet_routers_pods_gate_the_namespace_ca_rotation(fleet: Callable[[Cluster], Fleet]) -> None:
    """A router mounts the namespace bundle and serves <fleet>-router-tls: the old root is dropped only when
    its pods serve a leaf of the new CA, and the rotation ends only when they trust the new root alone."""
    old, new = CA("blazen-ca.ns"), CA("blazen-ca-2.ns")
    api = Cluster([blazen_peer("p")])
    f = fleet(api)
    namespace_ca_in(api, "Reissuing", 2, old, new)
    f.issue("p-tls", "blazen-ca", new)
    f.issue("f-router-tls", "blazen-ca", old)
    router_labels = {
        "app.kubernetes.io/name": "blazen-router",
        "app.kubernetes.io/instance": "f",
        "blazen.dev/component": "router",
    }
    await f.pod(
        "p-0",
        {"app.kubernetes.io/name": "blazen-peer", "app.kubernetes.io/instance": "p"},
        "p-tls",
        "blazen-trust",
    )
    await f.pod("f-router-0", router_labels, "f-router-tls", "blazen-trust")
    both = {fp(old), fp(new)}
    await f.reports("p-0", both, fp(new))
    await f.reports("f-router-0", both, fp(old))
    trust = Trust(api, settle=0)  # type: ignore[arg-type]

    # the router's leaf Secret moved to the new CA, its pod has not got it yet: no drop
    f.issue("f-router-tls", "blazen-ca", new)
    view = await asyncio.to_thread(trust.sync, "ns")
    assert state(api, "blazen-trust")[0]["phase"] == "Reissuing"
    assert view.bundles["blazen-trust"].waiting == {"f-router": ["f-router-0"]}
    assert "1/2 pods" in view.bundles["blazen-trust"].progress

    f.kubelet("f-router-0")
    await f.reports("f-router-0", both, fp(new))
    await asyncio.to_thread(trust.sync, "ns")
    assert state(api, "blazen-trust") == (state(api, "blazen-trust")[0], [fp(new)])
    assert state(api, "blazen-trust")[0]["phase"] == "Dropping"

    # the peer's pod got the one-root bundle, the router's not yet: the rotation is not over
    f.kubelet("p-0")
    await f.reports("p-0", {fp(new)}, fp(new))
    view = await asyncio.to_thread(trust.sync, "ns")
    assert state(api, "blazen-trust")[0]["phase"] == "Dropping"
    assert view.bundles["blazen-trust"].waiting == {"f-router": ["f-router-0"]}
    f.kubelet("f-router-0")
    await f.reports("f-router-0", {fp(new)}, fp(new))
    await asyncio.to_thread(trust.sync, "ns")
    assert state(api, "blazen-trust")[0]["phase"] == "Idle"


def test_an_issuer_without_ca_crt_and_a_user_trust_bundle_are_limits_the_status_names(tmp_path: Path) -> None:
    api = Cluster(
        [
            blazen_peer("acme", issuerRef={"name": "le", "kind": "Issuer"}),
            blazen_peer("own", issuerRef={"name": "corp"}, trustBundle={"configMap": {"name": "roots"}}),
        ]
    )
    f = Fleet(api, tmp_path)
    trust = Trust(api, settle=0)  # type: ignore[arg-type]
    view = trust.sync("ns")
    assert view is not None
    assert view.condition("acme")[:2] == ("False", "Idle")
    assert "waiting for Issuer le" in view.condition("acme")[2]
    assert not view.settled, "until the leaves are issued the passes come often"
    f.issue("acme-tls", "le", None)
    f.issue("acme-client-tls", "le", None)
    view = trust.sync("ns")
    assert view is not None
    status, reason, message = view.condition("acme")
    assert (status, reason) == ("False", "NoIssuerCA")
    assert "writes no ca.crt" in message
    assert "ca.crt" not in (api.objects[("ConfigMap", "blazen-trust-issuer-le")].get("data") or {})
    status, reason, message = view.condition("own")
    assert (status, reason) == ("False", "UserTrustBundle")
    assert "does not write it" in message
    assert ("ConfigMap", "roots") not in api.objects, "the user's bundle is never created or written"


def test_an_issuer_bundle_no_peer_reads_any_more_is_deleted(tmp_path: Path) -> None:
    api = Cluster([blazen_peer("a", issuerRef={"name": "corp"})])
    Fleet(api, tmp_path).issue("a-tls", "corp", CA("corp"))
    trust = Trust(api)  # type: ignore[arg-type]
    trust.sync("ns")
    assert ("ConfigMap", BUNDLE) in api.objects
    api.peers[:] = [blazen_peer("a", issuerRef={"name": "other"})]
    deleted: list[str] = []
    api.delete = lambda av, kind, ns, name, uid=None: deleted.append(name)  # type: ignore[method-assign]
    trust.sync("ns")
    assert deleted == [BUNDLE], "the bundle of the issuer nobody names any more goes; the new one stays"


def test_a_peer_the_models_refuse_keeps_its_issuers_bundle(tmp_path: Path) -> None:
    """An upgrade that makes a field stricter must not empty the trust of pods that still run."""
    api = Cluster([blazen_peer("a", issuerRef={"name": "corp"})])
    Fleet(api, tmp_path).issue("a-tls", "corp", CA("corp"))
    trust = Trust(api)  # type: ignore[arg-type]
    trust.sync("ns")
    refused = blazen_peer("a", issuerRef={"name": "corp"})
    refused["spec"]["tls"]["duration"] = "90 days"  # as a stricter pattern would refuse
    api.peers[:] = [refused]
    deleted: list[str] = []
    api.delete = lambda av, kind, ns, name, uid=None: deleted.append(name)  # type: ignore[method-assign]
    trust.sync("ns")
    assert deleted == []


def test_the_issuer_switches_to_the_new_ca_before_the_leaves_are_re_issued(tmp_path: Path) -> None:
    """Leaves re-issued before the CA Issuer points at the new CA would be signed by the old one again."""
    old, new = CA("blazen-ca.ns"), CA("blazen-ca-2.ns")
    api = Cluster([blazen_peer("p")])
    namespace_ca_in(api, "Trusting", 1, old, new)
    Fleet(api, tmp_path).issue("p-tls", "blazen-ca", old)
    api.writes.clear()
    Trust(api, settle=0).sync("ns")  # type: ignore[arg-type]
    assert state(api, "blazen-trust")[0]["phase"] == "Reissuing"
    kinds = [(method, kind) for method, kind, _ in api.writes if method in ("APPLY", "PATCH")]
    switch = kinds.index(("APPLY", "Issuer"))
    reissue = next(i for i, (method, _) in enumerate(kinds) if method == "PATCH")
    assert switch < reissue, api.writes
    issuer = api.objects[("Issuer", "blazen-ca")]
    assert issuer["spec"] == {"ca": {"secretName": "blazen-ca-2"}}

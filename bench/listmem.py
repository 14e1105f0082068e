"""What the trust pass holds of a namespace's BlazenPeers, Certificates and pods at N BlazenPeers, offline:
``python -m bench.listmem [--n 1000]``.

The objects are the operator's own manifests (the builders, for the benchmark's BlazenPeers) made API-shaped
(uid, resourceVersion, timestamps, a managedFields entry per writer mirroring the fields it set, the status
cert-manager or kwok writes), encoded as the API server's list responses: one response for the whole list, or
pages of ``apply.PAGE``. tracemalloc measures each response body as read (a copy), its decoding and what is
kept: before, the whole decoded list held (as ``Api.list`` did; the BlazenPeers parsed besides); after, the
trust pass's projections of each page (``Paged.keep``; its fold of the BlazenPeers, ``PeerReaders``).
"held" is what stays referenced once the list is read, "peak" the most alive during it.
"""

from __future__ import annotations

import argparse
import json
import tracemalloc
from collections.abc import Callable
from typing import Any

from blazen_operator import apply
from blazen_operator import spec as s
from blazen_operator.apply import Paged
from blazen_operator.builders import Peer, desired
from blazen_operator.trust import CertRecord, PeerReaders, PodRecord

from bench.operator import BENCH_NS, GPU_EVERY, peer_manifest

STAMP = "2026-12-01T07:07:00Z"


def _fields(node: Any) -> Any:
    """A managedFields ``fieldsV1`` for what ``node`` sets (maps only, as the apiserver writes them)."""
    if isinstance(node, dict):
        return {f"f:{k}": _fields(v) for k, v in node.items()}
    return {}


def _entry(manager: str, operation: str, body: dict[str, Any], sub: str = "") -> dict[str, Any]:
    entry = {
        "manager": manager,
        "operation": operation,
        "apiVersion": "v1",
        "time": STAMP,
        "fieldsType": "FieldsV1",
        "fieldsV1": _fields(body),
    }
    return {**entry, "subresource": sub} if sub else entry


def _api_shaped(manifest: dict[str, Any], i: int, status: dict[str, Any], writer: str) -> dict[str, Any]:
    obj = json.loads(json.dumps(manifest))
    meta = obj["metadata"]
    meta.update(
        uid=f"{i:08x}-0000-4000-8000-{i:012x}",
        resourceVersion=str(100000 + i),
        generation=1,
        creationTimestamp=STAMP,
    )
    meta["managedFields"] = [
        _entry("blazen-operator", "Apply", {k: v for k, v in manifest.items() if k in ("metadata", "spec")}),
        _entry(writer, "Update", {"status": status}, "status"),
    ]
    obj["status"] = status
    return obj


def _certificate_status(i: int) -> dict[str, Any]:
    return {
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "Ready",
                "message": "Certificate is up to date and has not expired",
                "lastTransitionTime": STAMP,
                "observedGeneration": 1,
            }
        ],
        "notBefore": STAMP,
        "notAfter": "2027-03-01T07:07:00Z",
        "renewalTime": "2027-01-30T07:07:00Z",
        "revision": 1,
    }


def _pod_status(i: int) -> dict[str, Any]:
    return {
        "phase": "Running",
        "podIP": f"127.100.{i // 250}.{i % 250 + 1}",
        "hostIP": "10.0.0.1",
        "startTime": STAMP,
        "conditions": [
            {"type": t, "status": "True", "lastProbeTime": None, "lastTransitionTime": STAMP}
            for t in ("Initialized", "Ready", "ContainersReady", "PodScheduled")
        ],
        "containerStatuses": [
            {
                "name": "peer",
                "ready": True,
                "restartCount": 0,
                "image": "blazen-fleet/peer-runtime:dev",
                "imageID": "",
                "started": True,
                "state": {"running": {"startedAt": STAMP}},
            }
        ],
    }


def objects(n: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """The namespace's BlazenPeers, leaf Certificates and peer pods at ``n`` BlazenPeers."""
    peers: list[dict[str, Any]] = []
    certificates: list[dict[str, Any]] = []
    pods: list[dict[str, Any]] = []
    for i in range(n):
        body = peer_manifest(f"peer-{i:04d}", BENCH_NS, i % GPU_EVERY == 0, 9090)
        body["metadata"]["uid"] = f"peer-uid-{i}"
        peers.append(_api_shaped(body, i, {"phase": "Ready", "observedGeneration": 1}, "blazen-operator"))
        for child in desired(Peer.from_body(body)):
            m = child.manifest
            if m["kind"] == "Certificate":
                certificates.append(_api_shaped(m, len(certificates), _certificate_status(i), "cert-manager"))
            elif m["kind"] == "Deployment":
                template = m["spec"]["template"]
                for r in range(m["spec"].get("replicas") or 1):
                    pod = {
                        "apiVersion": "v1",
                        "kind": "Pod",
                        "metadata": {
                            **template["metadata"],
                            "name": f"{m['metadata']['name']}-7d4b9c8f6-{r:05d}",
                            "namespace": BENCH_NS,
                            "ownerReferences": [
                                {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs"}
                            ],
                        },
                        "spec": {**template["spec"], "nodeName": "kwok-node-0"},
                    }
                    pods.append(_api_shaped(pod, len(pods), _pod_status(len(pods)), "kwok"))
    return peers, certificates, pods


def _pages(items: list[dict[str, Any]], size: int) -> list[bytes]:
    chunks = [items[i : i + size] for i in range(0, len(items), size)] or [[]]
    return [
        json.dumps(
            {
                "items": chunk,
                "metadata": {"resourceVersion": "1", "continue": str(k + 1) if k + 1 < len(chunks) else ""},
            }
        ).encode()
        for k, chunk in enumerate(chunks)
    ]


def _traced(read: Callable[[], Any]) -> tuple[float, float]:
    """(held, peak) MB of what ``read`` allocates and what it returns keeps."""
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    kept = read()
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del kept
    return round((held - base) / 2**20, 1), round((peak - base) / 2**20, 1)


def measure(
    items: list[dict[str, Any]],
    api_version: str,
    kind: str,
    after: Callable[[Paged], Any],
    before: Callable[[list[dict[str, Any]]], Any] = lambda items: items,
) -> dict[str, Any]:
    """``before``: what was held of the whole decoded list; ``after``: what is kept of the paged list."""
    whole = _pages(items, len(items) or 1)[0]
    paged = _pages(items, apply.PAGE)

    def request(method: str, path: str, *, query: dict[str, Any] | None = None, what: str = "") -> Any:
        # a copy: the response body as read, alive while it is decoded
        return json.loads(bytearray(paged[int((query or {}).get("continue") or 0)]))

    held_before, peak_before = _traced(lambda: before(json.loads(bytearray(whole))["items"]))
    held_after, peak_after = _traced(lambda: after(Paged(request, api_version, kind, BENCH_NS)))
    return {
        "objects": len(items),
        "encoded_mb": round(len(whole) / 2**20, 1),
        "before_held_mb": held_before,
        "before_peak_mb": peak_before,
        "after_held_mb": held_after,
        "after_peak_mb": peak_after,
    }


def _fold(paged: Paged) -> PeerReaders:
    readers = PeerReaders()
    for body in paged:
        readers.add(body)
    return readers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.listmem", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="BlazenPeers in the namespace")
    args = parser.parse_args(argv)
    peers, certificates, pods = objects(args.n)
    out = {
        "n": args.n,
        "certificates": measure(
            certificates, "cert-manager.io/v1", "Certificate", lambda p: p.keep(CertRecord.of)
        ),
        "pods": measure(pods, "v1", "Pod", lambda p: p.keep(PodRecord.of)),
        # before, the pass held the decoded list and every BlazenPeer parsed; now it folds them in
        "blazenpeers": measure(
            peers, s.API_VERSION, s.KIND, _fold, lambda items: (items, [Peer.from_body(b) for b in items])
        ),
    }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Invoke a sub-workflow on a Blazen peer over mutual TLS and print the result as JSON.

    python examples/client.py https://HOST:PORT --cert tls.crt --key tls.key --ca ca.crt \\
        --step examples::tokenize --step examples::count --input '{"text": "to be or not to be"}'

    python examples/client.py https://HOST:PORT ... --workflow word-count --input '{"text": "..."}'

ENDPOINT is the peer's gRPC (TLS) listener: the BlazenPeer's status.endpoints.grpc, or a port-forward
(`kubectl port-forward svc/examples-cpu 50051`; then pass --server-name with a name the serving certificate
holds, e.g. examples-cpu.NAMESPACE.svc). The client identity is the Secret named in
status.certificate.clientSecretName (tls.crt, tls.key), which the operator issues with cert-manager; the CA
bundle is the namespace trust ConfigMap blazen-trust (key ca.crt: old and new roots during a CA rotation):

    kubectl get secret NAME -o jsonpath='{.data.tls\\.crt}' | base64 -d > tls.crt   # likewise tls.key
    kubectl get configmap blazen-trust -o jsonpath='{.data.ca\\.crt}' > ca.crt

In a pod, mount both (as directories) and pass the mounted paths: the files are followed (re-read when they
change), so the caller keeps working across certificate renewals and CA rotations.

With no --step the peer runs the named workflow's default step set (examples/steps registers echo,
word-count, remember and gpu-info). --deref fetches the payload of every session ref the run returned.
Exit status: 0 on success, 1 when the workflow failed (its error is printed too).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from blazen_peer.client import BlazenPeerClient


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("endpoint", help="https://HOST:PORT of the peer's gRPC listener (HOST:PORT means https)")
    p.add_argument("--cert", type=Path, required=True, help="client certificate chain (PEM)")
    p.add_argument("--key", type=Path, required=True, help="client private key (PEM)")
    p.add_argument("--ca", type=Path, required=True, help="CA bundle: the namespace trust ConfigMap's ca.crt")
    p.add_argument("--server-name", help="TLS name to verify when ENDPOINT's host is not in the certificate")
    p.add_argument("--token-file", type=Path, help="bearer token file, when the peer also asks for a token")
    p.add_argument("--node-id", default="examples-client", help="our node id (x-blazen-peer-node-id)")
    p.add_argument("--workflow", default="echo", help="workflow name (default: echo)")
    p.add_argument("--step", dest="steps", action="append", default=[], help="step id (repeatable)")
    p.add_argument("--input", default="{}", help="JSON: the start event's fields (default {})")
    p.add_argument("--timeout", type=int, default=30, help="seconds the peer may run the workflow")
    p.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to wait for the connection")
    p.add_argument("--deref", action="store_true", help="also fetch the payload of each returned session ref")
    p.add_argument(
        "--repeat", type=int, default=1, help="calls on the one connection (one JSON line each when > 1)"
    )
    args = p.parse_args(argv)
    if "://" not in args.endpoint:
        args.endpoint = f"https://{args.endpoint}"
    if not args.endpoint.startswith("https://"):
        p.error("mutual TLS needs an https:// endpoint")
    try:
        args.input = json.loads(args.input)
    except ValueError as exc:
        p.error(f"--input is not JSON: {exc}")
    return args


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    token = args.token_file.read_text().strip() if args.token_file else None
    # Files, not PEM bytes: the client follows them, so a renewed client certificate (cert-manager) or a
    # trust bundle gaining or losing a root (a CA rotation) reaches a long-lived caller without a reconnect.
    client = await BlazenPeerClient.connect(
        args.endpoint,
        args.node_id,
        tls_files=(args.cert, args.key, args.ca),
        token=token,
        server_name=args.server_name,
        connect_timeout=args.connect_timeout,
    )
    async with client:
        return [await _call(client, args) for _ in range(args.repeat)]


async def _call(client: BlazenPeerClient, args: argparse.Namespace) -> dict[str, Any]:
    resp = await client.invoke_sub_workflow(args.workflow, args.steps, args.input, args.timeout)
    out: dict[str, Any] = {
        "result": resp.result_value(),
        "state": resp.state_values(),
        "refs": {
            ref: {"origin": d.origin_node_id, "type_tag": d.type_tag} for ref, d in resp.remote_refs.items()
        },
        "error": resp.error,
    }
    if args.deref:
        for ref, desc in out["refs"].items():
            payload = await client.deref_session_ref(ref)
            try:
                desc["payload"] = json.loads(payload)
            except ValueError:
                desc["payload_hex"] = payload.hex()
    return out


def main(argv: list[str] | None = None) -> int:
    outs = asyncio.run(run(parse_args(argv)))
    for out in outs:
        json.dump(out, sys.stdout, indent=2 if len(outs) == 1 else None, sort_keys=True)
        sys.stdout.write("\n")
    return 0 if all(out["error"] is None for out in outs) else 1


if __name__ == "__main__":
    raise SystemExit(main())

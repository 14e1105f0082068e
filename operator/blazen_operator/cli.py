"""``blazen-operator``: ``run`` the operator, or ``render`` a BlazenPeer's (or BlazenFleet's) children without
a cluster."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from .builders.common import OperatorIdentity

DEFAULT_LIVENESS_PORT = 8081
DEFAULT_METRICS_PORT = 8000


def _labels(text: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE[,KEY=VALUE...], got {text!r}")
        pairs.append((key, value))
    return tuple(sorted(pairs))


def _operator_identity(args: argparse.Namespace) -> OperatorIdentity | None:
    if args.operator_namespace and args.operator_pod_labels:
        return OperatorIdentity(namespace=args.operator_namespace, pod_labels=args.operator_pod_labels)
    return None


def _render(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from .builders import Fleet, Peer, desired, router_desired
    from .builders import fleet as bf

    stream = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")  # noqa: SIM115
    with stream:
        docs = [d for d in yaml.safe_load_all(stream) if d]
    out: list[dict[str, Any]] = []
    for doc in docs:
        if doc.get("kind") not in ("BlazenPeer", "BlazenFleet"):
            continue
        meta = dict(doc.get("metadata") or {})
        meta.setdefault("namespace", args.namespace)
        doc = {**doc, "metadata": meta}
        try:
            if doc["kind"] == "BlazenPeer":
                out += [child.manifest for child in desired(Peer.from_body(doc, _operator_identity(args)))]
                continue
            # a fleet: its pools' BlazenPeers and their children, then the router's
            fleet = Fleet.from_body(doc, operator=_operator_identity(args))
            for pool in fleet.spec.pools:
                peer_doc = bf.pool_peer(fleet, pool)
                peer_doc["spec"]["replicas"] = bf.pool_replicas(pool)
                out.append(peer_doc)
                out += [
                    child.manifest for child in desired(Peer.from_body(peer_doc, _operator_identity(args)))
                ]
            out += [child.manifest for child in router_desired(fleet)]
        except ValidationError as exc:
            print(f"error: {meta.get('name', '?')}: invalid spec:\n{exc}", file=sys.stderr)
            return 2
    if not out:
        print("error: no BlazenPeer or BlazenFleet in the input", file=sys.stderr)
        return 2
    sys.stdout.write(yaml.safe_dump_all(out, sort_keys=False))
    return 0


def _run(args: argparse.Namespace) -> int:
    from .operator import Options, run

    if not args.all_namespaces and not args.namespace:
        print("error: pass --namespace NS (repeatable) or --all-namespaces", file=sys.stderr)
        return 2
    options = Options(
        namespaces=() if args.all_namespaces else tuple(args.namespace),
        liveness_port=args.liveness_port,
        metrics_port=args.metrics_port,
        resync_seconds=args.resync_seconds,
        watch_inactivity_seconds=args.watch_inactivity_seconds,
        ca_rotation_settle_seconds=args.ca_rotation_settle_seconds,
        verbose=args.verbose,
        kubeconfig=args.kubeconfig,
        operator=_operator_identity(args),
    )
    run(options)
    return 0


def _identity_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--operator-namespace",
        metavar="NS",
        help="namespace of the operator's pods (with --operator-pod-labels: the peers' NetworkPolicy "
        "admits them to the admin port)",
    )
    parser.add_argument(
        "--operator-pod-labels",
        type=_labels,
        metavar="K=V[,K=V]",
        help="labels that select the operator's pods in --operator-namespace",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blazen-operator", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the operator (no kopf peering: run one replica)")
    scope = run.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace", "-n", action="append", metavar="NS", help="watch this namespace (repeatable; globs ok)"
    )
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace")
    run.add_argument(
        "--liveness-port",
        type=int,
        default=DEFAULT_LIVENESS_PORT,
        help="port of GET /healthz (0: off; default %(default)s)",
    )
    run.add_argument(
        "--metrics-port",
        type=int,
        default=DEFAULT_METRICS_PORT,
        help="port of the Prometheus GET /metrics (0: off; default %(default)s)",
    )
    run.add_argument(
        "--resync-seconds",
        type=float,
        default=60.0,
        help="level-based resync period of status and children (default %(default)s)",
    )
    run.add_argument(
        "--ca-rotation-settle-seconds",
        type=float,
        default=120.0,
        help="minimum length of the Trusting and Reissuing phases of a namespace CA rotation, so callers "
        "outside the peers' pods (which cannot report what they trust) get the new bundle and their renewed "
        "client certificate from their kubelet first (default %(default)s)",
    )
    run.add_argument(
        "--watch-inactivity-seconds",
        type=float,
        default=70.0,
        help="reconnect a watch that delivered nothing (not even a bookmark, sent every ~60 s) for this long "
        "(default %(default)s)",
    )
    run.add_argument("--kubeconfig", help="kubeconfig to use (default: in-cluster, else $KUBECONFIG)")
    _identity_flags(run)
    run.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    run.set_defaults(func=_run)

    render = sub.add_parser(
        "render", help="print the child manifests of BlazenPeers and BlazenFleets as YAML, no cluster"
    )
    render.add_argument("-f", "--file", required=True, help="BlazenPeer/BlazenFleet manifest(s); - for stdin")
    render.add_argument("--namespace", "-n", default="default", help="namespace when the manifest has none")
    _identity_flags(render)
    render.set_defaults(func=_render)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

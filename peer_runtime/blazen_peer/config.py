"""Server settings (``PeerConfig``) and the one flag table the CLI and the ``BLAZEN_PEER_*`` env twins come
from."""

from __future__ import annotations

import argparse
import os
import resource
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

ENV_PREFIX = "BLAZEN_PEER_"


@dataclass
class PeerConfig:
    """Everything ``blazen-peer serve`` can be told; ``blazen_peer.app`` builds the server's parts from
    it."""

    node_id: str = field(default_factory=socket.gethostname)
    entrypoint: str | None = None
    grpc_addr: str | None = "0.0.0.0:50051"
    http_addr: str | None = None
    plaintext_grpc_addr: str | None = None
    admin_addr: str | None = "0.0.0.0:9090"
    steps: tuple[str, ...] | None = None
    # security (blazen_peer.security.policy)
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    tls_client_auth: str = "auto"
    token_file: str | None = None
    token: str | None = None
    cors_allow_origin: tuple[str, ...] = ()
    http_auth: str = "auto"
    insecure: bool = False
    # session-ref forwarding
    forward_dns: str | None = None
    forward_peers: tuple[str, ...] = ()
    # engine limits
    ref_max_count: int = 10_000
    ref_max_bytes: int = 256 * 1024 * 1024
    ref_ttl_secs: float = 3600.0
    sync_step_workers: int = 0  # 0: engine.executor.default_workers
    loop_stall_secs: float = 30.0  # 0: no watchdog
    http_max_body_bytes: int = 64 * 1024 * 1024
    idle_timeout_secs: float = 15.0
    max_connections: int = 0  # 0: connection_cap() derives it from the fd limit
    shutdown_grace_secs: float = 5.0
    shutdown_admit_secs: float = 0.0
    grpc_max_connection_age_secs: float = 0.0
    tls_wait_secs: float = 120.0
    log_level: str = "INFO"
    event_loop: str = "uvloop"
    # the admission's concurrency limit (blazen_peer.admission)
    max_concurrent_workflows: int = 64
    # who may run single steps of split runs here (security/fleet_router.py); the router sends the token
    fleet_router_identity: tuple[str, ...] = ()
    fleet_router_token_file: str | None = None
    # bound of the run states kept between a split run's steps (engine/remote.py; 0: none kept)
    split_state_cache_bytes: int = 256 * 1024 * 1024
    # blazen-peer route (docs/router.md)
    pool: tuple[str, ...] = ()
    pool_refresh_secs: float = 10.0
    pool_server_name: str | None = None
    pool_tls_cert: str | None = None
    pool_tls_key: str | None = None
    pool_tls_ca: str | None = None
    pool_token_file: str | None = None
    data_plane: str = "relay"
    # the router's pools from the Kubernetes API (routing.discovery)
    fleet: str | None = None
    fleet_namespace: str | None = None
    kube_api_url: str | None = None
    kube_token_file: str | None = None
    kube_ca: str | None = None
    kube_watch_secs: int = 60

    def connection_cap(self) -> int:
        """``--max-connections``, else an eighth of the soft fd limit: four listeners at their caps still
        leave half the descriptors to files, sibling channels and the step code."""
        if self.max_connections > 0:
            return self.max_connections
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return max(16, (soft if soft != resource.RLIM_INFINITY else 65536) // 8)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


def _csv(value: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in value.split(",") if p.strip())


def _bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {value!r}")


EVENT_LOOPS = ("uvloop", "asyncio")


def _event_loop(value: str) -> str:
    v = value.strip().lower()
    if v not in EVENT_LOOPS:
        raise ValueError(f"event loop must be one of {', '.join(EVENT_LOOPS)}, not {value!r}")
    return v


HTTP_AUTH_MODES = ("auto", "client-cert", "token", "unauthenticated")


def _http_auth(value: str) -> str:
    v = value.strip().lower()
    if v not in HTTP_AUTH_MODES:
        raise ValueError(f"must be one of {', '.join(HTTP_AUTH_MODES)}, not {value!r}")
    return v


TLS_CLIENT_AUTH_MODES = ("auto", "require", "none")


def _tls_client_auth(value: str) -> str:
    v = value.strip().lower()
    if v not in TLS_CLIENT_AUTH_MODES:
        raise ValueError(f"must be one of {', '.join(TLS_CLIENT_AUTH_MODES)}, not {value!r}")
    return v


DATA_PLANES = ("relay", "grpcio")


def _data_plane(value: str) -> str:
    v = value.strip().lower()
    if v not in DATA_PLANES:
        raise ValueError(f"must be one of {', '.join(DATA_PLANES)}, not {value!r}")
    return v


def _positive_int(value: str) -> int:
    v = int(value)
    if v <= 0:
        raise ValueError(f"must be > 0, not {value!r}")
    return v


def _positive(value: str) -> float:
    v = float(value)
    if not v > 0:
        raise ValueError(f"must be > 0, not {value!r}")
    return v


def _optional_addr(value: str) -> str | None:
    return None if value.strip().lower() in ("", "off", "none") else value.strip()


@dataclass(frozen=True)
class Flag:
    attr: str
    help: str
    parse: Callable[[str], Any] = str
    #: value | bool | append (repeatable, each split at commas; the env twin is comma-separated) | repeat
    #: (repeatable, each kept whole; the env twin is semicolon-separated)
    kind: str = "value"
    metavar: str | None = None
    extra_env: tuple[str, ...] = ()

    @property
    def option(self) -> str:
        return "--" + self.attr.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.attr.upper()


FLAGS: tuple[Flag, ...] = (
    Flag("entrypoint", "module[:attr] imported at start; it registers steps", metavar="MOD[:ATTR]"),
    Flag("node_id", "this peer's node id (default: the hostname)", metavar="ID"),
    Flag("grpc_addr", "gRPC listener (TLS when --tls-* are given)", _optional_addr, metavar="H:P"),
    Flag("http_addr", "HTTP/JSON shim listener (off unless given)", _optional_addr, metavar="H:P"),
    Flag(
        "plaintext_grpc_addr",
        "extra plaintext gRPC listener for Blazen's own clients",
        _optional_addr,
        metavar="H:P",
    ),
    Flag("admin_addr", "admin listener: /healthz /readyz /metrics /v1/info", _optional_addr, metavar="H:P"),
    Flag("steps", "allow-list of served step ids", _csv, metavar="ID[,ID...]"),
    Flag("tls_cert", "PEM certificate", metavar="PATH"),
    Flag("tls_key", "PEM private key", metavar="PATH"),
    Flag(
        "tls_ca",
        "PEM CA bundle; with several (comma-separated) the first that holds a certificate, the others "
        "standing in while it is absent or empty",
        metavar="PATH[,PATH...]",
    ),
    Flag(
        "tls_client_auth",
        "how TLS callers are authenticated: require (a client certificate chained to --tls-ca), none (no "
        "client certificate; a bearer token is then required, and outbound hops verify servers against "
        "--tls-ca or else the system roots), auto (require with --tls-ca, else none)",
        _tls_client_auth,
        metavar="|".join(TLS_CLIENT_AUTH_MODES),
    ),
    Flag("token_file", "file holding the bearer token", metavar="PATH"),
    Flag("token", "bearer token (prefer --token-file)", metavar="TOKEN"),
    Flag("cors_allow_origin", "allowed CORS origin (repeatable)", str, "append", metavar="ORIGIN"),
    Flag(
        "http_auth",
        "who may call the HTTP shim: auto (token if one is set, else client-cert if --tls-ca, else refuse "
        "to start), client-cert, token, unauthenticated (explicit opt-in)",
        _http_auth,
        metavar="|".join(HTTP_AUTH_MODES),
    ),
    Flag("forward_dns", "headless Service name whose A records are sibling replicas", metavar="NAME"),
    Flag("forward_peers", "static sibling list for session-ref forwarding", _csv, metavar="H:P[,H:P...]"),
    Flag("insecure", "allow starting with neither TLS nor a token", _bool, "bool"),
    Flag("ref_max_count", "cap on session refs held", int, metavar="N"),
    Flag("ref_max_bytes", "cap on serialized session-ref bytes held", int, metavar="BYTES"),
    Flag("ref_ttl_secs", "TTL of UntilParentFinish refs (0: none)", float, metavar="SECS"),
    Flag(
        "sync_step_workers",
        "threads for plain-def steps; when all are busy, sync work is refused RESOURCE_EXHAUSTED / 429 "
        "(0: --max-concurrent-workflows, at least min(32, cpus+4))",
        int,
        metavar="N",
    ),
    Flag(
        "loop_stall_secs",
        "exit (status 70) when the event loop has been blocked this long, e.g. by an async step that never "
        "awaits (0: never)",
        float,
        metavar="SECS",
    ),
    Flag("http_max_body_bytes", "largest accepted HTTP request body", int, metavar="BYTES"),
    Flag(
        "idle_timeout_secs",
        "every listener: a connection's TLS (gRPC: and HTTP/2) handshake must end within it; HTTP: a "
        "request's headers must arrive within it of connecting or of the previous answer, a body may stall "
        "no longer, an idle connection closes after it",
        _positive,
        metavar="SECS",
    ),
    Flag(
        "max_connections",
        "connections open at once per listener (gRPC, HTTP shim, admin); more are closed at accept "
        "(0: an eighth of the fd limit)",
        int,
        metavar="N",
    ),
    Flag(
        "shutdown_grace_secs",
        "on SIGTERM, time until exit: the admit window, then in-flight calls finish (then cancelled)",
        float,
        metavar="SECS",
    ),
    Flag(
        "shutdown_admit_secs",
        "on SIGTERM, keep admitting new calls this long while not ready (endpoints catch up); "
        "part of the grace",
        float,
        metavar="SECS",
    ),
    Flag(
        "tls_wait_secs",
        "how long to wait at start for TLS files that are not there yet",
        float,
        metavar="SECS",
    ),
    Flag(
        "grpc_max_connection_age_secs",
        "send each gRPC connection a graceful GOAWAY after this long (0: never), so open channels "
        "reconnect through the Service; keep it under half of --shutdown-admit-secs",
        float,
        metavar="SECS",
    ),
    Flag("log_level", "logging level", str.upper, metavar="LEVEL"),
    Flag("event_loop", "uvloop (default) or asyncio's own loop", _event_loop, metavar="uvloop|asyncio"),
    Flag(
        "fleet_router_identity",
        "the DNS/URI names (SANs) of the fleet router's client certificate: only it may run single steps of "
        "a run split over pools here (blazen.fleet.v1 RunStep; refused unless this or "
        "--fleet-router-token-file is set; needs --tls-ca and --tls-client-auth auto|require)",
        _csv,
        metavar="NAME[,NAME...]",
    ),
    Flag(
        "fleet_router_token_file",
        "file holding the fleet router's own token: a peer requires it on blazen.fleet.v1 RunStep, a router "
        "sends it",
        metavar="PATH",
    ),
    Flag(
        "split_state_cache_bytes",
        "bytes of split runs' states kept between their steps here, so that the router sends only what "
        "changed (0: none kept; beyond it, whole state travels)",
        int,
        metavar="BYTES",
    ),
    Flag(
        "max_concurrent_workflows",
        "calls run at once (Invoke, Stream, Deref, Release); more are refused RESOURCE_EXHAUSTED / 429 "
        "(0: no cap)",
        int,
        metavar="N",
    ),
)


#: the flags of ``blazen-peer route`` alone.
ROUTER_ONLY_FLAGS: tuple[Flag, ...] = (
    Flag("pool", "a pool of replicas to route to (repeatable)", str, "repeat", metavar="NAME=H:P[,H:P...]"),
    Flag("pool_refresh_secs", "ask the pools what they serve this often", float, metavar="SECS"),
    Flag(
        "pool_server_name",
        "the name the pools' certificates are checked against (default: our own certificate's first DNS "
        "name, as for session-ref forwarding)",
        metavar="NAME",
    ),
    Flag(
        "pool_tls_cert",
        "PEM client certificate for the hop to the pools (default: --tls-cert)",
        metavar="PATH",
    ),
    Flag("pool_tls_key", "PEM private key of --pool-tls-cert (default: --tls-key)", metavar="PATH"),
    Flag("pool_tls_ca", "PEM CA bundle the pools' certificates chain to (default: --tls-ca)", metavar="PATH"),
    Flag(
        "pool_token_file",
        "file holding the bearer token sent to the pools (default: the router's own token)",
        metavar="PATH",
    ),
    Flag(
        "data_plane",
        "what forwards Invoke/Stream on --grpc-addr: relay (the Rust relay, off the GIL; everything else it "
        "hands to the grpcio server behind it) or grpcio (all of it in Python)",
        _data_plane,
        metavar="|".join(DATA_PLANES),
    ),
    Flag(
        "fleet",
        "discover the pools of this BlazenFleet from the Kubernetes API (watches; instead of --pool)",
        metavar="NAME",
    ),
    Flag(
        "fleet_namespace",
        "the fleet's namespace (default: the service account's, from "
        "/var/run/secrets/kubernetes.io/serviceaccount/namespace)",
        metavar="NS",
    ),
    Flag(
        "kube_api_url",
        "the Kubernetes API (default: https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT)",
        metavar="URL",
    ),
    Flag(
        "kube_token_file",
        "bearer token for the Kubernetes API, re-read for every request (default: the service account's)",
        metavar="PATH",
    ),
    Flag(
        "kube_ca", "CA bundle of the Kubernetes API (default: the service account's ca.crt)", metavar="PATH"
    ),
    Flag(
        "kube_watch_secs",
        "each watch asks the API server to end it after this long, then resumes; one open this long plus "
        "10 s counts as stalled and is reopened",
        _positive_int,
        metavar="SECS",
    ),
)
#: ``blazen-peer serve``'s flags a router has no use for (it runs no steps and holds no refs).
_SERVE_ONLY = frozenset(
    {"entrypoint", "steps", "forward_dns", "forward_peers", "ref_max_count", "ref_max_bytes", "ref_ttl_secs"}
    | {"sync_step_workers", "fleet_router_identity", "split_state_cache_bytes"}
)
#: the flags of ``blazen-peer route``: serve's listeners, security, limits, drain and logging, and the pools.
ROUTER_FLAGS: tuple[Flag, ...] = tuple(f for f in FLAGS if f.attr not in _SERVE_ONLY) + ROUTER_ONLY_FLAGS


def add_flags(parser: argparse.ArgumentParser, flags: Sequence[Flag] = FLAGS) -> None:
    for flag in flags:
        env_note = f" [env {flag.env}]"
        if flag.kind == "bool":
            parser.add_argument(
                flag.option,
                dest=flag.attr,
                action="store_const",
                const=True,
                default=None,
                help=flag.help + env_note,
            )
        elif flag.kind in ("append", "repeat"):
            parser.add_argument(
                flag.option,
                dest=flag.attr,
                action="append",
                default=None,
                metavar=flag.metavar,
                help=flag.help + env_note,
            )
        else:
            parser.add_argument(
                flag.option, dest=flag.attr, default=None, metavar=flag.metavar, help=flag.help + env_note
            )


def config_from(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None, flags: Sequence[Flag] = FLAGS
) -> PeerConfig:
    """Flag wins over its env twin, which wins over the default. ``BLAZEN_PEER_TOKEN`` is the token's twin."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for flag in flags:
        raw = getattr(args, flag.attr, None)
        try:
            if raw is not None:
                if flag.kind == "append":
                    values[flag.attr] = tuple(o for item in raw for o in _csv(item))
                elif flag.kind == "repeat":
                    values[flag.attr] = tuple(item.strip() for item in raw if item.strip())
                elif flag.kind == "bool":
                    values[flag.attr] = True
                else:
                    values[flag.attr] = flag.parse(raw)
                continue
            for name in (flag.env, *flag.extra_env):
                if name in env:
                    if flag.kind == "repeat":
                        values[flag.attr] = tuple(p.strip() for p in env[name].split(";") if p.strip())
                    else:
                        values[flag.attr] = (
                            _csv(env[name]) if flag.kind == "append" else flag.parse(env[name])
                        )
                    break
        except ValueError as exc:
            raise ValueError(f"{flag.option} / {flag.env}: {exc}") from None
    return PeerConfig(**values)


def parse_serve_args(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> PeerConfig:
    parser = argparse.ArgumentParser(prog="blazen-peer serve")
    add_flags(parser)
    return config_from(parser.parse_args(list(argv)), environ)

"""Real peers for the tests: ``start_peer`` / ``running_peer`` (a ``BlazenPeerServer`` in this process, on
loopback ports the kernel picks), ``spawn_peer`` (a ``blazen-peer serve`` subprocess), a step module for
them, and probes (TLS handshakes, readiness, metrics)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from blazen_peer import BlazenPeerServer, PeerConfig, ServerHooks, StepRegistry
from blazen_peer.client import BlazenPeerClient
from blazen_peer.router import BlazenRouterServer
from cryptography import x509

from .pki import Issued, Pki
from .ports import free_port

TOKEN = "tok-3f9a1c77e2b84d0c9b1e"
STEP_MODULE = "secure_peer_steps"
STEPS_SOURCE = textwrap.dedent(
    """
    import asyncio, logging, os
    from blazen_peer import StepRegistry, RefLifetime, SessionRefLimitError

    REG = StepRegistry()
    log = logging.getLogger("secure_peer_steps")

    @REG.step("echo", accepts=["blazen::StartEvent"])
    def echo(event, ctx):
        return {"type": "blazen::StopEvent", "result": {"x": event.get("x"), "caller": ctx.caller_node_id}}

    @REG.step("slow", accepts=["blazen::StartEvent"])
    async def slow(event, ctx):
        marker = event.get("marker")
        if marker:
            open(marker, "w").close()
        await asyncio.sleep(event.get("secs", 1.0))
        return {"type": "blazen::StopEvent", "result": {"slept": event.get("secs", 1.0)}}

    @REG.step("keep", accepts=["blazen::StartEvent"])
    def keep(event, ctx):
        life = RefLifetime.UntilExplicitDrop
        h = ctx.session_refs.insert(event["data"].encode(), type_tag="t", lifetime=life)
        return {"type": "blazen::StopEvent", "result": {"ref": h.uuid}}

    class Blob:
        def __init__(self, n):
            self.n = n

        def __blazen_serialize__(self):
            return b"x" * self.n

    @REG.step("blob", accepts=["blazen::StartEvent"])
    def blob(event, ctx):
        return {"type": "blazen::StopEvent", "result": {"blob": Blob(event.get("n", 10))}}

    @REG.step("chatty", accepts=["blazen::StartEvent"])
    def chatty(event, ctx):
        log.info("step sees header %s and %s", event.get("header"), event.get("blob"))
        return {"type": "blazen::StopEvent", "result": None}

    @REG.step("fill", accepts=["blazen::StartEvent"])
    def fill(event, ctx):
        # A context-drop scratch ref, then a kept one of event["size"] bytes; with "catch" the step
        # handles a full cache itself and carries on.
        ctx.session_refs.insert(b"scratch")
        refused = None
        try:
            ctx.session_refs.insert(b"k" * event["size"], lifetime=RefLifetime.UntilExplicitDrop)
        except SessionRefLimitError as exc:
            if not event.get("catch"):
                raise
            refused = str(exc)
        return {"type": "blazen::StopEvent", "result": {"refused": refused}}
    """
)


def write_steps(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{STEP_MODULE}.py").write_text(STEPS_SOURCE)
    return directory


async def tls_client(
    port: int, pki: Pki, node_id: str = "caller", token: str | None = TOKEN, leaf: Issued | None = None
) -> BlazenPeerClient:
    """Our gRPC client on ``port`` over mutual TLS (``leaf``, else ``pki``'s client identity; its CA, the
    server name ``localhost``), with ``token`` as its bearer token."""
    identity = leaf or pki.client
    return await BlazenPeerClient.connect(
        f"https://127.0.0.1:{port}",
        node_id,
        root_certificates=pki.ca_pem,
        certificate_chain=identity.cert_pem,
        private_key=identity.key_pem,
        token=token,
        server_name="localhost",
    )


def client_ssl(pki: Pki, files: tuple[Path, Path, Path] | None = None, *, h2: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=pki.ca_pem.decode())
    if files is not None:
        ctx.load_cert_chain(str(files[0]), str(files[1]))
    if h2:
        ctx.set_alpn_protocols(["h2"])
    return ctx


def served_serial(port: int, ctx: ssl.SSLContext, host: str = "localhost") -> int:
    """Open a NEW TLS connection and return the serial of the certificate the server presents."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


async def wait_serial(port: int, ctx: ssl.SSLContext, serial: int, limit: float) -> float:
    """Seconds until a new handshake on ``port`` shows ``serial`` (AssertionError after ``limit``)."""
    t0 = time.monotonic()
    seen = None
    while time.monotonic() - t0 < limit:
        seen = await asyncio.to_thread(served_serial, port, ctx)
        if seen == serial:
            return time.monotonic() - t0
        await asyncio.sleep(0.2)
    raise AssertionError(f"port {port} still serves serial {seen}, not {serial}, after {limit} s")


async def http_get(url: str, **kw: Any) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(url, **kw) as r:
        return r.status, await r.text()


async def wait_ready(
    admin_port: int, proc: asyncio.subprocess.Process | None = None, limit: float = 60
) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        if proc is not None and proc.returncode is not None:
            raise AssertionError(f"the peer exited with {proc.returncode} before it was ready")
        with contextlib.suppress(aiohttp.ClientError, OSError):
            status, _ = await http_get(f"http://127.0.0.1:{admin_port}/readyz")
            if status == 200:
                return
        await asyncio.sleep(0.1)
    raise AssertionError("the peer did not become ready")


def blazen_peer_command() -> list[str]:
    script = Path(sys.executable).parent / "blazen-peer"
    return [str(script)] if script.exists() else [sys.executable, "-m", "blazen_peer.cli"]


async def spawn_peer(
    workdir: Path,
    args: list[str],
    env: dict[str, str] | None = None,
    log_name: str = "peer.log",
    command: str = "serve",
) -> asyncio.subprocess.Process:
    """``blazen-peer COMMAND ARGS`` (``serve`` or ``route``) with ``workdir`` on PYTHONPATH; its output goes
    to ``workdir/log_name`` (a file, so a chatty peer never blocks on a full pipe)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("BLAZEN_PEER_")}
    full_env.update({"PYTHONPATH": str(workdir), **(env or {})})
    with open(workdir / log_name, "wb") as out:  # noqa: ASYNC230 (a local file, opened once)
        return await asyncio.create_subprocess_exec(
            *blazen_peer_command(),
            command,
            *args,
            env=full_env,
            cwd=str(workdir),
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )


@dataclass
class RouterProcess:
    """A ``blazen-peer route`` subprocess and its loopback ports."""

    proc: asyncio.subprocess.Process
    grpc: int
    http: int
    admin: int


@contextlib.asynccontextmanager
async def route_process(
    workdir: Path, pools: dict[str, list[str]], *args: str
) -> AsyncIterator[RouterProcess]:
    """``blazen-peer route --insecure`` over ``pools`` (``ARGS`` added) on free ports, ready when entered,
    terminated at exit; its output in ``workdir/router.log``. The plaintext opt-in is what the real
    ``blazen`` wheel's clients speak."""
    grpc_port, http_port, admin_port = free_port(), free_port(), free_port()
    addrs = ["--grpc-addr", f"127.0.0.1:{grpc_port}", "--http-addr", f"127.0.0.1:{http_port}"]
    addrs += ["--admin-addr", f"127.0.0.1:{admin_port}"]
    pool_args = [a for name, members in pools.items() for a in ("--pool", f"{name}={','.join(members)}")]
    proc = await spawn_peer(
        workdir, ["--insecure", *addrs, *pool_args, *args], log_name="router.log", command="route"
    )
    try:
        await wait_ready(admin_port, proc)
        yield RouterProcess(proc, grpc_port, http_port, admin_port)
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in a Prometheus text exposition."""
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        if head == name and not labels:
            return float(value)
        if head.startswith(name + "{") and all(f'{k}="{v}"' in head for k, v in labels.items()):
            return float(value)
    return None


async def start_peer(
    registry: StepRegistry | None = None, *, hooks: ServerHooks | None = None, **config: Any
) -> BlazenPeerServer:
    """A started ``BlazenPeerServer``: gRPC, HTTP shim and admin on 127.0.0.1 ports the kernel picks, unless
    ``config`` (``PeerConfig`` fields) says otherwise. The caller stops it."""
    fields: dict[str, Any] = {
        "grpc_addr": "127.0.0.1:0",
        "http_addr": "127.0.0.1:0",
        "admin_addr": "127.0.0.1:0",
        **config,
    }
    server = BlazenPeerServer(config=PeerConfig(**fields), registry=registry, hooks=hooks)
    await server.start()
    return server


@contextlib.asynccontextmanager
async def running_peer(
    registry: StepRegistry | None = None, *, hooks: ServerHooks | None = None, **config: Any
) -> AsyncIterator[BlazenPeerServer]:
    """``start_peer``, stopped (no grace) on the way out."""
    server = await start_peer(registry, hooks=hooks, **config)
    try:
        yield server
    finally:
        await server.stop(grace=0)


async def start_router(pools: dict[str, list[str]], **config: Any) -> BlazenRouterServer:
    """A started ``BlazenRouterServer`` over ``pools`` (name -> ``H:P`` list), listeners on 127.0.0.1 ports
    the kernel picks unless ``config`` says otherwise. The caller stops it."""
    fields: dict[str, Any] = {
        "grpc_addr": "127.0.0.1:0",
        "http_addr": "127.0.0.1:0",
        "admin_addr": "127.0.0.1:0",
        "pool": tuple(f"{name}={','.join(addrs)}" for name, addrs in pools.items()),
        **config,
    }
    server = BlazenRouterServer(config=PeerConfig(**fields))
    await server.start()
    return server


class PeerProcess:
    """A ``blazen-peer serve`` subprocess on free loopback ports (gRPC, HTTP shim, admin), with the step
    module; ``args()`` builds its flags (TLS from ``pki``), ``start()`` spawns it."""

    def __init__(self, tmp: Path, pki: Pki | None) -> None:
        self.dir = write_steps(tmp / "work")
        self.pki = pki
        self.grpc, self.http, self.admin = free_port(), free_port(), free_port()
        self.proc: asyncio.subprocess.Process | None = None

    def args(self, *extra: str, tls: bool = True) -> list[str]:
        out = [
            "--entrypoint",
            f"{STEP_MODULE}:REG",
            "--node-id",
            "proc-0",
            "--grpc-addr",
            f"127.0.0.1:{self.grpc}",
            "--http-addr",
            f"127.0.0.1:{self.http}",
            "--admin-addr",
            f"127.0.0.1:{self.admin}",
        ]
        if tls and self.pki is not None:
            out += ["--tls-cert", self.pki.cert, "--tls-key", self.pki.key, "--tls-ca", self.pki.ca_file]
        return out + list(extra)

    async def start(self, *args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
        self.proc = await spawn_peer(self.dir, list(args), env)
        return self.proc

    def log(self) -> str:
        return (self.dir / "peer.log").read_text(errors="replace")

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    async def client(self, node_id: str = "load") -> BlazenPeerClient:
        assert self.pki is not None
        return await tls_client(self.grpc, self.pki, node_id)

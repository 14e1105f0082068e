"""Who may call the HTTPS shim (``--http-auth``), which TLS 1.2 suites the listeners accept, and how the
process starts (or refuses to) - against real ``blazen-peer serve`` processes on loopback."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from blazen_peer.client import BlazenPeerClient, PeerTransportError
from blazen_peer.wire.protocol import ROUTE_INVOKE

from tests.security.transport_peer import ShimPeer, invoke_body
from tests.support.peers import TOKEN, client_ssl, spawn_peer, wait_ready
from tests.support.pki import Pki
from tests.support.ports import free_port

CBC_SUITES = ":".join(
    f"ECDHE-ECDSA-{suite}" for suite in ("AES128-SHA", "AES256-SHA", "AES128-SHA256", "AES256-SHA384")
)
AEAD_SUITES = "ECDHE+AESGCM:ECDHE+CHACHA20"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


def tls_flags(pki: Pki, *, ca: bool = True) -> list[str]:
    flags = ["--tls-cert", pki.cert, "--tls-key", pki.key]
    return [*flags, "--tls-ca", pki.ca_file] if ca else flags


async def https_invoke(port: int, ctx: ssl.SSLContext, token: str | None = None) -> int:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"https://localhost:{port}{ROUTE_INVOKE}",
            data=invoke_body(["echo"], {"x": 1}),
            headers=headers,
            ssl=ctx,
        ) as r,
    ):
        return r.status


async def status_or_failure(port: int, ctx: ssl.SSLContext) -> int | str:
    """The status an HTTPS caller with ``ctx`` (no token) gets, or the failure that ended its connection."""
    try:
        return await https_invoke(port, ctx)
    except (aiohttp.ClientError, ssl.SSLError, ConnectionError) as exc:
        return type(exc).__name__


async def exit_of(tmp_path: Path, *flags: str) -> tuple[int, str]:
    """Start a peer expected to refuse: its exit code and its output."""
    peer = ShimPeer(tmp_path)
    proc = await spawn_peer(peer.dir, peer.args(*flags))
    code = await asyncio.wait_for(proc.wait(), 60)
    return code, peer.log()


async def test_default_tls_peer_without_token_requires_a_client_certificate_on_the_shim(tmp_path, pki):
    """What examples/cpu-peer.yaml renders: TLS with a CA, the shim on, no token."""
    peer = await ShimPeer.start(tmp_path / "work", *tls_flags(pki))
    try:
        assert await status_or_failure(peer.http, client_ssl(pki)) != 200
        assert await https_invoke(peer.http, client_ssl(pki, pki.client_files)) == 200
        for files in (pki.foreign_files, pki.expired_files):
            assert await status_or_failure(peer.http, client_ssl(pki, files)) != 200
    finally:
        await peer.close()


async def test_tls_without_ca_and_without_token_refuses_to_start_the_shim(tmp_path, pki):
    # Refused for every listener, the shim included (``--tls-client-auth``: test_transport_no_ca.py).
    code, out = await exit_of(tmp_path, *tls_flags(pki, ca=False))
    assert code == 2
    errors = [line for line in out.splitlines() if "error" in line]
    assert len(errors) == 1, out
    assert "--tls-client-auth" in errors[0]
    assert "Traceback" not in out


@pytest.mark.parametrize(
    ("flags", "needs"),
    [
        (["--http-auth", "client-cert", "--token", TOKEN, "--insecure"], "--tls-ca"),
        (["--http-auth", "token"], "bearer token"),
    ],
)
async def test_an_http_auth_choice_the_configuration_cannot_honour_refuses_to_start(
    tmp_path, pki, flags, needs
):
    extra = [*flags] if "--insecure" in flags else [*tls_flags(pki), *flags]
    code, out = await exit_of(tmp_path, *extra)
    assert code == 2, out
    assert "--http-auth" in out
    assert needs in out


async def test_http_auth_token_requires_the_bearer_token_and_no_certificate(tmp_path, pki):
    peer = await ShimPeer.start(tmp_path / "work", *tls_flags(pki), "--token", TOKEN, "--http-auth", "token")
    try:
        assert await https_invoke(peer.http, client_ssl(pki)) == 401
        assert await https_invoke(peer.http, client_ssl(pki), TOKEN) == 200
    finally:
        await peer.close()


async def test_auto_with_a_token_is_token(tmp_path, pki):
    peer = await ShimPeer.start(tmp_path / "work", *tls_flags(pki), "--token", TOKEN)
    try:
        assert await https_invoke(peer.http, client_ssl(pki)) == 401
        assert await https_invoke(peer.http, client_ssl(pki), TOKEN) == 200
    finally:
        await peer.close()


async def test_http_auth_unauthenticated_is_explicit_and_loud(tmp_path, pki):
    peer = await ShimPeer.start(tmp_path / "work", *tls_flags(pki), "--http-auth", "unauthenticated")
    try:
        assert await https_invoke(peer.http, client_ssl(pki)) == 200
        warnings = [line for line in peer.log().splitlines() if '"warning"' in line and "ANYONE" in line]
        assert len(warnings) == 1
        assert "--http-auth unauthenticated" in warnings[0]
    finally:
        await peer.close()


def negotiated(port: int, pki: Pki, suites: str) -> str | None:
    """The TLS 1.2 suite a handshake offering only ``suites`` ends with, or None if refused."""
    ctx = client_ssl(pki, pki.client_files)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(suites)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            cipher = tls.cipher()
    except (ssl.SSLError, ConnectionError):
        return None
    return cipher[0] if cipher else None


async def test_tls12_cbc_suites_are_refused_on_both_listeners(tmp_path, pki):
    # The caller's environment asks grpcio for CBC suites: the peer pins its own list regardless.
    env = {"GRPC_SSL_CIPHER_SUITES": CBC_SUITES}
    peer = await ShimPeer.start(tmp_path / "work", *tls_flags(pki), env=env)
    try:
        for port in (peer.grpc, peer.http):
            assert await asyncio.to_thread(negotiated, port, pki, CBC_SUITES) is None
            suite = await asyncio.to_thread(negotiated, port, pki, AEAD_SUITES)
            assert suite is not None
            assert "GCM" in suite or "CHACHA20" in suite, suite
    finally:
        await peer.close()


async def test_a_bad_entrypoint_is_one_clear_error_line(tmp_path):
    for entrypoint, reason in (
        ("no_such_steps_module", "No module named 'no_such_steps_module'"),
        ("secure_peer_steps:NOPE", "has no attribute 'NOPE'"),
    ):
        peer = ShimPeer(tmp_path / entrypoint.replace(":", "_"))
        args = peer.args("--insecure")
        args[args.index("--entrypoint") + 1] = entrypoint
        proc = await spawn_peer(peer.dir, args)
        assert await asyncio.wait_for(proc.wait(), 60) == 2
        text = peer.log()
        # The admin port is up before the import (a slow model load reads as "starting"), so the start-up
        # warnings of --insecure come first; the failure itself is one line, with no traceback.
        assert "Traceback" not in text
        errors = [line for line in text.strip().splitlines() if "cannot load --entrypoint" in line]
        assert len(errors) == 1, text
        assert errors[0].startswith(f"blazen-peer: error: cannot load --entrypoint {entrypoint}")
        assert reason in errors[0]


async def test_the_working_directory_does_not_shadow_the_entrypoint(tmp_path):
    """``python -m`` puts the working directory first on sys.path; the peer resolves its entrypoint from
    the installed packages and PYTHONPATH instead."""
    peer = ShimPeer(tmp_path / "real")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "secure_peer_steps.py").write_text("raise SystemExit('the working directory was imported')\n")
    env = {"PYTHONPATH": str(peer.dir)}
    with open(tmp_path / "peer.log", "wb") as out:  # noqa: ASYNC230 (a local file, opened once)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "blazen_peer.cli",
            "serve",
            *peer.args("--insecure"),
            cwd=str(cwd),
            env={**{k: v for k, v in os.environ.items() if not k.startswith("BLAZEN_")}, **env},
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )
    peer.proc = proc
    try:
        await wait_ready(peer.admin, proc)
    finally:
        await peer.close()
        log = (tmp_path / "peer.log").read_text()
    assert "the working directory was imported" not in log


async def test_connect_errors_say_why_and_do_not_wait_for_the_timeout(tmp_path, pki):
    """``BlazenPeerClient.connect``: a TLS failure and a refused port end at once with the transport's
    reason, not after ``connect_timeout`` with "timed out"."""
    peer = await ShimPeer.start(tmp_path / "work", *tls_flags(pki))
    try:
        other = pki.other_ca.cert_pem  # the client trusts another CA: the peer's certificate fails
        t0 = time.monotonic()
        with pytest.raises(PeerTransportError) as err:
            await BlazenPeerClient.connect(
                f"https://localhost:{peer.grpc}", "caller", root_certificates=other, connect_timeout=30
            )
        assert time.monotonic() - t0 < 10
        assert "CERTIFICATE_VERIFY_FAILED" in str(err.value) or "handshake" in str(err.value).lower()
        closed = free_port()
        t0 = time.monotonic()
        with pytest.raises(PeerTransportError, match="Connection refused"):
            await BlazenPeerClient.connect(f"http://127.0.0.1:{closed}", "caller", connect_timeout=30)
        assert time.monotonic() - t0 < 10
    finally:
        await peer.close()


async def http_status(port: int, token: str) -> int:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"http://127.0.0.1:{port}{ROUTE_INVOKE}",
            data=invoke_body(["echo"], {"x": 1}),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        ) as r,
    ):
        return r.status


async def test_a_token_file_rewritten_in_place_never_admits_a_half_token(tmp_path):
    """``echo new > token`` by hand: truncate, write part, (pause), write the rest. Calls keep coming."""
    token_file = tmp_path / "token"
    token_file.write_text("token-0-aaaaaaaaaaaaaaaa")
    peer = await ShimPeer.start(tmp_path / "work", "--token-file", str(token_file))
    try:
        assert await http_status(peer.http, "token-0-aaaaaaaaaaaaaaaa") == 200
        for n in range(1, 4):
            new = f"token-{n}-" + "b" * 16
            with open(token_file, "r+") as w:  # noqa: ASYNC230 (the writer under test)
                w.truncate(0)
                w.write(new[:8])
                w.flush()
                t0 = time.monotonic()
                while time.monotonic() - t0 < 0.9:  # the writer pauses; every call re-checks the file
                    assert await http_status(peer.http, new[:8]) == 401, f"half token {new[:8]!r} admitted"
                w.write(new[8:])
            t0 = time.monotonic()
            while await http_status(peer.http, new) != 200:
                assert time.monotonic() - t0 < 10, "the complete token was never taken"
                await asyncio.sleep(0.1)
    finally:
        await peer.close()

"""Rotation of the whole trust chain against real peers on loopback (issue #15, runtime and client side):
the trusted roots are exactly the CA bundle the files hold now, and a ``BlazenPeerClient`` given certificate
files follows their renewal with no reconnect by hand."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from blazen_peer import BlazenPeerServer
from blazen_peer.client import BlazenPeerClient, HttpPeerClient, PeerTlsError, PeerTransportError

from tests.support.peers import STEP_MODULE, TOKEN, start_peer, write_steps
from tests.support.pki import CA, Issued, KubeletSecretDir, secret_files, write_pem_files

DEADLINE = 20.0  # "must not hang" bound on a reload that is polled every second


async def _until(check: Callable[[], bool], what: str) -> None:
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < DEADLINE, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@pytest.fixture
async def make_peer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.syspath_prepend(str(write_steps(tmp_path / "steps")))
    started: list[BlazenPeerServer] = []

    async def make(secret: KubeletSecretDir, **cfg: Any) -> BlazenPeerServer:
        server = await start_peer(
            node_id="rot-0",
            entrypoint=f"{STEP_MODULE}:REG",
            tls_cert=str(secret.path("tls.crt")),
            tls_key=str(secret.path("tls.key")),
            tls_ca=str(secret.path("ca.crt")),
            token=TOKEN,
            http_addr=None,
            **cfg,
        )
        started.append(server)
        return server

    yield make
    for s in started:
        await s.stop(grace=0)


def _secret(root: Path, leaf: Issued, bundle: bytes) -> KubeletSecretDir:
    d = KubeletSecretDir(root)
    d.write(secret_files(leaf, bundle))
    return d


async def _echo(client: BlazenPeerClient, x: int) -> None:
    resp = await client.invoke_sub_workflow("wf", ["echo"], {"x": x}, deadline=10)
    assert resp.result_value()["x"] == x


async def test_a_root_removed_from_the_bundle_stops_being_trusted_without_a_restart(
    make_peer: Callable[..., Awaitable[BlazenPeerServer]], tmp_path: Path
) -> None:
    old_ca, new_ca = CA("bundle-old"), CA("bundle-new")
    server_secret = _secret(tmp_path / "server", new_ca.issue("peer-0"), old_ca.cert_pem + new_ca.cert_pem)
    server = await make_peer(server_secret)
    url = f"https://127.0.0.1:{server.grpc_port}"
    # Both callers trust the server's (new) CA; their identities come from either CA.
    callers = {
        "old": _secret(
            tmp_path / "old", old_ca.issue("caller-old", server=False), old_ca.cert_pem + new_ca.cert_pem
        ),
        "new": _secret(tmp_path / "new", new_ca.issue("caller-new", server=False), new_ca.cert_pem),
    }

    async def fresh_call(name: str) -> None:
        async with await BlazenPeerClient.connect(
            url, f"caller-{name}", tls_files=callers[name].root, token=TOKEN, connect_timeout=5
        ) as client:
            await _echo(client, 1)

    await fresh_call("old")
    await fresh_call("new")
    tls = server.runtime.tls
    generation = tls.generation
    server_secret.write(
        {
            "tls.crt": server_secret.path("tls.crt").read_bytes(),
            "tls.key": server_secret.path("tls.key").read_bytes(),
            "ca.crt": new_ca.cert_pem,
        }
    )
    await _until(lambda: tls.generation > generation, "the server to reload its bundle")
    with pytest.raises(PeerTransportError):
        await fresh_call("old")
    await fresh_call("new")
    assert tls.material.ca_pem == new_ca.cert_pem


async def test_a_long_lived_client_follows_a_full_ca_rotation_with_zero_failed_calls(
    make_peer: Callable[..., Awaitable[BlazenPeerServer]], tmp_path: Path
) -> None:
    """CA old -> new on both sides while calls run: bundles carry both roots, the server's then the caller's
    leaf are re-issued by the new CA, then the old root leaves both bundles. The server cycles its
    connections (max connection age), so every phase is met by new handshakes. A caller that reloads its
    files makes every call; one holding the PEM it connected with (the control) is refused."""
    old_ca, new_ca = CA("rot-old"), CA("rot-new")
    both = old_ca.cert_pem + new_ca.cert_pem
    server_leaf = old_ca.issue("peer-0")
    server_secret = _secret(tmp_path / "server", server_leaf, old_ca.cert_pem)
    server = await make_peer(server_secret, grpc_max_connection_age_secs=0.3)
    url = f"https://127.0.0.1:{server.grpc_port}"
    caller_leaf = old_ca.issue("caller", server=False)
    caller_secret = _secret(tmp_path / "caller", caller_leaf, old_ca.cert_pem)
    client = await BlazenPeerClient.connect(url, "caller", tls_files=caller_secret.root, token=TOKEN)
    control = await BlazenPeerClient.connect(
        url,
        "control",
        root_certificates=old_ca.cert_pem,
        certificate_chain=caller_leaf.cert_pem,
        private_key=caller_leaf.key_pem,
        token=TOKEN,
    )
    tls = server.runtime.tls
    stop = asyncio.Event()
    counts = {"ok": 0, "failed": 0, "control_failed": 0, "ok_after": 0}
    errors: list[BaseException] = []
    final_phase = asyncio.Event()

    async def load() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                await _echo(client, i)
                counts["ok"] += 1
                counts["ok_after"] += final_phase.is_set()
            except Exception as exc:
                counts["failed"] += 1
                errors.append(exc)

    async def control_load() -> None:
        while not stop.is_set():
            try:
                await _echo(control, 0)
            except Exception:
                counts["control_failed"] += 1
            await asyncio.sleep(0.05)

    async def phase(
        secret: KubeletSecretDir, leaf: Issued, bundle: bytes, generation: Callable[[], int]
    ) -> None:
        before = generation()
        secret.write(secret_files(leaf, bundle))
        await _until(lambda: generation() > before, "a reload")
        await asyncio.sleep(1.0)  # several connection ages of calls in this phase

    def server_gen() -> int:
        return tls.generation

    def client_gen() -> int:
        return client.tls_generation or 0

    tasks = [asyncio.create_task(load()), asyncio.create_task(control_load())]
    try:
        await asyncio.sleep(0.5)
        await phase(server_secret, server_leaf, both, server_gen)
        await phase(caller_secret, caller_leaf, both, client_gen)
        server_leaf = new_ca.issue("peer-0")
        await phase(server_secret, server_leaf, both, server_gen)
        caller_leaf = new_ca.issue("caller", server=False)
        await phase(caller_secret, caller_leaf, both, client_gen)
        await phase(server_secret, server_leaf, new_ca.cert_pem, server_gen)
        final_phase.set()
        await phase(caller_secret, caller_leaf, new_ca.cert_pem, client_gen)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await client.close()
        await control.close()
    assert counts["failed"] == 0, errors[:3]
    assert counts["ok_after"] > 0
    assert client.tls_generation == 4  # connect + three changes of its files
    assert tls.material.ca_pem == new_ca.cert_pem
    # The control proves the phases were met by new handshakes: the certificate it connected with is refused.
    assert counts["control_failed"] > 0


async def test_a_client_refuses_a_broken_renewal_and_keeps_calling(
    make_peer: Callable[..., Awaitable[BlazenPeerServer]], tmp_path: Path
) -> None:
    ca = CA("client-files")
    server = await make_peer(_secret(tmp_path / "server", ca.issue("peer-0"), ca.cert_pem))
    url = f"https://127.0.0.1:{server.grpc_port}"
    crt, key, cab = write_pem_files(tmp_path / "caller", ca.issue("caller", server=False), ca)
    with pytest.raises(PeerTlsError, match="not both"):
        await BlazenPeerClient.connect(url, "c", tls_files=(crt, key, cab), root_certificates=ca.cert_pem)
    with pytest.raises(PeerTlsError, match="does not match"):  # validated at connect, like the server
        await BlazenPeerClient.connect(
            url, "c", tls_files=(crt, write_pem_files(tmp_path / "x", ca.issue("x"), ca)[1], cab)
        )
    async with await BlazenPeerClient.connect(
        url, "caller", tls_files=(crt, key, cab), token=TOKEN
    ) as client:
        await _echo(client, 1)
        crt.write_bytes(ca.issue("caller-2", server=False).cert_pem)  # the key is not rewritten: mismatch
        await asyncio.sleep(1.5)  # more than one poll
        assert client.tls_generation == 1
        await _echo(client, 2)


async def test_the_https_client_follows_its_files_through_a_ca_rotation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``HttpPeerClient.new_http(tls_files=...)`` against a shim that requires a client certificate: the
    caller's leaf is re-issued by a new CA and its bundle loses the old root while it keeps calling; a
    caller still presenting the leaf it started with (the control) is refused once the server dropped the
    old root."""
    monkeypatch.syspath_prepend(str(write_steps(tmp_path / "steps")))
    old_ca, new_ca = CA("http-old"), CA("http-new")
    both = old_ca.cert_pem + new_ca.cert_pem
    server_secret = _secret(tmp_path / "server", new_ca.issue("peer-0"), both)
    caller_leaf = old_ca.issue("caller", server=False)
    caller_secret = _secret(tmp_path / "caller", caller_leaf, both)
    server = await start_peer(
        node_id="rot-http",
        entrypoint=f"{STEP_MODULE}:REG",
        tls_cert=str(server_secret.path("tls.crt")),
        tls_key=str(server_secret.path("tls.key")),
        tls_ca=str(server_secret.path("ca.crt")),
        http_auth="client-cert",
        grpc_addr="127.0.0.1:0",
    )
    url = f"https://localhost:{server.http_port}"
    client = HttpPeerClient.new_http(url, "caller", tls_files=caller_secret.root)

    async def echo(c: HttpPeerClient, x: int) -> None:
        resp = await c.invoke_sub_workflow("wf", ["echo"], {"x": x}, 10)
        assert resp.result_value()["x"] == x

    try:
        await echo(client, 1)
        # the caller's leaf re-issued by the new CA (still trusting both), then the old root dropped
        caller_secret.write(secret_files(new_ca.issue("caller", server=False), both))
        await _until(lambda: client.tls_generation == 2, "the caller's reload")
        await echo(client, 2)
        caller_secret.write(secret_files(new_ca.issue("caller", server=False), new_ca.cert_pem))
        await _until(lambda: client.tls_generation == 3, "the caller's second reload")
        tls = server.runtime.tls
        before = tls.generation
        server_secret.write(secret_files(new_ca.issue("peer-0"), new_ca.cert_pem))
        await _until(lambda: tls.generation > before, "the server dropping the old root")
        for i in range(20):
            await echo(client, 100 + i)
        # the control: a caller still presenting the old-CA leaf it started with is refused now
        crt, key, ca = write_pem_files(tmp_path / "control", caller_leaf, both)
        async with HttpPeerClient.new_http(url, "control", tls_files=(crt, key, ca)) as control:
            with pytest.raises(PeerTransportError):
                await echo(control, 3)
    finally:
        await client.close()
        await server.stop(grace=0)

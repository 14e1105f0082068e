"""Certificate reload: kubelet-style Secret swaps seen by live grpcio and aiohttp HTTPS servers."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor

import aiohttp
import grpc
import pytest
from aiohttp import web
from blazen_peer.pki.reload import ReloadingTlsSource
from blazen_peer.wire.errors import PeerTlsError
from cryptography import x509

from tests.support.pki import CA, Issued, KubeletSecretDir, secret_files

DEADLINE = 5.0


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA("reload-root")


@pytest.fixture
def secret(tmp_path, ca):
    d = KubeletSecretDir(tmp_path / "tls")
    d.write(secret_files(ca.issue("peer", serial=1001), ca))
    return d


def _source(secret: KubeletSecretDir, **kw) -> ReloadingTlsSource:
    kw.setdefault("poll_interval", 0.05)
    return ReloadingTlsSource(secret.path("tls.crt"), secret.path("tls.key"), secret.path("ca.crt"), **kw)


def _client_ctx(ca_pem: bytes, identity: Issued | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca_pem.decode())
    if identity is not None:
        import os
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "id.pem")
            with open(p, "wb") as f:
                f.write(identity.cert_pem + identity.key_pem)
            ctx.load_cert_chain(p)
    return ctx


def _probe_serial(port: int, ca_pem: bytes, identity: Issued | None, host: str = "localhost") -> int:
    """A brand-new TLS connection; returns the serial of the certificate the server presented."""
    ctx = _client_ctx(ca_pem, identity)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


def _wait_for(predicate, timeout: float = DEADLINE) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


# -- the source itself ------------------------------------------------------------------------------


def test_initial_load_is_validated(tmp_path, ca):
    d = KubeletSecretDir(tmp_path / "bad")
    other = CA("other")
    d.write(secret_files(other.issue(), ca))
    with pytest.raises(PeerTlsError, match="does not chain"):
        _source(d)


def test_kubelet_swap_is_picked_up_and_listeners_run(secret, ca):
    src = _source(secret)
    seen = []
    src.add_listener(lambda m: seen.append(m.serial))
    assert src.material.serial == 1001
    assert src.check_now() is False
    secret.write(secret_files(ca.issue("peer", serial=1002), ca))
    assert src.check_now() is True
    assert src.material.serial == 1002
    assert src.reload_count == 1
    assert src.generation == 2
    assert seen == [1002]
    assert src.not_after_timestamp == pytest.approx(src.material.not_after.timestamp())


def test_rewrite_with_same_content_is_not_a_reload(secret, ca):
    src = _source(secret)
    files = {n: secret.path(n).read_bytes() for n in ("tls.crt", "tls.key", "ca.crt")}
    secret.write(files)  # new ..data target, same bytes
    assert src.check_now() is False
    assert src.reload_count == 0
    assert src.generation == 1


def test_half_written_or_mismatched_set_keeps_the_old_one(secret, ca, caplog):
    src = _source(secret)
    new = ca.issue("peer", serial=1003)
    files = secret_files(new, ca)
    half = dict(files, **{"tls.crt": files["tls.crt"][:100]})
    caplog.set_level(logging.WARNING, logger="blazen_peer.pki.reload")
    secret.write(half)
    for _ in range(3):
        assert src.check_now() is False
    assert src.material.serial == 1001
    assert src.failure_count == 1
    assert src.last_error is not None
    warnings = [r for r in caplog.records if "keeping the current set" in r.getMessage()]
    assert len(warnings) == 1  # logged once, not at every poll
    assert new.key_pem.decode() not in caplog.text

    mismatched = dict(files, **{"tls.key": ca.issue().key_pem})
    secret.write(mismatched)
    assert src.check_now() is False
    assert src.failure_count == 2
    assert "does not match" in (src.last_error or "")

    secret.write(files)
    assert src.check_now() is True
    assert src.material.serial == 1003
    assert src.last_error is None


def test_plain_file_rewrite_in_place(tmp_path, ca):
    files = secret_files(ca.issue(serial=5), ca)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    src = ReloadingTlsSource(tmp_path / "tls.crt", tmp_path / "tls.key", tmp_path / "ca.crt")
    new = ca.issue(serial=6)
    (tmp_path / "tls.crt").write_bytes(new.cert_pem)  # key not yet written: mismatch, refused
    assert src.check_now() is False
    (tmp_path / "tls.key").write_bytes(new.key_pem)
    assert src.check_now() is True
    assert src.material.serial == 6


def test_trusted_roots_are_exactly_the_bundle(secret, ca):
    src = _source(secret)
    new_ca = CA("reload-root-2")
    cert, key = secret.path("tls.crt").read_bytes(), secret.path("tls.key").read_bytes()
    # A rotation begins: the bundle carries old + new, the leaf (signed by the old CA) is not re-issued yet.
    secret.write({"tls.crt": cert, "tls.key": key, "ca.crt": ca.cert_pem + new_ca.cert_pem})
    assert src.check_now() is True
    assert src.material.ca_pem == ca.cert_pem + new_ca.cert_pem
    # The leaf is re-issued by the new CA; the bundle still holds both roots, so both stay trusted.
    leaf = new_ca.issue("peer", serial=2002)
    secret.write({"tls.crt": leaf.cert_pem, "tls.key": leaf.key_pem, "ca.crt": ca.cert_pem + new_ca.cert_pem})
    assert src.check_now() is True
    assert src.material.ca_pem == ca.cert_pem + new_ca.cert_pem
    # The old root leaves the bundle: it is no longer trusted, at this reload, whatever time it is.
    secret.write(secret_files(leaf, new_ca))
    assert src.check_now() is True
    assert src.material.ca_pem == new_ca.cert_pem
    # Nothing keeps a root alive behind the bundle's back: polling again changes nothing.
    assert src.check_now() is False
    assert src.reload_count == 3


def test_a_bundle_without_the_leafs_root_is_refused(secret, ca):
    src = _source(secret)
    new_ca = CA("reload-root-3")
    secret.write(
        {
            "tls.crt": secret.path("tls.crt").read_bytes(),
            "tls.key": secret.path("tls.key").read_bytes(),
            "ca.crt": new_ca.cert_pem,
        }
    )
    assert src.check_now() is False
    assert "does not chain" in (src.last_error or "")
    assert src.material.ca_pem == ca.cert_pem


def test_the_first_ca_file_that_holds_one_is_the_trust_the_next_stands_in(tmp_path, secret, ca):
    """``--tls-ca BUNDLE,LEAF_CA`` (a user issuer's bundle, filled one operator pass after the first leaf):
    the leaf's ca.crt while the bundle is absent or empty, then the bundle alone - never both, so in a
    rotation a new leaf is not trusted before the bundle vouches for it."""
    bundle = KubeletSecretDir(tmp_path / "trust")
    cas = f"{bundle.path('ca.crt')},{secret.path('ca.crt')}"
    src = ReloadingTlsSource(
        secret.path("tls.crt"), secret.path("tls.key"), cas, ca_optional=True, poll_interval=0.05
    )
    assert src.material.ca_pem == ca.cert_pem  # no bundle yet: the leaf's own CA, not the system roots
    bundle.write({"ca.crt": b""})  # an optional ConfigMap projected before the operator filled it
    assert src.check_now() is False
    assert src.material.ca_pem == ca.cert_pem
    new_ca = CA("reload-root-4")
    bundle.write({"ca.crt": ca.cert_pem + new_ca.cert_pem})
    assert src.check_now() is True
    assert src.material.ca_pem == ca.cert_pem + new_ca.cert_pem
    # a leaf of a CA the bundle does not hold is refused although its own ca.crt vouches for it
    other = CA("reload-root-5")
    secret.write(secret_files(other.issue("peer", serial=3003), other))
    assert src.check_now() is False
    assert "does not chain" in (src.last_error or "")


# -- grpcio -----------------------------------------------------------------------------------------

_LOCAL_POOL = [("grpc.use_local_subchannel_pool", 1)]


def _grpc_server(creds: grpc.ServerCredentials) -> tuple[grpc.Server, int]:
    handler = grpc.method_handlers_generic_handler(
        "test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(lambda req, ctx: b"echo:" + req)}
    )
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    return server, port


def _channel(port: int, ca_pem: bytes, identity: Issued) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(ca_pem, identity.key_pem, identity.cert_pem)
    return grpc.secure_channel(f"localhost:{port}", creds, options=_LOCAL_POOL)


@pytest.mark.parametrize("with_thread", [True, False], ids=["poll-thread", "fetcher-polls"])
def test_grpc_server_follows_a_kubelet_swap(secret, ca, with_thread):
    src = _source(secret)
    if with_thread:
        src.start()
    client_id = ca.issue("client", server=False)
    server, port = _grpc_server(src.grpc_server_credentials())
    try:
        old_channel = _channel(port, ca.cert_pem, client_id)
        echo_old = old_channel.unary_unary("/test.Echo/Echo")
        assert echo_old(b"a", timeout=5) == b"echo:a"
        assert _probe_serial(port, ca.cert_pem, client_id) == 1001

        secret.write(secret_files(ca.issue("peer", serial=1002), ca))
        elapsed = _wait_for(lambda: _probe_serial(port, ca.cert_pem, client_id) == 1002)
        assert elapsed < DEADLINE

        # The channel opened before the swap still works, on its existing connection.
        assert echo_old(b"b", timeout=5) == b"echo:b"
        assert old_channel._channel.check_connectivity_state(False) == 2  # READY, never reconnected
        # A new channel handshakes against the new certificate.
        with _channel(port, ca.cert_pem, client_id) as fresh:
            assert fresh.unary_unary("/test.Echo/Echo")(b"c", timeout=5) == b"echo:c"
        old_channel.close()
    finally:
        server.stop(None)
        src.stop()


def test_grpc_requires_a_client_certificate_from_the_ca(secret, ca):
    src = _source(secret)
    server, port = _grpc_server(src.grpc_server_credentials())
    try:
        stranger = CA("stranger").issue("client", server=False)
        with _channel(port, ca.cert_pem, stranger) as ch:
            with pytest.raises(grpc.RpcError) as ei:
                ch.unary_unary("/test.Echo/Echo")(b"x", timeout=3)
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        no_id = grpc.ssl_channel_credentials(ca.cert_pem)
        with (
            grpc.secure_channel(f"localhost:{port}", no_id, options=_LOCAL_POOL) as ch,
            pytest.raises(grpc.RpcError),
        ):
            ch.unary_unary("/test.Echo/Echo")(b"x", timeout=3)
    finally:
        server.stop(None)


def test_grpc_credentials_need_a_ca_for_client_auth(tmp_path, ca):
    files = secret_files(ca.issue(), ca)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    src = ReloadingTlsSource(tmp_path / "tls.crt", tmp_path / "tls.key")
    with pytest.raises(PeerTlsError, match="needs a CA"):
        src.grpc_server_credentials(require_client_auth=True)
    server, port = _grpc_server(src.grpc_server_credentials())  # TLS without client auth
    try:
        with grpc.secure_channel(
            f"localhost:{port}", grpc.ssl_channel_credentials(ca.cert_pem), options=_LOCAL_POOL
        ) as ch:
            assert ch.unary_unary("/test.Echo/Echo")(b"z", timeout=5) == b"echo:z"
    finally:
        server.stop(None)


# -- ssl / aiohttp ----------------------------------------------------------------------------------


async def test_live_load_cert_chain_affects_new_handshakes_only(tmp_path, ca):
    """Platform fact the design relies on: an SSLContext change applies to later handshakes only."""
    a, b = ca.issue(serial=11), ca.issue(serial=12)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    (tmp_path / "a.pem").write_bytes(a.cert_pem + a.key_pem)
    (tmp_path / "b.pem").write_bytes(b.cert_pem + b.key_pem)
    ctx.load_cert_chain(tmp_path / "a.pem")

    async def echo(reader, writer):
        while line := await reader.readline():
            writer.write(line)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=ctx)
    port = server.sockets[0].getsockname()[1]
    client_ctx = _client_ctx(ca.cert_pem, None)

    async def connect():
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx, server_hostname="localhost")
        serial = x509.load_der_x509_certificate(
            w.get_extra_info("ssl_object").getpeercert(binary_form=True)
        ).serial_number
        return r, w, serial

    async with server:
        r1, w1, s1 = await connect()
        assert s1 == 11
        ctx.load_cert_chain(tmp_path / "b.pem")  # live swap
        w1.write(b"still here\n")
        assert await r1.readline() == b"still here\n"  # established session unaffected
        _r2, w2, s2 = await connect()
        assert s2 == 12  # new handshake sees the new certificate
        for w in (w1, w2):
            w.close()


async def _https_server(ctx: ssl.SSLContext) -> tuple[web.AppRunner, int]:
    async def hello(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        return web.json_response({"client_cert": bool(peer)})

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = runner.addresses[0][1]
    return runner, port


async def _probe(port, ca_pem, identity=None, host="localhost"):
    return await asyncio.to_thread(_probe_serial, port, ca_pem, identity, host)


async def test_aiohttp_https_follows_a_kubelet_swap(secret, ca):
    src = _source(secret).start()
    runner, port = await _https_server(src.ssl_context(client_auth="optional"))
    try:
        # A keep-alive HTTPS connection opened before the swap.
        kept = await asyncio.to_thread(_KeepAlive, port, ca.cert_pem)
        assert await asyncio.to_thread(kept.get) == (200, b'{"client_cert": false}')  # no client cert sent
        assert kept.serial == 1001
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=_client_ctx(ca.cert_pem, None))) as s,
            s.get(f"https://localhost:{port}/") as resp,
        ):
            assert resp.status == 200

        secret.write(secret_files(ca.issue("peer", serial=1002), ca))
        start = time.monotonic()
        while await _probe(port, ca.cert_pem) != 1002:
            assert time.monotonic() - start < DEADLINE
            await asyncio.sleep(0.05)
        # No SNI (an IP address): the switch happens all the same.
        assert await _probe(port, ca.cert_pem, host="127.0.0.1") == 1002
        # The connection opened before the swap keeps working, still on the old certificate.
        assert (await asyncio.to_thread(kept.get))[0] == 200
        assert kept.serial == 1001
        kept.close()
    finally:
        await runner.cleanup()
        src.stop()


async def test_aiohttp_client_certificates_are_optional_but_verified(secret, ca):
    src = _source(secret).start()
    runner, port = await _https_server(src.ssl_context(client_auth="optional"))
    try:
        good = ca.issue("client", server=False)
        assert await _probe(port, ca.cert_pem, good) == 1001
        stranger = CA("stranger-2").issue("client", server=False)
        # TLS 1.3: the server's alert surfaces on the client's first read, hence a full round trip.
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await asyncio.to_thread(_roundtrip_http, port, ca.cert_pem, stranger)

        # CA rotated (and the server leaf re-issued): old-CA client certs stop working on new connections,
        # new-CA ones start working, without a restart.
        new_ca = CA("reload-root-4")
        secret.write(secret_files(new_ca.issue("peer", serial=3003), new_ca))
        start = time.monotonic()
        while src.material.serial != 3003:
            assert time.monotonic() - start < DEADLINE
            await asyncio.sleep(0.05)
        fresh = new_ca.issue("client", server=False)
        assert await asyncio.to_thread(_roundtrip_http, port, new_ca.cert_pem, fresh) == 200
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await asyncio.to_thread(_roundtrip_http, port, new_ca.cert_pem, good)
    finally:
        await runner.cleanup()
        src.stop()


def _roundtrip_http(port: int, ca_pem: bytes, identity: Issued | None) -> int:
    ctx = _client_ctx(ca_pem, identity)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := tls.recv(4096):
            data += chunk
    if not data:
        raise ConnectionError("connection closed without a response")
    return int(data.split(b" ", 2)[1])


class _KeepAlive:
    """One TLS connection carrying several HTTP/1.1 requests."""

    def __init__(self, port: int, ca_pem: bytes) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.tls = _client_ctx(ca_pem, None).wrap_socket(raw, server_hostname="localhost")
        self.buf = b""

    @property
    def serial(self) -> int:
        return x509.load_der_x509_certificate(self.tls.getpeercert(binary_form=True)).serial_number

    def get(self) -> tuple[int, bytes]:
        self.tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        while b"\r\n\r\n" not in self.buf:
            chunk = self.tls.recv(4096)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        while len(self.buf) < length:
            self.buf += self.tls.recv(4096)
        body, self.buf = self.buf[:length], self.buf[length:]
        return int(head.split(b" ", 2)[1]), body

    def close(self) -> None:
        self.tls.close()

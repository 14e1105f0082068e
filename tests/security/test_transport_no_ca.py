"""A peer whose issuer writes no ``ca.crt`` (ACME and other public CAs), against real ``blazen-peer serve``
processes on loopback: ``--tls-client-auth none`` serves TLS without asking for client certificates, so it
refuses to start without a bearer token, requires the token on gRPC and HTTPS, and verifies the servers it
dials (session-ref forwarding to its siblings) against the system roots. The system roots are never trusted
for callers: any holder of any publicly issued certificate would pass."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from pathlib import Path

import grpc
import pytest
from blazen_peer.pki.tls import system_roots_pem
from blazen_peer.wire.envelope import unwrap, wrap
from blazen_peer.wire.messages import DerefRequest, DerefResponse, SubWorkflowRequest, SubWorkflowResponse
from blazen_peer.wire.protocol import PATH_DEREF, PATH_INVOKE

from tests.security.test_transport_auth_tls import exit_of, https_invoke
from tests.security.transport_peer import ShimPeer
from tests.support.peers import TOKEN, http_get, metric, start_peer, start_router
from tests.support.pki import CA, KubeletSecretDir

#: the first DNS SAN of every replica's certificate: what forwarding asks a sibling's certificate for
FLEET_NAME = "peers.fleet.example"


def acme_secret(directory: Path, ca: CA, cn: str, *, ca_crt: bytes | None = None) -> KubeletSecretDir:
    """A Secret volume as an ACME issuer leaves it: tls.crt and tls.key, no ca.crt (or ``ca_crt``)."""
    leaf = ca.issue(cn, dns=(FLEET_NAME, "localhost"), ips=("127.0.0.1",))
    files = {"tls.crt": leaf.cert_pem, "tls.key": leaf.key_pem}
    if ca_crt is not None:
        files["ca.crt"] = ca_crt
    secret = KubeletSecretDir(directory)
    secret.write(files)
    return secret


def tls_flags(secret: KubeletSecretDir, *extra: str) -> list[str]:
    return ["--tls-cert", str(secret.path("tls.crt")), "--tls-key", str(secret.path("tls.key")), *extra]


def roots_file(directory: Path, *cas: CA) -> dict[str, str]:
    """The environment that makes ``cas`` the process's system roots (what ``SSL_CERT_FILE`` selects)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "roots.pem"
    path.write_bytes(b"".join(ca.cert_pem for ca in cas))
    return {"SSL_CERT_FILE": str(path)}


async def grpc_call(
    port: int, roots: bytes, method: str, payload: bytes, token: str | None
) -> tuple[grpc.StatusCode, bytes | None]:
    """A TLS call WITHOUT a client certificate; the bearer token when given."""
    creds = grpc.ssl_channel_credentials(roots)
    options = [("grpc.ssl_target_name_override", FLEET_NAME)]
    md = [("authorization", f"Bearer {token}")] if token else []
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=options) as ch:
        try:
            return grpc.StatusCode.OK, unwrap(await ch.unary_unary(method)(payload, metadata=md, timeout=20))
        except grpc.aio.AioRpcError as exc:
            return exc.code(), None


def invoke(steps: list[str], data: dict) -> bytes:
    return wrap(SubWorkflowRequest.new("wf", steps, data, 30).encode())


def error_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if '"error"' in line or "error:" in line]


@pytest.mark.parametrize(
    "flags",
    [
        pytest.param([], id="auto-without-tls-ca"),
        pytest.param(
            ["--tls-client-auth", "none", "--tls-ca", "{dir}/ca.crt"], id="none-as-the-operator-renders"
        ),
    ],
)
async def test_no_ca_and_no_token_refuses_to_start_at_once_naming_the_flags(tmp_path, flags):
    """Without the shim (its own --http-auth rule used to be the only refusal): gRPC would serve anyone over
    TLS. The refusal comes before the TLS files are awaited: the certificate is not even there yet."""
    secret = KubeletSecretDir(tmp_path / "tls")  # cert-manager has not filled it
    flags = [f.replace("{dir}", str(secret.root)) for f in flags]
    t0 = time.monotonic()
    code, out = await exit_of(
        tmp_path, *tls_flags(secret, *flags), "--http-addr", "off", "--tls-wait-secs", "600"
    )
    assert code == 2, out
    assert time.monotonic() - t0 < 30, "the refusal waited for the TLS files"
    errors = error_lines(out)
    assert len(errors) == 1, out
    assert "--tls-client-auth" in errors[0], errors[0]
    assert "--token-file" in errors[0], errors[0]
    assert "Traceback" not in out


async def test_require_without_a_ca_bundle_refuses_to_start(tmp_path):
    secret = acme_secret(tmp_path / "tls", CA("public-ca"), "peer")
    code, out = await exit_of(tmp_path, *tls_flags(secret, "--tls-client-auth", "require", "--token", TOKEN))
    assert code == 2, out
    assert "--tls-client-auth require" in out, out
    assert "(--tls-ca)" in out, out


@pytest.mark.parametrize("ca_crt", [None, b"", b"\n"], ids=["absent", "empty", "blank"])
async def test_token_is_required_and_no_client_certificate_is_asked_for(tmp_path, ca_crt):
    """The operator's rendering for tls.issuerRef without tls.trustBundle: --tls-ca points at the Secret's
    ca.crt, which an ACME issuer leaves absent (older cert-manager: empty)."""
    public = CA("public-ca")
    secret = acme_secret(tmp_path / "tls", public, "peer-0", ca_crt=ca_crt)
    flags = tls_flags(secret, "--tls-client-auth", "none", "--tls-ca", str(secret.path("ca.crt")))
    peer = await ShimPeer.start(tmp_path / "work", *flags, "--token", TOKEN, env=roots_file(tmp_path, public))
    try:
        roots = public.cert_pem
        code, _ = await grpc_call(peer.grpc, roots, PATH_INVOKE, invoke(["echo"], {"x": 1}), None)
        assert code == grpc.StatusCode.UNAUTHENTICATED
        code, _ = await grpc_call(peer.grpc, roots, PATH_INVOKE, invoke(["echo"], {"x": 1}), "wrong-" + TOKEN)
        assert code == grpc.StatusCode.UNAUTHENTICATED
        code, body = await grpc_call(peer.grpc, roots, PATH_INVOKE, invoke(["echo"], {"x": 1}), TOKEN)
        assert code == grpc.StatusCode.OK
        assert SubWorkflowResponse.decode(body).result_value()["x"] == 1

        ctx = ssl.create_default_context(cadata=roots.decode())
        ctx.check_hostname = False  # loopback; the chain is verified
        assert await https_invoke(peer.http, ctx) == 401
        assert await https_invoke(peer.http, ctx, "wrong-" + TOKEN) == 401
        assert await https_invoke(peer.http, ctx, TOKEN) == 200

        status, body_text = await http_get(f"http://127.0.0.1:{peer.admin}/v1/info")
        assert status == 200
        tls = json.loads(body_text)["tls"]
        assert (tls["client_auth"], tls["outbound_trust"]) == ("none", "system-roots")
        assert tls["trusted_sha256"] == [], "no CA bundle: no root trusted for callers"
        mode_lines = [line for line in peer.log().splitlines() if "--tls-client-auth none" in line]
        assert len(mode_lines) == 1, peer.log()
        assert "bearer token" in mode_lines[0]
        assert "system roots" in mode_lines[0]
    finally:
        await peer.close()


async def test_outbound_hops_verify_siblings_against_the_system_roots(tmp_path):
    """Session-ref forwarding from B to A, both without a CA bundle: B verifies A's certificate against its
    system roots. With A's issuer among them the forwarded deref succeeds; with other roots B refuses A's
    certificate in the handshake, so the deref never reaches A."""
    public, other = CA("public-ca"), CA("some-other-public-ca")
    a = await ShimPeer.start(
        tmp_path / "a",
        *tls_flags(acme_secret(tmp_path / "tls-a", public, "peer-a")),
        "--token",
        TOKEN,
        env=roots_file(tmp_path / "roots-a", public),
    )
    peers: list[ShimPeer] = [a]
    try:
        code, body = await grpc_call(
            a.grpc, public.cert_pem, PATH_INVOKE, invoke(["keep"], {"data": "held by a"}), TOKEN
        )
        assert code == grpc.StatusCode.OK
        ref = SubWorkflowResponse.decode(body).result_value()["ref"]

        async def sibling(name: str, *roots: CA) -> ShimPeer:
            peer = await ShimPeer.start(
                tmp_path / name,
                *tls_flags(acme_secret(tmp_path / f"tls-{name}", public, f"peer-{name}")),
                "--token",
                TOKEN,
                "--forward-peers",
                f"127.0.0.1:{a.grpc}",
                env=roots_file(tmp_path / f"roots-{name}", *roots),
            )
            peers.append(peer)
            return peer

        async def derefs_reaching_a() -> float:
            _, text = await http_get(f"http://127.0.0.1:{a.admin}/metrics")
            return (
                metric(text, "blazen_peer_calls_total", transport="grpc", method="DerefSessionRef", code="OK")
                or 0
            )

        trusting = await sibling("b", public)
        deref = wrap(DerefRequest(ref).encode())
        code, body = await grpc_call(trusting.grpc, public.cert_pem, PATH_DEREF, deref, TOKEN)
        assert code == grpc.StatusCode.OK
        assert DerefResponse.decode(body).payload == b"held by a"
        assert await derefs_reaching_a() == 1

        distrusting = await sibling("c", other)
        code, body = await grpc_call(distrusting.grpc, public.cert_pem, PATH_DEREF, deref, TOKEN)
        assert code != grpc.StatusCode.OK
        await asyncio.sleep(0.5)
        assert await derefs_reaching_a() == 1, (
            "the forwarded deref reached a server the roots do not vouch for"
        )
    finally:
        for peer in peers:
            await peer.close()


@pytest.mark.parametrize("trusted", [True, False], ids=["pool-issuer-in-the-roots", "other-roots"])
async def test_a_routers_hop_verifies_its_pools_against_the_system_roots(tmp_path, monkeypatch, trusted):
    """A router and a pool without a CA bundle (in process): the router describes the pool over TLS only when
    the pool's issuer is among its system roots."""
    public = CA("public-ca")
    roots = roots_file(tmp_path / "roots", public if trusted else CA("some-other-public-ca"))
    monkeypatch.setenv("SSL_CERT_FILE", roots["SSL_CERT_FILE"])
    system_roots_pem.cache_clear()

    def tls(name: str) -> dict[str, str]:
        secret = acme_secret(tmp_path / f"tls-{name}", public, name)
        return {
            "tls_cert": str(secret.path("tls.crt")),
            "tls_key": str(secret.path("tls.key")),
            "token": TOKEN,
        }

    pool = await start_peer(**tls("pool-0"), http_addr=None)
    router = None
    try:
        router = await start_router({"p": [f"127.0.0.1:{pool.grpc_port}"]}, **tls("router"), http_addr=None)
        assert router.runtime is not None
        tls = router.runtime.tls_info()
        assert tls is not None
        assert (tls["client_auth"], tls["outbound_trust"]) == ("none", "system-roots")
        described = [r.description is not None for r in router.pools.replicas]
        assert described == [trusted]
    finally:
        if router is not None:
            await router.stop(grace=0)
        await pool.stop(grace=0)
        system_roots_pem.cache_clear()

"""``--tls-client-auth`` (``security.policy.tls_client_auth``), the CA file of a peer without client
certificates (``load_tls`` / ``ReloadingTlsSource(ca_optional=True)``) and the system roots its outbound hops
trust (``pki.tls.system_roots_pem``)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest
from blazen_peer.config import PeerConfig
from blazen_peer.pki import tls as pki_tls
from blazen_peer.pki.reload import ReloadingTlsSource
from blazen_peer.security.auth import TokenSource
from blazen_peer.security.policy import http_auth, load_tls, tls_client_auth
from blazen_peer.wire.errors import PeerInsecureConfigError, PeerTlsError

from tests.support.pki import CA, KubeletSecretDir

TOKENS = TokenSource(token="t0k3n")


def cfg(**kw: object) -> PeerConfig:
    return PeerConfig(tls_cert="c", tls_key="k", **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("config", "tokens", "expected"),
    [
        (PeerConfig(), None, None),  # no TLS: the secure-by-default check decides
        (cfg(tls_ca="ca"), None, "require"),
        (cfg(tls_ca="ca"), TOKENS, "require"),
        (cfg(), TOKENS, "none"),
        (cfg(tls_ca="ca", tls_client_auth="none"), TOKENS, "none"),
        (cfg(tls_ca="ca", tls_client_auth="require"), None, "require"),
    ],
)
def test_the_mode_each_configuration_resolves_to(config, tokens, expected) -> None:
    assert tls_client_auth(config, tokens) == expected


@pytest.mark.parametrize(
    ("config", "names"),
    [
        (cfg(), ("no --tls-ca", "--token-file")),
        (cfg(tls_ca="ca", tls_client_auth="none"), ("--tls-client-auth none", "--token-file")),
        (cfg(tls_client_auth="require"), ("--tls-client-auth require", "--tls-ca")),
    ],
)
def test_configurations_that_would_serve_anyone_or_cannot_verify_refuse(config, names) -> None:
    tokens = TOKENS if config.tls_client_auth == "require" else None
    with pytest.raises(PeerInsecureConfigError) as err:
        tls_client_auth(config, tokens)
    for name in names:
        assert name in str(err.value)


def test_the_shim_counts_client_certificates_only_where_tls_verifies_them() -> None:
    config = cfg(tls_ca="ca", tls_client_auth="none", http_addr="127.0.0.1:0")
    tls = object()  # only its presence matters here
    shim = http_auth(config, tls, TOKENS, "none")  # type: ignore[arg-type]
    assert shim is not None
    assert (shim.mode, shim.client_auth, shim.check_token) == ("token", "none", True)
    with pytest.raises(PeerInsecureConfigError, match="--http-auth client-cert"):
        http_auth(replace(config, http_auth="client-cert"), tls, TOKENS, "none")  # type: ignore[arg-type]


def _acme_dir(tmp_path: Path, ca: CA) -> KubeletSecretDir:
    leaf = ca.issue("peer", dns=("localhost",))
    d = KubeletSecretDir(tmp_path / "tls")
    d.write({"tls.crt": leaf.cert_pem, "tls.key": leaf.key_pem})
    return d


def test_without_client_certificates_an_absent_ca_file_is_neither_awaited_nor_required(tmp_path) -> None:
    d = _acme_dir(tmp_path, CA("public"))
    config = PeerConfig(
        tls_cert=str(d.path("tls.crt")),
        tls_key=str(d.path("tls.key")),
        tls_ca=str(d.path("ca.crt")),
        tls_client_auth="none",
        tls_wait_secs=60,
    )
    t0 = time.monotonic()
    tls = load_tls(config, "none")
    assert time.monotonic() - t0 < 5
    assert tls is not None
    assert tls.material.ca_pem is None
    # With mutual TLS the same missing file is awaited, then refused.
    config.tls_wait_secs = 0.5
    with pytest.raises(PeerTlsError, match=r"ca\.crt"):
        load_tls(config, "require")


def test_an_optional_ca_that_appears_later_is_followed(tmp_path) -> None:
    ca = CA("private")
    d = _acme_dir(tmp_path, ca)
    src = ReloadingTlsSource(d.path("tls.crt"), d.path("tls.key"), d.path("ca.crt"), ca_optional=True)
    assert src.material.ca_pem is None
    files = {name: d.path(name).read_bytes() for name in ("tls.crt", "tls.key")}
    d.write({**files, "ca.crt": b""})  # an empty key, as older cert-manager versions wrote
    src.check_now()
    assert src.material.ca_pem is None
    d.write({**files, "ca.crt": ca.cert_pem})
    assert src.check_now()
    assert src.material.ca_pem == ca.cert_pem
    # A CA that is present must still vouch for the peer's own leaf.
    d.write({**files, "ca.crt": CA("unrelated").cert_pem})
    assert not src.check_now()
    assert src.last_error is not None


def test_system_roots_follow_ssl_cert_file(tmp_path, monkeypatch) -> None:
    ca = CA("system")
    bundle = tmp_path / "roots.pem"
    bundle.write_bytes(ca.cert_pem)
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    pki_tls.system_roots_pem.cache_clear()
    try:
        assert pki_tls.system_roots_pem() == ca.cert_pem
        bundle.write_bytes(b"not a bundle")
        pki_tls.system_roots_pem.cache_clear()
        with pytest.raises(PeerTlsError, match="no PEM certificate"):
            pki_tls.system_roots_pem()
    finally:
        pki_tls.system_roots_pem.cache_clear()

from __future__ import annotations

import datetime as dt

import pytest
from blazen_peer.pki.tls import load_client_tls, load_server_tls, validate_tls_material
from blazen_peer.wire.errors import PeerError, PeerTlsError
from cryptography.hazmat.primitives import serialization

from tests.support.pki import CA, secret_files, write_pem_files

NOW = dt.datetime.now(dt.UTC)


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA("root-a")


def test_valid_server_set_returns_leaf_facts(tmp_path, ca):
    leaf = ca.issue("peer-0", serial=4242)
    crt, key, cab = write_pem_files(tmp_path, leaf, ca)
    m = load_server_tls(crt, key, cab)
    assert m.serial == 4242
    assert m.not_after == leaf.cert.not_valid_after_utc
    assert m.cert_chain_pem == leaf.cert_pem
    assert m.private_key_pem == leaf.key_pem
    assert m.ca_pem == ca.cert_pem
    assert m.fingerprint is not None
    assert len(m.fingerprint) == 64
    assert m.not_after_timestamp == pytest.approx(leaf.cert.not_valid_after_utc.timestamp())
    assert b"PRIVATE" not in repr(m).encode()
    # Server without client verification.
    assert load_server_tls(crt, key).ca_pem is None


def test_rsa_key_and_client_side(tmp_path, ca):
    leaf = ca.issue("client", key_kind="rsa", server=False)
    crt, key, cab = write_pem_files(tmp_path, leaf, ca)
    m = load_client_tls(cab, crt, key)
    assert m.serial == leaf.serial
    only_ca = load_client_tls(cab)
    assert only_ca.cert_chain_pem is None
    assert only_ca.serial is None
    assert only_ca.ca_pem == ca.cert_pem


def test_errors_share_the_peer_base(tmp_path):
    with pytest.raises(PeerError) as ei:
        load_server_tls(tmp_path / "missing.crt", tmp_path / "missing.key")
    assert isinstance(ei.value, PeerTlsError)
    assert str(ei.value).startswith("TLS configuration error: failed to read server cert ")
    assert "missing.crt" in str(ei.value)


@pytest.mark.parametrize(
    ("crt_bytes", "fragment"),
    [
        (b"", "no PEM certificate"),
        (b"hello", "no PEM certificate"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "malformed PEM certificate"),
    ],
)
def test_unparseable_cert(tmp_path, ca, crt_bytes, fragment):
    crt, key, cab = write_pem_files(tmp_path, ca.issue(), ca)
    crt.write_bytes(crt_bytes)
    with pytest.raises(PeerTlsError, match=fragment):
        load_server_tls(crt, key, cab)


def test_half_written_cert_is_refused(tmp_path, ca):
    leaf = ca.issue()
    crt, key, cab = write_pem_files(tmp_path, leaf, ca)
    crt.write_bytes(leaf.cert_pem[: len(leaf.cert_pem) // 2])
    with pytest.raises(PeerTlsError):
        load_server_tls(crt, key, cab)


def test_unparseable_and_encrypted_key(tmp_path, ca):
    leaf = ca.issue()
    crt, key, cab = write_pem_files(tmp_path, leaf, ca)
    key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(PeerTlsError, match="malformed PEM private key"):
        load_server_tls(crt, key, cab)
    key.write_bytes(
        leaf.key.private_bytes(  # type: ignore[attr-defined]
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
    )
    with pytest.raises(PeerTlsError, match="encrypted private keys are not supported"):
        load_server_tls(crt, key, cab)


def test_key_must_match_cert(tmp_path, ca):
    a, b = ca.issue("a"), ca.issue("b")
    crt, key, cab = write_pem_files(tmp_path, a, ca)
    key.write_bytes(b.key_pem)
    with pytest.raises(PeerTlsError, match="does not match"):
        load_server_tls(crt, key, cab)


def test_cert_must_chain_to_the_ca(tmp_path, ca):
    other = CA("root-b")
    crt, key, cab = write_pem_files(tmp_path, other.issue(), ca)
    with pytest.raises(PeerTlsError, match="does not chain to the CA"):
        load_server_tls(crt, key, cab)


def test_forged_issuer_name_fails_the_signature_check(tmp_path, ca):
    impostor = CA(ca.name)  # same subject name, different key
    crt, key, cab = write_pem_files(tmp_path, impostor.issue(), ca)
    with pytest.raises(PeerTlsError, match="signature does not verify"):
        load_server_tls(crt, key, cab)


def test_intermediate_chain(tmp_path, ca):
    inter = ca.intermediate()
    leaf = inter.issue("via-intermediate", serial=77)
    files = secret_files(leaf, ca, chain=[inter])
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    m = load_server_tls(tmp_path / "tls.crt", tmp_path / "tls.key", tmp_path / "ca.crt")
    assert m.serial == 77
    # Without the intermediate in tls.crt there is no path.
    (tmp_path / "tls.crt").write_bytes(leaf.cert_pem)
    with pytest.raises(PeerTlsError, match="does not chain"):
        load_server_tls(tmp_path / "tls.crt", tmp_path / "tls.key", tmp_path / "ca.crt")


def test_non_ca_issuer_is_refused(tmp_path, ca):
    leaf_as_ca = ca.issue("not-a-ca")
    # Sign a leaf with a non-CA certificate's key.
    fake = CA.__new__(CA)
    fake.issued = leaf_as_ca
    child = fake.issue("child")
    files = {"tls.crt": child.cert_pem + leaf_as_ca.cert_pem, "tls.key": child.key_pem, "ca.crt": ca.cert_pem}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(PeerTlsError, match="is not a CA"):
        load_server_tls(tmp_path / "tls.crt", tmp_path / "tls.key", tmp_path / "ca.crt")


def test_validity_window(tmp_path, ca):
    expired = ca.issue(not_before=NOW - dt.timedelta(days=10), not_after=NOW - dt.timedelta(days=1))
    crt, key, cab = write_pem_files(tmp_path, expired, ca)
    with pytest.raises(PeerTlsError, match="expired at"):
        load_server_tls(crt, key, cab)
    future = ca.issue(not_before=NOW + dt.timedelta(days=1))
    crt, key, cab = write_pem_files(tmp_path, future, ca)
    with pytest.raises(PeerTlsError, match="not valid before"):
        load_server_tls(crt, key, cab)
    # A few seconds ahead (a fresh cert, a clock slightly behind) is tolerated.
    fresh = ca.issue(not_before=NOW + dt.timedelta(seconds=30))
    crt, key, cab = write_pem_files(tmp_path, fresh, ca)
    assert load_server_tls(crt, key, cab).serial == fresh.serial
    # Validated against a given instant.
    later = NOW + dt.timedelta(days=400)
    with pytest.raises(PeerTlsError, match="expired"):
        load_server_tls(crt, key, cab, now=later)


def test_expired_ca(tmp_path):
    old = CA("old", not_before=NOW - dt.timedelta(days=30), not_after=NOW - dt.timedelta(days=1))
    leaf = old.issue(not_before=NOW - dt.timedelta(days=20))
    crt, key, cab = write_pem_files(tmp_path, leaf, old)
    with pytest.raises(PeerTlsError, match=r"CA certificate .* expired"):
        load_server_tls(crt, key, cab)


def test_extended_key_usage_is_checked(tmp_path, ca):
    server_only = ca.issue(server=True, client=False)
    crt, key, cab = write_pem_files(tmp_path, server_only, ca)
    assert load_server_tls(crt, key, cab).serial == server_only.serial
    with pytest.raises(PeerTlsError, match="client auth"):
        load_client_tls(cab, crt, key)


def test_ca_bundle_with_several_roots(tmp_path, ca):
    other = CA("root-b")
    leaf = other.issue()
    crt, key, cab = write_pem_files(tmp_path, leaf, ca.cert_pem + other.cert_pem)
    assert load_server_tls(crt, key, cab).serial == leaf.serial
    # The bundle is what is trusted: without root-b the same leaf is refused.
    with pytest.raises(PeerTlsError):
        validate_tls_material(cert_pem=leaf.cert_pem, key_pem=leaf.key_pem, ca_pem=ca.cert_pem, role="server")


def test_ca_bundle_must_hold_ca_certs(tmp_path, ca):
    leaf = ca.issue()
    crt, key, cab = write_pem_files(tmp_path, leaf, leaf.cert_pem)
    with pytest.raises(PeerTlsError, match="is not a CA certificate"):
        load_server_tls(crt, key, cab)


def test_identity_requires_both_halves(tmp_path, ca):
    leaf = ca.issue()
    crt, _key, cab = write_pem_files(tmp_path, leaf, ca)
    with pytest.raises(PeerTlsError, match="must be given together"):
        load_client_tls(cab, crt, None)

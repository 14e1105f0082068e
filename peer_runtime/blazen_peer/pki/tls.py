"""PEM loading that really validates: parse, key matches cert, chain to the CA, validity window.

``load_server_tls`` / ``load_client_tls`` mirror Blazen's helpers of the same name, but where Blazen only
checks that the files can be read, these check what a TLS handshake would later reject, so a bad Secret
fails at start (or is refused by the reloader) instead of on the first call.

The chain check is done by hand with ``cryptography``: starting at the leaf, each certificate must be
directly issued (issuer name and signature) by the next one, taken from the intermediates that follow the
leaf in the cert file or from the CA bundle; the walk ends at a certificate of the CA bundle. Every
certificate on the path, the anchor included, must be inside its validity window, and every issuer must
be allowed to be a CA.
"""

from __future__ import annotations

import datetime as _dt
import functools
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from ..wire.errors import PeerTlsError

__all__ = [
    "TlsMaterial",
    "cert_fingerprint",
    "load_client_tls",
    "load_server_tls",
    "parse_ca_bundle",
    "system_roots_pem",
    "trust_report",
    "validate_tls_material",
]

# How far a certificate's notBefore may lie in the future: a freshly issued cert and a pod whose clock is a
# little behind the issuer's must not be refused.
DEFAULT_CLOCK_SKEW = _dt.timedelta(minutes=5)
_MAX_CHAIN_DEPTH = 8
_SIGNING_KEYS = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    """A validated set of PEM bytes, ready for grpcio or ``ssl``.

    ``cert_chain_pem``/``private_key_pem`` are None for a client without an identity; ``ca_pem`` is
    None for a server that does not verify clients. ``not_after``/``serial``/``fingerprint`` describe
    the leaf (None when there is no leaf).
    """

    cert_chain_pem: bytes | None
    private_key_pem: bytes | None
    ca_pem: bytes | None
    not_after: _dt.datetime | None
    serial: int | None
    fingerprint: str | None = None

    @property
    def not_after_timestamp(self) -> float | None:
        return self.not_after.timestamp() if self.not_after is not None else None

    def __repr__(self) -> str:  # never print the key
        return (
            f"TlsMaterial(serial={self.serial}, not_after={self.not_after}, fingerprint={self.fingerprint}, "
            f"has_key={self.private_key_pem is not None}, has_ca={self.ca_pem is not None})"
        )


def cert_fingerprint(cert: x509.Certificate) -> str:
    """Hex SHA-256 of the DER certificate."""
    return cert.fingerprint(hashes.SHA256()).hex()


def _read(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise PeerTlsError(f"failed to read {what} {os.fspath(path)}: {e.strerror or e}") from e


def _parse_certs(data: bytes, what: str) -> list[x509.Certificate]:
    if b"-----BEGIN" not in data:
        raise PeerTlsError(f"{what}: no PEM certificate found")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise PeerTlsError(f"{what}: malformed PEM certificate: {e}") from e
    if not certs:
        raise PeerTlsError(f"{what}: no PEM certificate found")
    return certs


def parse_ca_bundle(data: bytes, what: str = "CA bundle") -> list[x509.Certificate]:
    """Parse a PEM bundle of one or more CA certificates (raises ``PeerTlsError``)."""
    return _parse_certs(data, what)


def _parse_key(data: bytes, what: str):
    if b"PRIVATE KEY-----" not in data:
        raise PeerTlsError(f"{what}: no PEM private key found")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError as e:  # encrypted key and no password
        raise PeerTlsError(f"{what}: encrypted private keys are not supported") from e
    except ValueError as e:
        raise PeerTlsError(f"{what}: malformed PEM private key: {e}") from e
    except Exception as e:  # cryptography raises UnsupportedAlgorithm for odd key types
        raise PeerTlsError(f"{what}: unusable private key: {e}") from e


def _spki(public_key) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _describe(cert: x509.Certificate) -> str:
    return f"'{cert.subject.rfc4514_string()}' (serial {cert.serial_number:x})"


def _check_window(cert: x509.Certificate, now: _dt.datetime, skew: _dt.timedelta, what: str) -> None:
    if now + skew < cert.not_valid_before_utc:
        raise PeerTlsError(
            f"{what} {_describe(cert)} is not valid before {cert.not_valid_before_utc.isoformat()}"
        )
    if now > cert.not_valid_after_utc:
        raise PeerTlsError(f"{what} {_describe(cert)} expired at {cert.not_valid_after_utc.isoformat()}")


def _may_sign(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        # A v1 root without extensions: OpenSSL accepts a self-signed one as a trust anchor.
        return cert.issuer == cert.subject
    return bc.ca


def _issued_by(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(issuer)
    except Exception:  # InvalidSignature, ValueError (name mismatch), TypeError (key type)
        return False
    return True


def _check_chain(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    anchors: Sequence[x509.Certificate],
    now: _dt.datetime,
    skew: _dt.timedelta,
    what: str,
) -> None:
    anchor_fps = {a.fingerprint(hashes.SHA256()) for a in anchors}
    pool = [*intermediates, *anchors]
    current = leaf
    for _ in range(_MAX_CHAIN_DEPTH):
        if current.fingerprint(hashes.SHA256()) in anchor_fps and current is not leaf:
            return
        # Prefer an anchor: it ends the walk.
        candidates = [a for a in anchors if a.subject == current.issuer] + [
            c for c in intermediates if c.subject == current.issuer and c is not current
        ]
        issuer = next((c for c in candidates if _issued_by(current, c)), None)
        if issuer is None:
            if any(c.subject == current.issuer for c in pool):
                raise PeerTlsError(
                    f"{what} {_describe(current)}: signature does not verify with the public key of "
                    f"its issuer '{current.issuer.rfc4514_string()}' in the CA bundle"
                )
            raise PeerTlsError(
                f"{what} {_describe(current)} does not chain to the CA: issuer "
                f"'{current.issuer.rfc4514_string()}' is not in the CA bundle"
            )
        if not _may_sign(issuer):
            raise PeerTlsError(
                f"issuer {_describe(issuer)} of {what} is not a CA (basicConstraints CA=false)"
            )
        _check_window(
            issuer, now, skew, "CA certificate" if issuer in anchors else "intermediate certificate"
        )
        if issuer.fingerprint(hashes.SHA256()) in anchor_fps:
            return
        current = issuer
    raise PeerTlsError(f"{what} chain is longer than {_MAX_CHAIN_DEPTH} certificates")


def _check_eku(cert: x509.Certificate, purpose, what: str) -> None:
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return
    if purpose not in eku and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in eku:
        name = "server auth" if purpose == ExtendedKeyUsageOID.SERVER_AUTH else "client auth"
        raise PeerTlsError(f"{what} {_describe(cert)} is not usable for {name} (extendedKeyUsage)")


def validate_tls_material(
    *,
    cert_pem: bytes | None,
    key_pem: bytes | None,
    ca_pem: bytes | None,
    role: str,
    now: _dt.datetime | None = None,
    clock_skew: _dt.timedelta = DEFAULT_CLOCK_SKEW,
    cert_label: str = "certificate",
    key_label: str = "private key",
    ca_label: str = "CA bundle",
) -> TlsMaterial:
    """Validate PEM bytes; ``role`` is ``"server"`` or ``"client"`` (selects the extendedKeyUsage checked).
    The leaf must chain to one of the roots of ``ca_pem`` (a bundle may hold several, e.g. old + new during
    a CA rotation)."""
    if role not in ("server", "client"):
        raise ValueError(f"role must be 'server' or 'client', not {role!r}")
    now = now or _dt.datetime.now(_dt.UTC)
    anchors: list[x509.Certificate] = []
    if ca_pem is not None:
        anchors = parse_ca_bundle(ca_pem, ca_label)
        for ca in anchors:
            if not _may_sign(ca):
                raise PeerTlsError(f"{ca_label}: {_describe(ca)} is not a CA certificate")

    if (cert_pem is None) != (key_pem is None):
        raise PeerTlsError(f"{role} certificate and private key must be given together")
    if cert_pem is None:
        if ca_pem is None:
            raise PeerTlsError("nothing to load: neither an identity nor a CA")
        return TlsMaterial(None, None, ca_pem, None, None, None)

    chain = _parse_certs(cert_pem, cert_label)
    leaf, intermediates = chain[0], chain[1:]
    key = _parse_key(key_pem, key_label)  # type: ignore[arg-type]
    if not isinstance(key, _SIGNING_KEYS):
        raise PeerTlsError(f"{key_label}: {type(key).__name__} is not a TLS signing key")
    if _spki(key.public_key()) != _spki(leaf.public_key()):
        raise PeerTlsError(f"{key_label} does not match {cert_label} {_describe(leaf)}")
    _check_window(leaf, now, clock_skew, cert_label)
    _check_eku(
        leaf,
        ExtendedKeyUsageOID.SERVER_AUTH if role == "server" else ExtendedKeyUsageOID.CLIENT_AUTH,
        cert_label,
    )
    if anchors:
        _check_chain(leaf, intermediates, anchors, now, clock_skew, cert_label)
    return TlsMaterial(
        cert_chain_pem=cert_pem,
        private_key_pem=key_pem,
        ca_pem=ca_pem,
        not_after=leaf.not_valid_after_utc,
        serial=leaf.serial_number,
        fingerprint=cert_fingerprint(leaf),
    )


def trust_report(material: TlsMaterial) -> dict[str, Any]:
    """What the peer trusts and serves, for ``/v1/info`` (the operator follows a CA rotation by it):
    ``trusted_sha256``: the SHA-256 of each root in the CA bundle; ``leaf_sha256`` and ``leaf_root_sha256``:
    the leaf and the root of the bundle its chain ends at (None when no root signed it)."""
    roots = parse_ca_bundle(material.ca_pem) if material.ca_pem else []
    out: dict[str, Any] = {
        "trusted_sha256": [cert_fingerprint(r) for r in roots],
        "leaf_sha256": material.fingerprint,
        "leaf_not_after": material.not_after.isoformat() if material.not_after else None,
        "leaf_root_sha256": None,
    }
    if material.cert_chain_pem:
        chain = _parse_certs(material.cert_chain_pem, "certificate")
        top = chain[-1]
        root = top if top in roots else next((r for r in roots if _issued_by(top, r)), None)
        out["leaf_root_sha256"] = cert_fingerprint(root) if root is not None else None
    return out


def load_server_tls(
    cert: str | os.PathLike[str],
    key: str | os.PathLike[str],
    ca: str | os.PathLike[str] | None = None,
    *,
    now: _dt.datetime | None = None,
) -> TlsMaterial:
    """Read and validate a server identity; ``ca`` (optional) is the bundle client certificates must chain to.

    The leaf must also chain to ``ca`` when one is given (the fleet uses one CA for both directions).
    Raises ``PeerTlsError``.
    """
    cert_pem = _read(cert, "server cert")
    key_pem = _read(key, "server key")
    ca_pem = _read(ca, "CA cert") if ca is not None else None
    return validate_tls_material(
        cert_pem=cert_pem,
        key_pem=key_pem,
        ca_pem=ca_pem,
        role="server",
        now=now,
        cert_label=f"server cert {os.fspath(cert)}",
        key_label=f"server key {os.fspath(key)}",
        ca_label=f"CA cert {os.fspath(ca)}" if ca is not None else "CA cert",
    )


def load_client_tls(
    ca: str | os.PathLike[str],
    cert: str | os.PathLike[str] | None = None,
    key: str | os.PathLike[str] | None = None,
    *,
    now: _dt.datetime | None = None,
) -> TlsMaterial:
    """Read and validate a client's trust bundle and optional identity (``cert`` and ``key``, or neither).

    Raises ``PeerTlsError``.
    """
    ca_pem = _read(ca, "CA cert")
    cert_pem = _read(cert, "client cert") if cert is not None else None
    key_pem = _read(key, "client key") if key is not None else None
    return validate_tls_material(
        cert_pem=cert_pem,
        key_pem=key_pem,
        ca_pem=ca_pem,
        role="client",
        now=now,
        cert_label=f"client cert {os.fspath(cert)}" if cert is not None else "client cert",
        key_label=f"client key {os.fspath(key)}" if key is not None else "client key",
        ca_label=f"CA cert {os.fspath(ca)}",
    )


#: Where distributions keep the system trust bundle when OpenSSL's default file is not there (the files Go's
#: crypto/x509 looks for on Linux), so an image built on any of them finds its roots.
SYSTEM_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu, Arch, Gentoo
    "/etc/pki/tls/certs/ca-bundle.crt",  # Fedora, RHEL
    "/etc/ssl/ca-bundle.pem",  # openSUSE
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",  # CentOS, RHEL 7
    "/etc/ssl/cert.pem",  # Alpine
)


@functools.cache
def system_roots_pem() -> bytes:
    """The system's trusted roots (PEM): ``SSL_CERT_FILE`` when set, else OpenSSL's default file, else the
    first of ``SYSTEM_BUNDLES`` that exists. What a peer without a CA bundle verifies the servers it dials
    against (siblings, a router's pools), never the callers it serves. Raises ``PeerTlsError`` when there is
    none."""
    for path in (ssl.get_default_verify_paths().cafile, *SYSTEM_BUNDLES):
        if path and os.path.isfile(path):
            data = _read(path, "system trust bundle")
            if b"-----BEGIN CERTIFICATE-----" not in data:
                raise PeerTlsError(f"system trust bundle {path}: no PEM certificate found")
            return data
    raise PeerTlsError(
        f"no system trust bundle (SSL_CERT_FILE or one of {', '.join(SYSTEM_BUNDLES)}) to verify the servers "
        "this peer dials: give --tls-ca"
    )


def first_dns_name(cert_pem: bytes | None) -> str | None:
    """The first DNS subjectAltName of the leaf in ``cert_pem`` (the name siblings' certificates carry,
    which session-ref forwarding asks for when it dials a sibling by IP)."""
    if cert_pem is None:
        return None
    leaf = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    names = san.get_values_for_type(x509.DNSName)
    return names[0] if names else None

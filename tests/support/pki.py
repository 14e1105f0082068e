"""Test PKI: a CA, leaves with chosen serials and validity, and kubelet-style Secret volumes.

Everything is generated with ``cryptography`` at test time (EC P-256 keys: fast). ``KubeletSecretDir``
reproduces the kubelet's atomic writer: the files live in a timestamped directory ``..<ts>``, ``..data``
is a symlink to it, and each visible name is a symlink ``name -> ..data/name``. An update writes a new
timestamped directory, points a temporary symlink at it and renames that over ``..data`` (one atomic
step), then removes the old directory.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

UTC = dt.UTC


def _now() -> dt.datetime:
    return dt.datetime.now(UTC)


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass
class Issued:
    cert: x509.Certificate
    key: object

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return _pem_key(self.key)

    @property
    def serial(self) -> int:
        return self.cert.serial_number


def new_key(kind: str = "ec"):
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


@dataclass
class CA:
    name: str = "blazen-test-ca"
    not_before: dt.datetime | None = None
    not_after: dt.datetime | None = None
    issuer: CA | None = None  # set for an intermediate
    issued: Issued = field(init=False)

    def __post_init__(self) -> None:
        key = new_key()
        nb = self.not_before or _now() - dt.timedelta(hours=1)
        na = self.not_after or _now() + dt.timedelta(days=365)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.name)])
        signer_key = self.issuer.issued.key if self.issuer else key
        issuer_name = self.issuer.issued.cert.subject if self.issuer else subject
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(nb)
            .not_valid_after(na)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        )
        self.issued = Issued(builder.sign(signer_key, hashes.SHA256()), key)

    @property
    def cert_pem(self) -> bytes:
        return self.issued.cert_pem

    @property
    def cert(self) -> x509.Certificate:
        return self.issued.cert

    def issue(
        self,
        cn: str = "peer",
        *,
        serial: int | None = None,
        dns: Sequence[str] = ("localhost",),
        ips: Sequence[str] = ("127.0.0.1",),
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        server: bool = True,
        client: bool = True,
        is_ca: bool = False,
        key_kind: str = "ec",
    ) -> Issued:
        key = new_key(key_kind)
        usages = []
        if server:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.issued.cert.subject)
            .public_key(key.public_key())
            .serial_number(serial if serial is not None else x509.random_serial_number())
            .not_valid_before(not_before or _now() - dt.timedelta(hours=1))
            .not_valid_after(not_after or _now() + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.issued.key.public_key()),  # type: ignore[attr-defined]
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        if usages:
            builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        return Issued(builder.sign(self.issued.key, hashes.SHA256()), key)  # type: ignore[arg-type]

    def intermediate(self, name: str = "blazen-test-intermediate") -> CA:
        return CA(name=name, issuer=self)


def write_pem_files(directory: Path, leaf: Issued, ca: CA | bytes) -> tuple[Path, Path, Path]:
    """Plain files tls.crt / tls.key / ca.crt (no symlinks)."""
    directory.mkdir(parents=True, exist_ok=True)
    crt, key, cab = directory / "tls.crt", directory / "tls.key", directory / "ca.crt"
    crt.write_bytes(leaf.cert_pem)
    key.write_bytes(leaf.key_pem)
    cab.write_bytes(ca if isinstance(ca, bytes) else ca.cert_pem)
    return crt, key, cab


def secret_files(leaf: Issued, ca: CA | bytes, *, chain: Sequence[CA] = ()) -> dict[str, bytes]:
    """The three keys of a cert-manager TLS Secret; ``chain`` intermediates are appended to tls.crt."""
    crt = leaf.cert_pem + b"".join(c.cert_pem for c in chain)
    return {"tls.crt": crt, "tls.key": leaf.key_pem, "ca.crt": ca if isinstance(ca, bytes) else ca.cert_pem}


class KubeletSecretDir:
    """A directory updated exactly like a Secret volume by the kubelet's atomic writer."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.root / name

    def _current_target(self) -> str | None:
        data = self.root / "..data"
        return os.readlink(data) if data.is_symlink() else None

    def write(self, files: Mapping[str, bytes]) -> None:
        stamp = time.strftime("..%Y_%m_%d_%H_%M_%S.", time.gmtime()) + secrets.token_hex(5)
        tsdir = self.root / stamp
        tsdir.mkdir(mode=0o755)
        for name, content in files.items():
            (tsdir / name).write_bytes(content)
            os.chmod(tsdir / name, 0o644)
        old = self._current_target()
        tmp = self.root / "..data_tmp"
        if tmp.is_symlink():
            tmp.unlink()
        os.symlink(stamp, tmp)
        os.rename(tmp, self.root / "..data")  # the atomic swap
        for name in files:
            link = self.root / name
            if not link.is_symlink():
                os.symlink(os.path.join("..data", name), link)
        if old is not None:
            oldpath = self.root / old
            for child in oldpath.iterdir():
                child.unlink()
            oldpath.rmdir()


@dataclass
class Pki:
    """A CA, the peer's server leaf (kubelet-style Secret dir), a client leaf, and the bad ones."""

    root: Path
    ca: CA = field(default_factory=lambda: CA("blazen-peer-ca"))
    other_ca: CA = field(default_factory=lambda: CA("some-other-ca"))

    def __post_init__(self) -> None:
        self.secret = KubeletSecretDir(self.root / "tls")
        self.server = self.issue_server(1001)
        self.secret.write(secret_files(self.server, self.ca))
        now = dt.datetime.now(dt.UTC)
        self.client = self.ca.issue("caller", server=False)
        self.client_files = write_pem_files(self.root / "client", self.client, self.ca)
        self.foreign_files = write_pem_files(
            self.root / "foreign", self.other_ca.issue("intruder", server=False), self.other_ca
        )
        expired = self.ca.issue(
            "expired",
            server=False,
            not_before=now - dt.timedelta(days=10),
            not_after=now - dt.timedelta(days=1),
        )
        self.expired_files = write_pem_files(self.root / "expired", expired, self.ca)

    def issue_server(self, serial: int) -> Issued:
        return self.ca.issue("peer-0", serial=serial, dns=("localhost", "peer-0.peers.example"))

    def rotate(self, serial: int) -> Issued:
        self.server = self.issue_server(serial)
        self.secret.write(secret_files(self.server, self.ca))
        return self.server

    @property
    def cert(self) -> str:
        return str(self.secret.path("tls.crt"))

    @property
    def key(self) -> str:
        return str(self.secret.path("tls.key"))

    @property
    def ca_file(self) -> str:
        return str(self.secret.path("ca.crt"))

    @property
    def ca_pem(self) -> bytes:
        return self.ca.cert_pem

"""Certificates that follow a Secret volume without a restart.

The kubelet updates a Secret volume atomically: the files live in a timestamped directory, ``..data``
points at it, and ``tls.crt`` is a symlink to ``..data/tls.crt``; an update writes a new directory and
renames a new ``..data`` symlink over the old one. ``ReloadingTlsSource`` polls (default every second, no
inotify): it compares, per file, the resolved path, inode, size and mtime; when that changed it reads the
three files, and when their content changed it validates the new set (``validate_tls_material``) before
swapping it in. A half-written, mismatched or expired set is refused, logged once, and the previous set
stays in use; the next poll tries again.

**CA rotation.** The trusted roots are exactly the certificates the CA file (the trust bundle) holds now:
during a rotation it carries the old and the new root, and a root removed from it stops being trusted at
the next reload, new handshakes refusing the leaves it signed. How long both roots stay is the bundle's
owner's decision (docs/security.md), not a timer here.

Consumers:

* grpcio: ``grpc_server_credentials()`` returns ``grpc.dynamic_ssl_server_credentials``; grpcio calls
  its fetcher before every new handshake, and the fetcher answers a new
  ``ssl_server_certificate_configuration`` once per new generation, None otherwise. Open connections
  keep the session they negotiated.
* ``ssl`` (aiohttp HTTPS): ``ssl_context()`` returns a listener context whose SNI callback (OpenSSL
  calls it for every ClientHello, with or without a server name) switches the connection to an
  immutable per-generation context holding the current certificate and CA. New handshakes see the new
  set, established connections are untouched, and a removed root really stops being trusted
  (``load_verify_locations`` on a live context could only add roots).
* grpcio channels (session-ref forwarding, a router's hop to its pools): ``grpc_channel_credentials()``
  for each new channel; a listener reopens channels after a reload.
* metrics: ``reload_count``, ``failure_count``, ``not_after_timestamp`` and ``add_listener(callback)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import grpc

from ..wire.errors import PeerTlsError
from .tls import TlsMaterial, system_roots_pem, validate_tls_material
from .tls_policy import TLS12_CIPHERS

__all__ = ["ReloadingTlsSource", "build_server_ssl_context", "ca_files", "grpc_certificate_configuration"]

log = logging.getLogger("blazen_peer.pki.reload")

ClientAuth = Literal["none", "optional", "required"]
_VERIFY = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


def grpc_certificate_configuration(material: TlsMaterial) -> grpc.ServerCertificateConfiguration:
    """The grpcio certificate configuration of a validated server set."""
    if material.cert_chain_pem is None or material.private_key_pem is None:
        raise PeerTlsError("a server certificate configuration needs a certificate and a private key")
    return grpc.ssl_server_certificate_configuration(
        [(material.private_key_pem, material.cert_chain_pem)], root_certificates=material.ca_pem
    )


def _load_chain_from_memory(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    # ssl only loads certificates from paths. Keep the key off the disk: an anonymous memory file,
    # read through /proc/self/fd; fall back to a private temporary directory, removed at once.
    blob = cert_pem.rstrip(b"\n") + b"\n" + key_pem
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("blazen-peer-tls", os.MFD_CLOEXEC)
        try:
            with os.fdopen(os.dup(fd), "wb") as f:
                f.write(blob)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="blazen-tls-") as d:  # mode 0700
        path = os.path.join(d, "chain.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        ctx.load_cert_chain(path)


def build_server_ssl_context(material: TlsMaterial, client_auth: ClientAuth = "optional") -> ssl.SSLContext:
    """A server ``SSLContext`` holding one validated set (TLS >= 1.2).

    ``client_auth``: "optional" asks for a client certificate and verifies it when one is sent (browsers send
    none); "required" refuses clients without one; "none" never asks. Without a CA it is always "none".
    """
    if material.cert_chain_pem is None or material.private_key_pem is None:
        raise PeerTlsError("a server SSL context needs a certificate and a private key")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    _load_chain_from_memory(ctx, material.cert_chain_pem, material.private_key_pem)
    if material.ca_pem is not None and client_auth != "none":
        ctx.load_verify_locations(cadata=material.ca_pem.decode("ascii"))
        ctx.verify_mode = _VERIFY[client_auth]
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def ca_files(ca: str | os.PathLike[str] | None) -> tuple[str, ...]:
    """The CA files of a ``--tls-ca`` value, ``PATH[,PATH...]``: the first that holds a certificate is the
    trust, the others stand in while it is absent or empty (a trust bundle the operator fills one pass after
    the first leaf, then the ca.crt that arrives with that leaf). Never a union: during a CA rotation a pod
    must not trust, and so serve, a new leaf before the bundle every caller reads vouches for it."""
    if ca is None:
        return ()
    return tuple(p for p in os.fspath(ca).split(",") if p)


@dataclass(frozen=True, slots=True)
class _Snapshot:
    material: TlsMaterial
    generation: int
    content_hash: str


def _file_signature(path: str) -> tuple:
    try:
        st = os.stat(path)  # follows tls.crt -> ..data/tls.crt -> ..<timestamp>/tls.crt
    except OSError as e:
        return (path, "error", e.errno)
    return (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)


class ReloadingTlsSource:
    """A validated TLS set that follows its PEM files; see the module docstring.

    The constructor loads and validates the files once and raises ``PeerTlsError`` when they are
    unusable, so a bad start fails fast. Call ``start()`` to poll in a daemon thread (``stop()``, or use
    it as a context manager); without the thread, the grpc fetcher and the SNI callback poll themselves,
    at most once per interval.
    """

    def __init__(
        self,
        cert: str | os.PathLike[str],
        key: str | os.PathLike[str],
        ca: str | os.PathLike[str] | None = None,
        *,
        role: Literal["server", "client"] = "server",
        poll_interval: float = 1.0,
        ca_optional: bool = False,
    ) -> None:
        self._paths = (os.fspath(cert), os.fspath(key), *ca_files(ca))
        self._role = role
        # An issuer that writes no ca.crt (ACME) leaves the file absent or empty: with ca_optional that set
        # has no CA (outbound hops then verify against the system roots) until a CA file holds one.
        self._ca_optional = ca_optional
        self.poll_interval = poll_interval
        self._lock = threading.Lock()
        self._listeners: list[Callable[[TlsMaterial], None]] = []
        self._ssl_contexts: list[_SwappingContext] = []
        self._last_failure: tuple | None = None
        self._next_poll = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reload_count = 0
        self.failure_count = 0
        self.last_error: str | None = None
        sig = self._signature()
        blobs = self._read()  # raises PeerTlsError
        material = self._validate(blobs)
        self._seen_sig = sig
        self._snap = _Snapshot(material, 1, self._hash(blobs))

    # -- state ----------------------------------------------------------------------------------------------
    @property
    def material(self) -> TlsMaterial:
        return self._snap.material

    @property
    def generation(self) -> int:
        return self._snap.generation

    @property
    def not_after_timestamp(self) -> float | None:
        return self._snap.material.not_after_timestamp

    def add_listener(self, callback: Callable[[TlsMaterial], None]) -> None:
        """Call ``callback(new_material)`` after each successful reload (from the polling thread)."""
        self._listeners.append(callback)

    # -- polling --------------------------------------------------------------------------------------------
    def start(self) -> ReloadingTlsSource:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="blazen-tls-reload", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> ReloadingTlsSource:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_interval):
            try:
                self.check_now()
            except Exception:  # never let the poller die
                log.exception("certificate reload check failed")

    def _poll_if_due(self) -> None:
        if self._thread is not None:
            return
        now = time.monotonic()
        if now < self._next_poll:
            return
        self._next_poll = now + self.poll_interval
        try:
            self.check_now(blocking=False)
        except Exception:
            log.exception("certificate reload check failed")

    def check_now(self, *, blocking: bool = True) -> bool:
        """Poll once; returns True when a new set was swapped in."""
        if not self._lock.acquire(blocking=blocking):
            return False
        try:
            swapped = self._check_locked()
        finally:
            self._lock.release()
        if swapped:
            material = self._snap.material
            for cb in list(self._listeners):
                try:
                    cb(material)
                except Exception:
                    log.exception("certificate reload listener failed")
        return swapped

    def _check_locked(self) -> bool:
        sig = self._signature()
        if sig == self._seen_sig:
            return False
        try:
            blobs = self._read()
        except PeerTlsError as e:
            self._fail(sig, str(e))
            return False
        content_hash = self._hash(blobs)
        if content_hash == self._snap.content_hash:
            self._seen_sig = sig  # touched, not changed
            return False
        try:
            material = self._validate(blobs)
        except PeerTlsError as e:
            self._fail(sig, str(e))
            return False
        self._seen_sig = sig
        old = self._snap
        self._snap = _Snapshot(material, old.generation + 1, content_hash)
        self._last_failure = None
        self.last_error = None
        self.reload_count += 1
        log.info(
            "TLS certificate reloaded",
            extra={
                "serial": f"{material.serial:x}" if material.serial is not None else None,
                "not_after": material.not_after.isoformat() if material.not_after else None,
                "generation": self._snap.generation,
                "roots": material.ca_pem.count(b"-----BEGIN CERTIFICATE-----") if material.ca_pem else 0,
            },
        )
        for sc in list(self._ssl_contexts):
            sc.prepare(self._snap)
        return True

    def _fail(self, sig: tuple, error: str) -> None:
        self.last_error = error
        key = (sig, error)
        if key != self._last_failure:
            self._last_failure = key
            self.failure_count += 1
            cur = self._snap.material
            log.warning(
                "refusing the new TLS files, keeping the current set (serial %s): %s",
                f"{cur.serial:x}" if cur.serial is not None else "-",
                error,
            )

    def _signature(self) -> tuple:
        return tuple(_file_signature(p) for p in self._paths)

    def _read(self) -> tuple[bytes, ...]:
        out = []
        for i, path in enumerate(self._paths):
            name = ("certificate", "private key")[i] if i < 2 else "CA cert"
            try:
                with open(path, "rb") as f:
                    out.append(f.read())
            except OSError as e:
                if isinstance(e, FileNotFoundError) and self._ca_optional and name == "CA cert":
                    out.append(b"")
                    continue
                raise PeerTlsError(f"failed to read {self._role} {name} {path}: {e.strerror or e}") from e
        return tuple(out)

    @staticmethod
    def _hash(blobs: tuple[bytes, ...]) -> str:
        h = hashlib.sha256()
        for b in blobs:
            h.update(len(b).to_bytes(8, "big"))
            h.update(b)
        return h.hexdigest()

    def _validate(self, blobs: tuple[bytes, ...]) -> TlsMaterial:
        # The first CA file that holds something is the trust; the rest are fallbacks for while it is empty.
        cas = [b for b in blobs[2:] if b.strip()] or ([] if self._ca_optional else list(blobs[2:3]))
        ca_pem = cas[0] if cas else None
        return validate_tls_material(
            cert_pem=blobs[0],
            key_pem=blobs[1],
            ca_pem=ca_pem,
            role=self._role,
            cert_label=f"{self._role} cert {self._paths[0]}",
            key_label=f"{self._role} key {self._paths[1]}",
            ca_label=f"CA cert {','.join(self._paths[2:])}" if len(self._paths) > 2 else "CA cert",
        )

    # -- consumers ------------------------------------------------------------------------------------------
    def grpc_server_credentials(self, *, require_client_auth: bool | None = None) -> grpc.ServerCredentials:
        """``grpc.dynamic_ssl_server_credentials`` following this source.

        ``require_client_auth`` defaults to True when a CA was given (mTLS), False otherwise.
        """
        snap = self._snap
        if require_client_auth is None:
            require_client_auth = snap.material.ca_pem is not None
        if require_client_auth and snap.material.ca_pem is None:
            raise PeerTlsError("client authentication needs a CA bundle (--tls-ca)")
        served = [snap.generation]

        def fetcher() -> grpc.ServerCertificateConfiguration | None:
            self._poll_if_due()
            current = self._snap
            if current.generation == served[0]:
                return None
            served[0] = current.generation
            return grpc_certificate_configuration(current.material)

        return grpc.dynamic_ssl_server_credentials(
            grpc_certificate_configuration(snap.material),
            fetcher,
            require_client_authentication=require_client_auth,
        )

    def grpc_channel_credentials(self) -> grpc.ChannelCredentials:
        """Channel credentials of the current set: its certificate as client identity, its CA as trust
        (``system_roots_pem()`` without one: a server certificate from a public issuer such as ACME verifies).
        A channel keeps them: open new channels after a reload."""
        m = self._snap.material
        roots = m.ca_pem if m.ca_pem is not None else system_roots_pem()
        return grpc.ssl_channel_credentials(roots, m.private_key_pem, m.cert_chain_pem)

    def ssl_context(self, *, client_auth: ClientAuth = "optional") -> ssl.SSLContext:
        """A server ``SSLContext`` for aiohttp whose certificate and CA follow this source."""
        sc = _SwappingContext(self, client_auth)
        with self._lock:
            sc.prepare(self._snap)
            self._ssl_contexts.append(sc)
        return sc.listener


class _SwappingContext:
    def __init__(self, source: ReloadingTlsSource, client_auth: ClientAuth) -> None:
        self._source = source
        self._client_auth = client_auth
        self._current: tuple[int, ssl.SSLContext] | None = None
        self.listener = build_server_ssl_context(source.material, client_auth)
        self.listener.sni_callback = self._on_client_hello

    def prepare(self, snap: _Snapshot) -> ssl.SSLContext:
        cur = self._current
        if cur is not None and cur[0] == snap.generation:
            return cur[1]
        ctx = build_server_ssl_context(snap.material, self._client_auth)
        self._current = (snap.generation, ctx)
        return ctx

    def _on_client_hello(self, ssl_obj, server_name, listener_ctx) -> None:
        self._source._poll_if_due()
        snap = self._source._snap
        cur = self._current
        ctx = cur[1] if cur is not None and cur[0] == snap.generation else self.prepare(snap)
        with contextlib.suppress(AttributeError):
            ssl_obj.context = ctx
        return None

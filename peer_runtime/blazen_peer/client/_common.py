from __future__ import annotations

import os
import uuid as _uuid
from typing import TYPE_CHECKING, Any

from ..wire.messages import SubWorkflowRequest, SubWorkflowResponse
from ..wire.protocol import ENVELOPE_VERSION
from .errors import PeerEncodeError, PeerEnvelopeVersionError, PeerTlsError, PeerWorkflowError

if TYPE_CHECKING:
    from ..pki.reload import ReloadingTlsSource

# A directory holding tls.crt, tls.key and ca.crt (a mounted client Secret) or (cert, key, ca) paths.
TlsFiles = (
    str | os.PathLike[str] | tuple[str | os.PathLike[str], str | os.PathLike[str], str | os.PathLike[str]]
)


def open_tls_files(files: TlsFiles) -> ReloadingTlsSource:
    """The caller's certificate files, validated now (``PeerTlsError``); the caller starts following them."""
    from ..pki.reload import ReloadingTlsSource  # cryptography only for callers that reload files

    if isinstance(files, tuple):
        cert, key, ca = files
    else:  # a mounted Secret: the keys of a cert-manager TLS Secret
        cert, key, ca = (os.path.join(files, name) for name in ("tls.crt", "tls.key", "ca.crt"))
    return ReloadingTlsSource(cert, key, ca, role="client")


def normalize_uuid(ref_uuid: Any) -> str:
    try:
        return str(ref_uuid if isinstance(ref_uuid, _uuid.UUID) else _uuid.UUID(str(ref_uuid)))
    except ValueError as exc:
        raise PeerEncodeError(f"invalid UUID: {ref_uuid!r}: {exc}") from None


def build_request(
    request: SubWorkflowRequest | str,
    step_ids: list[str] | None,
    input: Any,
    timeout_secs: int | None,
) -> SubWorkflowRequest:
    if isinstance(request, SubWorkflowRequest):
        return request
    try:
        return SubWorkflowRequest.new(request, step_ids, input, timeout_secs)
    except (TypeError, ValueError) as exc:
        raise PeerEncodeError(f"input is not JSON-serializable: {exc}") from None


def check_response(resp: SubWorkflowResponse, raise_on_error: bool) -> SubWorkflowResponse:
    if resp.envelope_version > ENVELOPE_VERSION:
        raise PeerEnvelopeVersionError(
            f"peer answered with envelope version {resp.envelope_version}, "
            f"newer than supported {ENVELOPE_VERSION}"
        )
    if raise_on_error and resp.error is not None:
        raise PeerWorkflowError(resp.error, response=resp)
    return resp


def pem(value: Any, what: str) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = value.encode()
    if not isinstance(value, bytes | bytearray) or b"-----BEGIN " not in value:
        raise PeerTlsError(f"{what} is not PEM data")
    return bytes(value)


def tls_parts(
    tls: Any, root: Any, cert: Any, key: Any
) -> tuple[bytes | None, bytes | None, bytes | None] | None:
    """``tls`` is what ``blazen_peer.security.load_client_tls()`` returns (``ca_pem``, ``cert_chain_pem``,
    ``private_key_pem``) or a dict with those keys; or give the PEM bytes directly. None: no TLS asked for."""
    if tls is not None:
        if isinstance(tls, dict):
            root, cert, key = tls.get("ca_pem"), tls.get("cert_chain_pem"), tls.get("private_key_pem")
        elif all(hasattr(tls, a) for a in ("ca_pem", "cert_chain_pem", "private_key_pem")):
            root, cert, key = tls.ca_pem, tls.cert_chain_pem, tls.private_key_pem
        else:
            raise PeerTlsError(f"unsupported tls= value of type {type(tls).__name__}")
    if root is None and cert is None and key is None:
        return None
    if (cert is None) != (key is None):
        raise PeerTlsError("a client identity needs both a certificate chain and a private key")
    return pem(root, "root certificates"), pem(cert, "certificate chain"), pem(key, "private key")

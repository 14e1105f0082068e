"""What both TLS listeners negotiate. Free of grpcio imports on purpose: ``blazen-peer serve`` must put
``GRPC_SSL_CIPHER_SUITES`` in the environment before grpcio is imported (grpcio reads it once, then)."""

from __future__ import annotations

import os

__all__ = ["TLS12_CIPHERS", "pin_grpc_environment"]

#: The TLS 1.2 suites both listeners offer (``ssl`` for the shim, ``GRPC_SSL_CIPHER_SUITES`` for grpcio,
#: OpenSSL and BoringSSL spell them alike): forward-secret AEAD only, no CBC (Lucky13-style padding oracles)
#: and no RSA key exchange. TLS 1.3 suites are all AEAD and are not affected.
TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)


def pin_grpc_environment() -> None:
    """For a process about to import grpcio: its TLS 1.2 suites are ours (whatever the grpcio version's
    default), and its C core does not log a line per failed handshake (``GRPC_VERBOSITY``, which an
    operator may still raise to debug)."""
    os.environ["GRPC_SSL_CIPHER_SUITES"] = TLS12_CIPHERS
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

"""Security building blocks of the peer runtime, one job per module (see docs/security.md):

``errors`` (typed errors with their gRPC/HTTP status), ``tls`` (PEM validation), ``reload`` (certificates
that follow a Secret volume), ``auth`` (bearer token), ``cors``, ``limits``, ``drain``, ``guard`` (per-call
guards as interceptors/middleware), ``logging`` (JSON logs, redaction).

This package imports nothing at import time: ``BlazenPeerServer.start()`` imports it to look for an
``install(server)`` seam, which the integration phase adds here.
"""

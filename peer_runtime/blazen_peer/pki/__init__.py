"""TLS files, shared by the server side and the client: PEM validation (``tls``), the TLS suites both
listeners accept (``tls_policy``) and certificates that follow their files without a restart (``reload``).

It sits under ``security`` and ``transport`` and imports only ``wire``, so ``blazen_peer.client`` (which may
not import any server-side package) reloads a caller's certificate with the same mechanism as the server.
"""

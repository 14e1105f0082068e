# The Rust extension built from peer_runtime/relay (the router's data plane, docs/router.md).
from typing import Any

_Pem = bytes

class Relay:
    def __init__(
        self,
        policy: Any,
        relayed: list[str],
        fallback: str,
        *,
        metadata: tuple[str, str, str],
        tls: tuple[_Pem, _Pem, _Pem | None] | None,
        hop_tls: tuple[_Pem | None, _Pem | None, _Pem] | None,
        max_connections: int,
        handshake_timeout: float,
        max_connection_age: float,
        max_request_bytes: int,
    ) -> None: ...
    def start(self, addr: str) -> int: ...
    def set_tls(self, cert: _Pem, key: _Pem, ca: _Pem | None) -> None: ...
    def set_hop_tls(self, hop_tls: tuple[_Pem | None, _Pem | None, _Pem] | None) -> None: ...
    def connections(self) -> int: ...
    def stop(self, grace: float) -> None: ...

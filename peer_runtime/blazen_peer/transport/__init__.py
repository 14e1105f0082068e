"""The transports around the engine: the gRPC server, the HTTP/JSON shim and session-ref forwarding. Each
takes its per-call wrapper (the admission) from its caller; none imports the layers above."""

from .grpc_server import create_grpc_server
from .http_shim import create_http_app

__all__ = ["create_grpc_server", "create_http_app"]

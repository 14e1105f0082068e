"""gRPC server, HTTP/JSON shim, session-ref forwarding, and the hooks the security layer plugs into."""

from .grpc_server import create_grpc_server
from .hooks import ServerHooks
from .http_shim import create_http_app

__all__ = ["ServerHooks", "create_grpc_server", "create_http_app"]

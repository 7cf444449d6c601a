"""gRPC transports for the hijacked session connection (see ``base``).

Importing this package imports neither grpc nor h2; each transport module is
loaded by its factory function on first use.
"""

from .base import (
    ClientConnection,
    Handler,
    RpcError,
    RpcStream,
    ServerConnection,
    StatusCode,
    connect_grpcio,
    connect_h2,
    serve_grpcio,
    serve_h2,
)

__all__ = [
    "ClientConnection",
    "Handler",
    "RpcError",
    "RpcStream",
    "ServerConnection",
    "StatusCode",
    "connect_grpcio",
    "connect_h2",
    "serve_grpcio",
    "serve_h2",
]

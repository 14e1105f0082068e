"""Python clients for a Blazen peer: ``BlazenPeerClient`` (gRPC) and ``HttpPeerClient`` (HTTP/JSON)."""

from ..wire.messages import (
    DerefRequest,
    DerefResponse,
    ReleaseRequest,
    ReleaseResponse,
    RemoteRefDescriptor,
    SubWorkflowEvent,
    SubWorkflowRequest,
    SubWorkflowResponse,
)
from .errors import (
    PeerEncodeError,
    PeerEnvelopeVersionError,
    PeerError,
    PeerSessionRefNotFoundError,
    PeerTlsError,
    PeerTransportError,
    PeerUnknownStepError,
    PeerWorkflowError,
    peer_envelope_version,
    peer_token_env,
    resolve_peer_token,
)
from .grpc_client import BlazenPeerClient
from .http_client import HttpPeerClient

__all__ = [
    "BlazenPeerClient",
    "DerefRequest",
    "DerefResponse",
    "HttpPeerClient",
    "PeerEncodeError",
    "PeerEnvelopeVersionError",
    "PeerError",
    "PeerSessionRefNotFoundError",
    "PeerTlsError",
    "PeerTransportError",
    "PeerUnknownStepError",
    "PeerWorkflowError",
    "ReleaseRequest",
    "ReleaseResponse",
    "RemoteRefDescriptor",
    "SubWorkflowEvent",
    "SubWorkflowRequest",
    "SubWorkflowResponse",
    "peer_envelope_version",
    "peer_token_env",
    "resolve_peer_token",
]

"""The protocol layer: its names and numbers (``protocol``), the error hierarchy (``errors``), postcard
payload structs, the protobuf envelope and Blazen's JSON rendering. Imports nothing else of the runtime."""

from .envelope import EnvelopeDecodeError, unwrap, wrap
from .errors import PeerError, PeerStatusError, PeerTlsError, Status
from .messages import (
    DerefRequest,
    DerefResponse,
    ReleaseRequest,
    ReleaseResponse,
    RemoteRefDescriptor,
    SubWorkflowEvent,
    SubWorkflowRequest,
    SubWorkflowResponse,
    decode_stream_frame,
    dumps_json,
    encode_stream_event,
    encode_stream_final,
)
from .postcard import PostcardDecodeError
from .protocol import ENVELOPE_VERSION, MAX_MESSAGE_BYTES, SERVICE

__all__ = [
    "ENVELOPE_VERSION",
    "MAX_MESSAGE_BYTES",
    "SERVICE",
    "DerefRequest",
    "DerefResponse",
    "EnvelopeDecodeError",
    "PeerError",
    "PeerStatusError",
    "PeerTlsError",
    "PostcardDecodeError",
    "ReleaseRequest",
    "ReleaseResponse",
    "RemoteRefDescriptor",
    "Status",
    "SubWorkflowEvent",
    "SubWorkflowRequest",
    "SubWorkflowResponse",
    "decode_stream_frame",
    "dumps_json",
    "encode_stream_event",
    "encode_stream_final",
    "unwrap",
    "wrap",
]

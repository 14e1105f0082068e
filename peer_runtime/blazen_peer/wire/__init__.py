"""Byte-level wire format: postcard payload structs, the protobuf envelope, and Blazen's JSON rendering."""

from .envelope import MAX_MESSAGE_BYTES, SERVICE, EnvelopeDecodeError, unwrap, wrap
from .messages import (
    ENVELOPE_VERSION,
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

__all__ = [
    "ENVELOPE_VERSION",
    "MAX_MESSAGE_BYTES",
    "SERVICE",
    "DerefRequest",
    "DerefResponse",
    "EnvelopeDecodeError",
    "PostcardDecodeError",
    "ReleaseRequest",
    "ReleaseResponse",
    "RemoteRefDescriptor",
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

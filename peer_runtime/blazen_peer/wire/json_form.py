"""Blazen's JSON rendering of the payload structs (serde_json), used by the HTTP/JSON shim.

Bytes are arrays of integers 0-255, UUIDs lowercase hyphenated strings, ``None`` is ``null``, and the keys
``timeout_secs``, ``result_json`` and ``error`` are always present.
"""

from __future__ import annotations

import json
import uuid as _uuid
from typing import Any

from .errors import PeerError
from .messages import (
    DerefRequest,
    DerefResponse,
    ReleaseRequest,
    ReleaseResponse,
    RemoteRefDescriptor,
    SubWorkflowRequest,
    SubWorkflowResponse,
)

_INT_TEXT = [str(i) for i in range(256)]


class JsonFormError(PeerError, ValueError):
    pass


def _byte_array(data: bytes) -> str:
    return "[" + ",".join([_INT_TEXT[b] for b in data]) + "]"


def _bytes_field(value: Any, name: str) -> bytes:
    if isinstance(value, bytes):  # already converted (json_request.py's large-body path)
        return value
    # Blazen's client also accepts a string for byte fields and takes its raw UTF-8; so do we.
    if isinstance(value, str):
        return value.encode("utf-8")
    if not isinstance(value, list):
        raise JsonFormError(f"invalid type for `{name}`: expected a sequence")
    try:
        return bytes(value)
    except (TypeError, ValueError):
        raise JsonFormError(f"invalid value in `{name}`: expected integers 0-255") from None


def _require(obj: Any, name: str) -> Any:
    if not isinstance(obj, dict):
        raise JsonFormError("invalid type: expected a JSON object")
    if name not in obj:
        raise JsonFormError(f"missing field `{name}`")
    return obj[name]


def _uint(value: Any, name: str, bits: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < (1 << bits):
        raise JsonFormError(f"invalid value for `{name}`: expected u{bits}")
    return value


def _str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise JsonFormError(f"invalid type for `{name}`: expected a string")
    return value


def _uuid_text(value: Any, name: str) -> str:
    try:
        return str(_uuid.UUID(_str(value, name)))
    except ValueError:
        raise JsonFormError(f"invalid value for `{name}`: not a UUID") from None


def loads(raw: bytes | bytearray) -> Any:
    """Parse a body; ``JsonFormError`` for anything that is not JSON, nesting too deep to parse included
    (``json`` recurses once per level and raises RecursionError near the interpreter's limit)."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise JsonFormError(str(exc)) from None


# -- requests (what the shim reads) ----------------------------------------------------------------------


def request_from_json(obj: Any) -> SubWorkflowRequest:
    version = _uint(_require(obj, "envelope_version"), "envelope_version", 32)
    name = _str(_require(obj, "workflow_name"), "workflow_name")
    step_ids = _require(obj, "step_ids")
    if not isinstance(step_ids, list) or not all(isinstance(s, str) for s in step_ids):
        raise JsonFormError("invalid type for `step_ids`: expected a sequence of strings")
    input_json = _bytes_field(_require(obj, "input_json"), "input_json")
    timeout = obj.get("timeout_secs")
    if timeout is not None:
        timeout = _uint(timeout, "timeout_secs", 64)
    return SubWorkflowRequest(name, step_ids, input_json, timeout, version)


def ref_request_from_json(obj: Any, cls: type[DerefRequest] | type[ReleaseRequest]) -> Any:
    version = _uint(_require(obj, "envelope_version"), "envelope_version", 32)
    return cls(_uuid_text(_require(obj, "ref_uuid"), "ref_uuid"), version)


def request_to_json(req: SubWorkflowRequest) -> str:
    name = json.dumps(req.workflow_name, ensure_ascii=False)
    steps = json.dumps(req.step_ids, ensure_ascii=False, separators=(",", ":"))
    timeout = "null" if req.timeout_secs is None else str(req.timeout_secs)
    return (
        f'{{"envelope_version":{req.envelope_version},"workflow_name":{name},"step_ids":{steps},'
        f'"input_json":{_byte_array(req.input_json)},"timeout_secs":{timeout}}}'
    )


def ref_request_to_json(req: DerefRequest | ReleaseRequest) -> str:
    return json.dumps({"envelope_version": req.envelope_version, "ref_uuid": req.ref_uuid})


# -- responses (what the shim writes) --------------------------------------------------------------------


def _ref_json(key: str, d: RemoteRefDescriptor) -> str:
    origin = json.dumps(d.origin_node_id, ensure_ascii=False)
    tag = json.dumps(d.type_tag, ensure_ascii=False)
    created = d.created_at_epoch_ms
    return f'"{key}":{{"origin_node_id":{origin},"type_tag":{tag},"created_at_epoch_ms":{created}}}'


def response_to_json(resp: SubWorkflowResponse) -> str:
    state = ",".join(
        f"{json.dumps(k, ensure_ascii=False)}:{_byte_array(v)}" for k, v in resp.state_json.items()
    )
    refs = ",".join(_ref_json(k, d) for k, d in resp.remote_refs.items())
    result = "null" if resp.result_json is None else _byte_array(resp.result_json)
    error = "null" if resp.error is None else json.dumps(resp.error, ensure_ascii=False)
    return (
        f'{{"envelope_version":{resp.envelope_version},"state_json":{{{state}}},"result_json":{result},'
        f'"remote_refs":{{{refs}}},"error":{error}}}'
    )


def deref_response_to_json(resp: DerefResponse) -> str:
    return f'{{"envelope_version":{resp.envelope_version},"payload":{_byte_array(resp.payload)}}}'


def release_response_to_json(resp: ReleaseResponse) -> str:
    return f'{{"envelope_version":{resp.envelope_version},"released":{"true" if resp.released else "false"}}}'


def response_from_json(obj: Any) -> SubWorkflowResponse:
    version = _uint(_require(obj, "envelope_version"), "envelope_version", 32)
    state_raw = _require(obj, "state_json")
    if not isinstance(state_raw, dict):
        raise JsonFormError("invalid type for `state_json`: expected a map")
    state = {
        k: _bytes_field(v, "state_json") if isinstance(v, list) else _bad_state()
        for k, v in state_raw.items()
    }
    result_raw = _require(obj, "result_json")
    result = None if result_raw is None else _bytes_field(result_raw, "result_json")
    refs_raw = _require(obj, "remote_refs")
    if not isinstance(refs_raw, dict):
        raise JsonFormError("invalid type for `remote_refs`: expected a map")
    refs = {}
    for key, d in refs_raw.items():
        refs[_uuid_text(key, "remote_refs")] = RemoteRefDescriptor(
            _str(_require(d, "origin_node_id"), "origin_node_id"),
            _str(_require(d, "type_tag"), "type_tag"),
            _uint(_require(d, "created_at_epoch_ms"), "created_at_epoch_ms", 64),
        )
    error = obj.get("error")
    if error is not None:
        error = _str(error, "error")
    return SubWorkflowResponse(state, result, refs, error, version)


def _bad_state() -> bytes:
    raise JsonFormError("invalid type for `state_json` value: expected a sequence")


def deref_response_from_json(obj: Any) -> DerefResponse:
    version = _uint(_require(obj, "envelope_version"), "envelope_version", 32)
    return DerefResponse(_bytes_field(_require(obj, "payload"), "payload"), version)


def release_response_from_json(obj: Any) -> ReleaseResponse:
    version = _uint(_require(obj, "envelope_version"), "envelope_version", 32)
    released = _require(obj, "released")
    if not isinstance(released, bool):
        raise JsonFormError("invalid type for `released`: expected a boolean")
    return ReleaseResponse(released, version)

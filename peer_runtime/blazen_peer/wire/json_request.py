"""An HTTP invoke body parsed with a bounded memory peak.

Blazen renders ``input_json`` as an array of integers (three to four characters of JSON per byte), and
``json.loads`` turns that array into one list slot (8 bytes) per byte before ``bytes()`` copies it: a
62 MiB body then costs about five times its size. Above ``STREAM_FROM`` bytes the array is converted
straight from the body in slices (no list of the whole array) and the rest of the document, small, goes
through ``json.loads`` with the array replaced by a per-process placeholder string; the placeholder must
come back as the top-level ``input_json``, else (a look-alike elsewhere in the document, duplicate keys,
anything unusual) the body takes the ordinary path, which also gives the ordinary error messages.
"""

from __future__ import annotations

import json
import re
import secrets

from .json_form import loads, request_from_json
from .messages import SubWorkflowRequest

__all__ = ["STREAM_FROM", "request_from_json_bytes"]

STREAM_FROM = 1 << 20
_SLICE = 1 << 18
_INPUT_ARRAY = re.compile(rb'"input_json"\s*:\s*\[')
_PLACEHOLDER = secrets.token_hex(16)


def _int_array(raw: bytearray, start: int, end: int) -> bytes:
    """``raw[start:end]`` (the inside of ``[...]``) as bytes, one slice at a time through ``json.loads``
    (C speed, JSON's own number syntax); ValueError unless it is an array of integers 0-255."""
    out = bytearray()
    pos = start
    while pos < end:
        stop = min(end, pos + _SLICE)
        if stop < end:
            comma = raw.find(b",", stop, end)
            stop = end if comma < 0 else comma
        items = json.loads(b"[" + raw[pos:stop] + b"]")
        if not all(type(i) is int for i in items):  # bytes() would take bools and reject the rest anyway
            raise ValueError("not an integer")
        out += bytes(items)
        pos = stop + 1
    return bytes(out)


def request_from_json_bytes(raw: bytearray) -> SubWorkflowRequest:
    """``request_from_json(json.loads(raw))`` with the same result, without the peak for large bodies."""
    if len(raw) >= STREAM_FROM:
        m = _INPUT_ARRAY.search(raw)
        end = raw.find(b"]", m.end()) if m is not None else -1
        if m is not None and end > 0:
            empty = end - m.end() < 64 and not raw[m.end() : end].strip()
            try:
                data = b"" if empty else _int_array(raw, m.end(), end)
            except (ValueError, RecursionError):  # not a plain integer array: the ordinary path says why
                data = None
            if data is not None:
                rest = raw[: m.start()] + b'"input_json":"' + _PLACEHOLDER.encode() + b'"' + raw[end + 1 :]
                obj = loads(rest)
                if isinstance(obj, dict) and obj.get("input_json") == _PLACEHOLDER:
                    obj["input_json"] = data
                    return request_from_json(obj)
    return request_from_json(loads(raw))

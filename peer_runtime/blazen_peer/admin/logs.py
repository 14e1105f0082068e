"""Structured logs: one JSON object per line, with the node id, the caller's node id and a request id,
and secrets redacted.

``configure_json_logging(node_id=...)`` installs one handler on the root logger. ``bind_log_context(...)``
(contextvars, so it follows asyncio tasks) attaches ``caller_node_id`` and ``request_id`` to every record
logged afterwards in the same context; the admission calls it once per call, with ``new_request_id()`` when
the caller sent no ``x-request-id``. Redaction runs on the final text of each record
(message, arguments, exception and extra fields): ``Bearer <anything>``, PEM private-key blocks and the
values returned by the ``secrets`` callback (e.g. ``TokenSource.secrets``) never reach the output.
"""

from __future__ import annotations

import contextvars
import datetime as _dt
import itertools
import json
import logging
import re
import secrets as _secrets
import sys
from collections.abc import Callable, Iterable
from typing import IO, Any

__all__ = [
    "JsonFormatter",
    "LogContext",
    "RedactingFilter",
    "bind_log_context",
    "configure_json_logging",
    "new_request_id",
    "redact",
    "unbind_log_context",
]

_CALLER: contextvars.ContextVar[str | None] = contextvars.ContextVar("blazen_caller_node_id", default=None)
_REQUEST: contextvars.ContextVar[str | None] = contextvars.ContextVar("blazen_request_id", default=None)

# A credential after "Bearer": token68 characters with at least one that is not a letter (tokens are
# random; "bearer token", "Bearer authentication" are prose and stay as written).
_BEARER = re.compile(r"(?i)\b(bearer)\s+(?=[A-Za-z]*[0-9._~+/=-])[A-Za-z0-9._~+/-]+=*")
# A private-key block: the BEGIN line, its base64 body (and PEM headers), the END line if the text has it.
# A bare marker with no key material after it (an error message naming the format) is prose.
_PEM_KEY = re.compile(
    r"-----BEGIN ([A-Z ]*)PRIVATE KEY-----"
    r"(?:\s*[\w-]+:[^\n]*)*(?:\s*[A-Za-z0-9+/=]{16,})+\s*(?:-----END \1PRIVATE KEY-----)?"
)
REDACTED = "[REDACTED]"
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


_REQUEST_PREFIX = _secrets.token_hex(4)
_REQUEST_COUNT = itertools.count(1)

#: what ``bind_log_context`` returns; ``unbind_log_context`` restores the context it replaced.
LogContext = tuple["contextvars.Token[str | None]", "contextvars.Token[str | None]"]


def new_request_id() -> str:
    """A unique request id, cheap enough for every call: a random per-process prefix and a counter (no
    syscall, no uuid)."""
    return f"{_REQUEST_PREFIX}-{next(_REQUEST_COUNT):x}"


def bind_log_context(caller_node_id: str | None, request_id: str) -> LogContext:
    """Attach the caller's node id and the request id to every record logged from now on in this context.

    A server that runs each call in a task of its own (grpc.aio) can drop the result: the context ends with
    the task. One that serves several calls in one task (aiohttp, per connection) passes it to
    ``unbind_log_context`` when the call ends."""
    return _CALLER.set(caller_node_id), _REQUEST.set(request_id)


def current_request_id() -> str | None:
    """The request id bound to this context (the caller's, or the one the admission made up)."""
    return _REQUEST.get()


def unbind_log_context(bound: LogContext) -> None:
    _CALLER.reset(bound[0])
    _REQUEST.reset(bound[1])


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    for s in secrets:
        if s and len(s) >= 4:
            text = text.replace(s, REDACTED)
    text = _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    return _PEM_KEY.sub("[REDACTED PRIVATE KEY]", text)


class RedactingFilter(logging.Filter):
    """For other handlers: rewrites ``record.msg`` (arguments merged) with secrets redacted."""

    def __init__(self, secrets: Callable[[], Iterable[str]] | None = None) -> None:
        super().__init__()
        self._secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = list(self._secrets()) if self._secrets else []
        record.msg = redact(record.getMessage(), secrets)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, secrets)
        return True


class JsonFormatter(logging.Formatter):
    def __init__(self, node_id: str | None, secrets: Callable[[], Iterable[str]] | None = None) -> None:
        super().__init__()
        self.node_id = node_id
        self._secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        secrets = list(self._secrets()) if self._secrets else []
        caller, rid = _CALLER.get(), _REQUEST.get()
        out: dict[str, Any] = {
            "ts": _dt.datetime.fromtimestamp(record.created, _dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage(), secrets),
            "node_id": self.node_id,
        }
        caller = getattr(record, "caller_node_id", caller)
        rid = getattr(record, "request_id", rid)
        if caller is not None:
            out["caller_node_id"] = caller
        if rid is not None:
            out["request_id"] = rid
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out and key not in ("caller_node_id", "request_id"):
                out[key] = (
                    value
                    if isinstance(value, int | float | bool | type(None))
                    else redact(str(value), secrets)
                )
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info), secrets)
        elif record.exc_text:
            out["exc"] = redact(record.exc_text, secrets)
        return json.dumps(out, ensure_ascii=False, default=str)


_installed: logging.Handler | None = None


def configure_json_logging(
    *,
    node_id: str | None,
    level: int | str = "INFO",
    stream: IO[str] | None = None,
    secrets: Callable[[], Iterable[str]] | None = None,
) -> logging.Handler:
    """Install (or replace) the JSON handler on the root logger; returns it."""
    global _installed
    root = logging.getLogger()
    if _installed is not None:
        root.removeHandler(_installed)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(node_id, secrets))
    root.addHandler(handler)
    root.setLevel(level)
    _installed = handler
    return handler

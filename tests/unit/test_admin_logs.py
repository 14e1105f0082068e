from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest
from blazen_peer.admin.logs import (
    RedactingFilter,
    bind_log_context,
    configure_json_logging,
    new_request_id,
    redact,
    unbind_log_context,
)
from blazen_peer.security.auth import TokenSource

from tests.support.pki import CA

TOKEN = "tok-0123456789abcdef"


@pytest.fixture
def logs():
    stream = io.StringIO()
    tokens = TokenSource(token=TOKEN)
    root = logging.getLogger()
    old_level = root.level
    handler = configure_json_logging(node_id="peer-0", stream=stream, secrets=tokens.secrets)
    yield stream
    root.removeHandler(handler)
    root.setLevel(old_level)


def _lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_one_json_object_per_line_with_ids(logs):
    log = logging.getLogger("blazen_peer.test")
    log.info("plain %s", "message")
    bound = bind_log_context("node-a", "r-1")
    log.warning("inside", extra={"step": "my_app::analyze", "attempt": 2})
    unbind_log_context(bound)
    generated = new_request_id()
    bound = bind_log_context("node-b", generated)
    log.info("generated id")
    unbind_log_context(bound)
    log.info("after")
    first, second, third, fourth = _lines(logs)
    assert first["msg"] == "plain message"
    assert first["node_id"] == "peer-0"
    assert first["level"] == "info"
    assert "caller_node_id" not in first
    assert second["caller_node_id"] == "node-a"
    assert second["request_id"] == "r-1"
    assert second["step"] == "my_app::analyze"
    assert second["attempt"] == 2
    assert third["request_id"] == generated
    assert "request_id" not in fourth
    assert "caller_node_id" not in fourth
    assert new_request_id() != generated


async def test_request_ids_follow_asyncio_tasks(logs):
    log = logging.getLogger("blazen_peer.test")

    async def call(n: int) -> None:
        bind_log_context(f"node-{n}", f"r-{n}")  # each task has its own context: no unbind needed
        await asyncio.sleep(0.01 * (3 - n))
        log.info("call %d", n)

    await asyncio.gather(*(call(n) for n in range(3)))
    for rec in _lines(logs):
        n = rec["msg"].split()[-1]
        assert rec["request_id"] == f"r-{n}"
        assert rec["caller_node_id"] == f"node-{n}"


def test_secrets_are_redacted(logs):
    log = logging.getLogger("blazen_peer.test")
    key_pem = CA("log-ca").issue().key_pem.decode()
    log.info("metadata: %s", [("authorization", f"Bearer {TOKEN}")])
    log.info("header Authorization: bearer abc.def.ghi")
    log.info("the token is %s", TOKEN)
    log.info("loaded key", extra={"pem": key_pem})
    try:
        raise ValueError(f"bad key {key_pem}")
    except ValueError:
        log.exception("failed")
    text = logs.getvalue()
    assert TOKEN not in text
    assert "abc.def.ghi" not in text
    assert "PRIVATE KEY-----\n" not in text
    assert key_pem.splitlines()[1] not in text
    assert "[REDACTED]" in text
    assert len(_lines(logs)) == 5


def test_redacting_filter_for_other_handlers():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter(lambda: [TOKEN]))
    log = logging.getLogger("blazen_peer.test.filter")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("token=%s auth=%s", TOKEN, "Bearer xyz123")
    finally:
        log.removeHandler(handler)
        log.propagate = True
    assert stream.getvalue().strip() == "token=[REDACTED] auth=Bearer [REDACTED]"
    assert redact("nothing secret here") == "nothing secret here"


def test_redaction_rewrites_secrets_not_prose():
    key_pem = CA("prose-ca").issue().key_pem.decode()
    prose = [
        "missing bearer token (send 'authorization: Bearer <token>')",
        "the bearer token is rotated; Bearer authentication failed",
        "no '-----BEGIN PRIVATE KEY-----' block in /etc/blazen/tls/tls.key, see docs/security.md",
    ]
    for text in prose:
        assert redact(text, [TOKEN]) == text
    assert redact("auth: Bearer eyJhbGciOi.eyJzdWIi.c2ln and more") == "auth: Bearer [REDACTED] and more"
    # A truncated key (no END line) is still hidden; the words after a complete block are kept.
    assert key_pem.splitlines()[2] not in redact("partial " + key_pem[:300])
    assert redact(f"key {key_pem} loaded from disk").endswith(" loaded from disk")

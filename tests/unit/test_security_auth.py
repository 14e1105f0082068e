from __future__ import annotations

import logging
import os
import time

import pytest
from blazen_peer.config import parse_serve_args
from blazen_peer.security.auth import TokenSource
from blazen_peer.security.policy import token_source
from blazen_peer.wire.errors import PeerAuthConfigError

from tests.support.pki import KubeletSecretDir

TOKEN = "s3cr3t-token-value"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_token_source_precedence(tmp_path):
    """``--token-file`` (or its env twin) wins over ``--token`` / ``BLAZEN_PEER_TOKEN``; blank is unset."""
    f = tmp_path / "token"
    f.write_text(" from-file \n")
    env = {"BLAZEN_PEER_TOKEN": "from-env", "BLAZEN_PEER_TOKEN_FILE": str(f)}
    config = parse_serve_args([], env)
    assert token_source(config).check_bearer("Bearer from-file")
    assert token_source(parse_serve_args([], {"BLAZEN_PEER_TOKEN": "  from-env\n"})).check_bearer(
        "Bearer from-env"
    )
    assert token_source(parse_serve_args([], {"BLAZEN_PEER_TOKEN": "   "})) is None
    assert token_source(parse_serve_args([], {})) is None


def test_empty_or_missing_token_file_fails_at_start(tmp_path):
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(PeerAuthConfigError):
        TokenSource(token_file=tmp_path / "empty")
    with pytest.raises(PeerAuthConfigError):
        TokenSource(token_file=tmp_path / "missing")
    with pytest.raises(ValueError, match="exactly one"):
        TokenSource()


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        (f"Bearer {TOKEN}", True),
        (f"bearer {TOKEN}", True),
        (f"  Bearer   {TOKEN}  ", True),
        (f"Bearer {TOKEN}".encode(), True),
        (f"Bearer {TOKEN}x", False),
        (f"Bearer {TOKEN[:-1]}", False),
        (f"Basic {TOKEN}", False),
        (TOKEN, False),
        ("Bearer ", False),
        ("", False),
        (None, False),
    ],
)
def test_check_bearer(header, ok):
    assert TokenSource(token=TOKEN).check_bearer(header) is ok


def test_reasons_do_not_contain_the_token():
    src = TokenSource(token=TOKEN)
    assert "missing" in src.why_rejected(None)
    assert src.why_rejected("Bearer nope") == "invalid bearer token"
    assert TOKEN not in repr(src)
    assert src.authorization() == f"Bearer {TOKEN}"
    assert src.metadata() == [("authorization", f"Bearer {TOKEN}")]


def test_rotated_secret_takes_effect_with_a_grace_window(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    clock = Clock()
    d = KubeletSecretDir(tmp_path / "token")
    d.write({"token": b"old-token\n"})
    src = TokenSource(token_file=d.path("token"), recheck_interval=1.0, rotation_grace=30.0, clock=clock)
    assert src.check_bearer("Bearer old-token")
    d.write({"token": b"new-token\n"})
    # Not re-read before the recheck interval: the per-call path does no I/O.
    assert not src.check_bearer("Bearer new-token")
    clock.t += 1.5
    assert src.check_bearer("Bearer new-token")
    assert src.rotation_count == 1
    assert src.check_bearer("Bearer old-token")  # grace window
    clock.t += 31
    assert not src.check_bearer("Bearer old-token")
    assert src.check_bearer("Bearer new-token")
    assert sorted(src.secrets()) == ["new-token", "old-token"]
    # A half-written (empty) file keeps the current token.
    d.write({"token": b""})
    clock.t += 2
    assert src.check_bearer("Bearer new-token")
    assert "old-token" not in caplog.text
    assert "new-token" not in caplog.text


def test_plain_file_rewrite_is_taken_once_it_holds_still(tmp_path):
    f = tmp_path / "tok"
    f.write_text("a-token")
    clock = Clock()
    src = TokenSource(token_file=f, recheck_interval=0, settle=1.0, clock=clock)
    f.write_text("b-token-longer")
    assert not src.check_bearer("Bearer b-token-longer")  # seen once: may still be mid-write
    clock.t += 1.5
    assert src.check_bearer("Bearer b-token-longer")
    assert src.rotation_count == 1


def test_a_token_file_rewritten_in_place_never_yields_a_half_token(tmp_path):
    """``echo new > token`` truncates, then writes: a check in between reads a prefix of the new token."""
    f = tmp_path / "tok"
    f.write_text("old-token-0123456789")
    clock = Clock()
    src = TokenSource(token_file=f, recheck_interval=0, settle=1.0, clock=clock)
    new = "new-token-9876543210"
    with open(f, "r+") as w:
        w.truncate(0)
        w.write(new[:8])
        w.flush()
        for _ in range(3):  # checks while the writer pauses (under the settle time in all)
            clock.t += 0.3
            assert not src.check_bearer("Bearer " + new[:8])
            assert src.check_bearer("Bearer old-token-0123456789")
        w.write(new[8:])
        w.flush()
        os.utime(f, ns=(time.time_ns(), time.time_ns() + 1_000_000))  # a distinct mtime even on coarse clocks
    assert not src.check_bearer("Bearer " + new)  # the complete text, seen once
    clock.t += 1.5
    assert src.check_bearer("Bearer " + new)
    assert not src.check_bearer("Bearer " + new[:8])
    assert src.rotation_count == 1

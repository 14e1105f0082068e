"""The token the operator hands kopf at login, whichever loader filled the client configuration."""

from __future__ import annotations

import pytest
from blazen_operator.apply import bearer_token
from kubernetes import client


@pytest.mark.parametrize(
    ("api_key", "expected"),
    [
        ({"BearerToken": "bearer abc.def"}, "abc.def"),  # in-cluster ServiceAccount loader
        ({"authorization": "Bearer abc.def"}, "abc.def"),  # kubeconfig loader
        ({"authorization": "abc.def"}, "abc.def"),  # no scheme at all
        ({}, None),
    ],
)
def test_bearer_token_is_bare(api_key: dict[str, str], expected: str | None) -> None:
    cfg = client.Configuration()
    cfg.api_key = api_key
    assert bearer_token(cfg) == expected

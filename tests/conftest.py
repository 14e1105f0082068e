"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.blazen_wheel import build_isoc23_shim


@pytest.fixture(scope="session")
def isoc23_shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The LD_PRELOAD library the ``blazen`` wheel needs on glibc < 2.38, compiled once per session."""
    return build_isoc23_shim(tmp_path_factory.mktemp("isoc23"))

"""The jobs tests run Qt signals across threads: a crash must name its place."""
from __future__ import annotations

from tests.conftest import enable_faulthandler


def pytest_configure(config):
    enable_faulthandler()

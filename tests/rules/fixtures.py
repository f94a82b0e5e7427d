"""pytest fixtures shared by tests/test_rules.py and tests/test_dashboards.py (imported there)."""

from __future__ import annotations

import os

import pytest

from . import metric_contract, promtool


@pytest.fixture(scope="session")
def need_promtool():
    if promtool.find() is None:
        if os.environ.get("CI"):
            pytest.fail("promtool not found (apt-get install prometheus)")
        pytest.skip("promtool not found (apt-get install prometheus)")


@pytest.fixture(scope="session")
def contract():
    return metric_contract.load_contract()

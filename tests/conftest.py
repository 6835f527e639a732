from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Lab tests build real namespaces: they run as root, and skip (saying why) otherwise."""
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="lab tests need root: they build network namespaces")
    for item in items:
        if "lab" in item.keywords:
            item.add_marker(skip)

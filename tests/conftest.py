"""Suite layout: tests/unit (in-process, fast: `make test-fast`), tests/e2e (real servers, Redis
processes, downloads), tests/support (shared helpers, no tests). Each test is marked by its folder."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        folder = Path(str(item.path)).resolve().relative_to(HERE).parts[0]
        if folder in ("unit", "e2e"):
            item.add_marker(getattr(pytest.mark, folder))

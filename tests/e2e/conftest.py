"""End-to-end suites: whole commands in subprocesses, real servers, several JAX processes. Every test here is
marked slow, so ``pytest -m "not slow"`` (the quick run) leaves them out."""
import pathlib

import pytest

HERE = pathlib.Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in pathlib.Path(item.fspath).parents:
            item.add_marker(pytest.mark.slow)

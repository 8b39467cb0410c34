"""Test set-up shared by every test.

Eight emulated CPU devices let the sharding tests build (1,8,1), (1,4,2) and (2,2,2) meshes;
the flag only takes effect if it is set before jax is first imported, hence here.
"""
import os
import pathlib
import tempfile

from tests.support.xla import xla_flags  # plain Python: jax is not imported yet

os.environ.setdefault("XLA_FLAGS", xla_flags(8))  # and fast compiles: tests/support/xla.py
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# `tuna-jax train` keeps JAX's persistent compilation cache (train.compile_cache, default on) in the user's
# ~/.cache: tests use one of their own, new each session, so they neither read nor fill the user's.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="tuna-jax-test-xla-"))

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("TUNA_SHARED", REPO_ROOT.parent / "shared"))


def pytest_configure(config):
    # Registered so that `-m "not slow"` gives a quick run; the default run still includes them.
    config.addinivalue_line("markers", "slow: takes over ~30 s (e.g. starts several JAX processes)")


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    """../shared (real data and the stories260K model); skipped where a clone has none."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: this test needs the workplace's shared data (a user's clone has none)")
    return SHARED


@pytest.fixture
def server(monkeypatch, request):
    """A real OpenAI-compatible server on 127.0.0.1 (tests/support/openai_server.py) that accepts only the test
    module's ``KEY``, which is also put in $OPENAI_API_KEY for the client."""
    from tests.support.openai_server import OpenAIServer

    key = request.module.KEY
    monkeypatch.setenv("OPENAI_API_KEY", key)
    with OpenAIServer(api_key=key) as srv:
        yield srv

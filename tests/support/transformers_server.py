"""`transformers serve` on 127.0.0.1: a real OpenAI-compatible serving engine that `pip install
"transformers[serving]"` brings (no compile), on the CPU. It serves any local HF folder a request names as its
``model`` (loaded on first use), or only ``folder`` when one is given."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TransformersServer:
    """``with TransformersServer() as srv:`` starts the server and waits until it answers; ``srv.base_url`` is its
    ``.../v1``; ``srv.log()`` what it printed."""

    def __init__(self, folder: str | None = None, startup_s: float = 180.0):
        if shutil.which("transformers") is None:
            pytest.skip("the serving-engine tests start `transformers serve`: pip install -e '.[test]'")
        try:
            from transformers.utils.import_utils import is_serve_available
        except ImportError:  # pragma: no cover
            is_serve_available = lambda: False  # noqa: E731
        if not is_serve_available():
            pytest.skip("`transformers serve` needs fastapi, uvicorn and openai: pip install -e '.[test]'")
        self.folder, self.startup_s = folder, startup_s
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> "TransformersServer":
        self._log = tempfile.TemporaryFile("w+")
        # one thread: a 260K-parameter model gains nothing from more, and the suite's workers need the cores
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
        forced = [str(self.folder)] if self.folder else []
        self.proc = subprocess.Popen([shutil.which("transformers"), "serve", *forced, "--host", "127.0.0.1",
                                      "--port", str(self.port), "--device", "cpu"],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.__exit__(None, None, None)
        raise RuntimeError(f"transformers serve did not answer in {self.startup_s} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        self._log.seek(0)
        return self._log.read()[-4000:]

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


if __name__ == "__main__":  # pragma: no cover - by hand: python -m tests.support.transformers_server [FOLDER]
    with TransformersServer(sys.argv[1] if len(sys.argv) > 1 else None) as srv:
        print(srv.base_url)
        time.sleep(3600)

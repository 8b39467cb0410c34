"""A text file that grows by lines while a run goes on (the training metrics log), local or in cloud storage.

Locally each line is appended and flushed at once, as before. Object storage has no append, and an object
may be rewritten only about once a second: there the lines are kept in memory and the whole object is
written again at most every ``min_interval_s`` seconds (30 by default) and on :meth:`LineLog.flush` /
:meth:`LineLog.close`. A process killed without warning (``kill -9``, a lost VM) may so lose its last
interval's lines from a log in a bucket; a stop by SIGTERM (a preemption notice) closes the log first.
"""
from __future__ import annotations

import os
import time

from tuna_jax.io import paths


class LineLog:
    def __init__(self, path: str | os.PathLike, min_interval_s: float = 30.0):
        self.path = os.fspath(path)
        self.remote = paths.is_remote(self.path)
        self.min_interval_s = min_interval_s
        self._lines: list[str] | None = None  # remote: the whole content
        self._dirty = False
        self._written_at = 0.0

    def read_lines(self) -> list[str]:
        """The lines in the file now (none when it does not exist)."""
        if self.remote and self._lines is not None:
            return list(self._lines)
        return paths.read_text(self.path).splitlines() if paths.exists(self.path) else []

    def rewrite(self, lines: list[str]) -> None:
        """Replace the content with ``lines`` (written at once, in both kinds of storage)."""
        if self.remote:
            self._lines = list(lines)
            self._dirty = True
            self.flush()
        else:
            paths.write_text(self.path, "".join(ln + "\n" for ln in lines))

    def append(self, line: str) -> None:
        if not self.remote:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
            return
        if self._lines is None:
            self._lines = self.read_lines()
        self._lines.append(line)
        self._dirty = True
        if time.monotonic() - self._written_at >= self.min_interval_s:
            self.flush()

    def flush(self) -> None:
        if self.remote and self._dirty:
            paths.write_text(self.path, "".join(ln + "\n" for ln in self._lines or []))
            self._dirty = False
            self._written_at = time.monotonic()

    def close(self) -> None:
        self.flush()

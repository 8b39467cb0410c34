"""One run per output file, and no stale output that looks current.

Two runs writing the same OUT (say, the same command started twice, or once with another ``--store``)
would pay for every request twice and interleave or overwrite each other's lines. :class:`OutputLock`
holds an exclusive advisory lock (``flock``) on ``OUT.lock`` for the whole run; a second run fails at once
with one line naming OUT and the first run's process id. The lock file is removed on release; the lock
is released by the kernel if the process dies (kill -9 included), so a stale ``OUT.lock`` never blocks.

OUT must be a local path: an output written line by line as the run goes and locked against a second run
cannot live in object storage (no append, no flock); a ``gs://`` OUT is one line saying to write locally
and copy the file to the bucket when the run ends.

Commands that rewrite OUT (through ``OUT.partial``, renamed at the end) pass ``rewrites=True``: a
finished OUT of an earlier run is then moved to ``OUT.previous`` when the lock is taken, so a rerun that
stops early does not leave the old file looking like its own result, and :meth:`OutputLock.commit`
removes ``OUT.previous`` once the new OUT is in place. Commands that append to OUT and resume from it
(``generate``, ``sample-diverse``) leave it where it is.
"""
from __future__ import annotations

import logging
import os

from tuna_jax.io import paths

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX: no locking
    fcntl = None


class OutputBusyError(RuntimeError):
    """Another process is writing the same output file."""


class OutputLock:
    """Context manager: ``with OutputLock(out_path): ...`` (see the module docstring)."""

    def __init__(self, out_path: str | os.PathLike, rewrites: bool = False):
        self.out_path = os.fspath(out_path)
        self.path = self.out_path + ".lock"
        self.previous = self.out_path + ".previous"
        self.rewrites = rewrites
        self._fd: int | None = None

    def acquire(self) -> "OutputLock":
        paths.require_local(self.out_path, "output", "it is written line by line as the run goes and locked "
                            "against a second run", "write it to a local path and copy it to the bucket when the "
                            "run ends (gcloud storage cp)")
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        if fcntl is None:
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                try:
                    holder = os.read(fd, 64).decode("ascii", "replace").strip()
                finally:
                    os.close(fd)
                who = f" (process {holder})" if holder.isdigit() else ""
                raise OutputBusyError(f"{self.out_path} is being written by another run{who}; wait for it to "
                                      f"finish or write to another output file") from None
            # The holder before us may have removed the file between our open and our lock: then we
            # locked a file nobody else can see. Lock the one that is there instead.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        if self.rewrites and os.path.exists(self.out_path):
            os.replace(self.out_path, self.previous)
            logging.getLogger("tuna_jax").info("%s: the earlier run's output moved to %s until this run finishes",
                                               self.out_path, self.previous)
        return self

    def commit(self) -> None:
        """The new OUT is in place: the earlier run's ``OUT.previous`` is no longer needed."""
        if os.path.exists(self.previous):
            os.remove(self.previous)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # while still holding the lock: see acquire()
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

"""A stage folder's manifest, and the hashes that say whether a stage's inputs changed.

``STAGE/manifest.json``::

    {"format": "tuna-jax-stage", "version": 1, "stage": "tuna_p@seed=0", "kind": "train",
     "status": "running" | "finished", "key": sha256 of (kind, config, input hashes),
     "config": {the resolved config, selection included}, "inputs": {key: {"path", "sha256"}},
     "outputs": {name: {"path", "sha256"}}, "metrics": {...}, "error": last error or null,
     "attempts": n, "seconds_before": s of earlier attempts, "attempt_s": s of this one,
     "wall_s": s of the attempt that finished, "total_s": s of every attempt}

While a stage runs, its ``attempt_s`` is rewritten every few seconds, so the seconds of a killed attempt
are still counted when the next one finishes it (``total_s``).

Hashes. A file is hashed by its content (sha256), with a cache keyed by (size, modification time) in
``OUTPUT_DIR/hashes.json`` so an unchanged 13 GB checkpoint is read once; a folder by the hashes of its
files and their relative paths. A folder a stage wrote is named by how it was made instead
(sha256(stage key, output name)): Orbax gives its files random names and timestamps, so two identical
trainings never write identical bytes. (Replacing such a folder by hand is not noticed: rerun its stage
with ``--from``.)
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time

from tuna_jax.io import paths

MANIFEST, FORMAT, VERSION = "manifest.json", "tuna-jax-stage", 1


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def _sha256(f) -> str:
    h = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 22), b""):
        h.update(block)
    return h.hexdigest()


def read_manifest(stage_dir: str) -> dict | None:
    path = paths.join(stage_dir, MANIFEST)
    if not paths.is_file(path):
        return None
    try:
        m = json.loads(paths.read_text(path))
    except ValueError:
        return None  # torn by a crash mid-write (write_atomic makes that rare): the stage starts again
    return m if isinstance(m, dict) and m.get("format") == FORMAT else None


def write_manifest(stage_dir: str, manifest: dict) -> None:
    paths.write_atomic(paths.join(stage_dir, MANIFEST), json.dumps(manifest, indent=1, default=str) + "\n")


class Hasher:
    """Content hashes of files and folders, cached by (size, mtime) in ``cache`` (a JSON file)."""

    def __init__(self, cache: str):
        self.cache = cache
        try:
            self.known = json.loads(paths.read_text(cache)) if paths.is_file(cache) else {}
        except ValueError:
            self.known = {}

    def file(self, path: str) -> str:
        if paths.is_remote(path):  # no stat cache in object storage: read it
            with paths.open(path, "rb") as f:
                return _sha256(f)
        st = os.stat(path)
        stamp = [st.st_size, st.st_mtime_ns]
        hit = self.known.get(os.path.abspath(path))
        if hit and hit[:2] == stamp:
            return hit[2]
        with open(path, "rb") as f:
            h = _sha256(f)
        self.known[os.path.abspath(path)] = stamp + [h]
        return h

    def path(self, path: str) -> str:
        """A file's or folder's hash; a path that is neither (``hf:NAME``) is hashed by its name."""
        if paths.is_file(path):
            return self.file(path)
        if not paths.is_dir(path):
            return digest(["name", path])
        entries = []

        def walk(folder: str, rel: str) -> None:
            for name in paths.listdir(folder):
                full = paths.join(folder, name)
                if paths.is_dir(full):
                    walk(full, f"{rel}{name}/")
                else:
                    entries.append([rel + name, self.file(full)])

        walk(path, "")
        return digest(entries)

    def save(self) -> None:
        paths.write_atomic(self.cache, json.dumps(self.known))


class Attempt:
    """One attempt at a stage: writes its manifest as ``running`` now and every ``every`` seconds (the
    seconds so far), and as ``finished`` at the end."""

    def __init__(self, stage_dir: str, manifest: dict, every: float = 5.0):
        self.dir, self.manifest, self.every = stage_dir, manifest, every
        self.start = time.monotonic()
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def __enter__(self) -> "Attempt":
        self._write(status="running")
        self.thread.start()
        return self

    def _write(self, **fields) -> None:
        with self.lock:
            self.manifest.update(fields, attempt_s=round(time.monotonic() - self.start, 2))
            write_manifest(self.dir, self.manifest)

    def _beat(self) -> None:
        while not self.stopped.wait(self.every):
            self._write()

    def finish(self, outputs: dict, metrics: dict) -> None:
        self.stopped.set()
        self.thread.join()
        seconds = round(time.monotonic() - self.start, 2)
        self._write(status="finished", outputs=outputs, metrics=metrics, error=None, wall_s=seconds,
                    total_s=round(self.manifest.get("seconds_before", 0.0) + seconds, 2))

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join()
        if exc is not None:  # stays "running": the next run resumes it
            self._write(error=f"{type(exc).__name__}: {exc}")

"""A Cloud Storage stand-in that needs no network: ``gs://BUCKET/KEY`` is the file ``ROOT/BUCKET/KEY``.

What it replaces, and nothing else:

* the fsspec filesystem behind ``etils.epath``'s ``gs://`` (gcsfs in real use): :class:`LocalBucketFS`, a
  folder-backed fsspec filesystem registered for the ``gcs``/``gs`` protocols. tuna-jax's own file access
  (``tuna_jax.io.paths``) and Orbax's metadata files go through it;
* inside Orbax, the two calls that would reach Google's servers directly: the TensorStore key-value spec of
  a ``gs://`` folder (the ``gcs`` driver, pointed here at the same folder through the ``file`` driver) and
  the bucket lookup for hierarchical namespaces (answered "no").

Everything else runs as on real Cloud Storage: the paths stay ``gs://`` URIs end to end, epath and Orbax
take their object-storage code paths (Orbax commits a step with ``commit_success.txt`` instead of a
rename), and a ``pathlib``-made path would land in a local folder named ``gs:`` instead of the bucket.
"""
from __future__ import annotations

import contextlib
import os
import sys
import types

import fsspec
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem


class LocalBucketFS(DirFileSystem):
    protocol = ("gs", "gcs")
    root = ""  # set by use_fake_gcs(); read on every call (epath caches the filesystem object)
    cachable = False

    def __init__(self, *args, **kwargs):  # epath passes finalize_on_close=True for gcs
        super().__init__(path=type(self).root, fs=LocalFileSystem(auto_mkdir=True))

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, (list, tuple)):
            return [cls._strip_protocol(p) for p in path]
        path = str(path)
        for prefix in ("gs://", "gcs://"):
            if path.startswith(prefix):
                path = path[len(prefix):]
        return path.rstrip("/")

    def _join(self, path):
        self.path = type(self).root
        if isinstance(path, str):
            path = self._strip_protocol(path)
        elif isinstance(path, (list, tuple)):
            path = [self._strip_protocol(p) for p in path]
        return super()._join(path)


@contextlib.contextmanager
def use_fake_gcs(root: str | os.PathLike, monkeypatch):
    """Route every ``gs://`` access of this process to folder ``root`` for the block."""
    from orbax.checkpoint._src.path import gcs_utils

    root = os.fspath(root)
    os.makedirs(root, exist_ok=True)
    LocalBucketFS.root = root
    saved = {p: fsspec.registry.get(p) for p in ("gs", "gcs")}
    for p in ("gs", "gcs"):
        fsspec.register_implementation(p, LocalBucketFS, clobber=True)

    def kvstore(path: str) -> dict:
        bucket, key = gcs_utils.parse_gcs_path(path, add_trailing_slash=False)
        return {"driver": "file", "path": os.path.join(root, bucket.removeprefix("gs://"), key)}

    monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", kvstore)
    monkeypatch.setattr(gcs_utils, "get_bucket", lambda name: types.SimpleNamespace(hierarchical_namespace_enabled=False))
    try:
        yield root
    finally:
        registry = sys.modules["fsspec.registry"]._registry
        for p, cls in saved.items():
            if cls is None:
                registry.pop(p, None)  # back to fsspec's lazy entry (gcsfs, when installed)
            else:
                registry[p] = cls

"""Paths users name, local or in cloud storage: one home for opening, creating, listing and writing them.

Every file or folder a user gives (data, output and checkpoint folders, exports, reports, configs) may be a
local path or a URI of a scheme ``etils.epath`` knows (``gs://``, ``s3://``, ``az://``, ``hf://``: what Orbax
already uses). A local path is handled with ``os`` exactly as before (relative paths stay relative in
messages); a URI goes through ``etils.epath``, which speaks fsspec (``gcsfs`` for ``gs://``, or TensorFlow's
``gfile`` when TensorFlow is installed). ``pathlib.Path("gs://b/run")`` would silently become the local
folder ``gs:/b/run``: no user path becomes a ``pathlib`` path before it is known to be local.

What object storage cannot do, and what happens instead:

* rename: :func:`replace` on a URI is copy + delete (not atomic); :func:`write_atomic` writes the object
  once (an object appears only when its upload completes, so a reader never sees half of it);
* append and fsync: an object is written whole. Files that grow line by line while a run goes on (request
  stores, resumable JSONL outputs) need a local path; :func:`require_local` says so in one line;
* locks: ``flock`` has no meaning there (see :mod:`tuna_jax.io.lock`);
* libraries that open files by name (safetensors, sentencepiece, tokenizers): :func:`local_copy` downloads
  a file or folder into ``$TUNA_JAX_CACHE/remote`` (``~/.cache/tuna-jax/remote``) and returns its local path;
  :func:`staged_dir` gives a local folder whose files are uploaded when the block ends;
* a run that appends to files in its output folder as it goes (``eval run``): :func:`mirrored_dir` works in
  a local copy of the folder and uploads it when the run ends, stopped or not.
"""
from __future__ import annotations

import builtins
import contextlib
import fnmatch
import hashlib
import importlib.util
import os
import posixpath
import re
import shutil
import tempfile
from typing import IO, Iterator

from tuna_jax.io.errors import InputError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# epath's schemes and the fsspec protocol / package behind each.
_BACKENDS = {"gs": ("gcs", "gcsfs"), "s3": ("s3", "s3fs"), "az": ("az", "adlfs"), "hf": ("hf", "huggingface_hub")}
_checked: set[str] = set()
# What a model folder holds besides its small files (config, tokenizer): weight files and Orbax folders.
# local_copy(..., skip=MODEL_WEIGHTS) fetches a folder in a bucket for its tokenizer or config alone.
MODEL_WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.gguf", "params",
                 "checkpoints")


def scheme(p: str | os.PathLike) -> str | None:
    """``"gs"`` for ``gs://bucket/x``; None for a local path."""
    m = _SCHEME.match(os.fspath(p))
    return m.group(1).lower() if m else None


def is_remote(p: str | os.PathLike) -> bool:
    return scheme(p) is not None


def _epath(p: str | os.PathLike):
    """The epath.Path of a URI; an unknown scheme or a missing backend package is one line."""
    from etils import epath

    s = scheme(p)
    if s not in _BACKENDS:
        raise InputError(os.fspath(p), None, f"{s}:// is not a storage scheme tuna-jax can use (local paths and "
                         f"{', '.join(k + '://' for k in _BACKENDS)})", reason="bad_scheme")
    if s not in _checked:
        protocol, package = _BACKENDS[s]
        try:
            import fsspec

            fsspec.get_filesystem_class(protocol)
        except ImportError:
            if s != "gs" or importlib.util.find_spec("tensorflow") is None:  # epath reads gs:// with TF's gfile too
                raise InputError(os.fspath(p), None, f"{s}:// paths need the {package} package: pip install "
                                 f"{package}" + (" google-cloud-storage (or pip install 'tuna-jax[gcs]')"
                                                 if s == "gs" else ""), reason="missing_backend") from None
        _checked.add(s)
    return epath.Path(os.fspath(p))


def resolve(p: str | os.PathLike):
    """An absolute ``etils.epath.Path`` (what Orbax takes): a URI as it is, a local path made absolute."""
    from etils import epath

    if is_remote(p):
        return _epath(p)
    return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(p))))


def join(p: str | os.PathLike, *parts: str) -> str:
    p = os.fspath(p)
    return posixpath.join(p, *parts) if is_remote(p) else os.path.join(p, *parts)


def parent(p: str | os.PathLike) -> str:
    p = os.fspath(p)
    if is_remote(p):
        head, _ = posixpath.split(p.rstrip("/"))
        return head if scheme(head) else p  # gs://bucket is its own parent
    return os.path.dirname(p)


def basename(p: str | os.PathLike) -> str:
    p = os.fspath(p)
    return posixpath.basename(p.rstrip("/")) if is_remote(p) else os.path.basename(p)


def exists(p: str | os.PathLike) -> bool:
    return _epath(p).exists() if is_remote(p) else os.path.exists(p)


def is_dir(p: str | os.PathLike) -> bool:
    return _epath(p).is_dir() if is_remote(p) else os.path.isdir(p)


def is_file(p: str | os.PathLike) -> bool:
    if is_remote(p):
        e = _epath(p)
        return e.exists() and not e.is_dir()
    return os.path.isfile(p)


def size(p: str | os.PathLike) -> int:
    return int(_epath(p).stat().length) if is_remote(p) else os.path.getsize(p)


def same_place(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` both exist and are the same file or folder (links followed, locally)."""
    if not (exists(a) and exists(b)):
        return False
    if is_remote(a) or is_remote(b):
        return str(resolve(a)).rstrip("/") == str(resolve(b)).rstrip("/")
    return os.path.samefile(a, b)


def makedirs(p: str | os.PathLike) -> None:
    """The folder and its parents (nothing to do in object storage beyond what epath does)."""
    if is_remote(p):
        _epath(p).mkdir(parents=True, exist_ok=True)
    elif os.fspath(p):
        os.makedirs(p, exist_ok=True)


def listdir(p: str | os.PathLike) -> list[str]:
    """The names in folder ``p``, sorted."""
    if is_remote(p):
        return sorted(c.name for c in _epath(p).iterdir())
    return sorted(os.listdir(p))


def glob(p: str | os.PathLike, pattern: str) -> list[str]:
    """Paths in folder ``p`` whose name matches ``pattern`` (one level, fnmatch), sorted."""
    if not is_dir(p):
        return []
    return [join(p, n) for n in listdir(p) if fnmatch.fnmatch(n, pattern)]


def open(p: str | os.PathLike, mode: str = "r", encoding: str | None = None) -> IO:  # noqa: A001
    """``open()`` for both kinds; text is UTF-8. Appending needs a local path (see the module docstring)."""
    if not is_remote(p):
        return builtins.open(p, mode, encoding=None if "b" in mode else (encoding or "utf-8"))
    if "a" in mode or "+" in mode:
        raise InputError(os.fspath(p), None, "cannot be appended to in object storage; give a local path",
                         reason="remote_append")
    return _epath(p).open(mode)


def read_bytes(p: str | os.PathLike) -> bytes:
    with open(p, "rb") as f:
        return f.read()


def read_text(p: str | os.PathLike) -> str:
    return read_bytes(p).decode("utf-8")


def write_bytes(p: str | os.PathLike, data: bytes) -> None:
    with open(p, "wb") as f:
        f.write(data)


def write_text(p: str | os.PathLike, text: str) -> None:
    write_bytes(p, text.encode("utf-8"))


def write_atomic(p: str | os.PathLike, data: bytes | str) -> str:
    """Write ``p`` so that a reader never sees half of it: locally ``p.tmp`` then rename; in object storage
    one upload (the object appears when it is complete). Parent folders are made."""
    p = os.fspath(p)
    data = data.encode("utf-8") if isinstance(data, str) else data
    makedirs(parent(p))
    if is_remote(p):
        write_bytes(p, data)
        return p
    tmp = p + ".tmp"
    with builtins.open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, p)
    return p


def remove(p: str | os.PathLike, missing_ok: bool = True) -> None:
    if is_remote(p):
        _epath(p).unlink(missing_ok=missing_ok)
    else:
        try:
            os.remove(p)
        except FileNotFoundError:
            if not missing_ok:
                raise


def rmtree(p: str | os.PathLike) -> None:
    if is_remote(p):
        _epath(p).rmtree(missing_ok=True)
    else:
        shutil.rmtree(p, ignore_errors=True)


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy one file between any two places (local to local keeps the metadata, like ``shutil.copy2``)."""
    if not is_remote(src) and not is_remote(dst):
        shutil.copy2(src, dst)
        return
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        shutil.copyfileobj(fi, fo, 16 * 2**20)


def replace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """``os.replace`` locally; copy + delete in object storage (not atomic: there is no rename)."""
    if not is_remote(src) and not is_remote(dst):
        os.replace(src, dst)
        return
    remove(dst)
    copy_file(src, dst)
    remove(src)


def require_local(p: str | os.PathLike, option: str, why: str, instead: str) -> None:
    """One line when ``p`` (given as ``option``) is a URI for something that needs a local file."""
    if is_remote(p):
        raise InputError(f"{option} {os.fspath(p)}: {why}, which object storage cannot do; {instead}")


def _cache_root() -> str:
    root = os.environ.get("TUNA_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tuna-jax")
    return os.path.join(root, "remote")


def _download(src: str, dst: str) -> None:
    if os.path.isfile(dst) and os.path.getsize(dst) == size(src):
        return  # fetched before (same size): files named by URI in this cache are not rewritten in place
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = f"{dst}.{os.getpid()}.part"
    copy_file(src, tmp)
    os.replace(tmp, dst)


def _cache_path(p: str, skip: tuple[str, ...] = ()) -> str:
    key = hashlib.sha1(f"{p.rstrip('/')}|{','.join(skip)}".encode("utf-8")).hexdigest()[:16]
    return os.path.join(_cache_root(), key, basename(p) or "root")


def local_copy(p: str | os.PathLike, skip: tuple[str, ...] = ()) -> str:
    """A local path with the content of ``p``: ``p`` itself when local; for a URI, a copy of the file or of
    the folder's files (sub-folders included; names matching a ``skip`` pattern left out) under
    ``$TUNA_JAX_CACHE/remote``, fetched once."""
    p = os.fspath(p)
    if not is_remote(p):
        return p
    local = _cache_path(p, skip)
    if not is_dir(p):
        if not exists(p):
            raise FileNotFoundError(2, "No such file or directory", p)
        _download(p, local)
        return local

    def fetch(src: str, dst: str) -> None:
        for name in listdir(src):
            if any(fnmatch.fnmatch(name, pat) for pat in skip):
                continue
            s = join(src, name)
            if is_dir(s):
                fetch(s, os.path.join(dst, name))
            else:
                _download(s, os.path.join(dst, name))

    os.makedirs(local, exist_ok=True)
    fetch(p, local)
    return local


def upload_dir(local: str, dst: str) -> None:
    """Copy the files of local folder ``local`` (sub-folders included) into ``dst``."""
    makedirs(dst)
    for name in sorted(os.listdir(local)):
        s = os.path.join(local, name)
        if os.path.isdir(s):
            upload_dir(s, join(dst, name))
        else:
            copy_file(s, join(dst, name))


@contextlib.contextmanager
def staged_dir(p: str | os.PathLike) -> Iterator[str]:
    """A local folder to write the contents of folder ``p`` into: ``p`` itself when local (made if
    missing); for a URI a temporary folder whose files are uploaded to ``p`` when the block ends without an
    error (then removed either way)."""
    p = os.fspath(p)
    if not is_remote(p):
        os.makedirs(p, exist_ok=True)
        yield p
        return
    tmp = tempfile.mkdtemp(prefix="tuna-jax-stage-")
    try:
        yield tmp
        upload_dir(tmp, p)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def mirrored_dir(p: str | os.PathLike) -> Iterator[str]:
    """A local folder standing for folder ``p`` through a whole run that reads and appends to its files as it
    goes (``eval run``'s caches): ``p`` itself when local; for a URI, a folder in the cache holding what ``p``
    held (fetched first, so a run resumes from the bucket on a new machine) whose files are all uploaded to
    ``p`` when the block ends, however it ends (a stopped run keeps what it finished)."""
    p = os.fspath(p)
    if not is_remote(p):
        os.makedirs(p, exist_ok=True)
        yield p
        return
    local = local_copy(p) if is_dir(p) else _cache_path(p)
    os.makedirs(local, exist_ok=True)
    try:
        yield local
    finally:
        upload_dir(local, p)

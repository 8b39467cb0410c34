"""Reading and writing the project's text files: JSON Lines inputs and outputs, JSON files written
atomically, and the settings sidecar ``OUT.params.json`` of resumable outputs. Inputs and JSON files may be
local or in cloud storage (``gs://``...; :mod:`tuna_jax.io.paths`); resumed outputs are local.

Reading is strict and every problem is an :class:`~tuna_jax.io.errors.InputError` naming ``FILE:LINE``:
bytes that are not UTF-8 (with the column), a line that is not JSON, ``NaN`` / ``Infinity`` (Python's
``json`` accepts them, no other JSON reader does, and they poison every sum they enter), a line that
is not an object. A UTF-8 byte-order mark at the start of a file is accepted (editors on Windows
write one).

Writing never emits ``NaN``: :func:`dumps` refuses non-finite floats, so a bug that produces one stops
with a message instead of writing a file no other tool can read.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Iterator

from tuna_jax.io import paths
from tuna_jax.io.errors import InputError

_BOM = b"\xef\xbb\xbf"


def _not_utf8(where: str, byte: int, column: int) -> InputError:
    return InputError(where, None, f"not UTF-8 text (byte 0x{byte:02x} at column {column}); save the file as UTF-8 "
                      f"(e.g. iconv -f latin1 -t utf-8)", reason="not_utf8")


def decode_text(data: bytes, path: str) -> str:
    """``data`` decoded as UTF-8 (a leading byte-order mark dropped); bad bytes are an InputError naming
    the file, line and column."""
    if data.startswith(_BOM):
        data = data[len(_BOM):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise _not_utf8(f"{path}:{line}", data[e.start], col) from None


def read_text(path: str | os.PathLike, *, what: str = "file") -> str:
    """The whole file as text (see :func:`decode_text`); a missing file is an InputError saying ``what`` it is."""
    path = os.fspath(path)
    if not paths.is_file(path):
        raise InputError(path, None, f"{what} not found", reason="missing_file")
    return decode_text(paths.read_bytes(path), path)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number (write null, or a finite number)")


def parse_json(text: str, where: str) -> Any:
    """One JSON value; malformed JSON or NaN/Infinity is an InputError at ``where``."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise InputError(where, None, f"not valid JSON ({e.msg} at column {e.colno})",
                         reason="malformed_json") from None
    except ValueError as e:  # from _reject_constant
        raise InputError(where, None, str(e), reason="non_finite") from None


def read_json(path: str | os.PathLike, *, what: str = "file") -> Any:
    """A whole JSON file; missing, not UTF-8, malformed (``FILE:LINE``) or NaN is an InputError."""
    path = os.fspath(path)
    text = read_text(path, what=what)
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}", None, f"not valid JSON ({e.msg} at column {e.colno})",
                         reason="malformed_json") from None
    except ValueError as e:
        raise InputError(path, None, str(e), reason="non_finite") from None


def iter_jsonl(path: str | os.PathLike, *, what: str = "file",
               expected: str = "a JSON object") -> Iterator[tuple[int, str, dict]]:
    """``(line number, "FILE:LINE", object)`` for every non-blank line of a JSON Lines file.

    A missing file (``what`` names it in the message) or a line that is not a JSON object (``expected``
    says what it should be) is an InputError naming file and line."""
    path = os.fspath(path)
    if not paths.is_file(path):
        raise InputError(path, None, f"{what} not found", reason="missing_file")
    data = paths.read_bytes(path)
    if data.startswith(_BOM):
        data = data[len(_BOM):]
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _not_utf8(where, raw[e.start], e.start + 1) from None
        obj = parse_json(text, where)
        if not isinstance(obj, dict):
            raise InputError(where, None, f"expected {expected}, got {type(obj).__name__}", reason="wrong_type")
        yield lineno, where, obj


def read_out_lines(out_path: str, *, fix: bool = True,
                   logger: logging.Logger | None = None) -> Iterator[tuple[str, Any]]:
    """``("OUT:LINE", parsed JSON or None where unparsable)`` per complete non-blank line of a resumed
    output file (nothing when it does not exist).

    Every record is written as one line ending in a newline, so a last line without one is a write torn
    by a crash: it is left out, and cut off the file (with a warning on ``logger``) when ``fix``."""
    if not os.path.exists(out_path):
        return
    with open(out_path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    if lines[-1] and fix:
        (logger or logging.getLogger("tuna_jax")).warning(
            "%s:%d: incomplete last line (an interrupted write) removed; it will be made again",
            out_path, len(lines))
        with open(out_path, "r+b") as f:
            f.truncate(len(data) - len(lines[-1]))
    for k, raw in enumerate(lines[:-1]):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except ValueError:  # UnicodeDecodeError included
            rec = None
        yield f"{out_path}:{k + 1}", rec


def read_records(path: str) -> list[dict]:
    """Every record of a JSON Lines file this project wrote (absent file: none); for summaries."""
    return [obj for _, _, obj in iter_jsonl(path)] if paths.exists(path) else []


def dumps(obj: Any) -> str:
    """One JSONL line (no newline), key order as given so outputs are byte-reproducible. A NaN or
    infinity anywhere is a ValueError: it would make a file other JSON readers reject."""
    return json.dumps(obj, ensure_ascii=False, allow_nan=False)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2, sort_keys: bool = False) -> str:
    """Write ``obj`` as a JSON file so a reader never sees half of it (``paths.write_atomic``: ``PATH.tmp`` +
    rename locally, one upload in object storage)."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False, allow_nan=False) + "\n"
    return paths.write_atomic(path, text)


def check_settings(out_path: str, settings: dict, *, hint: str = "use the same settings to resume, or a new OUT",
                   write: bool = True) -> None:
    """The settings sidecar ``OUT.params.json`` of a resumable output.

    When OUT already holds records (a resumed run), the sidecar's settings must equal ``settings``: a
    difference is an InputError listing each change (``key: old -> new``) and ``hint``, because the file
    would otherwise mix outputs of two set-ups. Otherwise (a fresh OUT) the sidecar is (re)written when
    ``write`` (False on the processes of a multi-host run that do not write).
    """
    path = out_path + ".params.json"
    resuming = paths.exists(out_path) and paths.size(out_path) > 0
    if resuming and paths.exists(path):
        old = parse_json(read_text(path), path)
        if not isinstance(old, dict):
            raise InputError(path, None, f"expected a JSON object of settings; delete it and {out_path} to start over")
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            changes = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise InputError(path, None, f"{out_path} was made with other settings ({changes}); {hint}",
                             reason="settings_changed")
        return
    if write:
        write_json(path, settings, indent=1, sort_keys=True)

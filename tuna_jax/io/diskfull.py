"""A full disk or an exhausted quota, as one line a person can act on.

Orbax and TensorStore report ENOSPC from their writer threads as ``ValueError: RESOURCE_EXHAUSTED:
Error writing ... No space left on device [os_error_code='28']`` (the message of a C++ status, no
errno), after logging a traceback per background thread. :func:`disk_full_as_one_line` turns any
such error into :class:`DiskFull` (an ``OSError`` with the folder, the size being written and what
to do), and :class:`HideWriterThreadTracebacks` keeps Orbax's per-thread tracebacks out of normal
output (``-v`` shows them).
"""
from __future__ import annotations

import contextlib
import errno
import logging
import re
from typing import Iterator

_CODES = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted"}
_TEXT = re.compile(r"No space left on device|Disk quota exceeded|os_error_code='?(28|122)'?")


class DiskFull(OSError):
    """ENOSPC / EDQUOT while writing ``folder``; ``str(e)`` is the whole one-line message."""

    def __init__(self, folder: str, what: str, nbytes: int | None, code: int, hint: str = ""):
        size = f" ({nbytes / 2**20:,.1f} MiB)" if nbytes else ""
        super().__init__(code, f"{_CODES.get(code, 'the disk is full')} writing {what}{size}; free space or use "
                         f"another folder, then rerun{hint}")
        self.filename = folder


def _code(e: BaseException) -> int | None:
    if isinstance(e, OSError) and e.errno in _CODES:
        return e.errno
    m = _TEXT.search(str(e))
    if m is None:
        return None
    return errno.EDQUOT if "quota" in m.group(0).lower() or m.group(1) == "122" else errno.ENOSPC


@contextlib.contextmanager
def disk_full_as_one_line(folder, what, nbytes: int | None = None, hint=lambda e: "") -> Iterator[None]:
    """Re-raise a full-disk or quota error inside the block as :class:`DiskFull`; other errors pass.
    ``what``: what was being written (a string, or a function of the error); ``hint(error)``: text to end
    the message with (e.g. which checkpoint a resume restores)."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as e:  # noqa: BLE001 - Orbax/TensorStore raise ValueError, OSError, RuntimeError for it
        code = _code(e)
        if code is None:
            raise
        raise DiskFull(str(folder), what(e) if callable(what) else what, nbytes, code, hint(e)) from e


class HideWriterThreadTracebacks(logging.Filter):
    """Drops Orbax's ERROR records (with tracebacks) of a failed background write: the same error reaches
    the main thread, which reports it once. Installed on the ``absl`` logger unless ``-v``."""

    _PATTERNS = ("raised an exception", "in background save thread", "Save Finalize thread")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not record.exc_info:
            return True
        msg = record.getMessage()
        return not any(p in msg for p in self._PATTERNS)

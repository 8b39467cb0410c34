"""What every ``tuna-jax`` command does around its own work: quiet logging, errors as one line, and
the end-of-run report of the item-loop commands.

Errors. A user who gives a bad file, a wrong path, a corrupt checkpoint or a store another run holds
gets one line, ``tuna-jax COMMAND: error: FILE:LINE: field 'F': what is wrong``, and exit status 2 (no
traceback; ``-v`` shows it). Every error class users meet is in :data:`USER_ERRORS`; anything else is a
bug and keeps its traceback.

Logging. The project's own loggers (``tuna_jax.*``) speak at INFO; every other library at WARNING, so
jax's "Unable to initialize backend 'tpu'" INFO line and Orbax's per-file INFO lines stay out of normal
output; transformers' advisory "PyTorch was not found" is switched off (it is printed at import time,
so the switch must be set before transformers is imported).
"""
from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import threading
from typing import Any, Callable

from tuna_jax.io.diskfull import DiskFull, HideWriterThreadTracebacks
from tuna_jax.io.errors import InputError, RunStopped, ServiceError
from tuna_jax.io.items import ServerFault, StopRun
from tuna_jax.io.lock import OutputBusyError


def quiet_libraries() -> None:
    """Environment switches that must be set before the libraries are imported."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def setup_logging(verbose: bool = False) -> None:
    """INFO for tuna_jax, WARNING for everything else; DEBUG for all with ``verbose``."""
    quiet_libraries()
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("tuna_jax").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:  # absl (Orbax) installs its own level: lower it explicitly
        absl = logging.getLogger("absl")
        absl.setLevel(logging.WARNING)
        if not any(isinstance(f, HideWriterThreadTracebacks) for f in absl.filters):
            absl.addFilter(HideWriterThreadTracebacks())


def _user_errors() -> tuple[type[BaseException], ...]:
    """The error classes users meet. InputError covers bad files, stores (StoreError) and checkpoints; ServiceError
    an endpoint that failed after its retries;
    ValueError bad options; OSError missing files, full disks, permissions; SafetensorError a damaged
    weights file."""
    errors: list[type[BaseException]] = [InputError, ValueError, OSError, KeyError, OutputBusyError, StopRun,
                                         ServiceError]
    try:  # imported here, not at module level: safetensors is not needed for `--help`
        from safetensors import SafetensorError
        errors.append(SafetensorError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


USER_ERRORS: tuple[type[BaseException], ...] = ()  # filled on first use (see _user_errors)


MAX_ERROR_CHARS = 300  # an error line is read by a person: longer texts (a jit failure prints the whole
# graph definition of the model) are cut, and ``-v`` shows them whole with the traceback


def format_error(e: BaseException, limit: int = MAX_ERROR_CHARS) -> str:
    """One line for the user, at most ``limit`` characters: the message with its place (file:line, the file
    of an OSError)."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{e.filename}: {e.strerror}"
        if e.filename2 is not None:
            text += f" (-> {e.filename2})"
        if e.errno in (errno.ENOSPC, errno.EDQUOT) and not isinstance(e, DiskFull):  # DiskFull says it already
            text += "; free space there or write to another folder, then rerun"
    elif isinstance(e, UnicodeDecodeError):
        text = f"text is not UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start}); save the file as UTF-8"
    elif isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str):
        text = e.args[0]
    elif type(e).__module__.startswith("safetensors"):
        text = f"safetensors: {e}"
    else:
        text = str(e) or type(e).__name__
    text = " ".join(text.split())  # server replies and library errors may span lines
    if len(text) > limit:
        kept = limit - 60  # room for the tail below
        text = f"{text[:kept].rstrip()} ... ({len(text) - kept} more characters; -v shows them)"
    return text


def error_line(prefix: str, e: BaseException) -> str:
    """``prefix`` + the error, at most MAX_ERROR_CHARS in all."""
    return prefix + format_error(e, MAX_ERROR_CHARS - len(prefix))


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's preemption, ``kill``, ``docker stop``), raised in the main thread: every command
    stops the way Ctrl-C stops it (the item loops finish what is in flight and keep their output and stores;
    training installs its own handler and checkpoints), then exits 143."""

    stop_kind = "SIGTERM"  # as the item loops report it (io/items.py)


def _raise_terminated(signum, _frame):
    raise Terminated(signum)


def run_command(prog: str, func: Callable[[Any], int], args: Any, verbose: bool = False) -> int:
    """``func(args)``; a user error is printed as ``PROG: error: ...`` and gives 2; a stopped run
    (:class:`RunStopped`) its one line and its own status; Ctrl-C gives 130, SIGTERM 143 (:class:`Terminated`)."""
    global USER_ERRORS
    if not USER_ERRORS:
        USER_ERRORS = _user_errors()
    main = threading.current_thread() is threading.main_thread()  # only the main thread may set handlers
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main else None
    try:
        return int(func(args) or 0)
    except Terminated:
        print(f"{prog}: stopped by SIGTERM; rerun the same command to continue", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except RunStopped as e:  # training stopped by a signal (128+N) or a diverged loss (3): one line, its status
        print(error_line(f"{prog}: ", e), file=sys.stderr)
        return e.exit_status
    except USER_ERRORS as e:
        if verbose:
            raise
        print(error_line(f"{prog}: error: ", e), file=sys.stderr)
        return 2
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


def report_run(name: str, call: Callable[[], Any], store: Any, failed_note: str) -> int:
    """Run ``call()`` (an item loop returning a :class:`~tuna_jax.io.items.RunSummary`) and report it on
    stderr as ``NAME: ...``: 0 done, 1 some items failed (``failed_note`` follows the count, e.g.
    ``"item(s) failed, listed in"``, then the failed file), 2 stopped on a budget or a fatal endpoint error.
    ``store``: anything with a one-line ``summary()`` (the request store)."""
    try:
        summary = call()
    except StopRun as e:
        return report_stop(name, e, store)
    print(f"{name}: {summary.line()}", file=sys.stderr)
    print(f"{name}: {store.summary()}", file=sys.stderr)
    if summary.failed:
        print(f"{name}: {summary.failed} {failed_note} {summary.failed_path}; rerun to retry them", file=sys.stderr)
        return 1
    return 0


def report_stop(name: str, e: BaseException, store: Any) -> int:
    """The report of a run stopped by a budget, a fatal endpoint error or a server fault (``e``, with the item loop's
    ``.summary`` when it has one); returns exit status 2."""
    print(error_line(f"{name}: stopped: ", e), file=sys.stderr)
    s = getattr(e, "summary", None)
    if s is not None:
        print(f"{name}: {s.line()}", file=sys.stderr)
    again = "rerun with the fix above" if isinstance(e, ServerFault) else "rerun the same command to continue"
    print(f"{name}: {store.summary()}; {again}", file=sys.stderr)
    return 2

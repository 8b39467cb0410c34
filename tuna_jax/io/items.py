"""The item loop of the commands that call a remote model per item (``teacher``, ``judge``, the
Vicuna / AlpacaEval reviews): a thread pool over the items, records written in input order.

Files of a run writing ``OUT``:

* ``OUT.partial``: records as they finish, in input order; renamed to ``OUT`` when every item was
  processed, so a file named ``OUT`` always holds a finished run.
* ``OUT.failed.jsonl``: the items that failed (rewritten each run, absent when none failed).
* ``OUT.previous``: a finished ``OUT`` of an earlier run, moved aside when a new run starts, so that a
  rerun that stops early does not leave the old ``OUT`` looking like its result; removed when the new
  run finishes.
* ``OUT.lock``: held while the run writes (see :mod:`tuna_jax.io.lock`).

Any exception an item raises is a counted failed item (``item_error``, with its type and message in
the failed file), never the end of the run: one strange reply must not cost the other items. Only a
stop that concerns every item ends the loop: :class:`StopRun` subclasses (a budget, a bad key or URL;
:class:`ServerFault`: the same fault of the server failed ``stop_after`` items in a row, so the rest would
fail alike) and KeyboardInterrupt. Then nothing more is submitted, the items in flight finish (their
replies are cached by the caller's store), the ordered prefix is written to ``OUT.partial`` and the
exception is re-raised with ``.summary`` attached. Failed items are counted by their ``cause``.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import os
import sys
from typing import Any, Callable, Sequence

from tuna_jax.io.jsonl import dumps
from tuna_jax.io.lock import OutputLock

logger = logging.getLogger("tuna_jax")


class StopRun(RuntimeError):
    """Raised by an item when going on is pointless for every item (budget reached, bad API key, wrong
    URL): the loop stops cleanly. Subclassed by the feedback store's BudgetExceeded and FatalRunError."""


class ServerFault(StopRun):
    """Several items in a row failed with the same fault of the server (e.g. it ignores ``n``): the message
    names the fault, the count and the fix."""

    stop_kind = "server fault"


@dataclasses.dataclass
class ItemOutcome:
    """What one work item produced: a record for the output file, or a failure for the failed file (its
    ``cause``, a short name such as ``timeout`` or ``server_ignores_n``, is counted in the run's summary).

    counters: named counts summed over the run (e.g. {"length_cut": 1}).
    """

    record: dict | None = None
    failure: dict | None = None
    counters: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class RunSummary:
    items: int = 0
    written: int = 0
    failed: int = 0
    counters: dict[str, int] = dataclasses.field(default_factory=dict)
    causes: dict[str, int] = dataclasses.field(default_factory=dict)  # failed items by their failure's cause
    stopped: str | None = None  # "budget" | "fatal" | "server fault" | "interrupted" | None
    out_path: str = ""
    failed_path: str = ""

    def line(self) -> str:
        c = ", ".join(f"{k}={v}" for k, v in sorted(self.counters.items()) if v)
        s = f"items: {self.items}, written: {self.written}, failed: {self.failed}"
        if self.causes:
            s += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(self.causes.items(), key=lambda kv: -kv[1])) + ")"
        if c:
            s += f" | {c}"
        if self.stopped:
            s += f" | STOPPED ({self.stopped})"
        return s


def _item_error(item: Any, index: int, exc: Exception) -> ItemOutcome:
    """An unexpected exception of one item as its failure record."""
    logger.warning("item %d (%r) failed: %s: %s", index, getattr(item, "id", index), type(exc).__name__, exc,
                   exc_info=logger.isEnabledFor(logging.DEBUG))
    failure = {"id": getattr(item, "id", index), "where": getattr(item, "where", None),
               "error": f"{type(exc).__name__}: {exc}", "cause": "item_error"}
    return ItemOutcome(failure=failure, counters={"item_error": 1})


def _stop_kind(exc: BaseException) -> str:
    for cls in type(exc).__mro__:
        kind = getattr(cls, "stop_kind", None)
        if kind:
            return kind
    return "interrupted"


def run_items(items: Sequence[Any], work: Callable[[Any], ItemOutcome], out_path: str, *,
              concurrency: int = 4, desc: str = "items", progress: bool = True,
              stop_causes: dict[str, str] | None = None, stop_after: int = 3) -> RunSummary:
    """Run ``work`` over ``items`` with a thread pool; write records in input order (module docstring).

    ``stop_causes``: failure causes that are the server's (cause -> the fix, one line): when ``stop_after``
    items in a row (input order) fail with one of them, the run stops with :class:`ServerFault`.

    Returns the RunSummary; raises the StopRun / KeyboardInterrupt that stopped the run, with its
    ``.summary``. A second run on the same ``out_path`` fails with OutputBusyError.
    """
    from tqdm import tqdm

    partial = out_path + ".partial"
    failed_path = out_path + ".failed.jsonl"
    failed_partial = failed_path + ".partial"
    previous = out_path + ".previous"
    summary = RunSummary(items=len(items), out_path=out_path, failed_path=failed_path)
    results: dict[int, ItemOutcome] = {}
    next_write = 0
    stop_exc: BaseException | None = None
    window = max(1, concurrency) * 2  # bounded look-ahead keeps the reorder buffer small
    streak_cause, streak = None, 0  # the cause of the last items written, and how many in a row failed with it

    with OutputLock(out_path, rewrites=True) as lock:
        if os.path.exists(failed_path):
            os.remove(failed_path)  # it is rewritten by this run; an old list would mislead
        with open(partial, "w", encoding="utf-8") as out, open(failed_partial, "w", encoding="utf-8") as bad, \
                tqdm(total=len(items), desc=desc, disable=not progress, dynamic_ncols=True, file=sys.stderr) as bar, \
                cf.ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:

            def flush_ready() -> None:
                nonlocal next_write, streak_cause, streak
                while next_write in results:
                    o = results.pop(next_write)
                    for k, v in o.counters.items():
                        summary.counters[k] = summary.counters.get(k, 0) + v
                    if o.record is not None:
                        out.write(dumps(o.record) + "\n")
                        summary.written += 1
                    cause = o.failure.get("cause") if o.failure is not None else None
                    if o.failure is not None:
                        bad.write(dumps(o.failure) + "\n")
                        summary.failed += 1
                        summary.causes[cause or "error"] = summary.causes.get(cause or "error", 0) + 1
                    streak = streak + 1 if cause is not None and cause == streak_cause else int(cause is not None)
                    streak_cause = cause
                    next_write += 1
                out.flush()
                bad.flush()

            pending: dict[cf.Future, int] = {}
            it = iter(enumerate(items))
            exhausted = False
            try:
                while True:
                    while not exhausted and stop_exc is None and len(pending) < window:
                        try:
                            i, item = next(it)
                        except StopIteration:
                            exhausted = True
                            break
                        pending[pool.submit(work, item)] = i
                    if not pending:
                        break
                    done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                    for fut in done:
                        i = pending.pop(fut)
                        try:
                            results[i] = fut.result()
                        except StopRun as e:
                            if stop_exc is None:
                                stop_exc = e
                            continue
                        except Exception as e:  # noqa: BLE001 - one item's bug or bad reply must not end the run
                            results[i] = _item_error(items[i], i, e)
                        bar.update(1)
                    flush_ready()
                    if stop_exc is None and stop_causes and streak_cause in stop_causes and streak >= stop_after:
                        stop_exc = ServerFault(f"{streak} items in a row failed the same way ({streak_cause}): "
                                               f"{stop_causes[streak_cause]}")
            except KeyboardInterrupt as e:
                stop_exc = e
                for fut in pending:
                    fut.cancel()
                flush_ready()

        if stop_exc is not None:
            summary.stopped = _stop_kind(stop_exc)
            note = f"; the earlier run's output is in {previous}" if os.path.exists(previous) else ""
            logger.warning("%s stopped after %d of %d items (%s); partial output in %s%s. Rerun the same command: "
                           "finished requests come from the store.", desc, next_write, len(items), summary.stopped,
                           partial, note)
            stop_exc.summary = summary  # type: ignore[attr-defined]
            raise stop_exc
        os.replace(partial, out_path)
        if summary.failed:
            os.replace(failed_partial, failed_path)
        else:
            os.remove(failed_partial)
        lock.commit()
    return summary

"""Resumable, append-only JSONL store of remote LLM calls, with cost accounting and a budget.

One idea: *every* remote call is cached by a content hash, so a crashed, killed or budget-stopped run
resumes without paying twice, and a rerun produces byte-identical outputs from the cached replies.

The store file holds one JSON object per line (units in the field names):

    {"key": "<sha256 hex>", "status": "ok", "time": "...", "meta": {...}, "attempts": 1,
     "retries": [...], "usage": {"prompt_tokens": int, "completion_tokens": int},
     "cost_usd": float, "response": {... the server's JSON body ...}}
    {"key": "<sha256 hex>", "status": "error", "time": "...", "meta": {...}, "attempts": 3,
     "retries": [...], "http_status": int | null, "error_kind": "http|timeout|connection|bad_json|budget",
     "error": "readable message"}

The key hashes (endpoint base URL, endpoint path, request body = model + messages/prompt + sampling
parameters, and an optional `extra` dict such as a sample index) -- never the API key, which is not part of
any of these. Later lines win: an "ok" line for a key makes the key finished; an "error" line for a key
without an "ok" line records a failure that a rerun retries (or reports, with ``retry_failed=False``).

Why offsets and not the replies in memory: a probabilistic-ranking run over 52K instructions with token
log-probs is gigabytes of JSON; the index keeps (offset, status, small fields) per key and re-reads a line
on demand.

A torn last line (a process killed mid-write: no trailing newline) is reported, saved to ``<path>.torn``
and cut off, so the next append starts on a clean line. Any other unreadable line is corruption: a
:class:`StoreError` naming file and line.

Budget: limits apply to the *store's* totals (all runs that used this file), because the point of a
budget is "this dataset may cost at most $X", however many times the run is restarted. A request is only
started after :meth:`Store.reserve` succeeds; a run that hits the limit raises :class:`BudgetExceeded`
with everything fetched so far already on disk. The USD limit is checked before each request, so it can be
overshot by at most the cost of the requests already in flight (<= the concurrency); the request limit is
exact (in-flight requests are reserved).

This module also holds the small item loop shared by the teacher and the judge (:func:`run_items`):
ordered JSONL output written through a ``.partial`` file, failures to a ``.failed.jsonl`` file, and the
clean stop on a budget or a fatal endpoint error.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
import threading
from typing import Any, Callable, Mapping, Sequence

try:  # POSIX advisory lock: two processes appending to one store would interleave lines.
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None

logger = logging.getLogger("tuna_jax.feedback")

STORE_FORMAT = 1


class StoreError(RuntimeError):
    """The store file is unreadable (corrupt line, locked by another process)."""


class BudgetExceeded(RuntimeError):
    """A budget limit was reached. Everything fetched before it is saved in the store.

    Attributes: spent_usd (float, the store's total), requests (int, HTTP requests sent, all runs),
    limit (str, which limit).
    """

    def __init__(self, message: str, *, spent_usd: float = 0.0, requests: int = 0, limit: str = ""):
        super().__init__(message)
        self.spent_usd = spent_usd
        self.requests = requests
        self.limit = limit


class FatalRunError(RuntimeError):
    """An error that makes every further request pointless (bad key, wrong URL or model): stop the run."""


@dataclasses.dataclass(frozen=True)
class Prices:
    """Prices in USD per 1,000,000 tokens (prompt = input, completion = output)."""

    input_per_1m: float = 0.0
    output_per_1m: float = 0.0

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """USD for one request."""
        return (prompt_tokens * self.input_per_1m + completion_tokens * self.output_per_1m) / 1e6


@dataclasses.dataclass(frozen=True)
class Budget:
    """Limits on the store's totals over all runs; None means no limit.

    max_usd: USD spent (by the prices); max_requests: HTTP requests sent, retries included.
    """

    max_usd: float | None = None
    max_requests: int | None = None


def canonical_json(obj: Any) -> str:
    """Deterministic JSON text (sorted keys, no spaces) used for hashing."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def content_key(base_url: str, path: str, body: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> str:
    """sha256 hex of (normalised base URL, endpoint path, request body, extra).

    ``body`` is what is POSTed (model, messages or prompt, sampling parameters). ``extra`` separates
    requests whose bodies are equal on purpose (the j-th of N samples, the k-th retry of a judge reply that
    did not parse). No header -- in particular no API key -- is part of the key.
    """
    material = {"base_url": base_url.rstrip("/"), "path": "/" + path.strip("/"), "body": body}
    if extra:
        material["extra"] = extra
    return hashlib.sha256(canonical_json(material).encode("utf-8")).hexdigest()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclasses.dataclass
class _Index:
    offset: int  # byte offset of the line in the file
    lineno: int  # 1-based line number, for error messages
    status: str
    error: str | None = None
    error_kind: str | None = None
    http_status: int | None = None


class Store:
    """Append-only JSONL cache of remote calls. Thread-safe; one process per file (flock).

    Args:
      path: the JSONL file (created with its directory if absent).
      prices: USD per 1M prompt/completion tokens, for cost accounting.
      budget: limits on the store's totals (see module docstring).
      retry_failed: if False, keys whose last record is an error are reported by :meth:`error` and the
        client does not request them again.
      fsync: fsync after every line (survives power loss, not only a killed process; slower).
    """

    def __init__(self, path: str | os.PathLike, *, prices: Prices = Prices(), budget: Budget = Budget(),
                 retry_failed: bool = True, fsync: bool = False):
        self.path = os.fspath(path)
        self.prices = prices
        self.budget = budget
        self.retry_failed = retry_failed
        self.fsync = fsync
        self._lock = threading.RLock()
        self._index: dict[str, _Index] = {}
        # Totals over all runs (for the budget) and this run (for the report).
        self.total_cost_usd = 0.0
        self.total_requests = 0
        self.total_prompt_tokens = 0
        self.total_completion_tokens = 0
        self.run = {"cache_hits": 0, "requests": 0, "ok": 0, "errors": 0, "prompt_tokens": 0,
                    "completion_tokens": 0, "cost_usd": 0.0, "usage_missing": 0}
        self._inflight = 0
        self._lines = 0  # lines in the file, for file:line in messages
        self.torn_bytes = 0
        d = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(d, exist_ok=True)
        # "a+b": create if absent, every write appends; reads use a separate handle.
        self._fh = open(self.path, "a+b")
        if fcntl is not None:
            try:
                fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._fh.close()
                raise StoreError(f"store {self.path} is in use by another process (or another Store object in "
                                 f"this one); wait for it to finish or use a different --store") from None
        try:
            self._load()
        except BaseException:
            self._fh.close()  # releases the lock too
            raise
        self._rfh = open(self.path, "rb")

    # ------------------------------------------------------------------ loading
    def _load(self) -> None:
        with open(self.path, "rb") as f:
            data = f.read()
        good_end = len(data)
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1  # 0 when the only line is torn
            fragment = data[cut:]
            try:
                json.loads(fragment)
                # A complete record that only lacks its newline: keep it.
                self._fh.write(b"\n")
                self._fh.flush()
                data += b"\n"
                good_end = len(data)
            except ValueError:
                with open(self.path + ".torn", "ab") as t:
                    t.write(fragment + b"\n")
                self._fh.truncate(cut)
                self._fh.flush()
                self.torn_bytes = len(fragment)
                good_end = cut
                logger.warning("store %s: ignored a torn last line (%d bytes), left by a process killed while "
                               "writing; saved it to %s.torn. The request it held will be made again.",
                               self.path, len(fragment), self.path)
        offset = 0
        lineno = 0
        for raw in data[:good_end].split(b"\n")[:-1] if good_end else []:
            lineno += 1
            start = offset
            offset += len(raw) + 1
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
                key, status = rec["key"], rec["status"]
            except (ValueError, KeyError, TypeError) as e:
                raise StoreError(f"{self.path}:{lineno}: unreadable store line ({e}). The file was edited or "
                                 f"written by two processes at once; move the line out and rerun.") from None
            self.total_requests += int(rec.get("attempts", 0))
            if status == "ok":
                self._count_usage(rec, this_run=False)
                self._index[key] = _Index(start, lineno, "ok")
            elif status == "error":
                prev = self._index.get(key)
                if prev is None or prev.status != "ok":
                    self._index[key] = _Index(start, lineno, "error", rec.get("error"), rec.get("error_kind"),
                                              rec.get("http_status"))
            else:
                raise StoreError(f"{self.path}:{lineno}: field 'status' is {status!r}, expected 'ok' or 'error'")
        self._lines = lineno

    def _count_usage(self, rec: Mapping[str, Any], this_run: bool) -> None:
        usage = rec.get("usage") or {}
        pt, ct = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        cost = float(rec.get("cost_usd") or 0.0)
        self.total_prompt_tokens += pt
        self.total_completion_tokens += ct
        self.total_cost_usd += cost
        if this_run:
            self.run["prompt_tokens"] += pt
            self.run["completion_tokens"] += ct
            self.run["cost_usd"] += cost

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: str) -> bool:
        idx = self._index.get(key)
        return idx is not None and idx.status == "ok"

    def get(self, key: str) -> dict | None:
        """The "ok" record for ``key`` (a dict with "response", "usage", ...) or None. Counts a cache hit."""
        with self._lock:
            idx = self._index.get(key)
            if idx is None or idx.status != "ok":
                return None
            self._rfh.seek(idx.offset)
            line = self._rfh.readline()
            self.run["cache_hits"] += 1
        return json.loads(line)

    def error(self, key: str) -> dict | None:
        """For a key whose latest record is an error: {"error", "error_kind", "http_status", "line"}."""
        idx = self._index.get(key)
        if idx is None or idx.status != "error":
            return None
        return {"error": idx.error, "error_kind": idx.error_kind, "http_status": idx.http_status,
                "line": idx.lineno}

    def failed_keys(self) -> list[str]:
        return [k for k, v in self._index.items() if v.status == "error"]

    # ------------------------------------------------------------------ writing
    def _append(self, rec: dict) -> None:
        line = (json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        with self._lock:
            self._fh.seek(0, os.SEEK_END)
            offset = self._fh.tell()
            # One write call then flush: a SIGKILL can tear the line only before its newline, which
            # _load() recognises.
            self._fh.write(line)
            self._fh.flush()
            if self.fsync:
                os.fsync(self._fh.fileno())
            self._lines += 1
            lineno = self._lines
            if rec["status"] == "ok":
                self._index[rec["key"]] = _Index(offset, lineno, "ok")
            else:
                prev = self._index.get(rec["key"])
                if prev is None or prev.status != "ok":
                    self._index[rec["key"]] = _Index(offset, lineno, "error", rec.get("error"),
                                                     rec.get("error_kind"), rec.get("http_status"))

    def put_ok(self, key: str, response: Mapping[str, Any], *, meta: Mapping[str, Any], attempts: int,
               retries: Sequence[Mapping[str, Any]] = ()) -> dict:
        """Record a successful reply; returns the stored record. Cost from response["usage"] and the prices."""
        usage = response.get("usage") if isinstance(response, Mapping) else None
        if not isinstance(usage, Mapping):
            usage = {}
        pt, ct = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        rec = {"key": key, "status": "ok", "v": STORE_FORMAT, "time": _now(), "meta": dict(meta),
               "attempts": attempts, "retries": list(retries),
               "usage": {"prompt_tokens": pt, "completion_tokens": ct},
               "cost_usd": self.prices.cost(pt, ct), "response": response}
        with self._lock:
            if not usage:
                self.run["usage_missing"] += 1
            self._append(rec)
            self._count_usage(rec, this_run=True)
            self.run["ok"] += 1
        return rec

    def put_error(self, key: str, *, error: str, error_kind: str, http_status: int | None,
                  meta: Mapping[str, Any], attempts: int, retries: Sequence[Mapping[str, Any]] = ()) -> dict:
        """Record a request that failed for good (after its retries). A rerun retries it."""
        rec = {"key": key, "status": "error", "v": STORE_FORMAT, "time": _now(), "meta": dict(meta),
               "attempts": attempts, "retries": list(retries), "http_status": http_status,
               "error_kind": error_kind, "error": error}
        with self._lock:
            self._append(rec)
            self.run["errors"] += 1
        return rec

    # ------------------------------------------------------------------ budget
    def reserve(self) -> None:
        """Reserve one HTTP request under the budget, or raise BudgetExceeded. Pair with :meth:`release`."""
        with self._lock:
            b = self.budget
            if b.max_requests is not None and self.total_requests + self._inflight >= b.max_requests:
                raise BudgetExceeded(
                    f"budget: {self.total_requests} requests sent (max_requests={b.max_requests}) in store "
                    f"{self.path}; everything fetched so far is saved. Raise --max-requests and rerun to go on.",
                    spent_usd=self.total_cost_usd, requests=self.total_requests, limit="max_requests")
            if b.max_usd is not None and self.total_cost_usd >= b.max_usd:
                raise BudgetExceeded(
                    f"budget: ${self.total_cost_usd:.4f} spent (max_usd={b.max_usd}) in store {self.path}; "
                    f"everything fetched so far is saved. Raise --max-usd and rerun to go on.",
                    spent_usd=self.total_cost_usd, requests=self.total_requests, limit="max_usd")
            self._inflight += 1

    def release(self) -> None:
        """The reserved request was sent (whatever its outcome)."""
        with self._lock:
            self._inflight -= 1
            self.total_requests += 1
            self.run["requests"] += 1

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        with self._lock:
            for fh in (getattr(self, "_rfh", None), getattr(self, "_fh", None)):
                if fh is not None and not fh.closed:
                    fh.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def summary(self) -> str:
        """One line for the user: this run and the store's totals."""
        r = self.run
        return (f"requests: {r['requests']} sent, {r['cache_hits']} from cache, {r['errors']} failed | tokens "
                f"this run: {r['prompt_tokens']} in / {r['completion_tokens']} out, ${r['cost_usd']:.4f} | "
                f"store total: {self.total_requests} requests, ${self.total_cost_usd:.4f} ({self.path})")


# ---------------------------------------------------------------------------- record files
def dump_record(rec: Mapping[str, Any]) -> str:
    """One JSONL line (no newline); key order as given so outputs are byte-reproducible."""
    return json.dumps(rec, ensure_ascii=False)


# ---------------------------------------------------------------------------- the item loop
@dataclasses.dataclass
class ItemOutcome:
    """What one work item produced: a record for the output file, or a failure for the failed file.

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
    stopped: str | None = None  # "budget" | "fatal" | "interrupted" | None
    out_path: str = ""
    failed_path: str = ""

    def line(self) -> str:
        c = ", ".join(f"{k}={v}" for k, v in sorted(self.counters.items()) if v)
        s = f"items: {self.items}, written: {self.written}, failed: {self.failed}"
        if c:
            s += f" | {c}"
        if self.stopped:
            s += f" | STOPPED ({self.stopped})"
        return s


def run_items(items: Sequence[Any], work: Callable[[Any], ItemOutcome], out_path: str, *,
              concurrency: int = 4, desc: str = "items", progress: bool = True) -> RunSummary:
    """Run ``work`` over ``items`` with a thread pool; write records in input order.

    Records go to ``out_path + ".partial"``, renamed to ``out_path`` when every item was processed (so a
    complete file always means a complete run); failures go to ``out_path + ".failed.jsonl"`` (rewritten
    each run, absent when nothing failed). On BudgetExceeded / FatalRunError / KeyboardInterrupt the loop
    submits nothing more, lets in-flight items finish (their replies are in the store), writes the ordered
    prefix and re-raises; a rerun with the same store repeats no finished request.
    """
    from tqdm import tqdm

    partial = out_path + ".partial"
    failed_path = out_path + ".failed.jsonl"
    failed_partial = failed_path + ".partial"
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    summary = RunSummary(items=len(items), out_path=out_path, failed_path=failed_path)
    results: dict[int, ItemOutcome] = {}
    next_write = 0
    stop_exc: BaseException | None = None
    window = max(1, concurrency) * 2  # bounded look-ahead keeps the reorder buffer small

    with open(partial, "w", encoding="utf-8") as out, open(failed_partial, "w", encoding="utf-8") as bad, \
            tqdm(total=len(items), desc=desc, disable=not progress, dynamic_ncols=True) as bar, \
            cf.ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:

        def flush_ready() -> None:
            nonlocal next_write
            while next_write in results:
                o = results.pop(next_write)
                for k, v in o.counters.items():
                    summary.counters[k] = summary.counters.get(k, 0) + v
                if o.record is not None:
                    out.write(dump_record(o.record) + "\n")
                    summary.written += 1
                if o.failure is not None:
                    bad.write(dump_record(o.failure) + "\n")
                    summary.failed += 1
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
                        bar.update(1)
                    except (BudgetExceeded, FatalRunError) as e:
                        if stop_exc is None:
                            stop_exc = e
                flush_ready()
        except KeyboardInterrupt as e:
            stop_exc = e
            for fut in pending:
                fut.cancel()
            flush_ready()

    if stop_exc is not None:
        summary.stopped = ("budget" if isinstance(stop_exc, BudgetExceeded) else
                           "fatal" if isinstance(stop_exc, FatalRunError) else "interrupted")
        logger.warning("%s stopped after %d of %d items (%s); partial output in %s. Rerun the same command: "
                       "finished requests come from the store.", desc, next_write, len(items), summary.stopped,
                       partial)
        stop_exc.summary = summary  # type: ignore[attr-defined]
        raise stop_exc
    os.replace(partial, out_path)
    if summary.failed:
        os.replace(failed_partial, failed_path)
    else:
        os.remove(failed_partial)
        if os.path.exists(failed_path):
            os.remove(failed_path)  # a stale failure list from an earlier run would mislead
    return summary

"""Resumable, append-only JSONL store of remote LLM calls, with cost accounting and a budget.

One idea: *every* remote call is cached by a content hash, so a crashed, killed or budget-stopped run
resumes without paying twice, and a rerun produces byte-identical outputs from the cached replies.

:class:`Store` is a file of JSON lines, each with a ``status``: "ok", "error" (a failure a rerun
retries) or "invalid" (a reply paid for that the caller could not use; never served as good), under a
key that hashes (base URL, endpoint path, request body, an optional ``extra``) -- never the API key.
Later lines win. The index keeps (offset, status, small fields) per key and re-reads a line on demand,
because a 52K-instruction run with token log-probs is gigabytes of JSON. A torn last line is saved to
``<path>.torn`` and cut off; any other unreadable line is a :class:`StoreError` naming file and line.

Budget: limits apply to the store's totals (all runs that used this file): "this dataset may cost at
most $X". A request starts only after :meth:`Store.reserve` succeeds; at the limit :class:`BudgetExceeded`
is raised with everything fetched so far on disk (the USD limit may be overshot by the requests in
flight; the request limit is exact). The budget and the fatal endpoint errors raised here are the
``StopRun`` stops of the item loop that drives the store's callers, ``tuna_jax.io.items.run_items``.

The line formats, which line wins, and the budget's rules: docs/feedback.md#store.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
import threading
from typing import Any, Mapping, Sequence

from tuna_jax.io import paths
from tuna_jax.io.errors import InputError
from tuna_jax.io.items import StopRun

try:  # POSIX advisory lock: two processes appending to one store would interleave lines.
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None

logger = logging.getLogger("tuna_jax.llm_api")

STORE_FORMAT = 1


class StoreError(InputError):
    """The store file is unreadable (corrupt line) or locked by another process; names the file (and line)."""


class BudgetExceeded(StopRun):
    """A budget limit was reached. Everything fetched before it is saved in the store.

    Attributes: spent_usd (float, the store's total), requests (int, HTTP requests sent, all runs),
    limit (str, which limit).
    """

    stop_kind = "budget"

    def __init__(self, message: str, *, spent_usd: float = 0.0, requests: int = 0, limit: str = ""):
        super().__init__(message)
        self.spent_usd = spent_usd
        self.requests = requests
        self.limit = limit


class FatalRunError(StopRun):
    """An error that makes every further request pointless (bad key, wrong URL or model): stop the run."""

    stop_kind = "fatal"


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
      budget: limits on the store's totals (see docs/feedback.md#store).
      retry_failed: if False, keys whose last record is an error are reported by :meth:`error` and the
        client does not request them again.
      fsync: fsync after every line (survives power loss, not only a killed process; slower).
    """

    def __init__(self, path: str | os.PathLike, *, prices: Prices = Prices(), budget: Budget = Budget(),
                 retry_failed: bool = True, fsync: bool = False):
        self.path = os.fspath(path)
        paths.require_local(self.path, "store", "the request store is appended to as replies arrive and locked "
                            "against a second run", "give a local path (copy the file to the bucket afterwards to "
                            "keep or share it)")
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
        self.run = {"cache_hits": 0, "requests": 0, "ok": 0, "errors": 0, "invalid": 0, "prompt_tokens": 0,
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
            if status in ("ok", "invalid"):
                self._count_usage(rec, this_run=False)
                self._index[key] = _Index(start, lineno, status, rec.get("error"))
            elif status == "error":
                prev = self._index.get(key)
                if prev is None or prev.status != "ok":
                    self._index[key] = _Index(start, lineno, "error", rec.get("error"), rec.get("error_kind"),
                                              rec.get("http_status"))
            else:
                raise StoreError(f"{self.path}:{lineno}: field 'status' is {status!r}, expected 'ok', 'error' or "
                                 f"'invalid'")
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

    def statuses(self) -> dict[str, int]:
        """How many distinct requests the store holds by their last status: ok, invalid, error."""
        out = {"ok": 0, "invalid": 0, "error": 0}
        for idx in self._index.values():
            out[idx.status] += 1
        return out

    def get(self, key: str) -> dict | None:
        """The "ok" record for ``key`` (a dict with "response", "usage", ...) or None. Counts a cache hit."""
        return self._latest(key, "ok", count_hit=True)

    def invalid(self, key: str) -> dict | None:
        """For a key whose latest record is an unusable reply: that record ({"error", "response", ...})."""
        return self._latest(key, "invalid")

    def _latest(self, key: str, status: str, count_hit: bool = False) -> dict | None:
        """``key``'s latest record when its status is ``status``, read back from the file; else None."""
        with self._lock:
            idx = self._index.get(key)
            if idx is None or idx.status != status:
                return None
            self._rfh.seek(idx.offset)
            line = self._rfh.readline()
            if count_hit:
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
            if rec["status"] in ("ok", "invalid"):
                self._index[rec["key"]] = _Index(offset, lineno, rec["status"], rec.get("error"))
            else:
                prev = self._index.get(rec["key"])
                if prev is None or prev.status != "ok":
                    self._index[rec["key"]] = _Index(offset, lineno, "error", rec.get("error"),
                                                     rec.get("error_kind"), rec.get("http_status"))

    def _usage(self, response: Any, paid: bool) -> tuple[dict, float, bool]:
        """(usage, cost in USD, usage missing) of a reply; zero when it was paid for on an earlier line."""
        usage = response.get("usage") if isinstance(response, Mapping) and paid else None
        if not isinstance(usage, Mapping):
            usage = {}
        try:
            pt, ct = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        except (TypeError, ValueError):  # a server writing nonsense in "usage" costs nothing we can count
            pt = ct = 0
        return ({"prompt_tokens": pt, "completion_tokens": ct}, self.prices.cost(pt, ct),
                paid and not usage)

    def put_ok(self, key: str, response: Mapping[str, Any], *, meta: Mapping[str, Any], attempts: int,
               retries: Sequence[Mapping[str, Any]] = (), paid: bool = True) -> dict:
        """Record a successful reply; returns the stored record. Cost from response["usage"] and the prices.
        ``paid=False``: a reply already counted on an earlier (invalid) line, now accepted: no cost again."""
        usage, cost, missing = self._usage(response, paid)
        rec = {"key": key, "status": "ok", "v": STORE_FORMAT, "time": _now(), "meta": dict(meta),
               "attempts": attempts, "retries": list(retries), "usage": usage, "cost_usd": cost,
               "response": response}
        with self._lock:
            if missing:
                self.run["usage_missing"] += 1
            self._append(rec)
            self._count_usage(rec, this_run=True)
            self.run["ok"] += 1
        return rec

    def put_invalid(self, key: str, *, error: str, meta: Mapping[str, Any], attempts: int,
                    retries: Sequence[Mapping[str, Any]] = (), response: Mapping[str, Any] | None = None,
                    paid: bool = True) -> dict:
        """Record a reply the caller cannot use (``error`` says why): counted as spent, never served as a
        good reply; a rerun requests the key again. ``paid=False``: the invalidation of a reply already on
        an "ok" line (``response`` None: it is there)."""
        usage, cost, _ = self._usage(response, paid)
        rec = {"key": key, "status": "invalid", "v": STORE_FORMAT, "time": _now(), "meta": dict(meta),
               "attempts": attempts, "retries": list(retries), "error": error, "usage": usage, "cost_usd": cost,
               "response": response}
        with self._lock:
            self._append(rec)
            self._count_usage(rec, this_run=True)
            self.run["invalid"] += 1
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
        bad = f", {r['invalid']} unusable replies" if r["invalid"] else ""
        return (f"requests: {r['requests']} sent, {r['cache_hits']} from cache, {r['errors']} failed{bad} | tokens "
                f"this run: {r['prompt_tokens']} in / {r['completion_tokens']} out, ${r['cost_usd']:.4f} | "
                f"store total: {self.total_requests} requests, ${self.total_cost_usd:.4f} ({self.path})")

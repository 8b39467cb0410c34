"""OpenAI-compatible HTTP client (OpenAI, vLLM, SGLang, llama.cpp server) with retries, cache and budget.

One idea: turn "POST this body to /v1/chat/completions or /v1/completions" into a JSON reply the caller
can use, exactly once per distinct request, robustly (:class:`OpenAIClient`). The store (store.py) is the
cache and the ledger; this module is the wire. They are apart because the store is also read without any
network (reports, resume checks) and because the retry policy is easier to read on its own.

Wire: the standard library's ``http.client``, one connection per attempt; ``timeout_s`` is a TOTAL
deadline per attempt (connect, send, wait, read the whole body), enforced by a watchdog, which is why not
httpx or the openai SDK (their timeouts apply per network operation). Retries are bounded, with
exponential backoff and jitter: 429, 5xx, timeouts and connection errors; bodies that are not JSON; and
replies the caller's ``validate`` rejects (recorded ``invalid``, paid for, never served as good). Other 4xx
are not retried; 401/403/404 raise :class:`FatalAPIError`. The API key is read from the environment
variable ``api_key_env`` names, sent only in the Authorization header, and never part of a cache key,
a store line, a log line or an exception; a base URL with credentials in it is refused.

The wire, each retry rule and the key's handling in full: docs/feedback.md#client.
"""
from __future__ import annotations

import base64
import dataclasses
import email.utils
import http.client
import ipaddress
import json
import logging
import os
import random
import re
import socket
import threading
import time
import urllib.parse
import urllib.request
from typing import Any, Callable, Mapping, Sequence

from tuna_jax.io.errors import ServiceError

from .replies import ReplyError
from .store import BudgetExceeded, FatalRunError, Store, content_key

logger = logging.getLogger("tuna_jax.llm_api")


@dataclasses.dataclass
class ClientConfig:
    """Endpoint and retry settings. Times in seconds.

    base_url: up to and including the API version, e.g. "https://api.openai.com/v1",
      "http://localhost:8000/v1" (vLLM, SGLang), "http://localhost:8080/v1" (llama.cpp).
    model: the model name the server expects.
    api_key_env: name of the environment variable holding the key (the key itself is never configured).
    timeout_s: total time allowed for one attempt (connect, send, wait, read the whole reply).
    max_retries: retries after the first attempt for 429 / 5xx / timeout / connection errors.
    max_retry_after_s: the longest wait a server's Retry-After can impose before a retry.
    max_bad_json_retries: retries for a 2xx reply whose body is not the expected JSON, and the default
      number of retries for a reply the caller's validator rejects.
    concurrency: requests in flight at once (thread pool size of the callers, and a semaphore here).
    """

    base_url: str = "https://api.openai.com/v1"
    model: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 120.0
    max_retries: int = 6
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    backoff_factor: float = 2.0
    jitter: float = 0.25
    max_retry_after_s: float = 60.0
    max_bad_json_retries: int = 2
    concurrency: int = 4


class _Secret:
    """Holds the API key; prints as <redacted> so a repr, a log or a traceback's locals never show it."""

    __slots__ = ("_v",)

    def __init__(self, value: str | None):
        self._v = value or None

    def reveal(self) -> str | None:
        return self._v

    def __bool__(self) -> bool:
        return self._v is not None

    def __repr__(self) -> str:
        return "<redacted>"

    __str__ = __repr__


class APIError(ServiceError):
    """A request that failed for good. Message and attributes never contain the API key.

    Attributes: url (str), status (int | None, HTTP status), kind ("http" | "timeout" | "connection" |
    "bad_json" | "invalid_reply"), attempts (int), cause (a short name for the failure: the kind, ``http_429``
    for an HTTP status, or an unusable reply's ``ReplyError.cause``).
    """

    def __init__(self, message: str, *, url: str, status: int | None, kind: str, attempts: int):
        super().__init__(message)
        self.url = url
        self.status = status
        self.kind = kind
        self.attempts = attempts
        self.cause = f"http_{status}" if kind == "http" and status else kind


class FatalAPIError(APIError, FatalRunError):
    """401/403/404: wrong key, no access, or wrong URL/model -- stop the run instead of failing every item."""


class InvalidReplyError(APIError):
    """The server answered, but ``validate`` rejected the reply (for every attempt allowed).

    Attributes: response (the last reply, a dict, or None), reason (why it was rejected), cached (True:
    an earlier run already found this request's reply unusable and no request was sent now).
    """

    def __init__(self, message: str, *, url: str, attempts: int, response: dict | None, reason: str,
                 cached: bool, cause: str = "unusable_reply"):
        super().__init__(message, url=url, status=200, kind="invalid_reply", attempts=attempts)
        self.response, self.reason, self.cached, self.cause = response, reason, cached, cause


@dataclasses.dataclass
class APIResult:
    """A reply: response (the JSON body, dict), key (cache key), cached (bool: from the store)."""

    response: dict
    key: str
    cached: bool


_SK_RE = re.compile(r"sk-[A-Za-z0-9_\-]{6,}")
_BEARER_RE = re.compile(r"(?i)bearer\s+[^\s\"',]+")


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _retry_after_s(headers: Mapping[str, str] | None) -> float | None:
    """Seconds from Retry-After (seconds or HTTP date) or retry-after-ms (OpenAI); None if absent."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    ra = headers.get("Retry-After") or headers.get("retry-after")
    if not ra:
        return None
    try:
        return max(0.0, float(ra))
    except ValueError:
        try:
            dt = email.utils.parsedate_to_datetime(ra)
            return max(0.0, dt.timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _compact(response: dict) -> dict:
    """Drop the per-token "bytes" arrays of chat log-probs: redundant with "token" and the bulk of the size."""
    for ch in response.get("choices") or []:
        lp = ch.get("logprobs") if isinstance(ch, dict) else None
        if isinstance(lp, dict) and isinstance(lp.get("content"), list):
            for t in lp["content"]:
                if isinstance(t, dict):
                    t.pop("bytes", None)
                    for tt in t.get("top_logprobs") or []:
                        if isinstance(tt, dict):
                            tt.pop("bytes", None)
    return response


def _url_credentials(url: str) -> bool:
    """True when ``url`` carries user:password (or a key) before the host."""
    parts = urllib.parse.urlsplit(url)
    return parts.username is not None or parts.password is not None


def _strip_credentials(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, "<credentials removed>@" + host, parts.path, parts.query, ""))


def _proxy_for(url: str) -> str | None:
    """The HTTP(S)_PROXY that applies to ``url`` (urllib's rules: NO_PROXY, no proxy for loopback)."""
    if _is_loopback(url):
        return None
    parts = urllib.parse.urlsplit(url)
    if urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return urllib.request.getproxies().get(parts.scheme)


@dataclasses.dataclass
class _Request:
    """One distinct request: its cache key, URL and body, the ``meta`` of its store lines, the caller's check."""

    key: str
    url: str
    body: dict
    meta: dict
    validate: Callable[[dict], None] | None

    def rejection(self, response: Any) -> ReplyError | None:
        """Why ``validate`` rejects ``response`` (its ReplyError), or None when the reply is usable."""
        if self.validate is None:
            return None
        try:
            self.validate(response)
        except ReplyError as e:
            return e
        return None


@dataclasses.dataclass
class _Outcome:
    """One attempt, classified by ``OpenAIClient._classify``.

    counter: the retry counter it draws on ("transient", "bad_json", "invalid"); None for a usable reply
      (``error`` None) or for a failure no retry mends (``error`` set).
    error: what to raise once ``counter`` is past its limit, or at once when ``counter`` is None.
    response: the 2xx JSON reply (usable, or rejected by ``validate``).
    retry: this attempt's entry in the store line's "retries" (the ledger adds "attempt").
    reason: the retry's log text; retry_after: the server's Retry-After in seconds.
    """

    counter: str | None = None
    error: APIError | None = None
    response: dict | None = None
    retry: dict | None = None
    reason: str = ""
    retry_after: float | None = None


class _Ledger:
    """The store lines of one request's attempts: each line counts the attempts since the line before (the
    store's request total is their sum) and lists their retries. Without a store it only counts attempts."""

    def __init__(self, store: Store | None, req: _Request):
        self.store, self.req = store, req
        self.attempts = 0
        self.recorded = 0  # attempts already on a store line (an "invalid" one)
        self.retries: list[dict] = []

    def reserve(self) -> None:
        """Take one request from the budget or raise BudgetExceeded, after an error line for the attempts
        made so far (they are on record, and a rerun retries this key)."""
        if self.store is not None:
            try:
                self.store.reserve()
            except BudgetExceeded:
                if self.attempts:
                    self._put_error("stopped by the budget while retrying", "budget", None)
                raise
        self.attempts += 1

    def release(self) -> None:
        """The reserved request was sent, whatever its outcome."""
        if self.store is not None:
            self.store.release()

    def retried(self, entry: dict) -> None:
        self.retries.append({"attempt": self.attempts, **entry})

    def ok(self, response: dict) -> None:
        if self.store is not None:
            self.store.put_ok(self.req.key, response, meta=self.req.meta, attempts=self.attempts - self.recorded,
                              retries=self.retries)

    def invalid(self, response: dict, why: str) -> None:
        """An unusable reply: paid for, so on the ledger, but never served as a good reply."""
        if self.store is not None:
            self.store.put_invalid(self.req.key, error=why, meta=self.req.meta,
                                   attempts=self.attempts - self.recorded, retries=self.retries, response=response)
            self.recorded, self.retries = self.attempts, []

    def fail(self, exc: APIError) -> APIError:
        """``exc``, after an error line for it (a rerun retries the key)."""
        self._put_error(str(exc), exc.kind, exc.status)
        return exc

    def _put_error(self, error: str, kind: str, http_status: int | None) -> None:
        if self.store is not None:
            self.store.put_error(self.req.key, error=error, error_kind=kind, http_status=http_status,
                                 meta=self.req.meta, attempts=self.attempts - self.recorded, retries=self.retries)


class OpenAIClient:
    """Client for one endpoint + model. Thread-safe; share one instance between worker threads.

    Args:
      config: ClientConfig.
      store: the cache/ledger; None disables caching and the budget (useful for one-off calls).
      sleep: the sleep function (tests may pass a recorder; the real one is used by default).
      seed: seeds the jitter RNG so retry timing is reproducible in tests.
    """

    def __init__(self, config: ClientConfig, store: Store | None = None, *,
                 sleep: Callable[[float], None] = time.sleep, seed: int | None = None):
        self.config = config
        self.store = store
        self._sleep = sleep
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self._sem = threading.BoundedSemaphore(max(1, config.concurrency))
        self._key = _Secret(os.environ.get(config.api_key_env) if config.api_key_env else None)  # "": no key
        self.base_url = config.base_url.rstrip("/")
        if _url_credentials(self.base_url):
            raise ValueError(f"base_url {_strip_credentials(self.base_url)!r} has credentials in it; they would "
                             f"be written to logs and the request store. Remove them and put the key in "
                             f"${config.api_key_env}")
        if urllib.parse.urlsplit(self.base_url).scheme not in ("http", "https"):
            raise ValueError(f"base_url {config.base_url!r} must start with http:// or https:// "
                             f"(e.g. http://localhost:8000/v1)")
        if config.api_key_env and not self._key and not _is_loopback(self.base_url):
            logger.warning("no API key in $%s; sending requests to %s without an Authorization header",
                           config.api_key_env, self.base_url)
        self._proxy = _proxy_for(self.base_url)

    def __repr__(self) -> str:
        return f"OpenAIClient(base_url={self.base_url!r}, model={self.config.model!r}, key=<redacted>)"

    # ------------------------------------------------------------------ public calls
    def chat(self, messages: Sequence[Mapping[str, str]], *, extra_key: Mapping[str, Any] | None = None,
             validate: Callable[[dict], None] | None = None, known_invalid: str = "retry",
             invalid_retries: int | None = None, **params: Any) -> APIResult:
        """POST /chat/completions with {"model", "messages", **params} (e.g. temperature, n, max_tokens,
        logprobs=True, top_logprobs=k, seed). See :meth:`post` for the other arguments."""
        body = {"model": self.config.model, "messages": [dict(m) for m in messages], **params}
        return self.post("chat/completions", body, extra_key=extra_key, validate=validate,
                         known_invalid=known_invalid, invalid_retries=invalid_retries)

    def complete(self, prompt: str, *, extra_key: Mapping[str, Any] | None = None,
                 validate: Callable[[dict], None] | None = None, known_invalid: str = "retry",
                 invalid_retries: int | None = None, **params: Any) -> APIResult:
        """POST /completions (legacy) with {"model", "prompt", **params} (e.g. logprobs=1, echo=True)."""
        body = {"model": self.config.model, "prompt": prompt, **params}
        return self.post("completions", body, extra_key=extra_key, validate=validate,
                         known_invalid=known_invalid, invalid_retries=invalid_retries)

    def post(self, path: str, body: Mapping[str, Any], *, extra_key: Mapping[str, Any] | None = None,
             validate: Callable[[dict], None] | None = None, known_invalid: str = "retry",
             invalid_retries: int | None = None) -> APIResult:
        """Return a usable reply for ``body`` from the store, or fetch it (with retries) and store it.

        validate: raises ``replies.ReplyError`` for a reply the caller cannot use; such a reply is stored
          as ``invalid`` (paid for, never served as good), and the request is sent again up to
          ``invalid_retries`` times (default ``max_bad_json_retries``). A cached good reply that fails
          ``validate`` (a store written before a check existed) is invalidated and requested again; a
          cached invalid reply that passes it now (a parser that learnt a new form) is used, unpaid.
        known_invalid: what to do when the store says an earlier run found this request's reply unusable:
          "retry" sends it again; "raise" raises InvalidReplyError(cached=True) without a request (the
          judge loop then moves on to its next attempt, which is a different request).

        Raises APIError (FatalAPIError for 401/403/404, InvalidReplyError for a rejected reply) after
        recording the failure in the store, and BudgetExceeded before sending a request the budget does not
        allow.
        """
        body = dict(body)
        meta = {"base_url": self.base_url, "path": path, "model": body.get("model")}
        if extra_key:
            meta["extra"] = dict(extra_key)
        req = _Request(content_key(self.base_url, path, body, extra_key), f"{self.base_url}/{path.strip('/')}",
                       body, meta, validate)
        if self.store is not None:
            stored = self._from_store(req, known_invalid)
            if stored is not None:
                return stored
        return self._fetch(req, self.config.max_bad_json_retries if invalid_retries is None else invalid_retries)

    def _from_store(self, req: _Request, known_invalid: str) -> APIResult | None:
        """The cache policy: the stored reply when it is usable now, else None (send the request).

        A good reply that ``validate`` now rejects is marked invalid (unpaid) and sent again; an invalid one it
        now accepts becomes good (unpaid) and is served. A reply still unusable raises InvalidReplyError
        (cached=True) with ``known_invalid="raise"`` or retry_failed off; a stored error raises APIError with
        retry_failed off.
        """
        store, key, url = self.store, req.key, req.url
        hit = store.get(key)
        if hit is not None:
            why = req.rejection(hit["response"])
            if why is None:
                return APIResult(hit["response"], key, True)
            store.put_invalid(key, error=str(why), meta=req.meta, attempts=0, response=None, paid=False)
            logger.info("POST %s: the stored reply is unusable (%s); requesting it again", url, why)
            return None
        bad = store.invalid(key)
        if bad is not None:
            why = req.rejection(bad["response"]) if bad.get("response") is not None else ReplyError(bad.get("error"))
            if why is None:  # the check accepts it now: it was paid for already
                store.put_ok(key, bad["response"], meta=req.meta, attempts=0, paid=False)
                return APIResult(bad["response"], key, True)
            if known_invalid == "raise" or not store.retry_failed:
                raise InvalidReplyError(f"{url}: the reply stored by an earlier run is unusable: {why}", url=url,
                                        attempts=0, response=bad.get("response"), reason=str(why), cached=True,
                                        cause=why.cause)
            return None
        err = None if store.retry_failed else store.error(key)
        if err is not None:
            raise APIError(f"{url}: failed in an earlier run (store line {err['line']}): {err['error']} "
                           f"(not retried: retry_failed is off)", url=url, status=err["http_status"],
                           kind=err["error_kind"] or "http", attempts=0)
        return None

    def _fetch(self, req: _Request, max_invalid: int) -> APIResult:
        """Send ``req`` until its reply is usable, retrying while the outcome's counter is within its limit
        (the retry policy in docs/feedback.md#client); the backoff grows with all retries together."""
        cfg = self.config
        limits = {"transient": cfg.max_retries, "bad_json": cfg.max_bad_json_retries, "invalid": max_invalid}
        used = dict.fromkeys(limits, 0)
        payload = json.dumps(req.body, ensure_ascii=False).encode("utf-8")
        ledger = _Ledger(self.store, req)
        while True:
            ledger.reserve()
            try:
                reply = self._send(req.url, payload)
            finally:
                ledger.release()
            out = self._classify(req, ledger.attempts, *reply)
            if out.counter is None:  # usable, or a failure no retry mends
                if out.error is not None:
                    raise ledger.fail(out.error)
                ledger.ok(out.response)
                return APIResult(out.response, req.key, False)
            if out.counter == "invalid":
                ledger.invalid(out.response, out.error.reason)
            used[out.counter] += 1
            if used[out.counter] > limits[out.counter]:
                # an unusable reply is on its "invalid" line already; any other failure gets an "error" line
                raise out.error if out.counter == "invalid" else ledger.fail(out.error)
            ledger.retried(out.retry)
            delay = self._backoff(sum(used.values()) - 1, out.retry_after)
            reason = out.reason
            if out.retry_after is not None and out.retry_after > cfg.max_retry_after_s:
                reason += f"; Retry-After {out.retry_after:g}s capped at {cfg.max_retry_after_s:g}s"
            logger.warning("POST %s: %s; retry %d in %.2fs", req.url, reason, ledger.attempts, delay)
            self._sleep(delay)

    def _classify(self, req: _Request, attempts: int, status: int, headers: Mapping[str, str] | None, raw: bytes,
                  exc_kind: str | None, exc_text: str | None) -> _Outcome:
        """What one attempt's reply (``_send``'s tuple) is: usable; "invalid" (``validate`` rejects it);
        "bad_json" (2xx, not the expected JSON); "transient" (no reply, 429, 5xx); or final (any other status).
        Builds the error to raise when its counter runs out; ``attempts`` (so far) goes into its message."""
        url, cfg = req.url, self.config
        if exc_kind is not None:  # no (complete) HTTP reply: timeout or connection error
            what = (f"timed out after {cfg.timeout_s:g}s" if exc_kind == "timeout"
                    else f"connection failed ({exc_text})")
            hint = ("Is the server up and reachable? Check --base-url." if exc_kind == "connection" else
                    "The server is slow or overloaded: raise --timeout or lower --concurrency.")
            error = APIError(f"POST {url} {what}; gave up after {attempts} attempts. {hint}", url=url, status=None,
                             kind=exc_kind, attempts=attempts)
            return _Outcome("transient", error, retry={"kind": exc_kind}, reason=what)
        if 200 <= status < 300:
            try:
                response = json.loads(raw.decode("utf-8"))
                if not isinstance(response, dict) or not isinstance(response.get("choices"), list):
                    raise ValueError("no 'choices' list in the reply")
            except (ValueError, UnicodeDecodeError) as e:
                snippet = self._redact(raw[:200].decode("utf-8", "replace"))
                text = f"HTTP {status} with a malformed body ({e}): {snippet!r}"
                error = APIError(f"POST {url}: {text}; gave up after {attempts} attempts. Is --base-url an "
                                 f"OpenAI-compatible API (it usually ends in /v1)?", url=url, status=status,
                                 kind="bad_json", attempts=attempts)
                return _Outcome("bad_json", error, retry={"kind": "bad_json", "http_status": status}, reason=text)
            response = _compact(response)
            why = req.rejection(response)
            if why is None:
                return _Outcome(response=response)
            error = InvalidReplyError(f"POST {url}: the reply cannot be used: {why}", url=url, attempts=attempts,
                                      response=response, reason=str(why), cached=False, cause=why.cause)
            return _Outcome("invalid", error, response, retry={"kind": "invalid_reply"},
                            reason=f"unusable reply ({why})")
        detail = self._error_detail(raw)
        if status == 429 or status >= 500:
            hint = ("rate limited: lower --concurrency, or raise your rate limit" if status == 429
                    else "the server keeps failing: check its logs")
            error = APIError(f"POST {url} -> HTTP {status}: {detail}; gave up after {attempts} attempts ({hint}).",
                             url=url, status=status, kind="http", attempts=attempts)
            return _Outcome("transient", error, retry={"kind": "http", "http_status": status},
                            reason=f"HTTP {status}", retry_after=_retry_after_s(headers))
        return _Outcome(error=self._client_error(url, status, detail, attempts))

    def invalidate(self, path: str, body: Mapping[str, Any], *, extra_key: Mapping[str, Any] | None = None,
                   reason: str) -> None:
        """Mark the stored good reply of this request unusable (the item that used it failed because of
        it), so a rerun sends the request again. Nothing happens without a store or a stored reply."""
        if self.store is None:
            return
        key = content_key(self.base_url, path, dict(body), extra_key)
        if key in self.store:
            meta = {"base_url": self.base_url, "path": path, "model": body.get("model")}
            self.store.put_invalid(key, error=reason, meta=meta, attempts=0, paid=False)

    # ------------------------------------------------------------------ internals
    def _connection(self, url: str, timeout: float) -> tuple[http.client.HTTPConnection, str, dict]:
        """(connection, request target, extra headers) for ``url``, through the environment's proxy if any."""
        parts = urllib.parse.urlsplit(url)
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        if self._proxy is None:
            return cls(parts.hostname, parts.port, timeout=timeout), target, {}
        proxy = urllib.parse.urlsplit(self._proxy if "://" in self._proxy else "http://" + self._proxy)
        auth = {}
        if proxy.username is not None:
            token = base64.b64encode(f"{urllib.parse.unquote(proxy.username)}:"
                                     f"{urllib.parse.unquote(proxy.password or '')}".encode()).decode()
            auth = {"Proxy-Authorization": "Basic " + token}
        if parts.scheme == "https":  # CONNECT tunnel, then TLS to the real host
            conn = http.client.HTTPSConnection(proxy.hostname, proxy.port or 8080, timeout=timeout)
            conn.set_tunnel(parts.hostname, parts.port, headers=auth)
            return conn, target, {}
        conn = http.client.HTTPConnection(proxy.hostname, proxy.port or 8080, timeout=timeout)
        return conn, url, auth  # a plain-HTTP proxy takes the absolute URL

    def _send(self, url: str, payload: bytes):
        """One HTTP attempt within ``timeout_s`` in all -> (status, headers, body bytes, exc_kind, exc_text).
        Never raises for I/O."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            headers["Authorization"] = "Bearer " + self._key.reveal()
        timeout = self.config.timeout_s
        with self._sem:
            start = time.monotonic()
            conn, target, extra = self._connection(url, timeout)
            expired = threading.Event()

            def abort() -> None:  # the deadline: unblock whatever read or write is waiting
                expired.set()
                sock = conn.sock
                if sock is not None:
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

            watchdog = threading.Timer(timeout, abort)
            watchdog.daemon = True
            watchdog.start()
            try:
                conn.request("POST", target, body=payload, headers={**headers, **extra})
                resp = conn.getresponse()
                body = resp.read()
                if expired.is_set():  # the read may have ended early because the socket was shut down
                    return 0, None, b"", "timeout", "timeout"
                return resp.status, resp.headers, body, None, None
            except (socket.timeout, TimeoutError):
                return 0, None, b"", "timeout", "timeout"
            except (OSError, http.client.HTTPException) as e:
                if expired.is_set() or time.monotonic() - start >= timeout:
                    return 0, None, b"", "timeout", "timeout"
                return 0, None, b"", "connection", self._redact(f"{type(e).__name__}: {e}")
            finally:
                watchdog.cancel()
                del headers  # keep the key out of this frame's locals as far as we can
                conn.close()

    def _backoff(self, retry_index: int, retry_after: float | None) -> float:
        cfg = self.config
        base = min(cfg.backoff_max_s, cfg.backoff_initial_s * cfg.backoff_factor ** max(0, retry_index))
        with self._rng_lock:
            base *= 1.0 - cfg.jitter * self._rng.random()
        if retry_after is not None:
            base = max(base, min(retry_after, cfg.max_retry_after_s))
        return base

    def _redact(self, text: str) -> str:
        key = self._key.reveal()
        if key and len(key) >= 4:
            text = text.replace(key, "<redacted>")
        text = _BEARER_RE.sub("Bearer <redacted>", text)
        return _SK_RE.sub("sk-<redacted>", text)

    def _error_detail(self, raw: bytes) -> str:
        text = raw.decode("utf-8", "replace")
        try:
            obj = json.loads(text)
            err = obj.get("error", obj) if isinstance(obj, dict) else obj
            if isinstance(err, dict):
                text = str(err.get("message") or err)
            elif isinstance(err, str):
                text = err
        except ValueError:
            pass
        text = " ".join(text.split())
        if len(text) > 300:
            text = text[:300] + "..."
        return self._redact(text) or "(empty body)"

    def _client_error(self, url: str, status: int, detail: str, attempts: int) -> APIError:
        env = self.config.api_key_env
        is_set = "is set" if self._key else "is NOT set"
        if status in (401, 403):
            msg = (f"POST {url} -> HTTP {status}: {detail}. Check the API key in ${env} (it {is_set}): is it "
                   f"valid for this endpoint and allowed to use model {self.config.model!r}?")
            return FatalAPIError(msg, url=url, status=status, kind="http", attempts=attempts)
        if status == 404:
            msg = (f"POST {url} -> HTTP 404: {detail}. Check --base-url (it usually ends in /v1; this server may "
                   f"not offer this endpoint -- try the other --api) and --model {self.config.model!r}.")
            return FatalAPIError(msg, url=url, status=status, kind="http", attempts=attempts)
        msg = (f"POST {url} -> HTTP {status}: {detail}. The server rejected this request: check that it supports "
               f"the parameters sent (logprobs, top_logprobs, n, echo, seed, max_tokens) and the prompt length.")
        return APIError(msg, url=url, status=status, kind="http", attempts=attempts)

"""A real OpenAI-compatible HTTP server for tests: ``http.server.ThreadingHTTPServer`` on 127.0.0.1.

Implements ``POST /v1/chat/completions`` (``logprobs``/``top_logprobs``, ``n``) and the legacy
``POST /v1/completions`` (``logprobs``, ``echo``, ``n``). Replies are deterministic functions of the
request (prompt/messages, n, seed, max_tokens), so two runs against fresh servers are byte-identical.

Chat requests that carry the Tuna ranking prompt ("###Response k:" blocks + "rank the responses") get a
judge reply: a (deterministic) best-response text as "###Response N", per-response scores and
``rank: [...]`` ordering the shown responses by a hash of their text (so the preference does not depend on
the presentation order), the judge's own response first; duplicate responses are ranked once.

Faults are scripted per test (``server.add_fault(...)``), each for the next ``times`` requests whose text
contains ``match`` (None: any request):
  status       HTTP ``status`` (e.g. 429 with ``retry_after``, 500), OpenAI-style JSON error body
  timeout      sleep ``delay_s`` before answering (past the client's timeout; or shorter, as latency)
  bad_json     HTTP 200 with a body that is not JSON
  reply        chat: ``content`` as the assistant message (a judge reply with no ``rank:``, bad ids, ...)
  sentinel     the normal reply with token log-prob ``at`` replaced by -9999.0 (vLLM's missing value)
  no_logprobs  the normal reply with ``logprobs: null``
  length       the normal reply with finish_reason "length"
  gate         block until ``release()``; ``reached`` is set when the request arrives (to kill a client
               at a known point)
  trickle      the normal reply, its body sent one byte every ``delay_s`` (headers at once)
  body         HTTP ``status`` (default 200) with ``content`` as the raw body (e.g. '{"choices": ["a", "b"]}')
  drop_choices the normal reply without its last ``at`` choices (fewer than ``n``)
  close        close the connection without answering

Counting: ``server.count(match)`` is the number of requests whose text contains ``match``;
``server.requests`` logs (path, text, body, auth_ok, fault) -- never the Authorization header itself.

Usage::

    with OpenAIServer(api_key="sk-test") as srv:
        srv.add_fault("status", status=429, retry_after="1")
        client = OpenAIClient(ClientConfig(base_url=srv.base_url, model="m"), store)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import signal
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WORDS = ("the quick brown fox jumps over lazy dog river stone light answer model data small large green "
         "blue seven paris water energy learn write read story code plan clear simple good better best").split()


def _h(*parts) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode("utf-8")).digest()[:8], "big")


def gen_tokens(seed_text: str, max_tokens: int) -> tuple[list[str], list[float], str]:
    """(tokens, logprobs, finish_reason): 3..14 words from a hash of seed_text; cut at max_tokens."""
    n = 3 + _h("len", seed_text) % 12
    toks = [(" " if i else "") + WORDS[_h("w", seed_text, i) % len(WORDS)] for i in range(n)]
    lps = [-round(0.05 + (_h("lp", seed_text, i) % 4000) / 1000.0, 4) for i in range(n)]
    finish = "stop"
    if n > max_tokens:
        toks, lps, finish = toks[:max_tokens], lps[:max_tokens], "length"
    return toks, lps, finish


def tokenize(text: str) -> list[str]:
    """Whitespace-attached tokens whose concatenation is ``text``."""
    return re.findall(r"\s*\S+|\s+$", text)


_RESP_BLOCK = re.compile(r"###Response (\d+):\n(.*?)\n(?=\n###Response \d+:\n|\n\nWe would like)", re.S)


@dataclasses.dataclass
class Fault:
    kind: str
    match: str | None = None
    times: int = 1
    status: int = 500
    retry_after: str | None = None
    delay_s: float = 1.0
    content: str | bytes = ""
    at: int = 0
    reached: threading.Event = dataclasses.field(default_factory=threading.Event)
    released: threading.Event = dataclasses.field(default_factory=threading.Event)

    def release(self) -> None:
        self.released.set()


class OpenAIServer:
    """Context manager; ``base_url`` is "http://127.0.0.1:PORT/v1". ``api_key``: if set, requests without
    "Authorization: Bearer <api_key>" get 401 (whose body echoes the key, as some servers do -- the client
    must scrub it)."""

    def __init__(self, api_key: str | None = None):
        self.api_key = api_key
        self.faults: list[Fault] = []
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        self.inflight = 0
        self.max_inflight = 0  # most requests handled at once (checks the client's concurrency limit)
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -------------------------------------------------------------- lifecycle
    def __enter__(self) -> "OpenAIServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # keep test output quiet
                pass

            def do_POST(self):
                server._handle(self)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        for f in self.faults:
            f.release()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    # -------------------------------------------------------------- scripting and counting
    def kill_at_request(self, match: str, cmd: list[str], env: dict, cwd: str, sig: int = signal.SIGKILL) -> int:
        """Run the command ``cmd`` and send it ``sig`` (SIGKILL by default) while its request whose text
        contains ``match`` is held at the server (a ``gate``), so everything before that request is finished
        and nothing after it has started. Returns the command's exit status (``-SIGKILL`` when it was killed
        there); its stderr is kept in ``self.last_stderr``. Other than SIGKILL, the held request is let go
        after the signal, as a server would answer it, so the command can finish what it has in flight."""
        gate = self.add_fault("gate", match=match)
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert gate.reached.wait(30), proc.communicate(timeout=5)
            os.kill(proc.pid, sig)
            if sig != signal.SIGKILL:
                gate.release()
            self.last_stderr = proc.communicate(timeout=60)[1]
        finally:
            gate.release()
            if proc.poll() is None:
                proc.kill()
        return proc.returncode

    def add_fault(self, kind: str, match: str | None = None, times: int = 1, **kw) -> Fault:
        if kind == "body":
            kw.setdefault("status", 200)
        f = Fault(kind=kind, match=match, times=times, **kw)
        with self._lock:
            self.faults.append(f)
        return f

    def count(self, match: str | None = None, path: str | None = None) -> int:
        with self._lock:
            return sum(1 for r in self.requests if (match is None or match in r["text"])
                       and (path is None or r["path"].endswith(path)))

    def _take_fault(self, text: str) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.times > 0 and (f.match is None or f.match in text):
                    f.times -= 1
                    return f
        return None

    # -------------------------------------------------------------- handling
    def _send(self, h: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict | None = None) -> None:
        try:
            h.send_response(status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test, killed process)

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            self._handle_one(h)
        finally:
            with self._lock:
                self.inflight -= 1

    def _handle_one(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length)
        try:
            body = json.loads(raw)
        except ValueError:
            return self._send(h, 400, b'{"error":{"message":"invalid JSON"}}')
        path = h.path.rstrip("/")
        if "messages" in body:
            text = "\n".join(str(m.get("content", "")) for m in body["messages"])
        else:
            text = str(body.get("prompt", ""))
        auth = h.headers.get("Authorization")
        auth_ok = self.api_key is None or auth == f"Bearer {self.api_key}"
        fault = None if not auth_ok else self._take_fault(text)
        with self._lock:
            self.requests.append({"path": path, "text": text, "body": body, "auth_ok": auth_ok,
                                  "fault": fault.kind if fault else None})
        if not auth_ok:
            # Like OpenAI, echo (part of) the key: the client must redact it.
            msg = f"Incorrect API key provided: {auth}. You can find your API key at https://example"
            return self._send(h, 401, json.dumps({"error": {"message": msg, "type": "invalid_request_error"}}).encode())
        if fault is not None:
            if fault.kind == "status":
                hdr = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
                err = {"error": {"message": f"injected HTTP {fault.status}", "type": "server_error"}}
                return self._send(h, fault.status, json.dumps(err).encode(), hdr)
            if fault.kind == "timeout":
                time.sleep(fault.delay_s)
                fault = None  # then answer normally (the client has gone)
            elif fault.kind == "bad_json":
                return self._send(h, 200, b'{"id": "cmpl-1", "choices": [ {"text": "trunc')
            elif fault.kind == "gate":
                fault.reached.set()
                fault.released.wait(30)
                return self._send(h, 503, b'{"error":{"message":"gate closed"}}')
            elif fault.kind == "body":
                raw = fault.content if isinstance(fault.content, bytes) else fault.content.encode("utf-8")
                return self._send(h, fault.status, raw)
            elif fault.kind == "close":
                h.close_connection = True
                try:
                    h.connection.shutdown(2)
                except OSError:
                    pass
                return None
        if path == "/v1/chat/completions":
            resp = self._chat(body, text, fault)
        elif path == "/v1/completions":
            resp = self._completion(body, text, fault)
        else:
            return self._send(h, 404, b'{"error":{"message":"no such endpoint"}}')
        if fault is not None and fault.kind == "drop_choices":
            resp["choices"] = resp["choices"][:max(0, len(resp["choices"]) - max(1, fault.at))]
        raw = json.dumps(resp).encode("utf-8")
        if fault is not None and fault.kind == "trickle":
            return self._trickle(h, raw, fault.delay_s)
        self._send(h, 200, raw)

    def _trickle(self, h: BaseHTTPRequestHandler, body: bytes, delay_s: float) -> None:
        """Headers at once, then the body one byte every ``delay_s`` (a stalled or throttled server)."""
        try:
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.flush()
            for i in range(len(body)):
                h.wfile.write(body[i:i + 1])
                h.wfile.flush()
                time.sleep(delay_s)
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass  # the client gave up: what a deadline is for

    # -------------------------------------------------------------- endpoints
    @staticmethod
    def _apply(fault: Fault | None, lps: list, finish: str):
        if fault is not None and fault.kind == "sentinel" and lps:
            lps = list(lps)
            lps[min(fault.at, len(lps) - 1)] = -9999.0
        if fault is not None and fault.kind == "length":
            finish = "length"
        return lps, finish

    def _judge_reply(self, text: str) -> str | None:
        blocks = _RESP_BLOCK.findall(text)
        if not blocks or "rank the responses" not in text:
            return None
        n = len(blocks)
        first_seen: dict[str, int] = {}
        for i, r in blocks:
            first_seen.setdefault(r, int(i))
        unique = sorted(first_seen.items(), key=lambda kv: (_h("pref", kv[0]), kv[1]))
        order = [n] + [i for _, i in unique]
        own = " ".join(WORDS[_h("own", text, j) % len(WORDS)] for j in range(8)).capitalize() + "."
        lines = ["First, the instruction requires open-ended responses.",
                 f"Second, ###Response {n}:", own, "", "It covers the request in full.", "",
                 "Third, " + ("there are no duplicate responses." if len(first_seen) == n else
                              "some responses are duplicates; I keep one of each."),
                 "Fourth, the scores:"]
        for pos, i in enumerate(order):
            lines.append(f"Response {i}: [{15 - pos}]")
        lines.append("Last, rank: [" + ", ".join(map(str, order)) + "]")
        return "\n".join(lines)

    def _usage(self, text: str, completion_tokens: int) -> dict:
        pt = len(tokenize(text))
        return {"prompt_tokens": pt, "completion_tokens": completion_tokens, "total_tokens": pt + completion_tokens}

    def _chat(self, body: dict, text: str, fault: Fault | None) -> dict:
        n = int(body.get("n", 1))
        max_tokens = int(body.get("max_tokens") or 256)
        choices, total = [], 0
        for j in range(n):
            content = None
            if fault is not None and fault.kind == "reply":
                content = fault.content
            elif n == 1:
                content = self._judge_reply(text)
            if content is not None:
                toks = tokenize(content)
                lps, finish = [-0.1] * len(toks), "stop"
            else:
                toks, lps, finish = gen_tokens(f"{text}|{body.get('seed')}|{j}|{body.get('temperature')}",
                                               max_tokens)
                lps, finish = self._apply(fault, lps, finish)
                content = "".join(toks)
            total += len(toks)
            ch = {"index": j, "message": {"role": "assistant", "content": content}, "finish_reason": finish}
            if body.get("logprobs"):
                if fault is not None and fault.kind == "no_logprobs":
                    ch["logprobs"] = None
                else:
                    k = int(body.get("top_logprobs") or 0)
                    ch["logprobs"] = {"content": [
                        {"token": t, "logprob": lp, "bytes": list(t.encode()),
                         "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())}][:k]}
                        for t, lp in zip(toks, lps)]}
            else:
                ch["logprobs"] = None
            choices.append(ch)
        return {"id": "chatcmpl-" + str(_h(text))[:10], "object": "chat.completion", "model": body.get("model"),
                "choices": choices, "usage": self._usage(text, total)}

    def _completion(self, body: dict, text: str, fault: Fault | None) -> dict:
        n = int(body.get("n", 1))
        max_tokens = int(body.get("max_tokens") if body.get("max_tokens") is not None else 16)
        echo = bool(body.get("echo"))
        choices, total = [], 0
        for j in range(n):
            if max_tokens > 0:
                toks, lps, finish = gen_tokens(f"{text}|{body.get('seed')}|{j}|{body.get('temperature')}",
                                               max_tokens)
                lps, finish = self._apply(fault, lps, finish)
            else:
                toks, lps, finish = [], [], "length"
            total += len(toks)
            out_text = "".join(toks)
            ch = {"index": j, "text": (text if echo else "") + out_text, "finish_reason": finish}
            if body.get("logprobs") is not None and not (fault is not None and fault.kind == "no_logprobs"):
                all_toks, all_lps, offsets = [], [], []
                if echo:
                    off = 0
                    for i, t in enumerate(tokenize(text)):
                        all_toks.append(t)
                        all_lps.append(None if i == 0 else -round(0.05 + (_h("p", text, i) % 3000) / 1000.0, 4))
                        offsets.append(off)
                        off += len(t)
                off = len(text) if echo else 0
                for t, lp in zip(toks, lps):
                    all_toks.append(t)
                    all_lps.append(lp)
                    offsets.append(off)
                    off += len(t)
                ch["logprobs"] = {"tokens": all_toks, "token_logprobs": all_lps,
                                  "top_logprobs": None, "text_offset": offsets}
            else:
                ch["logprobs"] = None
            choices.append(ch)
        return {"id": "cmpl-" + str(_h(text))[:10], "object": "text_completion", "model": body.get("model"),
                "choices": choices, "usage": self._usage(text, total)}

"""The store (cache, ledger, budget) and the HTTP client against a real local server (no mocks)."""
import json
import logging
import socket
import time

import pytest

from tests.support.openai_server import OpenAIServer
from tuna_jax.llm_api.client import APIError, ClientConfig, FatalAPIError, OpenAIClient
from tuna_jax.llm_api.store import Budget, BudgetExceeded, Prices, Store, StoreError, content_key

KEY = "sk-test-SECRET-0123456789abcdef"


def fast_config(base_url, **kw):
    cfg = dict(base_url=base_url, model="test-model", timeout_s=2.0, max_retries=3, backoff_initial_s=0.01,
               backoff_max_s=0.05, max_bad_json_retries=2, concurrency=4)
    cfg.update(kw)
    return ClientConfig(**cfg)


# ------------------------------------------------------------------------------------------ keys
def test_content_key_is_stable_and_separates_what_matters():
    body = {"model": "m", "prompt": "hi", "temperature": 1.0, "n": 4}
    k = content_key("http://h/v1", "completions", body)
    assert k == content_key("http://h/v1/", "/completions", dict(reversed(list(body.items()))))
    assert len(k) == 64
    assert k != content_key("http://h/v1", "completions", {**body, "temperature": 0.5})
    assert k != content_key("http://other/v1", "completions", body)
    assert k != content_key("http://h/v1", "chat/completions", body)
    assert k != content_key("http://h/v1", "completions", body, {"sample_group": 1})


# ------------------------------------------------------------------------------------------ store file
def test_store_roundtrip_errors_and_reload(tmp_path):
    p = tmp_path / "s.jsonl"
    with Store(p, prices=Prices(1.0, 2.0)) as s:
        s.put_error("a", error="boom", error_kind="http", http_status=500, meta={}, attempts=2)
        assert s.get("a") is None and s.error("a")["http_status"] == 500
        s.put_ok("a", {"choices": [], "usage": {"prompt_tokens": 1000, "completion_tokens": 500}},
                 meta={"m": 1}, attempts=1)
        s.put_ok("b", {"choices": []}, meta={}, attempts=1)
        assert s.get("a")["response"]["usage"]["prompt_tokens"] == 1000
        assert s.run["usage_missing"] == 1
    with Store(p, prices=Prices(1.0, 2.0)) as s:
        assert "a" in s and "b" in s and s.error("a") is None
        assert s.total_cost_usd == pytest.approx((1000 * 1.0 + 500 * 2.0) / 1e6)
        assert s.total_requests == 4  # attempts over all lines
        assert s.failed_keys() == []


def test_torn_last_line_is_tolerated_reported_and_cut(tmp_path, caplog):
    p = tmp_path / "s.jsonl"
    with Store(p) as s:
        s.put_ok("a", {"choices": [1]}, meta={}, attempts=1)
    with open(p, "ab") as f:
        f.write(b'{"key": "b", "status": "ok", "respo')  # a process killed mid-write
    with caplog.at_level(logging.WARNING, logger="tuna_jax.llm_api"):
        with Store(p) as s:
            assert "a" in s and "b" not in s and s.torn_bytes > 0
            s.put_ok("c", {"choices": [2]}, meta={}, attempts=1)
    assert "torn last line" in caplog.text
    assert (tmp_path / "s.jsonl.torn").read_bytes().startswith(b'{"key": "b"')
    lines = p.read_bytes().splitlines()
    assert len(lines) == 2 and all(json.loads(x) for x in lines)
    with Store(p) as s:
        assert s.get("c")["response"] == {"choices": [2]}


def test_corrupt_middle_line_names_file_and_line(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text('{"key":"a","status":"ok","response":{}}\nnot json\n{"key":"b","status":"ok"}\n')
    with pytest.raises(StoreError, match=r"s\.jsonl:2"):
        Store(p)


def test_one_process_per_store(tmp_path):
    p = tmp_path / "s.jsonl"
    with Store(p):
        with pytest.raises(StoreError, match="in use"):
            Store(p)
    Store(p).close()  # free again


def test_budget_max_requests_is_exact_and_cumulative(tmp_path):
    p = tmp_path / "s.jsonl"
    with Store(p, budget=Budget(max_requests=2)) as s:
        s.reserve()
        s.reserve()
        with pytest.raises(BudgetExceeded, match="max_requests=2"):
            s.reserve()  # two in flight already: reserved, so exact
        s.release()
        s.release()
        s.put_ok("a", {"choices": []}, meta={}, attempts=2)
    with Store(p, budget=Budget(max_requests=2)) as s:
        with pytest.raises(BudgetExceeded):
            s.reserve()  # the earlier run's requests count
    with Store(p, budget=Budget(max_usd=0.001), prices=Prices(1000.0, 0.0)) as s:
        s.reserve()
        s.release()
        s.put_ok("b", {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 0}}, meta={}, attempts=1)
        with pytest.raises(BudgetExceeded, match="max_usd") as ei:
            s.reserve()
        assert ei.value.spent_usd == pytest.approx(0.002)


# ------------------------------------------------------------------------------------------ client
def test_cache_hit_sends_nothing(server, tmp_path):
    with Store(tmp_path / "s.jsonl") as store:
        c = OpenAIClient(fast_config(server.base_url), store)
        r1 = c.chat([{"role": "user", "content": "hello"}], temperature=0.0)
        r2 = c.chat([{"role": "user", "content": "hello"}], temperature=0.0)
        assert not r1.cached and r2.cached and r1.response == r2.response
        assert server.count("hello") == 1
        c.chat([{"role": "user", "content": "hello"}], temperature=0.0, extra_key={"sample_group": 1})
        assert server.count("hello") == 2
    with Store(tmp_path / "s.jsonl") as store:  # and after a restart
        OpenAIClient(fast_config(server.base_url), store).chat([{"role": "user", "content": "hello"}],
                                                                temperature=0.0)
        assert server.count("hello") == 2 and store.run["cache_hits"] == 1


def test_429_with_retry_after_then_success(server, tmp_path):
    server.add_fault("status", match="rate me", status=429, retry_after="1")
    with Store(tmp_path / "s.jsonl") as store:
        c = OpenAIClient(fast_config(server.base_url), store)
        t0 = time.monotonic()
        r = c.complete("rate me", max_tokens=8)
        assert time.monotonic() - t0 >= 1.0  # Retry-After honoured over the 10 ms backoff
        assert r.response["choices"] and server.count("rate me") == 2
        rec = store.get(r.key)
        assert rec["attempts"] == 2 and rec["retries"][0]["http_status"] == 429


def test_500_retries_are_bounded_recorded_and_retried_on_rerun(server, tmp_path):
    server.add_fault("status", match="always 500", status=500, times=4)
    p = tmp_path / "s.jsonl"
    with Store(p) as store:
        c = OpenAIClient(fast_config(server.base_url, max_retries=3), store)
        with pytest.raises(APIError) as ei:
            c.complete("always 500", max_tokens=8)
        assert ei.value.status == 500 and ei.value.attempts == 4
        assert "HTTP 500" in str(ei.value) and server.base_url in str(ei.value)
        assert server.count("always 500") == 4  # 1 + max_retries, no more
        assert store.failed_keys()
    with Store(p, retry_failed=False) as store:  # reported, not retried
        with pytest.raises(APIError, match="failed in an earlier run"):
            OpenAIClient(fast_config(server.base_url), store).complete("always 500", max_tokens=8)
        assert server.count("always 500") == 4
    with Store(p) as store:  # retried (the fault is used up): succeeds
        r = OpenAIClient(fast_config(server.base_url), store).complete("always 500", max_tokens=8)
        assert r.response["choices"] and server.count("always 500") == 5
    with Store(p) as store:
        assert store.failed_keys() == []


def test_timeout_is_retried(server, tmp_path):
    server.add_fault("timeout", match="slow", delay_s=1.0)
    with Store(tmp_path / "s.jsonl") as store:
        c = OpenAIClient(fast_config(server.base_url, timeout_s=0.3), store)
        r = c.complete("slow", max_tokens=8)
        assert r.response["choices"] and server.count("slow") == 2
        assert store.get(r.key)["retries"][0]["kind"] == "timeout"


def test_timeouts_give_up_with_a_clear_error(server, tmp_path):
    server.add_fault("timeout", match="slower", delay_s=0.6, times=2)
    with Store(tmp_path / "s.jsonl") as store:
        c = OpenAIClient(fast_config(server.base_url, timeout_s=0.2, max_retries=1), store)
        with pytest.raises(APIError, match="timed out") as ei:
            c.complete("slower", max_tokens=8)
        assert ei.value.kind == "timeout" and "--timeout" in str(ei.value)


def test_malformed_json_retried_bounded_and_recorded(server, tmp_path):
    server.add_fault("bad_json", match="once bad")
    server.add_fault("bad_json", match="always bad", times=10)
    with Store(tmp_path / "s.jsonl") as store:
        c = OpenAIClient(fast_config(server.base_url, max_bad_json_retries=2), store)
        r = c.complete("once bad", max_tokens=8)
        assert r.response["choices"] and server.count("once bad") == 2
        with pytest.raises(APIError, match="malformed") as ei:
            c.complete("always bad", max_tokens=8)
        assert ei.value.kind == "bad_json" and server.count("always bad") == 3
        err = store.error(store.failed_keys()[0])
        assert err["error_kind"] == "bad_json"


def test_4xx_is_not_retried(server, tmp_path):
    server.add_fault("status", match="bad request", status=400, times=5)
    with Store(tmp_path / "s.jsonl") as store:
        c = OpenAIClient(fast_config(server.base_url), store)
        with pytest.raises(APIError, match="HTTP 400") as ei:
            c.complete("bad request", max_tokens=8)
        assert not isinstance(ei.value, FatalAPIError)
        assert server.count("bad request") == 1


def test_wrong_key_is_fatal_and_never_shown(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MY_KEY", KEY)
    with OpenAIServer(api_key="sk-the-right-one-999999") as srv, Store(tmp_path / "s.jsonl") as store:
        c = OpenAIClient(fast_config(srv.base_url, api_key_env="MY_KEY"), store)
        with caplog.at_level(logging.DEBUG):
            with pytest.raises(FatalAPIError) as ei:
                c.chat([{"role": "user", "content": "x"}])
        text = str(ei.value) + repr(ei.value) + repr(c) + caplog.text
        assert "HTTP 401" in str(ei.value) and "$MY_KEY" in str(ei.value) and "is set" in str(ei.value)
        assert KEY not in text and "SECRET" not in text
        assert srv.count() == 1  # not retried
    assert KEY not in (tmp_path / "s.jsonl").read_text()
    assert "SECRET" not in (tmp_path / "s.jsonl").read_text()


def test_right_key_is_sent_but_not_stored(server, tmp_path):
    with Store(tmp_path / "s.jsonl") as store:
        OpenAIClient(fast_config(server.base_url), store).chat([{"role": "user", "content": "x"}])
    assert server.requests[-1]["auth_ok"]
    assert KEY not in (tmp_path / "s.jsonl").read_text()


def test_connection_refused_is_retried_then_explained(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with Store(tmp_path / "s.jsonl") as store:
        c = OpenAIClient(fast_config(f"http://127.0.0.1:{port}/v1", max_retries=2), store)
        with pytest.raises(APIError, match="connection failed") as ei:
            c.complete("x", max_tokens=1)
        assert ei.value.attempts == 3 and "--base-url" in str(ei.value)


def test_budget_stops_before_sending(server, tmp_path):
    with Store(tmp_path / "s.jsonl", budget=Budget(max_requests=2)) as store:
        c = OpenAIClient(fast_config(server.base_url), store)
        c.complete("one", max_tokens=4)
        c.complete("two", max_tokens=4)
        with pytest.raises(BudgetExceeded):
            c.complete("three", max_tokens=4)
        c.complete("one", max_tokens=4)  # cached: still allowed
    assert server.count() == 2


def test_budget_mid_retry_is_recorded_for_the_rerun(server, tmp_path):
    server.add_fault("status", match="flaky", status=503, times=1)
    p = tmp_path / "s.jsonl"
    with Store(p, budget=Budget(max_requests=1)) as store:
        with pytest.raises(BudgetExceeded):
            OpenAIClient(fast_config(server.base_url), store).complete("flaky", max_tokens=4)
        assert store.failed_keys()
    with Store(p, budget=Budget(max_requests=5)) as store:
        assert store.total_requests == 1
        OpenAIClient(fast_config(server.base_url), store).complete("flaky", max_tokens=4)
    assert server.count("flaky") == 2


def test_base_url_must_be_http():
    with pytest.raises(ValueError, match="http://"):
        OpenAIClient(ClientConfig(base_url="localhost:8000/v1", model="m"))

"""Every fault a server can throw at the feedback commands, through the real CLI against the loopback
OpenAI-compatible server (tests/support/openai_server.py), so none of the failures fixed for issue 11 comes back.

Each row of a table is one fault kind. For every row the test checks what a user relies on:
  - the command ends with its documented exit status and one-line messages, never a traceback;
  - no reply the item cannot use is in the store as "ok" (so nothing bad is ever served from the cache);
  - a rerun of the same command finishes every item, requests only what was not finished, and pays
    for nothing twice;
  - the API key never appears in stderr, the outputs or the store.
Timeouts, retry delays and the Retry-After cap are set small so the module runs in seconds.
"""
import json
import os
import re
import time

import pytest

from tuna_jax.feedback import judge as J
from tuna_jax.llm_api.replies import chat_content, check_choices

KEY = "sk-test-SECRET-faults-31337"
ITEMS = [
    {"id": "a", "instruction": "Name a fruit.", "input": "", "output": "Apple.",
     "candidates": ["Apple.", "Banana.", "A fruit is a pear.", "Plum."]},
    {"id": "b", "instruction": "What is the capital of France?", "input": "", "output": "Paris.",
     "candidates": ["Paris.", "Lyon.", "It is Paris.", "Marseille."]},
    {"id": "c", "instruction": "Count to three.", "input": "", "output": "1 2 3",
     "candidates": ["1 2 3", "one two three", "1, 2, 3", "123"]},
]
HIT = "capital of France"  # every fault below hits this item's requests only
# Unfaulted requests get a generous deadline (a loaded CI machine can take over 0.5 s to answer one, and an extra
# retry would break the request counts); the faults that test the deadline itself add TIGHT after FAST.
FAST = ["--timeout", "5", "--max-retries", "2", "--backoff", "0.01", "--backoff-max", "0.02",
        "--max-retry-after", "0.05", "--concurrency", "2", "--no-progress"]
TIGHT = ["--timeout", "0.5"]


@pytest.fixture
def data(tmp_path):
    p = tmp_path / "items.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in ITEMS))
    return str(p)


def run_cli(verb, argv, capsys):
    """(exit status, stderr) of an in-process ``tuna-jax VERB ...``; a traceback fails the test."""
    from tuna_jax.cli import main

    rc = main([verb, *argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def store_lines(path):
    return [json.loads(x) for x in open(path)] if os.path.exists(path) else []


def assert_no_secret(err, *paths):
    for text in (err, *(open(p).read() for p in paths if os.path.exists(p))):
        assert KEY not in text and "SECRET" not in text


# ------------------------------------------------------------------------------------------ the teacher
def completion_body(n, text="x"):
    return json.dumps({"choices": [{"index": i, "text": text, "finish_reason": "stop",
                                    "logprobs": {"tokens": [text], "token_logprobs": [-0.5]}} for i in range(n)]})


# (name, fault kwargs, times, first-run exit status, whether the first run uses the faulted reply in the end)
# times = 1: the fault hits one attempt and the retry succeeds in the same run; times = 3 (1 + --max-retries):
# every attempt of the first run fails, the item is listed as failed, the rerun finishes it.
TEACHER_FAULTS = [
    ("http_500_once", dict(kind="status", status=500), 1, 0),
    ("http_502_once", dict(kind="status", status=502), 1, 0),
    ("http_503_once", dict(kind="status", status=503), 1, 0),
    ("http_429_retry_after_0", dict(kind="status", status=429, retry_after="0"), 1, 0),
    ("http_429_retry_after_3600_capped", dict(kind="status", status=429, retry_after="3600"), 1, 0),
    ("http_429_retry_after_http_date_capped",
     dict(kind="status", status=429, retry_after="Fri, 31 Dec 2100 23:59:59 GMT"), 1, 0),
    ("http_429_retry_after_garbage", dict(kind="status", status=429, retry_after="soon"), 1, 0),
    ("http_500_every_attempt", dict(kind="status", status=500), 3, 1),
    ("http_400_not_retried", dict(kind="status", status=400), 1, 1),
    ("http_422_not_retried", dict(kind="status", status=422), 1, 1),
    ("timeout_once", dict(kind="timeout", delay_s=1.0), 1, 0),
    ("timeout_every_attempt", dict(kind="timeout", delay_s=1.0), 3, 1),
    ("trickled_body_once", dict(kind="trickle", delay_s=0.05), 1, 0),
    ("trickled_body_every_attempt", dict(kind="trickle", delay_s=0.05), 3, 1),
    ("connection_closed_once", dict(kind="close"), 1, 0),
    ("connection_closed_every_attempt", dict(kind="close"), 3, 1),
    ("truncated_json_once", dict(kind="bad_json"), 1, 0),
    ("truncated_json_every_attempt", dict(kind="bad_json"), 3, 1),
    ("html_body", dict(kind="body", content="<html><body>502 Bad Gateway</body></html>"), 1, 0),
    ("empty_body", dict(kind="body", content=""), 1, 0),
    ("json_array_body", dict(kind="body", content="[1, 2, 3]"), 1, 0),
    ("json_without_choices", dict(kind="body", content='{"id": "x", "object": "text_completion"}'), 1, 0),
    ("not_utf8_body", dict(kind="body", content=b'{"choices": "caf\xe9"}'), 1, 0),
    ("choices_are_strings", dict(kind="body", content='{"choices": ["a", "b"]}'), 1, 0),
    ("choices_are_strings_every_attempt", dict(kind="body", content='{"choices": ["a", "b"]}'), 3, 1),
    ("choices_empty_list", dict(kind="body", content='{"choices": []}'), 1, 0),
    ("choices_null_text", dict(kind="body", content=json.dumps(
        {"choices": [{"index": i, "text": None, "logprobs": {"token_logprobs": [-1.0]}} for i in range(4)]})), 1, 0),
    ("logprobs_not_a_list", dict(kind="body", content=json.dumps(
        {"choices": [{"index": i, "text": "a", "logprobs": {"token_logprobs": "-1.0"}} for i in range(4)]})), 1, 0),
    ("fewer_choices_than_n", dict(kind="drop_choices", at=1), 1, 0),
    ("fewer_choices_every_attempt", dict(kind="drop_choices", at=2), 3, 1),
    ("no_logprobs", dict(kind="no_logprobs"), 1, 0),
    ("no_logprobs_every_attempt", dict(kind="no_logprobs"), 3, 1),
    ("usage_not_numbers", dict(kind="body", content=json.dumps(
        {"choices": json.loads(completion_body(4))["choices"], "usage": {"prompt_tokens": "lots"}})), 1, 0),
]


@pytest.mark.parametrize("name,fault,times,rc1", TEACHER_FAULTS, ids=[f[0] for f in TEACHER_FAULTS])
def test_teacher_fault(server, data, tmp_path, capsys, name, fault, times, rc1):
    kw = dict(fault)
    kind = kw.pop("kind")
    server.add_fault(kind, match=HIT, times=times, **kw)
    out, store = str(tmp_path / "out.jsonl"), str(tmp_path / "s.jsonl")
    argv = [data, out, "--base-url", server.base_url, "--model", "m", "--max-tokens", "16", "--store", store, *FAST,
            *(TIGHT if kind in ("timeout", "trickle") else ())]
    t0 = time.monotonic()
    rc, err = run_cli("teacher", argv, capsys)
    assert time.monotonic() - t0 < 15  # no hang: deadlines and the Retry-After cap hold
    assert rc == rc1, err
    hits_1 = server.count(HIT)
    # nothing the item cannot use is stored as good
    for rec in store_lines(store):
        if rec["status"] == "ok":
            check_choices(rec["response"], 4, "completions", logprobs=True)
    if rc1 == 1:
        failed = [json.loads(x) for x in open(out + ".failed.jsonl")]
        assert [f["id"] for f in failed] == ["b"] and "rerun to retry them" in err
        assert len(open(out).read().splitlines()) == 2
    # the rerun finishes everything and asks only for the item that was not finished
    rc, err2 = run_cli("teacher", argv, capsys)
    assert rc == 0, err2
    assert [r["id"] for r in map(json.loads, open(out))] == ["a", "b", "c"]
    assert server.count(HIT) == hits_1 + (1 if rc1 == 1 else 0)
    assert server.count() == hits_1 + 2 + (1 if rc1 == 1 else 0)  # "a" and "c": one request each, ever
    assert "2 from cache" in err2 or "3 from cache" in err2
    assert_no_secret(err + err2, out, store)


@pytest.mark.parametrize("fault,kw,cause,fix", [
    ("drop_choices", {"at": 3}, "server_ignores_n", "rerun with --n-per-request 1"),  # llama.cpp, transformers serve
    ("no_logprobs", {}, "no_logprobs", "add --top-logprobs 1"),
], ids=["ignores_n", "no_logprobs"])
def test_a_server_fault_stops_the_run_with_its_fix(server, tmp_path, capsys, fault, kw, cause, fix):
    """A server that drops `n` or the log-probs fails every item the same way: the run stops after three items
    in a row with the fix in one line, instead of paying three requests for each of all 12 items."""
    rows = [{"id": f"q{k}", "instruction": f"Question {k}?", "input": "", "output": "a"} for k in range(12)]
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    server.add_fault(fault, times=10_000, **kw)
    out = str(tmp_path / "out.jsonl")
    rc, err = run_cli("teacher", [str(data), out, "--base-url", server.base_url, "--model", "m", "--n", "4", *FAST,
                                  "--concurrency", "1"], capsys)
    assert rc == 2, err
    assert f"stopped: 3 items in a row failed the same way ({cause})" in err and fix in err
    # the items in flight when it stopped finish: 3 or 4 failed, every one for the same cause
    assert re.search(rf"written: 0, failed: ([34]) \({cause}: \1\)", err) and "rerun with the fix above" in err
    assert server.count() <= 4 * 3  # 3 attempts for each item stopped on, and one more item in flight at most


def test_failed_items_are_counted_by_cause(server, data, tmp_path, capsys):
    server.add_fault("status", match=HIT, status=503, times=10)
    out = str(tmp_path / "out.jsonl")
    rc, err = run_cli("teacher", [data, out, "--base-url", server.base_url, "--model", "m", *FAST], capsys)
    assert rc == 1 and "written: 2, failed: 1 (http_503: 1)" in err
    assert json.loads(open(out + ".failed.jsonl").read())["cause"] == "http_503"


def test_retry_after_is_capped_and_said(server, data, tmp_path, capsys, caplog):
    server.add_fault("status", match=HIT, status=429, retry_after="3600")
    out = str(tmp_path / "out.jsonl")
    t0 = time.monotonic()
    rc, _ = run_cli("teacher", [data, out, "--base-url", server.base_url, "--model", "m", *FAST], capsys)
    assert rc == 0 and time.monotonic() - t0 < 5
    assert "Retry-After 3600s capped at 0.05s" in caplog.text


def test_trickled_reply_is_cut_at_the_total_deadline(server, data, tmp_path, capsys, caplog):
    # A reply of ~1 KB sent one byte every 0.1 s would take minutes; --timeout 0.5 bounds each attempt.
    server.add_fault("trickle", match=HIT, times=3, delay_s=0.1)
    out = str(tmp_path / "out.jsonl")
    t0 = time.monotonic()
    rc, err = run_cli("teacher", [data, out, "--base-url", server.base_url, "--model", "m", *FAST, *TIGHT], capsys)
    took = time.monotonic() - t0
    assert rc == 1 and took < 4, (took, err)  # 3 attempts x 0.5 s + backoff, not minutes
    assert "timed out after 0.5s" in open(out + ".failed.jsonl").read()


def test_chat_teacher_faults(server, data, tmp_path, capsys):
    """The chat API's own shapes: message content null, no logprobs.content, choices not objects."""
    bad_msg = json.dumps({"choices": [{"index": i, "message": {"role": "assistant", "content": None},
                                       "logprobs": {"content": []}} for i in range(4)]})
    server.add_fault("body", match=HIT, content=bad_msg)
    server.add_fault("no_logprobs", match=HIT)
    server.add_fault("body", match=HIT, content='{"choices": [1, 2, 3, 4]}')
    out, store = str(tmp_path / "out.jsonl"), str(tmp_path / "s.jsonl")
    argv = [data, out, "--base-url", server.base_url, "--model", "m", "--api", "chat", "--store", store,
            "--max-tokens", "16", *FAST]
    rc, err = run_cli("teacher", argv, capsys)
    assert rc == 1 and "choices[0]" in open(out + ".failed.jsonl").read()  # 3 bad replies: 1 + 2 retries
    for rec in store_lines(store):
        if rec["status"] == "ok":
            check_choices(rec["response"], 4, "chat", logprobs=True)
    assert sum(r["status"] == "invalid" for r in store_lines(store)) == 3
    rc, err = run_cli("teacher", argv, capsys)
    assert rc == 0 and server.count(HIT) == 4


def test_a_stored_bad_reply_from_an_older_version_is_requested_again(server, data, tmp_path, capsys):
    """A store written before replies were checked holds {"choices": ["a", "b"]} as "ok": the rerun finds
    it unusable, marks it, requests it again and finishes, instead of crashing on every rerun."""
    from tuna_jax.llm_api.store import content_key

    out, store = str(tmp_path / "out.jsonl"), str(tmp_path / "s.jsonl")
    argv = [data, out, "--base-url", server.base_url, "--model", "m", "--store", store, "--max-tokens", "16",
            *FAST]
    assert run_cli("teacher", argv, capsys)[0] == 0
    body = next(r["body"] for r in server.requests if HIT in r["text"])
    key = content_key(server.base_url, "completions", body, {"sample_group": 0})
    with open(store, "a") as f:  # what the old code cached for this request
        f.write(json.dumps({"key": key, "status": "ok", "attempts": 1, "response": {"choices": ["a", "b"]}}) + "\n")
    os.remove(out)
    n = server.count()
    rc, err = run_cli("teacher", argv, capsys)
    assert rc == 0, err
    assert server.count() == n + 1 and server.count(HIT) == 2  # that request again, nothing else
    tail = [(r["key"], r["status"]) for r in store_lines(store)][-2:]
    assert tail == [(key, "invalid"), (key, "ok")]


def test_too_few_valid_candidates_are_asked_again_on_a_rerun(server, data, tmp_path, capsys):
    """Replies whose log-probs hold the -9999 sentinel are usable in shape, but if too few candidates are
    left the item fails; its replies are then marked so the rerun asks again instead of failing again."""
    server.add_fault("sentinel", match=HIT, times=3, at=0)
    out, store = str(tmp_path / "out.jsonl"), str(tmp_path / "s.jsonl")
    argv = [data, out, "--base-url", server.base_url, "--model", "m", "--store", store, "--n", "4",
            "--n-per-request", "1", "--min-candidates", "2", "--max-tokens", "16", *FAST]
    rc, _ = run_cli("teacher", argv, capsys)
    assert rc == 1 and "valid candidates" in open(out + ".failed.jsonl").read()
    n = server.count(HIT)
    rc, _ = run_cli("teacher", argv, capsys)
    assert rc == 0 and server.count(HIT) == n + 4


# ------------------------------------------------------------------------------------------ fatal faults
@pytest.mark.parametrize("status,needle", [(401, "Check the API key"), (403, "Check the API key"),
                                           (404, "Check --base-url")])
def test_fatal_status_stops_the_run_with_the_key_redacted(server, data, tmp_path, capsys, status, needle):
    msg = f"Incorrect API key provided: Bearer {KEY}"
    server.add_fault("body", match=HIT, status=status, content=json.dumps({"error": {"message": msg}}))
    out, store = str(tmp_path / "out.jsonl"), str(tmp_path / "s.jsonl")
    rc, err = run_cli("teacher", [data, out, "--base-url", server.base_url, "--model", "m", "--store", store,
                               "--concurrency", "1", *FAST[:-3], "--no-progress"], capsys)
    assert rc == 2 and f"HTTP {status}" in err and needle in err and "STOPPED (fatal)" in err
    assert not os.path.exists(out) and os.path.exists(out + ".partial")
    assert_no_secret(err, out + ".partial", store)


def test_wrong_key_stops_and_is_never_shown(server, data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-SECRET-key-000000")
    out = str(tmp_path / "out.jsonl")
    rc, err = run_cli("teacher", [data, out, "--base-url", server.base_url, "--model", "m", *FAST], capsys)
    assert rc == 2 and "HTTP 401" in err and "sk-wrong" not in err
    assert "sk-wrong" not in open(out + ".store.jsonl").read()


def test_no_server_is_retried_then_explained(data, tmp_path, capsys, monkeypatch):
    import socket

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there
    out = str(tmp_path / "out.jsonl")
    rc, err = run_cli("teacher", [data, out, "--base-url", f"http://127.0.0.1:{port}/v1", "--model", "m", *FAST],
                      capsys)
    assert rc == 1 and "Is the server up and reachable?" in open(out + ".failed.jsonl").read()


def test_key_in_base_url_is_refused_without_showing_it(server, data, tmp_path, capsys):
    url = server.base_url.replace("http://", f"http://user:{KEY}@")
    out = str(tmp_path / "out.jsonl")
    rc, err = run_cli("teacher", [data, out, "--base-url", url, "--model", "m", *FAST], capsys)
    assert rc == 2 and "has credentials in it" in err and "$OPENAI_API_KEY" in err
    assert err.count("\n") == 1 and KEY not in err
    assert server.count() == 0 and not os.path.exists(out + ".store.jsonl")


def test_budget_stop_then_rerun(server, data, tmp_path, capsys):
    out, store = str(tmp_path / "out.jsonl"), str(tmp_path / "s.jsonl")
    argv = [data, out, "--base-url", server.base_url, "--model", "m", "--store", store, *FAST]
    rc, err = run_cli("teacher", argv[:] + ["--max-requests", "1"], capsys)
    assert rc == 2 and "STOPPED (budget)" in err and "--max-requests" in err
    rc, err = run_cli("teacher", argv, capsys)
    assert rc == 0 and server.count() == 3


# ------------------------------------------------------------------------------------------ outputs
def test_two_runs_on_one_output_with_different_stores(server, data, tmp_path, capsys):
    """The second run is refused at once (before a request), whatever its --store."""
    from tuna_jax.io.lock import OutputLock

    out = str(tmp_path / "out.jsonl")
    with OutputLock(out):  # the first run, still writing
        rc, err = run_cli("teacher", [data, out, "--base-url", server.base_url, "--model", "m",
                                   "--store", str(tmp_path / "other.jsonl"), *FAST], capsys)
    assert rc == 2 and "is being written by another run" in err and server.count() == 0


def test_a_failed_rerun_does_not_leave_the_old_output_looking_current(server, data, tmp_path, capsys):
    out, store = str(tmp_path / "out.jsonl"), str(tmp_path / "s.jsonl")
    argv = [data, out, "--base-url", server.base_url, "--model", "m", "--store", store, *FAST]
    assert run_cli("teacher", argv, capsys)[0] == 0
    old = open(out).read()
    # another model name: every request is new, and the budget stops the run after one
    rc, err = run_cli("teacher", argv[:5] + ["m2"] + argv[6:] + ["--max-requests", "4"], capsys)
    assert rc == 2 and not os.path.exists(out) and open(out + ".previous").read() == old


# ------------------------------------------------------------------------------------------ the judge
def judge_argv(server, data, tmp_path):
    out, store = str(tmp_path / "ranked.jsonl"), str(tmp_path / "s.jsonl")
    return out, store, [data, out, "--base-url", server.base_url, "--model", "judge", "--store", store,
                        "--max-parse-retries", "1", *FAST]


JUDGE_REPLIES = [
    ("no_rank_line", "Response 2 is the best, then Response 0."),
    ("rank_with_unknown_id", "rank: [4, 2, 9, 0]"),
    ("rank_with_a_repeat", "rank: [4, 2, 2, 0]"),
    ("rank_with_a_tie", "rank: [4, 2 = 0, 1]"),
    ("rank_unclosed", "rank: [4, 2, 0, 1"),
    ("rank_words", "rank: [four, two, one, zero]"),
    ("empty_reply", ""),
    ("final_rank_malformed_after_a_good_one", "rank: [4, 2, 0, 1, 3]\nOn reflection, rank: [4, 2,, 0]"),
]


@pytest.mark.parametrize("name,reply", JUDGE_REPLIES, ids=[r[0] for r in JUDGE_REPLIES])
def test_judge_reply_that_does_not_parse(server, data, tmp_path, capsys, name, reply):
    server.add_fault("reply", match=HIT, times=2, content=reply)  # 1 + --max-parse-retries 1
    out, store, argv = judge_argv(server, data, tmp_path)
    rc, err = run_cli("judge", argv, capsys)
    assert rc == 1 and "rerun to retry them" in err
    failed = [json.loads(x) for x in open(out + ".failed.jsonl")]
    assert [f["id"] for f in failed] == ["b"] and [t["reply"] for t in failed[0]["replies"]] == [reply] * 2
    for rec in store_lines(store):  # no unparseable reply stored as good
        if rec["status"] == "ok":
            J.parse_rank(chat_content(rec["response"])[0], list(range(5)))
    n = server.count()
    rc, err = run_cli("judge", argv, capsys)  # the rerun asks the failed item again, nothing else
    assert rc == 0 and server.count() == n + 1
    assert [r["id"] for r in map(json.loads, open(out))] == ["a", "b", "c"]


@pytest.mark.parametrize("name,body", [
    ("choices_are_strings", '{"choices": ["a", "b"]}'),
    ("choices_empty", '{"choices": []}'),
    ("content_null", '{"choices": [{"message": {"role": "assistant", "content": null}}]}'),
    ("message_missing", '{"choices": [{"text": "rank: [0, 1]"}]}'),
])
def test_judge_reply_of_the_wrong_shape(server, data, tmp_path, capsys, name, body):
    server.add_fault("body", match=HIT, times=2, content=body)
    out, store, argv = judge_argv(server, data, tmp_path)
    rc, err = run_cli("judge", argv, capsys)
    assert rc == 1
    assert all(r["status"] != "ok" or isinstance(r["response"]["choices"][0], dict) for r in store_lines(store))
    rc, err = run_cli("judge", argv, capsys)
    assert rc == 0


def test_judge_rank_inside_the_reasoning_is_not_a_failure(server, data, tmp_path, capsys):
    reply = ("First, I would rank: 2 above 1 since it is longer.\nSecond, ###Response 4:\nParis.\n\n"
             "Fourth, Response 0: [14]\nLast, rank: [4, 0, 2, 1, 3]")
    server.add_fault("reply", match=HIT, content=reply)
    out, store, argv = judge_argv(server, data, tmp_path)
    rc, err = run_cli("judge", argv, capsys)
    assert rc == 0 and server.count(HIT) == 1
    b = [r for r in map(json.loads, open(out)) if r["id"] == "b"][0]
    assert b["judge"]["per_order"][0]["rank"] == [4, 0, 2, 1, 3]


def test_judge_faults_and_a_changed_parser(server, data, tmp_path, capsys):
    """A reply stored as unusable that a later parser accepts is used from the store, not bought again."""
    out, store, argv = judge_argv(server, data, tmp_path)
    server.add_fault("reply", match=HIT, times=2, content="rank: [4, 0, 2, 1, 3] ")
    original = J.parse_rank

    def strict(reply, ids):
        if reply.endswith(" "):
            raise J.RankParseError("trailing space")
        return original(reply, ids)

    J.parse_rank = strict
    try:
        assert run_cli("judge", argv, capsys)[0] == 1
    finally:
        J.parse_rank = original
    n = server.count()
    rc, _ = run_cli("judge", argv, capsys)
    assert rc == 0 and server.count() == n  # both stored replies now parse: no request
    assert store_lines(store)[-1]["status"] == "ok" and store_lines(store)[-1]["cost_usd"] == 0.0


def test_bad_input_costs_nothing_and_leaves_nothing(server, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ITEMS[0]) + "\n" + json.dumps({**ITEMS[1], "candidates": ["ok", 3]}) + "\n")
    out = tmp_path / "o" / "ranked.jsonl"
    rc, err = run_cli("judge", [str(bad), str(out), "--base-url", server.base_url, "--model", "j", *FAST], capsys)
    assert rc == 2 and re.search(r"bad\.jsonl:2: field 'candidates\[1\]': expected str, got int", err)
    assert server.count() == 0 and not (tmp_path / "o").exists()

"""Teacher (probabilistic ranking) against a real local OpenAI-compatible server: scores, guards, resume."""
import json
import logging
import math
import os
import pathlib
import signal
import subprocess
import sys

import pytest

from tuna_jax.cli import parse_config
from tuna_jax.commands import teacher as teacher_cmd
from tuna_jax.commands.teacher import TeacherSettings
from tuna_jax.data.records import read_records
from tuna_jax.feedback import teacher as T
from tuna_jax.llm_api.client import ClientConfig, OpenAIClient
from tuna_jax.llm_api.store import Budget, BudgetExceeded, Store

KEY = "sk-test-SECRET-teacher-424242"
REPO = str(pathlib.Path(__file__).resolve().parents[3])

INSTRUCTIONS = [
    {"instruction": "Give three tips for staying healthy.", "input": "", "output": "Eat well, sleep, move."},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
    {"instruction": "What is the capital of France?", "input": "", "output": "Paris."},
    {"instruction": "Summarise the text.", "input": "The river flows to the sea.", "output": "A river."},
    {"instruction": "Write a haiku about code.", "input": "", "output": "Lines fall into place"},
    {"instruction": "Name a primary colour.", "input": "", "output": "Blue."},
]


@pytest.fixture
def data(tmp_path):
    p = tmp_path / "alpaca.json"
    p.write_text(json.dumps(INSTRUCTIONS, indent=1))
    return str(p)


def client(server, store, **kw):
    cfg = dict(base_url=server.base_url, model="teacher-model", timeout_s=5.0, max_retries=2,
               backoff_initial_s=0.01, backoff_max_s=0.02, concurrency=4)
    cfg.update(kw)
    return OpenAIClient(ClientConfig(**cfg), store)


def run(server, data, out, store_path, cfg=TeacherSettings(max_tokens=64), **kw):
    with Store(store_path, budget=kw.pop("budget", Budget())) as store:
        backend = T.RemoteTeacher(client(server, store), cfg)
        return T.run_teacher(data, out, backend, cfg, meta={"model": "teacher-model"}, progress=False, **kw)


def read(path):
    return [json.loads(x) for x in open(path)]


def test_records_scores_and_ranking(server, data, tmp_path):
    out = str(tmp_path / "out.jsonl")
    s = run(server, data, out, tmp_path / "s.jsonl")
    recs = read(out)
    assert s.written == len(INSTRUCTIONS) == len(recs) and s.failed == 0
    assert server.count(path="/completions") == len(INSTRUCTIONS)  # n=4 in one request each
    body = server.requests[0]["body"]
    assert body["n"] == 4 and body["logprobs"] == 1 and body["temperature"] == 1.0
    assert server.requests[0]["text"].endswith("### Response:")  # the Alpaca prompt
    for rec, src in zip(recs, INSTRUCTIONS):
        assert list(rec)[:10] == ["id", "instruction", "input", "output", "candidates", "scores", "logprobs",
                                  "num_tokens", "finish_reasons", "teacher"]
        assert (rec["instruction"], rec["input"], rec["output"]) == (src["instruction"], src["input"], src["output"])
        assert len(rec["candidates"]) == 4
        for sc, lp, n in zip(rec["scores"], rec["logprobs"], rec["num_tokens"]):
            assert sc == pytest.approx(lp / n ** 1.3)
        assert rec["scores"] == sorted(rec["scores"], reverse=True)
    # The logprobs/num_tokens are the server's: check one candidate against the stored raw reply.
    with Store(tmp_path / "s.jsonl") as st:
        raw = [st.get(k)["response"] for k in list(st._index)]
    by_text = {c: (r, k) for r in recs for k, c in enumerate(r["candidates"])}
    for resp in raw:
        for choice in resp["choices"]:
            lps = choice["logprobs"]["token_logprobs"]
            rec, k = by_text[choice["text"].strip()]
            assert rec["num_tokens"][k] == len(lps) and rec["logprobs"][k] == pytest.approx(math.fsum(lps))
    # The lead's reader accepts the records as native ranking records.
    records, report = read_records(out, kind="ranking")
    assert len(records) == len(INSTRUCTIONS) and report.num_skipped == 0


def test_chat_api_one_sample_per_request(server, data, tmp_path):
    out = str(tmp_path / "out.jsonl")
    cfg = TeacherSettings(api="chat", n_per_request=1, max_tokens=64, top_logprobs=2)
    run(server, data, out, tmp_path / "s.jsonl", cfg=cfg)
    reqs = [r for r in server.requests if r["path"].endswith("/chat/completions")]
    assert len(reqs) == 4 * len(INSTRUCTIONS)
    assert sorted({r["body"]["seed"] for r in reqs}) == [0, 1, 2, 3]
    assert all(r["body"]["logprobs"] is True and r["body"]["top_logprobs"] == 2 for r in reqs)
    recs = read(out)
    assert all(len(r["candidates"]) == 4 and len(set(r["candidates"])) > 1 for r in recs)
    with Store(tmp_path / "s.jsonl") as st:  # "bytes" arrays are not stored
        assert all("bytes" not in json.dumps(st.get(k)["response"]) for k in list(st._index))


def test_sentinel_missing_and_length_guards(server, data, tmp_path):
    server.add_fault("sentinel", match="capital of France", at=1)   # one candidate's token 1 = -9999
    server.add_fault("length", match="haiku")
    server.add_fault("no_logprobs", match="primary colour")
    out = str(tmp_path / "out.jsonl")
    cfg = TeacherSettings(api="completions", n_per_request=1, max_tokens=64)
    s = run(server, data, out, tmp_path / "s.jsonl", cfg=cfg)
    recs = {r["instruction"]: r for r in read(out)}
    cap = recs["What is the capital of France?"]
    assert len(cap["candidates"]) == 3  # the sentinel candidate is dropped, never summed
    assert all(lp > -9999 for r in recs.values() for lp in r["logprobs"])
    assert cap["teacher"]["dropped"] == [{"index": 0, "reason": "missing_logprob", "finish_reason": "stop"}]
    assert recs["Write a haiku about code."]["finish_reasons"].count("length") == 1
    # A reply without log-probs is not usable: stored as invalid (never served as good) and asked again.
    assert len(recs["Name a primary colour."]["candidates"]) == 4 and server.count("primary colour") == 4 + 1
    assert s.counters["missing_logprob"] == 1 and s.counters["length_cut"] == 1 and "no_logprobs" not in s.counters
    statuses = [json.loads(x)["status"] for x in open(tmp_path / "s.jsonl")]
    assert statuses.count("invalid") == 1 and statuses.count("ok") == 4 * len(INSTRUCTIONS)


def test_drop_length_cut_and_too_few_candidates_fail_the_item(server, data, tmp_path):
    server.add_fault("sentinel", match="Translate", times=3)
    out = str(tmp_path / "out.jsonl")
    cfg = TeacherSettings(n_per_request=1, max_tokens=3, drop_length_cut=True)  # max_tokens=3: most are cut
    s = run(server, data, out, tmp_path / "s.jsonl", cfg=cfg)
    failed = read(out + ".failed.jsonl")
    assert s.written + s.failed == len(INSTRUCTIONS)  # nothing lost
    assert any(f["id"] == 1 and "valid candidates" in f["error"] for f in failed)
    assert s.counters["length_cut_dropped"] >= 1


def test_score_given_responses_with_echo(server, tmp_path):
    with Store(tmp_path / "s.jsonl") as store:
        t = T.RemoteTeacher(client(server, store), TeacherSettings())
        prompt = "### Instruction:\nSay hi\n\n### Response:"
        out = t.score(prompt, [" hello there friend", " hi"])
    assert [len(s.token_logprobs) for s in out] == [3, 1]
    assert all(v < 0 for s in out for v in s.token_logprobs)
    assert server.requests[-1]["body"]["echo"] is True


def test_request_failure_is_a_counted_failed_item(server, data, tmp_path):
    server.add_fault("status", match="haiku", status=500, times=3)  # 1 + max_retries=2
    out = str(tmp_path / "out.jsonl")
    s = run(server, data, out, tmp_path / "s.jsonl")
    assert s.written == len(INSTRUCTIONS) - 1 and s.failed == 1
    assert "HTTP 500" in read(out + ".failed.jsonl")[0]["error"]
    s = run(server, data, out, tmp_path / "s.jsonl")  # rerun: only the failed item is requested again
    assert s.failed == 0 and server.count("haiku") == 4 and server.count() == len(INSTRUCTIONS) + 3
    assert not os.path.exists(out + ".failed.jsonl")


def test_budget_stop_then_rerun_gives_identical_output(server, data, tmp_path):
    ref = str(tmp_path / "ref.jsonl")
    run(server, data, ref, tmp_path / "ref_store.jsonl")
    base = server.count()
    out = str(tmp_path / "out.jsonl")
    with pytest.raises(BudgetExceeded) as ei:
        run(server, data, out, tmp_path / "s.jsonl", budget=Budget(max_requests=3), concurrency=1)
    assert ei.value.summary.stopped == "budget" and not os.path.exists(out)
    assert server.count() - base == 3
    run(server, data, out, tmp_path / "s.jsonl", budget=Budget(max_requests=100))
    assert server.count() - base == len(INSTRUCTIONS)  # nothing requested twice
    assert open(out, "rb").read() == open(ref, "rb").read()


def _cli(server_url, data, out, *extra):
    return [sys.executable, "-m", "tuna_jax.cli", "teacher", data, out, "--base-url", server_url,
            "--model", "teacher-model", "--max-tokens", "64", "--concurrency", "1", "--timeout", "20",
            "--backoff", "0.01", "--backoff-max", "0.02", "--no-progress", *extra]


def test_killed_teacher_resumes_without_repeating_and_matches(server, data, tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OPENAI_API_KEY": KEY}
    ref = str(tmp_path / "ref.jsonl")
    out = str(tmp_path / "out.jsonl")
    store = str(tmp_path / "s.jsonl")
    # The 4th instruction's request blocks at the server; the process is SIGKILLed there.
    rc = server.kill_at_request(INSTRUCTIONS[3]["instruction"], _cli(server.base_url, data, out, "--store", store),
                                env, str(tmp_path))
    assert rc == -signal.SIGKILL
    assert not os.path.exists(out)
    for ins in INSTRUCTIONS[:3]:
        assert server.count(ins["instruction"]) == 1
    # Restart: finished items come from the store; only the unfinished ones are requested.
    r = subprocess.run(_cli(server.base_url, data, out, "--store", store), env=env, cwd=str(tmp_path),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "3 from cache" in r.stderr
    for i, ins in enumerate(INSTRUCTIONS):
        assert server.count(ins["instruction"]) == (2 if i == 3 else 1), ins
    # An uninterrupted run (fresh store) writes the same bytes.
    r2 = subprocess.run(_cli(server.base_url, data, ref, "--store", str(tmp_path / "ref_store.jsonl")), env=env,
                        cwd=str(tmp_path), capture_output=True, text=True, timeout=60)
    assert r2.returncode == 0, r2.stderr
    assert open(out, "rb").read() == open(ref, "rb").read()
    for f in (out, store, ref):
        assert KEY not in open(f).read()
    assert KEY not in r.stderr + r2.stderr


def test_cli_in_process_never_shows_the_key(server, data, tmp_path, capsys, caplog):
    server.add_fault("status", match="healthy", status=429, retry_after="0")
    out = str(tmp_path / "out.jsonl")
    cfg = parse_config(["teacher", data, out, "--base-url", server.base_url, "--model", "m", "--max-tokens", "32",
                        "--backoff", "0.01", "--no-progress", "--price-input", "1.5", "--price-output", "2"])
    with caplog.at_level(logging.DEBUG):
        assert teacher_cmd.run(cfg) == 0
    err = capsys.readouterr().err
    assert "$" in err and "store total" in err
    for text in (err, caplog.text, open(out).read(), open(out + ".store.jsonl").read()):
        assert KEY not in text and "SECRET" not in text
    assert "429" in caplog.text  # the retry was logged (without the key)


def test_wrong_url_stops_the_run(server, data, tmp_path, capsys):
    cfg = parse_config(["teacher", data, str(tmp_path / "o.jsonl"), "--base-url", server.base_url + "/nope",
                        "--model", "m", "--no-progress"])
    assert teacher_cmd.run(cfg) == 2
    err = capsys.readouterr().err
    assert "HTTP 404" in err and "--base-url" in err
    assert server.count() <= 4 * 2  # stops instead of failing every item


def test_bad_input_names_file_line_and_field(tmp_path, server):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"instruction": "ok"}\n{"input": "no instruction"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: field 'instruction'"):
        T.read_instructions(str(p))


def test_quality_score_and_checks():
    assert T.quality_score(-6.0, 4, 1.3) == pytest.approx(-6.0 / 4 ** 1.3)
    with pytest.raises(ValueError):
        T.quality_score(0.0, 0, 1.3)
    assert T.check_logprobs(T.Sample("a", [-0.1, -9999.0])) == "missing_logprob"
    assert T.check_logprobs(T.Sample("a", [-0.1, None])) == "missing_logprob"
    assert T.check_logprobs(T.Sample("a", [-0.1, float("nan")])) == "missing_logprob"
    assert T.check_logprobs(T.Sample("a", None)) == "no_logprobs"
    assert T.check_logprobs(T.Sample("", [])) == "empty_response"
    assert T.check_logprobs(T.Sample("a", [-0.1, -2.0])) is None


def test_concurrency_limit(server, data, tmp_path):
    server.add_fault("timeout", delay_s=0.15, times=100)  # latency, well inside the client's timeout
    s = run(server, data, str(tmp_path / "out.jsonl"), tmp_path / "s.jsonl", concurrency=2)
    assert s.written == len(INSTRUCTIONS) and server.max_inflight == 2


def test_sigterm_stops_with_143_keeps_what_was_in_flight_and_resumes(server, data, tmp_path):
    """SIGTERM (a preemption) mid-run: the request in flight finishes and is stored, the run says so in one line
    and exits 143; the rerun asks only for the items never requested."""
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OPENAI_API_KEY": KEY}
    out, store = str(tmp_path / "out.jsonl"), str(tmp_path / "s.jsonl")
    rc = server.kill_at_request(INSTRUCTIONS[3]["instruction"], _cli(server.base_url, data, out, "--store", store),
                                env, str(tmp_path), sig=signal.SIGTERM)
    assert rc == 143, server.last_stderr
    assert server.last_stderr.strip().splitlines()[-1] == ("tuna-jax teacher: stopped by SIGTERM; rerun the same "
                                                           "command to continue")
    assert "Traceback" not in server.last_stderr
    before = [server.count(ins["instruction"]) for ins in INSTRUCTIONS]
    assert before[:4] == [1, 1, 1, 2] and before[4:] == [0, 0]  # the gate answers 503 once released: one retry
    r = subprocess.run(_cli(server.base_url, data, out, "--store", store), env=env, cwd=str(tmp_path),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "4 from cache" in r.stderr  # the three before and the one in flight at the signal
    after = [server.count(ins["instruction"]) for ins in INSTRUCTIONS]
    assert [a - b for a, b in zip(after, before)] == [0, 0, 0, 0, 1, 1]

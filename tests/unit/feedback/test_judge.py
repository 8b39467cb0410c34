"""The judge: strict rank parsing, the ranking prompt, LLM judging through a real local server, metric judge."""
import json
import logging
import os
import pathlib
import signal
import subprocess
import sys

import pytest

from tuna_jax.cli import parse_config
from tuna_jax.commands import judge as judge_cmd
from tuna_jax.commands.judge import JudgeSettings
from tuna_jax.data.records import SkipReport, parse_contextual, read_records
from tuna_jax.data.templates import format_prompt
from tuna_jax.feedback import judge as J
from tuna_jax.feedback.judge import RankParseError, parse_rank
from tuna_jax.llm_api.client import ClientConfig, OpenAIClient
from tuna_jax.llm_api.store import Budget, BudgetExceeded, Store

KEY = "sk-test-SECRET-judge-777777"
REPO = str(pathlib.Path(__file__).resolve().parents[3])
IDS = [0, 1, 2, 3, 4]  # 4 shown responses + the judge's own "Response 4"

# ------------------------------------------------------------------------------------------ parse_rank table
VALID = [
    ("rank: [2, 1, 3, 0, 4]", IDS, [2, 1, 3, 0, 4]),
    ("Rank: [2, 1, 3, 4]", [1, 2, 3, 4], [2, 1, 3, 4]),
    ("rank: 2 > 1 > 3 > 4", [1, 2, 3, 4], [2, 1, 3, 4]),
    ("Rank: 2, 1, 4, 3", [1, 2, 3, 4], [2, 1, 4, 3]),
    ("RANK: [4,0,1,2,3]", IDS, [4, 0, 1, 2, 3]),
    # shortened after the judge removed duplicates
    ("Third, Response 1 and Response 3 are duplicates.\nLast, rank: [4, 2, 1, 0]", IDS, [4, 2, 1, 0]),
    ("rank: [4, 0]", IDS, [4, 0]),
    ("rank: [3]", IDS, [3]),
    # prose around the rank
    ("Response 0: [12]\nResponse 1: [9]\nResponse 2: [14]\nResponse 3: [7]\nResponse 4: [15]\n\n"
     "Last, rank: [4, 2, 0, 1, 3]\n\nResponse 4 is the reference, so it is first.", IDS, [4, 2, 0, 1, 3]),
    ("Based on the overall scores, the final ranking: [4, 2, 0, 3, 1]. Response 2 is close to the reference.",
     IDS, [4, 2, 0, 3, 1]),
    ("**Rank:** [Response 4, Response 1, Response 0, Response 2, Response 3]", IDS, [4, 1, 0, 2, 3]),
    ("Rank (best to worst): 4 > 2 > 0 > 1 > 3", IDS, [4, 2, 0, 1, 3]),
    ("rank: ['4', '2', '1', '0', '3']", IDS, [4, 2, 1, 0, 3]),
    ("Ranking:\n[2, 4, 0, 1, 3]", IDS, [2, 4, 0, 1, 3]),
    ("rank: 4, 3, 2, 1, 0.", IDS, [4, 3, 2, 1, 0]),
    # the format echoed from the instructions is not a ranking; the real one is
    ("The ranking should have the format: 'rank: [i, j ,k, l, m]'.\nrank: [1, 0, 4, 2, 3]", IDS, [1, 0, 4, 2, 3]),
    # the same ranking twice agrees
    ("rank: [4, 2, 0, 1, 3]\n\nSo, once more, rank: 4 > 2 > 0 > 1 > 3", IDS, [4, 2, 0, 1, 3]),
    ("Final rank: [###Response 4, ###Response 0, ###Response 3, ###Response 1, ###Response 2]", IDS, [4, 0, 3, 1, 2]),
    # "rank:" with digits inside the reasoning, before the real ranking line: the final line decides
    ("First, the instruction is open-ended. I would rank: 2 above 1 because it is longer, and Response 3 "
     "deserves rank: 4 at best.\nFourth, the scores.\nLast, rank: [4, 2, 0, 1, 3]", IDS, [4, 2, 0, 1, 3]),
    ("Response 0 would get rank: 1 in a list of short answers.\nrank: [0, 4, 2, 1, 3]", IDS, [0, 4, 2, 1, 3]),
    ("rank: [4, 2, 0, 1, 3]\nOn reflection, rank: [2, 4, 0, 1, 3]", IDS, [2, 4, 0, 1, 3]),
    ("rank: [ 4 ,2 ,0 ,1 ,3 ]", IDS, [4, 2, 0, 1, 3]),
]

INVALID = [
    ("Response 4 is best, then Response 2, then Response 0.", IDS, "no 'rank:'"),
    ("", IDS, "no 'rank:'"),
    ("rank: [i, j, k, l, m]", IDS, "no 'rank:'"),  # only the format echo
    ("rank: [2, 1, 3, 5]", IDS, "not shown"),  # out of range
    ("rank: [2, 1, 3, 9, 0]", [0, 1, 2, 3], "not shown"),
    ("rank: [2, 1, 2, 0]", IDS, "twice"),  # repeated
    ("rank: [-1, 0, 2]", IDS, "unexpected text"),
    ("rank: [2.5, 1, 0]", IDS, "unexpected text"),
    ("rank: [2, 1 = 3, 0]", IDS, "tie"),
    ("rank: 4 > 2 > 0 because Response 2 is better than 1", IDS, "unexpected text"),
    ("rank: [2, 1, three, 0]", IDS, "unexpected text"),
    ("rank: [4, 2, 0, 1, 3", IDS, "unclosed"),
    ("rank:\n[4, 2, 0,\n", IDS, "unclosed"),
    # the final ranking decides: a malformed one after a good one fails the reply
    ("rank: [4, 2, 0, 1, 3]\nOn reflection, rank: [2, 4, 0, 9]", IDS, "not shown"),
    ("rank: , 4, 2", IDS, "separator"),
    ("rank: 1st Response 2, 2nd Response 0", IDS, "unexpected text"),
    ("Rank 1: Response 2\nRank 2: Response 0", IDS, "no 'rank:'"),  # enumerated, no "rank:" list
]


@pytest.mark.parametrize("reply,ids,expected", VALID)
def test_parse_rank_valid(reply, ids, expected):
    assert parse_rank(reply, ids) == expected


@pytest.mark.parametrize("reply,ids,why", INVALID)
def test_parse_rank_invalid(reply, ids, why):
    with pytest.raises(RankParseError, match=why):
        parse_rank(reply, ids)


def test_parse_rank_table_is_big_enough():
    assert len(VALID) + len(INVALID) >= 20 and issubclass(RankParseError, ValueError)


def test_parse_scores_and_own_response():
    reply = ("First, the instruction is open-ended.\nSecond, ###Response 4:\nParis is the capital of France.\n\n"
             "It has been since 987.\n\nThird, Response 1 and Response 3 are duplicates.\n"
             "Fourth, Response 0: [12]\nResponse 1: 5 + 4 + 4 = 13\nResponse 2: 11/15\n"
             "Response 3: relevance 5, detail 4\nResponse 4: [15]\nLast, rank: [4, 1, 0, 2]")
    assert J.parse_scores(reply, [0, 1, 2, 3, 4]) == {0: 12.0, 1: 13.0, 2: 11.0, 4: 15.0}
    assert J.parse_scores(reply, [0, 1]) == {0: 12.0, 1: 13.0}
    assert J.extract_own_response(reply, 4) == "Paris is the capital of France.\n\nIt has been since 987."
    assert J.extract_own_response("###Response 4: Short answer.\nrank: [4, 0]", 4) == "Short answer."
    assert J.extract_own_response("rank: [0]", 4) is None


# ------------------------------------------------------------------------------------------ the prompt
# microsoft/LMOps tuna/src/gpt-eval.py, typed in again here so an accidental edit of the module shows.
REFERENCE_TEXT = (
    "\n\nWe would like you to rate Response 0/1/2/3 in reply to the given instruction displayed above.\n"
    "First, identify if the instruction requires open-ended or close-ended responses.Second, you need to "
    "generate one high quality '###Response 4' in answer to the instruction. It needs to have the same format "
    "as other responses and will be used as a reference later.\nThird, identify if there are duplicate "
    "responses and keep only one of the duplicate responses for the following steps.Fourth, compare Response 4 "
    "with Response 0/1/2/3/4 and assign each response an overall score on a scale of 0 to 15 where a higher "
    "score indicates better overall quality. For an open-ended instruction, please rate based on the relevance "
    "(score 0 to 5), level of details/justification: (score 0 to 5) and accuracy (score 0 to 5) of each "
    "response; for a close-ended instruction, please rate based on the accuracy (score 0 to 5), level of "
    "details/justification (score 0 to 5) and clarity (score 0 to 5) of each response. The ratings should "
    "have the format: 'Response k: [sum of the 3 individual scores you give to response k]'.\nLast, rank the "
    "responses in decreasing order of their overall scores. The ranking should have the format: 'rank: [i, j "
    ",k, l, m]'. If there are duplicate responses, keep only one of them in the rank, that is, the ranking may "
    "become: 'rank: [i, j, k, l]', 'rank: [i, j, k]' 'rank: [i, j]' or even 'rank: [i]'.\n")


def test_prompt_is_the_reference_text_and_layout():
    assert J.RANKING_PROMPT_N4 == REFERENCE_TEXT == J.ranking_instructions(4)
    assert J.PAPER_SYSTEM_PROMPT == "You are a professional and experienced data annotator."
    p = J.build_ranking_prompt("Name a fruit.", "", ["Apple.", "Pear.", "Plum.", "Fig."])
    assert p == (format_prompt("Name a fruit.", "") + "\n\n###Response 0:\nApple.\n\n###Response 1:\nPear.\n\n"
                 "###Response 2:\nPlum.\n\n###Response 3:\nFig.\n" + REFERENCE_TEXT)
    three = J.ranking_instructions(3)
    assert "rate Response 0/1/2 in" in three and "'###Response 3'" in three and "Response 0/1/2/3 and" in three
    # The lead's importer of the reference's contextual files reads our prompt back.
    rec = parse_contextual({"prompt": p, "generation": ["Apple.", "Pear.", "Plum.", "Fig."], "ranks": [2, 0, 4],
                            "response_4": "Banana."},
                           "x:1", SkipReport())
    assert rec.instruction == "Name a fruit." and rec.candidates == ["Plum.", "Apple."]


def test_presentation_orders_and_borda():
    assert J.presentation_orders(4, 1, 0, "a") == [[0, 1, 2, 3]]
    o = J.presentation_orders(4, 5, 0, "a")
    assert o[0] == [0, 1, 2, 3] and len({tuple(x) for x in o}) == 5 and all(sorted(x) == [0, 1, 2, 3] for x in o)
    assert o == J.presentation_orders(4, 5, 0, "a") != J.presentation_orders(4, 5, 1, "a")
    assert J.borda([[2, 0, 1, 3]], 4) == [2.0, 1.0, 3.0, 0.0]
    assert J.borda([[2, 0, 1], [0, 2, 1]], 4) == [2.5, 1.0, 2.5, None]


# ------------------------------------------------------------------------------------------ LLM judge
ITEMS = [
    {"id": "a", "instruction": "Name a fruit.", "input": "", "output": "Apple.",
     "candidates": ["Apple is a fruit.", "A pear.", "Plums are tasty.", "Figs."],
     "num_tokens": [4, 2, 3, 1], "finish_reasons": ["stop", "stop", "stop", "length"]},
    {"id": "b", "instruction": "Translate.", "input": "Hello", "output": "Bonjour",
     "candidates": ["Bonjour", "Salut", "Bonsoir", "Coucou"]},
    {"id": "c", "instruction": "Say hi twice.", "input": "", "output": "hi hi",
     "candidates": ["hi hi", "hello", "hi hi", "hey"]},  # a duplicate
    {"id": "d", "instruction": "Count to three.", "input": "", "output": "1 2 3",
     "candidates": ["1 2 3", "one two three", "1, 2, 3", "123"]},
]


@pytest.fixture
def data(tmp_path):
    p = tmp_path / "cands.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in ITEMS))
    return str(p)


def judge_run(server, data, out, store_path, budget=Budget(), **cfg):
    c = JudgeSettings(**cfg)
    ccfg = ClientConfig(base_url=server.base_url, model="judge-model", timeout_s=5.0, max_retries=2,
                        backoff_initial_s=0.01, backoff_max_s=0.02)
    with Store(store_path, budget=budget) as store:
        return J.run_judge(data, out, J.LLMJudge(OpenAIClient(ccfg, store), c), progress=False)


def read(path):
    return [json.loads(x) for x in open(path)]


def test_llm_judge_records(server, data, tmp_path):
    out = str(tmp_path / "out.jsonl")
    s = judge_run(server, data, out, tmp_path / "s.jsonl")
    assert s.written == 4 and s.failed == 0
    body = server.requests[0]["body"]
    assert body["temperature"] == 0.0 and body["messages"][0]["content"] == J.PAPER_SYSTEM_PROMPT
    recs = {r["id"]: r for r in read(out)}
    a = recs["a"]
    po = a["judge"]["per_order"][0]
    assert po["rank"][0] == 4 and po["own_rank"] == 0  # the fake judge puts its own response first
    assert a["candidates"] == [ITEMS[0]["candidates"][i] for i in po["ranking"]]
    assert a["scores"] == [3.0, 2.0, 1.0, 0.0]  # K=1: N-1-position, the paper's order
    assert a["judge"]["candidate_index"] == po["ranking"]
    assert a["num_tokens"] == [ITEMS[0]["num_tokens"][i] for i in po["ranking"]]  # aligned fields follow
    assert po["response_own"] and "\n\nIt covers the request in full." in po["response_own"]  # kept whole
    assert po["response_scores"] and po["own_score"] == 15.0
    c = recs["c"]  # duplicate "hi hi": the judge ranked 3 ids; the unranked one is dropped and listed
    assert len(c["candidates"]) == 3 and c["judge"]["dropped"] == [2] and s.counters["unranked_candidates"] == 1
    records, report = read_records(out, kind="ranking")
    assert len(records) == 4 and report.num_skipped == 0


def test_bad_replies_are_retried_then_recorded_never_guessed(server, data, tmp_path):
    server.add_fault("reply", match="Name a fruit", content="I think Response 2 is best overall.")
    server.add_fault("reply", match="Translate", times=3, content="rank: [2, 1, 7, 0]")  # out of range, 3x
    server.add_fault("reply", match="Count to three", times=3, content="Last, rank: [1, 2, 1, 0]")  # repeat, 3x
    out = str(tmp_path / "out.jsonl")
    s = judge_run(server, data, out, tmp_path / "s.jsonl", max_parse_retries=2)
    assert s.written == 2 and s.failed == 2 and s.written + s.failed == len(ITEMS)  # nothing lost
    assert server.count("Name a fruit") == 2 and server.count("Translate") == 3  # bounded
    a = read(out)[0]
    assert a["id"] == "a" and a["judge"]["per_order"][0]["attempts"] == 2
    assert a["judge"]["per_order"][0]["failed_replies"][0]["reply"] == "I think Response 2 is best overall."
    failed = {f["id"]: f for f in read(out + ".failed.jsonl")}
    assert set(failed) == {"b", "d"}
    assert [t["reply"] for t in failed["b"]["replies"]] == ["rank: [2, 1, 7, 0]"] * 3
    assert "not shown" in failed["b"]["replies"][0]["error"] and "twice" in failed["d"]["replies"][0]["error"]
    assert s.counters["parse_failed"] == 2 and s.counters["unparsed_replies"] == 7
    assert s.causes == {"parse_failed": 2} and {f["cause"] for f in failed.values()} == {"parse_failed"}
    # No unparseable reply was cached as good: a rerun reads the finished items and the known-bad replies
    # from the store (no request), and asks the failed items again, as new requests (the faults are used
    # up, so the server now answers properly).
    n = server.count()
    s2 = judge_run(server, data, str(tmp_path / "out2.jsonl"), tmp_path / "s.jsonl", max_parse_retries=2)
    assert server.count() - n == 2 and server.count("Translate") == 4 and server.count("Count to three") == 4
    assert s2.failed == 0 and s2.written == 4
    recs = {r["id"]: r for r in read(tmp_path / "out2.jsonl")}
    assert recs["a"] == a  # finished items: identical, from the store
    assert recs["b"]["judge"]["per_order"][0]["attempts"] == 4  # 3 known-bad replies, then a good one
    # A third run sends nothing at all.
    n = server.count()
    judge_run(server, data, str(tmp_path / "out3.jsonl"), tmp_path / "s.jsonl", max_parse_retries=2)
    assert server.count() == n
    assert open(tmp_path / "out2.jsonl", "rb").read() == open(tmp_path / "out3.jsonl", "rb").read()


def test_shuffled_orders_aggregate_by_borda(server, data, tmp_path):
    one = str(tmp_path / "k1.jsonl")
    three = str(tmp_path / "k3.jsonl")
    judge_run(server, data, one, tmp_path / "s1.jsonl", orders=1)
    judge_run(server, data, three, tmp_path / "s3.jsonl", orders=3, seed=7)
    assert server.count(path="/chat/completions") == 4 * (1 + 3)
    for r1, r3 in zip(read(one), read(three)):
        orders = [po["order"] for po in r3["judge"]["per_order"]]
        assert len({tuple(o) for o in orders}) == 3 and orders[0] == [0, 1, 2, 3]
        if r1["id"] == "c":
            # Duplicates: which copy the judge keeps depends on the order, so both copies get points.
            assert sorted(r3["candidates"]) == ["hello", "hey", "hi hi", "hi hi"]
            continue
        # The fake judge prefers by content, not position: every order agrees after mapping back.
        assert r3["candidates"] == r1["candidates"] and r3["scores"] == r1["scores"]


def test_judge_faults_through_the_wire(server, data, tmp_path):
    server.add_fault("status", match="Name a fruit", status=429, retry_after="0")
    server.add_fault("bad_json", match="Translate")
    server.add_fault("timeout", match="Say hi", delay_s=1.0)
    c = JudgeSettings()
    ccfg = ClientConfig(base_url=server.base_url, model="judge-model", timeout_s=0.4, max_retries=2,
                        backoff_initial_s=0.01, backoff_max_s=0.02)
    out = str(tmp_path / "out.jsonl")
    with Store(tmp_path / "s.jsonl") as store:
        s = J.run_judge(data, out, J.LLMJudge(OpenAIClient(ccfg, store), c), progress=False)
    assert s.written == 4 and s.failed == 0
    assert server.count("Name a fruit") == 2 and server.count("Translate") == 2 and server.count("Say hi") == 2


def test_judge_budget_stop_and_resume(server, data, tmp_path):
    out = str(tmp_path / "out.jsonl")
    with pytest.raises(BudgetExceeded):
        judge_run(server, data, out, tmp_path / "s.jsonl", budget=Budget(max_requests=2))
    n = server.count()
    judge_run(server, data, out, tmp_path / "s.jsonl")
    assert server.count() - n == 4 - n  # only the unfinished records are asked
    assert len(read(out)) == 4


def _cli(server_url, data, out, store):
    return [sys.executable, "-m", "tuna_jax.cli", "judge", data, out, "--base-url", server_url, "--model",
            "judge-model", "--concurrency", "1", "--timeout", "20", "--backoff", "0.01", "--backoff-max", "0.02",
            "--no-progress", "--store", store]


def test_killed_judge_resumes_without_repeating_and_matches(server, data, tmp_path):
    """kill -9 while the third record's request is at the server: the rerun asks only the unfinished
    records and writes what an uninterrupted run writes."""
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "OPENAI_API_KEY": KEY}
    out, store, ref = str(tmp_path / "out.jsonl"), str(tmp_path / "s.jsonl"), str(tmp_path / "ref.jsonl")
    rc = server.kill_at_request(ITEMS[2]["instruction"], _cli(server.base_url, data, out, store), env, str(tmp_path))
    assert rc == -signal.SIGKILL and not os.path.exists(out)
    for item in ITEMS[:2]:
        assert server.count(item["instruction"]) == 1
    r = subprocess.run(_cli(server.base_url, data, out, store), env=env, cwd=str(tmp_path), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for i, item in enumerate(ITEMS):  # finished records come from the store; the killed one is asked again
        assert server.count(item["instruction"]) == (2 if i == 2 else 1), item["id"]
    r2 = subprocess.run(_cli(server.base_url, data, ref, str(tmp_path / "ref_store.jsonl")), env=env,
                        cwd=str(tmp_path), capture_output=True, text=True, timeout=60)
    assert r2.returncode == 0, r2.stderr
    assert open(out, "rb").read() == open(ref, "rb").read()
    for text in (open(out).read(), open(store).read(), r.stderr, r2.stderr):
        assert KEY not in text


def test_cli_llm_judge_and_key_secrecy(server, data, tmp_path, capsys, caplog):
    out = str(tmp_path / "out.jsonl")
    cfg = parse_config(["judge", data, out, "--base-url", server.base_url, "--model", "judge-model", "--orders", "2",
                        "--no-progress"])
    with caplog.at_level(logging.DEBUG):
        assert judge_cmd.run(cfg) == 0
    err = capsys.readouterr().err
    for text in (err, caplog.text, open(out).read(), open(out + ".store.jsonl").read()):
        assert KEY not in text and "SECRET" not in text
    assert len(read(out)) == 4


# ------------------------------------------------------------------------------------------ metric judge
def test_metric_judge_rouge_and_exact(data, tmp_path):
    out = str(tmp_path / "m.jsonl")
    assert judge_cmd.run(parse_config(["judge", data, out, "--kind", "metric", "--no-progress"])) == 0
    recs = {r["id"]: r for r in read(out)}
    b = recs["b"]
    assert b["candidates"][0] == "Bonjour" and b["scores"][0] == pytest.approx(1.0)
    assert b["scores"] == sorted(b["scores"], reverse=True)
    assert recs["a"]["judge"] == {"kind": "metric", "metric": "rougeL", "reference_field": "output",
                                  "candidate_index": recs["a"]["judge"]["candidate_index"], "dropped": []}
    from rouge_score import rouge_scorer

    sc = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    for cand, s in zip(recs["d"]["candidates"], recs["d"]["scores"]):
        assert s == pytest.approx(sc.score("1 2 3", cand)["rougeL"].fmeasure)
    ex = str(tmp_path / "e.jsonl")
    assert judge_cmd.run(parse_config(["judge", data, ex, "--kind", "metric", "--metric", "exact",
                                       "--no-progress"])) == 0
    e = {r["id"]: r for r in read(ex)}
    assert e["c"]["scores"] == [1.0, 1.0, 0.0, 0.0] and e["c"]["judge"]["candidate_index"] == [0, 2, 1, 3]


def test_metric_judge_without_reference_fails_the_record(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps({"instruction": "q", "candidates": ["a", "b"]}) + "\n")
    out = str(tmp_path / "o.jsonl")
    s = J.run_judge(str(p), out, J.MetricJudge(JudgeSettings(judge="metric")), progress=False)
    assert s.failed == 1 and s.written == 0 and os.path.exists(out + ".failed.jsonl")
    assert s.causes == {"no_reference": 1} and "(no_reference: 1)" in s.line()  # by cause, not "error"
    # a record whose every candidate is empty fails by its counter's name as well
    p.write_text(json.dumps({"instruction": "q", "output": "a", "candidates": ["", " "]}) + "\n")
    s = J.run_judge(str(p), str(tmp_path / "o2.jsonl"), J.MetricJudge(JudgeSettings(judge="metric")), progress=False)
    assert s.causes == {"no_ranked_candidate": 1} and s.counters["no_ranked_candidate"] == 1


def test_bad_judge_input_names_file_line_and_field(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps({"instruction": "q", "candidates": ["a"]}) + "\n" +
                 json.dumps({"instruction": "q", "candidates": ["a", 3]}) + "\n")
    with pytest.raises(ValueError, match=r"x\.jsonl:2: field 'candidates\[1\]'"):
        J.read_candidates(str(p))


def test_empty_candidates_are_not_shown_and_are_listed(server, tmp_path):
    row = {"id": "e", "instruction": "Name a colour.", "input": "", "output": "Red.",
           "candidates": ["Red.", "", "Blue.", "Green."], "num_tokens": [2, 0, 2, 2]}
    data = tmp_path / "c.jsonl"
    data.write_text(json.dumps(row) + "\n")
    out = str(tmp_path / "out.jsonl")
    s = judge_run(server, str(data), out, tmp_path / "s.jsonl", orders=2)
    assert s.written == 1 and s.counters["empty_candidates"] == 1
    for req in server.requests:  # three responses shown, ids 0..2, the judge's own is 3
        assert "###Response 3:" not in req["text"] and "Response 0/1/2 in reply" in req["text"]
    rec = read(out)[0]
    assert sorted(rec["candidates"]) == ["Blue.", "Green.", "Red."] and rec["judge"]["dropped"] == [1]
    assert rec["scores"] == sorted(rec["scores"], reverse=True) and rec["num_tokens"] == [2, 2, 2]
    for po in rec["judge"]["per_order"]:  # indices of the input row, never the empty one
        assert sorted(po["order"]) == [0, 2, 3] and 1 not in po["ranking"]


def test_sigterm_stops_the_judge_with_143_and_resumes(server, data, tmp_path):
    """SIGTERM while the third record's request is at the server: it finishes and is stored, the run ends in one
    line with status 143, and the rerun asks only for the records never asked."""
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "OPENAI_API_KEY": KEY}
    out, store = str(tmp_path / "out.jsonl"), str(tmp_path / "s.jsonl")
    rc = server.kill_at_request(ITEMS[2]["instruction"], _cli(server.base_url, data, out, store), env, str(tmp_path),
                                sig=signal.SIGTERM)
    assert rc == 143, server.last_stderr
    assert server.last_stderr.strip().splitlines()[-1] == ("tuna-jax judge: stopped by SIGTERM; rerun the same command "
                                                           "to continue")
    before = [server.count(item["instruction"]) for item in ITEMS]
    r = subprocess.run(_cli(server.base_url, data, out, store), env=env, cwd=str(tmp_path), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    after = [server.count(item["instruction"]) for item in ITEMS]
    assert after[:3] == before[:3] and all(a > b for a, b in zip(after[3:], before[3:]))
    assert len(read(out)) == len(ITEMS)

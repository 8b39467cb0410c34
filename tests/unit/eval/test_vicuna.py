"""Pairwise review (tuna_jax/eval/vicuna.py): the strict verdict parsers, the FastChat request layout, and
Vicuna QA / AlpacaEval reviews through the loopback OpenAI-compatible server (one order or both, a tie
when they disagree, bounded retries, failures counted, a rerun makes no request)."""
from __future__ import annotations

import json

import pytest

from tuna_jax.cli import main as cli_main
from tuna_jax.eval import vicuna as V
from tuna_jax.io.errors import InputError
from tuna_jax.llm_api.client import ClientConfig, OpenAIClient
from tuna_jax.llm_api.store import Budget, BudgetExceeded, Store

KEY = "sk-test-vicuna-0123456789"


# ------------------------------------------------------------------------------------------ score lines
VALID = [
    ("8 7", (8.0, 7.0)),
    ("8.5 7", (8.5, 7.0)),
    ("8,7", (8.0, 7.0)),
    ("8, 7", (8.0, 7.0)),              # FastChat's split rejects this; it is unambiguous
    ("10 1\nAssistant 1 is more detailed.", (10.0, 1.0)),
    ("\n\n  9   3  \nexplanation", (9.0, 3.0)),  # leading blank lines and spaces are ignored
    ("0 10", (0.0, 10.0)),
]
INVALID = [
    ("Score: 8 7", "not two scores"),
    ("8/10 7/10", "not two scores"),
    ("Assistant 1: 8\nAssistant 2: 7", "not two scores"),
    ("8 7 because the first is better", "not two scores"),
    ("8 7 6", "not two scores"),
    ("8\n7", "not two scores"),
    ("eight seven", "not two scores"),
    ("-1 5", "not two scores"),
    ("8. 7", "not two scores"),
    ("11 7", "outside"),
    ("", "empty"),
    ("   \n ", "empty"),
]


@pytest.mark.parametrize("reply,expected", VALID)
def test_score_pair_valid(reply, expected):
    assert V.parse_score_pair(reply) == expected


@pytest.mark.parametrize("reply,why", INVALID)
def test_score_pair_invalid(reply, why):
    with pytest.raises(V.ScoreParseError, match=why):
        V.parse_score_pair(reply)


def test_math_reviews_read_the_last_tuple():
    reply = "First, I solve it: x = 3.\nAssistant 1 made an error (in step (2, 3)).\nScores: (4, 9)"
    with pytest.raises(V.ScoreParseError):
        V.parse_score_pair(reply)  # the general / coding prompts: the first line only
    assert V.parse_score_pair(reply, tuple_fallback=True) == (4.0, 9.0)  # the last tuple wins
    assert V.parse_score_pair("7 6\n... (1, 2)", tuple_fallback=True) == (7.0, 6.0)  # a score line still wins
    with pytest.raises(V.ScoreParseError, match="no '\\(a, b\\)' tuple"):
        V.parse_score_pair("Both are fine.", tuple_fallback=True)
    with pytest.raises(V.ScoreParseError, match="outside"):
        V.parse_score_pair("so (12, 3)", tuple_fallback=True)


def test_combine_orders():
    assert V.combine_orders(1, 1) == "win" and V.combine_orders(-1, -1) == "lose"
    assert V.combine_orders(1, -1) == V.combine_orders(-1, 1) == "tie"  # disagreement
    assert V.combine_orders(0, 0) == V.combine_orders(1, 0) == "tie"


# ------------------------------------------------------------------------------------------ AlpacaEval parse
@pytest.mark.parametrize("reply,rank", [
    ("[{'model': 'model_1', 'rank': 1}, {'model': 'model_2', 'rank': 2}]", 1),
    ("[\n    {'model': 'model_2', 'rank': 1},\n    {'model': 'model_1', 'rank': 2}\n]", 2),
    ('  [{"model": "model_1", "rank": 2}, {"model": "model_2", "rank": 1}]  ', 2),
])
def test_alpaca_eval_ranking_valid(reply, rank):
    assert V.parse_alpaca_eval_ranking(reply) == rank


@pytest.mark.parametrize("reply,why", [
    ("```python\n[{'model': 'model_1', 'rank': 1}, {'model': 'model_2', 'rank': 2}]\n```", "not a Python literal"),
    ("model_1 is better", "not a Python literal"),
    ("[{'model': 'model_1', 'rank': 1}, {'model': 'model_2', 'rank': 1}]", "ranks must be 1 and 2"),
    ("[{'model': 'model_1', 'rank': 1}, {'model': 'model_1', 'rank': 2}]", "once each"),
    ("[{'model': 'model_1', 'rank': 3}, {'model': 'model_2', 'rank': 1}]", "not 1 or 2"),
    ("[{'model': 'model_1', 'rank': 1}]", "list of two"),
    ("{'model': 'model_1', 'rank': 1}", "list of two"),
    ("[{'model': 'model_1', 'rank': True}, {'model': 'model_2', 'rank': 2}]", "not 1 or 2"),
    ("", "empty"),
])
def test_alpaca_eval_ranking_invalid(reply, why):
    with pytest.raises(V.ScoreParseError, match=why):
        V.parse_alpaca_eval_ranking(reply)


# ------------------------------------------------------------------------------------------ data
GENERAL = ("We would like to request your feedback on the performance of two AI assistants in response to the user "
           "question displayed above.\nPlease first output a single line containing only two values indicating the "
           "scores for Assistant 1 and 2, respectively.")
TEMPLATE = ("[Question]\n{question}\n\n[The Start of Assistant 1's Answer]\n{answer_1}\n\n[The End of Assistant 1's "
            "Answer]\n\n[The Start of Assistant 2's Answer]\n{answer_2}\n\n[The End of Assistant 2's Answer]\n\n"
            "[System]\n{prompt}\n\n")
SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."


def write_vicuna_data(root, questions):
    """A Vicuna data folder in FastChat's layout (prompts shortened; the real ones are tested below)."""
    root.mkdir(parents=True, exist_ok=True)
    prompts = [(1, "general", GENERAL), (2, "coding", "Your task is to evaluate the CODING abilities."),
               (3, "math", "Finally, please output a Python tuple containing two numerical scores.")]
    (root / "prompt.jsonl").write_text("".join(json.dumps(
        {"prompt_id": i, "system_prompt": SYSTEM, "prompt_template": TEMPLATE, "defaults": {"prompt": text},
         "description": f"Prompt for {cat} questions", "category": cat}) + "\n" for i, cat, text in prompts))
    (root / "reviewer.jsonl").write_text("".join(json.dumps(
        {"reviewer_id": f"gpt-4-0328-{cat}", "prompt_id": i, "metadata": {"temperature": 0.2, "max_tokens": 1024},
         "description": "", "category": cat}) + "\n" for i, cat, _ in prompts))
    (root / "question.jsonl").write_text("".join(json.dumps(
        {"question_id": qid, "text": text, "category": cat}) + "\n" for qid, text, cat in questions))
    return root


def write_answers(path, model_id, answers):
    path.write_text("".join(json.dumps(V.answer_record(model_id, qid, text)) + "\n" for qid, text in answers.items()))
    return path


def test_real_review_prompts_build_fastchats_request(shared_dir):
    data = V.load_vicuna_data(shared_dir / "data" / "vicuna")
    assert len(data.questions) == 80
    cats = {q.category: data.reviewer_for(q.category).reviewer_id for q in data.questions}
    assert cats["coding"] == "gpt-4-0328-coding" and cats["math"] == "gpt-4-0328-math"
    assert cats["generic"] == cats["writing"] == "gpt-4-0328-default"
    r = data.reviewer_for("generic")
    assert r.metadata == {"temperature": 0.2, "max_tokens": 1024}
    msgs = V.build_review_messages(data.prompts[r.prompt_id], "Q?", "A one", "A two")
    assert msgs[0] == {"role": "system", "content": SYSTEM}
    assert msgs[1]["content"].startswith("[Question]\nQ?\n\n[The Start of Assistant 1's Answer]\nA one\n\n[The End "
                                         "of Assistant 1's Answer]\n\n[The Start of Assistant 2's Answer]\nA two\n\n")
    assert "\n\n[System]\nWe would like to request your feedback" in msgs[1]["content"]
    for name in ("alpaca-13b", "llama-13b", "gpt35"):
        answers = V.read_answers(shared_dir / "data" / "vicuna" / f"answer_{name}.jsonl")
        assert sorted(answers) == list(range(1, 81))


def test_bad_vicuna_files_name_file_and_line(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text(json.dumps({"question_id": 1, "text": "x"}) + "\n" + json.dumps({"question_id": "2", "text": "y"}))
    with pytest.raises(InputError, match=r"a\.jsonl:2: field 'question_id' must be int"):
        V.read_answers(p)
    p.write_text(json.dumps({"question_id": 1, "text": "x"}) + "\n\n" + json.dumps({"question_id": 1, "text": "y"}))
    with pytest.raises(InputError,
                       match=r"a\.jsonl:3: a second answer for question_id 1 \(first at .*a\.jsonl:1\)"):
        V.read_answers(p)
    p.write_text("{not json\n")
    with pytest.raises(InputError, match=r"a\.jsonl:1: not valid JSON"):
        V.read_answers(p)


# ------------------------------------------------------------------------------------------ reviews on the wire
QUESTIONS = [(1, "How do I rest?", "generic"), (2, "Why is the sky blue?", "knowledge"),
             (3, "Write a sort function.", "coding"), (4, "Solve x + 1 = 2.", "math"),
             (5, "Write a poem.", "writing"), (6, "Plan a trip.", "generic"), (7, "Name a colour.", "generic")]
MODEL = {q: f"MODEL ANSWER {q}" for q in range(1, 8)}
BASE = {q: f"BASELINE ANSWER {q}" for q in range(1, 7)}  # no baseline answer for question 7


def first(answer):
    """Matches the request that shows ``answer`` as Assistant 1."""
    return f"[The Start of Assistant 1's Answer]\n{answer}\n"


def script_vicuna(server):
    server.add_fault("reply", match=first(MODEL[1]), content="9 6\nAssistant 1 is better.")   # model +
    server.add_fault("reply", match=first(BASE[1]), content="6 9\nAssistant 2 is better.")    # model + -> win
    server.add_fault("reply", match=first(MODEL[2]), content="4 8")                          # model -
    server.add_fault("reply", match=first(BASE[2]), content="8, 4")                          # model - -> lose
    server.add_fault("reply", match=first(MODEL[3]), content="8 7")                          # model +
    server.add_fault("reply", match=first(BASE[3]), content="8 7")     # baseline + : disagreement -> tie
    server.add_fault("reply", match=first(MODEL[4]), content="Solving: x = 1.\nBoth correct: (7, 7)")
    server.add_fault("reply", match=first(BASE[4]), content="7 7")                          # both even -> tie
    server.add_fault("reply", match=first(MODEL[5]), times=3, content="Score: 8 7")          # never parses
    server.add_fault("reply", match=first(BASE[5]), content="7 8")
    server.add_fault("reply", match=first(MODEL[6]), content="Assistant 1 is clearly better.")  # 1st try fails
    server.add_fault("reply", match=first(MODEL[6]), content="8.5 7")                       # the retry parses
    server.add_fault("reply", match=first(BASE[6]), content="7 8.5")                         # -> win


def client_for(server, store):
    return OpenAIClient(ClientConfig(base_url=server.base_url, model="judge-4", timeout_s=5.0, max_retries=1,
                                     backoff_initial_s=0.01, backoff_max_s=0.02, concurrency=2), store)


def review(server, tmp_path, store_name="s.jsonl", out="reviews.jsonl", budget=Budget(), orders="both"):
    data = V.load_vicuna_data(write_vicuna_data(tmp_path / "vicuna", QUESTIONS))
    answers = write_answers(tmp_path / "answers.jsonl", "tuna", MODEL)
    base = write_answers(tmp_path / "base.jsonl", "alpaca", BASE)
    with Store(tmp_path / store_name, budget=budget) as store:
        cfg = V.ReviewConfig(orders=orders, max_parse_retries=2, concurrency=2, progress=False)
        return V.review_vicuna(answers, base, str(tmp_path / out), client_for(server, store), data, cfg,
                               model_name="tuna", baseline_name="alpaca")


def test_vicuna_review_both_orders_ties_and_failures(server, tmp_path, capsys):
    script_vicuna(server)
    res = review(server, tmp_path)
    assert (res["win"], res["lose"], res["tie"], res["failed"], res["missing"]) == (2, 1, 2, 1, 1)
    assert (res["win_pct"], res["tie_pct"], res["lose_pct"]) == (40.0, 40.0, 20.0) and res["orders"] == "both"
    assert res["judged"] == 5 and res["num_questions"] == 7 and res["missing_ids"] == [7]
    assert "1 question(s) lack an answer" in capsys.readouterr().err
    # both orders were asked for every reviewed question, the unparseable ones again (bounded)
    for q in (1, 2, 3, 4):
        assert server.count(first(MODEL[q])) == 1 and server.count(first(BASE[q])) == 1
    assert server.count(first(MODEL[5])) == 3 and server.count(first(BASE[5])) == 1
    assert server.count(first(MODEL[6])) == 2 and server.count(first(BASE[6])) == 1
    assert server.count("MODEL ANSWER 7") == 0
    assert server.count() == 4 * 2 + 4 + 3
    # the request is FastChat's: reviewer by category, its temperature and max_tokens
    bodies = {r["text"]: r["body"] for r in server.requests}
    b = next(b for t, b in bodies.items() if first(MODEL[3]) in t)
    assert b["temperature"] == 0.2 and b["max_tokens"] == 1024 and b["model"] == "judge-4"
    assert b["messages"][0] == {"role": "system", "content": SYSTEM}
    assert "CODING abilities" in b["messages"][1]["content"]
    assert next(b for t, b in bodies.items() if first(MODEL[2]) in t)["messages"][1]["content"].endswith(
        GENERAL + "\n\n")
    recs = {r["question_id"]: r for r in map(json.loads, open(tmp_path / "reviews.jsonl"))}
    assert [r["outcome"] for r in recs.values()] == ["win", "lose", "tie", "tie", "win"]
    q3 = recs[3]["orders"]
    assert q3["model_first"]["scores"] == [8.0, 7.0] and q3["model_first"]["model_preference"] == 1
    assert q3["baseline_first"]["model_preference"] == -1
    assert recs[4]["orders"]["model_first"]["scores"] == [7.0, 7.0]  # the math reviewer's tuple
    assert recs[6]["orders"]["model_first"]["attempts"] == 2
    assert recs[6]["orders"]["model_first"]["failed_replies"][0]["reply"] == "Assistant 1 is clearly better."
    failed = [json.loads(x) for x in open(tmp_path / "reviews.jsonl.failed.jsonl")]
    assert len(failed) == 1 and failed[0]["question_id"] == 5 and failed[0]["cause"] == "parse_failed"
    assert [t["reply"] for t in failed[0]["orders"]["model_first"]["replies"]] == ["Score: 8 7"] * 3
    assert res["unparsed_replies"] == 4
    assert res["per_category"]["generic"] == {"win": 2, "lose": 0, "tie": 0, "failed": 0}
    assert res["per_category"]["writing"]["failed"] == 1
    assert res["win_rate"] == pytest.approx(100 * (2 + 0.5 * 2) / 5)

    # a rerun with the same store asks nothing for the finished questions and writes the same records; the
    # failed order is asked again (its unparseable replies were never cached as good), 3 new requests
    n = server.count()
    again = review(server, tmp_path, out="reviews2.jsonl")
    assert server.count() - n == 3 and server.count(first(MODEL[5])) == 6
    assert open(tmp_path / "reviews.jsonl", "rb").read() == open(tmp_path / "reviews2.jsonl", "rb").read()
    assert {k: again[k] for k in ("win", "lose", "tie", "failed")} == {k: res[k] for k in ("win", "lose", "tie",
                                                                                             "failed")}


def test_vicuna_review_in_the_papers_single_order(server, tmp_path):
    """orders="one": the model as Assistant 1 only; win / tie / lose by its two scores; percentages."""
    script_vicuna(server)
    res = review(server, tmp_path, orders="one")
    # Q1 9-6 win, Q2 4-8 lose, Q3 8-7 win (the other order would have disagreed), Q4 7-7 tie, Q5 never parses,
    # Q6 8.5-7 win on the retry
    assert (res["win"], res["lose"], res["tie"], res["failed"], res["missing"]) == (3, 1, 1, 1, 1)
    assert (res["win_pct"], res["tie_pct"], res["lose_pct"]) == (60.0, 20.0, 20.0) and res["orders"] == "one"
    assert all(server.count(first(BASE[q])) == 0 for q in BASE)  # the baseline is never shown first
    assert server.count() == 4 + 3 + 2
    recs = [json.loads(x) for x in open(tmp_path / "reviews.jsonl")]
    assert [r["outcome"] for r in recs] == ["win", "lose", "win", "tie", "win"]
    assert all(list(r["orders"]) == ["model_first"] for r in recs)
    with pytest.raises(ValueError, match="orders='three'"):
        review(server, tmp_path, orders="three")


def test_outcome_of_one_or_both_orders():
    assert [V.outcome({"model_first": p}) for p in (1, 0, -1)] == ["win", "tie", "lose"]
    assert V.outcome({"model_first": 1, "baseline_first": -1}) == "tie"
    assert V.outcome({"model_first": -1, "baseline_first": -1}) == "lose"


def test_vicuna_budget_stop_then_resume(server, tmp_path):
    script_vicuna(server)
    with pytest.raises(BudgetExceeded):
        review(server, tmp_path, budget=Budget(max_requests=3))
    n = server.count()
    assert n == 3
    res = review(server, tmp_path)
    assert server.count() == 4 * 2 + 4 + 3  # nothing asked twice
    assert (res["win"], res["lose"], res["tie"], res["failed"]) == (2, 1, 2, 1)


# ------------------------------------------------------------------------------------------ AlpacaEval
ALPACA_TEMPLATE = ('<|im_start|>system\nYou rank models.\n<|im_end|>\n<|im_start|>user\nHere is the prompt:\n'
                   '{\n    "instruction": """{instruction}""",\n}\n[\n'
                   '    {"model": "model_1", "answer": """{output_1}"""},\n'
                   '    {"model": "model_2", "answer": """{output_2}"""}\n]\nRank them.\n<|im_end|>')


def test_alpaca_eval_template(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text(ALPACA_TEMPLATE)
    t = V.load_alpaca_eval_template(p)
    msgs = t.fill("Say {output_2}", "first {output_2}", "second")
    assert msgs[0] == {"role": "system", "content": "You rank models."}
    assert '"instruction": """Say {output_2}"""' in msgs[1]["content"]  # filled once, never again
    assert '"answer": """first {output_2}"""' in msgs[1]["content"] and msgs[1]["content"].endswith("Rank them.")
    p.write_text("You rank {output_1} {output_2}")
    with pytest.raises(InputError, match="expected ChatML blocks"):
        V.load_alpaca_eval_template(p)
    p.write_text("<|im_start|>user\n{instruction} {output_1}\n<|im_end|>")
    with pytest.raises(InputError, match=r"no \{output_2\} placeholder"):
        V.load_alpaca_eval_template(p)


def test_real_alpaca_eval_prompt_and_outputs(shared_dir):
    real = V.load_alpaca_eval_template(shared_dir / "data" / "alpaca_eval" / "judge_prompts" / "alpaca_eval_gpt4" /
                                       "alpaca_eval.txt")
    assert [r for r, _ in real.messages] == ["system", "user"]
    m = real.fill("INS", "OUT1", "OUT2")[1]["content"]
    assert '"instruction": """INS""",' in m and '"answer": """OUT1"""' in m and m.index("OUT1") < m.index("OUT2")
    assert m.endswith("Please provide the ranking that the majority of humans would give.")
    refs = V.read_alpaca_eval_outputs(shared_dir / "data" / "alpaca_eval" / "model_outputs_text_davinci_003.json")
    assert len(refs) == 805


def test_alpaca_eval_win_rate_through_the_server(server, tmp_path, capsys):
    tpl = tmp_path / "t.txt"
    tpl.write_text(ALPACA_TEMPLATE)
    ins = ["Name a fruit.", "Add 2 and 2.", "Say hi.", "Count to 3."]
    ref = [{"instruction": i, "output": f"REF {k}", "generator": "text_davinci_003", "dataset": "d"}
           for k, i in enumerate(ins)]
    outs = [{"instruction": i, "output": f"OURS {k}", "generator": "tuna"} for k, i in enumerate(ins[:3])]
    (tmp_path / "ref.json").write_text(json.dumps(ref))
    (tmp_path / "outs.json").write_text(json.dumps(outs))
    win = "[{'model': 'model_1', 'rank': 1}, {'model': 'model_2', 'rank': 2}]"
    lose = "[{'model': 'model_1', 'rank': 2}, {'model': 'model_2', 'rank': 1}]"

    def shown_first(text):
        return f'"model": "model_1", "answer": """{text}"""'
    server.add_fault("reply", match=shown_first("OURS 0"), content=win)
    server.add_fault("reply", match=shown_first("REF 0"), content=lose)    # both orders prefer ours: win
    server.add_fault("reply", match=shown_first("OURS 1"), content=win)
    server.add_fault("reply", match=shown_first("REF 1"), content=win)     # position bias: tie
    server.add_fault("reply", match=shown_first("OURS 2"), content=lose)
    server.add_fault("reply", match=shown_first("REF 2"), content=win)     # both prefer the reference: lose
    out = tmp_path / "ae.json"
    argv = ["eval", "alpaca-eval", "--outputs", str(tmp_path / "outs.json"), "--reference", str(tmp_path / "ref.json"),
            "--prompt-template", str(tpl), "--out", str(out), "--base-url", server.base_url, "--model", "gpt-4",
            "--no-progress", "--max-retries", "1"]
    assert cli_main(argv) == 0
    res = json.loads(out.read_text())
    assert (res["win"], res["lose"], res["tie"], res["missing"], res["failed"]) == (1, 1, 1, 1, 0)
    assert res["win_rate"] == pytest.approx(50.0) and res["win_rate_stderr"] == pytest.approx(50.0 / 3 ** 0.5)
    assert res["baseline"] == "text_davinci_003" and res["model"] == "tuna"
    body = server.requests[0]["body"]
    assert body["temperature"] == 0.0 and body["max_tokens"] == 100
    assert body["messages"][0] == {"role": "system", "content": "You rank models."}
    assert server.count() == 6
    assert (tmp_path / "ae.reviews.jsonl").exists() and (tmp_path / "ae.store.jsonl").exists()
    assert cli_main(argv) == 0 and server.count() == 6  # cached
    assert KEY not in (tmp_path / "ae.store.jsonl").read_text()


def test_cli_vicuna_review(server, tmp_path, capsys):
    script_vicuna(server)
    data = write_vicuna_data(tmp_path / "vicuna", QUESTIONS)
    answers = write_answers(tmp_path / "answers.jsonl", "tuna-7b", MODEL)
    base = write_answers(tmp_path / "base.jsonl", "alpaca-7b", BASE)
    out = tmp_path / "r" / "vicuna.json"
    argv = ["eval", "vicuna", "--answers", str(answers), "--baseline", str(base), "--data", str(data),
            "--out", str(out), "--base-url", server.base_url, "--model", "gpt-4", "--no-progress",
            "--concurrency", "2"]
    assert cli_main(argv) == 1  # question 5 failed: reported, not counted
    err = capsys.readouterr().err
    assert "1 item(s) failed" in err
    res = json.loads(out.read_text())
    assert (res["model"], res["baseline"], res["judge"]) == ("tuna-7b", "alpaca-7b", "gpt-4")
    assert (res["win"], res["lose"], res["tie"], res["failed"], res["orders"]) == (3, 1, 1, 1, "one")  # the default
    script_vicuna(server)  # the scripted replies again, for a new store
    assert cli_main([*argv, "--orders", "both", "--out", str(tmp_path / "r" / "both.json")]) == 1
    res = json.loads((tmp_path / "r" / "both.json").read_text())
    assert (res["win"], res["lose"], res["tie"], res["failed"], res["orders"]) == (2, 1, 2, 1, "both")
    assert (tmp_path / "r" / "vicuna.reviews.jsonl.failed.jsonl").exists()
    assert (tmp_path / "r" / "vicuna.store.jsonl").exists()

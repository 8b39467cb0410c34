"""The demo's own stage kinds (tuna_jax/pipeline/heldout.py): the rubric judge, the graded shape of a ranking
file, and how a comparison says what its two rows share. The answers stage and the evaluation run in
tests/e2e/test_demo.py."""
import json

import pytest

from tests.support.train_utils import write_jsonl
from tuna_jax.pipeline import heldout
from tuna_jax.pipeline.engine import run_pipeline

NAME = "Name the first word."
NEXT = "What number comes after this one?"


def test_rubric_judge_grades_candidates_best_first_and_keeps_r(tmp_path):
    cands = write_jsonl(tmp_path / "cands.jsonl", [
        {"id": "a", "instruction": NAME, "input": "sun cat dog", "output": "cat.",
         "candidates": ["The end.", "dog.", "sun.", "cat"], "diversity": 0.1},
        {"id": "b", "instruction": NEXT, "input": "four", "output": "five", "candidates": ["six", "four"]}])
    (tmp_path / "p.yaml").write_text(f"output_dir: {tmp_path / 'out'}\ninputs: {{cands: {cands}}}\n"
                                     "stages:\n  judge: {kind: rubric-judge, input: \"${inputs.cands}\"}\n")
    run_pipeline(str(tmp_path / "p.yaml"), progress=False)
    rows = [json.loads(x) for x in (tmp_path / "out" / "judge" / "ranked.jsonl").read_text().splitlines()]
    assert rows == [
        # grades 0, 2, 3, 2: best first, the two near misses in their input order (a tie stays a tie)
        {"id": "a", "instruction": NAME, "input": "sun cat dog", "output": "cat.",
         "candidates": ["sun.", "dog.", "cat", "The end."], "scores": [3.0, 2.0, 2.0, 0.0], "judge": "rubric"},
        {"id": "b", "instruction": NEXT, "input": "four", "output": "five",
         "candidates": ["four", "six"], "scores": [2.0, 1.0], "judge": "rubric"}]
    manifest = json.loads((tmp_path / "out" / "judge" / "manifest.json").read_text())
    assert manifest["metrics"] == {"records": 2, "with_two_grades_or_more": 2}


def test_ranking_shape_counts_by_hand():
    rows = [
        # grades [3, 2, 0, 2], r graded 2: pairs of different grade (0>1, 0>2, 0>3, 1>2, 3>2); the scores order
        # the first three as the grades do, and 1>2, 3>2 the other way
        {"instruction": NAME, "input": "sun cat dog", "output": "cat.",
         "candidates": ["sun.", "dog.", "The end.", "cat"], "scores": [0.5, 0.1, 0.3, 0.1]},
        # grades [3, 3], r correct: two texts, one grade, no pair
        {"instruction": NEXT, "input": "four", "output": "five", "candidates": ["five.", "five"], "scores": [1.0, 1.0]},
        {"instruction": NAME, "input": "sun cat dog", "output": "sun"},  # an SFT row: not a ranking record
    ]
    assert heldout.ranking_shape(rows) == {
        "prompts": 2, "two_texts": 1.0, "two_grades": 0.5, "some_above_r": 0.5, "some_below_r": 0.5,
        "r_correct": 0.5, "candidates_correct": 3 / 6, "pairs": 5, "pairs_agree": 3 / 5, "pairs_tied": 0.0}
    rows[0]["scores"] = [0.5, 0.3, 0.3, 0.1]  # 1 and 2 tie now; 3 < 2 still disagrees
    assert heldout.ranking_shape(rows)["pairs_tied"] == 1 / 5
    assert heldout.ranking_shape([{"instruction": "Write a poem.", "candidates": ["a", "b"], "scores": [1, 0]}]) == \
        {"prompts": 1}
    assert heldout.ranking_shape(rows[2:]) is None


def made(start, steps, data, rank_weight, mode="ranking"):
    return {"start": start, "steps": steps, "data": data, "rank_weight": rank_weight, "mode": mode}


@pytest.mark.parametrize("method, control, same, mle_only, words", [
    ([made("alpaca", 32, "d", 1.0)], [made("alpaca", 32, "d", 0.0)], {"start": True, "steps": True, "data": True},
     True, "same start model, steps and training texts; the control is MLE only"),
    ([made("alpaca", 32, "d", 1.0)], [made("base", 80, "d", 0.0)], {"start": False, "steps": False, "data": True},
     True, "same training texts; not the same start model or steps; the control is MLE only"),
    ([made("alpaca", 32, "d", 1.0)], [made("base", 32, "e", None, mode="sft")],
     {"start": False, "steps": True, "data": False}, True,
     "same steps; not the same start model or training texts; the control is MLE only"),
    ([made("a", 1, "d", 1.0)], [made("b", 2, "e", 0.5)], {"start": False, "steps": False, "data": False}, False,
     "nothing in common by the manifests; the control has a ranking term"),
    ([made("a", 1, "d", 1.0)] * 2, [made("a", 1, "d", 0.0)], {"start": False, "steps": False, "data": False}, True,
     "nothing in common by the manifests; the control is MLE only"),  # seeds that do not pair up share nothing
])
def test_a_comparison_says_what_its_rows_share(method, control, same, mle_only, words):
    stats = {"values": [1.0], "mean": 1.0, "sd": None}
    table = {"m": {k: stats for k, _ in heldout.METRICS}, "c": {k: stats for k, _ in heldout.METRICS}}
    c = heldout._compare(table, {"m": method, "c": control}, "m", "c")
    assert (c["same"], c["control_mle_only"], c["method_ranks"]) == (same, mle_only, True)
    assert heldout._shared(c) == words


def test_rubric_judge_refuses_a_record_it_cannot_grade(tmp_path):
    from tuna_jax.pipeline.stage import StageFailed

    cands = write_jsonl(tmp_path / "cands.jsonl", [
        {"instruction": NAME, "input": "sun cat dog", "candidates": ["sun"]},
        {"instruction": "Write a poem.", "input": "", "candidates": ["roses"]}])
    (tmp_path / "p.yaml").write_text(f"output_dir: {tmp_path / 'out'}\ninputs: {{cands: {cands}}}\n"
                                     "stages:\n  judge: {kind: rubric-judge, input: \"${inputs.cands}\"}\n")
    with pytest.raises(StageFailed, match=r"cands\.jsonl:2: the rubric judge grades the demo's synthetic tasks"):
        run_pipeline(str(tmp_path / "p.yaml"), progress=False)

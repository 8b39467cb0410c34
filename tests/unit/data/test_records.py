"""Record readers, importers of the reference code's formats, and validation."""
import json
import sys
import types

import pytest

from tuna_jax.data.records import (
    DataError,
    RankingRecord,
    SFTRecord,
    SkipReport,
    read_records,
    record_prompt,
    write_jsonl,
)
from tuna_jax.data.templates import format_prompt


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


SFT = {"instruction": "Say hi.", "input": "", "output": "Hi!"}


def test_json_list_lines_and_sft_fields(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps([SFT, {"instruction": "Add.", "input": "1 2", "output": "3", "id": 7}], indent=2))
    recs, rep = read_records(str(p))
    assert recs == [SFTRecord("Say hi.", "", "Hi!", f"{p}:2"), SFTRecord("Add.", "1 2", "3", "7")]
    assert recs[1].source == f"{p}:7" and rep.num_skipped == 0
    assert record_prompt(recs[1]) == format_prompt("Add.", "1 2")
    bad = tmp_path / "b.json"
    bad.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "a" "output": "b"}\n]')
    with pytest.raises(DataError, match=r"b\.json:3: malformed JSON"):
        read_records(str(bad), on_error="skip")  # a broken list cannot be read past the error


def test_jsonl_malformed_line_raise_and_skip(tmp_path):
    p = _jsonl(tmp_path / "a.jsonl", [SFT, '{"instruction": "x", "output": ', "", SFT])
    with pytest.raises(DataError, match=r"a\.jsonl:2: malformed JSON"):
        read_records(p)
    recs, rep = read_records(p, on_error="skip")
    assert [r.source for r in recs] == [f"{p}:1", f"{p}:4"]  # the blank line 3 is not a record
    assert rep.skipped == {"malformed_json": 1} and "a.jsonl:2" in rep.summary()


@pytest.mark.parametrize("row, field, reason", [
    ({"instruction": "x", "input": ""}, "output", "missing_field"),
    ({"instruction": 3, "output": "y"}, "instruction", "wrong_type"),
    ({"instruction": "x", "output": "  "}, "output", "empty_response"),
    ({"instruction": "x", "output": "y", "input": ["z"]}, "input", "wrong_type"),
    (["not", "an", "object"], None, "wrong_type"),
])
def test_sft_validation(tmp_path, row, field, reason):
    p = _jsonl(tmp_path / "s.jsonl", [SFT, SFT, row])
    with pytest.raises(DataError) as e:
        read_records(p)
    assert e.value.where == f"{p}:3" and e.value.field == field and e.value.reason == reason
    assert "s.jsonl:3" in str(e.value) and (field is None or repr(field) in str(e.value))
    recs, rep = read_records(p, on_error="skip")
    assert len(recs) == 2 and rep.skipped == {reason: 1}


def test_native_ranking_scores_and_ranks(tmp_path):
    rows = [
        {"instruction": "i", "output": "orig", "candidates": ["a", "b", "c"], "scores": [0.5, 2, -1], "id": "x"},
        {"instruction": "i", "input": "in", "candidates": ["a", "b", "c"], "ranks": [2, 1, 2]},
        {"prompt": "RAW PROMPT", "candidates": ["a"], "scores": [1.0]},
    ]
    recs, _ = read_records(_jsonl(tmp_path / "r.jsonl", rows), kind="ranking")
    assert recs[0] == RankingRecord("i", "", "orig", ["a", "b", "c"], [0.5, 2.0, -1.0], "x")
    assert recs[1].scores[1] > recs[1].scores[0] == recs[1].scores[2]  # rank 1 best; tie kept
    assert recs[1].output == "" and recs[1].input == "in"
    assert record_prompt(recs[2]) == "RAW PROMPT"


@pytest.mark.parametrize("row, field, reason", [
    ({"instruction": "i", "candidates": ["a", "b"], "scores": [1.0]}, "scores", "length_mismatch"),
    ({"instruction": "i", "candidates": ["a", ""], "scores": [1, 2]}, "candidates[1]", "empty_response"),
    ({"instruction": "i", "candidates": ["a", "b"], "scores": [1, "2"]}, "scores[1]", "wrong_type"),
    ({"instruction": "i", "candidates": ["a", "b"], "scores": [1, float("nan")]}, "scores[1]", "wrong_type"),
    ({"instruction": "i", "candidates": ["a", "b"]}, "scores", "missing_field"),
    ({"instruction": "i", "candidates": [], "scores": []}, "candidates", "empty_candidates"),
    ({"instruction": "i", "candidates": ["a"], "ranks": [0]}, "ranks[0]", "wrong_type"),
])
def test_native_ranking_validation(tmp_path, row, field, reason):
    good = {"instruction": "i", "candidates": ["a", "b"], "scores": [1, 2]}
    p = _jsonl(tmp_path / "r.jsonl", [good, row])
    with pytest.raises(DataError) as e:
        read_records(p, kind="ranking")
    assert (e.value.where, e.value.field, e.value.reason) == (f"{p}:2", field, reason)
    recs, rep = read_records(p, kind="ranking", on_error="skip")
    assert len(recs) == 1 and rep.skipped == {reason: 1}


def test_reference_training_format(tmp_path):
    templated = format_prompt("Give a fruit.", "red")
    rows = [
        {"instruction": templated, "id": 0, "output": ["apple", "cherry", "rock"], "score": [-0.2, -0.1, -3]},
        {"instruction": "Custom prompt:\n", "id": 1, "output": ["a", "b", "c"], "score": [1, 2, 3]},
        {"instruction": templated, "id": 2, "output": ["a", "b"], "score": [1, 2]},
        {"instruction": templated, "id": 3, "output": ["a", "b", "c"], "score": [1, 2]},
    ]
    p = _jsonl(tmp_path / "train.json", rows)  # .json holding JSONL: read as JSONL
    with pytest.raises(DataError) as e:
        read_records(p, kind="ranking")
    assert (e.value.where, e.value.field, e.value.reason) == (f"{p}:3", "output", "candidate_count")
    recs, rep = read_records(p, kind="ranking", on_error="skip")
    assert rep.skipped == {"candidate_count": 1, "length_mismatch": 1}
    assert (recs[0].instruction, recs[0].input, recs[0].prompt) == ("Give a fruit.", "red", None)
    assert record_prompt(recs[0]) == templated
    assert recs[0].candidates == ["apple", "cherry", "rock"] and recs[0].scores == [-0.2, -0.1, -3.0]
    assert recs[1].prompt == "Custom prompt:\n" and record_prompt(recs[1]) == "Custom prompt:\n"
    assert [r.id for r in recs] == ["0", "1"]


def test_probabilistic_raw_format(tmp_path):
    row = {"orig": {"instruction": "Name a fruit.", "input": "", "output": "Apple."},
           "text": ["\nBanana.", " Cherry is a fruit.", "Rock"], "logprob": [-2.0, -6.0, -9.0],
           "length": [3, 8, 2], "avg_token_prob": [-0.66, -0.75, -4.5]}
    p = _jsonl(tmp_path / "p.jsonl", [row])
    (rec,), _ = read_records(p, kind="ranking")
    assert rec.candidates == ["Banana.", "Cherry is a fruit.", "Rock"]  # stripped
    assert rec.scores == pytest.approx([-2.0 / 3 ** 1.3, -6.0 / 8 ** 1.3, -9.0 / 2 ** 1.3], rel=1e-12)
    assert (rec.instruction, rec.output) == ("Name a fruit.", "Apple.")
    (rec1,), _ = read_records(p, kind="ranking", beta=1.0, strip_responses=False)
    assert rec1.scores == pytest.approx([-2 / 3, -0.75, -4.5]) and rec1.candidates[0] == "\nBanana."
    for bad, field in [(dict(row, length=[3, 0, 2]), "length[1]"), (dict(row, logprob=[-1.0, -2.0]), "logprob"),
                       (dict(row, orig={"input": ""}), "orig.instruction"),
                       (dict(row, text=["a", " ", "c"]), "text[1]")]:
        with pytest.raises(DataError) as e:
            read_records(_jsonl(tmp_path / "q.jsonl", [row, bad]), kind="ranking")
        assert e.value.field == field and e.value.where.endswith("q.jsonl:2")


def _contextual(**kw):
    instruct = format_prompt("Name a fruit.")
    gens = ["Apple.", "Rock.", "Banana.", "Apple."]
    prompt = instruct + "\n\n" + "\n".join(f"###Response {j}:\n{r}\n" for j, r in enumerate(gens)) + "\n\nrate..."
    row = {"prompt": prompt, "instruct": instruct, "generation": gens, "id": 11, "gpt_eval": "...",
           "rank_str": "[4, 2, 0, 1]", "ranks": [4, 2, 0, 1], "response_4": "Banana, a sweet fruit."}
    row.update(kw)
    return row


def test_contextual_raw_format(tmp_path):
    p = _jsonl(tmp_path / "c.json", [_contextual()])
    (rec,), rep = read_records(p, kind="ranking")
    assert (rec.instruction, rec.input, rec.id) == ("Name a fruit.", "", "11")
    assert rec.candidates == ["Banana.", "Apple.", "Rock."] and rec.scores == [-2.0, -3.0, -4.0]
    assert rep.changed == {"unranked_generation_dropped": 1}  # generation 3 (a duplicate) was not ranked
    (rec,), _ = read_records(p, kind="ranking", include_judge_response=True)
    assert rec.candidates[0] == "Banana, a sweet fruit." and rec.scores == [-1.0, -2.0, -3.0, -4.0]
    # no `instruct`: split the instruction off the judge prompt; README spelling `rank`
    row = _contextual(rank=[1, 0])
    del row["instruct"], row["ranks"]
    (rec,), _ = read_records(_jsonl(tmp_path / "d.jsonl", [row]), kind="ranking", format="contextual")
    assert rec.instruction == "Name a fruit." and rec.candidates == ["Rock.", "Apple."]
    for bad in ([0, 0, 1], [0, 5], [], [0, "1"]):
        with pytest.raises(DataError) as e:
            read_records(_jsonl(tmp_path / "e.jsonl", [_contextual(ranks=bad)]), kind="ranking")
        assert e.value.field.startswith("ranks")


def test_unrecognised_ranking_row(tmp_path):
    with pytest.raises(DataError, match=r"u\.jsonl:1: unrecognised ranking row"):
        read_records(_jsonl(tmp_path / "u.jsonl", [SFT]), kind="ranking")


def test_write_jsonl_round_trip_and_append_after_crash(tmp_path):
    recs = [RankingRecord("i", "x", "o", ["a", "b"], [1.0, 0.0], "r1"),
            RankingRecord("j", "", "", ["c"], [2.5], "r2", prompt="P")]
    p = str(tmp_path / "out.jsonl")
    assert write_jsonl(p, recs[:1]) == 1
    with open(p, "a") as f:
        f.write('{"id": "half-written", "cand')  # a crash mid-line
    write_jsonl(p, recs[1:])
    got, rep = read_records(p, kind="ranking", on_error="skip")
    assert got == recs and rep.skipped == {"malformed_json": 1}


def test_optional_backends_clear_errors(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install"):
        read_records("hf:tatsu-lab/alpaca")
    pq = tmp_path / "x.parquet"
    pq.write_bytes(b"")
    with pytest.raises(ImportError, match="datasets"):
        read_records(str(pq))
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match=r"tuna-jax\[tfds\]"):
        read_records("tfds:alpaca")


def test_hf_source_through_datasets(monkeypatch):
    calls = []
    fake = types.ModuleType("datasets")

    def load_dataset(name, split):
        calls.append((name, split))
        return [SFT, {"instruction": b"bytes", "output": "y"}, {"instruction": "z"}]

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    recs, rep = read_records("hf:org/set:validation", on_error="skip")
    assert calls == [("org/set", "validation")]
    assert [r.instruction for r in recs] == ["Say hi.", "bytes"] and recs[0].source == "hf:org/set:validation[0]"
    assert rep.skipped == {"missing_field": 1} and "hf:org/set:validation[2]" in rep.summary()


def test_skip_report_merge_and_summary():
    a, b = SkipReport(), SkipReport()
    a.skip("too_long", "f:1: long")
    b.skip("too_long", "f:9: long")
    b.note("prompt_truncated_left", "f:3: cut")
    a.merge(b)
    assert a.num_skipped == 2 and a.changed["prompt_truncated_left"] == 1
    assert "2 x too_long" in a.summary() and "f:9: long" in a.summary()


def test_reads_the_shared_demo_set(shared_dir):
    recs, rep = read_records(str(shared_dir / "data/alpaca/alpaca_gpt4_demo_999.json"))
    assert len(recs) == 999 and rep.num_skipped == 0
    assert recs[0].instruction == "Describe a process of making crepes." and recs[0].output.startswith("Making crepes")


@pytest.mark.slow
def test_identical_candidates_are_ties_and_counted(tmp_path):
    """The same text with different scores (an API's log-probs of one text vary; a judge may rank copies apart)
    is one answer: tied at the mean of its scores, no pair between copies, in every loss form; counted."""
    import jax.numpy as jnp
    import numpy as np

    from tuna_jax.losses import RANKING_FORMS, pair_accuracy, ranking_loss

    rows = [{"instruction": "q1", "candidates": ["A cat.", "a  CAT.", "A dog."], "scores": [3.0, 1.0, 2.0]},
            {"instruction": "q2", "candidates": ["Same.", "same.", " SAME. "], "scores": [0.5, -1.0, 2.0]},
            {"instruction": "q3", "candidates": ["x", "y"], "scores": [1.0, 0.0]}]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs, report = read_records(str(path), kind="ranking")
    assert recs[0].scores == [2.0, 2.0, 2.0]  # the copies' mean ties them (and, here, the third candidate)
    assert recs[1].scores == [0.5, 0.5, 0.5] and recs[2].scores == [1.0, 0.0]
    assert report.changed["identical_candidates"] == 1 + 3 and report.changed["all_candidates_identical"] == 1
    assert "r.jsonl:2: every candidate is the same text" in report.summary()
    # Row q2 (all identical, distinct scores in the file): the same tokens give the same v; no counted pair and
    # no ranking gradient in any form; zero loss in all but InfoNCA, whose uniform target over n tied candidates
    # leaves the constant log n.
    import jax

    target = jnp.asarray([recs[1].scores])
    v = jnp.full((1, 3), -0.7)
    mask = jnp.ones((1, 3), bool)
    for form in RANKING_FORMS:
        value, grad = jax.value_and_grad(lambda v: ranking_loss(v, target, mask, 0.1, form)[0])(v)
        assert float(value) == pytest.approx(np.log(3.0) if form == "infonca" else 0.0, abs=1e-6), form
        assert np.abs(np.asarray(grad)).max() <= 1e-7, form
    assert np.asarray(pair_accuracy(v, target, mask)[1]).tolist() == [0.0]


def test_rescore_beta_ranks_the_teachers_records_again(tmp_path):
    """The beta study (Table 5): s = logprobs / num_tokens ** beta from the teacher's columns, whatever the file's
    scores say; a record without those columns is an error naming its line."""
    row = {"instruction": "i", "output": "o", "candidates": ["short", "long"], "scores": [0.0, 0.0],
           "logprobs": [-10.0, -12.0], "num_tokens": [10, 20]}
    path = tmp_path / "teacher.jsonl"
    path.write_text(json.dumps(row) + "\n")
    for beta, want in ((0.0, [-10.0, -12.0]), (1.0, [-1.0, -0.6]), (1.3, [-10.0 / 10 ** 1.3, -12.0 / 20 ** 1.3])):
        (rec,), _ = read_records(str(path), kind="ranking", rescore_beta=beta)
        assert rec.scores == pytest.approx(want)
    (rec,), _ = read_records(str(path), kind="ranking")
    assert rec.scores == [0.0, 0.0]  # without it, the file's scores
    path.write_text(json.dumps({k: v for k, v in row.items() if k != "num_tokens"}) + "\n")
    with pytest.raises(DataError, match=r"teacher\.jsonl:1: field 'num_tokens': missing field"):
        read_records(str(path), kind="ranking", rescore_beta=1.0)

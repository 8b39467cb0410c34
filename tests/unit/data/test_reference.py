"""Reference-model scores stored with ranking data: the native record's ref_logprob_sum /
ref_num_tokens fields, and `tuna-jax reference-scores` joining `tuna-jax score` output to a ranking
file (alignment checks, errors naming file:line and field), on real files."""
import json
import pathlib

import pytest

from tuna_jax.cli import main as cli
from tuna_jax.data.records import DataError, read_records, record_to_dict

RANKED = [
    {"id": "a", "instruction": "Name a colour.", "candidates": ["Red.", "Blue is one.", "Green"], "ranks": [2, 1, 3],
     "source_model": "kept as is"},
    {"instruction": "Add 2 and 3.", "input": "", "candidates": ["5", "6"], "scores": [1.0, 0.0]},
    {"id": 7, "instruction": "Say hi.", "candidates": ["Hi", "Hello"], "scores": [0.5, 0.5],
     "ref_logprob_sum": [-1.0, -2.0], "ref_num_tokens": [1, 1]},
]
SCORES = [
    {"index": 0, "id": "a", "candidates": [], "logprob_sum": [-3.5, -7.25, -2.0], "num_tokens": [3, 5, 2]},
    {"index": 1, "candidates": [], "logprob_sum": [-1.5, -4.0], "num_tokens": [2, 2]},
    {"index": 2, "id": 7, "candidates": [], "logprob_sum": [-0.5, -9.0], "num_tokens": [2, 4]},
]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_attach_writes_reference_fields_that_records_read_back(tmp_path):
    ranked, scores = write_jsonl(tmp_path / "r.jsonl", RANKED), write_jsonl(tmp_path / "s.jsonl", SCORES)
    out = tmp_path / "out.jsonl"
    assert cli(["reference-scores", ranked, scores, str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows[0]["source_model"] == "kept as is" and rows[0]["ranks"] == [2, 1, 3]  # the row is kept
    recs, _ = read_records(str(out), "ranking")
    assert [r.ref_logprob_sum for r in recs] == [s["logprob_sum"] for s in SCORES]
    assert [r.ref_num_tokens for r in recs] == [s["num_tokens"] for s in SCORES]
    assert recs[2].ref_logprob_sum == [-0.5, -9.0]  # the old reference scores were replaced
    assert record_to_dict(recs[0])["ref_num_tokens"] == [3, 5, 2]  # and survive a native rewrite


def test_cli_reports_replaced_scores(tmp_path, capsys):
    ranked, scores = write_jsonl(tmp_path / "r.jsonl", RANKED), write_jsonl(tmp_path / "s.jsonl", SCORES)
    assert cli(["reference-scores", ranked, scores, ranked]) == 0  # in place
    printed = capsys.readouterr().out
    assert "wrote 3 ranking records" in printed and "1 had reference scores already: replaced" in printed
    assert read_records(ranked, "ranking")[0][1].ref_num_tokens == [2, 2]


def _with(rows, i, **change):
    rows = [dict(r) for r in rows]
    rows[i].update(change)
    return [{k: v for k, v in r.items() if v is not None} for r in rows]


@pytest.mark.parametrize("ranked,scores,message", [
    (RANKED, SCORES[:2], r"s.jsonl: 2 score lines for the 3 ranking records of .*r.jsonl"),
    (RANKED, [SCORES[1], SCORES[0], SCORES[2]], r"s.jsonl:1: field 'index': 1, expected 0"),
    (RANKED, _with(SCORES, 0, id="b"), r"s.jsonl:1: field 'id': 'b' but the ranking record at .*r.jsonl:1 has id 'a'"),
    (RANKED, _with(SCORES, 1, id="x"), r"s.jsonl:2: field 'id': 'x' but .* has id None"),
    (RANKED, _with(SCORES, 0, logprob_sum=[-1.0, -2.0]), r"s.jsonl:1: field 'logprob_sum': has 2 values for 3"),
    (RANKED, _with(SCORES, 1, num_tokens=[2, 0]), r"s.jsonl:2: field 'num_tokens\[1\]': token count 0 <= 0"),
    (RANKED, _with(SCORES, 1, num_tokens=None), r"s.jsonl:2: field 'num_tokens': missing field"),
    (RANKED, [json.dumps(SCORES[0]).replace("-7.25", "NaN")] + SCORES[1:],
     r"s.jsonl:1: field 'logprob_sum\[1\]': expected a finite number"),
    (_with(RANKED, 1, prompt="Q: add 2 and 3\nA:"), SCORES, r"r.jsonl:2: field 'prompt': `tuna-jax score` scores"),
    ([{"instruction": "x", "id": "a", "output": ["a", "b", "c"], "score": [1, 2, 3]}] + RANKED[1:], SCORES,
     r"r.jsonl:1: field 'candidates': reference scores attach to native ranking rows"),
])
def test_misaligned_or_bad_files_are_refused(tmp_path, capsys, ranked, scores, message):
    import re

    r, s = write_jsonl(tmp_path / "r.jsonl", ranked), write_jsonl(tmp_path / "s.jsonl", scores)
    assert cli(["reference-scores", r, s, str(tmp_path / "out.jsonl")]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "out.jsonl.partial").exists()


@pytest.mark.parametrize("change,message", [
    ({"ref_logprob_sum": [-1.0, -2.0]}, "r.jsonl:1: field 'ref_num_tokens': missing field (ref_logprob_sum is given"),
    ({"ref_num_tokens": [1, 2]}, "r.jsonl:1: field 'ref_logprob_sum': missing field (ref_num_tokens is given"),
    ({"ref_logprob_sum": [-1.0], "ref_num_tokens": [1, 2]}, "field 'ref_logprob_sum': has 1 values for 2 candidates"),
    ({"ref_logprob_sum": [-1.0, "x"], "ref_num_tokens": [1, 2]}, "field 'ref_logprob_sum[1]': expected a finite"),
    ({"ref_logprob_sum": [-1.0, -2.0], "ref_num_tokens": [1, -2]}, "field 'ref_num_tokens[1]': token count -2 <= 0"),
    ({"ref_logprob_sum": [-1.0, -2.0], "ref_num_tokens": [1, 2.5]}, "field 'ref_num_tokens[1]': expected int"),
])
def test_native_reference_fields_are_validated(tmp_path, change, message):
    row = {"instruction": "i", "candidates": ["a", "b"], "scores": [1, 0], **change}
    path = write_jsonl(tmp_path / "r.jsonl", [row])
    with pytest.raises(DataError) as e:
        read_records(path, "ranking")
    assert message in str(e.value)


def test_score_then_attach_on_the_shipped_model(tmp_path):
    """The real `tuna-jax score` output for a ranking file attaches to it."""

    from tuna_jax.assets.llama2c import convert_llama2c_to_hf

    assets = pathlib.Path(__file__).resolve().parents[3] / "tuna_jax" / "assets" / "stories260K"
    hf = convert_llama2c_to_hf(assets / "stories260K.bin", assets / "tok512.bin", tmp_path / "hf")
    ranked = write_jsonl(tmp_path / "r.jsonl", [{k: v for k, v in r.items() if not k.startswith("ref_")}
                                                for r in RANKED])
    assert cli(["score", str(hf), ranked, str(tmp_path / "s.jsonl")]) == 0
    assert cli(["reference-scores", ranked, str(tmp_path / "s.jsonl"), str(tmp_path / "out.jsonl")]) == 0
    scored = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    recs, _ = read_records(str(tmp_path / "out.jsonl"), "ranking")
    assert [r.ref_logprob_sum for r in recs] == [s["logprob_sum"] for s in scored]
    assert [r.ref_num_tokens for r in recs] == [s["num_tokens"] for s in scored]
    assert all(n > 1 and lp < 0 for r in recs for n, lp in zip(r.ref_num_tokens, r.ref_logprob_sum))

"""The paper's data tables: response lengths by rank (Table 4) against a count by hand, and API costs (Table 6) of a
request store written by the real store, against what was written; both through `tuna-jax eval rankings|costs`."""
from __future__ import annotations

import json

import pytest

from tuna_jax.assets import stories260k_hf_dir
from tuna_jax.cli import main as cli
from tuna_jax.data.templates import load_tokenizer
from tuna_jax.eval.tables import Source, api_costs, ranking_lengths, to_markdown
from tuna_jax.io.errors import InputError
from tuna_jax.llm_api.store import Prices, Store

RECORDS = [
    # best first by score: "b b" (3), "a" (1); a third rank only here
    {"instruction": "i1", "candidates": ["a", "b b", "c c c"], "scores": [1.0, 3.0, 0.5]},
    # tied scores keep file order: "d d d d" then "e"
    {"instruction": "i2", "candidates": ["d d d d", "e"], "scores": [2.0, 2.0]},
    # ranks instead of scores (1 is best)
    {"instruction": "i3", "candidates": ["g g g", "f f"], "ranks": [2, 1]},
]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_ranking_lengths_by_rank_in_words_and_tokens(tmp_path):
    path = _write(tmp_path / "r.jsonl", RECORDS)
    table = ranking_lengths([Source("teacher", path)])
    (row,) = table["rows"]
    assert row["records"] == 3 and row["n"] == [3, 3, 1]
    assert row["words"] == [(2 + 4 + 2) / 3, (1 + 1 + 3) / 3, 3.0]
    tok = load_tokenizer(str(stories260k_hf_dir()))
    by_rank = [["b b", "d d d d", "f f"], ["a", "e", "g g g"], ["c c c"]]
    tokens = ranking_lengths([Source("teacher", path)], tok)["rows"][0]["tokens"]
    assert tokens == [sum(len(tok.encode(t)) for t in texts) / len(texts) for texts in by_rank]
    md = to_markdown(table)
    assert "| teacher | 3 | 2.7 (n=3) | 1.7 (n=3) | 3.0 (n=1) |" in md


def test_ranking_file_errors_name_file_and_line(tmp_path):
    path = _write(tmp_path / "r.jsonl", [RECORDS[0], {"instruction": "x", "candidates": ["a"], "scores": [1, 2]}])
    with pytest.raises(InputError, match=r"r\.jsonl:2: field 'scores': has 2 values for 1 candidates"):
        ranking_lengths([Source("x", path)])


def test_api_costs_of_a_real_store_and_the_command(tmp_path, capsys):
    path = str(tmp_path / "teacher.store.jsonl")
    with Store(path, prices=Prices(2.0, 8.0)) as store:
        for k, (pt, ct) in enumerate([(100, 20), (50, 10)]):
            store.put_ok(f"k{k}", {"choices": [], "usage": {"prompt_tokens": pt, "completion_tokens": ct}},
                         meta={}, attempts=1)
        store.put_invalid("k2", error="no rank", meta={}, attempts=1,
                          response={"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}})
        store.put_error("k3", error="timeout", error_kind="timeout", http_status=None, meta={}, attempts=3)
    (row,) = api_costs([Source("teacher", path)], price_input=1.0, price_output=1.0)["rows"]
    # HTTP requests as the store counts them (its budget's): 3 answered lines + 1 failed after 3 attempts
    assert (row["requests"], row["ok"], row["invalid"], row["error"]) == (6, 2, 1, 1)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (157, 33)
    assert row["usd_recorded"] == pytest.approx((157 * 2.0 + 33 * 8.0) / 1e6)
    assert row["usd_at_prices"] == pytest.approx((157 + 33) / 1e6)
    out = tmp_path / "t6.json"
    assert cli(["eval", "costs", f"teacher={path}", "--out", str(out)]) == 0
    assert "| teacher | 6 | 2 / 1 / 1 | 157 | 33 | 0.0006 |" in capsys.readouterr().err
    assert json.loads(out.read_text())["rows"][0]["requests"] == 6
    with pytest.raises(InputError, match="no such request store"):
        api_costs([Source("x", str(tmp_path / "absent.jsonl"))])

"""The evaluation report (tuna_jax/eval/report.py): the JSON table, its Markdown rendering, and the chart."""
from __future__ import annotations

import json

import pytest

from tuna_jax.eval import report as Rp

ROWS = [
    {"model": "alpaca-7b", "path": "ckpt/a", "superni_0shot": 31.25, "superni_2shot": 36.0, "lmentry": 22.5,
     "vicuna": None, "alpaca_eval": {"win_rate": 40.0, "win_rate_stderr": 1.5, "win": 1, "lose": 2, "tie": 1,
                                     "failed": 0, "missing": 0, "baseline": "text_davinci_003", "judge": "gpt-4"}},
    {"model": "tuna-7b", "superni_0shot": 33.5, "superni_2shot": None, "lmentry": 23.456,
     "vicuna": {"win": 40, "lose": 20, "tie": 18, "failed": 2, "missing": 0, "baseline": "alpaca-7b",
                "judge": "gpt-4", "orders": "one"},
     "alpaca_eval": None, "details": {"lmentry": {"missing": 0}}},
]
COLS = ["superni_0shot", "superni_2shot", "lmentry", "vicuna", "alpaca_eval"]


def test_table_and_markdown():
    t = Rp.make_table("stages", ROWS, COLS, notes=["Greedy decoding."], settings={"x": 1})
    assert [r["model"] for r in t["rows"]] == ["alpaca-7b", "tuna-7b"]
    assert t["rows"][1]["path"] is None and t["rows"][1]["details"] == {"lmentry": {"missing": 0}}
    md = Rp.to_markdown(t)
    lines = md.splitlines()
    assert lines[0] == "# stages"
    assert lines[2] == ("| Model | Super-NI 0-shot | Super-NI 2-shot | LMentry | Vicuna QA win / lose / tie % | "
                        "AlpacaEval win % |")
    assert lines[4] == "| alpaca-7b | 31.25 | 36.00 | 22.50 | - | 40.00 ± 1.50 |"
    # percent of the 78 judged questions (the paper's way), the counts beside them, failures apart
    assert lines[5] == "| tuna-7b | 33.50 | - | 23.46 | 51.3 / 25.6 / 23.1 (40 / 20 / 18) (2 failed) | - |"
    assert "- Greedy decoding." in md
    assert ("- Vicuna QA win / lose / tie %: against alpaca-7b, judged by gpt-4 in one order, the model as "
            "Assistant 1 (FastChat's default; the Tuna paper does not say which order it used).") in md
    assert ("- AlpacaEval win %: against text_davinci_003, judged by gpt-4 in both orders, a win or loss only when "
            "the orders agree, else a tie (ours, not the paper's).") in md
    json.dumps(t)  # JSON-serialisable as it is


def test_only_configured_columns_and_bad_input():
    t = Rp.make_table("one", [{"model": "m", "lmentry": 10.0}], ["lmentry"])
    assert Rp.to_markdown(t).splitlines()[2:5] == ["| Model | LMentry |", "|---|---:|", "| m | 10.00 |"]
    with pytest.raises(ValueError, match="unknown report columns"):
        Rp.make_table("x", [], ["bleu"])
    with pytest.raises(ValueError, match="needs a 'model'"):
        Rp.make_table("x", [{"lmentry": 1.0}], ["lmentry"])


def test_write_and_render_report(tmp_path):
    t = Rp.make_table("stages", ROWS, COLS)
    paths = Rp.write_report(t, tmp_path / "out", "stages")
    png = open(paths["png"], "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert json.loads(open(paths["json"]).read())["rows"][0]["superni_0shot"] == 31.25
    md = open(paths["markdown"]).read()
    # edit the JSON (a model renamed) and re-render the Markdown and the chart from it
    t2 = json.loads(open(paths["json"]).read())
    t2["rows"][0]["model"] = "Alpaca (SFT)"
    (tmp_path / "edited.json").write_text(json.dumps(t2))
    p2 = Rp.render_report(tmp_path / "edited.json")
    assert p2["markdown"] == str(tmp_path / "edited.md") and "| Alpaca (SFT) | 31.25 |" in open(p2["markdown"]).read()
    assert open(p2["markdown"]).read() == md.replace("| alpaca-7b |", "| Alpaca (SFT) |")
    assert open(p2["png"], "rb").read()[:4] == b"\x89PNG"
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a tuna-jax eval table"):
        Rp.render_report(tmp_path / "bad.json")


def test_chart_with_only_vicuna_or_nothing(tmp_path):
    t = Rp.make_table("v", [ROWS[1]], ["vicuna"])
    assert open(Rp.plot_table(t, tmp_path / "v.png"), "rb").read()[:4] == b"\x89PNG"
    t = Rp.make_table("none", [{"model": "m"}], ["lmentry"])
    assert open(Rp.plot_table(t, tmp_path / "n.png"), "rb").read()[:4] == b"\x89PNG"

"""The README's first command: `tuna-jax demo` runs every stage offline and exports HF weights."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.support.xla import xla_flags


def run_demo(out_dir):
    """The README's command, as a user runs it: a fresh process on one (real) device, not this
    test worker with its 8 emulated devices and the state earlier tests left in it."""
    env = dict(os.environ, XLA_FLAGS=xla_flags())  # one device; fast compiles (tests/support/xla.py)
    return subprocess.run([sys.executable, "-m", "tuna_jax.cli", "demo", "--fast", "--out", str(out_dir)],
                          env=env, capture_output=True, text=True, timeout=1200)


@pytest.mark.slow
def test_demo_runs_end_to_end_and_exports_loadable_hf_weights(tmp_path):
    out = tmp_path / "demo"
    proc = run_demo(out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| tuna | 1 |" in proc.stdout and "Hugging Face export" in proc.stdout
    report = json.loads((out / "evaluate" / "report.json").read_text())
    assert list(report["table"]) == ["base", "teacher", "alpaca", "alpaca-mul", "control-p", "tuna-p", "control",
                                     "control-c", "tuna"]
    for row in report["table"].values():
        assert 0.0 <= row["pair_accuracy"]["mean"] <= 1.0 and 0.0 <= row["rougeL"]["mean"] <= 100.0
    # every method next to its controls, with what they share; the evaluation checked against what training read
    assert [(c["method"], c["control"], c["same"], c["control_mle_only"]) for c in report["comparisons"]] == [
        ("tuna-p", "control-p", {"start": True, "steps": True, "data": True}, True),
        ("tuna-p", "alpaca-mul", {"start": False, "steps": False, "data": True}, True),
        ("tuna", "control-c", {"start": True, "steps": True, "data": True}, True),
        ("tuna", "control", {"start": False, "steps": True, "data": True}, True)]
    assert len(report["checked_disjoint_from"]) >= 5
    assert set(report["ranking_data"]) == {"teacher/ranked.jsonl", "judge@seed=0/ranked.jsonl"}
    md = (out / "evaluate" / "report.md").read_text()
    assert "one seed" in md and "n=16 held-out prompts" in md and "in this run" in md
    # The paper's shape: the Alpaca instructions come without answers; Alpaca's answer r is a teacher sample, and
    # it is the original response of both ranking files.
    def rows(path):
        return [json.loads(x) for x in (out / path).read_text().splitlines()]

    instructions, alpaca = rows("data/sft.jsonl"), rows("alpaca_data/sft.jsonl")
    assert all("output" not in r for r in instructions)
    assert [{k: r[k] for k in ("id", "instruction", "input")} for r in alpaca] == instructions
    assert all(r["output"] for r in alpaca)
    r_of = {r["id"]: r["output"] for r in alpaca}
    p_rows, c_rows = rows("teacher/ranked.jsonl"), rows("judge@seed=0/ranked.jsonl")
    assert p_rows and all(len(r["candidates"]) == len(r["scores"]) >= 2 for r in p_rows)
    assert all(r["scores"] == sorted(r["scores"], reverse=True) for r in p_rows + c_rows)
    assert all(r["output"] == r_of[r["id"]] for r in p_rows + c_rows) and len(c_rows) == 16
    # every stage left its params export behind
    for stage in ("teacher_sft", "alpaca", "tuna_p@seed=0", "control_p@seed=0", "alpaca_mul@seed=0", "tuna@seed=0",
                  "control@seed=0", "control_c@seed=0"):
        assert (out / stage / "final" / "params").is_dir()
        assert json.loads((out / stage / "manifest.json").read_text())["status"] == "finished"

    # The export is a real HF folder: transformers loads it and agrees with our model.
    torch = pytest.importorskip("torch")
    import jax.numpy as jnp
    from transformers import AutoTokenizer, LlamaForCausalLM

    from tuna_jax.model import load_model

    hf_dir = out / "export" / "hf"
    hf = LlamaForCausalLM.from_pretrained(str(hf_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    ids = tok("Once upon a time")["input_ids"]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits.numpy()
    ours = np.asarray(load_model(out / "tuna@seed=0" / "final")(jnp.asarray([ids])))
    assert np.abs(ours - ref).max() <= 1e-4

    # Rerunning continues: every stage is found done, nothing is retrained, the seconds spent stay.
    total = json.loads((out / "pipeline.json").read_text())["total_s"]
    again = run_demo(out)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "done already" in again.stderr and "0 of 16 stages ran" in again.stdout
    assert json.loads((out / "pipeline.json").read_text())["total_s"] == total

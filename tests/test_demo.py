"""The README's first command: `tuna-jax demo` runs every stage offline and exports HF weights."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest


def run_demo(out_dir):
    """The README's command, as a user runs it: a fresh process on one (real) device, not this
    test worker with its 8 emulated devices and the state earlier tests left in it."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, "-m", "tuna_jax.cli", "demo", "--fast", "--out", str(out_dir)],
                          env=env, capture_output=True, text=True, timeout=1200)


def test_demo_runs_end_to_end_and_exports_loadable_hf_weights(tmp_path):
    proc = run_demo(tmp_path / "demo")
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert "| tuna |" in out and "Hugging Face export" in out
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert list(report["models"]) == ["alpaca", "tuna-p", "tuna"]
    for m in report["models"].values():
        assert 0.0 <= m["pair_accuracy"] <= 1.0 and 0.0 <= m["rougeL"] <= 100.0
    # every stage left its data and its params export behind
    data = tmp_path / "demo" / "data"
    p_rows = [json.loads(x) for x in (data / "tuna_p_ranked.jsonl").read_text().splitlines()]
    assert p_rows and all(len(r["candidates"]) == len(r["scores"]) >= 2 for r in p_rows)
    assert all(r["scores"] == sorted(r["scores"], reverse=True) for r in p_rows)
    assert (data / "tuna_c_ranked.jsonl").stat().st_size > 0
    for stage in ("teacher-sft", "alpaca", "tuna-p", "tuna"):
        assert (tmp_path / "demo" / stage / "final" / "params").is_dir()

    # The export is a real HF folder: transformers loads it and agrees with our model.
    torch = pytest.importorskip("torch")
    import jax.numpy as jnp
    from transformers import AutoTokenizer, LlamaForCausalLM

    from tuna_jax.model import load_model

    hf_dir = tmp_path / "demo" / "tuna-hf"
    hf = LlamaForCausalLM.from_pretrained(str(hf_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    ids = tok("Once upon a time")["input_ids"]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits.numpy()
    ours = np.asarray(load_model(tmp_path / "demo" / "tuna" / "final")(jnp.asarray([ids])))
    assert np.abs(ours - ref).max() <= 1e-4

    # Rerunning continues: every stage is found done, nothing is retrained.
    again = run_demo(tmp_path / "demo")
    assert again.returncode == 0, again.stderr[-4000:]
    assert "done already" in again.stderr

"""SIGTERM (a preemption, ``kill``, ``docker stop``) stops each long-running command with status 143, in one
line, with its state saved, and the rerun finishes the work. Real processes, real signals. The teacher, the
judge (tests/unit/feedback/test_teacher.py, test_judge.py), generate (tests/unit/test_generate.py), train and
prm train (tests/unit/test_train.py, tests/unit/feedback/test_prm.py) have theirs beside their other tests;
here the pipeline, sample-diverse and eval run."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.support.train_utils import REPO
from tests.unit.pipeline.test_pipeline import KILL, KILL_SFT_STEPS, committed_steps, losses, pipeline_cmd
from tuna_jax.assets import stories260k_hf_dir

pytestmark = pytest.mark.slow


def _stop_when(proc, ready, timeout=300):
    """SIGTERM ``proc`` once ``ready()``; return its stderr."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    return proc.communicate(timeout=120)[1]


def test_pipeline_sigterm_in_a_train_stage(tmp_path):
    tok = stories260k_hf_dir(tmp_path.parent / "tuna-cache")
    path = tmp_path / "p.yaml"
    path.write_text(KILL.format(out=tmp_path / "out", repo=REPO, tok=tok))
    cmd, env = pipeline_cmd(path)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sft = tmp_path / "out" / "sft"
    err = _stop_when(proc, lambda: bool(committed_steps(sft)))
    assert proc.returncode == 143, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("tuna-jax pipeline: stopped by SIGTERM after step") and "checkpoint saved" in last
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr and len(losses(sft)) == KILL_SFT_STEPS


def test_sample_diverse_sigterm(tmp_path):
    model = stories260k_hf_dir(tmp_path / "cache")
    data = tmp_path / "instr.jsonl"
    data.write_text("".join(json.dumps({"id": str(i), "instruction": f"Tell a story about {i}."}) + "\n"
                            for i in range(24)))
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "tuna_jax.cli", "sample-diverse", str(model), str(data), str(out), "--n", "3",
           "--max-new-tokens", "16", "--batch-size", "4", "--items-per-call", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err = _stop_when(proc, lambda: out.exists() and out.read_text().count("\n") >= 2)
    assert proc.returncode == 143, err[-3000:]
    assert err.strip().splitlines()[-1] == ("tuna-jax sample-diverse: stopped by SIGTERM; rerun the same command "
                                            "to continue")
    kept = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    assert 2 <= len(kept) < 24
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == [str(i) for i in range(24)]


def test_eval_run_sigterm(tmp_path):
    import yaml

    from tests.unit.eval.test_run import ni_checkout

    ni = ni_checkout(tmp_path, [("task001_animals", "Keyword Tagging", "Name the animal", 40)])
    out = tmp_path / "eval"
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(yaml.safe_dump({"name": "t", "output_dir": str(out),
                                   "models": [{"name": "m", "path": str(stories260k_hf_dir(tmp_path / "cache"))}],
                                   "generation": {"max_new_tokens": 24, "batch_size": 4},
                                   "superni": {"tasks": str(ni), "shots": [0], "num_instances": 40}}))
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "tuna_jax.cli", "eval", "run", str(cfg), "--no-progress"]
    pred = out / "predictions" / "m" / "superni_0shot.jsonl"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err = _stop_when(proc, lambda: pred.exists() and pred.read_text().count("\n") >= 4)
    assert proc.returncode == 143, err[-3000:]
    assert err.strip().splitlines()[-1] == "tuna-jax eval: stopped by SIGTERM; rerun the same command to continue"
    assert 4 <= pred.read_text().count("\n") < 40
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len({json.loads(x)["id"] for x in pred.read_text().splitlines()}) == 40

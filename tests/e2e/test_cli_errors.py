"""Every input command turns bad input into one line naming file:line (and the field), before it loads a
model, sends a request or makes a folder; normal output carries no library noise. Real files, the real CLI."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from tuna_jax.cli import main as cli

REPO = str(pathlib.Path(__file__).resolve().parents[2])
NO_SERVER = ["--base-url", "http://127.0.0.1:9/v1", "--model", "m"]  # never contacted: input fails first


def one_error_line(capsys, rc):
    assert rc == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert len(lines[0]) <= 300, lines[0]  # a line a person reads; -v gives the whole text
    return lines[0]


def non_utf8(tmp_path, first: dict):
    p = tmp_path / "in.jsonl"
    p.write_bytes(json.dumps(first).encode() + b'\n{"instruction": "caf\xe9 au lait"}\n')
    return p


# ------------------------------------------------------------------------------------------ non-UTF-8 input
ALPACA = {"instruction": "Name a fruit.", "input": "", "output": "Apple."}
CANDS = {**ALPACA, "candidates": ["Apple.", "Pear."]}
PRED = {"id": "bigger_number/1", "prediction": "40"}


@pytest.mark.parametrize("command,row", [
    (lambda d, t: ["teacher", d, str(t / "o.jsonl"), *NO_SERVER], ALPACA),
    (lambda d, t: ["judge", d, str(t / "o.jsonl"), *NO_SERVER], CANDS),
    (lambda d, t: ["judge", d, str(t / "o.jsonl"), "--kind", "metric"], CANDS),
    (lambda d, t: ["score", str(t / "no-model"), d, str(t / "o.jsonl")], CANDS),
    (lambda d, t: ["generate", str(t / "no-model"), d, str(t / "o.jsonl")], ALPACA),
    (lambda d, t: ["sample-diverse", str(t / "no-model"), d, str(t / "o.jsonl")], ALPACA),
    (lambda d, t: ["eval", "lmentry", "--predictions", d, "--data", str(t)], PRED),
    (lambda d, t: ["eval", "superni", "--predictions", d, "--tasks", str(t)], {"id": "x", "prediction": "y"}),
    (lambda d, t: ["prm", "rerank", str(t / "no-prm"), d, str(t / "o.jsonl")], CANDS),
], ids=["teacher", "judge", "judge-metric", "score", "generate", "sample-diverse", "eval-lmentry", "eval-superni",
        "prm-rerank"])
def test_non_utf8_input_names_file_and_line(tmp_path, capsys, command, row):
    data = str(non_utf8(tmp_path, row))
    line = one_error_line(capsys, cli(command(data, tmp_path)))
    assert f"{data}:2: not UTF-8 text (byte 0xe9 at column 21)" in line
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "o.jsonl.store.jsonl").exists()


def test_train_data_not_utf8(tmp_path, capsys):
    from tests.support.train_utils import tiny_overrides

    overrides = [o for o in tiny_overrides(tmp_path, mode="sft") if not o.startswith("data.train=")]
    data = non_utf8(tmp_path, ALPACA)
    cfg = os.path.join(REPO, "configs", "tiny_sft.yaml")
    line = one_error_line(capsys, cli(["train", cfg, *overrides, f"data.train={data}"]))
    assert f"{data}:2: not UTF-8 text" in line


# ------------------------------------------------------------------------------------------ judge and score input
BAD_CANDIDATE_ROWS = [
    ({**CANDS, "instruction": 7}, "field 'instruction': expected str, got int"),
    ({**CANDS, "input": ["x"]}, "field 'input': expected str, got list"),
    ({**CANDS, "candidates": []}, "field 'candidates': empty list"),
    ({**CANDS, "candidates": ["ok", 3]}, "field 'candidates[1]': expected str, got int"),
    ({**CANDS, "id": {"a": 1}}, "field 'id': expected str or int, got dict"),
    ({**CANDS, "num_tokens": [3]}, "field 'num_tokens': has 1 values for 2 candidates"),
    ({**CANDS, "logprobs": [-1.0, "x"]}, "field 'logprobs[1]': expected a finite number"),
    ({**CANDS, "finish_reasons": ["stop", 1]}, "field 'finish_reasons[1]': expected str, got int"),
]


@pytest.mark.parametrize("row,message", BAD_CANDIDATE_ROWS)
def test_judge_checks_its_input_like_training(tmp_path, capsys, row, message):
    p = tmp_path / "in.jsonl"
    p.write_text(json.dumps(CANDS) + "\n" + json.dumps(row) + "\n")
    for kind in (["--kind", "metric"], NO_SERVER):
        line = one_error_line(capsys, cli(["judge", str(p), str(tmp_path / "o.jsonl"), *kind]))
        assert f"{p}:2: {message}" in line


def test_nan_in_input_is_refused_everywhere(tmp_path, capsys):
    p = tmp_path / "in.jsonl"
    p.write_text(json.dumps(CANDS) + "\n" + '{"instruction": "x", "candidates": ["a", "b"], "logprobs": [NaN, -1]}\n')
    line = one_error_line(capsys, cli(["judge", str(p), str(tmp_path / "o.jsonl"), "--kind", "metric"]))
    assert f"{p}:2: field 'logprobs[0]': expected a finite number, got nan" in line
    line = one_error_line(capsys, cli(["score", str(tmp_path / "no-model"), str(p), str(tmp_path / "o.jsonl")]))
    assert f"{p}:2: NaN is not a JSON number" in line


@pytest.mark.parametrize("row,message", [
    ({"instruction": 7, "candidates": ["a"]}, "field 'instruction': expected a string, got int"),
    ({"instruction": "x", "input": ["y"], "candidates": ["a"]}, "field 'input': expected a string, got list"),
    ({"instruction": "x", "candidates": ["a", "  "]}, "field 'candidates[1]': empty response"),
    ({"instruction": "x", "candidates": ["a", None]}, "field 'candidates[1]': expected a string, got NoneType"),
    ({"id": [1], "instruction": "x", "candidates": ["a"]}, "field 'id': expected a string or integer, got list"),
    ({"prompt_ids": [1], "candidate_ids": [[]]}, "field 'candidate_ids[0]': empty candidate"),
    ({"prompt_ids": [1, True], "candidate_ids": [[2]]}, "field 'prompt_ids': must be a list of integer token ids"),
])
def test_score_checks_every_line_before_loading_the_model(tmp_path, capsys, row, message):
    p = tmp_path / "in.jsonl"
    p.write_text(json.dumps(CANDS) + "\n" + json.dumps(row) + "\n")
    line = one_error_line(capsys, cli(["score", str(tmp_path / "no-model"), str(p), str(tmp_path / "o.jsonl")]))
    assert f"{p}:2: {message}" in line  # the data error, although the model does not even exist


def test_score_never_writes_nan(tmp_path, capsys):
    """A model whose log-likelihoods overflow (an inf weight) gets null in the output and a warning, and the
    file stays valid JSON for any reader."""
    torch = pytest.importorskip("torch")
    from tests.support.hf_utils import save_hf, tiny_hf_model

    model = tiny_hf_model(layers=1)
    with torch.no_grad():
        model.lm_head.weight[5, 0] = float("inf")
    src = save_hf(model, tmp_path / "hf")
    p = tmp_path / "in.jsonl"
    p.write_text('{"prompt_ids": [1, 2], "candidate_ids": [[3, 4], [5]]}\n')
    assert cli(["score", str(src), str(p), str(tmp_path / "o.jsonl")]) == 0
    assert "not finite" in capsys.readouterr().err

    def refuse(name):
        raise AssertionError(f"{name} in the output")

    rec = json.loads((tmp_path / "o.jsonl").read_text(), parse_constant=refuse)
    assert None in rec["logprob_sum"] and rec["candidates"][0]["logprob_sum"] == rec["logprob_sum"][0]


# ------------------------------------------------------------------------------------------ stores, files, OS errors
def test_corrupt_store_line_is_one_line(tmp_path, capsys):
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps(ALPACA) + "\n")
    store = tmp_path / "s.jsonl"
    store.write_text('{"key": "a", "status": "ok"}\n{"key": "b", "sta\n{"key": "c", "status": "ok"}\n')
    line = one_error_line(capsys, cli(["teacher", str(data), str(tmp_path / "o.jsonl"), "--store", str(store),
                                       *NO_SERVER]))
    assert f"{store}:2: unreadable store line" in line


def test_os_errors_are_one_line(tmp_path, capsys):
    line = one_error_line(capsys, cli(["eval", "lmentry", "--predictions", str(tmp_path / "nope.jsonl"), "--data",
                                       str(tmp_path)]))
    assert f"{tmp_path / 'nope.jsonl'}: predictions file not found" in line
    pred = tmp_path / "p.jsonl"
    pred.write_text(json.dumps(PRED) + "\n")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    lm = tmp_path / "lm"
    lm.mkdir()
    (lm / "bigger_number.json").write_text(json.dumps({
        "settings": {"input_templates": ["Q: {n1} or {n2}?"], "num_examples_per_template": 1},
        "examples": {"1": {"input": "Q: 12 or 40?", "metadata": {"n1": 12, "n2": 40, "answer": 40, "distractor": 12,
                                                                  "answer_index": 1, "template_id": 0}}}}))
    assert cli(["eval", "lmentry", "--predictions", str(pred), "--data", str(lm), "--allow-partial",
                "--out", str(blocker / "out.json")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"tuna-jax eval: error: {blocker}: File exists" and "Traceback" not in err


# ------------------------------------------------------------------------------------------ start-up
def test_a_bad_eval_config_leaves_no_folder(tmp_path, capsys):
    cfg = tmp_path / "e.yaml"
    out = tmp_path / "never"
    cfg.write_text(f"output_dir: {out}\nmodels:\n  - {{name: m, path: {tmp_path}}}\n"
                   f"lmentry: {{data: {tmp_path / 'no-such-lmentry'}}}\n")
    line = one_error_line(capsys, cli(["eval", "run", str(cfg)]))
    assert "no-such-lmentry: not found" in line and not out.exists()


def _run(code, env_drop=()):
    env = {k: v for k, v in os.environ.items() if k not in env_drop}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.slow
def test_library_noise_stays_out_of_normal_output(tmp_path):
    """With no JAX_PLATFORMS set, jax logs 'Unable to initialize backend tpu' at INFO; transformers prints
    an advisory when PyTorch is missing. Neither reaches a user of tuna-jax."""
    from tuna_jax.assets import stories260k_hf_dir

    hf = stories260k_hf_dir(tmp_path / "cache")
    r = _run(f"import sys; from tuna_jax.cli import main; sys.exit(main(['convert', 'hf-to-orbax', {str(hf)!r}, "
             f"{str(tmp_path / 'ck')!r}]))", env_drop=("JAX_PLATFORMS", "XLA_FLAGS"))
    assert r.returncode == 0, r.stderr
    assert "Unable to initialize backend" not in r.stderr and "INFO" not in r.stderr and "absl" not in r.stderr
    advice = _run("from tuna_jax.io.cli import quiet_libraries; quiet_libraries()\n"
                  "from transformers.utils import logging\n"
                  "logging.get_logger('transformers').warning_advice('PyTorch was not found.')")
    assert advice.returncode == 0 and "PyTorch was not found" not in advice.stderr


def test_judge_drops_empty_candidates_with_a_count(tmp_path, capsys):
    """sample-diverse keeps the empty responses a model gives; the judge does not show them, drops them
    from the record, counts and lists them -- training would refuse a record holding one."""
    p = tmp_path / "in.jsonl"
    p.write_text(json.dumps({**CANDS, "candidates": ["Apple.", "  ", "Pear."], "num_tokens": [2, 0, 2]}) + "\n")
    out = tmp_path / "o.jsonl"
    assert cli(["judge", str(p), str(out), "--kind", "metric", "--no-progress"]) == 0
    assert "empty_candidates=1" in capsys.readouterr().err
    rec = json.loads(out.read_text())
    assert rec["candidates"] == ["Apple.", "Pear."] and rec["judge"]["dropped"] == [1] and rec["num_tokens"] == [2, 2]


def test_long_errors_are_cut_and_stops_keep_their_status(capsys):
    """A failure inside jit carries the model's whole graph definition (about 7,700 characters): the line is cut
    to 300 and says -v shows the rest. A training stop is its one line and its status (SIGTERM: 143)."""
    import signal

    from tuna_jax.io.cli import run_command
    from tuna_jax.train import Interrupted, TrainingDiverged

    def jit_failure(_):
        raise ValueError("GraphDef(nodes=[" + "NodeDef(type=Linear, ...), " * 300 + "])")

    line = one_error_line(capsys, run_command("tuna-jax score", jit_failure, None))
    assert line.startswith("tuna-jax score: error: GraphDef(nodes=[") and "more characters; -v shows them" in line

    def stopped(_):
        raise Interrupted(signal.SIGTERM, 19)

    assert run_command("tuna-jax prm train", stopped, None) == 143
    err = capsys.readouterr().err.strip()
    assert err == ("tuna-jax prm train: stopped by SIGTERM after step 19; checkpoint saved; rerun the same command "
                   "(train: with --resume) to continue")

    def diverged(_):
        raise TrainingDiverged("step 3: loss=nan")

    assert run_command("tuna-jax train", diverged, None) == 3

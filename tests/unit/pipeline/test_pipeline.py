"""`tuna-jax pipeline`: the paper's data flow in the shipped pipeline files, one-line errors, and the
engine's skip / resume / rerun-exactly-the-dependents rules on real stages and files."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.support.train_utils import REPO, write_jsonl
from tests.support.xla import xla_flags
from tuna_jax.config import ConfigError
from tuna_jax.pipeline.engine import run_pipeline
from tuna_jax.pipeline.manifest import read_manifest
from tuna_jax.pipeline.spec import load_plan

PIPELINES = REPO / "configs" / "pipelines"


def rows(n, prefix="i"):
    return [{"instruction": f"{prefix}{k}", "input": "", "output": f"o{k}", "candidates": [f"a{k}", f"b{k}"],
             "scores": [1.0, 0.0]} for k in range(n)]


def _producer(plan, path):
    return plan.instances[plan.produced[path][0]]


def test_paper_pipeline_data_flow(tmp_path):
    plan = load_plan(str(PIPELINES / "paper.yaml"), [f"output_dir={tmp_path}"])
    p = plan.instances
    # The teacher ranks all 52K; GPT-4 ranks the first 13K of Alpaca's samples and of Tuna_p's samples.
    assert p["teacher"].select is None and p["teacher"].params.input == "data/alpaca_data.json"
    for samples, model in (("alpaca_samples", "alpaca"), ("tuna_p_samples", "tuna_p")):
        assert p[samples].select == "first:13000" and _producer(plan, p[samples].params.model).id == model
    # Tuna trains on rankings of Tuna_p's own samples, from Tuna_p; Tuna_c on Alpaca's, from Alpaca.
    tuna, tuna_c = p["tuna"].params, p["tuna_c"].params
    judge = _producer(plan, tuna.data.train)
    assert judge.kind.name == "judge" and _producer(plan, judge.params.input).id == "tuna_p_samples"
    assert _producer(plan, tuna.model.path).id == "tuna_p" and tuna.optim.lr == 1e-6
    assert _producer(plan, _producer(plan, tuna_c.data.train).params.input).id == "alpaca_samples"
    assert tuna_c.data.train != tuna.data.train
    # mix-Tuna-52K: 13K contextual + the last 39K probabilistic; mix-Tuna-104K adds the PRM's 39K, lr 5e-6.
    mix52 = p["mix_tuna_52k"].params
    assert mix52.data.train[0] == tuna_c.data.train
    assert mix52.data.train[1]["select"] == "last:39000"
    assert _producer(plan, mix52.data.train[1]["path"]).id == "teacher"
    mix104 = p["mix_tuna_104k"].params
    assert [_producer(plan, s if isinstance(s, str) else s["path"]).id for s in mix104.data.train] == \
        ["alpaca_ranked", "prm_3b_rest", "teacher"] and mix104.optim.lr == 5e-6
    # The PRMs learn from the 13K judge rankings: the paper's on StableLM-3B (GPT-NeoX), App. D's on Alpaca-7B;
    # each ranks Alpaca's samples of the first 13K and of the last 39K.
    for prm, backbone in (("prm_3b", "stablelm"), ("prm_7b", "alpaca")):
        params = p[prm].params
        assert params.train.mode == "prm" and params.data.eval_fraction == 0.05
        assert _producer(plan, params.data.train).id == "alpaca_ranked"
        assert _producer(plan, params.model.path).id == backbone
        for part, samples in (("first", "alpaca_samples"), ("rest", "alpaca_samples_rest")):
            assert _producer(plan, p[f"{prm}_{part}"].params.input).id == samples
            assert _producer(plan, p[f"{prm}_{part}"].params.prm).id == prm
    assert p["prm_3b"].params.model.hf_config["model_type"] == "gpt_neox" and p["stablelm"].kind.name == "convert"
    assert p["alpaca_samples_rest"].select == "last:39000"
    # Table 1's Tuna_c (PRM) is PRM-3B-52K (all 52K ranked by the 3B PRM); Table 8's 39K rows add the judge's 13K.
    for name, parts in (("tuna_c_prm", ["prm_3b_first", "prm_3b_rest"]),
                        ("tuna_c_prm_3b_39k", ["alpaca_ranked", "prm_3b_rest"]),
                        ("tuna_c_prm_7b_39k", ["alpaca_ranked", "prm_7b_rest"]),
                        ("tuna_c_prm_7b_52k", ["prm_7b_first", "prm_7b_rest"])):
        assert [_producer(plan, s).id for s in p[name].params.data.train] == parts, name
    for name in ("tuna_p", "tuna_c", "mix_tuna_52k", "tuna_c_prm", "tuna_c_prm_7b_52k"):
        assert p[name].params.optim.lr == 1e-5 and _producer(plan, p[name].params.model.path).id == "alpaca"
    for name in ("tuna_cp_13k", "tuna_cp_39k", "tuna_cp_52k"):
        assert p[name].params.optim.lr == 1e-6 and _producer(plan, p[name].params.model.path).id == "tuna_c"
    # Alpaca-Mul: the teacher's records (original + 4 responses), MLE only, Alpaca's recipe from LLaMA.
    mul = p["alpaca_mul"].params
    assert (mul.train.mode, mul.loss.rank_weight, mul.loss.mle_target) == ("ranking", 0.0, "every")
    assert _producer(plan, mul.data.train).id == "teacher" and _producer(plan, mul.model.path).id == "llama"
    assert (mul.optim.lr, mul.train.epochs) == (p["alpaca"].params.optim.lr, p["alpaca"].params.train.epochs)
    # Figure 2: lambda on Tuna_c; everything else is Tuna_c's.
    lambdas = {i: p[i].params for i in p if i.startswith("tuna_c_lambda@")}
    assert sorted(c.loss.mle_weight for c in lambdas.values()) == [0.0, 0.1, 5.0, 10.0]
    assert all(c.data.train == tuna_c.data.train and c.optim.lr == tuna_c.optim.lr for c in lambdas.values())
    figure = p["figure_2"].params
    assert [m.name for m in figure.models] == ["alpaca-7b", "lambda-0", "lambda-0.1", "lambda-1", "lambda-5",
                                               "lambda-10"]
    assert [m.name for m in p["table_8"].params.models][2:] == ["prm-3b-39k", "prm-7b-39k", "prm-3b-52k",
                                                                "prm-7b-52k"]
    # Table 5: Tuna_p per beta on the teacher's records scored again (1.3 is tuna_p); Tables 4 and 6 read the
    # teacher's and the judges' files.
    betas = {i: p[i].params for i in p if i.startswith("tuna_p_beta@")}
    assert sorted(c.data.rescore_beta for c in betas.values()) == [0.5, 1.0, 1.5, 2.0]
    assert all(c.data.train == p["tuna_p"].params.data.train for c in betas.values())
    assert [m.name for m in p["table_5"].params.models] == ["alpaca-7b", "beta-0.5", "beta-1.0", "beta-1.3",
                                                            "beta-1.5", "beta-2.0"]
    assert [_producer(plan, s.path).id for s in p["table_4"].params.sources] == ["teacher", "alpaca_ranked",
                                                                                "prm_3b_rest"]
    assert [_producer(plan, s.path).id for s in p["table_6"].params.sources] == ["teacher", "alpaca_ranked",
                                                                                "tuna_p_ranked"]
    # A stage's generation can go to a serving engine started outside the pipeline: the stage names its URL.
    served = load_plan(str(PIPELINES / "paper.yaml"), [f"output_dir={tmp_path}",
                                                       "stages.alpaca_samples.base_url=http://127.0.0.1:8000/v1",
                                                       "stages.alpaca_samples.n_per_request=1"])
    got = served.instances["alpaca_samples"].params
    assert (got.base_url, got.n_per_request, got.served_model) == ("http://127.0.0.1:8000/v1", 1, None)
    # Each variant's file runs just what its model needs.
    variant = load_plan(str(PIPELINES / "tuna_cp_39k.yaml"))
    assert variant.until == ["tuna_cp_39k_hf"]


# ---- one-line errors -------------------------------------------------------------------------------------

def write_pipeline(path, text):
    path.write_text(text)
    return str(path)


BASE = """\
name: t
output_dir: {out}
inputs: {{extra: {extra}}}
stages:
  data: {{kind: synthetic, sft: 16, teacher_sft: 8, eval: 4, ranking: 4}}
  first: {{kind: mix, parts: [{{path: "${{data.sft}}", select: "first:8"}}]}}
  extra: {{kind: mix, parts: [{{path: "${{inputs.extra}}"}}]}}
  both: {{kind: mix, parts: [{{path: "${{first.data}}"}}, {{path: "${{extra.data}}"}}]}}
  tail: {{kind: mix, parts: [{{path: "${{first.data}}", select: "last:4"}}]}}
"""


@pytest.mark.parametrize("change, message", [
    (("kind: mix, parts: [{path: \"${first.data}\", select: \"last:4\"}]", "kind: mixx, parts: []"),
     r"p.yaml:9: stages.tail.kind='mixx': unknown stage kind \(did you mean mix\?\)"),
    (("select: \"last:4\"}]}", "selct: \"last:4\"}]}"), r"p.yaml:9: unknown config key stages.tail.parts\[0\].selct"),
    (("${first.data}\", select: \"last:4\"", "${frist.data}\", select: \"last:4\""),
     r"p.yaml:9: stages.tail.parts\[0\].path: \$\{frist.data\}: no stage 'frist' \(did you mean first\?\)"),
    (("[{path: \"${data.sft}\", select: \"first:8\"}]", "[{path: \"${tail.data}\"}]"),
     r"p.yaml:6: stages first -> tail -> first depend on each other in a cycle"),
    (("${first.data}\", select: \"last:4\"", "${first.model}\", select: \"last:4\""),
     r"p.yaml:9: .*a mix stage has no output 'model'; it has data"),
])
def test_bad_pipeline_is_one_line_naming_file_and_key(tmp_path, change, message):
    text = BASE.format(out=tmp_path / "out", extra=tmp_path / "extra.jsonl").replace(*change)
    with pytest.raises(ConfigError, match=message) as e:
        load_plan(write_pipeline(tmp_path / "p.yaml", text))
    assert "\n" not in str(e.value)


def test_missing_input_file_is_one_line_through_the_cli(tmp_path):
    path = write_pipeline(tmp_path / "p.yaml", BASE.format(out=tmp_path / "out", extra=tmp_path / "absent.jsonl"))
    proc = subprocess.run([sys.executable, "-m", "tuna_jax.cli", "pipeline", path], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"tuna-jax pipeline: error: {path}:7: stages.extra: parts[0]={tmp_path / 'absent.jsonl'}: no such file or "
        f"folder"]
    assert not (tmp_path / "out").exists()  # nothing ran


# ---- the engine: skip, rerun exactly the dependents, --until / --from -----------------------------------

def ran(steps):
    return sorted(s.id for s in steps if s.action != "skipped")


def test_a_changed_input_reruns_exactly_its_dependents(tmp_path):
    extra = write_jsonl(tmp_path / "extra.jsonl", rows(3, "x"))
    path = write_pipeline(tmp_path / "p.yaml", BASE.format(out=tmp_path / "out", extra=extra))
    _, steps, _ = run_pipeline(path, progress=False)
    assert ran(steps) == ["both", "data", "extra", "first", "tail"]
    m = read_manifest(str(tmp_path / "out" / "tail"))
    assert m["status"] == "finished" and m["config"]["parts"][0]["select"] == "last:4"
    assert m["inputs"]["parts[0]"]["path"] == str(tmp_path / "out" / "first" / "data.jsonl")
    assert m["outputs"]["data"]["path"] == "data.jsonl" and m["metrics"] == {"rows": [4]} and m["wall_s"] >= 0
    both = [json.loads(x) for x in (tmp_path / "out" / "both" / "data.jsonl").read_text().splitlines()]
    assert len(both) == 11 and both[-1]["instruction"] == "x2"

    _, steps, _ = run_pipeline(path, progress=False)
    assert ran(steps) == []  # everything finished and unchanged

    write_jsonl(extra, rows(4, "x"))  # a user's input file changes: its stage and what reads it
    _, steps, _ = run_pipeline(path, progress=False)
    assert ran(steps) == ["both", "extra"]
    assert (tmp_path / "out" / "extra.previous").is_dir()  # the old folder is kept aside, once

    # A config change that gives the same rows: the stage reruns, its readers see the same file and do not.
    _, steps, _ = run_pipeline(path, ["stages.first.parts=[{path: '${data.sft}', select: 'range:0:8'}]"],
                               progress=False)
    assert ran(steps) == ["first"]
    _, steps, _ = run_pipeline(path, ["stages.first.parts=[{path: '${data.sft}', select: 'first:9'}]"],
                               progress=False)
    assert ran(steps) == ["both", "first", "tail"]

    _, steps, _ = run_pipeline(path, ["stages.first.parts=[{path: '${data.sft}', select: 'first:9'}]"],
                               until=["tail"], start=["first"], progress=False)
    assert [s.id for s in steps] == ["data", "first", "tail"]  # --until tail: what tail needs, not `both`
    assert ran(steps) == ["first", "tail"]  # --from first: first and what follows it, though unchanged


def test_foreach_instances_and_references(tmp_path):
    text = """\
output_dir: {out}
vars: {{seeds: [0, 1]}}
stages:
  data: {{kind: synthetic, foreach: {{seed: "${{vars.seeds}}"}}, sft: 8, teacher_sft: 8, eval: 2, ranking: 2,
         seed: "${{seed}}"}}
  pick: {{kind: mix, foreach: {{seed: "${{vars.seeds}}"}}, parts: [{{path: "${{data.sft}}", select: "first:2"}}]}}
  one: {{kind: mix, parts: [{{path: "${{data[seed=1].sft}}"}}]}}
  every: {{kind: mix, parts: "${{pick.data}}"}}
""".format(out=tmp_path / "out")
    with pytest.raises(ConfigError, match=r"parts\[0\] must be a mapping"):  # a list of paths is not a list of parts
        load_plan(write_pipeline(tmp_path / "p.yaml", text))
    text = text.replace('parts: "${pick.data}"',
                        'parts: [{path: "${pick[seed=0].data}"}, {path: "${pick[seed=1].data}"}]')
    plan = load_plan(write_pipeline(tmp_path / "p.yaml", text))
    assert list(plan.instances) == ["data@seed=0", "data@seed=1", "pick@seed=0", "pick@seed=1", "one", "every"]
    assert plan.instances["pick@seed=1"].deps == ["data@seed=1"] and plan.instances["one"].deps == ["data@seed=1"]
    _, steps, _ = run_pipeline(str(tmp_path / "p.yaml"), progress=False)
    every = (tmp_path / "out" / "every" / "data.jsonl").read_text().splitlines()
    assert len(every) == 4 and every[:2] != every[2:]  # two seeds, two different draws


# ---- killed in the middle of a stage (SIGKILL), rerun: the same result as an uninterrupted run ---------

KILL_SFT_STEPS = 32  # the sft stage of KILL: 64 examples, batch 8, 4 epochs
KILL = """\
output_dir: {out}
stages:
  data: {{kind: synthetic, sft: 8, teacher_sft: 64, eval: 4, ranking: 4}}
  sft:
    kind: train
    config: {repo}/configs/tiny_sft.yaml
    set: {{model.tokenizer: {tok}, data.train: "${{data.teacher_sft}}", train.epochs: 4, train.save_every: 4,
          train.progress: false, train.tensorboard: false, train.async_checkpoints: false}}
  pick: {{kind: mix, parts: [{{path: "${{data.teacher_sft}}", select: "last:16"}}]}}
  tune:
    kind: train
    config: {repo}/configs/tiny_sft.yaml
    set: {{model.path: "${{sft.model}}", model.tokenizer: {tok}, data.train: "${{pick.data}}", train.epochs: 2,
          train.progress: false, train.tensorboard: false}}
"""


def pipeline_cmd(path):
    env = dict(os.environ, XLA_FLAGS=xla_flags())  # one device, as users run it
    return [sys.executable, "-m", "tuna_jax.cli", "pipeline", str(path), "--no-progress"], env


def losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


def committed_steps(run_dir):
    ckpt = run_dir / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []


@pytest.mark.slow
def test_killed_mid_stage_resumes_and_matches_an_uninterrupted_run(tmp_path):
    from tuna_jax.assets import stories260k_hf_dir

    tok = stories260k_hf_dir(tmp_path.parent / "tuna-cache")
    runs = {}
    for name in ("whole", "killed"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(KILL.format(out=tmp_path / name, repo=REPO, tok=tok))
        runs[name] = path
    cmd, env = pipeline_cmd(runs["whole"])
    whole = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]

    cmd, env = pipeline_cmd(runs["killed"])
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sft = tmp_path / "killed" / "sft"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # kill it two steps after a checkpoint
        steps = committed_steps(sft)
        if steps and (sft / "metrics.jsonl").exists() and len(losses(sft)) >= steps[-1] + 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed mid-stage"
    checkpoint = committed_steps(sft)[-1]
    assert read_manifest(str(sft))["status"] == "running" and 0 < checkpoint < len(losses(sft)) < KILL_SFT_STEPS
    data_mtime = (tmp_path / "killed" / "data" / "sft.jsonl").stat().st_mtime_ns

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    table = {line.split()[0]: line.split()[1] for line in again.stdout.splitlines() if line.split()[:1] in
             (["data"], ["sft"], ["pick"], ["tune"])}
    assert table == {"data": "skipped", "sft": "resumed", "pick": "ran", "tune": "ran"}
    assert f"resumed from {sft / 'checkpoints'} at step {checkpoint}" in again.stderr
    assert (tmp_path / "killed" / "data" / "sft.jsonl").stat().st_mtime_ns == data_mtime  # not redone
    m = read_manifest(str(sft))
    assert m["attempts"] == 2 and m["seconds_before"] > 0 and m["total_s"] > m["wall_s"]  # the killed seconds count
    # The same result: every step's loss of both trainings, and the files, as the uninterrupted run's.
    for stage in ("sft", "tune"):
        assert losses(tmp_path / "killed" / stage) == losses(tmp_path / "whole" / stage)
    for f in ("data/sft.jsonl", "pick/data.jsonl"):
        assert (tmp_path / "killed" / f).read_bytes() == (tmp_path / "whole" / f).read_bytes()
    import numpy as np

    from tuna_jax.model import load_model

    def params(run):
        import jax
        from flax import nnx

        from tuna_jax.parallel import make_mesh

        model = load_model(tmp_path / run / "tune" / "final", make_mesh((1, 1, 1), jax.devices()[:1]))
        return jax.tree.leaves(jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param))))

    assert all(np.array_equal(a, b) for a, b in zip(params("killed"), params("whole")))
    # (That a rerun of a finished pipeline skips every stage and keeps its seconds: tests/e2e/test_demo.py.)


def test_evaluation_refuses_prompts_a_training_stage_read(tmp_path):
    """The held-out check reads every file the stages upstream of the evaluation read (whole, whatever rows
    they select): here one of them reads the evaluation file, and the evaluation stops before any model."""
    from tuna_jax.pipeline.stage import StageFailed

    text = """\
output_dir: {out}
stages:
  data: {{kind: synthetic, sft: 16, teacher_sft: 8, eval: 6, ranking: 4}}
  leak: {{kind: mix, parts: [{{path: "${{data.sft}}"}}, {{path: "${{data.eval}}", select: "first:1"}}]}}
  evaluate: {{kind: heldout, eval: "${{data.eval}}", ranking: "${{data.ranking}}", models: {{m: "${{leak.data}}"}}}}
""".format(out=tmp_path / "out")
    with pytest.raises(StageFailed, match=r"6 evaluation prompt\(s\) appear in .*/data/eval.jsonl \(read by stage "
                                          r"leak, parts\[1\]\)"):
        run_pipeline(write_pipeline(tmp_path / "p.yaml", text), progress=False)
    assert read_manifest(str(tmp_path / "out" / "evaluate"))["status"] == "running"


def test_objectives_pipeline_trains_every_form_like_its_control(tmp_path):
    """`tuna-jax demo --objectives`: each loss.form on the demo's Tuna_p data, from the same Alpaca, with
    the same steps and learning rate as the MLE-only control, every row compared with that control."""
    from tuna_jax.config import CHOICES
    from tuna_jax.pipeline.commands import OBJECTIVES

    plan = load_plan(OBJECTIVES, [f"output_dir={tmp_path}"])
    control = plan.instances["control_p@seed=0"].params
    assert control.loss.rank_weight == 0
    forms = set()
    for inst in plan.instances.values():
        if inst.stage in ("objective", "tuna_p", "objective_ref") and inst.vars.get("seed") == 0:
            cfg = inst.params
            forms.add(cfg.loss.form)
            assert cfg.loss.rank_weight == 1 and cfg.model.path == control.model.path
            assert (cfg.optim, cfg.train.epochs, cfg.train.global_batch) == \
                (control.optim, control.train.epochs, control.train.global_batch)
            made = _producer(plan, cfg.data.train)
            assert made.id == "teacher" or (made.kind.name == "reference-scores" and cfg.loss.reference == "data"
                                            and made.params.data == control.data.train)
    assert forms == set(CHOICES[("loss", "form")])
    evaluation = plan.instances["objectives"].params
    assert all(control_row == "control-p" for _, control_row in evaluation.compare)
    assert {m for m, _ in evaluation.compare} == set(evaluation.models) - {"alpaca", "control-p"}


def test_data_tables_of_a_run_with_a_paid_stage(tmp_path, monkeypatch):
    """Table 4 and Table 6 as stages: the teacher (a real HTTP server on 127.0.0.1) ranks 3 instructions; the
    rankings table counts its records, the costs table reads the teacher stage's request store."""
    from tests.support.openai_server import OpenAIServer

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-tables-0123456789")
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": f"say {w}", "input": "", "output": w}
                                                      for w in ("a", "b", "c")])
    with OpenAIServer(api_key="sk-test-tables-0123456789") as srv:
        text = f"""\
output_dir: {tmp_path / "out"}
stages:
  teacher: {{kind: teacher, input: "{alpaca}", base_url: "{srv.base_url}", model: m, n: 2, max_tokens: 8,
            price_input: 1.0, price_output: 2.0}}
  table_4: {{kind: rankings-table, sources: [{{name: teacher, path: "${{teacher.data}}"}}]}}
  table_6: {{kind: costs-table, sources: [{{name: teacher, path: "${{teacher.data}}"}}]}}
"""
        _, steps, _ = run_pipeline(write_pipeline(tmp_path / "p.yaml", text), progress=False)
        sent = srv.count()
    assert [s.id for s in steps] == ["teacher", "table_4", "table_6"]
    t4 = json.loads((tmp_path / "out" / "table_4" / "table.json").read_text())
    assert t4["rows"][0]["records"] == 3 and t4["rows"][0]["n"] == [3, 3]
    t6 = json.loads((tmp_path / "out" / "table_6" / "table.json").read_text())
    (row,) = t6["rows"]
    assert row["path"] == str(tmp_path / "out" / "stores" / "teacher.jsonl") and row["requests"] == sent == 3
    assert row["usd_recorded"] == pytest.approx((row["prompt_tokens"] + 2 * row["completion_tokens"]) / 1e6)
    assert (tmp_path / "out" / "table_6" / "table.md").read_text().startswith("| stage | HTTP requests | ")


@pytest.mark.slow
def test_likelihood_table_equals_a_pytorch_forward(tmp_path):
    """Table 5 as a stage: LIMA-format and Alpaca-format rows, the log-likelihood of each response (+ EOS) under
    stories260K, held to transformers' PyTorch forward of the same tokens."""
    import numpy as np
    import torch
    import transformers

    from tuna_jax.assets import stories260k_hf_dir
    from tuna_jax.data.templates import SpecialTokenPolicy, encode_prompt, format_prompt, load_tokenizer

    model = str(stories260k_hf_dir())
    rows = [{"conversations": ["Tell me about a cat.", "The cat sat on the mat.", "and more"]},
            {"instruction": "Name a bird.", "input": "", "output": "A little bird sang."}]
    data = write_jsonl(tmp_path / "lima.jsonl", rows)
    text = f"""\
output_dir: {tmp_path / "out"}
stages:
  table_5: {{kind: likelihood-table, data: "{data}", models: [{{name: a, path: "{model}"}}]}}
"""
    run_pipeline(write_pipeline(tmp_path / "p.yaml", text), progress=False)
    table = json.loads((tmp_path / "out" / "table_5" / "table.json").read_text())
    (a,) = table["rows"]
    tok = load_tokenizer(model)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    lp, n = 0.0, 0
    for ins, resp in (("Tell me about a cat.", "The cat sat on the mat."), ("Name a bird.", "A little bird sang.")):
        prompt = encode_prompt(tok, format_prompt(ins, ""), SpecialTokenPolicy())
        target = tok.encode_continuation(resp) + [tok.eos_id]
        ids = torch.tensor([prompt + target])
        with torch.no_grad():
            logp = torch.log_softmax(hf(ids).logits[0].double(), -1).numpy()
        lp += sum(logp[len(prompt) - 1 + k, t] for k, t in enumerate(target))
        n += len(target)
    assert (a["responses"], a["tokens"], a["name"]) == (2, n, "a")
    np.testing.assert_allclose(a["logprob_per_token"], lp / n, rtol=1e-4)
    assert "| a | 2 |" in (tmp_path / "out" / "table_5" / "table.md").read_text()

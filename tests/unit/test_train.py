"""The train loop: learning, exact resume after SIGKILL, SIGTERM checkpoints, cross-mesh restore."""
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.support.train_utils import REPO, final_params, max_param_diff, read_metrics, tiny_overrides
from tests.support.xla import xla_flags
from tuna_jax.config import load_config
from tuna_jax.train import train

TINY_RANKING = str(REPO / "configs" / "tiny_ranking.yaml")


@pytest.mark.slow
def test_ranking_training_raises_heldout_pair_accuracy(tmp_path):
    cfg = load_config(TINY_RANKING, tiny_overrides(tmp_path, n_train=96, n_eval=32, train__epochs=2,
                                                   train__save_every=1000))
    result = train(cfg)
    evals = [m for m in read_metrics(result.output_dir) if m["split"] == "eval"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == result.step == 24
    start, end = evals[0]["pair_accuracy"], evals[-1]["pair_accuracy"]
    assert end >= start + 0.2, (start, end)
    assert end >= 0.75
    assert evals[-1]["rank_loss"] < evals[0]["rank_loss"]
    train_steps = [m["step"] for m in read_metrics(result.output_dir) if m["split"] == "train"]
    assert train_steps == list(range(1, 25))
    assert (tmp_path / "run" / "final" / "params").is_dir()


def _launch(tmp_path, name, extra=(), resume=False):
    overrides = tiny_overrides(tmp_path, n_train=96, train__epochs=2, train__save_every=3,
                               **{"train__output_dir": tmp_path / name})
    cmd = [sys.executable, "-m", "tuna_jax.cli", "train", TINY_RANKING, *overrides, *extra]
    if resume:
        cmd.append("--resume")
    env = dict(os.environ, XLA_FLAGS=xla_flags(), PYTHONUNBUFFERED="1")
    # A file, not a pipe: a pipe nobody reads fills up and blocks the child.
    log = open(tmp_path / f"{name}{'-resume' if resume else ''}.log", "w+")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    return proc


def _output(proc):
    proc.log.flush()
    proc.log.seek(0)
    return proc.log.read()


def _wait_for_step(proc, run_dir, step, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if (run_dir / "metrics.jsonl").exists():
            steps = [m["step"] for m in read_metrics(run_dir) if m["split"] == "train"]
            if steps and steps[-1] >= step:
                return steps[-1]
        if proc.poll() is not None:
            pytest.fail(f"training exited early:\n{_output(proc)}")
        time.sleep(0.005)
    pytest.fail("training did not reach the step in time")


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    full = _launch(tmp_path, "full")
    killed = _launch(tmp_path, "killed")
    _wait_for_step(killed, tmp_path / "killed", 7)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert full.wait(timeout=400) == 0, _output(full)
    resumed = _launch(tmp_path, "killed", resume=True)
    resumed.wait(timeout=400)
    out = _output(resumed)
    assert resumed.returncode == 0, out
    assert "resumed from" in out
    steps = [m["step"] for m in read_metrics(tmp_path / "killed") if m["split"] == "train"]
    assert steps == list(range(1, 25)), "every step exactly once, none repeated or skipped"
    assert max_param_diff(final_params(tmp_path / "full"), final_params(tmp_path / "killed")) <= 1e-6
    # and training really moved the parameters (the comparison is not vacuous)
    full_losses = [m["loss"] for m in read_metrics(tmp_path / "full") if m["split"] == "train"]
    assert full_losses[-1] < full_losses[0]


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_before_exit(tmp_path):
    import orbax.checkpoint as ocp

    proc = _launch(tmp_path, "term")
    _wait_for_step(proc, tmp_path / "term", 4)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    out = _output(proc)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "checkpoint saved" in out and "--resume" in out
    last = [m["step"] for m in read_metrics(tmp_path / "term") if m["split"] == "train"][-1]
    mgr = ocp.CheckpointManager(tmp_path / "term" / "checkpoints")
    assert mgr.latest_step() == last and last < 24


@pytest.mark.slow
def test_optimizer_state_starts_sharded_like_the_parameters():
    """AdamW's moments start on the parameters' shardings (FSDP), not replicated on every device, so
    the first step neither holds the whole optimizer state per device nor compiles twice."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 emulated devices")
    from flax import nnx

    from tests.support.train_utils import TINY_HF
    from tuna_jax import parallel
    from tuna_jax.config import OptimConfig
    from tuna_jax.model.llama import Llama, LlamaConfig
    from tuna_jax.train import ParamBinder, init_opt_state, make_optimizer

    mesh = parallel.make_mesh((1, 4, 2))
    lcfg = LlamaConfig.from_hf(TINY_HF)
    with jax.set_mesh(mesh):
        params = ParamBinder(lcfg).to_pure(parallel.init_sharded(lambda: Llama(lcfg, nnx.Rngs(0)), mesh))
        tx, _ = make_optimizer(OptimConfig(lr=1e-3, grad_clip=1.0), 10)
        opt = init_opt_state(tx, params, mesh)
    adam = opt[1][0]  # chain(clip_by_global_norm, adamw): adamw's ScaleByAdamState
    for moments in (adam.mu, adam.nu):
        same = jax.tree.map(lambda m, p: m.sharding == p.sharding, moments, params)
        assert all(jax.tree.leaves(same))
    q = adam.mu["layers"]["self_attn"]["q_proj"]
    assert q.sharding.spec != jax.sharding.PartitionSpec()  # really split, not trivially replicated
    assert adam.count.sharding.spec == jax.sharding.PartitionSpec() and adam.count.sharding.mesh.shape == mesh.shape


@pytest.mark.slow
def test_checkpoint_restores_across_meshes(tmp_path):
    """A train state saved on (1,8,1) restores onto (2,2,2) and onto one device, values equal."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 emulated devices")
    from flax import nnx

    from tests.support.train_utils import TINY_HF
    from tuna_jax import parallel
    from tuna_jax.config import OptimConfig
    from tuna_jax.model.checkpoint import TrainCheckpointer
    from tuna_jax.model.llama import Llama, LlamaConfig
    from tuna_jax.train import ParamBinder, make_optimizer

    lcfg = LlamaConfig.from_hf(TINY_HF)
    binder = ParamBinder(lcfg)
    tx, _ = make_optimizer(OptimConfig(lr=1e-3), 10)

    def moments(params):  # non-trivial optimizer moments; jitted: one compile per mesh, not one per eager op
        g = jax.tree.map(lambda p: jnp.ones_like(p) * 0.01, params)
        return tx.update(g, tx.init(params), params)[1]

    def state_on(mesh):
        with jax.set_mesh(mesh):
            params = binder.to_pure(parallel.init_sharded(lambda: Llama(lcfg, nnx.Rngs(0)), mesh))
            opt = jax.jit(moments)(params)
            return {"params": params, "opt_state": opt, "step": jnp.array(5, jnp.int32),
                    "rng": jax.random.key_data(jax.random.key(7))}

    saved = state_on(parallel.make_mesh((1, 8, 1)))
    ck = TrainCheckpointer(tmp_path / "ck", async_save=False)
    ck.save(5, saved, {"data": {"epoch": 0, "index": 5}})
    ck.close()
    host = jax.tree.map(np.asarray, saved)
    for target_mesh in (parallel.make_mesh((2, 2, 2)), parallel.make_mesh((1, 1, 1), jax.devices()[:1])):
        template = state_on(target_mesh)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), template)
        restored, meta = TrainCheckpointer(tmp_path / "ck").restore(abstract)
        assert meta["data"] == {"epoch": 0, "index": 5}
        q = restored["params"]["layers"]["self_attn"]["q_proj"]
        assert q.sharding.mesh.shape == target_mesh.shape
        assert q.sharding == template["params"]["layers"]["self_attn"]["q_proj"].sharding
        same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), b), restored, host)
        assert all(jax.tree.leaves(same))


@pytest.mark.slow
def test_sft_on_stories260k_lowers_heldout_loss(tmp_path, shared_dir):
    """A few SFT steps of the real stories260K model on the shared Alpaca demo data."""
    from tuna_jax.assets import stories260k_hf_dir

    data = shared_dir / "data" / "alpaca" / "alpaca_gpt4_demo_999.json"
    model = stories260k_hf_dir(tmp_path / "cache")
    cfg = load_config(str(REPO / "configs" / "tiny_sft.yaml"), [
        f"model.path={model}", "model.hf_config=null", f"data.train={data}", "data.eval_fraction=0.05",
        "data.max_len=256", "data.on_error=skip", "train.max_steps=8", "train.global_batch=8",
        "optim.lr=2e-3", f"train.output_dir={tmp_path / 'run'}", "train.progress=false", "train.export=false"])
    result = train(cfg)
    evals = [m for m in read_metrics(result.output_dir) if m["split"] == "eval"]
    assert evals[-1]["loss"] < evals[0]["loss"] - 0.1, evals


@pytest.mark.slow
def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    from tuna_jax.train import TrainingDiverged

    # lr 1e30 blows the parameters up within a couple of steps; loss/grad-norm become inf/NaN.
    cfg = load_config(TINY_RANKING, tiny_overrides(tmp_path, n_train=32, train__save_every=1,
                                                   optim__lr=1e30, optim__warmup_steps=0, optim__grad_clip=0,
                                                   train__async_checkpoints=False))
    with pytest.raises(TrainingDiverged, match=r"not finite.*last good checkpoint is step \d+") as e:
        train(cfg)
    import orbax.checkpoint as ocp

    bad_step = int(str(e.value).split(":")[0].split()[-1])
    latest = ocp.CheckpointManager(tmp_path / "run" / "checkpoints").latest_step()
    assert latest is not None and latest == bad_step - 1
    logged = [m["step"] for m in read_metrics(tmp_path / "run") if m["split"] == "train"]
    assert bad_step not in logged


@pytest.mark.slow
def test_bad_training_data_is_a_clear_cli_error(tmp_path, capsys):
    from tuna_jax.cli import main as cli

    overrides = tiny_overrides(tmp_path, n_train=16)
    bad = tmp_path / "bad.jsonl"
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    lines[2] = lines[2][:-5]  # a torn JSON line
    bad.write_text("\n".join(lines) + "\n")
    overrides = [o for o in overrides if not o.startswith("data.train=")] + [f"data.train={bad}"]
    assert cli(["train", TINY_RANKING, *overrides]) == 2
    assert f"{bad}:3" in capsys.readouterr().err
    # asked to skip, the run goes on and reports what it skipped
    assert cli(["train", TINY_RANKING, *overrides, "data.on_error=skip", "train.max_steps=1",
                "train.export=false"]) == 0
    err = capsys.readouterr().err
    assert "skipped" in err and "1" in err


def test_unknown_config_key_is_an_error_with_a_suggestion():
    from tuna_jax.config import ConfigError

    suggestion = r"unknown config key optim\.warmup_step \(did you mean optim\.warmup_steps\?\)"
    with pytest.raises(ConfigError, match=suggestion):
        load_config(TINY_RANKING, ["optim.warmup_step=3"])
    with pytest.raises(ConfigError, match=r"loss\.form='pairwise'.*paper, reference"):
        load_config(TINY_RANKING, ["loss.form=pairwise"])
    assert load_config(TINY_RANKING, ["optim.lr=1e-5"]).optim.lr == 1e-5

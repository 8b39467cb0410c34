"""`tuna-jax plan`: the train step of a config compiled for a target without its hardware, per-chip memory
against the chip, FLOPs, the search for settings that fit, the analytic GPU estimate, the presets.

Compiles are the cost here, so each test compiles at most once, on tiny models (hidden 32-128, 2 layers)."""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tuna_jax.cli import main as cli
from tuna_jax.commands import plan as plan_cmd
from tuna_jax.config import load_config
from tuna_jax.planning import aot, flops, hardware
from tuna_jax.planning.plan import plan_config

REPO = str(pathlib.Path(__file__).resolve().parents[3])
RANKING = os.path.join(REPO, "configs", "tiny_ranking.yaml")
TUNA_P = os.path.join(REPO, "configs", "tuna_p.yaml")
# A reduced model of the 7B presets' sharding (fsdp over every device, scanned layers, AdamW, the ranking
# step of tuna_p.yaml), small enough to compile in seconds.
TINY = ["model.hf_config={vocab_size: 256, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, "
        "num_attention_heads: 4, num_key_value_heads: 2}", "model.dtype=float32", "data.max_len=64",
        "data.num_candidates=2", "train.global_batch=8", "data.layout=prefix_shared", "model.attention=xla"]
# What the estimate is held to against a compile: within this factor either way (see planning/estimate.py).
ESTIMATE_FACTOR = 2.0


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory):
    """`tuna-jax plan` of the reduced tuna_p on cpu:8 (one compile): its JSON and its report."""
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    cfg = plan_cmd.Config(config=TUNA_P, topology="cpu:8", overrides=TINY, json=str(out))
    from contextlib import redirect_stdout
    from io import StringIO

    buf = StringIO()
    with redirect_stdout(buf):
        status = plan_cmd.run(cfg)
    return status, json.loads(out.read_text())["plan"], buf.getvalue()


@pytest.mark.slow
def test_plan_compiles_the_train_step_with_sane_figures(tiny_plan):
    status, p, report = tiny_plan
    assert status == 0 and p["fits"] is True and p["compiled"] is True
    assert p["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    cfg = load_config(TUNA_P, TINY)
    lcfg = aot.llama_config(cfg, cfg.model.hf_config, "cpu")
    # Every parameter is split over fsdp=8 but the norm scales ([layers, 64] and [64]: "norm" is replicated).
    norms = (2 * lcfg.num_layers + 1) * lcfg.hidden_size
    expected = ((lcfg.num_params() - norms) / 8 + norms) * 4
    assert p["memory"]["params"] == pytest.approx(lcfg.num_params() * 4 / 8, rel=0.05)
    assert p["memory"]["params"] == expected
    assert p["memory"]["optimizer"] == pytest.approx(2 * expected, abs=64)  # AdamW mu, nu (+ its step count)
    m = p["memory"]
    assert m["total"] == m["arguments"] + m["outputs"] - m["aliased"] + m["temporaries"]
    assert m["aliased"] >= m["params"] + m["optimizer"]  # the state is donated, as train donates it
    assert 0 < m["total"] < p["hbm_bytes"]
    # The worst-case batch: 8 prompts, each prompt (16) + candidate / MLE target (48) = max_len 64.
    b = p["batch"]
    assert b["real_tokens"] == 8 * 3 * 64 and b["layout"] == "prefix_shared"
    assert b["positions"] == 8 * b["shape"]["length"] * b["shape"]["rows"]
    assert p["flops"]["executed"] > p["flops"]["model"] > 0  # the step executes more than the model FLOPs
    for key in ("config", "overrides", "target", "chip", "chips", "hbm_bytes", "memory", "flops", "fits",
                "headroom_bytes", "warnings", "replicated_leaves", "step_time_s", "seconds", "batch", "model"):
        assert key in p
    assert "fits" in report and "memory per chip" in report and "cpu:8" in report


def test_the_verdict_keeps_headroom(tiny_plan):
    from tuna_jax.planning.plan import fits

    total = tiny_plan[1]["memory"]["total"]
    assert fits(total, int(total / 0.95) + 1, 0.05) and not fits(total, int(total / 0.95) - 1, 0.05)
    assert not fits(total, 10 * total, 0.05, oom=True)  # XLA refused it for the chip: no figure overrules that


def test_tiny_hbm_does_not_fit_and_exits_1(tmp_path, capsys):
    out = tmp_path / "p.json"
    rc = cli(["plan", TUNA_P, *TINY, "--topology", "h100:8", "--hbm-gib", "0.001", "--json", str(out)])
    assert rc == 1
    p = json.loads(out.read_text())["plan"]
    assert p["fits"] is False and p["headroom_bytes"] < 0 and p["compiled"] is False
    report = capsys.readouterr().out
    assert "DOES NOT FIT" in report and "ANALYTIC ESTIMATE, NOT A COMPILE" in report


def test_a_big_replicated_leaf_is_warned():
    """hidden 36 does not divide over fsdp=8, so the rules table leaves the [8192, 36] embedding (1.1 MiB)
    whole on every device: the plan names it (and AdamW's two copies of it)."""
    cfg = load_config(TUNA_P, ["model.hf_config={vocab_size: 8192, hidden_size: 36, intermediate_size: 64, "
                               "num_hidden_layers: 1, num_attention_heads: 2, tie_word_embeddings: true}"])
    lcfg = aot.llama_config(cfg, cfg.model.hf_config, "cpu")
    from tuna_jax import parallel

    mesh = parallel.make_mesh("1,8,1", hardware.cpu_devices(8))
    state = aot.abstract_state(cfg, lcfg, mesh, optax.adam(1e-3))
    warned = aot.replicated_leaves(state, mesh)
    assert sorted(w["leaf"] for w in warned) == ["opt_state[0].mu['embed_tokens']",
                                                 "opt_state[0].nu['embed_tokens']", "params['embed_tokens']"]
    assert all(w["bytes"] == 8192 * 36 * 4 for w in warned)
    # hidden 64 divides over fsdp: the same 2 MiB embedding is split, nothing is warned.
    fine = load_config(TUNA_P, ["model.hf_config={vocab_size: 8192, hidden_size: 64, intermediate_size: 64, "
                                "num_hidden_layers: 1, num_attention_heads: 4, tie_word_embeddings: true}"])
    state = aot.abstract_state(fine, aot.llama_config(fine, fine.model.hf_config, "cpu"), mesh, optax.adam(1e-3))
    assert aot.replicated_leaves(state, mesh) == []


def test_executed_flops_multiply_loops_out_and_count_remat():
    """A scan of 8 matmuls: XLA's cost analysis counts the body once; the jaxpr count is exact, and a
    rematerialised body adds its recomputed forward pass."""
    def f(ws, x, remat):
        body = lambda h, w: (jnp.tanh(h @ w), None)  # noqa: E731
        return jax.lax.scan(jax.checkpoint(body) if remat else body, x, ws)[0].sum()

    ws, x = jax.ShapeDtypeStruct((8, 64, 64), jnp.float32), jax.ShapeDtypeStruct((32, 64), jnp.float32)
    fwd = 8 * 2 * 32 * 64 * 64
    for remat, times in ((False, 3), (True, 4)):
        grad = jax.grad(lambda w, x: f(w, x, remat))
        assert flops.executed_flops(jax.make_jaxpr(grad)(ws, x)).flops == times * fwd
    xla = jax.jit(jax.grad(lambda w, x: f(w, x, False))).lower(ws, x).compile().cost_analysis()
    xla = xla[0] if isinstance(xla, list) else xla
    assert xla["flops"] < 0.25 * 3 * fwd  # why the jaxpr is counted: XLA's figure has one body of eight


def test_model_flops_match_a_brute_force_count():
    """6 P T + 6 D V T_scored + 12 L H Dh K against the mask computed pair by pair in Python."""
    cfg = load_config(TUNA_P, TINY)
    lcfg = aot.llama_config(cfg, cfg.model.hf_config, "cpu")
    batch, _, _ = aot.planned_batch(cfg, 8, 16, "cpu")
    got = flops.model_flops(batch, lcfg)
    seg = batch["segment_ids"].reshape(-1, batch["segment_ids"].shape[-1])
    br = batch["branch_ids"].reshape(seg.shape)
    pairs = sum(1 for r in range(seg.shape[0]) for i in range(seg.shape[1]) for j in range(i + 1)
                if seg[r, i] > 0 and seg[r, j] == seg[r, i] and br[r, j] in (0, br[r, i]))
    assert got["visible_keys"] == pairs
    assert got["tokens"] == np.count_nonzero(seg) and got["scored_tokens"] == 8 * 3 * 48
    d, layers = lcfg.hidden_size, lcfg.num_layers
    assert got["parts"]["attention"] == 12 * layers * lcfg.num_heads * lcfg.head_dim * pairs
    assert got["parts"]["lm_head"] == 6 * d * lcfg.vocab_size * 8 * 3 * 48


@pytest.mark.slow
def test_search_returns_overrides_that_load_and_fit(tmp_path, capsys):
    """A chip with room for the step under full remat but not without remat: the default (no remat, one
    micro-batch) does not fit; the search (on an estimate target: no compile) finds settings that do, and
    each line's overrides are accepted by the config loader and fit when planned again."""
    target = hardware.resolve("h100:8")
    base = TINY + ["model.remat_policy=none"]
    none = plan_config(TUNA_P, base, target).memory["total"]
    full = plan_config(TUNA_P, TINY + ["model.remat_policy=full"], target).memory["total"]
    assert full < none
    hbm = (none + full) / 2 / 0.95 / 2**30
    out = tmp_path / "s.json"
    rc = cli(["plan", TUNA_P, *base, "--topology", "h100:8", "--hbm-gib", f"{hbm:.9f}", "--search",
              "--max-compiles", "6", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["plan"]["fits"] is False
    found = res["search"]["fit"]
    assert found and res["search"]["compiles"] <= 6
    small = hardware.resolve("h100:8", hbm)
    for c in found:
        load_config(TUNA_P, base + c["overrides"])
        assert plan_config(TUNA_P, base + c["overrides"], small).fits
    steps = [float(f"{c['step_s']:.2g}") for c in found]  # fastest first (ties within a few %: fewer micro-batches)
    assert steps == sorted(steps)
    assert "search: " in capsys.readouterr().out


def test_estimate_is_within_a_factor_of_the_compile(tiny_plan):
    """The analytic estimate (what --topology h100:8 prints) of the fixture's step against XLA's memory
    analysis of the same step compiled for cpu:8 (same layout, attention and mesh)."""
    est = plan_config(TUNA_P, TINY, hardware.resolve("h100:8"))
    assert est.compiled is False and est.memory["estimate"] is True and est.mesh == tiny_plan[1]["mesh"]
    ratio = est.memory["total"] / tiny_plan[1]["memory"]["total"]
    assert 1 / ESTIMATE_FACTOR <= ratio <= ESTIMATE_FACTOR, (ratio, est.memory)


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["none", "full"])
def test_estimate_is_within_a_factor_of_the_compile_where_activations_dominate(remat):
    over = ["model.hf_config={vocab_size: 512, hidden_size: 128, intermediate_size: 256, num_hidden_layers: 2, "
            "num_attention_heads: 4, num_key_value_heads: 2}", "model.dtype=float32", "data.max_len=128",
            "train.global_batch=16", "data.layout=packed", "model.attention=xla", f"model.remat_policy={remat}",
            "train.mesh=1,8,1"]
    compiled = plan_config(TUNA_P, over, hardware.resolve("cpu:8"))
    est = plan_config(TUNA_P, over, hardware.resolve("h100:8"))
    ratio = est.memory["total"] / compiled.memory["total"]
    assert 1 / ESTIMATE_FACTOR <= ratio <= ESTIMATE_FACTOR, (ratio, est.memory, compiled.memory)


# ---- LoRA ---------------------------------------------------------------------------------------------

# Weights that outweigh the batch (so LoRA's saving is visible), a bf16 base, data parallel over 8 devices
# (every device holds every parameter: the bytes below are whole tensors).
D, F, LAYERS, HEADS, KV, VOCAB, RANK = 128, 512, 2, 4, 2, 2048, 4
LORA_BASE = [f"model.hf_config={{vocab_size: {VOCAB}, hidden_size: {D}, intermediate_size: {F}, num_hidden_layers: "
             f"{LAYERS}, num_attention_heads: {HEADS}, num_key_value_heads: {KV}}}", "model.dtype=float32",
             "model.param_dtype=bfloat16", "data.max_len=32", "data.num_candidates=2", "train.global_batch=8",
             "data.layout=prefix_shared", "model.attention=xla", "train.mesh=8,1,1"]
LORA = LORA_BASE + [f"lora.rank={RANK}"]  # every projection (lora.targets' default)


def arch_counts() -> tuple[int, int]:
    """(base parameters, adapter parameters) of LORA by hand: untied embedding and head, q/k/v/o, gate/up/down,
    two norms per layer and a final one; A [in, r] and B [r, out] per projection and layer."""
    dh = D // HEADS
    q, kv = HEADS * dh, KV * dh
    base = 2 * VOCAB * D + D + LAYERS * (D * q + 2 * D * kv + q * D + 3 * D * F + 2 * D)
    io = [(D, q), (D, kv), (D, kv), (q, D), (D, F), (D, F), (F, D)]
    return base, LAYERS * RANK * sum(i + o for i, o in io)


@pytest.fixture(scope="module")
def lora_plans():
    """The LoRA step and full fine-tuning of the same config, compiled for cpu:8 (two compiles)."""
    target = hardware.resolve("cpu:8")
    return plan_config(TUNA_P, LORA, target), plan_config(TUNA_P, LORA_BASE, target)


@pytest.mark.slow
def test_lora_plan_holds_the_bf16_base_adapters_and_their_optimizer_only(lora_plans):
    p, full = lora_plans
    base, adapters = arch_counts()
    m = p.memory
    assert p.compiled and p.model["lora"]["trainable_params"] == adapters
    assert m["frozen_base"] == base * 2  # bf16, as loaded
    assert m["trainable"] == adapters * 4  # float32 adapters
    assert m["optimizer"] == 2 * adapters * 4 + 8  # AdamW's mu and nu of the adapters, two int32 step counts
    lora_state = base * 2 + adapters * 4 + 2 * adapters * 4 + 8 + 4 + 8  # + step, rng
    full_state = base * 2 + 2 * base * 2 + 8 + 4 + 8  # full fine-tuning: moments of every (bf16) parameter
    # XLA's arguments of the compiled step: that state and the batch's share (of the arrays the step reads:
    # jit drops the others), the same batch for both, so the difference is the state's exactly.
    cfg = load_config(TUNA_P, LORA)
    batch, _, _ = aot.planned_batch(cfg, 8, max(1, min(64, cfg.data.max_len // 4)), "cpu")
    assert 0 < m["arguments"] - lora_state <= sum(v.nbytes for v in batch.values()) // 8
    assert full.memory["arguments"] - m["arguments"] == full_state - lora_state
    # The state is donated as train donates it; the frozen base is an argument, never donated.
    assert m["trainable"] + m["optimizer"] <= m["aliased"] <= m["arguments"] - m["frozen_base"]
    assert not p.warnings, p.warnings


@pytest.mark.slow
def test_lora_plans_less_memory_than_full_fine_tuning(lora_plans):
    lora_p, full = lora_plans
    assert full.model["lora"] is None and "params" in full.memory and "frozen_base" not in full.memory
    assert lora_p.memory["total"] < full.memory["total"]
    # Full fine-tuning: every parameter's AdamW moments; LoRA: the adapters' only.
    assert full.memory["optimizer"] > 10 * lora_p.memory["optimizer"]
    estimate = [plan_config(TUNA_P, over, hardware.resolve("h100:8")).memory for over in (LORA, LORA_BASE)]
    assert estimate[0]["total"] < estimate[1]["total"]
    assert "gradients" in estimate[0]["parts"] and "frozen_base" in estimate[0]["parts"]
    assert estimate[0]["parts"]["optimizer"] == 2 * arch_counts()[1] * 4


@pytest.mark.slow
def test_lora_estimate_is_within_a_factor_of_the_compile(lora_plans):
    """The LoRA estimate (h100:8) against the same step compiled for cpu:8, held as the full step's is."""
    est = plan_config(TUNA_P, LORA, hardware.resolve("h100:8"))
    assert est.compiled is False and est.mesh == lora_plans[0].mesh
    ratio = est.memory["total"] / lora_plans[0].memory["total"]
    assert 1 / ESTIMATE_FACTOR <= ratio <= ESTIMATE_FACTOR, (ratio, est.memory, lora_plans[0].memory)


def test_lora_reference_model_adds_the_bases_forward_pass_and_train_refusals_hold(capsys):
    """loss.reference=model scores the batch with the frozen base in the same step: one more forward pass
    (no backward) in the executed FLOPs. Without LoRA, or without model.path, train refuses: so does plan."""
    target = hardware.resolve("h100:8")
    plain, ref = (plan_config(TUNA_P, LORA + extra, target) for extra in ([], ["loss.reference=model"]))
    added = ref.flops["executed"] - plain.flops["executed"]
    assert ref.model["lora"]["reference"] == "model"
    assert 0.2 * plain.flops["model"] < added < plain.flops["executed"] / 2
    rc = cli(["plan", TUNA_P, *LORA_BASE, "loss.reference=model", "--topology", "h100:8"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "loss.reference=model needs LoRA" in err
    rc = cli(["plan", TUNA_P, *LORA, "model.path=null", "--topology", "h100:8"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "needs model.path" in err


def test_train_refusals_are_one_line(capsys):
    rc = cli(["plan", TUNA_P, *TINY, "train.global_batch=12", "--topology", "cpu:8"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not divide over data x fsdp = 8" in err
    rc = cli(["plan", TUNA_P, "model.nope=1", "--topology", "cpu:8"])
    assert rc == 2 and "unknown config key model.nope" in capsys.readouterr().err
    rc = cli(["plan", TUNA_P, "--topology", "v9-8"])
    assert rc == 2 and "choose one of v4-8" in capsys.readouterr().err
    rc = cli(["plan", TUNA_P, "model.hf_config=null", "--topology", "h100:8"])
    assert rc == 2 and "is not on this machine and the config has no model.hf_config" in capsys.readouterr().err


def test_a_step_that_does_not_trace_is_one_line(capsys):
    """cuDNN's attention cannot be traced on a host without cuDNN: the plan says so in one line, with the
    portable attention to try (the same path names splash on a TPU target)."""
    rc = cli(["plan", TUNA_P, *TINY, "model.attention=cudnn", "model.dtype=bfloat16", "--topology", "cpu:8"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0, err
    assert "the step does not trace for cpu:8" in err and "model.attention=xla is the portable path" in err


def test_a_preset_file_merges_in_order_and_keeps_file_and_line_in_errors(tmp_path):
    preset = tmp_path / "slice.yaml"
    preset.write_text('train:\n  grad_accum: 2\n  mesh: "1,-1,2"\n')
    cfg = load_config(TUNA_P, ["train.grad_accum=4", str(preset), "train.mesh=2,-1,1"])
    assert (cfg.train.grad_accum, cfg.train.mesh, cfg.train.global_batch) == (2, "2,-1,1", 128)
    preset.write_text('train:\n  grad_accum: 2\n  nope: 1\n')
    with pytest.raises(ValueError, match=r"slice.yaml:3: unknown config key train.nope"):
        load_config(TUNA_P, [str(preset)])


# ---- presets --------------------------------------------------------------------------------------------

PAPER = ["alpaca_sft", "tuna_p", "tuna_c", "tuna", "mix_tuna_104k", "tuna_c_prm"]
TOPOLOGIES = sorted(f[:-5] for f in os.listdir(os.path.join(REPO, "configs", "topologies")) if f.endswith(".yaml"))
MODELS = ["llama-7b", "llama-2-7b", "llama-3-8b", "llama-3.1-8b"]


def test_model_presets_carry_their_architecture():
    from tuna_jax.model.llama import LlamaConfig

    sizes = {m: LlamaConfig.from_hf(load_config(os.path.join(REPO, "configs", "models", f"{m}.yaml")).model.hf_config)
             .num_params() for m in MODELS}
    # The published counts: 6,738,415,616 (LLaMA / Llama-2 7B), 8,030,261,248 (Llama-3 / 3.1 8B).
    assert sizes == {"llama-7b": 6738415616, "llama-2-7b": 6738415616, "llama-3-8b": 8030261248,
                     "llama-3.1-8b": 8030261248}
    rope = load_config(os.path.join(REPO, "configs", "models", "llama-3.1-8b.yaml")).model.hf_config["rope_scaling"]
    assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0
    # The preset table compiles LLaMA-7B and Llama-3.1-8B: Llama-2-7B and Llama-3-8B have their shapes.
    shapes = {m: {k: load_config(os.path.join(REPO, "configs", "models", f"{m}.yaml")).model.hf_config.get(k)
                  for k in aot.ARCH_KEYS} for m in MODELS}
    assert shapes["llama-2-7b"] == {**shapes["llama-7b"], "num_key_value_heads": 32}
    assert shapes["llama-3-8b"] == shapes["llama-3.1-8b"]


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_topology_presets_apply_to_every_paper_config(topology):
    """Each preset loads on top of every paper config (as an extra file argument), names its slice's mesh
    in a shape that divides it, and splits each config's batch over it (what train checks first)."""
    preset = os.path.join(REPO, "configs", "topologies", f"{topology}.yaml")
    target = topology.replace("-", ":", 1) if topology.startswith(("h100", "h200", "a100")) else topology
    chips = int(target.split(":")[1]) if ":" in target else (
        int(topology.split("-")[1]) // (2 if topology.startswith(("v4", "v5p")) else 1))
    from tuna_jax import parallel

    for name in PAPER:
        cfg = load_config(os.path.join(REPO, "configs", f"{name}.yaml"), [preset])
        shape = parallel.parse_mesh_shape(cfg.train.mesh, chips)
        aot.check_batch(cfg, shape[0] * shape[1])


def test_the_paper_stages_share_tuna_ps_step():
    """tuna_c, tuna, mix_tuna_104k and tuna_c_prm train the same step as tuna_p (only data, lr and paths
    differ), so the preset table's tuna_p rows hold for them."""
    def step_keys(name):
        c = load_config(os.path.join(REPO, "configs", f"{name}.yaml")).to_dict()
        return {"model": {k: v for k, v in c["model"].items() if k != "path"},
                "data": {k: v for k, v in c["data"].items() if k not in ("train", "beta")}, "loss": c["loss"],
                "train": {k: c["train"][k] for k in ("mode", "global_batch", "grad_accum", "mesh")}}

    for name in ("tuna_c", "tuna", "mix_tuna_104k", "tuna_c_prm"):
        assert step_keys(name) == step_keys("tuna_p"), name


# ---- TPU ------------------------------------------------------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install -e '.[plan]'): no TPU topology to compile for")
@pytest.mark.slow
def test_compiles_for_a_real_tpu_topology(tmp_path):
    """The reduced tuna_p compiled by libtpu for a v5e-4 (2x2) slice on this CPU host."""
    out = tmp_path / "tpu.json"
    rc = cli(["plan", TUNA_P, *TINY, "--topology", "v5e-4", "--json", str(out)])
    p = json.loads(out.read_text())["plan"]
    assert rc == 0 and p["fits"] and p["chips"] == 4 and p["chip"] == "TPU v5e"
    assert p["mesh"]["fsdp"] == 4 and p["memory"]["temporaries"] > 0
    assert p["step_time_s"]["mfu_40"] > 0


def test_plan_help_imports_no_jax():
    code = ("import sys; from tuna_jax.cli import main\n"
            "try:\n    main(['plan', '--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'jax' not in sys.modules, 'jax imported'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "--topology" in r.stdout and "--search" in r.stdout

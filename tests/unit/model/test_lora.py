"""LoRA (model/lora.py): exactness against the frozen model and a merged-weight brute force, PEFT as the
independent reference (its adapter format, its forward pass and gradients), adapters-only checkpoints that
resume bit for bit, and the frozen base as the reference model (loss.reference=model)."""
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.traverse_util import flatten_dict
from safetensors.numpy import load_file

from tests.support.train_utils import REPO, TINY_HF, read_metrics, tiny_overrides, write_jsonl
from tuna_jax import parallel
from tuna_jax.config import ConfigError, LoraConfig, load_config
from tuna_jax.data.layouts import LayoutCollator
from tuna_jax.model import lora
from tuna_jax.model.llama import LlamaConfig
from tuna_jax.train import ParamBinder, _sums, train

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TINY_RANKING = str(REPO / "configs" / "tiny_ranking.yaml")


def _examples(n=6, n_cand=3, seed=0, vocab=60):
    from tuna_jax.data.batching import TokenizedExample

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        resp = [np.asarray(list(rng.integers(3, vocab, int(rng.integers(1, 8)))) + [2], np.int32)
                for _ in range(n_cand)]
        mle = np.asarray(list(rng.integers(3, vocab, int(rng.integers(1, 8)))) + [2], np.int32)
        prompt = np.asarray([1] + list(rng.integers(3, vocab, int(rng.integers(1, 8)))), np.int32)
        out.append(TokenizedExample(prompt, resp, rng.normal(size=n_cand).astype(np.float32), mle, f"e{i}"))
    return out


def _random_params(lcfg, seed):
    """Random parameters of the tiny model from numpy (Llama's own initialisation compiles for seconds):
    N(0, 0.05) weights, norm scales 1 + N(0, 0.1)."""
    from tuna_jax.model.llama import abstract_model

    rng = np.random.default_rng(seed)
    shapes = nnx.to_pure_dict(nnx.state(abstract_model(lcfg), nnx.Param))

    def one(path, s):
        norm = any("norm" in str(getattr(k, "key", k)) for k in path)
        return jnp.asarray((1.0 if norm else 0.0) + (0.1 if norm else 0.05) * rng.normal(size=s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(one, shapes)


def _setup(mode="ranking", layout="prefix_shared", attention="xla", scan=True, param_dtype="float32",
           train_also=(), seed=0, fresh=False):
    """(cfg, binder, frozen params, trainable, batch) on the tiny random model; the adapters as
    ``split_for_training`` makes them when ``fresh``, else with a random B and moved extras."""
    cfg = load_config(None, [f"train.mode={mode}", f"data.layout={layout}", "data.num_candidates=3",
                             "data.max_len=24", "data.pad_to_multiple=8", "data.attention_block=8",
                             "lora.rank=3", "lora.alpha=6", f"lora.train_also={list(train_also)}"])
    lcfg = LlamaConfig.from_hf(TINY_HF, attention=attention, scan_layers=scan, param_dtype=param_dtype)
    binder = ParamBinder(lcfg)
    frozen = _random_params(lcfg, seed)
    spec = lora.LoraSpec.from_config(cfg.lora)
    frozen, trainable = lora.split_for_training(lcfg, frozen, spec, seed=1)
    coll = LayoutCollator(layout, "sft" if mode == "sft" else "ranking", 24, 0, 3,
                          "all" if mode == "prm" else "original", pad_to_multiple=8, attention_block=8)
    ex = _examples()
    batch = jax.tree.map(jnp.asarray, coll(ex, coll.plan([ex])))
    if fresh:
        return cfg, binder, frozen, trainable, batch
    rng = np.random.default_rng(2)
    for t in spec.targets:  # B = 0 would hide every dA (and A's role in the merge)
        b = trainable["adapters"][t]["b"]
        trainable["adapters"][t]["b"] = jnp.asarray(0.05 * rng.normal(size=b.shape), jnp.float32)
    trainable["params"] = jax.tree.map(lambda x: x * 1.1, trainable["params"])
    return cfg, binder, frozen, trainable, batch


# ---- exactness -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("attention,scan,param_dtype", [
    ("xla", False, "bfloat16"), pytest.param("einsum", True, "float32", marks=pytest.mark.slow)])
def test_fresh_adapters_leave_the_model_bitwise_unchanged(attention, scan, param_dtype):
    """B = 0 (how adapters start): the LoRA model's log-likelihoods and logits are the frozen model's, bit
    for bit (scanned or unrolled layers, any attention path, a bf16 base)."""
    from tuna_jax.logprobs import example_logprobs

    cfg, binder, frozen, fresh, batch = _setup(attention=attention, scan=scan, param_dtype=param_dtype, fresh=True)
    spec = lora.LoraSpec.from_config(cfg.lora)
    assert all(float(jnp.abs(ab["a"]).max()) > 0 for ab in fresh["adapters"].values())  # A is random, B zero
    assert all(float(jnp.abs(ab["b"]).max()) == 0 for ab in fresh["adapters"].values())
    ids = batch["input_ids"].reshape(-1, batch["input_ids"].shape[-1])

    def outputs(model):
        return example_logprobs(model, batch, 4)[0], model(ids)

    with_lora = jax.jit(lambda f, t: outputs(lora.LoraBinder(binder, f, spec).bind(t)))(frozen, fresh)
    plain = jax.jit(lambda f: outputs(binder.bind(f)))(frozen)
    for a, b in zip(with_lora, plain):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def _brute_force_model(binder, frozen, trainable, spec):
    """The merged weights materialised in numpy-style jnp, W + alpha/r * A @ B for every layer at once, bound
    with the plain binder: no LoraWeight, no per-layer merging."""
    params = jax.tree.map(lambda x: x, frozen)
    for t, ab in trainable["adapters"].items():
        path, _ = lora.TARGETS[t]
        node = params
        for p in path[:-1]:
            node = node[p]
        w = node[path[-1]]
        node[path[-1]] = w + spec.scale * jnp.einsum("nir,nro->nio", ab["a"], ab["b"]).reshape(w.shape)
    for path, value in flatten_dict(trainable["params"]).items():
        node = params
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value
    return binder.bind(params)


# One case per mode, the three layouts, both attentions and an unscanned stack among them (each case is a
# compile of the LoRA step and of the merged model: ~30 s of CI time).
@pytest.mark.parametrize("mode,layout,attention,scan", [
    ("ranking", "packed", "xla", True), ("ranking", "padded", "einsum", False), ("sft", "packed", "xla", True),
    ("prm", "prefix_shared", "xla", True)])
@pytest.mark.slow
def test_adapter_gradients_equal_the_merged_weight_brute_force(mode, layout, attention, scan):
    """d loss / d (A, B, trained norms) of the LoRA step = autodiff through W + s A B materialised, 1e-5."""
    cfg, binder, frozen, trainable, batch = _setup(mode, layout, attention, scan, train_also=("norms",))
    spec = lora.LoraSpec.from_config(cfg.lora)
    head = {"w": 0.1 * jnp.ones((binder.cfg.hidden_size,)), "b": jnp.zeros((1,))}

    def ours(t, f):
        lb = lora.LoraBinder(binder, f, spec)
        return _sums(lb, {"backbone": t, "head": head} if mode == "prm" else t, batch, cfg)["loss"]

    def brute(t, f):
        from tuna_jax.objectives import batch_sums

        model = _brute_force_model(binder, f, t, spec)
        return batch_sums(model, batch, cfg, head=head if mode == "prm" else None)["loss"]

    loss, grads = jax.jit(jax.value_and_grad(ours))(trainable, frozen)
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(brute))(trainable, frozen)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    assert set(flatten_dict(grads)) == set(flatten_dict(trainable))  # adapters and norms: nothing of the base
    for path, g in flatten_dict(grads).items():
        r = flatten_dict(ref_grads)[path]
        assert float(jnp.abs(r).max()) > 0, path
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * float(jnp.abs(r).max()), err_msg=str(path))


# ---- what is trained, and where it lives ------------------------------------------------------------------

@pytest.mark.slow
def test_only_adapters_have_optimizer_state_and_they_follow_the_rules_table():
    """The train state of a LoRA run holds the adapters (and lora.train_also) only, AdamW's moments for them
    only, each placed by the rules table: A's input dim split like W's (embed on fsdp), B's output dim like
    W's (heads on tensor), the rank replicated."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 emulated devices")
    from tuna_jax.config import OptimConfig
    from tuna_jax.train import init_opt_state, make_optimizer

    mesh = parallel.make_mesh((1, 4, 2))
    lcfg = LlamaConfig.from_hf(TINY_HF)
    spec = lora.LoraSpec(4, 8.0, ALL, ("norms",))
    from tuna_jax.model.llama import abstract_model

    shardings = nnx.to_pure_dict(parallel.state_shardings(nnx.state(abstract_model(lcfg), nnx.Param), mesh))
    params = jax.tree.map(jax.device_put, _random_params(lcfg, 0), shardings)
    with jax.set_mesh(mesh):
        frozen, trainable = lora.split_for_training(lcfg, params, spec, seed=0, mesh=mesh)
        tx, _ = make_optimizer(OptimConfig(lr=1e-3), 10)
        opt = init_opt_state(tx, trainable, mesh)
    assert frozen is params  # the base as loaded, not copied
    n_adapter = sum(x.size for x in jax.tree.leaves(trainable["adapters"]))
    n_norms = sum(x.size for x in jax.tree.leaves(trainable["params"]))
    assert n_norms == 2 * 2 * 32 + 32  # two norms per layer and the final one
    assert sum(x.size for x in jax.tree.leaves(opt) if x.ndim) == 2 * (n_adapter + n_norms)  # AdamW's mu, nu
    q = trainable["adapters"]["q_proj"]
    assert q["a"].shape == (2, 32, 4) and q["b"].shape == (2, 4, 4 * 8)
    P = jax.sharding.PartitionSpec
    assert q["a"].sharding.spec == P(None, "fsdp") and q["b"].sharding.spec == P(None, None, "tensor")
    o = trainable["adapters"]["o_proj"]
    assert o["a"].sharding.spec == P(None, "tensor") and o["b"].sharding.spec == P(None, None, "fsdp")
    adam = opt[1][0]
    assert adam.mu["adapters"]["q_proj"]["a"].sharding == q["a"].sharding


@pytest.mark.parametrize("override,message", [
    ("lora.dropout=0.1", "lora.dropout=0.1: not supported"),
    ("lora.targets=[q_proj,qproj]", r"lora.targets\[1\]='qproj': choose one of q_proj"),
    ("lora.train_also=[head]", r"lora.train_also\[0\]='head': choose one of norms, lm_head"),
    ("lora.rank=-1", "lora.rank=-1: must be >= 0"),
])
def test_bad_lora_settings_are_one_line_before_anything_runs(tmp_path, override, message):
    overrides = tiny_overrides(tmp_path, n_train=8, model__path=tmp_path, lora__rank=4) + [override]
    with pytest.raises(ConfigError, match=message):
        train(load_config(TINY_RANKING, overrides))
    assert not (tmp_path / "run").exists()


def test_reference_model_needs_lora_and_lora_needs_a_saved_base(tmp_path):
    with pytest.raises(ConfigError, match="loss.reference=model needs LoRA"):
        train(load_config(TINY_RANKING, tiny_overrides(tmp_path, n_train=8, loss__reference="model")))
    with pytest.raises(ConfigError, match="lora.rank=4 needs model.path"):
        train(load_config(TINY_RANKING, tiny_overrides(tmp_path, n_train=8, lora__rank=4)))
    assert not (tmp_path / "run").exists()
    assert LoraConfig().targets == list(ALL)


# ---- PEFT: the adapter format, and an independent forward and backward pass --------------------------------

def _torch_logprob_sums(model, ids, mask):
    import torch

    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.float()
    lp = torch.log_softmax(out[:, :-1], -1).gather(-1, torch.tensor(ids)[:, 1:, None])[..., 0]
    return (lp * torch.tensor(mask[:, 1:], dtype=torch.float32)).sum(-1)


def _peft_name(key: str) -> str:
    """Our exported tensor name -> the parameter PEFT loads it into (adapter "default")."""
    for part in ("lora_A", "lora_B"):
        if f".{part}." in key:
            return key.replace(f".{part}.", f".{part}.default.")
    module, param = key.rsplit(".", 1)
    return f"{module}.modules_to_save.default.{param}"


@pytest.mark.parametrize("family,targets,extras,kw", [
    ("llama", ALL, ("norms", "lm_head"), {}),
    pytest.param("qwen3", ALL, ("norms", "lm_head"), {"num_key_value_heads": 2}, marks=pytest.mark.slow),  # q/k norms
    pytest.param("gpt_neox", ("o_proj", "up_proj", "down_proj"), ("norms",), {}, marks=pytest.mark.slow)])  # HF names
@pytest.mark.slow
def test_peft_loads_the_adapter_folder_and_agrees_forward_and_backward(tmp_path, family, targets, extras, kw):
    """An adapter folder (adapters, trained norms and LM head) is what ``PeftModel.from_pretrained`` loads
    onto the HF base; PEFT's log-likelihoods and its gradients w.r.t. every lora_A / lora_B and saved
    module equal ours; ``load_model`` of the folder (base + merge) gives the same log-likelihoods."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.support.hf_utils import save_hf, tiny_family_model
    from tuna_jax.logprobs import sequence_logprobs
    from tuna_jax.model import load_model

    base_dir = save_hf(tiny_family_model(family, seed=3, **kw), tmp_path / "base")
    base = load_model(base_dir)
    binder = ParamBinder(base.cfg)
    spec = lora.LoraSpec(3, 6.0, targets, extras)
    frozen, trainable = lora.split_for_training(base.cfg, binder.to_pure(base), spec, seed=0)
    trainable["adapters"] = {t: {"a": ab["a"], "b": 0.05 * jax.random.normal(jax.random.key(i), ab["b"].shape)}
                             for i, (t, ab) in enumerate(trainable["adapters"].items())}
    trainable["params"] = jax.tree.map(lambda x: x * 1.05 + 0.01, trainable["params"])
    out = lora.save_adapter(tmp_path / "adapter", trainable, spec, base.cfg, base=str(base_dir))
    doc = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (doc["r"], doc["lora_alpha"], doc["base_model_name_or_path"]) == (3, 6.0, str(base_dir))
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    if family == "llama":
        assert sorted(doc["target_modules"]) == sorted(ALL) and doc["modules_to_save"] == ["norm", "lm_head"]
        assert tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (3, 32)  # [r, in]
        assert tensors["base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"].shape == (32, 3)  # [out, r]
        assert tensors["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (3, 48)

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 128, (3, 12)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 9:] = 0  # right padding in one row

    def ours(t):
        model = lora.LoraBinder(binder, frozen, spec).bind(t)
        return sequence_logprobs(model, jnp.asarray(ids, jnp.int32), jnp.asarray(mask))[0]

    our_lp, vjp = jax.vjp(ours, trainable)
    (grads,) = vjp(jnp.ones_like(our_lp))
    hf = AutoModelForCausalLM.from_pretrained(str(base_dir), torch_dtype=torch.float32)
    peft = PeftModel.from_pretrained(hf, str(out), is_trainable=True)
    peft_lp = _torch_logprob_sums(peft, ids, mask)
    peft_lp.sum().backward()
    np.testing.assert_allclose(np.asarray(our_lp), peft_lp.detach().numpy(), rtol=1e-5, atol=1e-4)

    # Our gradients written by the same export as the adapters land on PEFT's names and layouts.
    lora.save_adapter(tmp_path / "grads", grads, spec, base.cfg, base=None)
    our_grads = load_file(str(tmp_path / "grads" / "adapter_model.safetensors"))
    named = dict(peft.named_parameters())
    assert our_grads.keys() == tensors.keys()
    for key, g in our_grads.items():
        theirs = named[_peft_name(key)].grad.numpy()
        assert np.abs(theirs).max() > 0, key
        np.testing.assert_allclose(g, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max(), err_msg=key)

    merged = load_model(out)  # the folder as every command reads it: base loaded, adapters merged
    merged_lp = sequence_logprobs(merged, jnp.asarray(ids, jnp.int32), jnp.asarray(mask))[0]
    np.testing.assert_allclose(np.asarray(merged_lp), np.asarray(our_lp), rtol=1e-6, atol=1e-5)


def test_a_fused_projection_is_refused_before_training():
    """GPT-NeoX fuses q, k and v in one HF weight: adapters on them would have no PEFT form."""
    from tests.support.hf_utils import tiny_family_config

    cfg = LlamaConfig.from_hf(tiny_family_config("gpt_neox").to_dict())
    with pytest.raises(Exception, match=r"\['q_proj', 'v_proj'\].*fused query_key_value"):
        lora.check_peft(cfg, lora.LoraSpec(4, 8.0, ("q_proj", "v_proj")))
    with pytest.raises(Exception, match=r"calls its LM head 'embed_out.weight'"):
        lora.check_peft(cfg, lora.LoraSpec(4, 8.0, ("o_proj",), ("lm_head",)))
    lora.check_peft(cfg, lora.LoraSpec(4, 8.0, ("o_proj", "up_proj", "down_proj"), ("norms",)))


# ---- training runs: adapters-only checkpoints, exact resume, the exports, the reference ---------------------

@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from tuna_jax.assets import stories260k_hf_dir

    return stories260k_hf_dir(tmp_path_factory.getbasetemp() / "tuna-cache")


def _lora_cfg(tmp_path, base_dir, name, n_train=48, **extra):
    settings = dict(model__path=base_dir, model__hf_config="null", data__max_len=256, lora__rank=4, lora__alpha=8,
                    lora__train_also="[norms]", optim__lr=1e-2, train__save_every=2, train__output_dir=tmp_path / name)
    return load_config(TINY_RANKING, tiny_overrides(tmp_path, n_train=n_train, **{**settings, **extra}))


@pytest.mark.slow
def test_adapter_checkpoints_resume_exactly_and_export_for_peft(tmp_path, base_dir):
    """A LoRA run stopped by SIGTERM and resumed ends with exactly the adapters of an uninterrupted run. Its
    checkpoints hold the adapters, the trained norms and their AdamW moments only; its final/ is a PEFT
    folder that every command loads (base + merge), ``convert orbax-to-hf --merge`` writes the same model
    as Hugging Face weights, and PEFT on the HF base scores what our merged export scores (1e-4)."""
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from tuna_jax.cli import main as cli
    from tuna_jax.model import load_model
    from tuna_jax.train import Interrupted

    full = train(_lora_cfg(tmp_path, base_dir, "full"))

    def stop_at_3(step, _metrics):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Interrupted):
        train(_lora_cfg(tmp_path, base_dir, "stopped"), on_step=stop_at_3)
    resumed = train(_lora_cfg(tmp_path, base_dir, "stopped"), resume=True)
    assert resumed.step == full.step == 6
    steps = [m["step"] for m in read_metrics(tmp_path / "stopped") if m["split"] == "train"]
    assert steps == list(range(1, 7))
    ours = load_file(str(tmp_path / "full" / "final" / "adapter_model.safetensors"))
    again = load_file(str(tmp_path / "stopped" / "final" / "adapter_model.safetensors"))
    assert ours.keys() == again.keys() and all(np.array_equal(ours[k], again[k]) for k in ours)  # bit for bit
    assert max(float(np.abs(v).max()) for k, v in ours.items() if "lora_B" in k) > 0  # the adapters trained

    for step_dir in (tmp_path / "stopped" / "checkpoints").iterdir():
        keys = json.loads((step_dir / "state" / "_METADATA").read_text())["tree_metadata"]
        saved = [k for k in keys if "params" in k or "'mu'" in k or "'nu'" in k]
        assert saved and all("'adapters'" in k or "layernorm'" in k or "('norm'" in k or "'norm', 'weight'" in k
                             for k in saved), saved
        assert not any("embed_tokens" in k or "lm_head" in k for k in keys)

    final = tmp_path / "full" / "final"
    assert cli(["convert", "orbax-to-hf", str(final), str(tmp_path / "merged"), "--merge"]) == 0
    assert cli(["convert", "orbax-to-hf", str(final), str(tmp_path / "peft"), "--like", str(base_dir)]) == 0
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 512, (2, 16)).astype(np.int64)
    mask = np.ones_like(ids)
    with torch.no_grad():
        hf_base = LlamaForCausalLM.from_pretrained(str(base_dir), torch_dtype=torch.float32)
        peft_lp = _torch_logprob_sums(PeftModel.from_pretrained(hf_base, str(tmp_path / "peft")), ids, mask).numpy()
        merged = LlamaForCausalLM.from_pretrained(str(tmp_path / "merged"), torch_dtype=torch.float32)
        merged_lp = _torch_logprob_sums(merged, ids, mask).numpy()
        base_lp = _torch_logprob_sums(LlamaForCausalLM.from_pretrained(str(base_dir), torch_dtype=torch.float32),
                                      ids, mask).numpy()
    np.testing.assert_allclose(peft_lp, merged_lp, rtol=0, atol=1e-4)
    assert np.abs(peft_lp - base_lp).max() > 1e-2  # the adapters change the model

    from tuna_jax.logprobs import sequence_logprobs

    ours_lp = sequence_logprobs(load_model(final), jnp.asarray(ids, jnp.int32), jnp.asarray(mask))[0]
    np.testing.assert_allclose(np.asarray(ours_lp), merged_lp, rtol=0, atol=1e-4)
    # Every command takes the adapter folder (base + adapters, merged at load): `score` as an example.
    rows = write_jsonl(tmp_path / "cands.jsonl", [{"instruction": "Say hi.", "candidates": ["Hi.", "Hello there."]}])
    for model, out in ((final, "adapter.jsonl"), (tmp_path / "merged", "merged.jsonl")):
        assert cli(["score", str(model), str(rows), str(tmp_path / out)]) == 0
    got, want = (json.loads((tmp_path / f).read_text())["logprob_sum"] for f in ("adapter.jsonl", "merged.jsonl"))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_reference_model_is_the_frozen_base_scored_in_the_step(tmp_path, base_dir):
    """loss.reference=model with LoRA (the base, adapters off, scored in the same step: no file, no second
    model) trains exactly as loss.reference=data with the base's scores from `tuna-jax score` (1e-5), at
    every step, also after the adapters have moved the model away from its base."""
    from tuna_jax.cli import main as cli
    from tuna_jax.data.synthetic import ranking_records

    ranked = write_jsonl(tmp_path / "ranked.jsonl", ranking_records(24, seed=3))
    assert cli(["score", str(base_dir), str(ranked), str(tmp_path / "scores.jsonl")]) == 0
    assert cli(["reference-scores", str(ranked), str(tmp_path / "scores.jsonl"), str(tmp_path / "ref.jsonl")]) == 0
    common = dict(loss__form="dpo_pairs", loss__score="sum", loss__beta=0.5, lora__train_also="[]",
                  train__save_every=100, train__export="false")
    data = train(_lora_cfg(tmp_path, base_dir, "data", loss__reference="data",
                           data__train=tmp_path / "ref.jsonl", **common))
    model = train(_lora_cfg(tmp_path, base_dir, "model", loss__reference="model", data__train=ranked, **common))
    assert data.step == model.step == 3
    a = [m for m in read_metrics(tmp_path / "data") if m["split"] == "train"]
    b = [m for m in read_metrics(tmp_path / "model") if m["split"] == "train"]
    for x, y in zip(a, b):
        for k in ("loss", "rank_loss", "mle_loss", "grad_norm"):
            assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-5), (x["step"], k)
    assert abs(b[0]["rank_loss"] - np.log(2)) < 1e-5  # step 1: the model is its base, every pair costs log 2
    assert abs(b[-1]["rank_loss"] - np.log(2)) > 1e-3  # later the adapters have moved it

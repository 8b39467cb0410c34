"""Gradient accumulation, rematerialisation, the layer scan and FSDP change memory, never the result.

Each is compared with the plain step (one micro-batch, no remat, scanned layers, one device) on the same
global batches, through the real pieces a run uses: ``make_collator`` (with the run's ``micro_batches``),
``BatchIterator``, ``make_optimizer`` and the jitted ``make_train_step``; a recording transformation
chained before the optimizer hands back each step's gradients.

Tolerances, float32. What differs is summation order (the padded and prefix_shared micro-batches are row
slices of the very same batch arrays; only the grouping of the sums changes):
* logged means (loss, rank/MLE loss, pair accuracy, grad norm): 1e-6 absolute or relative, whichever is
  larger (measured: at most 2.4e-7 absolute below 1, 3.2e-7 relative above);
* gradients: 1e-6 absolute, times the step's gradient norm where that exceeds 1 (measured: 2.7e-7 for SFT
  and ranking; PRM steps reach norm 7.4 and differ by 2.2e-6 on embed_tokens entries of up to 0.9);
* parameters after 3 AdamW steps: 1e-6 absolute (measured: 4.1e-7) with ``optim.eps=1e-4``. With the
  default 1e-8 they differ by up to 2.5e-5: Adam divides each gradient entry by |g| + eps, so an entry
  whose gradient cancels to ~eps (a down_proj entry: -2.53e-8 in one batch, -2.62e-8 summed over 4
  micro-batches) turns summation-order noise of 1e-9 into ~1% of a learning-rate step.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tests.support.train_utils import REPO, TINY_HF, final_params, read_metrics, tiny_overrides
from tests.unit.data.test_layouts import make_examples
from tuna_jax import parallel
from tuna_jax.config import load_config
from tuna_jax.data.batching import BatchIterator
from tuna_jax.data.layouts import LayoutCollator
from tuna_jax.model.llama import REMAT_POLICIES, LlamaConfig, abstract_model
from tuna_jax.model.params import ParamBinder
from tuna_jax.model.reward import init_head
from tuna_jax.objectives import batch_sums, summarize
from tuna_jax.train import init_opt_state, make_collator, make_optimizer, make_train_step, train

# LLVM's optimisation level only (XLA's HLO passes are the default's): compiles ~2.5x faster on CPU.
# Both sides of every comparison are compiled the same way.
FAST = {"xla_backend_optimization_level": 0}
STEPS, BATCH, N, MAX_LEN = 3, 16, 3, 24
TOL = 1e-6


def _config(layout="packed", mode="ranking", accum=1):
    """One shape per run (pad_to_multiple=0, one shape bucket), so one compile per configuration."""
    return load_config(None, [
        f"train.mode={mode}", f"data.layout={layout}", f"data.num_candidates={N}", f"data.max_len={MAX_LEN}",
        "data.pad_to_multiple=0", "data.shape_buckets=1", "data.attention_block=8", f"train.grad_accum={accum}",
        f"train.global_batch={BATCH}", "optim.lr=3e-3", "optim.warmup_steps=0", "optim.eps=1e-4"])


@functools.lru_cache(maxsize=None)
def _examples(mode: str) -> list:
    ex = make_examples(BATCH * STEPS, N, seed=0, vocab=TINY_HF["vocab_size"], max_len=MAX_LEN)
    if mode == "sft":
        ex = [dataclasses.replace(e, responses=e.responses[:1], scores=None, mle=None) for e in ex]
    return ex


def _lcfg(**runtime) -> LlamaConfig:
    return LlamaConfig.from_hf(TINY_HF, **runtime)


@functools.lru_cache(maxsize=None)
def _host_params() -> dict:
    """Random parameters as NumPy (no init compile): weights N(0, 0.02), norm scales 1 + N(0, 0.1)."""
    rng = np.random.default_rng(0)

    def draw(path, abstract):
        if "norm" in jax.tree_util.keystr(path):
            return (1.0 + rng.normal(0, 0.1, abstract.shape)).astype(np.float32)
        return rng.normal(0, 0.02, abstract.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, ParamBinder.to_pure(abstract_model(_lcfg())))


def _placed_params(mesh, mode: str) -> dict:
    """The parameters on ``mesh`` by the rules table (FSDP-sharded on fsdp > 1), as ``train`` holds them."""
    graphdef, state = nnx.split(abstract_model(_lcfg()))
    nnx.replace_by_pure_dict(state, _host_params())
    params = ParamBinder.to_pure(nnx.merge(graphdef, parallel.place_state(state, mesh)))
    if mode == "prm":
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        params = {"backbone": params, "head": jax.device_put(init_head(TINY_HF["hidden_size"], 0), replicated)}
    return params


def _recording():
    """A pass-through transformation whose state is the last gradients it saw."""
    return optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p), lambda g, _s, _p=None: (g, g))


@functools.lru_cache(maxsize=None)
def _train(layout="packed", mode="ranking", accum=1, mesh_spec="1,1,1") -> dict:
    """STEPS steps of the real train step -> per step the logged means and the gradients, and the final
    parameters, all on the host. Cached: a reference serves several tests."""
    cfg = _config(layout, mode, accum)
    n_devices = int(np.prod([int(x) for x in mesh_spec.split(",")]))
    mesh = parallel.make_mesh(mesh_spec, jax.devices()[:n_devices])
    n_data = mesh.shape["data"] * mesh.shape["fsdp"]
    it = BatchIterator(_examples(mode), make_collator(cfg, 0, n_data, accum), BATCH, seed=0, num_epochs=1)
    binder = ParamBinder(_lcfg())
    out = {"metrics": [], "grads": []}
    with jax.set_mesh(mesh):
        params = _placed_params(mesh, mode)
        tx, schedule = make_optimizer(cfg.optim, STEPS)
        tx = optax.chain(_recording(), tx)
        state = {"params": params, "opt_state": init_opt_state(tx, params, mesh),
                 "step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(jax.random.key(0))}
        step = None
        for batch in it:
            batch = parallel.shard_batch(batch, mesh)
            if step is None:  # one shape per run: one compile
                step = jax.jit(make_train_step(binder, cfg, tx, schedule)).lower(state, batch).compile(FAST)
            state, metrics = step(state, batch)
            metrics = jax.device_get(metrics)
            assert bool(metrics.pop("finite"))
            out["metrics"].append(dict(summarize(metrics), grad_norm=float(metrics["grad_norm"])))
            out["grads"].append(jax.tree.map(np.asarray, state["opt_state"][0]))
        out["params"] = jax.tree.map(np.asarray, state["params"])
    assert len(out["metrics"]) == STEPS
    return out


def _assert_trees_close(got, ref, what: str, atol: float = TOL) -> None:
    """Every entry of every leaf within ``atol`` (gradients, parameters)."""
    assert jax.tree.structure(got) == jax.tree.structure(ref)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=0, atol=atol, err_msg=f"{what} {jax.tree_util.keystr(path)}")


def _assert_same_run(got: dict, ref: dict, what: str) -> None:
    for s, (g, r) in enumerate(zip(got["metrics"], ref["metrics"]), 1):
        assert g.keys() == r.keys()
        for k in r:
            np.testing.assert_allclose(g[k], r[k], rtol=TOL, atol=TOL, err_msg=f"{what}: step {s} {k}")
        _assert_trees_close(got["grads"][s - 1], ref["grads"][s - 1], f"{what}: step {s} gradient",
                            TOL * max(1.0, r["grad_norm"]))
    _assert_trees_close(got["params"], ref["params"], f"{what}: parameters")
    # not vacuous: the steps moved the parameters by far more than the tolerance
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(ref["params"]),
                                                           jax.tree.leaves(_host_params())))
    assert moved > 1000 * TOL


def _quick_and_slow(cases, quick) -> list:
    """pytest parameters: ``quick`` runs by default, the others are marked slow (a compile or two each)."""
    return [c if c == quick else pytest.param(*c, marks=pytest.mark.slow) for c in cases]


# ---- gradient accumulation ------------------------------------------------------------------

CASES = [("packed", "ranking"), ("padded", "ranking"), ("prefix_shared", "ranking"), ("padded", "sft"),
         ("prefix_shared", "sft"), ("packed", "sft"), ("packed", "prm")]
QUICK = ("packed", "ranking", 4)  # the layout that packs each micro-batch into its own rows


# Every layout and mode at 2 micro-batches, and 4 on the packed ranking layout (the one whose rows change with
# the micro-batch size; 4 on the others added 35 s of CI time and never caught what 2 did not).
@pytest.mark.parametrize("layout,mode,accum", _quick_and_slow([(*c, 2) for c in CASES] + [QUICK], QUICK))
def test_grad_accumulation_equals_one_batch(layout, mode, accum):
    """grad_accum 2 (and 4) give grad_accum 1's losses, gradients and parameters on the same global batches;
    packed batches are packed per micro-batch (other rows), and the same examples must still meet."""
    _assert_same_run(_train(layout, mode, accum), _train(layout, mode, 1), f"{layout} {mode} grad_accum={accum}")


def test_packed_micro_batches_must_not_straddle_hosts():
    """A packed host packs whole micro-batches, so the micro-batch count must be a multiple or a divisor
    of the host count; otherwise a micro-batch would mix rows of two hosts' packing (a clear error)."""
    ex = make_examples(24, N, seed=1)
    for micro, hosts in ((3, 2), (2, 3)):
        coll = LayoutCollator("packed", "ranking", MAX_LEN, 0, N, micro_batches=micro, unit_multiple=micro)
        it = BatchIterator(ex, coll, 12, seed=0, num_epochs=1, process_index=0, process_count=hosts)
        with pytest.raises(ValueError, match=rf"grad_accum={micro}.*{hosts} hosts"):
            next(it)


# ---- FSDP -----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("accum", [1, 2])
def test_fsdp8_equals_one_device(accum):
    """On 8 emulated devices with parameters, gradients and optimizer state split fsdp=8 (and with
    grad_accum 2: micro-batches of 8 prompts, one per device) the run is the one-device run."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 emulated devices")
    got = _train("packed", "ranking", accum, "1,8,1")
    _assert_same_run(got, _train("packed", "ranking", 1), f"fsdp=8 grad_accum={accum}")


# ---- rematerialisation and the layer scan ---------------------------------------------------

def _remat_policies(jaxpr) -> list:
    """The ``policy`` of every jax.checkpoint in a jaxpr, nested jaxprs (scan bodies) included."""
    out = []
    for eqn in jaxpr.eqns:
        if "policy" in eqn.params and "prevent_cse" in eqn.params:
            out.append(eqn.params["policy"])
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    out += _remat_policies(sub)
    return out


@functools.lru_cache(maxsize=None)
def _loss_and_grads(policy: str, scan: bool) -> tuple:
    """Mean ranking loss of one batch and its gradients under a remat policy and layer mode; the remat
    policies in the forward jaxpr; the compiled gradient program's temporary bytes."""
    cfg = _config("prefix_shared", "ranking")
    binder = ParamBinder(_lcfg(remat_policy=policy, scan_layers=scan))
    coll = make_collator(cfg, 0)
    ex = _examples("ranking")[:BATCH]
    batch = jax.tree.map(jnp.asarray, coll(ex, coll.plan([ex])))
    params = jax.tree.map(jnp.asarray, _host_params())

    def loss(p, b):
        sums = batch_sums(binder.bind(p), b, cfg)
        return sums["loss"] / sums["count"]

    compiled = jax.jit(jax.value_and_grad(loss)).lower(params, batch).compile(FAST)
    value, grads = compiled(params, batch)
    policies = _remat_policies(jax.make_jaxpr(loss)(params, batch).jaxpr)
    return float(value), jax.tree.map(np.asarray, grads), policies, compiled.memory_analysis().temp_size_in_bytes


REMAT_CASES = [(p, s) for s in (True, False) for p in ["none", *REMAT_POLICIES] if (p, s) != ("none", True)]


@pytest.mark.parametrize("policy,scan", _quick_and_slow(REMAT_CASES, ("full", True)))
def test_remat_and_layer_scan_give_the_same_loss_and_gradients(policy, scan):
    """Every remat policy, with the layers scanned or unrolled, gives the loss and gradients of no remat
    with scanned layers; and the policy reaches the program (not silently dropped)."""
    value, grads, policies, temp = _loss_and_grads(policy, scan)
    ref_value, ref_grads, ref_policies, ref_temp = _loss_and_grads("none", True)
    assert abs(value - ref_value) <= TOL
    _assert_trees_close(grads, ref_grads, f"remat {policy} scan {scan}: gradient")
    added = list(policies)  # the checkpoints beyond the reference's (logprobs.py remats its LM-head pass)
    for p in ref_policies:
        added.remove(p)
    assert added == ([] if policy == "none" else [REMAT_POLICIES[policy]])  # one: around the layer body
    if scan and policy != "none":  # and it saves memory: fewer activations kept for the backward pass
        assert temp < ref_temp, (temp, ref_temp)


# ---- end to end -----------------------------------------------------------------------------

@pytest.mark.slow
def test_train_with_grad_accum_logs_the_same_losses_and_exports_the_same_params(tmp_path):
    """``train()`` on the 8 emulated devices (fsdp=8, packed rows): grad_accum=2 logs grad_accum=1's
    losses in metrics.jsonl and exports its parameters."""
    runs = {}
    for accum in (1, 2):
        (tmp_path / str(accum)).mkdir()
        cfg = load_config(str(REPO / "configs" / "tiny_ranking.yaml"), tiny_overrides(
            tmp_path / str(accum), n_train=48, train__global_batch=16, train__grad_accum=accum, optim__eps=1e-4,
            data__layout="packed", data__shape_buckets=1, train__save_every=1000))
        result = train(cfg)
        runs[accum] = ([m for m in read_metrics(result.output_dir) if m["split"] == "train"],
                       final_params(result.output_dir))
    (logged, params), (ref_logged, ref_params) = runs[2], runs[1]
    assert [m["step"] for m in logged] == [m["step"] for m in ref_logged] == [1, 2, 3]
    for m, r in zip(logged, ref_logged):
        for k in ("loss", "rank_loss", "mle_loss", "pair_accuracy", "grad_norm", "tokens"):
            np.testing.assert_allclose(m[k], r[k], rtol=TOL, atol=TOL, err_msg=f"step {r['step']} {k}")
    _assert_trees_close(params, ref_params, "exported parameter")

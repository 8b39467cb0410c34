"""Training: the train state, one jitted sharded step (SFT or ranking), the loop, checkpoints.

Modes
* ``sft``: token-mean negative log-likelihood of the responses (Alpaca stage).
* ``ranking``: per prompt, L = L_rank(v, target) + lambda * L_MLE, averaged over prompts
  (Tuna_p / Tuna_c / Tuna). v_k is the per-token mean log-likelihood of candidate k
  (``losses.py``); candidates and the MLE target go through the model in one forward pass.

The step sums losses and gradients over ``grad_accum`` micro-batches with ``lax.scan`` and
divides by the global count at the end, so accumulation changes memory, never the result.
Parameters, gradients and optimizer state are pure dicts of arrays sharded by the rules table;
the batch is split over data x fsdp, each host loading only its own rows.

Resume is exact: a checkpoint holds params, optimizer state, step, RNG and the data iterator
position; ``--resume`` continues from the latest one and trims the metrics log back to it, so
every step appears exactly once.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from flax import nnx

from tuna_jax import parallel
from tuna_jax.config import Config
from tuna_jax.io import paths
from tuna_jax.io.errors import RunStopped
from tuna_jax.io.linelog import LineLog
from tuna_jax.logprobs import example_logprobs
from tuna_jax.losses import mle_loss, pair_accuracy, ranking_loss, sequence_scores
from tuna_jax.model.checkpoint import TrainCheckpointer, save_params
from tuna_jax.model.llama import Llama, LlamaConfig
from tuna_jax.model.params import ParamBinder

log = logging.getLogger(__name__)


class TrainingDiverged(RunStopped):
    """Loss or gradient norm became NaN/inf; the last good checkpoint is kept. Exit status 3."""

    exit_status = 3


class Interrupted(RunStopped):
    """SIGTERM/SIGINT arrived (at any host of a multi-host run); a checkpoint of the last finished step
    was written, by every host at the same step. Exit status 128 + the signal's number (143 for SIGTERM)."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint saved; "
                         f"rerun the same command (train: with --resume) to continue")
        self.signum, self.step, self.exit_status = signum, step, 128 + signum


# ---- optimizer -------------------------------------------------------------------------

def make_schedule(ocfg, total_steps: int) -> optax.Schedule:
    """Linear warmup to lr over ``warmup_steps``, then cosine/linear decay to lr*end_lr_ratio
    at ``total_steps`` (or constant)."""
    warm = max(0, min(ocfg.warmup_steps, total_steps))
    decay = max(1, total_steps - warm)
    end = ocfg.lr * ocfg.end_lr_ratio
    if ocfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(ocfg.lr, decay, alpha=ocfg.end_lr_ratio)
    elif ocfg.schedule == "linear":
        after = optax.linear_schedule(ocfg.lr, end, decay)
    else:
        after = optax.constant_schedule(ocfg.lr)
    if warm == 0:
        return after
    # optax counts from 0; step s uses lr (s+1)/warm during warmup so the first step is not lr=0.
    return optax.join_schedules([optax.linear_schedule(ocfg.lr / warm, ocfg.lr, warm - 1) if warm > 1
                                 else optax.constant_schedule(ocfg.lr), after], [warm])


def make_optimizer(ocfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(ocfg, total_steps)
    parts = [optax.clip_by_global_norm(ocfg.grad_clip)] if ocfg.grad_clip > 0 else []
    parts.append(optax.adamw(schedule, b1=ocfg.b1, b2=ocfg.b2, eps=ocfg.eps, weight_decay=ocfg.weight_decay))
    return optax.chain(*parts), schedule


def init_opt_state(tx: optax.GradientTransformation, params: dict, mesh) -> Any:
    """``tx.init(params)`` with each per-parameter leaf (AdamW's mu and nu) sharded like its parameter
    and the rest (step counts) replicated: the layout the train step returns. A plain
    ``jax.jit(tx.init)`` replicates the zeros on every device (nothing ties them to the parameters),
    so the first step would hold the whole optimizer state per device, compile a second time for the
    sharded state it returns, and a resume would restore onto the replicated layout."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shardings = optax.tree_map_params(tx, lambda _, p: p.sharding, jax.eval_shape(tx.init, params), params,
                                      transform_non_params=lambda _: replicated)
    return jax.jit(tx.init, out_shardings=shardings)(params)


# ---- losses over a batch ---------------------------------------------------------------

def batch_sums(model: Llama, batch: dict, cfg: Config, head: dict | None = None,
               reference: Llama | None = None) -> dict[str, jax.Array]:
    """Summed losses and counters of one (micro-)batch in any layout; dividing by ``count`` gives means.

    ``batch`` is a :mod:`tuna_jax.data.layouts` batch (B examples, N candidates; every example has
    N + 1 sequence slots, slot N the separate MLE target). The candidates and the MLE target go
    through the model in one forward pass whatever the layout.
    SFT: count = scored tokens. Ranking: count = real prompts (``example_mask``). PRM
    (``head`` given): the ranking loss on the reward head's scores of the candidates, no MLE term.
    ``reference``: the frozen model whose scores are v_ref when ``loss.reference=model`` (LoRA's base).
    """
    lc = cfg.loss
    n = cfg.data.num_candidates if cfg.train.mode != "sft" else 0
    ex = batch["example_mask"].astype(jnp.float32)  # [B]
    if cfg.train.mode == "prm":
        from tuna_jax.model.reward import layout_rewards

        r, valid = layout_rewards(model, head, batch, n + 1)[:, :n], batch["candidate_mask"]  # [B, N]
        rank = ranking_loss(r, batch["target"], valid, margin=lc.margin, form=lc.form, beta=lc.beta)
        correct, counted = pair_accuracy(r, batch["target"], valid)
        return {"loss": jnp.sum(rank * ex), "rank_loss": jnp.sum(rank * ex), "mle_loss": jnp.zeros(()),
                "pairs_correct": jnp.sum(correct * ex), "pairs": jnp.sum(counted * ex), "count": jnp.sum(ex),
                "tokens": jnp.sum(batch["real_tokens"])}
    lp, cnt = example_logprobs(model, batch, n + 1, chunk=lc.chunk, budget_mb=lc.logits_budget_mb)  # [B, N+1]
    tokens = jnp.sum(batch["real_tokens"])
    if cfg.train.mode == "sft":
        return {"loss": -jnp.sum(lp[:, 0] * ex), "count": jnp.sum(cnt[:, 0] * ex), "tokens": tokens}

    target = batch["target"]  # [B, N]
    power = 1.0 if lc.score == "mean" else 0.0  # per-token mean (Tuna) or summed log-probs (DPO)
    v, valid = sequence_scores(lp[:, :n], cnt[:, :n], batch["candidate_mask"], length_power=power)
    v_ref = None
    if lc.reference == "data":  # a frozen model's scores, stored with the data (no second model in memory)
        v_ref, _ = sequence_scores(batch["ref_logprob_sum"], batch["ref_num_tokens"], valid, length_power=power)
    elif lc.reference == "model":  # the frozen base (LoRA, adapters off) scores the same batch; no gradient
        ref_lp, ref_cnt = example_logprobs(reference, batch, n + 1, chunk=lc.chunk, budget_mb=lc.logits_budget_mb)
        v_ref, _ = sequence_scores(jax.lax.stop_gradient(ref_lp[:, :n]), ref_cnt[:, :n], valid, length_power=power)
    rank = ranking_loss(v, target, valid, margin=lc.margin, form=lc.form, beta=lc.beta, v_ref=v_ref)  # [B]
    if lc.mle_target == "all":
        mle = mle_loss(lp[:, :n], cnt[:, :n], valid)
    else:  # the separate MLE sequence (original) or the best candidate's slot (best)
        at = jnp.maximum(batch["mle_slot"], 0)[:, None]
        mle = mle_loss(jnp.take_along_axis(lp, at, -1)[:, 0], jnp.take_along_axis(cnt, at, -1)[:, 0])
    correct, counted = pair_accuracy(v, target, valid)
    total = lc.rank_weight * rank + lc.mle_weight * mle  # rank_loss is logged unweighted
    return {"loss": jnp.sum(total * ex), "rank_loss": jnp.sum(rank * ex), "mle_loss": jnp.sum(mle * ex),
            "pairs_correct": jnp.sum(correct * ex), "pairs": jnp.sum(counted * ex), "count": jnp.sum(ex),
            "tokens": tokens}


def summarize(sums: dict) -> dict[str, float]:
    """Turn summed counters into the logged means."""
    sums = {k: float(v) for k, v in sums.items()}
    count = max(sums.get("count", 0.0), 1.0)
    out = {"loss": sums["loss"] / count}
    if "rank_loss" in sums:
        out.update(rank_loss=sums["rank_loss"] / count, mle_loss=sums["mle_loss"] / count,
                   pair_accuracy=sums["pairs_correct"] / max(sums["pairs"], 1.0), pairs=sums["pairs"])
    out["tokens"] = sums["tokens"]
    return out


# ---- the step ---------------------------------------------------------------------------

def make_train_step(binder: ParamBinder, cfg: Config, tx: optax.GradientTransformation,
                    schedule: optax.Schedule) -> Callable:
    accum = cfg.train.grad_accum

    def loss_fn(params, micro):
        sums = _sums(binder, params, micro, cfg)
        return sums["loss"], sums

    def step(state: dict, batch: dict, stop: jax.Array | None = None):
        params = state["params"]
        micro = jax.tree.map(lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch)

        def one(carry, mb):
            g_acc, s_acc = carry
            (_, sums), g = jax.value_and_grad(loss_fn, has_aux=True)(params, mb)
            return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, s_acc, sums)), None

        zero_sums = jax.tree.map(lambda x: jnp.zeros((), jnp.float32),
                                 jax.eval_shape(lambda p, mb: loss_fn(p, mb)[1], params,
                                                jax.tree.map(lambda x: x[0], micro)))
        zero_g = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        (grads, sums), _ = jax.lax.scan(one, (zero_g, zero_sums), micro)
        denom = jnp.maximum(sums["count"], 1.0)
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, params)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        ok = jnp.isfinite(sums["loss"]) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
        new_state = {"params": keep(new_params, params), "opt_state": keep(opt_state, state["opt_state"]),
                     "step": state["step"] + 1, "rng": state["rng"]}
        metrics = dict(sums, grad_norm=grad_norm, lr=schedule(state["step"]), finite=ok)
        if stop is not None:  # multi-host stop agreement (see ``train``): the largest signal any host caught
            metrics["stop"] = jnp.max(stop)
        return new_state, metrics

    return step


def make_eval_step(binder: ParamBinder, cfg: Config) -> Callable:
    return lambda params, batch: _sums(binder, params, batch, cfg)


def _sums(binder: ParamBinder, params: dict, batch: dict, cfg: Config) -> dict:
    """batch_sums of the model the params describe: a LLaMA, or (PRM) {"backbone", "head"}."""
    if cfg.train.mode == "prm":
        return batch_sums(binder.bind(params["backbone"]), batch, cfg, head=params["head"])
    reference = binder.bind_reference() if cfg.loss.reference == "model" else None  # a LoraBinder's base
    return batch_sums(binder.bind(params), batch, cfg, reference=reference)


# ---- data ------------------------------------------------------------------------------

def load_tokenizer_and_policy(cfg: Config):
    from tuna_jax.data.templates import SpecialTokenPolicy, load_tokenizer

    path = cfg.model.tokenizer or cfg.model.path
    if path is None:
        raise ValueError("no tokenizer: set model.tokenizer (a tokenizer folder or tokenizer.model) "
                         "when the model is randomly initialised")
    tok = load_tokenizer(path)
    policy = SpecialTokenPolicy(add_bos=cfg.data.add_bos, add_eos=cfg.data.add_eos)
    if cfg.data.eos_as_bos:
        policy = policy.reference_quirk(tok)
    return tok, policy


def tokenize_source(path, cfg: Config, tok, policy, report=None, max_examples: int | None = None):
    """Read one source or a list of them, optionally subsample, tokenise. -> (examples, report)."""
    from tuna_jax.data.batching import tokenize_ranking, tokenize_sft
    from tuna_jax.data.records import read_records

    d = cfg.data
    kind = "sft" if cfg.train.mode == "sft" else "ranking"
    records = []
    for source in [path] if isinstance(path, str) else list(path):
        got, report = read_records(source, kind=kind, on_error=d.on_error, format=d.format, beta=d.beta, report=report)
        records += got
    if max_examples is not None and len(records) > max_examples:
        keep = np.sort(np.random.default_rng(cfg.train.seed).permutation(len(records))[:max_examples])
        records = [records[i] for i in keep]
    if kind == "sft":
        return tokenize_sft(records, tok, policy, d.max_len, truncate=d.truncate, on_error=d.on_error, report=report)
    return tokenize_ranking(records, tok, policy, d.max_len, d.num_candidates, mle_target=_mle_target(cfg),
                            truncate=d.truncate, on_error=d.on_error, report=report,
                            reference=cfg.loss.reference == "data")


def _mle_target(cfg: Config) -> str:
    """The PRM has no MLE term: its batches carry the candidates only."""
    return "all" if cfg.train.mode == "prm" else cfg.loss.mle_target


def make_collator(cfg: Config, pad_id: int, local_devices: int = 1, micro_batches: int = 1):
    """The layout collator of ``data.layout``: packed rows per host are a multiple of this host's
    data-parallel devices x ``micro_batches`` (the gradient-accumulation steps a batch is split into)."""
    from tuna_jax.data.layouts import LayoutCollator

    d = cfg.data
    return LayoutCollator(d.layout, "sft" if cfg.train.mode == "sft" else "ranking", d.max_len, pad_id,
                          d.num_candidates, _mle_target(cfg),
                          pad_to_multiple=d.pad_to_multiple, row_len=d.row_len,
                          unit_multiple=local_devices * micro_batches, attention_block=d.attention_block,
                          micro_batches=micro_batches, shape_buckets=d.shape_buckets)


def train_batches(cfg: Config, examples, pad_id: int, local_devices: int = 1, process_index: int = 0,
                  process_count: int = 1):
    """The run's :class:`~tuna_jax.data.batching.BatchIterator` over ``examples``, as ``train`` steps
    through it (``local_devices``: this host's data x fsdp devices)."""
    from tuna_jax.data.batching import BatchIterator

    tc = cfg.train
    return BatchIterator(examples, make_collator(cfg, pad_id, local_devices, tc.grad_accum), tc.global_batch,
                         seed=tc.seed, num_epochs=tc.epochs, process_index=process_index, process_count=process_count)


def planned_shapes(cfg: Config, examples, local_devices: int = 1, process_count: int = 1) -> list:
    """The batch shapes (``BatchShape``, per host, smallest first) a run of ``cfg`` over these tokenised
    ``examples`` compiles its step for: at most ``data.shape_buckets``, planned from the data."""
    return train_batches(cfg, examples, 0, local_devices, 0, process_count).planned_shapes()


# ---- compilation -----------------------------------------------------------------------

_CACHE_IN_USE: list = [None]  # the folder this module last pointed JAX's persistent cache at


def use_compile_cache(setting: str | bool) -> str | None:
    """Point JAX's persistent compilation cache at ``train.compile_cache`` and return the folder (None: off).

    ``True``: the folder JAX is already given (``JAX_COMPILATION_CACHE_DIR``, a pipeline's
    ``compilation_cache``), else ``$XDG_CACHE_HOME/tuna-jax/xla`` (``~/.cache/tuna-jax/xla``): one per
    user, so a rerun, a resume and every run of the same shapes (seeds, a method and its control) load
    the step instead of compiling it. A path: that folder. ``False``: no persistent cache. Every compile
    is cached, however quick (CPU steps compile in seconds, and they add up). The cache is set once per
    process; pointing it elsewhere resets JAX's handle on it, so the new folder takes effect."""
    from jax.experimental.compilation_cache import compilation_cache

    if setting is False:
        want = None
    elif setting is True:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        want = jax.config.jax_compilation_cache_dir or os.path.join(xdg, "tuna-jax", "xla")
    else:
        want = os.path.expanduser(str(setting))
    if want != _CACHE_IN_USE[0] or want != jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", want)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # -1: no size limit, and JAX keeps it
        compilation_cache.reset_cache()
        _CACHE_IN_USE[0] = want
    return want


class CompileAhead:
    """Compiles the train step for each of the run's batch shapes on one background thread, in the order
    the run first needs them, while the steps before run: the first step waits for its own compile only.

    ``batches``: one host batch of each shape (``BatchIterator.upcoming`` / ``batch_at``); ``extra``:
    the step's other arguments after the batch. The compiled executables land in the jitted function's
    own cache (``jit(f).lower(...).compile()`` fills the cache a call with the same shapes and shardings
    reads), so the loop keeps calling ``step_fn``; it calls :meth:`wait` first, so that a call never
    compiles a shape the thread is still compiling. A thread rather than compiling every shape up
    front: on an accelerator the host compiles while the device steps, so only the first compile delays
    the first step."""

    def __init__(self, step_fn, state, batches: list[dict], mesh, extra: tuple = ()):
        from concurrent.futures import ThreadPoolExecutor

        spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding,  # noqa: E731
                                              weak_type=getattr(x, "weak_type", False))
        self.state, self.extra = jax.tree.map(spec, state), jax.tree.map(spec, extra)
        self.step_fn, self.mesh = step_fn, mesh
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="compile-ahead")
        self.futures = {}
        for b in batches:
            abstract = self._global(b)
            key = self._key(abstract)
            if key not in self.futures:
                self.futures[key] = self.pool.submit(self._compile, abstract)

    def _global(self, batch: dict) -> dict:
        """A host batch's global shapes, placed as ``parallel.shard_batch`` places them."""
        n = jax.process_count()
        return {k: jax.ShapeDtypeStruct((v.shape[0] * n,) + v.shape[1:], v.dtype,
                                        sharding=parallel.batch_sharding(self.mesh, v.ndim)) for k, v in batch.items()}

    @staticmethod
    def _key(batch: dict) -> tuple:
        return tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items()))

    def _compile(self, batch: dict) -> None:
        with jax.set_mesh(self.mesh):  # the mesh context is per thread
            self.step_fn.lower(self.state, batch, *self.extra).compile()

    def ready(self, batch: dict) -> bool:
        """Whether :meth:`wait` would return at once."""
        future = self.futures.get(self._key(batch))
        return future is None or future.done()

    def wait(self, batch: dict) -> None:
        """Block until the step for this (sharded) batch's shapes is compiled; re-raise its error."""
        future = self.futures.get(self._key(batch))
        if future is not None:
            future.result()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


# ---- metrics ---------------------------------------------------------------------------

class MetricsWriter:
    """metrics.jsonl (one object per logged step; a LineLog, so it may be in cloud storage) and TensorBoard
    when tensorboardX is there."""

    def __init__(self, out_dir, resume_step: int | None, tensorboard: bool):
        self.path = out_dir / "metrics.jsonl"
        self.log = LineLog(self.path)
        self.active = jax.process_index() == 0
        if self.active and resume_step is not None:
            # Steps after the checkpoint ran before the kill and will run again: drop them.
            kept = [ln for ln in self.log.read_lines()
                    if ln.strip() and _step_of(ln) is not None and _step_of(ln) <= resume_step]
            self.log.rewrite(kept)
        elif self.active and resume_step is None:
            self.log.rewrite([])
        self.tb = None
        if self.active and tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                pass

    def write(self, record: dict) -> None:
        if not self.active:
            return
        self.log.append(json.dumps(record))
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{record.get('split', 'train')}/{k}", v, record["step"])

    def close(self):
        if self.active:
            self.log.close()
        if self.tb is not None:
            self.tb.close()


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


# ---- the loop --------------------------------------------------------------------------

@dataclasses.dataclass
class TrainResult:
    step: int
    metrics: dict
    eval_metrics: dict | None
    output_dir: str
    export_dir: str | None
    first_eval: dict | None = None  # the held-out metrics before the first step (when there is an eval set)


def _host(x):
    return jax.device_get(x)


def _load_or_init_model(cfg: Config, mesh) -> Llama:
    from tuna_jax.model import load_model

    m = cfg.model
    runtime = dict(dtype=m.dtype, param_dtype=m.param_dtype, scan_layers=m.scan_layers, remat_policy=m.remat_policy,
                   attention=m.attention)
    if m.path:
        return load_model(m.path, mesh, **runtime)
    if not m.hf_config:
        raise ValueError("model.path (a HF folder or params checkpoint) or model.hf_config (random init) is required")
    lcfg = LlamaConfig.from_hf(m.hf_config, **runtime)
    return parallel.init_sharded(lambda: Llama(lcfg, nnx.Rngs(cfg.train.seed)), mesh)


def train(cfg: Config, resume: bool = False, on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Run the configured stage. ``on_step(step, metrics)`` is a hook for tests and tools."""
    from tqdm import tqdm

    tc = cfg.train
    out_dir = paths.resolve(tc.output_dir)  # local or gs://...; made only once data and model are good
    use_compile_cache(tc.compile_cache)  # before the first compile
    parallel.initialize_distributed()
    mesh = parallel.make_mesh(tc.mesh)
    n_data = mesh.shape["data"] * mesh.shape["fsdp"]
    if tc.global_batch % tc.grad_accum:
        raise ValueError(f"train.global_batch={tc.global_batch} is not divisible by train.grad_accum={tc.grad_accum}")
    if (tc.global_batch // tc.grad_accum) % n_data:
        raise ValueError(f"a micro-batch of {tc.global_batch // tc.grad_accum} prompts does not divide over "
                         f"data x fsdp = {n_data} devices; change train.global_batch, train.grad_accum or train.mesh")

    if cfg.lora.rank or cfg.loss.reference == "model":
        from tuna_jax.model.lora import check_run_config

        check_run_config(cfg)  # LoRA's settings, before any data or model is read
    tok, policy = load_tokenizer_and_policy(cfg)
    if not cfg.data.train:
        raise ValueError("data.train is not set: give the training data (a JSON/JSONL file, hf:NAME or tfds:NAME)")
    train_examples, report = tokenize_source(cfg.data.train, cfg, tok, policy, max_examples=cfg.data.max_examples)
    eval_examples = None
    if cfg.data.eval:
        eval_examples, report = tokenize_source(cfg.data.eval, cfg, tok, policy, report)
    elif cfg.data.eval_fraction > 0:
        k = max(1, int(len(train_examples) * cfg.data.eval_fraction))
        order = np.random.default_rng(tc.seed + 1).permutation(len(train_examples))
        eval_examples = [train_examples[i] for i in order[:k]]
        train_examples = [train_examples[i] for i in order[k:]]
    if report.num_skipped or getattr(report, "changed", None):
        print(report.summary(), file=sys.stderr)

    from tuna_jax.data.batching import BatchIterator

    local_data = max(1, n_data // jax.process_count())
    eval_collator = make_collator(cfg, tok.pad_id, local_data)  # evaluation batches are not split
    it = train_batches(cfg, train_examples, tok.pad_id, local_data, jax.process_index(), jax.process_count())
    it.planned_shapes()  # every batch's shape (host work), planned before the model is loaded
    total_steps = tc.epochs * it.steps_per_epoch
    if tc.max_steps:
        total_steps = min(total_steps, tc.max_steps)

    with jax.set_mesh(mesh):
        model = _load_or_init_model(cfg, mesh)
        binder = ParamBinder(model.cfg)
        tx, schedule = make_optimizer(cfg.optim, total_steps)
        params = binder.to_pure(model)
        lora_run = None
        if cfg.lora.rank:  # LoRA: the base is frozen; only adapters (and lora.train_also) are trained and saved
            from tuna_jax.model.lora import LoraRun

            lora_run = LoraRun(cfg, binder, params, mesh)
            params = lora_run.trainable
        if tc.mode == "prm":  # the backbone and a fresh reward head, trained together
            from tuna_jax.model.reward import init_head

            replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            head = {k: jax.device_put(v, replicated) for k, v in init_head(model.cfg.hidden_size, tc.seed).items()}
            params = {"backbone": params, "head": head}
        del model
        on_mesh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())  # as the step returns them
        state = {"params": params, "opt_state": init_opt_state(tx, params, mesh),
                 "step": jax.device_put(jnp.zeros((), jnp.int32), on_mesh),
                 "rng": jax.device_put(jax.random.key_data(jax.random.key(tc.seed)), on_mesh)}

        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt = TrainCheckpointer(out_dir / "checkpoints", keep=tc.keep_checkpoints, async_save=tc.async_checkpoints)
        start_step = 0
        if resume and ckpt.latest_step() is not None:
            abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
            del state
            state, meta = ckpt.restore(abstract)
            it.restore(meta["data"])
            start_step = int(_host(state["step"]))
            print(f"resumed from {ckpt.directory} at step {start_step}", file=sys.stderr)
        if jax.process_index() == 0:  # one writer: a bucket object takes about one write a second
            paths.write_atomic(out_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))

        if lora_run is None:
            step_fn = jax.jit(make_train_step(binder, cfg, tx, schedule), donate_argnums=(0,))
            eval_fn = jax.jit(make_eval_step(binder, cfg))
        else:  # the same steps over a binder that puts the adapters on the frozen base, passed to every call
            step_fn, eval_fn = lora_run.jit_steps(lambda b: make_train_step(b, cfg, tx, schedule),
                                                  lambda b: make_eval_step(b, cfg))
        writer = MetricsWriter(out_dir, start_step if resume else None, tc.tensorboard)
        if not resume:  # what reading the data changed, as step 0 of the log (a resume keeps that line)
            writer.write({"step": 0, "split": "data", "identical_pairs": report.changed["identical_candidates"],
                          "rows_all_identical": report.changed["all_candidates_identical"]})

        stop_signal: list[int] = []
        previous = {s: signal.signal(s, lambda signum, _f: stop_signal.append(signum))
                    for s in (signal.SIGTERM, signal.SIGINT)}
        # Every host must stop at the same step: the save is collective, so a host saving while another
        # steps on hangs both (gloo on CPU aborts). One host acts on its own signal at once. With several,
        # each host feeds the signal it caught (0: none) into its next step, which takes the largest over
        # all hosts (a scalar all-reduce beside the gradients', no extra host round trip), and every host
        # stops when it reads that step's metrics: at the same step, one step later than one host would.
        agree = jax.process_count() > 1
        stop = [] if agree else stop_signal  # the signal this host acts on
        # The step compiled for each shape the rest of the run takes, on a thread, in the order it needs them.
        ahead = CompileAhead(step_fn, state, [it.batch_at(e, i) for e, i in it.upcoming(total_steps - start_step)],
                             mesh, (parallel.host_value(0, mesh),) if agree else ())

        def run_eval(step: int) -> dict | None:
            if not eval_examples:
                return None
            ev = BatchIterator(eval_examples, eval_collator, tc.global_batch // tc.grad_accum, shuffle=False,
                               num_epochs=1, drop_remainder=False, process_index=jax.process_index(),
                               process_count=jax.process_count())
            totals: dict = {}
            for batch in ev:
                sums = _host(eval_fn(state["params"], parallel.shard_batch(batch, mesh)))
                totals = {k: totals.get(k, 0.0) + float(v) for k, v in sums.items()}
            result = summarize(totals)
            writer.write({"step": step, "split": "eval", **result})
            return result

        last, eval_metrics, first_eval, step = {}, None, None, start_step
        bar = tqdm(total=total_steps, initial=start_step, desc=cfg.name or tc.mode, unit="step",
                   disable=not tc.progress or jax.process_index() != 0, file=sys.stderr)
        # Metrics are fetched one step late: step n+1 is dispatched before step n's metrics are
        # pulled to the host, so the device never waits for Python (logging, the next batch).
        # step_time is the wall time between two consecutive steps' results (steady-state throughput;
        # the first step includes compilation). Checkpoints, evaluation and stops sync first, so a
        # checkpoint is only written for a step whose loss and gradient were finite.
        pending: list = []  # [(step, metrics on device)]
        clock = [time.perf_counter()]

        def finish() -> None:
            nonlocal last
            done, dev_metrics = pending.pop(0)
            metrics = _host(dev_metrics)
            agreed = int(metrics.pop("stop", 0))
            if agreed and not stop:
                stop.append(agreed)
            now = time.perf_counter()
            dt, clock[0] = now - clock[0], now
            if not bool(metrics.pop("finite")):
                ckpt.wait()
                raise TrainingDiverged(
                    f"step {done}: loss={float(metrics['loss'])} grad_norm={float(metrics['grad_norm'])} is not "
                    f"finite; stopped without applying it. The last good checkpoint is step "
                    f"{ckpt.latest_step()} in {ckpt.directory}. Try a lower optim.lr, optim.grad_clip, or "
                    f"model.dtype=float32, and check the data around this step.")
            last = summarize(metrics)
            last.update(step=done, lr=float(metrics["lr"]), grad_norm=float(metrics["grad_norm"]),
                        step_time=dt, tokens_per_s=last["tokens"] / dt, epoch=it.epoch)
            if done % tc.log_every == 0 or done == total_steps:
                writer.write({"split": "train", **last})
            bar.update(1)
            bar.set_postfix(loss=f"{last['loss']:.4f}")
            if on_step:
                on_step(done, last)

        try:
            if eval_examples and step == 0:
                first_eval = run_eval(0)  # the starting point, so a run's gain is visible in its own log
            clock[0] = time.perf_counter()
            while step < total_steps:
                batch = parallel.shard_batch(next(it), mesh)
                if not ahead.ready(batch):  # a new shape still compiling: report the steps done meanwhile
                    while pending:
                        finish()
                ahead.wait(batch)
                flag = (parallel.host_value(stop_signal[0] if stop_signal else 0, mesh),) if agree else ()
                state, metrics = step_fn(state, batch, *flag)
                step += 1
                pending.append((step, metrics))
                if len(pending) > 1:
                    finish()
                do_eval = bool(tc.eval_every and step % tc.eval_every == 0)
                do_save = step % tc.save_every == 0 or step == total_steps
                halt = bool(stop)  # read once: a signal landing later in this iteration stops the next one
                if do_eval or do_save or halt:
                    while pending:
                        finish()
                if do_eval:
                    eval_metrics = run_eval(step)
                    clock[0] = time.perf_counter()
                if halt:
                    ckpt.save(step, state, {"data": it.state(), "step": step}, force=True)
                    ckpt.wait()
                    raise Interrupted(stop[0], step)
                if do_save:
                    ckpt.save(step, state, {"data": it.state(), "step": step})
            while pending:
                finish()
            if eval_examples and (not tc.eval_every or step % tc.eval_every):
                eval_metrics = run_eval(step)
        finally:
            ahead.close()
            bar.close()
            ckpt.close()
            writer.close()
            for s, h in previous.items():
                signal.signal(s, h)

        export_dir = None
        first_eval = first_eval or _logged_eval(out_dir, 0)  # a resumed run's starting point is in its log
        if tc.export and tc.mode == "prm":  # the PRM folder format (model/reward.py)
            from tuna_jax.model.reward import ProxyRankingModel, eval_summary

            meta = {"base_model": str(cfg.model.path), "max_len": cfg.data.max_len, "add_bos": cfg.data.add_bos,
                    "add_eos": cfg.data.add_eos, "train": cfg.to_dict(),
                    "metrics": {"start_eval": eval_summary(first_eval), "final_eval": eval_summary(eval_metrics),
                                "last_train": last}}
            prm = ProxyRankingModel(state["params"] if lora_run is None else lora_run.merged_prm(state["params"]),
                                    binder.cfg, meta, mesh)
            export_dir = str(prm.save(out_dir / "final", tokenizer_src=_tokenizer_dir(cfg)))
        elif tc.export and lora_run is not None:  # a PEFT adapter folder that records its base
            export_dir = str(lora_run.save(out_dir / "final", state["params"], tokenizer_src=_tokenizer_dir(cfg)))
        elif tc.export:
            model = binder.bind(state["params"])
            export_dir = str(save_params(out_dir / "final", model, tokenizer_src=_tokenizer_dir(cfg)))
    return TrainResult(step=step, metrics=last, eval_metrics=eval_metrics, output_dir=str(out_dir),
                       export_dir=export_dir, first_eval=first_eval)


def _logged_eval(out_dir, step: int) -> dict | None:
    """The eval record of ``step`` in ``out_dir/metrics.jsonl`` (a resumed run's starting point)."""
    path = out_dir / "metrics.jsonl"
    if not paths.is_file(path):
        return None
    for line in paths.read_text(path).splitlines():
        rec = json.loads(line) if line.strip() else {}
        if rec.get("split") == "eval" and rec.get("step") == step:
            return {k: v for k, v in rec.items() if k not in ("split", "step")}
    return None


def _tokenizer_dir(cfg: Config) -> str | None:
    path = cfg.model.tokenizer or cfg.model.path
    if path is None:
        return None
    return os.fspath(path) if paths.is_dir(path) else paths.parent(path)

"""Training: the train state, one jitted sharded step, and the run: :func:`setup` (data, model, state,
steps), :func:`loop` (steps, evaluation, checkpoints, stops) and :func:`export`. What differs between SFT,
ranking and the PRM is one row of ``objectives.OBJECTIVES``.

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
import hashlib
import importlib.util
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
from tuna_jax.model.checkpoint import TrainCheckpointer, save_params
from tuna_jax.model.llama import Llama, LlamaConfig
from tuna_jax.model.params import ParamBinder
from tuna_jax.objectives import batch_sums, objective, summarize

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
    if objective(cfg).reward_head:
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

    d, obj = cfg.data, objective(cfg)
    kind = obj.records
    records = []
    for source in [path] if isinstance(path, str) else list(path):
        got, report = read_records(source, kind=kind, on_error=d.on_error, format=d.format, beta=d.beta, report=report,
                                   rescore_beta=d.rescore_beta)
        records += got
    if max_examples is not None and len(records) > max_examples:
        keep = np.sort(np.random.default_rng(cfg.train.seed).permutation(len(records))[:max_examples])
        records = [records[i] for i in keep]
    if kind == "sft":
        return tokenize_sft(records, tok, policy, d.max_len, truncate=d.truncate, on_error=d.on_error, report=report)
    return tokenize_ranking(records, tok, policy, d.max_len, d.num_candidates, mle_target=obj.mle_target(cfg),
                            truncate=d.truncate, on_error=d.on_error, report=report,
                            reference=cfg.loss.reference == "data")


def make_collator(cfg: Config, pad_id: int, local_devices: int = 1, micro_batches: int = 1):
    """The layout collator of ``data.layout``: packed rows per host are a multiple of this host's
    data-parallel devices x ``micro_batches`` (the gradient-accumulation steps a batch is split into)."""
    from tuna_jax.data.layouts import LayoutCollator

    d, obj = cfg.data, objective(cfg)
    return LayoutCollator(d.layout, obj.records, d.max_len, pad_id, d.num_candidates, obj.mle_target(cfg),
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
    """metrics.jsonl (one object per logged step; a LineLog, so it may be in cloud storage), TensorBoard when
    tensorboardX is there, and Weights & Biases with ``wandb`` (a run of :func:`start_wandb`): the same records,
    each number as SPLIT/KEY at its step."""

    def __init__(self, out_dir, resume_step: int | None, tensorboard: bool, wandb=None):
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
        self.wandb = wandb if self.active else None

    def write(self, record: dict) -> None:
        if not self.active:
            return
        self.log.append(json.dumps(record))
        scalars = {f"{record.get('split', 'train')}/{k}": v for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, record["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def close(self):
        if self.active:
            self.log.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def start_wandb(cfg, out_dir):
    """The Weights & Biases run of ``train.wandb``: named ``train.run_name`` (default: output_dir's last folder), with
    the run's config as its config. Its id is a hash of output_dir, so a resumed run logs to the same W&B run; W&B
    keeps the steps the killed run logged after its last checkpoint (metrics.jsonl drops them) and ignores them when
    they are logged again (its steps only go forward). WANDB_MODE, WANDB_DIR and WANDB_ENTITY apply as usual."""
    import wandb

    tc = cfg.train
    name = tc.run_name or str(out_dir).rstrip("/").rsplit("/", 1)[-1]
    run_id = hashlib.sha256(str(out_dir).encode("utf-8")).hexdigest()[:16]
    return wandb.init(project=tc.wandb_project, name=name, id=run_id, resume="allow", config=cfg.to_dict())


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


class StopSignals:
    """SIGTERM/SIGINT during training, and the step every host stops at (a context manager: the handlers are
    this run's only).

    Every host must stop at the same step: the save is collective, so a host saving while another steps on
    hangs both (gloo on CPU aborts). One host acts on its own signal at once. With several, each host feeds
    the signal it caught (0: none) into its next step (:meth:`step_args`), which takes the largest over all
    hosts (a scalar all-reduce beside the gradients', no extra host round trip), and every host stops when
    it reads that step's metrics (:meth:`heard`): at the same step, one step later than one host would."""

    def __init__(self, mesh):
        self.mesh, self.caught = mesh, []  # the signals this host caught
        self.agree = jax.process_count() > 1
        self.acted = [] if self.agree else self.caught  # the signal every host acts on

    def __enter__(self) -> "StopSignals":
        self.previous = {s: signal.signal(s, lambda signum, _f: self.caught.append(signum))
                         for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)

    def step_args(self, abstract: bool = False) -> tuple:
        """The step's arguments after the batch: this host's signal, when the hosts must agree."""
        if not self.agree:
            return ()
        return (parallel.host_value(0 if abstract or not self.caught else self.caught[0], self.mesh),)

    def heard(self, metrics: dict) -> None:
        """Read the agreed signal out of a step's host metrics (``metrics["stop"]``, removed)."""
        agreed = int(metrics.pop("stop", 0))
        if agreed and not self.acted:
            self.acted.append(agreed)

    @property
    def signum(self) -> int | None:
        return self.acted[0] if self.acted else None


class DelayedMetrics:
    """A step's metrics fetched one step late: step n+1 is dispatched before step n's metrics come to the
    host, so the device never waits for Python (logging, the next batch). ``on_ready(step, metrics, dt)``
    gets each step's host metrics in order, dt the wall time between two consecutive steps' results
    (steady-state throughput; the first step includes compilation). :meth:`drain` before checkpoints,
    evaluation and stops, so a checkpoint is only written for a step whose loss and gradient were finite."""

    def __init__(self, on_ready: Callable[[int, dict, float], None]):
        self.on_ready, self.pending = on_ready, []
        self.restart_clock()

    def restart_clock(self) -> None:
        self.clock = time.perf_counter()

    def push(self, step: int, metrics: dict) -> None:
        self.pending.append((step, metrics))
        if len(self.pending) > 1:
            self._one()

    def drain(self) -> None:
        while self.pending:
            self._one()

    def _one(self) -> None:
        step, metrics = self.pending.pop(0)
        metrics = _host(metrics)
        now = time.perf_counter()
        dt, self.clock = now - self.clock, now
        self.on_ready(step, metrics, dt)


@dataclasses.dataclass
class Run:
    """What :func:`setup` makes for :func:`loop` and :func:`export`: the data, the state, the jitted steps and
    the run's writers."""

    cfg: Config
    mesh: Any
    out_dir: Any
    it: Any  # the BatchIterator of this host's training batches
    eval_examples: list | None
    eval_collator: Any
    total_steps: int
    start_step: int
    binder: ParamBinder
    lora_run: Any  # model.lora.LoraRun, or None
    state: dict  # {"params", "opt_state", "step", "rng"}
    step_fn: Callable
    eval_fn: Callable
    ckpt: TrainCheckpointer
    writer: "MetricsWriter"


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
    use_compile_cache(cfg.train.compile_cache)  # before the first compile
    parallel.initialize_distributed()
    mesh = parallel.make_mesh(cfg.train.mesh)
    with jax.set_mesh(mesh):
        run = setup(cfg, mesh, resume)
        try:
            step, last, eval_metrics, first_eval = loop(run, on_step)
        finally:
            run.ckpt.close()
            run.writer.close()
        if first_eval is None and run.eval_examples and run.start_step:  # a resumed run's starting point: its log
            first_eval = _logged_eval(run.out_dir, 0)
        export_dir = export(run, last, first_eval, eval_metrics) if cfg.train.export else None
    return TrainResult(step=step, metrics=last, eval_metrics=eval_metrics, output_dir=str(run.out_dir),
                       export_dir=export_dir, first_eval=first_eval)


def setup(cfg: Config, mesh, resume: bool) -> Run:
    """Check the config, read and tokenise the data, plan every batch, then load the model, build (or
    restore) the train state and jit the steps. Nothing is written before the data and model are good."""
    tc, obj = cfg.train, objective(cfg)
    out_dir = paths.resolve(tc.output_dir)  # local or gs://...
    n_data = mesh.shape["data"] * mesh.shape["fsdp"]
    if tc.global_batch % tc.grad_accum:
        raise ValueError(f"train.global_batch={tc.global_batch} is not divisible by train.grad_accum={tc.grad_accum}")
    if (tc.global_batch // tc.grad_accum) % n_data:
        raise ValueError(f"a micro-batch of {tc.global_batch // tc.grad_accum} prompts does not divide over "
                         f"data x fsdp = {n_data} devices; change train.global_batch, train.grad_accum or train.mesh")
    if cfg.lora.rank or cfg.loss.reference == "model":
        from tuna_jax.model.lora import check_run_config

        check_run_config(cfg)  # LoRA's settings, before any data or model is read
    if tc.wandb and importlib.util.find_spec("wandb") is None:
        raise ValueError("train.wandb=true needs Weights & Biases: pip install wandb (or set train.wandb=false)")
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

    local_data = max(1, n_data // jax.process_count())
    it = train_batches(cfg, train_examples, tok.pad_id, local_data, jax.process_index(), jax.process_count())
    it.planned_shapes()  # every batch's shape (host work), planned before the model is loaded
    total_steps = tc.epochs * it.steps_per_epoch
    if tc.max_steps:
        total_steps = min(total_steps, tc.max_steps)

    model = _load_or_init_model(cfg, mesh)
    binder = ParamBinder(model.cfg)
    tx, schedule = make_optimizer(cfg.optim, total_steps)
    params = binder.to_pure(model)
    lora_run = None
    if cfg.lora.rank:  # LoRA: the base is frozen; only adapters (and lora.train_also) are trained and saved
        from tuna_jax.model.lora import LoraRun

        lora_run = LoraRun(cfg, binder, params, mesh, peft_export=not obj.reward_head)  # a PRM exports merged
        params = lora_run.trainable
    if obj.reward_head:  # the backbone and a fresh reward head, trained together
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
    wandb = start_wandb(cfg, out_dir) if tc.wandb and jax.process_index() == 0 else None
    writer = MetricsWriter(out_dir, start_step if resume else None, tc.tensorboard, wandb)
    if not resume:  # what reading the data changed, as step 0 of the log (a resume keeps that line)
        writer.write({"step": 0, "split": "data", "identical_pairs": report.changed["identical_candidates"],
                      "rows_all_identical": report.changed["all_candidates_identical"]})
    return Run(cfg, mesh, out_dir, it, eval_examples, make_collator(cfg, tok.pad_id, local_data), total_steps,
               start_step, binder, lora_run, state, step_fn, eval_fn, ckpt, writer)


def evaluate(run: Run, step: int) -> dict | None:
    """The held-out metrics of the current params (logged as step ``step``); None without an eval set.
    Evaluation batches are not split into micro-batches."""
    from tuna_jax.data.batching import BatchIterator

    if not run.eval_examples:
        return None
    tc = run.cfg.train
    ev = BatchIterator(run.eval_examples, run.eval_collator, tc.global_batch // tc.grad_accum, shuffle=False,
                       num_epochs=1, drop_remainder=False, process_index=jax.process_index(),
                       process_count=jax.process_count())
    totals: dict = {}
    for batch in ev:
        sums = _host(run.eval_fn(run.state["params"], parallel.shard_batch(batch, run.mesh)))
        totals = {k: totals.get(k, 0.0) + float(v) for k, v in sums.items()}
    result = summarize(totals)
    run.writer.write({"step": step, "split": "eval", **result})
    return result


def loop(run: Run, on_step: Callable[[int, dict], None] | None = None) -> tuple[int, dict, dict | None, dict | None]:
    """Step from ``run.start_step`` to ``run.total_steps``, evaluating, checkpointing and stopping on a
    signal (:class:`Interrupted`) or a non-finite step (:class:`TrainingDiverged`).
    -> (last step, its metrics, the last held-out metrics, the held-out metrics before step 1)."""
    from tqdm import tqdm

    cfg, tc, it, ckpt = run.cfg, run.cfg.train, run.it, run.ckpt
    last: dict = {}
    bar = tqdm(total=run.total_steps, initial=run.start_step, desc=cfg.name or tc.mode, unit="step",
               disable=not tc.progress or jax.process_index() != 0, file=sys.stderr)

    def record(done: int, metrics: dict, dt: float) -> None:
        nonlocal last
        stops.heard(metrics)
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
        if done % tc.log_every == 0 or done == run.total_steps:
            run.writer.write({"split": "train", **last})
        bar.update(1)
        bar.set_postfix(loss=f"{last['loss']:.4f}")
        if on_step:
            on_step(done, last)

    with StopSignals(run.mesh) as stops:
        # The step compiled for each shape the rest of the run takes, on a thread, in the order it needs them.
        ahead = CompileAhead(run.step_fn, run.state, [it.batch_at(e, i) for e, i in
                                                      it.upcoming(run.total_steps - run.start_step)],
                             run.mesh, stops.step_args(abstract=True))
        fetch = DelayedMetrics(record)
        eval_metrics, first_eval, step = None, None, run.start_step
        try:
            if run.eval_examples and step == 0:
                first_eval = evaluate(run, 0)  # the starting point, so a run's gain is visible in its own log
            fetch.restart_clock()
            while step < run.total_steps:
                batch = parallel.shard_batch(next(it), run.mesh)
                if not ahead.ready(batch):  # a new shape still compiling: report the steps done meanwhile
                    fetch.drain()
                ahead.wait(batch)
                run.state, metrics = run.step_fn(run.state, batch, *stops.step_args())
                step += 1
                fetch.push(step, metrics)
                do_eval = bool(tc.eval_every and step % tc.eval_every == 0)
                do_save = step % tc.save_every == 0 or step == run.total_steps
                halt = stops.signum  # read once: a signal landing later in this iteration stops the next one
                if do_eval or do_save or halt:
                    fetch.drain()
                if do_eval:
                    eval_metrics = evaluate(run, step)
                    fetch.restart_clock()
                if halt:
                    ckpt.save(step, run.state, {"data": it.state(), "step": step}, force=True)
                    ckpt.wait()
                    raise Interrupted(halt, step)
                if do_save:
                    ckpt.save(step, run.state, {"data": it.state(), "step": step})
            fetch.drain()
            if run.eval_examples and (not tc.eval_every or step % tc.eval_every):
                eval_metrics = evaluate(run, step)
        finally:
            ahead.close()
            bar.close()
    return step, last, eval_metrics, first_eval


def export(run: Run, last: dict, first_eval: dict | None, eval_metrics: dict | None) -> str:
    """Write the trained model to ``output_dir/final``: a params checkpoint, a PEFT adapter folder (LoRA), or
    a PRM folder (``model/reward.py``)."""
    cfg, params = run.cfg, run.state["params"]
    final = run.out_dir / "final"
    if objective(cfg).reward_head:
        from tuna_jax.model.reward import ProxyRankingModel, eval_summary

        meta = {"base_model": str(cfg.model.path), "max_len": cfg.data.max_len, "add_bos": cfg.data.add_bos,
                "add_eos": cfg.data.add_eos, "train": cfg.to_dict(),
                "metrics": {"start_eval": eval_summary(first_eval), "final_eval": eval_summary(eval_metrics),
                            "last_train": last}}
        prm = ProxyRankingModel(params if run.lora_run is None else run.lora_run.merged_prm(params), run.binder.cfg,
                                meta, run.mesh)
        return str(prm.save(final, tokenizer_src=_tokenizer_dir(cfg)))
    if run.lora_run is not None:  # a PEFT adapter folder that records its base
        return str(run.lora_run.save(final, params, tokenizer_src=_tokenizer_dir(cfg)))
    return str(save_params(final, run.binder.bind(params), tokenizer_src=_tokenizer_dir(cfg)))


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

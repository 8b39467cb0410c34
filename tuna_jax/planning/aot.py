"""The real train step of a config, compiled ahead of time for a target, over abstract values.

What `tuna-jax train` would run, built from the same functions (``train.make_train_step``,
``make_optimizer``, ``make_collator``, the rules table of ``parallel``), without weights or data:

* parameters: ``nnx.eval_shape`` of the model (``abstract_model``), each leaf a ``ShapeDtypeStruct``
  carrying the sharding ``parallel.state_shardings`` gives it; AdamW's state sharded like its
  parameter, as ``train.init_opt_state`` places it;
* the batch: the layout collator's batch of a worst case: ``global_batch`` examples whose every
  sequence (prompt + candidate, prompt + MLE target) is ``max_len`` tokens, the prompt
  ``prompt_len`` of them (:func:`worst_case_examples`); its arrays become abstract values sharded
  over data x fsdp as ``parallel.shard_batch`` places them;
* the mesh: ``train.mesh`` over the target's devices (``parallel.make_mesh``);
* ``model.attention=auto`` and ``data.layout=auto`` resolved for the target's platform, as train
  resolves them there (:func:`on_platform`);
* LoRA (``lora.rank`` > 0): train's ``LoraRun`` built over the abstract parameters (:func:`lora_run`):
  the frozen base in its param_dtype, an argument of every step, never donated nor differentiated; the
  state's params are the adapters (and ``lora.train_also``), AdamW's state theirs only; its jitted step.

The jitted step is lowered and compiled for the target's devices (a TPU topology from libtpu, the
local GPUs or CPU devices) and XLA's memory analysis read: per-device arguments, outputs, aliased
(donated) bytes and temporaries. A compile the target's memory cannot hold fails in XLA with
RESOURCE_EXHAUSTED; :class:`CompiledStep` then holds what the message says was needed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import time

import numpy as np

from tuna_jax.config import Config

ARCH_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "tie_word_embeddings")


class PlanError(ValueError):
    """A config this target cannot take (train would refuse it, or its step does not trace or compile),
    said in one line."""


# ---- the architecture, without weights --------------------------------------------------------------

def architecture(cfg: Config) -> tuple[dict, str, list[str]]:
    """``(HF config dict, where it came from, warnings)``: ``model.path``'s config.json when that folder
    is on this machine (a HF folder or a params checkpoint both have one), else ``model.hf_config`` (the
    model presets carry their checkpoint's architecture there), else a PlanError."""
    m = cfg.model
    notes = []
    local = m.path and os.path.isfile(os.path.join(os.fspath(m.path), "config.json"))
    if local:
        from tuna_jax.io.jsonl import read_json

        where = os.path.join(os.fspath(m.path), "config.json")
        hf = read_json(where, what="model config")
        if m.hf_config:
            differ = [k for k in ARCH_KEYS if k in m.hf_config and m.hf_config[k] != hf.get(k)]
            if differ:
                notes.append(f"model.hf_config differs from {where} in {', '.join(differ)}; planned with {where} "
                             "(train reads the architecture from model.path)")
        return hf, where, notes
    if m.hf_config:
        source = "model.hf_config" + (f" (model.path {m.path} is not on this machine)" if m.path else "")
        return dict(m.hf_config), source, notes
    raise PlanError(f"model.path {m.path} is not on this machine and the config has no model.hf_config: give the "
                    "architecture (the presets in configs/models/ carry theirs) or a local model folder"
                    if m.path else "the config names no model: set model.path or model.hf_config")


def llama_config(cfg: Config, hf: dict, platform: str):
    """The LlamaConfig train builds (runtime fields from ``model``), ``attention=auto`` resolved for
    ``platform`` the way train resolves it there. On TPU auto stays auto: it picks per call (splash for
    rows without branches, xla for rows with them), and the trace runs ``on_platform``."""
    from tuna_jax.model.attention import resolve
    from tuna_jax.model.llama import DTYPES, LlamaConfig

    m = cfg.model
    lcfg = LlamaConfig.from_hf(hf, dtype=m.dtype, param_dtype=m.param_dtype, scan_layers=m.scan_layers,
                               remat_policy=m.remat_policy, attention=m.attention)
    if platform == "tpu" and m.attention == "auto":
        return lcfg
    return dataclasses.replace(lcfg, attention=resolve(m.attention, DTYPES[m.dtype], lcfg.head_dim, platform))


def check_batch(cfg: Config, n_data: int) -> None:
    """train.py's refusals of a batch split, before anything compiles (same conditions, same words)."""
    tc = cfg.train
    if tc.global_batch % tc.grad_accum:
        raise PlanError(f"train.global_batch={tc.global_batch} is not divisible by train.grad_accum={tc.grad_accum}")
    if (tc.global_batch // tc.grad_accum) % n_data:
        raise PlanError(f"a micro-batch of {tc.global_batch // tc.grad_accum} prompts does not divide over data x "
                        f"fsdp = {n_data} devices; change train.global_batch, train.grad_accum or train.mesh")


# ---- the worst-case batch ---------------------------------------------------------------------------

def worst_case_examples(cfg: Config, prompt_len: int) -> list:
    """``global_batch`` tokenised examples as long as ``data.max_len`` allows: a ``prompt_len``-token
    prompt, and every candidate (``num_candidates`` of them) and the MLE target ``max_len - prompt_len``
    tokens, so each prompt + response is exactly ``max_len``. Ids are 1 (never padding)."""
    d = cfg.data
    if not 1 <= prompt_len < d.max_len:
        raise PlanError(f"--prompt-len {prompt_len}: must be in [1, data.max_len={d.max_len})")
    from tuna_jax.data.batching import TokenizedExample
    from tuna_jax.objectives import objective

    obj = objective(cfg)
    prompt, resp = np.ones(prompt_len, np.int32), np.ones(d.max_len - prompt_len, np.int32)
    if not obj.candidates:
        return [TokenizedExample(prompt, [resp], None, None, f"plan-{i}") for i in range(cfg.train.global_batch)]
    n = d.num_candidates
    mle = None if obj.mle_target(cfg) == "all" else resp
    scores = np.arange(n, 0, -1).astype(np.float32)
    return [TokenizedExample(prompt, [resp] * n, scores, mle, f"plan-{i}") for i in range(cfg.train.global_batch)]


def planned_batch(cfg: Config, n_data: int, prompt_len: int, platform: str, hosts: int = 1) -> tuple[dict, object, str]:
    """``(global batch of numpy arrays, its per-host BatchShape, the layout)``: the worst case laid out by
    the collator train makes, each of ``hosts`` hosts collating its own share of the global batch (as
    train's per-host iterators do; packed rows are packed per host), the hosts' arrays put end to end."""
    from tuna_jax.data.layouts import resolve_layout
    from tuna_jax.objectives import objective
    from tuna_jax.train import make_collator

    layout = resolve_layout(cfg.data.layout, platform)
    c = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, layout=layout))
    if cfg.train.global_batch % hosts:
        raise PlanError(f"train.global_batch={cfg.train.global_batch} does not divide over {hosts} hosts")
    collator = make_collator(c, 0, max(1, n_data // hosts), cfg.train.grad_accum)
    rows = worst_case_examples(cfg, prompt_len)
    per = len(rows) // hosts
    host_rows = [rows[h * per:(h + 1) * per] for h in range(hosts)]
    shape = collator.plan(host_rows)
    parts = [collator(host_rows[h], shape, h, hosts) for h in range(hosts)]
    batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    if cfg.loss.reference == "data" and objective(cfg).reference:  # the columns a reference run carries
        b, n = len(rows), cfg.data.num_candidates
        batch.update(ref_logprob_sum=np.zeros((b, n), np.float32), ref_num_tokens=np.ones((b, n), np.float32))
    return batch, shape, layout


# ---- abstract state ---------------------------------------------------------------------------------

def abstract_params(lcfg, mesh) -> dict:
    """The model's parameters as ShapeDtypeStructs with the shardings train gives them."""
    import jax
    from flax import nnx

    from tuna_jax import parallel
    from tuna_jax.model.llama import abstract_model

    abs_params = nnx.state(abstract_model(lcfg), nnx.Param)
    shardings = nnx.to_pure_dict(parallel.state_shardings(abs_params, mesh))
    return jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s),
                        nnx.to_pure_dict(abs_params), shardings)


def lora_run(cfg: Config, lcfg, params: dict, mesh):
    """The ``LoraRun`` train builds when ``lora.rank`` > 0 (``model/lora.py``), over abstract ``params``: its
    ``frozen`` base and ``trainable`` adapters as ShapeDtypeStructs, and its jitted step; None without LoRA."""
    from tuna_jax.model.lora import LoraRun, check_run_config
    from tuna_jax.model.params import ParamBinder

    if cfg.lora.rank or cfg.loss.reference == "model":
        check_run_config(cfg)  # train's refusals, same words
    from tuna_jax.objectives import objective

    return LoraRun(cfg, ParamBinder(lcfg), params, mesh, abstract=True,
                   peft_export=not objective(cfg).reward_head) if cfg.lora.rank else None


def abstract_state(cfg: Config, lcfg, mesh, tx, params: dict | None = None) -> dict:
    """The train state ({"params", "opt_state", "step", "rng"}) as ShapeDtypeStructs with the shardings
    train gives them; ``params``: the trained parameters (LoRA: the run's ``trainable``), by default the
    model's; PRM: params are {"backbone", "head"} with the head replicated."""
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding, PartitionSpec

    from tuna_jax.objectives import objective

    params = abstract_params(lcfg, mesh) if params is None else params
    replicated = NamedSharding(mesh, PartitionSpec())
    if objective(cfg).reward_head:
        head = {"w": jax.ShapeDtypeStruct((lcfg.hidden_size,), jnp.float32, sharding=replicated),
                "b": jax.ShapeDtypeStruct((1,), jnp.float32, sharding=replicated)}
        params = {"backbone": params, "head": head}
    opt = jax.eval_shape(tx.init, params)
    opt_shardings = optax.tree_map_params(tx, lambda _, p: p.sharding, opt, params,
                                          transform_non_params=lambda _: replicated)
    opt = jax.tree.map(lambda o, s: jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=s), opt, opt_shardings)
    return {"params": params, "opt_state": opt, "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
            "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)}


def abstract_batch(batch: dict, mesh) -> dict:
    import jax

    from tuna_jax import parallel

    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=parallel.batch_sharding(mesh, v.ndim))
            for k, v in batch.items()}


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard of each leaf)."""
    import jax

    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def replicated_leaves(state: dict, mesh, min_bytes: int = 2**20) -> list[dict]:
    """Parameter and optimizer leaves over ``min_bytes`` that the fsdp axis does not split (each device
    of that axis holds all of it): the leaves a 7B run must not have. ``state`` may also hold LoRA's
    ``frozen_base``."""
    import jax

    if mesh.shape["fsdp"] == 1:
        return []
    out = []
    for part in ("frozen_base", "params", "opt_state"):
        for path, x in jax.tree_util.tree_leaves_with_path(state.get(part, {})):
            size = math.prod(x.shape) * x.dtype.itemsize
            axes = {a for s in x.sharding.spec if s is not None for a in ((s,) if isinstance(s, str) else s)}
            if size > min_bytes and "fsdp" not in axes:
                out.append({"leaf": part + jax.tree_util.keystr(path), "shape": list(x.shape), "bytes": size,
                            "spec": str(x.sharding.spec)})
    return out


# ---- compiling ------------------------------------------------------------------------------------

@contextlib.contextmanager
def on_platform(platform: str):
    """Trace as if jax ran on ``platform``: code that asks ``jax.default_backend()`` to choose a path
    (``attention.splash_attention``'s interpret mode, ``resolve('auto')``) takes the target's path, as it
    would on the target, while the process itself runs on this host's CPU."""
    import jax

    original = jax.default_backend
    jax.default_backend = lambda: platform
    try:
        yield
    finally:
        jax.default_backend = original


@dataclasses.dataclass
class CompiledStep:
    """What the compile of one step says, per device. ``oom``: XLA refused it for the target's memory
    (``needed_bytes``: what its message says the program needs, when it says); ``error``: the
    compile failed otherwise (the first line of the error)."""

    seconds: float
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    generated_code_bytes: int = 0
    xla_flops: float | None = None  # XLA's per-device count: every loop body counted once
    oom: bool = False
    needed_bytes: int | None = None
    error: str | None = None
    resharded_outputs: list = dataclasses.field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        """Peak per device as MaxText reports it: arguments + outputs - aliased + temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


def trace_step(cfg: Config, lcfg, state: dict, batch: dict, mesh, platform: str, total_steps: int = 1000,
               lora=None):
    """``jax.jit(step, donate_argnums=(0,)).trace(state, batch)``: the step train jits, traced for the
    target (its jaxpr gives the executed FLOPs, its lowering the compile). ``lora``: the abstract
    ``LoraRun`` (:func:`lora_run`), whose jitted step takes its frozen base as an argument, as train's does."""
    import jax

    from tuna_jax.model.params import ParamBinder
    from tuna_jax.train import make_eval_step, make_optimizer, make_train_step

    tx, schedule = make_optimizer(cfg.optim, total_steps)  # the schedule's length changes no shape
    # On several hosts train also passes each host's stop signal, reduced to one scalar: left out here.
    if lora is None:
        jitted = jax.jit(make_train_step(ParamBinder(lcfg), cfg, tx, schedule), donate_argnums=(0,))
    else:
        jitted = lora.jit_steps(lambda b: make_train_step(b, cfg, tx, schedule), lambda b: make_eval_step(b, cfg))[0]
    with on_platform(platform), (jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()):
        return jitted.trace(state, batch)


def compile_traced(traced, state: dict) -> CompiledStep:
    """Lower and compile a traced step; read XLA's memory and cost analyses."""
    import jax

    t0 = time.perf_counter()
    try:
        compiled = traced.lower().compile()
    except Exception as e:  # XLA's refusal (or a kernel that cannot lower) is the plan's answer
        text = str(e)
        if isinstance(e, jax.errors.JaxRuntimeError) and (
                "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()):
            return CompiledStep(time.perf_counter() - t0, oom=True, needed_bytes=_needed_bytes(text),
                                error=_first_line(text))
        return CompiledStep(time.perf_counter() - t0, error=f"{type(e).__name__}: {_first_line(text)}")
    out = CompiledStep(time.perf_counter() - t0)
    mem = compiled.memory_analysis()
    if mem is not None:
        out.argument_bytes, out.output_bytes = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
        out.alias_bytes, out.temp_bytes = int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes)
        out.generated_code_bytes = int(mem.generated_code_size_in_bytes)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    if cost and "flops" in cost:
        out.xla_flops = float(cost["flops"])
    out.resharded_outputs = _resharded(state, compiled.output_shardings[0])
    return out


def _resharded(state: dict, out_state_shardings) -> list[str]:
    """State leaves the step returns with another sharding than it takes: train would compile the step a
    second time for them (and hold both layouts)."""
    import jax

    flat_in = jax.tree_util.tree_leaves_with_path(state)
    flat_out = jax.tree.leaves(out_state_shardings)
    return [jax.tree_util.keystr(p) for (p, x), s in zip(flat_in, flat_out)
            if not x.sharding.is_equivalent_to(s, len(x.shape))]


_NEEDED = [  # XLA's out-of-memory messages, newest first; the figure is what the program needs
    re.compile(r"total memory required for HLO temporaries \(([\d.]+)([KMGT]?)\)"),
    re.compile(r"Used ([\d.]+)([KMGT]?) of [\d.]+[KMGT]? hbm"),
    re.compile(r"requires? ([\d.]+)([KMGT]?)i?B?\b"),
]


def _needed_bytes(text: str) -> int | None:
    for pattern in _NEEDED:
        m = pattern.search(text)
        if m:
            return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2)])
    return None


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0][:500] if lines else "compile failed"

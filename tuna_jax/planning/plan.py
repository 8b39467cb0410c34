"""One plan: a config's train step on a target, per chip: memory against HBM, FLOPs, step time.

:func:`make_plan` puts the parts together (``aot.py`` builds and compiles the step, ``flops.py`` counts,
``estimate.py`` stands in where no compile is possible); :class:`Plan` holds the figures,
``to_dict()`` is the ``--json`` output and ``lines()`` the report.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Sequence

from tuna_jax.config import Config, load_config
from tuna_jax.planning import aot, estimate, flops
from tuna_jax.planning.hardware import GiB, Target

MFUS = (0.40, 0.55)
# Share of the chip's memory a plan leaves free by default. XLA's figure is what its buffers take; on a TPU
# the runtime keeps a little for itself (a v5e's compiler reports 15.75 of its 16 GiB as available: 1.6%).
MIN_HEADROOM = 0.02


@dataclasses.dataclass
class Plan:
    """The figures of one plan (bytes and FLOPs per chip unless named global)."""

    config: str | None
    overrides: list
    target: str
    chip: str
    chips: int
    hbm_bytes: int
    compiled: bool  # False: an analytic estimate, not a compile
    mesh: dict
    model: dict
    batch: dict
    memory: dict
    flops: dict
    step_time_s: dict  # {"mfu_40": s, "mfu_55": s}; empty when the chip's peak is unknown
    fits: bool
    headroom_bytes: int
    min_headroom: float
    warnings: list
    replicated_leaves: list
    seconds: dict

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def lines(self) -> list[str]:
        """The human report."""
        g = size
        m, b, mem, fl = self.model, self.batch, self.memory, self.flops
        how = (f"compiled for the topology in {self.seconds['compile']:.0f} s" if self.compiled
               else "ANALYTIC ESTIMATE, NOT A COMPILE (no such devices here)")
        out = [f"plan: {self.config or 'defaults'}{' ' + ' '.join(self.overrides) if self.overrides else ''}",
               f"  target     {self.target}: {self.chips} x {self.chip}, {g(self.hbm_bytes)} each; {how}",
               f"  model      {count(m['params'])} parameters ({m['architecture']}); {m['dtype']} compute, "
               f"{m['param_dtype']} params, remat {m['remat_policy']}, {'scan' if m['scan_layers'] else 'unrolled'} "
               f"layers, attention {m['attention']}",
               *([f"  LoRA       rank {m['lora']['rank']}, alpha {m['lora']['alpha']:g} on "
                  f"{', '.join(m['lora']['targets'])}" + (f"; {', '.join(m['lora']['train_also'])} in full"
                                                          if m['lora']['train_also'] else "")
                  + f": {count(m['lora']['trainable_params'])} trained parameters, the base frozen in "
                  f"{m['param_dtype']}" + ("; the frozen base is the reference (loss.reference=model)"
                                           if m['lora']['reference'] == "model" else "")] if m.get("lora") else []),
               f"  mesh       data {self.mesh['data']} x fsdp {self.mesh['fsdp']} x tensor {self.mesh['tensor']}; "
               f"grad_accum {b['grad_accum']} (micro-batch {b['micro_batch']} prompts)",
               f"  batch      {b['layout']}: {b['shape']['units']} units x {b['shape']['rows']} rows x "
               f"{b['shape']['length']} tokens" + (f" per host ({b['hosts']} hosts)" if b["hosts"] > 1 else "")
               + f"; {b['how']}",
               f"             {b['positions']:,} token positions per step, {b['real_tokens']:,} real tokens "
               f"({b['padding'] * 100:.1f}% padding)",
               "  memory per chip" + ("" if self.compiled else " (estimate)"),
               ]
        trained = "adapters + train_also" if (m.get("lora") or {}).get("train_also") else "trainable adapters"
        for key, label in (("params", "parameters"), ("frozen_base", "frozen base"), ("trainable", trained),
                           ("optimizer", "optimizer state"), ("other_state", "step, rng"),
                           ("temporaries", "temporaries"), ("outputs_not_aliased", "outputs not donated")):
            if key in mem:
                out.append(f"    {label:<22}{g(mem[key]):>11}")
        for key, value in mem.get("parts", {}).items():
            out.append(f"    {key.replace('_', ' '):<22}{g(value):>11}")
        verdict = ("fits" if self.fits else "DOES NOT FIT") + (
            f", {g(self.headroom_bytes)} ({self.headroom_bytes / self.hbm_bytes * 100:.0f}%) free"
            if self.headroom_bytes >= 0 else f", short by {g(-self.headroom_bytes)}")
        if mem.get("oom"):
            need = f" (XLA: needs {g(mem['needed_bytes'])} of temporaries)" if mem.get("needed_bytes") else ""
            verdict = f"DOES NOT FIT: XLA refused the program for this chip's memory{need}"
        out.append(f"    {'total':<22}{g(mem['total']) if mem.get('total') else '?':>11}  of {g(self.hbm_bytes)} "
                   f"-> {verdict}")
        if not self.fits and self.headroom_bytes >= 0:
            out.append(f"    (less than the {self.min_headroom * 100:.0f}% of the chip kept free for what XLA's figure "
                       "leaves out: the runtime's own reserve)")
        ratio = f", ratio {fl['executed_over_model']:.2f}" if fl.get("executed_over_model") else ""
        out.append(f"  FLOPs      {flop(fl['executed'])} per step executed (matmuls in the step's jaxpr, loops x trip "
                   f"counts, remat included), model {flop(fl['model'])} (6 P T + 6 D V T_scored + 12 L H Dh K){ratio}")
        if self.step_time_s:
            t = self.step_time_s
            out.append(f"  step time  {t['mfu_40']:.3g} s at 40% MFU, {t['mfu_55']:.3g} s at 55% MFU "
                       f"({b['real_tokens']:,} tokens per step)")
        for w in self.warnings:
            out.append(f"  warning: {w}")
        for leaf in self.replicated_leaves:
            out.append(f"  warning: {leaf['leaf']} {leaf['shape']} ({leaf['bytes'] / 2**20:,.0f} MiB) is replicated "
                       f"over fsdp (spec {leaf['spec']})")
        return out


def fits(total: int, hbm: int, min_headroom: float, oom: bool = False) -> bool:
    """The verdict: XLA compiled it for the chip (no out-of-memory), and it leaves ``min_headroom`` of the
    chip's memory free for what XLA's figure leaves out (the runtime's own reserve)."""
    return not oom and total <= hbm * (1 - min_headroom)


def size(b: float) -> str:
    """Bytes for people: GiB from 0.1 GiB up, else MiB."""
    return f"{b / GiB:.2f} GiB" if abs(b) >= 0.1 * GiB else f"{b / 2**20:.2f} MiB"


def flop(f: float) -> str:
    return f"{f / 1e12:,.1f} TFLOP" if f >= 1e11 else f"{f / 1e9:,.2f} GFLOP"


def count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def plan_config(path: str | None, overrides: Sequence[str], target: Target, *, prompt_len: int | None = None,
                min_headroom: float = MIN_HEADROOM) -> Plan:
    """Load the config (``FILE:LINE`` errors as train gives them) and plan it for ``target``."""
    cfg = load_config(path, list(overrides))
    return make_plan(cfg, target, prompt_len=prompt_len, min_headroom=min_headroom, config=path,
                     overrides=overrides)


def make_plan(cfg: Config, target: Target, *, prompt_len: int | None = None, min_headroom: float = MIN_HEADROOM,
              config: str | None = None, overrides: Sequence[str] = ()) -> Plan:
    """Build the config's train step for ``target`` (compiled, or estimated where it cannot be) and
    gather its figures. Raises ``aot.PlanError`` for what train would refuse."""
    from tuna_jax import parallel
    from tuna_jax.objectives import objective

    t0 = time.perf_counter()
    if prompt_len is None:
        prompt_len = max(1, min(64, cfg.data.max_len // 4))
    hf, source, warnings = aot.architecture(cfg)
    lcfg = aot.llama_config(cfg, hf, target.platform)
    try:
        shape = parallel.parse_mesh_shape(cfg.train.mesh, target.chips)
    except ValueError as e:
        raise aot.PlanError(f"train.mesh: {e}") from None
    mesh_shape = dict(zip(parallel.MESH_AXES, shape))
    n_data = mesh_shape["data"] * mesh_shape["fsdp"]
    aot.check_batch(cfg, n_data)
    batch_np, batch_shape, layout = aot.planned_batch(cfg, n_data, prompt_len, target.platform, target.hosts)
    model_fl = flops.model_flops(batch_np, lcfg, lm_head=objective(cfg).lm_head)
    positions = int(batch_np["segment_ids"].size)
    real = int(batch_np["real_tokens"].sum())

    if target.compiled:
        memory, executed, replicated, seconds, trainable = _compiled(cfg, lcfg, batch_np, target, warnings)
    else:
        memory, executed, seconds, trainable = _estimated(cfg, lcfg, batch_np, batch_shape, mesh_shape, target)
        replicated = []
    total = memory["total"]
    if executed.while_loops or executed.opaque_kernels:
        warnings.append(f"executed FLOPs are a lower bound: {executed.while_loops} while loop(s) counted once, "
                        f"{executed.opaque_kernels} kernel(s) without a cost estimate")
    hbm = target.chip.hbm_bytes
    headroom = hbm - total
    peak = target.chip.peak_flops
    times = {f"mfu_{round(u * 100)}": model_fl["total"] / (target.chips * peak * u) for u in MFUS} if peak else {}
    seconds["total"] = time.perf_counter() - t0
    micro = cfg.train.global_batch // cfg.train.grad_accum
    how = (f"worst case: {cfg.train.global_batch} prompts of {prompt_len} tokens, every "
           + ("response" if not objective(cfg).candidates else
              f"candidate ({cfg.data.num_candidates}){' and the MLE target' if objective(cfg).mle else ''}")
           + f" {cfg.data.max_len - prompt_len} tokens (prompt + response = data.max_len {cfg.data.max_len}), "
           "laid out by train's collator")
    return Plan(
        config=config, overrides=list(overrides), target=target.name, chip=target.chip.name, chips=target.chips,
        hbm_bytes=hbm, compiled=target.compiled, mesh=mesh_shape,
        model={"params": lcfg.num_params(), "architecture": source, "dtype": lcfg.dtype,
               "param_dtype": lcfg.param_dtype, "remat_policy": lcfg.remat_policy, "scan_layers": lcfg.scan_layers,
               "attention": lcfg.attention, "mode": cfg.train.mode,
               "lora": None if not cfg.lora.rank else {
                   "rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "targets": list(cfg.lora.targets),
                   "train_also": list(cfg.lora.train_also), "trainable_params": trainable,
                   "reference": cfg.loss.reference}},
        batch={"layout": layout, "shape": dataclasses.asdict(batch_shape), "hosts": target.hosts, "how": how,
               "prompt_len": prompt_len,
               "global_batch": cfg.train.global_batch, "grad_accum": cfg.train.grad_accum, "micro_batch": micro,
               "positions": positions, "real_tokens": real, "padding": 1 - model_fl["tokens"] / positions,
               "scored_tokens": int(model_fl["scored_tokens"])},
        memory=memory,
        flops={"executed": executed.flops, "executed_per_chip": executed.flops / target.chips,
               "model": model_fl["total"], "model_parts": model_fl["parts"],
               "executed_over_model": executed.flops / model_fl["total"] if model_fl["total"] else None},
        step_time_s=times, fits=fits(total, hbm, min_headroom, bool(memory.get("oom"))), headroom_bytes=int(headroom),
        min_headroom=min_headroom,
        warnings=warnings, replicated_leaves=replicated, seconds=seconds)


def _compiled(cfg: Config, lcfg, batch_np: dict, target: Target, warnings: list):
    """XLA's figures for the step compiled for the target's devices: (memory, executed FLOPs, replicated
    leaves, seconds, trained parameters: LoRA's count, else None)."""
    from tuna_jax import parallel

    mesh = parallel.make_mesh(cfg.train.mesh, target.devices)
    params = aot.abstract_params(lcfg, mesh)
    lora = aot.lora_run(cfg, lcfg, params, mesh)
    state = aot.abstract_state(cfg, lcfg, mesh, _optimizer(cfg), lora.trainable if lora else params)
    t0 = time.perf_counter()
    traced = _traced(cfg, lcfg, state, aot.abstract_batch(batch_np, mesh), mesh, target, lora)
    executed = flops.executed_flops(traced.jaxpr)
    seconds = {"trace": time.perf_counter() - t0}
    with aot.on_platform(target.platform):
        step = aot.compile_traced(traced, state)
    seconds["compile"] = step.seconds
    if step.error and not step.oom:
        raise aot.PlanError(f"the step does not compile for {target.name}: {step.error}{_hint(lcfg)}")
    held = {k: aot.per_device_bytes(state[k]) for k in ("params", "opt_state")}
    other = aot.per_device_bytes({"s": state["step"], "r": state["rng"]})
    frozen = aot.per_device_bytes(lora.frozen) if lora else 0  # an argument of every step, never donated
    # Refused for the chip's memory: the state it holds plus what XLA says the temporaries need.
    total = step.total_bytes if not step.oom else (
        frozen + held["params"] + held["opt_state"] + other + (step.needed_bytes or target.chip.hbm_bytes))
    params = {"frozen_base": frozen, "trainable": held["params"]} if lora else {"params": held["params"]}
    memory = {**params, "optimizer": held["opt_state"], "other_state": other,
              "arguments": step.argument_bytes, "outputs": step.output_bytes, "aliased": step.alias_bytes,
              "temporaries": step.temp_bytes, "outputs_not_aliased": step.output_bytes - step.alias_bytes,
              "generated_code": step.generated_code_bytes, "total": total, "oom": step.oom,
              "needed_bytes": step.needed_bytes, "xla_error": step.error,
              "xla_flops_per_chip_loop_bodies_once": step.xla_flops}
    if step.resharded_outputs:
        warnings.append(f"the step returns {len(step.resharded_outputs)} state leaves with another sharding than "
                        f"it takes (e.g. {step.resharded_outputs[0]}): train would compile it twice")
    replicated = aot.replicated_leaves(dict(state, frozen_base=lora.frozen) if lora else state, mesh)
    return memory, executed, replicated, seconds, _count(lora)


def _count(lora) -> int | None:
    """Trained parameters of a LoRA run (adapters and ``lora.train_also``); None without LoRA."""
    import jax

    return None if lora is None else sum(x.size for x in jax.tree.leaves(lora.trainable))


def _estimated(cfg: Config, lcfg, batch_np: dict, batch_shape, mesh_shape: dict, target: Target):
    """The analytic memory estimate and the executed FLOPs of the step traced without devices:
    (memory, executed FLOPs, seconds, trained parameters: LoRA's count, else None)."""
    from tuna_jax.objectives import objective

    t0 = time.perf_counter()
    # cuDNN's kernel cannot be traced without a GPU; its dense attention has the einsum path's matmuls.
    counted = dataclasses.replace(lcfg, attention="einsum") if lcfg.attention == "cudnn" else lcfg
    state, lora = _unsharded(cfg, counted)  # (LoRA's step binds the model of its run)
    traced = _traced(cfg, counted, state, _unsharded_batch(batch_np), None, target, lora)
    executed = flops.executed_flops(traced.jaxpr)
    trainable = _count(lora)
    est = estimate.estimate_memory(cfg, lcfg, mesh_shape, batch_shape, batch_shape.scored, trainable,
                                   lm_head=objective(cfg).lm_head)
    return {"total": est["total"], "parts": est["parts"], "estimate": True}, executed, {
        "trace": time.perf_counter() - t0}, trainable


def _traced(cfg: Config, lcfg, state, batch, mesh, target: Target, lora=None):
    """The traced step; a failure to trace (a kernel that cannot take these shapes) as one PlanError line."""
    try:
        return aot.trace_step(cfg, lcfg, state, batch, mesh, target.platform, lora=lora)
    except Exception as e:  # any tracing failure is the config's answer, said in one line
        if isinstance(e, aot.PlanError):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise aot.PlanError(f"the step does not trace for {target.name}: {type(e).__name__}: {first}"
                            f"{_hint(lcfg)}") from e


def _hint(lcfg) -> str:
    """What to try when a fused attention kernel is what failed."""
    return (f" (model.attention {lcfg.attention}; model.attention=xla is the portable path)"
            if lcfg.attention in ("splash", "cudnn", "auto") else "")


def _optimizer(cfg: Config):
    from tuna_jax.train import make_optimizer

    return make_optimizer(cfg.optim, 1000)[0]


def _unsharded(cfg: Config, lcfg):
    """The abstract state and LoRA run (None without LoRA) without shardings (an estimate's trace, for its
    FLOPs: no devices needed)."""
    import jax

    from tuna_jax import parallel
    from tuna_jax.planning.hardware import cpu_devices

    mesh = parallel.make_mesh("1,1,1", cpu_devices(1))
    strip = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)  # noqa: E731
    params = aot.abstract_params(lcfg, mesh)
    lora = aot.lora_run(cfg, lcfg, params, mesh)
    state = aot.abstract_state(cfg, lcfg, mesh, _optimizer(cfg), lora.trainable if lora else params)
    if lora is not None:
        lora.frozen = strip(lora.frozen)
    return strip(state), lora


def _unsharded_batch(batch: dict) -> dict:
    import jax

    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}

"""`tuna-jax plan CONFIG [KEY=VALUE ...] --topology T`: will this training config fit that slice, and how
fast will a step be, before the slice is paid for.

Builds the train step `tuna-jax train` would run for CONFIG (same model, layout, attention, remat, scan,
grad_accum, optimizer, dtype and mesh; with ``lora.rank`` > 0 the LoRA step: frozen base, adapters, AdamW
over the adapters) over abstract parameters and a worst-case batch, compiles it for
T without any of T's hardware, and reports per chip: parameter and optimizer bytes, temporaries, the
total against the chip's memory, FLOPs and the step time at 40% / 55% MFU (``tuna_jax/planning/``).
Exit status: 0 fits, 1 does not fit (``--search``: nothing found that fits), 2 bad input.
"""
from __future__ import annotations

import dataclasses
import json
import sys

from tuna_jax.io import paths


@dataclasses.dataclass
class Config:
    config: str = dataclasses.field(metadata={"help": "training config YAML (configs/tuna_p.yaml, ...)",
                                              "positional": True})
    topology: str = dataclasses.field(metadata={
        "help": "a TPU slice (v4-8 ... v4-128, v5e-4 ... v5e-256, v5p-8 ... v5p-128, v6e-4 ... v6e-256; compiled, "
                "needs the `plan` extra), gpu (this machine's GPUs, compiled), h100:N / h200:N / a100-80g:N / "
                "a100-40g:N (analytic estimate) or cpu:N (compiled)", "metavar": "T"})
    overrides: list = dataclasses.field(default_factory=list, metadata={
        "help": "section.key=value overrides, as for `tuna-jax train` (e.g. train.grad_accum=4), or YAML files "
                "merged where they stand (a topology preset: configs/topologies/v5e-16.yaml)", "positional": True,
        "metavar": "KEY=VALUE"})
    json: str | None = dataclasses.field(default=None, metadata={"help": "also write the figures as JSON to this "
                                                                          "file", "metavar": "OUT"})
    search: bool = dataclasses.field(default=False, metadata={
        "help": "if it does not fit: try grad_accum 1-16, remat policies and mesh shapes, compile each, list "
                "those that fit with the overrides to paste"})
    max_compiles: int = dataclasses.field(default=12, metadata={"help": "--search: most candidates to compile"})
    prompt_len: int | None = dataclasses.field(default=None, metadata={
        "help": "prompt tokens of the worst-case examples, each prompt + response being data.max_len tokens "
                "(default: min(64, data.max_len / 4))"})
    hbm_gib: float | None = dataclasses.field(default=None, metadata={
        "help": "memory per chip in GiB instead of the chip's (what-if)"})
    min_headroom: float = dataclasses.field(default=0.02, metadata={
        "help": "share of the chip's memory to keep free for what XLA's figure leaves out (the runtime's reserve)"})


def run(cfg: Config) -> int:
    from tuna_jax.planning import aot, hardware
    from tuna_jax.planning.plan import plan_config

    if not 0 <= cfg.min_headroom < 1:
        raise ValueError(f"--min-headroom {cfg.min_headroom}: must be in [0, 1)")
    _host_cpu_unless_gpu(cfg.topology)
    target = hardware.resolve(cfg.topology, cfg.hbm_gib)

    def plan_with(extra):
        return plan_config(cfg.config, [*cfg.overrides, *extra], target, prompt_len=cfg.prompt_len,
                           min_headroom=cfg.min_headroom)

    fixed = []  # overrides every search candidate carries
    try:
        plan = plan_with([])
    except aot.PlanError as e:
        if not cfg.search:
            raise
        print(f"plan: {e}", file=sys.stderr)
        plan = None
        if "model.attention=xla is the portable path" in str(e):  # search on the attention that traces
            fixed = ["model.attention=xla"]
    if plan is not None:
        print("\n".join(plan.lines()))
    out = {"plan": plan.to_dict() if plan else None}
    status = 0 if plan is not None and plan.fits else 1
    if cfg.search and status:
        status, out["search"] = _search(cfg, target, plan_with, fixed)
    if cfg.json:
        paths.write_atomic(cfg.json, json.dumps(out, indent=2, default=str) + "\n")
    return status


def _search(cfg: Config, target, plan_with, fixed: list) -> tuple[int, dict]:
    from tuna_jax.config import load_config
    from tuna_jax.planning import aot, search
    from tuna_jax.planning.plan import size

    base = load_config(cfg.config, cfg.overrides)
    hf, _, _ = aot.architecture(base)
    heads, kv = hf["num_attention_heads"], hf.get("num_key_value_heads") or hf["num_attention_heads"]
    print(f"\nsearch: mesh shapes {', '.join(search.meshes(target.chips, heads, kv))}; remat "
          f"{', '.join(search.POLICIES)}; grad_accum {', '.join(map(str, search.ACCUMS))} (at most "
          f"{cfg.max_compiles} compiles)", flush=True)

    def show(c):
        verdict = f"not planned: {c.error}" if c.error else "fits" if c.fits else "does not fit"
        used = size(c.total_bytes) if c.total_bytes else ""
        print(f"  {' '.join(c.overrides):<70} {used:>12}  {verdict}", flush=True)

    tried, compiles = search.search(plan_with, target, heads, kv, base.train.global_batch, cfg.max_compiles, show,
                                    fixed=fixed)
    good = search.ranked(tried)
    done = "compiled" if target.compiled else "estimated"
    print(f"search: {compiles} {done}, {len(good)} fit" + (", fastest first (paste the overrides):" if good else ""))
    for c in good:
        step = f"{c.step_s:.3g} s/step at 40% of peak" if c.step_s else ""
        print(f"  {size(c.total_bytes):>12}  {step:>26}  {' '.join(c.overrides)}")
    result = {"compiles": compiles, "fit": [dataclasses.asdict(c) for c in good],
              "tried": [dataclasses.asdict(c) for c in tried]}
    return (0 if good else 1), result


def _host_cpu_unless_gpu(topology: str) -> None:
    """This process computes nothing: on a host with libtpu but no TPU, jax would try (and fail, loudly)
    to start a TPU backend. Only ``--topology gpu`` needs a backend besides the CPU."""
    import jax
    from jax._src import xla_bridge

    if topology.strip().lower() != "gpu" and not xla_bridge.backends_are_initialized() and not jax.config.jax_platforms:
        jax.config.update("jax_platforms", "cpu")

"""`plan --search`: the settings that fit, fastest first, each as the overrides to paste.

A candidate is a mesh shape that divides the slice, a remat policy and a number of micro-batches
(``grad_accum``). Memory only falls as either of the last two grows, and time only rises, so most
candidates need no compile:

* a mesh is probed first with its most frugal setting (``full`` remat, the most micro-batches its batch
  allows); if that does not fit, nothing on that mesh does;
* for each policy, from the cheapest in FLOPs (``none``) to the most recomputing (``full``), a
  binary search finds the fewest micro-batches that fit; a more recomputing policy is then only worth
  trying with fewer micro-batches than that (with as many or more it is slower and no better).

``dots`` is left out next to ``dots_no_batch`` (the attention scores it would add are recomputed by
the attention kernels anyway) and ``nothing_saveable`` next to ``full`` (the same for a layer). Mesh
shapes: all chips on fsdp, then tensor parallelism 2 and 4 where the heads divide, then data 2; a
split train would refuse (the micro-batch does not divide over data x fsdp) is skipped without a
compile; at most ``max_compiles`` compiles in all. Ranked by the estimated step time (executed FLOPs,
where remat costs), then fewer micro-batches, then less tensor parallelism.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from tuna_jax.planning.hardware import Target

ACCUMS = (1, 2, 4, 8, 16)
POLICIES = ("none", "dots_no_batch", "full")


@dataclasses.dataclass
class Candidate:
    overrides: list
    fits: bool | None = None
    total_bytes: int | None = None
    step_s: float | None = None  # executed FLOPs at 40% of the chips' peak
    error: str | None = None


def meshes(chips: int, heads: int, kv_heads: int) -> list[str]:
    """train.mesh values to try, in order: fsdp only, tensor 2 / 4 (heads and kv heads divisible), data 2."""
    out = ["1,-1,1"]
    for t in (2, 4):
        if chips % t == 0 and heads % t == 0 and kv_heads % t == 0:
            out.append(f"1,-1,{t}")
    if chips % 2 == 0 and chips >= 4:
        out.append("2,-1,1")
    return out


def valid_accums(mesh: str, chips: int, global_batch: int) -> list[int]:
    """The grad_accum values train accepts on this mesh: the micro-batch divides over data x fsdp."""
    from tuna_jax.parallel import parse_mesh_shape

    data, fsdp, _ = parse_mesh_shape(mesh, chips)
    return [a for a in ACCUMS if global_batch % a == 0 and (global_batch // a) % (data * fsdp) == 0]


class _Budget(Exception):
    pass


def search(plan_with: Callable[[list], object], target: Target, heads: int, kv_heads: int, global_batch: int,
           max_compiles: int = 12, on_result: Callable[[Candidate], None] | None = None,
           fixed: Sequence[str] = ()) -> tuple[list, int]:
    """Plan candidates until the budget is spent; returns (every candidate planned, plans made).

    ``plan_with(extra_overrides)`` plans the config with the candidate's overrides on top (a Plan; a
    ValueError for a candidate that cannot be planned); ``fixed``: overrides every candidate carries."""
    tried: dict[tuple, Candidate] = {}

    def plan(mesh: str, policy: str, accum: int) -> Candidate:
        key = (mesh, policy, accum)
        if key in tried:
            return tried[key]
        if len(tried) >= max_compiles:
            raise _Budget
        cand = Candidate([f"train.mesh={mesh}", f"model.remat_policy={policy}", f"train.grad_accum={accum}",
                          *fixed])
        tried[key] = cand
        try:
            p = plan_with(cand.overrides)
        except ValueError as e:
            cand.error, cand.fits = str(e), False
        else:
            cand.fits, cand.total_bytes = p.fits, p.memory.get("total")
            peak = target.chip.peak_flops
            cand.step_s = p.flops["executed"] / (target.chips * peak * 0.40) if peak else None
        if on_result:
            on_result(cand)
        return cand

    try:
        for mesh in meshes(target.chips, heads, kv_heads):
            accums = valid_accums(mesh, target.chips, global_batch)
            if not accums or not plan(mesh, "full", accums[-1]).fits:
                continue
            best = len(accums)  # index of the fewest micro-batches found to fit so far
            for policy in POLICIES:
                lo, hi = 0, best - 1  # the smallest fitting index in [lo, hi], if any
                found = None
                while lo <= hi:
                    mid = (lo + hi) // 2
                    if plan(mesh, policy, accums[mid]).fits:
                        found, hi = mid, mid - 1
                    else:
                        lo = mid + 1
                if found is not None:
                    best = found
                if best == 0:
                    break
    except _Budget:
        pass
    return list(tried.values()), len(tried)


def ranked(tried: Sequence[Candidate]) -> list[Candidate]:
    """The candidates that fit, fastest estimated first (then fewer micro-batches, less tensor parallelism)."""
    def key(c: Candidate):
        accum = int(c.overrides[2].split("=")[1])
        tensor = int(c.overrides[0].split("=")[1].split(",")[2])
        step = float(f"{c.step_s:.2g}") if c.step_s is not None else 0.0  # ties within a few % go by the rest
        return (step, accum, tensor)

    return sorted((c for c in tried if c.fits), key=key)

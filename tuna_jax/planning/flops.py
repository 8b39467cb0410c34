"""FLOPs of a training step: what it executes (counted in its jaxpr) and the model FLOPs (analytic).

Why not XLA's ``compiled.cost_analysis()["flops"]`` alone: it counts a while loop's body once, not
times its trip count (checked with jax 0.10.2 on the CPU and TPU compilers: the gradient of a
``lax.scan`` over 8 matmuls reports 1/8 of their FLOPs), and the step is four nested loops (micro-
batches, layers, attention query blocks, vocabulary chunks). :func:`executed_flops` walks the traced
step instead: every ``dot_general`` contributes 2 x (output elements) x (contracted size), times the
``length`` of every scan around it. The jaxpr is taken after autodiff, so the backward matmuls and the
forward recomputed under remat are in it. Element-wise work is left out (under 1% at LLaMA sizes). A
Pallas kernel (splash attention) counts its own ``cost_estimate`` when it gives one; a ``while`` loop
(no static trip count) counts once and is reported.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass
class ExecutedFlops:
    """``flops``: global FLOPs of one call of the traced function; ``while_loops`` / ``opaque_kernels``:
    loops counted once and kernels whose FLOPs are unknown (both make ``flops`` a lower bound)."""

    flops: float
    while_loops: int = 0
    opaque_kernels: int = 0


def executed_flops(jaxpr) -> ExecutedFlops:
    """Matmul FLOPs of a (closed) jaxpr, loops multiplied out (see the module docstring)."""
    out = ExecutedFlops(0.0)
    out.flops = _walk(getattr(jaxpr, "jaxpr", jaxpr), out)
    return out


def _walk(jaxpr, acc: ExecutedFlops) -> float:
    from jax.extend import core as jcore

    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contract)
            continue
        if name == "pallas_call":
            cost = eqn.params.get("cost_estimate")
            if cost is not None and getattr(cost, "flops", None):
                total += float(cost.flops)
            else:
                acc.opaque_kernels += 1
            continue
        if name == "cond":  # the most expensive branch
            total += max(_walk(b.jaxpr, acc) for b in eqn.params["branches"])
            continue
        if name == "while":
            acc.while_loops += 1
        times = eqn.params["length"] if name == "scan" else 1
        for value in eqn.params.values():
            if isinstance(value, jcore.ClosedJaxpr):
                total += times * _walk(value.jaxpr, acc)
            elif isinstance(value, jcore.Jaxpr):
                total += times * _walk(value, acc)
    return total


def model_flops(batch: dict, lcfg, lm_head: bool = True) -> dict:
    """Model FLOPs of one step over a host batch (numpy, a :mod:`tuna_jax.data.layouts` batch), the
    formula of ``bench/rank_step.py``::

        6 * P_body * T + 6 * D * V * T_scored + 12 * layers * H * Dh * sum_q K_q

    T the non-padding token positions computed, T_scored the tokens projected to the vocabulary,
    P_body the parameters outside the embedding and the LM head, K_q the keys query q may see (its
    segment, causally, its branch and the shared prompt). ``lm_head=False``: no vocabulary projection (the
    PRM reads a scalar head instead, D FLOPs a sequence). Returns the total and its parts."""
    d, v, f = lcfg.hidden_size, lcfg.vocab_size, lcfg.intermediate_size
    h, k, dh, layers = lcfg.num_heads, lcfg.num_kv_heads, lcfg.head_dim, lcfg.num_layers
    p_body = layers * (d * dh * (2 * h + 2 * k) + 3 * d * f + 2 * d) + d
    seg = np.asarray(batch["segment_ids"])
    seg = seg.reshape(-1, seg.shape[-1])
    br = batch.get("branch_ids")
    br = None if br is None else np.asarray(br).reshape(seg.shape)
    tokens = float(np.sum(seg > 0))
    scored = float(np.sum(np.asarray(batch["score_slot"]) >= 0))
    keys = float(sum(_visible_keys(seg[r], None if br is None else br[r]) for r in range(seg.shape[0])))
    parts = {"body": 6.0 * p_body * tokens, "lm_head": 6.0 * d * v * scored if lm_head else 0.0,
             "attention": 12.0 * layers * h * dh * keys}
    return {"total": sum(parts.values()), "parts": parts, "tokens": tokens, "scored_tokens": scored,
            "visible_keys": keys}


def _visible_keys(seg: np.ndarray, branch: np.ndarray | None) -> int:
    """How many (query, key) pairs of one row attend, real queries only: ``model/attention.attention_mask``
    itself, so the count cannot drift from what the model computes."""
    from tuna_jax.model.attention import attention_mask

    s, idx = seg[None], np.arange(seg.shape[-1])
    b = None if branch is None else branch[None]
    mask = np.asarray(attention_mask(s, s, idx, idx, b, b))[:, 0]  # [1, L, L]
    return int(np.count_nonzero(mask & (s > 0)[:, :, None]))

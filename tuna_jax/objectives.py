"""The training objectives, one row per ``train.mode``: what a record is, what a batch carries, and the
summed loss of one (micro-)batch. Every place that differs by mode reads this table.

=======  ========  ==================================  ===================================================
mode     records   a batch carries                     loss per prompt (``losses.py``)
=======  ========  ==================================  ===================================================
sft      sft       the response                        token-mean NLL of the response (count = tokens)
ranking  ranking   N candidates + the MLE target       rank_weight L_rank(v, target) + mle_weight L_MLE,
                                                       v_k = mean log-likelihood of candidate k
prm      ranking   N candidates                        L_rank(r, target), r_k = reward head on candidate
                                                       k's EOS hidden state (``model/reward.py``)
=======  ========  ==================================  ===================================================

A batch is a :mod:`tuna_jax.data.layouts` batch (B examples; N + 1 sequence slots each, slot N the
separate MLE target), in any layout; the candidates and the MLE target go through the model in one forward
pass. Sums divided by ``count`` are means (ranking and PRM: count = real prompts).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from tuna_jax.logprobs import example_logprobs
from tuna_jax.losses import mle_loss, pair_accuracy, ranking_loss, sequence_scores


def sft_sums(model, batch: dict, cfg, head=None, reference=None) -> dict[str, jax.Array]:
    lc = cfg.loss
    ex = batch["example_mask"].astype(jnp.float32)  # [B]
    lp, cnt = example_logprobs(model, batch, 1, chunk=lc.chunk, budget_mb=lc.logits_budget_mb)  # [B, 1]
    return {"loss": -jnp.sum(lp[:, 0] * ex), "count": jnp.sum(cnt[:, 0] * ex), "tokens": jnp.sum(batch["real_tokens"])}


def ranking_sums(model, batch: dict, cfg, head=None, reference=None) -> dict[str, jax.Array]:
    """``reference``: the frozen model whose scores are v_ref when ``loss.reference=model`` (LoRA's base)."""
    lc, n = cfg.loss, cfg.data.num_candidates
    ex = batch["example_mask"].astype(jnp.float32)  # [B]
    lp, cnt = example_logprobs(model, batch, n + 1, chunk=lc.chunk, budget_mb=lc.logits_budget_mb)  # [B, N+1]
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
    elif lc.mle_target == "every":  # the candidates and the original (slot n; absent sequences have no tokens)
        mle = mle_loss(lp, cnt, jnp.concatenate([valid, jnp.ones_like(valid[:, :1])], axis=-1))
    else:  # the separate MLE sequence (original) or the best candidate's slot (best)
        at = jnp.maximum(batch["mle_slot"], 0)[:, None]
        mle = mle_loss(jnp.take_along_axis(lp, at, -1)[:, 0], jnp.take_along_axis(cnt, at, -1)[:, 0])
    total = lc.rank_weight * rank + lc.mle_weight * mle  # rank_loss is logged unweighted
    return _ranked(v, target, valid, ex, total, rank, mle, batch)


def prm_sums(model, batch: dict, cfg, head=None, reference=None) -> dict[str, jax.Array]:
    """``head``: the reward head {"w" [D], "b" [1]} trained beside ``model`` (the backbone)."""
    from tuna_jax.model.reward import layout_rewards

    lc, n = cfg.loss, cfg.data.num_candidates
    ex = batch["example_mask"].astype(jnp.float32)  # [B]
    r, valid = layout_rewards(model, head, batch, n + 1)[:, :n], batch["candidate_mask"]  # [B, N]
    rank = ranking_loss(r, batch["target"], valid, margin=lc.margin, form=lc.form, beta=lc.beta)
    return _ranked(r, batch["target"], valid, ex, rank, rank, jnp.zeros_like(rank), batch)


def _ranked(scores, target, valid, ex, total, rank, mle, batch) -> dict[str, jax.Array]:
    """The sums a ranking objective logs: its loss terms per prompt [B] summed over real prompts, and the
    pairs its scores [B, N] order as the target does."""
    correct, counted = pair_accuracy(scores, target, valid)
    return {"loss": jnp.sum(total * ex), "rank_loss": jnp.sum(rank * ex), "mle_loss": jnp.sum(mle * ex),
            "pairs_correct": jnp.sum(correct * ex), "pairs": jnp.sum(counted * ex), "count": jnp.sum(ex),
            "tokens": jnp.sum(batch["real_tokens"])}


@dataclasses.dataclass(frozen=True)
class Objective:
    """One row of the table. ``records``: what ``read_records`` reads and the collator lays out;
    ``candidates``: batches carry ``data.num_candidates`` candidates; ``mle``: an MLE term (and its target
    slot) beside them; ``lm_head``: the model's LM head runs (the PRM reads hidden states); ``reward_head``:
    a scalar head trained with the backbone (params are {"backbone", "head"}, a PRM folder is exported);
    ``reference``: its scores can be held to a frozen reference model's (``loss.reference``);
    ``sums(model, batch, cfg, head, reference)``: the summed losses and counters of a batch."""

    mode: str
    records: str
    candidates: bool
    mle: bool
    lm_head: bool
    reward_head: bool
    reference: bool
    sums: Callable[..., dict]

    def mle_target(self, cfg) -> str:
        """Where the MLE term reads (``loss.mle_target``); without one, batches carry the candidates only."""
        return cfg.loss.mle_target if self.mle else "all"


OBJECTIVES = {o.mode: o for o in (
    Objective("sft", "sft", candidates=False, mle=True, lm_head=True, reward_head=False, reference=False,
              sums=sft_sums),
    Objective("ranking", "ranking", candidates=True, mle=True, lm_head=True, reward_head=False, reference=True,
              sums=ranking_sums),
    Objective("prm", "ranking", candidates=True, mle=False, lm_head=False, reward_head=True, reference=False,
              sums=prm_sums),
)}


def objective(cfg) -> Objective:
    """The objective of a training config (``train.mode``, checked by the config's choices)."""
    return OBJECTIVES[cfg.train.mode]


def batch_sums(model, batch: dict, cfg, head: dict | None = None, reference=None) -> dict[str, jax.Array]:
    """Summed losses and counters of one (micro-)batch of ``cfg``'s objective; dividing by ``count`` gives means."""
    return objective(cfg).sums(model, batch, cfg, head=head, reference=reference)


def summarize(sums: dict) -> dict[str, float]:
    """Summed counters -> the logged means."""
    sums = {k: float(v) for k, v in sums.items()}
    count = max(sums.get("count", 0.0), 1.0)
    out = {"loss": sums["loss"] / count}
    if "rank_loss" in sums:
        out.update(rank_loss=sums["rank_loss"] / count, mle_loss=sums["mle_loss"] / count,
                   pair_accuracy=sums["pairs_correct"] / max(sums["pairs"], 1.0), pairs=sums["pairs"])
    out["tokens"] = sums["tokens"]
    return out

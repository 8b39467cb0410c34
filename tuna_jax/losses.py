"""Sequence scores and the Tuna ranking and MLE losses, on per-candidate log-likelihoods.

The log-likelihoods themselves (float32, only scored tokens projected to the vocabulary) come
from :mod:`tuna_jax.logprobs`. Conventions (see DESIGN.md "The equations, exactly"):

* Every ranking tensor carries an explicit candidate axis: scores and masks are [B, N].
* v_k = (1/|r_k|) sum_t log p(r_k,t | i, r_k,<t): the per-token mean over response + EOS.
  A candidate with no scored tokens is masked out, never 0/0.
"""
from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp


# ---- sequence scores --------------------------------------------------------------------


def sequence_scores(logprob_sum: jax.Array, num_tokens: jax.Array, candidate_mask: jax.Array | None = None,
                    length_power: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """v = logprob_sum / num_tokens**length_power, and the mask of candidates that have one.

    [B, N] each -> v [B, N] float32 (0 where masked), mask [B, N] bool. length_power 1 is the
    model score v_k; beta (1.3) gives the teacher quality score s_k.
    """
    valid = num_tokens > 0
    if candidate_mask is not None:
        valid &= candidate_mask.astype(bool)
    denom = jnp.where(valid, num_tokens, 1.0) ** length_power
    return jnp.where(valid, logprob_sum / denom, 0.0), valid


# ---- ranking loss ----------------------------------------------------------------------


@jax.jit
def pair_hinge(v_better: jax.Array, v_worse: jax.Array, gap: jax.Array, margin: jax.Array) -> jax.Array:
    """One pair: max(0, v_worse - v_better + margin * gap). Scalars."""
    return jnp.maximum(0.0, v_worse - v_better + margin * gap)


# All (j, k) pairs of one example, then every example: [N], [N], [N, N] -> [N, N] -> [B, N, N].
_pairs = jax.vmap(jax.vmap(pair_hinge, in_axes=(None, 0, 0, None)), in_axes=(0, None, 0, None))
_batched_pairs = jax.vmap(_pairs, in_axes=(0, 0, None, None))


def sort_by_target(v: jax.Array, target: jax.Array, mask: jax.Array):
    """Order candidates best first by target, stably; masked candidates go last.

    v, target [B, N] float, mask [B, N] bool -> the three, reordered.
    """
    key = jnp.where(mask, target.astype(jnp.float32), -jnp.inf)
    order = jnp.argsort(-key, axis=-1, stable=True)
    take = lambda x: jnp.take_along_axis(x, order, axis=-1)  # noqa: E731
    return take(v), take(target), take(mask)


def ranking_loss(v: jax.Array, target: jax.Array, mask: jax.Array, margin: float = 0.1,
                 form: Literal["paper", "reference"] = "paper") -> jax.Array:
    """The Tuna pairwise ranking loss per example.

    v [B, N]: model scores; target [B, N]: quality, higher is better; mask [B, N] bool.
    Returns [B] float32.

    After a stable sort of the candidates by target (best first, masked last), a pair j < k
    (sorted positions) counts when both are unmasked and not tied (target_j != target_k);
    its hinge is max(0, v_k - v_j + margin * (k - j)).

    * ``paper``:     sum over counted pairs.
    * ``reference``: sum over gaps g of the mean over counted pairs with k - j = g
      (what microsoft/LMOps tuna runs; a gap with no counted pair contributes 0).
    """
    if form not in ("paper", "reference"):
        raise ValueError(f"ranking loss form {form!r}: choose 'paper' or 'reference'")
    v = v.astype(jnp.float32)
    mask = mask.astype(bool)
    vs, ts, ms = sort_by_target(v, target, mask)
    n = v.shape[-1]
    idx = jnp.arange(n)
    gap = (idx[None, :] - idx[:, None]).astype(jnp.float32)  # [N, N]: k - j
    hinge = _batched_pairs(vs, vs, gap, jnp.float32(margin))  # [B, N, N], [b, j, k]
    counted = ((idx[:, None] < idx[None, :])[None]
               & ms[:, :, None] & ms[:, None, :]
               & (ts[:, :, None] != ts[:, None, :]))
    hinge = jnp.where(counted, hinge, 0.0)
    if form == "paper":
        return jnp.sum(hinge, axis=(-2, -1))
    by_gap = jax.nn.one_hot(gap.astype(jnp.int32), n, dtype=jnp.float32)  # [N, N, G]
    sums = jnp.einsum("bjk,jkg->bg", hinge, by_gap)
    counts = jnp.einsum("bjk,jkg->bg", counted.astype(jnp.float32), by_gap)
    return jnp.sum(jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), 0.0)[:, 1:], axis=-1)


def pair_accuracy(v: jax.Array, target: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Fraction of counted (non-tied, unmasked) pairs that v orders like the target.

    [B, N] each -> (correct pairs [B], counted pairs [B]); a tie in v counts as wrong.
    """
    vs, ts, ms = sort_by_target(v.astype(jnp.float32), target, mask.astype(bool))
    n = v.shape[-1]
    idx = jnp.arange(n)
    counted = ((idx[:, None] < idx[None, :])[None] & ms[:, :, None] & ms[:, None, :]
               & (ts[:, :, None] != ts[:, None, :]))
    correct = counted & (vs[:, :, None] > vs[:, None, :])
    return jnp.sum(correct, axis=(-2, -1)).astype(jnp.float32), jnp.sum(counted, axis=(-2, -1)).astype(jnp.float32)


# ---- MLE -------------------------------------------------------------------------------


def mle_loss(logprob_sum: jax.Array, num_tokens: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Token-mean negative log-likelihood per sequence, averaged over the sequences of an
    example that are unmasked and non-empty.

    [B] or [B, N] inputs -> [B] float32 (0 for an example with nothing to score).
    """
    if logprob_sum.ndim == 1:
        logprob_sum, num_tokens = logprob_sum[:, None], num_tokens[:, None]
        mask = None if mask is None else mask[:, None]
    valid = num_tokens > 0
    if mask is not None:
        valid &= mask.astype(bool)
    nll = jnp.where(valid, -logprob_sum / jnp.where(valid, num_tokens, 1.0), 0.0)
    return jnp.sum(nll, axis=-1) / jnp.maximum(jnp.sum(valid, axis=-1), 1)


"""Exact candidate log-likelihoods, sequence scores, and the Tuna ranking and MLE losses.

Conventions (see DESIGN.md "The equations, exactly"):

* Token batches carry an explicit candidate axis: ``input_ids`` [B, N, L].
* ``loss_mask`` [B, N, L] is target-aligned: 1 at position t when token t is a response
  token or the EOS. The logits at t-1 predict token t, so position 0 is never scored.
* log p is computed in float32, ``chunk`` positions at a time: the [B*N, L, V] logits are
  never materialised (only [B*N, chunk, V]), and the chunk body is rematerialised in the
  backward pass so the gradient does not store them either.
* v_k = (1/|r_k|) sum_t log p(r_k,t | i, r_k,<t): the per-token mean over response + EOS.
  A candidate with no scored tokens is masked out, never 0/0.
"""
from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from tuna_jax.model.llama import DTYPES, Llama

# ---- log-likelihoods -------------------------------------------------------------------


def chunked_token_logprobs(hidden: jax.Array, head: jax.Array, targets: jax.Array, chunk: int = 128) -> jax.Array:
    """log p(targets) from hidden states, ``chunk`` positions at a time.

    hidden [M, L, D] (any float dtype), head [D, V], targets [M, L] int -> [M, L] float32.
    Peak extra memory: [M, chunk, V] float32 logits, not [M, L, V].
    """
    m, l, d = hidden.shape
    chunk = max(1, min(chunk, l))
    pad = (-l) % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    n = (l + pad) // chunk
    hs = hidden.reshape(m, n, chunk, d).swapaxes(0, 1)  # [n, M, c, D]
    ts = targets.reshape(m, n, chunk).swapaxes(0, 1)  # [n, M, c]

    @jax.checkpoint  # recompute the chunk's logits in the backward pass instead of storing them
    def one_chunk(h, t):
        logits = jnp.einsum("mcd,dv->mcv", h, head.astype(h.dtype), preferred_element_type=jnp.float32)
        picked = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return picked - jax.nn.logsumexp(logits, axis=-1)

    out = jax.lax.map(lambda xs: one_chunk(*xs), (hs, ts))  # [n, M, c]
    return out.swapaxes(0, 1).reshape(m, n * chunk)[:, :l]


def naive_token_logprobs(hidden: jax.Array, head: jax.Array, targets: jax.Array) -> jax.Array:
    """Reference: the full log_softmax then gather. [M, L, D], [D, V], [M, L] -> [M, L]."""
    logits = jnp.einsum("mld,dv->mlv", hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32)
    return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]


def sequence_logprobs(model: Llama, input_ids: jax.Array, loss_mask: jax.Array, segment_ids: jax.Array | None = None,
                      positions: jax.Array | None = None, chunk: int = 128) -> tuple[jax.Array, jax.Array]:
    """Sum of log p over the masked tokens and their count, per sequence.

    input_ids, loss_mask, segment_ids, positions: [..., L] (e.g. [B, N, L] or [B, L]).
    Returns logprob_sum [...] float32 and num_tokens [...] float32.
    """
    lead, l = input_ids.shape[:-1], input_ids.shape[-1]
    flat = lambda x: x.reshape((-1, l))  # noqa: E731
    ids = flat(input_ids)
    seg = flat(segment_ids) if segment_ids is not None else jnp.ones_like(ids)
    pos = flat(positions) if positions is not None else jnp.broadcast_to(jnp.arange(l), ids.shape)
    hidden, _ = model.hidden_states(ids, pos, seg)
    # logits at t predict token t+1: score targets ids[:, 1:] with hidden[:, :-1].
    lp = chunked_token_logprobs(hidden[:, :-1], model.lm_head_weight().astype(DTYPES[model.cfg.dtype]),
                                ids[:, 1:], chunk)
    mask = flat(loss_mask)[:, 1:].astype(jnp.float32)
    total = jnp.sum(lp * mask, axis=-1)
    count = jnp.sum(mask, axis=-1)
    return total.reshape(lead), count.reshape(lead)


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


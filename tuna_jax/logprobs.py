"""Exact token log-likelihoods: the vocabulary projection, and per-sequence sums in any layout.

Split from ``losses.py`` (which keeps scores, ranking and MLE losses) because this is the
expensive half of a ranking step and has one job: turn final hidden states into float32
log p(token), touching the [tokens, V] logits as little as memory allows.

Two ideas make it fast:

* **Only scored tokens are projected.** A batch names the tokens to score with three
  ``[..., S]`` arrays (see :mod:`tuna_jax.data.layouts`): ``score_src`` (the index along L of the
  hidden state that predicts the token), ``score_tgt`` (the token id) and ``score_slot`` (which
  sequence the token belongs to, -1 for an unused entry). Prompts and padding never reach the
  [D, V] projection; in the prefix-shared layout the prompt's last hidden state predicts the first
  token of every candidate.
* **Chunks only when they are needed.** :func:`token_logprobs` projects ``chunk`` tokens at a time
  (float32 logits ``[chunk, V]``) and recomputes a chunk's logits in the backward pass, so memory
  stays flat in V; with ``chunk=0`` the chunk is sized from ``budget_mb`` and, when all tokens fit,
  there is a single pass with no recomputation at all.

All log-probs are float32 whatever the compute dtype (the log-softmax is computed in vocabulary or
sequence chunks, in float32).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from tuna_jax.model.llama import DTYPES, Llama

DEFAULT_BUDGET_MB = 256


def auto_chunk(num_tokens: int, vocab: int, budget_mb: float = DEFAULT_BUDGET_MB) -> int:
    """Tokens per vocabulary-projection chunk: all of them when their float32 logits fit in
    ``budget_mb`` MiB, else the largest multiple of 128 that does (at least 128)."""
    fit = int(budget_mb * 2 ** 20 // (4 * vocab))
    if fit >= num_tokens:
        return num_tokens
    return max(128, fit // 128 * 128)


@jax.custom_vjp
def _logits_16bit(h: jax.Array, w: jax.Array) -> jax.Array:
    """h [T, D] @ w [D, V] in a 16-bit dtype with float32 accumulation -> float32 [T, V] logits.

    The backward pass rounds the float32 logit gradient to the compute dtype before its two
    matmuls, as every other matmul of the model gets its gradient (the default would run them as
    float32 GEMMs). The forward logits, and so every log-prob, stay exactly float32."""
    return jnp.einsum("td,dv->tv", h, w, preferred_element_type=jnp.float32)


def _logits_fwd(h, w):
    return _logits_16bit(h, w), (h, w)


def _logits_bwd(res, g):
    h, w = res
    g = g.astype(h.dtype)
    dh = jnp.einsum("tv,dv->td", g, w, preferred_element_type=jnp.float32).astype(h.dtype)
    dw = jnp.einsum("td,tv->dv", h, g, preferred_element_type=jnp.float32).astype(w.dtype)
    return dh, dw


_logits_16bit.defvjp(_logits_fwd, _logits_bwd)


def _logprob_of(h: jax.Array, head: jax.Array, t: jax.Array) -> jax.Array:
    """h [T, D], head [D, V], t [T] -> log p(t | h) [T] float32, logits in float32."""
    if h.dtype == jnp.float32:
        logits = jnp.einsum("td,dv->tv", h, head.astype(h.dtype), preferred_element_type=jnp.float32)
    else:
        logits = _logits_16bit(h, head.astype(h.dtype))
    # The picked logit as h . head[:, t]: a gather of T columns of the head, so nothing of size
    # [T, V] is written for it (a compare-and-select over V materialises one on XLA:CPU).
    picked = jnp.einsum("td,td->t", h, jnp.take(head, t, axis=1).T.astype(h.dtype),
                        preferred_element_type=jnp.float32)
    return picked - jax.nn.logsumexp(logits, axis=-1)


def token_logprobs(hidden: jax.Array, head: jax.Array, targets: jax.Array, chunk: int = 0,
                   budget_mb: float = DEFAULT_BUDGET_MB) -> jax.Array:
    """log p(targets | hidden) for a flat list of tokens.

    hidden [T, D] (any float dtype), head [D, V], targets [T] int -> [T] float32.
    ``chunk`` tokens per pass (0: :func:`auto_chunk` from ``budget_mb``). One pass when the chunk
    covers every token (no recomputation); otherwise ``lax.map`` over chunks, each rematerialised in
    the backward pass, so peak extra memory is one [chunk, V] float32 block.
    """
    t_len, d = hidden.shape
    chunk = auto_chunk(t_len, head.shape[-1], budget_mb) if chunk <= 0 else min(chunk, t_len)
    if chunk >= t_len:
        return _logprob_of(hidden, head, targets)
    pad = (-t_len) % chunk
    hs = jnp.pad(hidden, ((0, pad), (0, 0))).reshape(-1, chunk, d)
    ts = jnp.pad(targets, (0, pad)).reshape(-1, chunk)
    one = jax.checkpoint(lambda h, t: _logprob_of(h, head, t))
    return jax.lax.map(lambda xs: one(*xs), (hs, ts)).reshape(-1)[:t_len]


def naive_token_logprobs(hidden: jax.Array, head: jax.Array, targets: jax.Array) -> jax.Array:
    """Reference: the full log_softmax then gather. [M, L, D], [D, V], [M, L] -> [M, L]."""
    logits = jnp.einsum("mld,dv->mlv", hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32)
    return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]


def chunked_token_logprobs(hidden: jax.Array, head: jax.Array, targets: jax.Array, chunk: int = 0) -> jax.Array:
    """[M, L, D], [D, V], [M, L] -> log p [M, L] float32, ``chunk`` tokens per projection pass
    (0: sized by the default memory budget). The memory bench's subject."""
    m, l, d = hidden.shape
    return token_logprobs(hidden.reshape(m * l, d), head, targets.reshape(m * l), chunk).reshape(m, l)


def scored_token_logprobs(model: Llama, tokens: dict, chunk: int = 0,
                          budget_mb: float = DEFAULT_BUDGET_MB) -> jax.Array:
    """log p of every scored token of a layout batch (:mod:`tuna_jax.data.layouts`).

    tokens: ``input_ids, positions, segment_ids`` [U, Q, L] (``branch_ids`` optional) and
    ``score_src, score_tgt`` [U, S] (src indexes the unit's flattened Q * L positions).
    Returns [U, S] float32 (entries whose ``score_slot`` is -1 hold garbage: mask them).
    """
    u, q, length = tokens["input_ids"].shape
    flat = lambda x: x.reshape((u * q, length))  # noqa: E731
    branch, blocks = tokens.get("branch_ids"), tokens.get("kv_blocks")
    hidden, _ = model.hidden_states(flat(tokens["input_ids"]), flat(tokens["positions"]),
                                    flat(tokens["segment_ids"]), None if branch is None else flat(branch),
                                    kv_blocks=None if blocks is None else blocks.reshape((u * q,) + blocks.shape[2:]))
    d = hidden.shape[-1]
    src, tgt = tokens["score_src"], tokens["score_tgt"]  # [U, S]
    picked = jnp.take_along_axis(hidden.reshape(u, q * length, d), src[..., None], axis=1)  # [U, S, D]
    head = model.lm_head_weight().astype(DTYPES[model.cfg.dtype])
    lp = token_logprobs(picked.reshape(-1, d), head, tgt.reshape(-1), chunk, budget_mb)
    return lp.reshape(src.shape)


def slot_logprobs(model: Llama, tokens: dict, num_slots: int, chunk: int = 0,
                  budget_mb: float = DEFAULT_BUDGET_MB) -> tuple[jax.Array, jax.Array]:
    """Per-sequence log-likelihood sums and token counts of a layout batch.

    ``score_slot`` [U, S] assigns each scored token to one of ``num_slots`` sequences of its unit
    (-1: unused). Returns logprob_sum [U, num_slots] and num_tokens [U, num_slots], float32.
    """
    lp = scored_token_logprobs(model, tokens, chunk, budget_mb)  # [U, S]
    slot = tokens["score_slot"]
    onehot = (slot[..., None] == jnp.arange(num_slots)).astype(jnp.float32)  # [U, S, slots]; -1 matches none
    total = jnp.einsum("us,usk->uk", jnp.where(slot >= 0, lp, 0.0), onehot)
    return total, jnp.sum(onehot, axis=1)


def example_logprobs(model: Llama, batch: dict, slots: int, chunk: int = 0,
                     budget_mb: float = DEFAULT_BUDGET_MB) -> tuple[jax.Array, jax.Array]:
    """Per-example, per-slot log-likelihood sums and token counts of a layout batch.

    ``unit_example`` [U, E] names the example of each of a unit's E example places (-1: none);
    an example's sequences may lie in several units (packed pieces). Returns logprob_sum and
    num_tokens [B, slots] float32, B = ``example_mask``'s length.
    """
    u, e = batch["unit_example"].shape
    b = batch["example_mask"].shape[0]
    total, count = slot_logprobs(model, batch, e * slots, chunk, budget_mb)  # [U, E * slots]
    to_example = (batch["unit_example"][..., None] == jnp.arange(b)).astype(jnp.float32)  # [U, E, B]
    gather = lambda x: jnp.einsum("uek,ueb->bk", x.reshape(u, e, slots), to_example)  # noqa: E731
    return gather(total), gather(count)


def sequence_logprobs(model: Llama, input_ids: jax.Array, loss_mask: jax.Array, segment_ids: jax.Array | None = None,
                      positions: jax.Array | None = None, chunk: int = 0) -> tuple[jax.Array, jax.Array]:
    """Sum of log p over the masked tokens and their count, per right-padded sequence.

    input_ids, loss_mask (target-aligned: 1 at t when token t is scored; t=0 never is),
    segment_ids, positions: [..., L]. Returns logprob_sum [...] and num_tokens [...] float32.
    A convenience over :func:`slot_logprobs` for one sequence per row, every position a
    candidate for scoring (no compaction).
    """
    lead, l = input_ids.shape[:-1], input_ids.shape[-1]
    ids = input_ids.reshape((-1, 1, l))
    m = ids.shape[0]
    seg = segment_ids.reshape(ids.shape) if segment_ids is not None else jnp.ones_like(ids)
    pos = positions.reshape(ids.shape) if positions is not None else jnp.broadcast_to(jnp.arange(l), ids.shape)
    scored = loss_mask.reshape(m, 1, l)[..., 1:] > 0
    tokens = {"input_ids": ids, "positions": pos, "segment_ids": seg,
              "score_src": jnp.broadcast_to(jnp.arange(l - 1), (m, l - 1)),
              "score_tgt": ids[:, 0, 1:], "score_slot": jnp.where(scored[:, 0], 0, -1)}
    total, count = slot_logprobs(model, tokens, 1, chunk)
    return total[:, 0].reshape(lead), count[:, 0].reshape(lead)

"""Sequence scores, the ranking losses (Tuna's and the DPO / PRO / InfoNCA / LiPO family of
``ranking_loss``) and the MLE loss, on per-candidate log-likelihoods.

The log-likelihoods themselves (float32, only scored tokens projected to the vocabulary) come
from :mod:`tuna_jax.logprobs`. Conventions (docs/objectives.md gives the forms):

* Every ranking tensor carries an explicit candidate axis: scores and masks are [B, N].
* v_k = (1/|r_k|) sum_t log p(r_k,t | i, r_k,<t): the per-token mean over response + EOS.
  A candidate with no scored tokens is masked out, never 0/0. ``sequence_scores(...,
  length_power=0.0)`` is the summed log-prob instead (``loss.score=sum``, DPO's convention).
* A reference model's candidate scores v_ref are precomputed and stored with the data
  (``data/reference.py``) and turned into scores the same way as v.
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


# All (j, k) pairs of one example: [N], [N], [N, N] gaps -> [N, N]; vmapped over the batch where used.
_pairs = jax.vmap(jax.vmap(pair_hinge, in_axes=(None, 0, 0, None)), in_axes=(0, None, 0, None))


def sort_by_target(v: jax.Array, target: jax.Array, mask: jax.Array):
    """Order candidates best first by target, stably; masked candidates go last.

    v, target [B, N] float, mask [B, N] bool -> the three, reordered.
    """
    key = jnp.where(mask, target.astype(jnp.float32), -jnp.inf)
    order = jnp.argsort(-key, axis=-1, stable=True)
    take = lambda x: jnp.take_along_axis(x, order, axis=-1)  # noqa: E731
    return take(v), take(target), take(mask)


RANKING_FORMS = ("paper", "reference", "listmle", "infonca", "dpo_pairs", "dpo_best", "lipo_lambda")


def tie_ranks(ts: jax.Array, ms: jax.Array) -> jax.Array:
    """Competition rank of each candidate: the number of unmasked candidates with a strictly higher
    target ("1224" ranking, 0-based). Equal to the sorted position when no targets tie, and the same
    for tied candidates whatever their order in the input.

    ts [B, N], ms [B, N] bool -> [B, N] float32.
    """
    better = ms[:, None, :] & (ts[:, None, :] > ts[:, :, None])  # [b, k, m]: m beats k
    return jnp.sum(better, axis=-1).astype(jnp.float32)


def counted_pairs(ts: jax.Array, ms: jax.Array) -> jax.Array:
    """Which sorted pairs (j, k) count: j < k, both unmasked, target_j != target_k.

    ts [B, N], ms [B, N] bool (sorted by target) -> [B, N, N] bool, indexed [b, j, k].
    """
    idx = jnp.arange(ts.shape[-1])
    return ((idx[:, None] < idx[None, :])[None]
            & ms[:, :, None] & ms[:, None, :]
            & (ts[:, :, None] != ts[:, None, :]))


def ranking_loss(v: jax.Array, target: jax.Array, mask: jax.Array, margin: float = 0.1,
                 form: Literal["paper", "reference", "listmle", "infonca", "dpo_pairs", "dpo_best",
                               "lipo_lambda"] = "paper",
                 beta: float = 1.0, v_ref: jax.Array | None = None) -> jax.Array:
    """A ranking loss per example, one of ``RANKING_FORMS``.

    v [B, N]: model scores; target [B, N]: quality, higher is better; mask [B, N] bool;
    v_ref [B, N] or None: the frozen reference model's scores of the same candidates.
    Returns [B] float32.

    The score of candidate k is s_k = v_k - v_ref_k when ``v_ref`` is given, else s_k = v_k.
    Candidates are sorted by target, best first (masked ones last), so c_0 .. c_{n-1} below are
    the n unmasked candidates in that order. A pair (j, k), j < k in sorted order, counts when both
    are unmasked and target_j != target_k. rank_k is k's competition rank, the number of unmasked
    candidates with a strictly higher target (equal to k when no targets tie). Ties: every form
    gives the same value whatever the input order of tied candidates (the paper ranks strictly and
    says nothing of ties; how each form treats them is ours and stated below). Identical texts are
    made ties when records are read (``data/records.py``).
    ``margin`` is used by ``paper`` and ``reference`` only, ``beta`` (> 0) by the other forms.
    An example with fewer than two unmasked candidates (or, for the pairwise forms, no counted
    pair) gives 0; values and gradients are finite for every mask, all-masked rows included,
    and masked candidates get zero gradient.

    * ``paper`` (Tuna, Li et al. 2023): sum over counted pairs of
      max(0, s_k - s_j + margin*(rank_k - rank_j)). With strict rankings rank_k - rank_j = k - j,
      the paper's gap; a tie shares one rank, so it does not widen the gap of the pairs after it.
    * ``reference``: sum over gaps g of the mean over counted pairs with rank_k - rank_j = g of the
      same hinge (what microsoft/LMOps tuna runs, where ties get a margin; a gap with no counted pair
      contributes 0).
    * ``listmle``: the Plackett-Luce negative log-likelihood of the sorted order,
      -sum_{i=0}^{n-2} [beta*s_{c_i} - logsumexp_{j>=i} beta*s_{c_j}] (the ranking loss of PRO,
      Song et al. 2023, "Preference Ranking Optimization for Human Alignment", without its
      reward-dependent temperature; with v_ref, the Plackett-Luce form of DPO, Rafailov et al. 2023,
      Appendix A.3). Ties (ours): Breslow's approximation, as in Cox regression with tied times:
      -sum_k [beta*s_k - logsumexp_{j: target_j <= target_k} beta*s_j] over the unmasked k that
      beat at least one candidate. With strict rankings this is the sum above; a tied group shares
      one denominator, and candidates tied for last contribute nothing.
    * ``infonca`` (InfoNCA, Chen et al. 2024, "Noise Contrastive Alignment of Language Models with
      Explicit Rewards"): -sum_k softmax(target)_k * log softmax(beta*s)_k, both softmaxes over the
      unmasked candidates. The paper's target is softmax(r/alpha); here alpha = 1, so the scale of
      ``target`` is the temperature (rescale it to change alpha). Tied targets get equal weight.
    * ``dpo_pairs`` (DPO's Bradley-Terry loss, Rafailov et al. 2023, "Direct Preference
      Optimization: Your Language Model is Secretly a Reward Model", on every counted pair):
      mean over counted pairs of -log sigmoid(beta*(s_j - s_k)).
    * ``dpo_best``: the same, only for pairs (b, k) with b a best candidate (rank_b = 0) and k below
      it: mean over those pairs of -log sigmoid(beta*(s_b - s_k)). Several candidates tied for best
      are each the "chosen" side; a pair between them does not count.
    * ``lipo_lambda`` (LiPO-lambda, Liu et al. 2024, "LiPO: Listwise Preference Optimization
      through Learning-to-Rank"): sum over counted pairs of
      Delta_jk * -log sigmoid(beta*(s_j - s_k)), with the Lambda weight held constant
      (stop_gradient), see ``lambda_weights``.
    """
    if form not in RANKING_FORMS:
        raise ValueError(f"ranking loss form {form!r}: choose one of {', '.join(RANKING_FORMS)}")
    if isinstance(beta, (int, float)) and not beta > 0:
        raise ValueError(f"ranking loss beta={beta!r}: must be > 0")
    v = v.astype(jnp.float32)
    mask = mask.astype(bool)
    s = v if v_ref is None else v - v_ref.astype(jnp.float32)
    if form in ("paper", "reference"):
        return _hinge_loss(s, target, mask, margin, form)
    # A masked score never enters a term; zeroing it here also keeps NaN/inf padding out of the
    # gradient (the where's gradient sends 0 to masked entries).
    s = jnp.where(mask, s, 0.0)
    ss, ts, ms = sort_by_target(s, target, mask)
    x = beta * ss
    if form == "listmle":
        return _listmle(x, ts, ms)
    if form == "infonca":
        return _infonca(x, ts.astype(jnp.float32), ms)
    counted = counted_pairs(ts, ms)  # [B, N, N]
    nll = jax.nn.softplus(x[:, None, :] - x[:, :, None])  # -log sigmoid(x_j - x_k), [b, j, k]
    if form == "dpo_best":
        counted = counted & (tie_ranks(ts, ms) == 0)[:, :, None]
    if form == "lipo_lambda":
        weights = jax.lax.stop_gradient(lambda_weights(x, ts, ms))
        return jnp.sum(jnp.where(counted, weights * nll, 0.0), axis=(-2, -1))
    count = jnp.sum(counted, axis=(-2, -1)).astype(jnp.float32)
    return jnp.sum(jnp.where(counted, nll, 0.0), axis=(-2, -1)) / jnp.maximum(count, 1.0)


def _hinge_loss(v: jax.Array, target: jax.Array, mask: jax.Array, margin: float, form: str) -> jax.Array:
    """Tuna's ``paper`` and ``reference`` forms (see ``ranking_loss``). [B, N] each -> [B]."""
    vs, ts, ms = sort_by_target(v, target, mask)
    n = v.shape[-1]
    rank = tie_ranks(ts, ms)  # [B, N]
    gap = rank[:, None, :] - rank[:, :, None]  # [B, N, N]: rank_k - rank_j
    hinge = jax.vmap(_pairs, in_axes=(0, 0, 0, None))(vs, vs, gap, jnp.float32(margin))  # [B, N, N], [b, j, k]
    counted = counted_pairs(ts, ms)
    hinge = jnp.where(counted, hinge, 0.0)
    if form == "paper":
        return jnp.sum(hinge, axis=(-2, -1))
    by_gap = jax.nn.one_hot(gap.astype(jnp.int32), n, dtype=jnp.float32)  # [B, N, N, G]
    sums = jnp.einsum("bjk,bjkg->bg", hinge, by_gap)
    counts = jnp.einsum("bjk,bjkg->bg", counted.astype(jnp.float32), by_gap)
    return jnp.sum(jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), 0.0)[:, 1:], axis=-1)


def masked_logsumexp(x: jax.Array, where: jax.Array) -> jax.Array:
    """log sum_{k: where_k} exp(x_k) over the last axis; 0 where nothing is selected.

    x [..., N] float, where [..., N] bool -> [...]. Finite values and gradients for any ``where``
    (no exp of +inf, no log 0, no 0 * inf in the backward pass); unselected entries get zero
    gradient.
    """
    top = jnp.max(jnp.where(where, x, -jnp.inf), axis=-1, keepdims=True)
    top = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))  # lse does not depend on it
    e = jnp.where(where, jnp.exp(jnp.where(where, x, top) - top), 0.0)
    total = jnp.sum(e, axis=-1)
    some = total > 0
    return jnp.where(some, jnp.log(jnp.where(some, total, 1.0)) + top[..., 0], 0.0)


def _listmle(x: jax.Array, ts: jax.Array, ms: jax.Array) -> jax.Array:
    """Plackett-Luce NLL of the target order, ties by Breslow (see ``ranking_loss``).

    x = beta*s, ts, ms [B, N] (any order) -> [B].
    """
    rest = (ts[:, None, :] <= ts[:, :, None]) & ms[:, None, :] & ms[:, :, None]  # [B, k, j]: j not above k
    lse = masked_logsumexp(jnp.broadcast_to(x[:, None, :], rest.shape), rest)  # [B, N]
    beats_one = ms & jnp.any(ms[:, None, :] & (ts[:, None, :] < ts[:, :, None]), axis=-1)  # [B, k]
    return -jnp.sum(jnp.where(beats_one, x - lse, 0.0), axis=-1)


def _infonca(x: jax.Array, t: jax.Array, ms: jax.Array) -> jax.Array:
    """-sum_k softmax(t)_k log softmax(x)_k over unmasked k. x = beta*s, t, ms [B, N] -> [B]."""
    p = jnp.where(ms, jnp.exp(jnp.where(ms, t, 0.0) - masked_logsumexp(t, ms)[:, None]), 0.0)
    log_q = x - masked_logsumexp(x, ms)[:, None]
    enough = jnp.sum(ms, axis=-1) >= 2
    return jnp.where(enough, -jnp.sum(jnp.where(ms, p * log_q, 0.0), axis=-1), 0.0)


def lambda_weights(x: jax.Array, ts: jax.Array, ms: jax.Array) -> jax.Array:
    """LiPO-lambda's pair weights: |Delta NDCG| of swapping j and k in the model's ranking.

    x [B, N]: model scores (beta*s), ts [B, N] targets and ms [B, N] bool, all sorted best first by
    target -> [B, N, N] float32, indexed [b, j, k] (meaningful where ``counted_pairs``).

    Liu et al. 2024 (LiPO, Sec. 4) weight a pair by the Lambda weight
    |G_j - G_k| * |1/D(tau(j)) - 1/D(tau(k))|, with gain G = 2^psi - 1 of the label psi and
    discount D(tau) = log(1 + tau) of the rank tau a candidate has in the model's ranking by s.
    Over the n unmasked candidates of one example we use:

    * psi_j = #{unmasked k: target_k < target_j} / (n - 1), in [0, 1]: the fraction of the other
      candidates it beats. Our choice: gains come from the target's ranks, not its values, so any
      monotone rescaling of the target (ranks, teacher log-probs) gives the same weights; tied
      candidates get the same gain.
    * tau(j) = 1 + #{unmasked k: s_k > s_j, or s_k = s_j and target_k > target_j}
      + #{unmasked k != j: s_k = s_j and target_k = target_j} / 2: the 1-based position in the
      model's ranking, ties in s broken in favour of the target order (so the equal scores of a
      policy still equal to its reference give nonzero weights), and candidates tied in both sharing
      the mean of their positions (so their input order does not matter).
    * D(tau) = log2(1 + tau) (the base only scales every weight by the same constant).
    * Delta_jk = |G_j - G_k| * |1/D(tau(j)) - 1/D(tau(k))| / IDCG, IDCG = sum_r G_(r) / log2(1 + r)
      over the gains sorted descending: the |Delta NDCG| of swapping j and k, the LambdaRank
      weight. Dividing by IDCG (a per-example constant) is our choice of normalisation.
    """
    n = x.shape[-1]
    idx = jnp.arange(n)
    n_valid = jnp.sum(ms, axis=-1, keepdims=True).astype(jnp.float32)  # [B, 1]
    beats = jnp.sum(ms[:, None, :] & (ts[:, None, :] < ts[:, :, None]), axis=-1)  # [B, j]
    psi = jnp.where(ms, beats / jnp.maximum(n_valid - 1.0, 1.0), 0.0)
    gain = jnp.exp2(psi) - 1.0
    same_x = x[:, None, :] == x[:, :, None]  # [b, j, k]
    ahead = ms[:, None, :] & ((x[:, None, :] > x[:, :, None]) | (same_x & (ts[:, None, :] > ts[:, :, None])))
    shared = ms[:, None, :] & same_x & (ts[:, None, :] == ts[:, :, None]) & (idx[None, :] != idx[:, None])[None]
    tau = 1.0 + jnp.sum(ahead, axis=-1) + 0.5 * jnp.sum(shared, axis=-1)  # [B, j]
    inv_disc = 1.0 / jnp.log2(1.0 + tau)
    ideal = jnp.sum(jnp.where(ms, gain / jnp.log2(2.0 + idx), 0.0), axis=-1)  # sorted = ideal order
    delta = (jnp.abs(gain[:, :, None] - gain[:, None, :])
             * jnp.abs(inv_disc[:, :, None] - inv_disc[:, None, :]))
    return delta / jnp.where(ideal > 0, ideal, 1.0)[:, None, None]


def pair_accuracy(v: jax.Array, target: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Fraction of counted (non-tied, unmasked) pairs that v orders like the target.

    [B, N] each -> (correct pairs [B], counted pairs [B]); a tie in v counts as wrong.
    """
    vs, ts, ms = sort_by_target(v.astype(jnp.float32), target, mask.astype(bool))
    counted = counted_pairs(ts, ms)
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


"""Every ranking objective of ``losses.ranking_loss``, values and gradients (w.r.t. v and v_ref),
against a NumPy brute force written from the formulas with plain loops over candidates and pairs.

The brute force works on one example at a time in float64 and returns the loss and its gradient
with respect to the scores s = v - v_ref, derived by hand per form; a finite-difference check keeps
those hand-derived gradients honest.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tuna_jax.config import CHOICES
from tuna_jax.losses import RANKING_FORMS, pair_accuracy, ranking_loss

MARGIN = 0.1


def log_sigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def log_sum_exp(xs: list) -> float:
    top = max(xs)
    return top + math.log(sum(math.exp(x - top) for x in xs))


def lipo_weight(j, k, c, s, t) -> float:
    """|Delta NDCG| of swapping j and k: gains 2^psi - 1 with psi the fraction of the others a
    candidate beats on target; discounts 1/log2(1 + rank) of the ranking by s (ties in s: target order;
    ties in both: the mean of the positions they share)."""
    n = len(c)
    gain = {a: 2.0 ** (sum(1 for b in c if t[b] < t[a]) / (n - 1)) - 1.0 for a in c}
    by_model = sorted(c, key=lambda a: (-s[a], -t[a]))
    rank = {}
    for a in c:
        same = [i for i, b in enumerate(by_model) if s[b] == s[a] and t[b] == t[a]]
        rank[a] = sum(same) / len(same) + 1
    ideal = sum(g / math.log2(1 + r) for r, g in enumerate(sorted(gain.values(), reverse=True), start=1))
    return (abs(gain[j] - gain[k]) * abs(1 / math.log2(1 + rank[j]) - 1 / math.log2(1 + rank[k]))) / ideal


def brute_force(form, v, t, m, beta, v_ref):
    """One example: (loss, dloss/ds as a list over the N input positions)."""
    n_all = len(v)
    s = [float(v[i]) - (float(v_ref[i]) if v_ref is not None else 0.0) for i in range(n_all)]
    t = [float(x) for x in t]
    c = [i for i in sorted(range(n_all), key=lambda i: -t[i]) if m[i]]  # best first; Python's sort is stable
    grad = [0.0] * n_all
    if len(c) < 2:
        return 0.0, grad
    rank = {i: sum(t[x] > t[i] for x in c) for i in c}  # competition rank: ties share one
    pairs = [(c[a], c[b], rank[c[b]] - rank[c[a]]) for a in range(len(c)) for b in range(a + 1, len(c))
             if t[c[a]] != t[c[b]]]
    loss = 0.0
    if form in ("paper", "reference"):
        by_gap = {}
        for j, k, gap in pairs:
            by_gap.setdefault(gap, []).append((j, k))
        for gap, jk in by_gap.items():
            w = 1.0 if form == "paper" else 1.0 / len(jk)
            for j, k in jk:
                h = s[k] - s[j] + MARGIN * gap
                if h > 0:
                    loss += w * h
                    grad[k] += w
                    grad[j] -= w
    elif form == "listmle":  # Breslow ties: a tied group shares one denominator; the last group adds nothing
        for i in c:
            if not any(t[x] < t[i] for x in c):
                continue
            rest = [x for x in c if t[x] <= t[i]]
            lse = log_sum_exp([beta * s[r] for r in rest])
            loss -= beta * s[i] - lse
            grad[i] -= beta
            for r in rest:
                grad[r] += beta * math.exp(beta * s[r] - lse)
    elif form == "infonca":
        lse_t = log_sum_exp([t[k] for k in c])
        lse_s = log_sum_exp([beta * s[k] for k in c])
        for k in c:
            p, log_q = math.exp(t[k] - lse_t), beta * s[k] - lse_s
            loss -= p * log_q
            grad[k] -= beta * (p - math.exp(log_q))  # the p-weights sum to 1
    else:
        if form == "dpo_best":
            pairs = [(j, k, gap) for j, k, gap in pairs if rank[j] == 0]
        for j, k, _ in pairs:
            w = lipo_weight(j, k, c, s, t) if form == "lipo_lambda" else 1.0 / len(pairs)
            z = beta * (s[j] - s[k])
            loss -= w * log_sigmoid(z)
            grad[j] -= w * beta * sigmoid(-z)
            grad[k] += w * beta * sigmoid(-z)
    return loss, grad


def random_case(rng, b, n, with_ref):
    """Ties in target, random masks, edge rows, garbage in masked slots, optional v_ref."""
    v = (rng.randn(b, n) * 0.7).astype(np.float32)
    target = rng.randint(0, 3, (b, n)).astype(np.float32)
    mask = rng.rand(b, n) > 0.3
    mask[0] = False  # nothing to rank
    mask[1] = np.arange(n) == n - 1  # a single candidate
    target[2] = 1.0  # all tied
    mask[4], target[4], v[4] = True, np.arange(n), -0.3 * np.arange(n)  # ranked backwards: every hinge active
    v_ref = (rng.randn(b, n) * 0.7).astype(np.float32) if with_ref else None
    if with_ref:
        v_ref[3] = v[3]  # a policy still equal to its reference: every s is 0
        v_ref[4] = 0.0
    v[~mask] = rng.randn(int((~mask).sum())) * 50.0  # padding the loss must never read
    return v, target, mask, v_ref


def loss_and_grads(form, v, target, mask, beta, v_ref):
    """Loss [B] and its gradients w.r.t. v and v_ref, under jit."""
    def total(v, v_ref):
        per = ranking_loss(v, target, mask, MARGIN, form, beta, v_ref)
        return jnp.sum(per), per

    fn = jax.jit(jax.value_and_grad(total, argnums=(0, 1), has_aux=True))
    ref = jnp.zeros_like(v) if v_ref is None else jnp.asarray(v_ref)
    if v_ref is None:
        fn = jax.jit(jax.value_and_grad(lambda v, _: total(v, None), argnums=(0, 1), has_aux=True))
    (_, per), (gv, gr) = fn(jnp.asarray(v), ref)
    return np.asarray(per), np.asarray(gv), np.asarray(gr)


@pytest.mark.parametrize("form", RANKING_FORMS)
@pytest.mark.parametrize("n,with_ref,beta", [(2, True, 1.0), (3, False, 0.5), (6, True, 2.0)])
def test_values_and_gradients_match_brute_force(form, n, with_ref, beta):
    rng = np.random.RandomState(n * 7 + with_ref)
    v, target, mask, v_ref = random_case(rng, 12, n, with_ref)
    per, gv, gr = loss_and_grads(form, v, target, mask, beta, v_ref)
    want = [brute_force(form, v[b], target[b], mask[b], beta, None if v_ref is None else v_ref[b])
            for b in range(len(v))]
    want_loss = np.array([w[0] for w in want])
    want_grad = np.array([w[1] for w in want])
    assert per.shape == (12,)
    assert np.abs(per - want_loss).max() <= 1e-5, (per, want_loss)
    assert np.abs(gv - want_grad).max() <= 1e-5
    if with_ref:
        assert np.abs(gr + want_grad).max() <= 1e-5  # s = v - v_ref
    assert per[0] == per[1] == 0.0 and not gv[:2].any()  # all masked; single candidate
    assert not gv[~mask].any()
    assert np.abs(want_loss).sum() > 0 and np.abs(want_grad).sum() > 0  # the case exercises the form


@pytest.mark.parametrize("form", RANKING_FORMS)
def test_brute_force_gradients_match_finite_differences(form):
    """The hand-derived brute-force gradients against central differences of its own loss."""
    rng = np.random.RandomState(11)
    for _ in range(4):
        n = 5
        v, t, m = rng.randn(n), rng.randint(0, 3, n).astype(float), rng.rand(n) > 0.2
        v_ref = rng.randn(n)
        _, grad = brute_force(form, v, t, m, 1.5, v_ref)
        for i in range(n):
            d = np.zeros(n)
            d[i] = 1e-6
            num = (brute_force(form, v + d, t, m, 1.5, v_ref)[0] - brute_force(form, v - d, t, m, 1.5, v_ref)[0]) / 2e-6
            assert abs(num - grad[i]) <= 1e-6


@pytest.mark.parametrize("form", [f for f in RANKING_FORMS if f not in ("paper", "reference")])
@pytest.mark.slow
def test_non_finite_padding_in_masked_slots_stays_out(form):
    v = jnp.array([[0.3, jnp.nan, -0.2], [jnp.inf, jnp.nan, -jnp.inf]])
    v_ref = jnp.array([[0.1, jnp.inf, 0.0], [jnp.nan, 0.0, 0.0]])
    t = jnp.array([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0]])
    m = jnp.array([[True, False, True], [False, False, False]])
    fn = jax.value_and_grad(lambda v, r: jnp.sum(ranking_loss(v, t, m, form=form, v_ref=r)), argnums=(0, 1))
    value, (gv, gr) = fn(v, v_ref)
    assert np.isfinite(float(value)) and float(value) > 0
    assert np.isfinite(np.asarray(gv)).all() and np.isfinite(np.asarray(gr)).all()
    assert not np.asarray(gv)[1].any() and float(gv[0, 1]) == 0.0


@pytest.mark.slow
def test_two_candidates_reduce_to_dpo():
    """With one counted pair, listmle, dpo_pairs and dpo_best are -log sigmoid(beta*(s_0 - s_1)),
    and lipo_lambda is that times |1 - 1/log2(3)| (gains 1 and 0, IDCG 1)."""
    v, v_ref = jnp.array([[0.2, 0.5]]), jnp.array([[-0.1, 0.4]])
    t, m = jnp.array([[0.0, 3.0]]), jnp.ones((1, 2), bool)  # candidate 1 is the better one
    dpo = -log_sigmoid(2.0 * ((0.5 - 0.4) - (0.2 + 0.1)))
    for form in ("listmle", "dpo_pairs", "dpo_best"):
        assert float(ranking_loss(v, t, m, form=form, beta=2.0, v_ref=v_ref)[0]) == pytest.approx(dpo, abs=1e-6)
    lipo = float(ranking_loss(v, t, m, form="lipo_lambda", beta=2.0, v_ref=v_ref)[0])
    assert lipo == pytest.approx((1 - 1 / math.log2(3)) * dpo, abs=1e-6)


def test_beta_may_be_traced_and_bad_arguments_are_refused():
    v, t, m = jnp.array([[0.2, 0.5, 0.1]]), jnp.array([[2.0, 1.0, 0.0]]), jnp.ones((1, 3), bool)
    jitted = jax.jit(lambda b: ranking_loss(v, t, m, form="infonca", beta=b))
    assert float(jitted(1.5)[0]) == pytest.approx(brute_force("infonca", v[0], t[0], m[0], 1.5, None)[0], abs=1e-5)
    with pytest.raises(ValueError, match="choose one of"):
        ranking_loss(v, t, m, form="listnet")
    with pytest.raises(ValueError, match="must be > 0"):
        ranking_loss(v, t, m, form="dpo_pairs", beta=0.0)


def test_config_offers_every_form():
    assert tuple(CHOICES[("loss", "form")]) == RANKING_FORMS


@pytest.mark.parametrize("form", RANKING_FORMS)
def test_any_order_of_tied_candidates_gives_the_same_loss(form):
    """Candidates are a set: permuting them (tied ones included) changes no loss, gradient or pair count."""
    rng = np.random.RandomState(11)
    b, n = 12, 6
    v, target, mask, v_ref = random_case(rng, b, n, with_ref=True)
    target[5] = [3, 2, 2, 2, 1, 0]  # a tie in the middle: before, it widened the margin of every pair after it
    mask[5] = True
    base, base_gv, base_gr = loss_and_grads(form, v, target, mask, 0.7, v_ref)
    correct, counted = pair_accuracy(jnp.asarray(v), jnp.asarray(target), jnp.asarray(mask))
    for _ in range(4):
        perm = np.stack([rng.permutation(n) for _ in range(b)])
        take = lambda x: np.take_along_axis(x, perm, axis=1)  # noqa: E731
        got, gv, gr = loss_and_grads(form, take(v), take(target), take(mask), 0.7, take(v_ref))
        np.testing.assert_allclose(got, base, atol=1e-5)
        np.testing.assert_allclose(gv, take(base_gv), atol=1e-5)
        np.testing.assert_allclose(gr, take(base_gr), atol=1e-5)
        c2, n2 = pair_accuracy(jnp.asarray(take(v)), jnp.asarray(take(target)), jnp.asarray(take(mask)))
        np.testing.assert_array_equal(c2, correct)
        np.testing.assert_array_equal(n2, counted)

"""Ranking losses against a brute-force numpy implementation, and gradients against finite differences."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tuna_jax.losses import mle_loss, pair_accuracy, ranking_loss

jax.config.update("jax_enable_x64", False)


def brute_force(v, target, mask, margin, form):
    """Sort by target (best first); tied and masked pairs skipped; the margin's gap is the difference of
    competition ranks (ties share one rank, so the result does not depend on their input order)."""
    out = []
    for vb, tb, mb in zip(v, target, mask):
        idx = [i for i in sorted(range(len(vb)), key=lambda i: -tb[i]) if mb[i]]  # Python's sort is stable
        idx += [i for i in range(len(vb)) if not mb[i]]
        rank = {i: sum(tb[x] > tb[i] for x in idx if mb[x]) for i in idx}
        total, by_gap = 0.0, {}
        for j in range(len(idx)):
            for k in range(j + 1, len(idx)):
                a, b = idx[j], idx[k]
                if not (mb[a] and mb[b]) or tb[a] == tb[b]:
                    continue
                gap = rank[b] - rank[a]
                h = max(0.0, float(vb[b]) - float(vb[a]) + margin * gap)
                total += h
                by_gap.setdefault(gap, []).append(h)
        out.append(total if form == "paper" else sum(np.mean(hs) for hs in by_gap.values()))
    return np.array(out)


@pytest.mark.parametrize("form", ["paper", "reference"])
@pytest.mark.parametrize("seed", range(4))
def test_matches_brute_force_with_ties_and_masks(form, seed):
    rng = np.random.RandomState(seed)
    b, n = 16, 6
    v = rng.randn(b, n).astype(np.float32) * 0.3
    target = rng.randint(0, 4, (b, n)).astype(np.float32)  # many ties
    mask = rng.rand(b, n) > 0.25
    mask[0] = False  # an example with nothing to rank
    mask[1] = [True] + [False] * (n - 1)  # a single candidate
    target[2] = 1.0  # all tied
    got = np.asarray(ranking_loss(jnp.asarray(v), jnp.asarray(target), jnp.asarray(mask), 0.1, form))
    want = brute_force(v, target, mask, 0.1, form)
    assert got.shape == (b,)
    assert np.abs(got - want).max() <= 1e-6
    assert got[0] == got[1] == got[2] == 0.0


def test_paper_and_reference_differ_only_in_pair_weights():
    v = jnp.array([[0.0, 0.0, 0.0]])
    t = jnp.array([[3.0, 2.0, 1.0]])
    m = jnp.ones((1, 3), bool)
    # pairs (0,1),(1,2) gap 1 -> 0.1 each; pair (0,2) gap 2 -> 0.2
    assert float(ranking_loss(v, t, m, 0.1, "paper")[0]) == pytest.approx(0.4, abs=1e-6)
    assert float(ranking_loss(v, t, m, 0.1, "reference")[0]) == pytest.approx(0.1 + 0.2, abs=1e-6)


def test_order_of_candidates_does_not_matter():
    rng = np.random.RandomState(0)
    v, t = rng.randn(4, 5), rng.randn(4, 5)
    perm = rng.permutation(5)
    m = np.ones((4, 5), bool)
    a = ranking_loss(jnp.asarray(v), jnp.asarray(t), jnp.asarray(m))
    b = ranking_loss(jnp.asarray(v[:, perm]), jnp.asarray(t[:, perm]), jnp.asarray(m))
    assert np.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("form", ["paper", "reference"])
def test_grad_matches_finite_differences(form):
    rng = np.random.RandomState(3)
    v = rng.randn(2, 4) * 0.05  # small scores so most hinges are active
    t = np.array([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 2.0, 5.0]])
    m = np.array([[True, True, True, True], [True, True, True, False]])
    f = lambda x: float(jnp.sum(ranking_loss(jnp.asarray(x, jnp.float32), jnp.asarray(t), jnp.asarray(m), 0.1, form)))  # noqa: E731
    g = np.asarray(jax.grad(lambda x: jnp.sum(ranking_loss(x, jnp.asarray(t), jnp.asarray(m), 0.1, form)))(
        jnp.asarray(v, jnp.float32)))
    eps = 1e-3
    num = np.zeros_like(v)
    for idx in np.ndindex(v.shape):
        d = np.zeros_like(v)
        d[idx] = eps
        num[idx] = (f(v + d) - f(v - d)) / (2 * eps)
    assert np.abs(g - num).max() <= 1e-3
    assert g[1, 3] == 0.0  # masked candidate gets no gradient
    assert np.abs(g).sum() > 0


def test_pair_accuracy_and_mle():
    v = jnp.array([[3.0, 1.0, 2.0, 0.0]])
    t = jnp.array([[3.0, 2.0, 1.0, 1.0]])
    m = jnp.array([[True, True, True, True]])
    correct, counted = pair_accuracy(v, t, m)
    # counted pairs: (0,1) (0,2) (0,3) (1,2) (1,3); (2,3) tied. v orders (1,2) wrong.
    assert float(counted[0]) == 5 and float(correct[0]) == 4
    lp, n = jnp.array([[-4.0, -6.0, 0.0]]), jnp.array([[2.0, 3.0, 0.0]])
    assert float(mle_loss(lp, n)[0]) == pytest.approx((2.0 + 2.0) / 2)  # empty one ignored, not 0/0

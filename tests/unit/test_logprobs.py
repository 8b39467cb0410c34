"""Chunked float32 log-likelihoods equal the naive log_softmax gather; sequence sums and counts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tuna_jax.logprobs import chunked_token_logprobs, naive_token_logprobs, sequence_logprobs
from tuna_jax.losses import sequence_scores
from tuna_jax.model.llama import Llama, LlamaConfig


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
@pytest.mark.slow
def test_chunked_equals_naive(chunk):
    rng = np.random.RandomState(0)
    h = jnp.asarray(rng.randn(3, 37, 16).astype(np.float32))
    w = jnp.asarray(rng.randn(16, 301).astype(np.float32))
    t = jnp.asarray(rng.randint(0, 301, (3, 37)))
    a, b = chunked_token_logprobs(h, w, t, chunk), naive_token_logprobs(h, w, t)
    assert a.shape == (3, 37) and a.dtype == jnp.float32
    assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5
    # gradients agree too (the chunk body is rematerialised)
    ga = jax.grad(lambda w: chunked_token_logprobs(h, w, t, chunk).sum())(w)
    gb = jax.grad(lambda w: naive_token_logprobs(h, w, t).sum())(w)
    assert np.abs(np.asarray(ga) - np.asarray(gb)).max() <= 1e-4


@pytest.mark.slow
def test_sequence_logprobs_match_numpy_brute_force():
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=8)
    model = Llama(cfg, nnx.Rngs(1))
    rng = np.random.RandomState(1)
    ids = rng.randint(0, 64, (2, 3, 12))
    mask = np.zeros(ids.shape, np.float32)
    mask[0, 0, 5:9] = 1
    mask[1, 2, 1:12] = 1
    total, count = sequence_logprobs(model, jnp.asarray(ids), jnp.asarray(mask), chunk=5)
    logits = np.asarray(model(jnp.asarray(ids.reshape(6, 12)))).reshape(2, 3, 12, 64).astype(np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits - top).sum(-1, keepdims=True)) - top
    expect = np.zeros((2, 3))
    for b in range(2):
        for n in range(3):
            for t in range(1, 12):
                if mask[b, n, t]:
                    expect[b, n] += logp[b, n, t - 1, ids[b, n, t]]
    assert np.abs(np.asarray(total) - expect).max() <= 1e-4
    assert np.array_equal(np.asarray(count), mask[..., 1:].sum(-1))
    v, valid = sequence_scores(total, count)
    assert not bool(valid[0, 1]) and float(v[0, 1]) == 0.0  # empty response: masked, not 0/0
    assert np.isfinite(np.asarray(v)).all()
    assert abs(float(v[0, 0]) - expect[0, 0] / 4) <= 1e-5


@pytest.mark.slow
def test_16bit_logits_keep_float32_logprobs_and_give_16bit_gradients():
    """bfloat16 compute: the log-probs equal a float32 computation on the same bf16 inputs, and the
    gradients (rounded to bf16 at the logits, as every other matmul's) stay within bf16 error."""
    from tuna_jax.logprobs import token_logprobs

    rng = np.random.RandomState(0)
    h = jnp.asarray(rng.randn(64, 32), jnp.bfloat16)
    w = jnp.asarray(rng.randn(32, 300) * 0.3, jnp.bfloat16)
    t = jnp.asarray(rng.randint(0, 300, 64))
    got = token_logprobs(h, w, t)
    want = token_logprobs(h.astype(jnp.float32), w.astype(jnp.float32), t)
    assert got.dtype == jnp.float32 and np.abs(np.asarray(got) - np.asarray(want)).max() < 1e-4
    f = lambda h, w: jnp.sum(token_logprobs(h, w, t) * jnp.linspace(-1, 1, 64))  # noqa: E731
    gh, gw = jax.grad(f, argnums=(0, 1))(h, w)
    rh, rw = jax.grad(f, argnums=(0, 1))(h.astype(jnp.float32), w.astype(jnp.float32))
    assert gh.dtype == gw.dtype == jnp.bfloat16
    for g, r in ((gh, rh), (gw, rw)):
        g, r = np.asarray(g, np.float32), np.asarray(r)
        assert np.abs(g - r).max() <= 2e-2 * np.abs(r).max()

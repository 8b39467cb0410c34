"""Every attention implementation computes the einsum reference's attention under the same mask:
padded, packed and prefix-shared rows, grouped-query heads, forward and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.unit.data.test_layouts import make_examples
from tuna_jax.data.layouts import LayoutCollator
from tuna_jax.model.attention import attend, attention_mask, resolve


def _rows(layout, block=8, mode="ranking"):
    ex = make_examples(6, 3, seed=7)
    coll = LayoutCollator(layout, mode, 24, 0, 3, "original", pad_to_multiple=8, attention_block=block,
                          row_len=48)
    b = coll(ex, coll.plan([ex]))
    u, q, length = b["segment_ids"].shape
    seg = b["segment_ids"].reshape(u * q, length)
    br = b["branch_ids"].reshape(u * q, length) if "branch_ids" in b else None
    kv = b["kv_blocks"].reshape((u * q,) + b["kv_blocks"].shape[2:]) if "kv_blocks" in b else None
    return jnp.asarray(seg), None if br is None else jnp.asarray(br), None if kv is None else jnp.asarray(kv)


def _qkv(rows, length, heads=4, kv_heads=2, dh=8, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (rows, length, heads, dh)), jax.random.normal(ks[1], (rows, length, kv_heads, dh)),
            jax.random.normal(ks[2], (rows, length, kv_heads, dh)))


def _run(impl, q, k, v, seg, br, kv):
    idx = jnp.arange(seg.shape[1])
    mask = attention_mask(seg, seg, idx, idx, br, br)
    real = (seg > 0)[..., None, None]

    def f(q, k, v):
        out = attend(q, k, v, mask, impl, segment_ids=seg, branch_ids=br, kv_blocks=kv)
        return jnp.sum(jnp.where(real, out, 0.0) * jnp.cos(jnp.arange(out.size).reshape(out.shape))), out

    # jitted: one compile instead of an eager dispatch (and compile) per operation of the blocked loop
    (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return np.asarray(jnp.where(real, out, 0.0)), [np.asarray(g) for g in grads]


# splash takes rows without branches only: padded rows and packed SFT rows (branched rows: refused, below)
CASES = [(layout, impl) for layout in ("padded", "prefix_shared", "packed")
         for impl in ("xla", "xla_dense", "xla_chunked")] + [("padded", "splash"), ("packed_sft", "splash")]


@pytest.mark.parametrize("layout,impl", CASES)
@pytest.mark.slow
def test_matches_einsum_reference(layout, impl, monkeypatch):
    seg, br, kv = _rows("packed", mode="sft") if layout == "packed_sft" else _rows(layout)
    if layout == "packed_sft":
        assert br is None and int(seg.max()) > 1  # several examples per row, no branches
    if impl == "xla_dense":
        impl, kv = "xla", None
    if impl == "xla_chunked":  # one query block per iteration of the blocked path's loop
        impl = "xla"
        monkeypatch.setattr("tuna_jax.model.attention.BLOCKED_CHUNK_BYTES", 1)
    q, k, v = _qkv(seg.shape[0], seg.shape[1])
    ref_out, ref_g = _run("einsum", q, k, v, seg, br, None)
    out, g = _run(impl, q, k, v, seg, br, kv)
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=1e-5)
    for a, b in zip(g, ref_g):  # padding contributes no gradient to real tokens in either
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)


@pytest.mark.slow
def test_padding_rows_stay_finite_everywhere():
    seg = jnp.zeros((2, 16), jnp.int32).at[0, :5].set(1)  # row 1 is all padding
    q, k, v = _qkv(2, 16)
    for impl in ("einsum", "xla"):
        out, grads = _run(impl, q, k, v, seg, None, None)
        assert np.isfinite(out).all() and all(np.isfinite(g).all() for g in grads)


def test_auto_picks_per_platform():
    assert resolve("auto", jnp.bfloat16, 128, "gpu") == "cudnn"
    assert resolve("auto", jnp.float32, 128, "gpu") == "xla"  # cuDNN flash needs 16-bit inputs
    assert resolve("auto", jnp.bfloat16, 64, "tpu") == "splash"
    assert resolve("auto", jnp.bfloat16, 64, "tpu", branched=True) == "xla"  # the blocked path
    assert resolve("auto", jnp.float32, 64, "cpu") == "xla"
    with pytest.raises(ValueError, match="model.attention='flash'"):
        resolve("flash", jnp.float32, 64)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs an NVIDIA GPU")
@pytest.mark.parametrize("layout", ["padded", "prefix_shared", "packed"])
def test_cudnn_matches_einsum_in_bfloat16(layout):
    seg, br, kv = _rows(layout)
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(seg.shape[0], seg.shape[1], heads=4, kv_heads=2, dh=64))
    ref_out, _ = _run("einsum", *(x.astype(jnp.float32) for x in (q, k, v)), seg, br, None)
    out, grads = _run("cudnn", q, k, v, seg, br, None)
    assert np.abs(out.astype(np.float32) - ref_out).max() < 3e-2
    assert all(np.isfinite(g.astype(np.float32)).all() for g in grads)


@pytest.mark.slow
def test_splash_kernel_built_in_one_trace_serves_the_next():
    """The kernel is cached per shape and built inside whichever jit traces it first: it must hold no tracer of
    that trace, or the next trace of the same shape (an eval step, a retrace) fails with UnexpectedTracerError."""
    from tuna_jax.model import attention

    attention._splash_causal_kernel.cache_clear()
    seg, _, _ = _rows("padded")
    q, k, v = _qkv(seg.shape[0], seg.shape[1])
    first, _ = _run("splash", q, k, v, seg, None, None)  # each _run jits a new function: two traces
    second, _ = _run("splash", q, k, v, seg, None, None)
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("layout", ["prefix_shared", "packed"])
def test_splash_refuses_rows_with_branches_in_one_line(layout):
    """Their mask changes every batch; splash builds its block metadata from a mask known at trace time."""
    seg, br, kv = _rows(layout)
    assert br is not None
    q, k, v = _qkv(seg.shape[0], seg.shape[1])
    with pytest.raises(ValueError, match="model.attention=splash cannot take rows with branches") as e:
        _run("splash", q, k, v, seg, br, kv)
    assert "\n" not in str(e.value)


def test_splash_under_a_mesh_runs_per_shard_and_matches_einsum():
    """On a data x fsdp x tensor mesh splash runs in shard_map (XLA cannot partition a Mosaic kernel):
    the jitted forward and gradients equal the unsharded einsum reference."""
    from jax.sharding import NamedSharding, PartitionSpec

    from tuna_jax import parallel

    seg, _, _ = _rows("padded")
    rows = seg.shape[0] - seg.shape[0] % 4
    seg = seg[:rows]
    q, k, v = _qkv(rows, seg.shape[1], heads=4, kv_heads=2)
    ref_out, ref_g = _run("einsum", q, k, v, seg, None, None)
    mesh = parallel.make_mesh("2,2,2", jax.devices()[:8])
    put = lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))  # noqa: E731
    with jax.set_mesh(mesh):
        out, g = jax.jit(lambda *a: _run_traced("splash", *a))(*map(put, (q, k, v, seg)))
    np.testing.assert_allclose(np.asarray(out), ref_out, atol=2e-5, rtol=1e-5)
    for a, b in zip(g, ref_g):
        np.testing.assert_allclose(np.asarray(a), b, atol=2e-5, rtol=1e-5)


def _run_traced(impl, q, k, v, seg):
    idx = jnp.arange(seg.shape[1])
    mask = attention_mask(seg, seg, idx, idx)
    real = (seg > 0)[..., None, None]

    def f(q, k, v):
        out = attend(q, k, v, mask, impl, segment_ids=seg)
        return jnp.sum(jnp.where(real, out, 0.0) * jnp.cos(jnp.arange(out.size).reshape(out.shape))), out

    (_, out), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return jnp.where(real, out, 0.0), grads

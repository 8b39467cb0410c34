"""Attention: the mask semantics (once) and the implementations behind one switch.

The mask is the single source of truth: :func:`attention_mask` turns per-token ``segment_ids``
(0 = padding), ``branch_ids`` (0 = shared prefix) and indices into "query i may see key j".
Padded rows, several examples packed in a row, and prefix-shared candidates are all expressed by
those arrays; every implementation computes softmax(q k^T / sqrt(Dh)) v under that mask.

``model.attention`` chooses the implementation (:func:`resolve`, :func:`attend`): ``einsum`` (the
reference every path is tested against), ``xla`` (portable; with the layouts' key-block table
``kv_blocks`` each query block sees only the key blocks it may, :func:`blocked_attention`),
``cudnn`` (cuDNN flash attention on NVIDIA GPUs, the mask as an additive bias), ``splash`` (Pallas
splash on TPU, rows without branches only, :func:`splash_attention`), or ``auto``. A query with no
visible key (padding) attends to itself only, so no softmax is over an empty set. Decoding with a
KV cache (:func:`attend_with_cache`) always uses ``einsum``.

Shapes: B batch, L queries, S keys, H query heads, K kv heads, G = H // K, Dh head dim.

Each implementation's limits, and what ``auto`` picks: docs/models.md#attention.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from tuna_jax import parallel

IMPLEMENTATIONS = ("auto", "einsum", "xla", "cudnn", "splash")


def attention_mask(q_segment: jax.Array, k_segment: jax.Array, q_index: jax.Array, k_index: jax.Array,
                   q_branch: jax.Array | None = None, k_branch: jax.Array | None = None) -> jax.Array:
    """Boolean [B, 1, Lq, Lk]: query i sees key j iff both are real (segment != 0), in the same
    segment, j is not after i (by index in the row or cache), and j is in the shared prefix
    (branch 0) or in i's own branch. A padding query (segment 0) sees only its own index.

    q_segment [B, Lq], k_segment [B, Lk], q_index [B, Lq] / [Lq], k_index [Lk]; branches like segments.
    """
    q_index = jnp.broadcast_to(q_index, q_segment.shape)
    same = (q_segment[:, :, None] == k_segment[:, None, :]) & (k_segment[:, None, :] != 0)
    causal = k_index[None, None, :] <= q_index[:, :, None]
    mask = same & causal
    if q_branch is not None:
        mask &= (k_branch[:, None, :] == 0) | (k_branch[:, None, :] == q_branch[:, :, None])
    itself = (q_segment[:, :, None] == 0) & (k_index[None, None, :] == q_index[:, :, None])
    return (mask | itself)[:, None, :, :]


def resolve(implementation: str, dtype, head_dim: int, platform: str | None = None, branched: bool = False) -> str:
    """The concrete implementation ``auto`` stands for on this platform, for rows with or without
    branches (others pass through; splash over branched rows is refused in one line)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"model.attention={implementation!r}: choose one of {', '.join(IMPLEMENTATIONS)}")
    if implementation == "splash" and branched:
        raise ValueError("model.attention=splash cannot take rows with branches (the prefix_shared and packed "
                         "ranking layouts: their mask changes every batch); use model.attention=auto or xla")
    if implementation != "auto":
        return implementation
    platform = platform or jax.default_backend()
    if platform == "gpu" and cudnn_supports(dtype, head_dim):
        return "cudnn"
    if platform == "tpu" and not branched:
        return "splash"
    return "xla"


def cudnn_supports(dtype, head_dim: int) -> bool:
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return half and head_dim <= 128 and head_dim % 8 == 0


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, implementation: str, *,
           segment_ids: jax.Array | None = None, branch_ids: jax.Array | None = None,
           kv_blocks: jax.Array | None = None) -> jax.Array:
    """Masked multi-head attention with grouped-query heads.

    q [B, L, H, Dh], k / v [B, S, K, Dh] -> [B, L, H, Dh] in q's dtype. ``mask`` [B, 1, L, S]
    from :func:`attention_mask`. ``splash`` and the blocked ``xla`` path read ``segment_ids`` /
    ``branch_ids`` [B, L] (self-attention only); ``kv_blocks`` [B, L / c, M] is the key-block table.
    """
    if implementation == "einsum":
        return _einsum_attention(q, k, v, mask)
    if implementation == "xla" and kv_blocks is not None:
        return _recomputed_blocked(q, k, v, segment_ids, branch_ids, kv_blocks)
    if implementation == "cudnn":
        # Every mask here is inside the causal one (keys never follow their query), so cuDNN's causal
        # mask type can skip the upper triangle while the dense mask, as a bias, does the rest.
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=q.shape[1] == k.shape[1],
                                            implementation="cudnn")
    if implementation == "xla":
        return _recomputed_dense(q, k, v, mask)
    if implementation == "splash":
        resolve(implementation, q.dtype, q.shape[-1], branched=branch_ids is not None)  # refuses branched rows
        return splash_attention(q, k, v, segment_ids)
    raise ValueError(f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS[1:]}")


def attend_with_cache(q, k_cache, v_cache, mask_cache, k_new, v_new, mask_new):
    """Attention of this call's queries over the cached keys and this call's keys, one softmax.

    q [B, L, H, Dh]; k_cache / v_cache [B, S, K, Dh] (read, never copied or written here);
    k_new / v_new [B, L, K, Dh]; mask_cache [B, 1, L, S], mask_new [B, 1, L, L] (together: the
    mask over [cache, new]). Returns [B, L, H, Dh]. The einsum reference's arithmetic.
    """
    b, l, h, dh = q.shape
    kv_heads = k_cache.shape[2]
    dt = q.dtype
    qg = q.reshape(b, l, kv_heads, h // kv_heads, dh)
    score = lambda keys, m: jnp.where(  # noqa: E731
        m[:, :, None], jnp.einsum("blkgd,bskd->bkgls", qg, keys).astype(jnp.float32) / math.sqrt(dh), -1e30)
    s_cache, s_new = score(k_cache, mask_cache), score(k_new, mask_new)
    probs = jax.nn.softmax(jnp.concatenate([s_cache, s_new], axis=-1), axis=-1).astype(dt)
    s = k_cache.shape[1]
    out = (jnp.einsum("bkgls,bskd->blkgd", probs[..., :s], v_cache)
           + jnp.einsum("bkgls,bskd->blkgd", probs[..., s:], v_new.astype(dt)))
    return out.reshape(b, l, h, dh)


def _einsum_attention(q, k, v, mask):
    b, l, h, dh = q.shape
    kv_heads = k.shape[2]
    dt = q.dtype
    qg = q.reshape(b, l, kv_heads, h // kv_heads, dh)  # query heads [K, G] share kv head K
    scores = jnp.einsum("blkgd,bskd->bkgls", qg, k.astype(dt)).astype(jnp.float32) / math.sqrt(dh)
    # A large finite negative, not -inf: a fully masked row could never go NaN.
    scores = jnp.where(mask[:, :, None, :, :], scores, -1e30)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    return jnp.einsum("bkgls,bskd->blkgd", probs, v.astype(dt)).reshape(b, l, h, dh)


# ---- the xla paths keep no scores for the backward pass ---------------------------------------
# Like a flash kernel, they recompute scores and probabilities in the backward pass from q, k, v:
# storing [.., L, S] float32 probabilities per layer costs more memory traffic than recomputing
# them (measured on CPU by bench/rank_step.py: less time and about 40% less step memory).

@jax.checkpoint
def _recomputed_dense(q, k, v, mask):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


@jax.checkpoint
def _recomputed_blocked(q, k, v, segment_ids, branch_ids, kv_blocks):
    return blocked_attention(q, k, v, segment_ids, branch_ids, kv_blocks)


# ---- block-sparse XLA attention ------------------------------------------------------------

# Query blocks attended per iteration of the blocked path: the float32 scores of one iteration
# ([B, g*c, H, M*c]) stay under this many bytes. One iteration's scores, probabilities and gathered
# keys are what the backward pass holds at a time (each iteration is recomputed on its own), so the
# step's peak no longer grows with all of L at once.
BLOCKED_CHUNK_BYTES = 32 * 2**20


def blocked_attention(q, k, v, segment_ids, branch_ids, kv_blocks, chunk_bytes: int | None = None):
    """Self-attention over the key blocks a block table names, with the exact mask inside them.

    q [B, L, H, Dh], k / v [B, L, K, Dh], segment_ids / branch_ids [B, L] (branch may be None),
    kv_blocks [B, nB, M] int32: for query block j (c = L / nB queries), M key-block indices,
    -1 for none. Every key a query may see must lie in a listed block (the layouts guarantee it);
    keys outside the listed blocks are not looked at. Returns [B, L, H, Dh].

    Query blocks go g at a time (``lax.map``, each iteration rematerialised), g the largest
    divisor of nB whose float32 scores fit ``chunk_bytes`` (default ``BLOCKED_CHUNK_BYTES``).
    """
    b, l, h, dh = q.shape
    kh = k.shape[2]
    nb, m = kv_blocks.shape[1:]
    c = l // nb
    dt = q.dtype
    budget = BLOCKED_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    g = max([d for d in range(1, nb + 1) if nb % d == 0 and b * d * c * h * m * c * 4 <= budget] + [1])
    k_blocks = k.reshape(b, nb, c, kh, dh).astype(dt)
    v_blocks = v.reshape(b, nb, c, kh, dh).astype(dt)
    seg = segment_ids.reshape(b, nb, c)
    br = None if branch_ids is None else branch_ids.reshape(b, nb, c)
    take = jax.vmap(lambda x, t: x[t])  # [nB, c] ids per batch row, gathered by table -> [g, M, c]

    def chunk(xs):
        """Query blocks J (g of them): q [B, g, c, H, Dh], table [B, g, M], q_seg / q_br [B, g, c],
        q_idx [g, c] -> [B, g, c, H, Dh]."""
        qj, tj, q_seg, q_br, q_idx = xs
        valid = tj >= 0
        table = jnp.where(valid, tj, 0)
        # Gather key / value blocks by a one-hot matmul: exact, and its gradient is a matmul, not a scatter.
        select = jax.nn.one_hot(table, nb, dtype=dt) * valid[..., None].astype(dt)  # [B, g, M, nB]
        keys = jnp.einsum("bjmn,bnckd->bjmckd", select, k_blocks)
        values = jnp.einsum("bjmn,bnckd->bjmckd", select, v_blocks)
        k_seg = take(seg, table)
        k_idx = table[..., None] * c + jnp.arange(c)  # [B, g, M, c]
        qs, ks = q_seg[:, :, :, None, None], k_seg[:, :, None, :, :]  # [B, g, c, 1, 1], [B, g, 1, M, c]
        qi, ki = q_idx[None, :, :, None, None], k_idx[:, :, None, :, :]
        mask = (qs == ks) & (ks != 0) & (ki <= qi) & valid[:, :, None, :, None]
        if q_br is not None:
            kb = take(br, table)[:, :, None, :, :]
            mask &= (kb == 0) | (kb == q_br[:, :, :, None, None])
        mask |= (qs == 0) & (ki == qi) & valid[:, :, None, :, None]  # a padding query sees itself
        qg = qj.reshape(b, g, c, kh, h // kh, dh)
        scores = jnp.einsum("bjqkgd,bjmckd->bjkgqmc", qg, keys).astype(jnp.float32) / math.sqrt(dh)
        scores = jnp.where(mask[:, :, None, None], scores, -1e30)  # [B, g, K, G, c, M, c]
        probs = jax.nn.softmax(scores.reshape(scores.shape[:5] + (m * c,)), axis=-1).astype(dt)
        return jnp.einsum("bjkgqs,bjskd->bjqkgd", probs, values.reshape(b, g, m * c, kh, dh))

    n = nb // g
    lead = lambda x: jnp.moveaxis(x.reshape((b, n, g) + x.shape[2:]), 1, 0)  # [n, B, g, ...]
    xs = (lead(q.reshape(b, nb, c, h, dh)), lead(kv_blocks), lead(seg), None if br is None else lead(br),
          jnp.arange(l).reshape(n, g, c))
    if n == 1:
        out = chunk(jax.tree.map(lambda x: x[0], xs))[None]
    else:
        out = jax.lax.map(jax.checkpoint(chunk), xs)  # [n, B, g, c, K, G, Dh]
    return jnp.moveaxis(out, 0, 1).reshape(b, l, h, dh)


# ---- splash (TPU) --------------------------------------------------------------------------

SPLASH_BLOCK = 128


@functools.lru_cache(maxsize=None)
def _splash_causal_kernel(heads: int, length: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    mask = sm.MultiHeadMask([sm.CausalMask((length, length)) for _ in range(heads)])
    # Cached and reused by every trace of this shape (train step, eval step, a retrace): its block tables must
    # be concrete arrays, not tracers of whichever trace built it first (they would leak into the next one).
    with jax.ensure_compile_time_eval():
        return sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1, interpret=interpret,
                                  block_sizes=_splash_blocks(length))


def _splash_blocks(length: int):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    b = SPLASH_BLOCK  # the kernel's blocks are multiples of 128 lanes; rows are padded to fit
    return sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                         block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)


def splash_attention(q, k, v, segment_ids):
    """Splash attention over a batch of rows without branches. q [B, L, H, Dh], k / v [B, L, K, Dh]
    (self-attention), segment_ids [B, L] (0 = padding).

    Grouped kv heads are repeated to H (splash's MHA kernel; gradients sum over the copies). L is
    padded to a multiple of the block size with padding tokens, which the mask keeps out. Under a
    mesh (``jax.set_mesh``) the kernel runs per shard: batch and heads split as the rules table
    splits ``batch`` and ``q_heads``, each shard holding whole rows.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    interpret = jax.default_backend() != "tpu"
    b, l, h, dh = q.shape
    group = h // k.shape[2]
    pad = (-l) % SPLASH_BLOCK
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    to_heads = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)  # noqa: E731
    qh, kh, vh = to_heads(q / math.sqrt(dh)), to_heads(k), to_heads(v)  # [B, H, L', Dh]
    # Padding tokens get a segment of their own (-1), so they see only padding, never real tokens.
    seg = jnp.pad(jnp.where(segment_ids == 0, -1, segment_ids), ((0, 0), (0, pad)), constant_values=-1)

    def local(qh, kh, vh, seg):  # one shard: [b, h, L', Dh]
        kernel = _splash_causal_kernel(qh.shape[1], l + pad, interpret)
        return jax.vmap(lambda qq, kk, vv, s: kernel(qq, kk, vv, segment_ids=sk.SegmentIds(q=s, kv=s)))(qh, kh, vh, seg)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        out = local(qh, kh, vh, seg)
    else:
        heads = parallel.logical_to_spec(("batch", "q_heads"), qh.shape[:2], mesh)
        rows = parallel.logical_to_spec(("batch",), seg.shape[:1], mesh)
        out = jax.shard_map(local, in_specs=(heads, heads, heads, rows), out_specs=heads, check_vma=False)(
            qh, kh, vh, seg)
    return out.transpose(0, 2, 1, 3)[:, :l].astype(q.dtype)

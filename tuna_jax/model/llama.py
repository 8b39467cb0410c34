"""The decoder of LLaMA 1/2/3.x and its relatives, in Flax NNX, readable top to bottom.

One pre-norm decoder; what the supported Hugging Face families do differently is an option of the
same blocks, named for what it is (``LlamaConfig``; every default is LLaMA's). Which HF architecture a
config converts to and from, and how its config.json and tensor names map here, is
``model/families.py``. The class keeps the name ``Llama``: every command holds one.

Layer parameters are stacked on a leading ``layers`` axis (one tree whether the layers run as a
``lax.scan`` or unrolled, ``scan_layers``) and carry logical axis names that the rules table of
:mod:`tuna_jax.parallel` maps to mesh axes. Parameters live in ``param_dtype``, matmuls run in
``dtype``; norm statistics, RoPE tables (HF's half-split layout: HF weights load unpermuted) and the
softmax run in float32. The mask comes from per-token ``segment_ids`` (0 = padding) and
``branch_ids`` (0 = shared prefix), so padded, packed and prefix-shared rows need nothing of the model
(``model/attention.py``). The sampler's fixed-size ``KVCache`` is a donated input/output, read inside
the layer scan and written once after it, in place.

Shapes: B batch, L query length, S cache length, D hidden, H query heads, K kv heads,
G = H // K, Dh head dim, F MLP width, V vocabulary, N_l layers.

The layout decisions and why: docs/models.md#llama.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import FrozenDict

from tuna_jax.model.attention import IMPLEMENTATIONS, attend, attend_with_cache, attention_mask, resolve
from tuna_jax.parallel import constrain

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# jax.checkpoint policies by name; "none" means no rematerialisation at all.
REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
}


# Activations by their HF ``hidden_act`` name. HF's "gelu" is the exact (erf) GELU; its tanh
# approximations go by several names.
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
}
NORMS = ("rms", "layer")
RESIDUALS = ("sequential", "parallel", "parallel_shared_norm")
MLPS = ("gated", "plain")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture (from a HF ``config.json``) plus how to run it (dtypes, scan, remat).

    The family options (defaults: LLaMA) -- ``model/families.py`` sets them from a config.json:

    * ``family``: the HF architecture this config converts to and from (``families.FAMILIES``).
    * ``norm``: ``rms`` (RMSNorm) or ``layer`` (LayerNorm with a bias). ``rms_norm_eps`` is the
      eps of every norm (HF's ``layer_norm_eps`` for LayerNorm families).
    * ``qkv_bias`` / ``o_bias``: biases on the q, k, v projections / on the output projection.
    * ``qk_norm``: an RMSNorm over each query and key head's Dh (one [Dh] scale for q, one for k),
      before RoPE (Qwen3).
    * ``partial_rotary_factor``: RoPE turns the first ``rotary_dim = int(Dh * factor)`` dims of
      each head (HF's half-split layout within them); the rest pass through (StableLM, NeoX).
    * ``sliding_window``: a query sees at most this many keys back (Mistral). Not applied: a
      forward pass over rows longer than the window is refused (``Llama.hidden_states``).
    * ``residual``: ``sequential`` (h += attn(norm1 h); h += mlp(norm2 h)), ``parallel``
      (h += attn(norm1 h) + mlp(norm2 h): NeoX) or ``parallel_shared_norm`` (h += attn(n) + mlp(n),
      n = norm1 h, no second norm: StableLM's ``use_parallel_residual``).
    * ``mlp``: ``gated`` (down(act(gate x) * up x), LLaMA's SwiGLU with ``hidden_act`` silu) or
      ``plain`` (down(act(up x)): NeoX); ``mlp_bias``: biases on its projections.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # {"rope_type": "llama3", "factor", "low_freq_factor", ...}; held as a FrozenDict (and a list of
    # EOS ids as a tuple) so the config hashes by value: jit takes the graphdef, and with it this
    # config, as a static argument (scoring, sampling).
    rope_scaling: Any = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    # The family options (class docstring).
    family: str = "llama"
    norm: str = "rms"
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    partial_rotary_factor: float = 1.0
    sliding_window: int | None = None
    residual: str = "sequential"
    mlp: str = "gated"
    mlp_bias: bool = False
    hidden_act: str = "silu"
    # How to run it; not part of the HF architecture.
    param_dtype: str = "float32"
    dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"
    attention: str = "auto"  # auto | einsum | xla | cudnn | splash (model/attention.py)

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict) and not isinstance(self.rope_scaling, FrozenDict):
            object.__setattr__(self, "rope_scaling", FrozenDict(self.rope_scaling))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads={self.num_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_kv_heads}")
        if self.remat_policy != "none" and self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r}; choose none or one of {sorted(REMAT_POLICIES)}")
        if self.attention not in IMPLEMENTATIONS:
            raise ValueError(f"attention={self.attention!r}; choose one of {', '.join(IMPLEMENTATIONS)}")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r}; choose one of {sorted(DTYPES)}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "default", None):
                raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: llama3)")
        for name, allowed in (("norm", NORMS), ("residual", RESIDUALS), ("mlp", MLPS), ("hidden_act", ACTIVATIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported (supported: {', '.join(allowed)})")
        if not (0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            raise ValueError(f"partial_rotary_factor={self.partial_rotary_factor} gives {self.rotary_dim} rotary dims "
                             f"of head_dim={self.head_dim}; they must be even and between 2 and head_dim")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window}: must be a positive number of tokens or null")

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that RoPE turns (the first ones), as HF computes it."""
        return int(self.head_dim * self.partial_rotary_factor)

    # ---- HF config.json <-> LlamaConfig ------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict, **runtime: Any) -> "LlamaConfig":
        """From a HF ``config.json`` dict of a supported family (``model/families.py``), either rope
        style: ``rope_theta`` + ``rope_scaling`` (hub checkpoints) or ``rope_parameters``
        (transformers 5). What the decoder cannot run is a ValueError naming the config key."""
        from tuna_jax.model.families import config_from_hf

        return cls(**config_from_hf(hf), **runtime)

    def to_hf(self) -> dict:
        """The architecture as a complete HF ``config.json`` dict of its family (rope keys in the
        legacy style, which transformers 4.x and 5.x read the same)."""
        from tuna_jax.model.families import config_to_hf

        return config_to_hf(self)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        e = self.eos_token_id
        return () if e is None else tuple(e) if isinstance(e, (list, tuple)) else (e,)

    def num_params(self) -> int:
        d, f, v, dh = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        h, k = self.num_heads, self.num_kv_heads
        norm = d * (2 if self.norm == "layer" else 1)
        attn = d * dh * (2 * h + 2 * k) + self.qkv_bias * dh * (h + 2 * k) + self.o_bias * d + self.qk_norm * 2 * dh
        n_mlp = 3 if self.mlp == "gated" else 2
        mlp = n_mlp * d * f + self.mlp_bias * ((n_mlp - 1) * f + d)
        per_layer = attn + mlp + norm * (1 if self.residual == "parallel_shared_norm" else 2)
        return self.num_layers * per_layer + v * d * (1 if self.tie_word_embeddings else 2) + norm


# ---- rotary embeddings ----------------------------------------------------------------

def rope_inverse_frequencies(cfg: LlamaConfig) -> np.ndarray:
    """[rotary_dim/2] float32 inverse frequencies (rotary_dim = Dh unless partial), with the "llama3"
    (Llama 3.1) rescaling when set. Computed in numpy, so it does not depend on the device."""
    dim = cfg.rotary_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    inv = inv.astype(np.float32)
    s = cfg.rope_scaling
    if s and s.get("rope_type") == "llama3":
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """positions [B, L] int -> cos, sin [B, L, R] float32 (half-split layout), R = 2 * len(inv_freq)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, L, heads, Dh]; cos/sin [B, L, R]. HF's ``rotate_half`` convention on the first R dims
    of each head; the other Dh - R pass through (partial rotary)."""
    if cos.shape[-1] < x.shape[-1]:
        r = cos.shape[-1]
        return jnp.concatenate([apply_rope(x[..., :r], cos, sin), x[..., r:]], axis=-1)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x.astype(jnp.float32) * cos[:, :, None, :] + rotated.astype(jnp.float32) * sin[:, :, None, :]
    return out.astype(x.dtype)


# ---- KV cache -------------------------------------------------------------------------

class KVCache(NamedTuple):
    """A fixed-size cache for all layers.

    k, v: [N_l, B, S, K, Dh] in the compute dtype; segment_ids, branch_ids: [B, S] int32 of the
    cached tokens (0 = empty slot); index: int32 scalar, the next slot to write.
    """

    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array
    branch_ids: jax.Array
    index: jax.Array

    @classmethod
    def create(cls, cfg: LlamaConfig, batch: int, length: int) -> "KVCache":
        shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
        dt = DTYPES[cfg.dtype]
        zeros_i = jnp.zeros((batch, length), jnp.int32)
        return cls(jnp.zeros(shape, dt), jnp.zeros(shape, dt), zeros_i, zeros_i, jnp.zeros((), jnp.int32))


# ---- modules --------------------------------------------------------------------------

def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], dtype, std: float | None = 0.02):
    """A parameter with logical axis names; std=None means ones (norm scales)."""
    value = jnp.ones(shape, dtype) if std is None else std * jax.random.normal(rngs.params(), shape, dtype)
    return nnx.Param(value, logical_axes=axes)


def _bias(shape: tuple[int, ...], axes: tuple[str, ...], dtype):
    """A bias (zeros) with logical axis names; it draws no random numbers, so adding one leaves
    the initialisation of every other parameter unchanged."""
    return nnx.Param(jnp.zeros(shape, dtype), logical_axes=axes)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype, rngs: nnx.Rngs, axes: tuple[str, ...] = ("norm",)):
        self.weight = _param(rngs, (dim,), axes, param_dtype, std=None)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., D] -> [..., D] in x's dtype; statistics in float32 as HF does."""
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with a scale and a bias (torch ``nn.LayerNorm``: biased variance)."""

    def __init__(self, dim: int, eps: float, param_dtype, rngs: nnx.Rngs):
        self.weight = _param(rngs, (dim,), ("norm",), param_dtype, std=None)
        self.bias = _bias((dim,), ("norm",), param_dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., D] -> [..., D] in x's dtype; computed in float32, rounded once at the end."""
        x32 = x.astype(jnp.float32)
        centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        normed = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.eps)
        return (normed * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def make_norm(cfg: LlamaConfig, rngs: nnx.Rngs) -> RMSNorm | LayerNorm:
    """The config's norm over the hidden size D."""
    cls = LayerNorm if cfg.norm == "layer" else RMSNorm
    return cls(cfg.hidden_size, cfg.rms_norm_eps, DTYPES[cfg.param_dtype], rngs)


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        pd = DTYPES[cfg.param_dtype]
        d, h, k, dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = _param(rngs, (d, h, dh), ("embed", "q_heads", "head_dim"), pd)
        self.k_proj = _param(rngs, (d, k, dh), ("embed", "kv_heads", "head_dim"), pd)
        self.v_proj = _param(rngs, (d, k, dh), ("embed", "kv_heads", "head_dim"), pd)
        self.o_proj = _param(rngs, (h, dh, d), ("q_heads", "head_dim", "embed"), pd)
        if cfg.qkv_bias:
            self.q_bias = _bias((h, dh), ("q_heads", "head_dim"), pd)
            self.k_bias = _bias((k, dh), ("kv_heads", "head_dim"), pd)
            self.v_bias = _bias((k, dh), ("kv_heads", "head_dim"), pd)
        if cfg.o_bias:
            self.o_bias = _bias((d,), ("embed",), pd)
        if cfg.qk_norm:  # one [Dh] scale shared by all heads (Qwen3)
            self.q_norm = RMSNorm(dh, cfg.rms_norm_eps, pd, rngs, axes=("head_dim",))
            self.k_norm = RMSNorm(dh, cfg.rms_norm_eps, pd, rngs, axes=("head_dim",))
        self.cfg = cfg

    def __call__(self, x, cos, sin, mask, kv=None, cache_meta=None, ids=None):
        """x [B, L, D] -> ([B, L, D], this call's (k, v) [B, L, K, Dh] when there is a cache, else None).

        mask: [B, 1, L, L] (``attention.attention_mask``) without a cache; with one, the pair
        (mask over the cached slots [B, 1, L, S], mask over this call's tokens [B, 1, L, L]).
        kv: this layer's cache (k, v) [B, S, K, Dh] (read only) or None.
        ids: (segment_ids, branch_ids, kv_blocks) of this call, for splash and blocked attention.
        """
        cfg, dt = self.cfg, DTYPES[self.cfg.dtype]
        x = x.astype(dt)
        q = jnp.einsum("bld,dhk->blhk", x, self.q_proj[...].astype(dt))
        k = jnp.einsum("bld,dhk->blhk", x, self.k_proj[...].astype(dt))
        v = jnp.einsum("bld,dhk->blhk", x, self.v_proj[...].astype(dt))
        if cfg.qkv_bias:
            q, k, v = q + self.q_bias[...].astype(dt), k + self.k_bias[...].astype(dt), v + self.v_bias[...].astype(dt)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is None:
            impl = resolve(cfg.attention, dt, cfg.head_dim, branched=ids[1] is not None)
            out = attend(q, k, v, mask, impl, segment_ids=ids[0], branch_ids=ids[1], kv_blocks=ids[2])
            new_kv = None
        else:
            out = attend_with_cache(q, kv[0].astype(dt), kv[1].astype(dt), mask[0], k, v, mask[1])
            new_kv = (k.astype(kv[0].dtype), v.astype(kv[1].dtype))
        b, l = x.shape[:2]
        out = jnp.einsum("blhk,hkd->bld", out.reshape(b, l, cfg.num_heads, cfg.head_dim), self.o_proj[...].astype(dt))
        if cfg.o_bias:
            out = out + self.o_bias[...].astype(dt)
        return out, new_kv


class MLP(nnx.Module):
    """``gated``: down(act(x W_gate) * x W_up) (LLaMA's SwiGLU with silu); ``plain``: down(act(x W_up))
    (NeoX's dense_h_to_4h / dense_4h_to_h); with ``mlp_bias`` each projection adds a bias."""

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        pd = DTYPES[cfg.param_dtype]
        d, f = cfg.hidden_size, cfg.intermediate_size
        if cfg.mlp == "gated":
            self.gate_proj = _param(rngs, (d, f), ("embed", "mlp"), pd)
        self.up_proj = _param(rngs, (d, f), ("embed", "mlp"), pd)
        self.down_proj = _param(rngs, (f, d), ("mlp", "embed"), pd)
        if cfg.mlp_bias:
            if cfg.mlp == "gated":
                self.gate_bias = _bias((f,), ("mlp",), pd)
            self.up_bias = _bias((f,), ("mlp",), pd)
            self.down_bias = _bias((d,), ("embed",), pd)
        self.dtype = DTYPES[cfg.dtype]
        self.gated, self.biased, self.hidden_act = cfg.mlp == "gated", cfg.mlp_bias, cfg.hidden_act

    def _proj(self, x, name):
        y = x @ getattr(self, f"{name}_proj")[...].astype(self.dtype)
        return y + getattr(self, f"{name}_bias")[...].astype(self.dtype) if self.biased else y

    def __call__(self, x: jax.Array) -> jax.Array:
        x, act = x.astype(self.dtype), ACTIVATIONS[self.hidden_act]
        if self.gated:
            gate = act(self._proj(x, "gate"))
            return self._proj(gate * self._proj(x, "up"), "down")
        return self._proj(act(self._proj(x, "up")), "down")


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.input_layernorm = make_norm(cfg, rngs)
        self.self_attn = Attention(cfg, rngs)
        if cfg.residual != "parallel_shared_norm":
            self.post_attention_layernorm = make_norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs)
        self.residual = cfg.residual

    def __call__(self, h, cos, sin, mask, kv=None, cache_meta=None, ids=None):
        """h [B, L, D] float32 residual stream -> (h [B, L, D], updated kv or None)."""
        normed = self.input_layernorm(h)
        attn, kv = self.self_attn(normed, cos, sin, mask, kv, cache_meta, ids)
        if self.residual == "sequential":
            h = h + attn.astype(h.dtype)
            return h + self.mlp(self.post_attention_layernorm(h)).astype(h.dtype), kv
        # Attention and MLP both read this layer's input (NeoX and StableLM's parallel residual).
        mlp_in = normed if self.residual == "parallel_shared_norm" else self.post_attention_layernorm(h)
        return h + attn.astype(h.dtype) + self.mlp(mlp_in).astype(h.dtype), kv


class Llama(nnx.Module):
    """The causal LM of every supported family (``LlamaConfig.family``). ``__call__`` gives logits;
    ``hidden_states`` + ``lm_head_weight`` let the log-likelihood code project only the scored tokens
    (see ``logprobs.py``)."""

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        pd = DTYPES[cfg.param_dtype]
        self.embed_tokens = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pd)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create_layers(r):
            return DecoderLayer(cfg, r)

        self.layers = create_layers(rngs)
        # The vmap above stacked every layer parameter on a new leading axis; name it.
        for _, var in nnx.iter_graph(self.layers):
            if isinstance(var, nnx.Variable) and "logical_axes" in var.get_metadata():
                var.set_metadata(logical_axes=("layers",) + tuple(var.get_metadata()["logical_axes"]))
        self.norm = make_norm(cfg, rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pd)

    def lm_head_weight(self) -> jax.Array:
        """[D, V] projection to the vocabulary (the embedding, transposed, when tied)."""
        return self.embed_tokens[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]

    def hidden_states(self, input_ids: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                      branch_ids: jax.Array | None = None, cache: KVCache | None = None,
                      kv_blocks: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        """input_ids, positions, segment_ids, branch_ids [B, L] -> final-norm hidden [B, L, D] in
        the compute dtype, and the updated cache when one is given.

        Without a cache, queries attend to this call's tokens. With one, this call's keys are
        written at ``cache.index`` and queries attend to every cached slot their mask allows.
        ``kv_blocks`` [B, L / c, M]: an optional key-block table (``data/layouts.py``) that lets
        the ``xla`` attention skip fully masked blocks; it never changes the result.
        """
        cfg = self.cfg
        span = input_ids.shape[1] if cache is None else cache.segment_ids.shape[1]
        if cfg.sliding_window is not None and span > cfg.sliding_window:
            # Within the window every causal key is visible, so the plain mask is exact; beyond it HF
            # hides keys more than sliding_window back, which no attention path here does.
            raise ValueError(f"rows of {span} tokens exceed the model's sliding_window={cfg.sliding_window}, "
                             f"which tuna-jax does not apply; use sequences of at most {cfg.sliding_window} "
                             f"tokens (prompt + new tokens when sampling)")
        h = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(jnp.float32)
        h = constrain(h, ("batch", "length", "act_embed"))
        cos, sin = rope_cos_sin(positions, rope_inverse_frequencies(cfg))

        # The mask is built once per call, not per layer.
        l = input_ids.shape[1]
        zeros = jnp.zeros_like(segment_ids)
        if cache is None:
            idx = jnp.arange(l)
            mask = attention_mask(segment_ids, segment_ids, idx, idx, branch_ids, branch_ids)
            cache_meta = None
        else:
            q_branch = zeros if branch_ids is None else branch_ids
            q_idx = cache.index + jnp.arange(l)
            # The cached slots (those at or after index are still empty: segment 0, never seen) ...
            cached = attention_mask(segment_ids, cache.segment_ids, q_idx, jnp.arange(cache.segment_ids.shape[1]),
                                    q_branch, cache.branch_ids)
            # ... and this call's own tokens, causally; a padding query sees itself here only.
            mask = (cached & (segment_ids != 0)[:, None, :, None],
                    attention_mask(segment_ids, segment_ids, q_idx, q_idx, q_branch, q_branch))
            seg = jax.lax.dynamic_update_slice_in_dim(cache.segment_ids, segment_ids, cache.index, axis=1)
            branch = jax.lax.dynamic_update_slice_in_dim(cache.branch_ids, q_branch, cache.index, axis=1)
            cache_meta = cache.index
        ids = (segment_ids, branch_ids, kv_blocks)

        graphdef, layer_state = nnx.split(self.layers)

        def layer_step(h, xs):
            state, kv = xs
            layer = nnx.merge(graphdef, state)
            h, kv = layer(h, cos, sin, mask, kv, cache_meta, ids)
            return constrain(h, ("batch", "length", "act_embed")), kv

        if cfg.remat_policy != "none":
            layer_step = jax.checkpoint(layer_step, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)
        kv_in = None if cache is None else (cache.k, cache.v)
        h, kv_out = jax.lax.scan(layer_step, h, (layer_state, kv_in),
                                 unroll=1 if cfg.scan_layers else cfg.num_layers)
        new_cache = None
        if cache is not None:  # every layer's new keys into the donated cache, in place: [N_l, B, l, K, Dh]
            write = lambda c, new: jax.lax.dynamic_update_slice_in_dim(c, new, cache.index, axis=2)  # noqa: E731
            new_cache = KVCache(write(cache.k, kv_out[0]), write(cache.v, kv_out[1]), seg, branch, cache.index + l)
        return self.norm(h.astype(DTYPES[cfg.dtype])), new_cache

    def __call__(self, input_ids, positions=None, segment_ids=None, branch_ids=None, cache=None):
        """Logits [B, L, V] float32. Defaults: positions 0..L-1, every token in segment 1.
        Materialises the full vocabulary: training and scoring use ``logprobs.py`` instead."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        if segment_ids is None:
            segment_ids = jnp.ones_like(input_ids)
        h, new_cache = self.hidden_states(input_ids, positions, segment_ids, branch_ids, cache)
        dt = DTYPES[self.cfg.dtype]
        logits = jnp.einsum("bld,dv->blv", h, self.lm_head_weight().astype(dt)).astype(jnp.float32)
        return logits if cache is None else (logits, new_cache)


def abstract_model(cfg: LlamaConfig) -> Llama:
    """The model with ShapeDtypeStruct leaves: shapes and metadata, no memory."""
    return nnx.eval_shape(lambda: Llama(cfg, nnx.Rngs(0)))


def padded_inputs(mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """From a HF-style attention mask [B, L] (1 real, 0 pad; left or right padding) give
    positions (0 at each row's first real token) and segment ids, both [B, L] int32."""
    mask = mask.astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
    return positions * mask, mask

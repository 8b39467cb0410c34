"""The Hugging Face families the decoder runs, and how each maps onto it.

One decoder (``model/llama.py``); a family (``LlamaConfig.family``, the HF architecture: ``llama``,
``mistral``, ``qwen2``, ``qwen3``, ``stablelm``, ``gpt_neox``) is a set of its options plus a naming
scheme. For each family this module holds:

* ``read``: its ``config.json`` -> ``LlamaConfig`` fields. What the decoder does not run (another
  ``rope_scaling`` type, alternating sliding-window layers, StableLM's per-head q/k LayerNorm, ...)
  is a ``ValueError`` naming the config key, never a silent conversion.
* ``write``: ``LlamaConfig`` -> a complete ``config.json`` of the family (rope keys in the legacy
  style, which transformers 4.x and 5.x both read).
* ``tensors``: the table of its HF tensors: name, HF shape, our parameter path, and the two
  transforms. Pure data movement (transpose, reshape, split), so HF -> ours -> HF is bitwise. The
  LLaMA-named families share :func:`llama_tensors`; GPT-NeoX has :func:`neox_tensors`.

Shapes: D hidden, H query heads, K kv heads, Dh head dim, F MLP width, V vocabulary.

What each family sets, NeoX's fused qkv and what is refused: docs/models.md#families.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import numpy as np

from tuna_jax.model.llama import LlamaConfig


class Tensor(NamedTuple):
    """One row of a family's table. In a layer table ``hf`` is the name after ``<prefix>.<i>.``
    and ``ours`` is the path of the stacked parameter (leading ``layers`` axis)."""

    hf: str
    ours: tuple[str, ...]
    to_ours: Callable  # HF array -> ours; method calls only (.T, .reshape, [...]) so it also traces
    to_hf: Callable  # ours -> HF array (the parts of a fused tensor: all parts -> the HF array)
    shape: tuple[int, ...]  # the HF shape


def _same(w):
    return w


def _transposed(w):
    return w.T


def _row(hf: str, ours: tuple[str, ...], shape: tuple[int, ...], to_ours=_same, to_hf=_same) -> Tensor:
    return Tensor(hf, ours, to_ours, to_hf, shape)


def _heads_in(d: int, n: int, dh: int) -> tuple[Callable, Callable]:
    """A projection into n heads: HF [n*Dh, D] <-> ours [D, n, Dh]."""
    return (lambda w: w.T.reshape(d, n, dh)), (lambda w: w.reshape(d, n * dh).T)


def _heads_out(d: int, n: int, dh: int) -> tuple[Callable, Callable]:
    """The output projection from n heads: HF [D, n*Dh] <-> ours [n, Dh, D]."""
    return (lambda w: w.T.reshape(n, dh, d)), (lambda w: w.reshape(n * dh, d).T)


def _head_bias(n: int, dh: int) -> tuple[Callable, Callable]:
    """A per-head bias: HF [n*Dh] <-> ours [n, Dh]."""
    return (lambda b: b.reshape(n, dh)), (lambda b: b.reshape(n * dh))


# ---- the tensor tables ------------------------------------------------------------------

def llama_tensors(cfg: LlamaConfig) -> tuple[list[Tensor], list[Tensor]]:
    """(global rows, the embedding first; layer rows) under LLaMA's names, for LLaMA, Mistral,
    Qwen2, Qwen3 and StableLM: the rows each option adds are marked."""
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    h, k, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    layer_norm = cfg.norm == "layer"
    glob = [_row("model.embed_tokens.weight", ("embed_tokens",), (v, d)),
            _row("model.norm.weight", ("norm", "weight"), (d,))]
    if layer_norm:
        glob.append(_row("model.norm.bias", ("norm", "bias"), (d,)))
    if not cfg.tie_word_embeddings:
        glob.append(_row("lm_head.weight", ("lm_head",), (v, d), _transposed, _transposed))

    norms = ["input_layernorm"] + ([] if cfg.residual == "parallel_shared_norm" else ["post_attention_layernorm"])
    layers = []
    for norm in norms:
        layers.append(_row(f"{norm}.weight", ("layers", norm, "weight"), (d,)))
        if layer_norm:  # LayerNorm (StableLM)
            layers.append(_row(f"{norm}.bias", ("layers", norm, "bias"), (d,)))
    attn = ("layers", "self_attn")
    for name, n in (("q", h), ("k", k), ("v", k)):
        layers.append(_row(f"self_attn.{name}_proj.weight", attn + (f"{name}_proj",), (n * dh, d),
                           *_heads_in(d, n, dh)))
    layers.append(_row("self_attn.o_proj.weight", attn + ("o_proj",), (d, h * dh), *_heads_out(d, h, dh)))
    if cfg.qkv_bias:  # Qwen2, StableLM's use_qkv_bias, LLaMA / Qwen3's attention_bias
        for name, n in (("q", h), ("k", k), ("v", k)):
            layers.append(_row(f"self_attn.{name}_proj.bias", attn + (f"{name}_bias",), (n * dh,), *_head_bias(n, dh)))
    if cfg.o_bias:  # LLaMA / Qwen3's attention_bias
        layers.append(_row("self_attn.o_proj.bias", attn + ("o_bias",), (d,)))
    if cfg.qk_norm:  # Qwen3
        layers += [_row("self_attn.q_norm.weight", attn + ("q_norm", "weight"), (dh,)),
                   _row("self_attn.k_norm.weight", attn + ("k_norm", "weight"), (dh,))]
    mlp = ("layers", "mlp")
    for name, shape in (("gate", (f, d)), ("up", (f, d)), ("down", (d, f))):
        layers.append(_row(f"mlp.{name}_proj.weight", mlp + (f"{name}_proj",), shape, _transposed, _transposed))
    if cfg.mlp_bias:  # LLaMA's mlp_bias
        for name, n in (("gate", f), ("up", f), ("down", d)):
            layers.append(_row(f"mlp.{name}_proj.bias", mlp + (f"{name}_bias",), (n,)))
    return glob, layers


def neox_tensors(cfg: LlamaConfig) -> tuple[list[Tensor], list[Tensor]]:
    """(global rows, the embedding first; layer rows) of GPTNeoXForCausalLM (Pythia, StableLM-Alpha)."""
    d, f, v, h, dh = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_heads, cfg.head_dim
    glob = [_row("gpt_neox.embed_in.weight", ("embed_tokens",), (v, d)),
            _row("gpt_neox.final_layer_norm.weight", ("norm", "weight"), (d,)),
            _row("gpt_neox.final_layer_norm.bias", ("norm", "bias"), (d,))]
    if not cfg.tie_word_embeddings:
        glob.append(_row("embed_out.weight", ("lm_head",), (v, d), _transposed, _transposed))

    layers = []
    for norm in ("input_layernorm", "post_attention_layernorm"):
        layers += [_row(f"{norm}.weight", ("layers", norm, "weight"), (d,)),
                   _row(f"{norm}.bias", ("layers", norm, "bias"), (d,))]
    attn = ("layers", "self_attn")

    # query_key_value.weight [3D, D]: rows are [H, 3, Dh]; part j of head n is rows (3n + j) Dh ...
    def join_weight(q, k, v_):  # ours [D, H, Dh] x 3 -> HF [3D, D]
        return np.stack([w.transpose(1, 2, 0) for w in (q, k, v_)], axis=1).reshape(3 * h * dh, d)

    def join_bias(q, k, v_):  # ours [H, Dh] x 3 -> HF [3D]
        return np.stack([q, k, v_], axis=1).reshape(3 * h * dh)

    for j, name in enumerate(("q", "k", "v")):
        layers.append(_row("attention.query_key_value.weight", attn + (f"{name}_proj",), (3 * h * dh, d),
                           lambda w, j=j: w.reshape(h, 3, dh, d)[:, j].transpose(2, 0, 1), join_weight))
    if cfg.qkv_bias:
        for j, name in enumerate(("q", "k", "v")):
            layers.append(_row("attention.query_key_value.bias", attn + (f"{name}_bias",), (3 * h * dh,),
                               lambda b, j=j: b.reshape(h, 3, dh)[:, j], join_bias))
    layers.append(_row("attention.dense.weight", attn + ("o_proj",), (d, h * dh), *_heads_out(d, h, dh)))
    if cfg.o_bias:
        layers.append(_row("attention.dense.bias", attn + ("o_bias",), (d,)))
    mlp = ("layers", "mlp")
    layers += [_row("mlp.dense_h_to_4h.weight", mlp + ("up_proj",), (f, d), _transposed, _transposed),
               _row("mlp.dense_h_to_4h.bias", mlp + ("up_bias",), (f,)),
               _row("mlp.dense_4h_to_h.weight", mlp + ("down_proj",), (d, f), _transposed, _transposed),
               _row("mlp.dense_4h_to_h.bias", mlp + ("down_bias",), (d,))]
    return glob, layers


# ---- config.json -> LlamaConfig fields --------------------------------------------------

def _refuse(family: str, key: str, value: Any, why: str) -> ValueError:
    return ValueError(f"{key}={value!r} is not supported for {family}: {why}")


def _rope(hf: dict, default_partial: float = 1.0, theta_key: str = "rope_theta",
          partial_key: str = "partial_rotary_factor") -> tuple[float, dict | None, float]:
    """(rope_theta, rope scaling or None, partial_rotary_factor) from either rope style: legacy keys
    (``theta_key``, ``rope_scaling``, ``partial_key``) or transformers 5's ``rope_parameters``."""
    rope = dict(hf.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", hf.get(theta_key, 10000.0))
    partial = rope.pop("partial_rotary_factor", hf.get(partial_key, default_partial))
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling is not None:
        scaling = dict(scaling)
        scaling.setdefault("rope_type", scaling.pop("type", None))
        if scaling["rope_type"] == "default":
            scaling = None
    return float(theta), scaling, float(partial if partial is not None else default_partial)


def _common(hf: dict, head_dim: int | None = None) -> dict:
    """The fields every family spells the same way. ``head_dim``: fixed by the family (None: the
    ``head_dim`` key, else hidden_size // heads)."""
    heads = hf["num_attention_heads"]
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim or hf.get("head_dim") or hf["hidden_size"] // heads,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        hidden_act=hf.get("hidden_act", "silu"),
    )


def _rotary_llama_style(hf: dict, family: str) -> dict:
    """RoPE of the families whose attention turns the whole head (LLaMA, Mistral, Qwen)."""
    theta, scaling, partial = _rope(hf)
    if partial != 1.0:
        raise _refuse(family, "partial_rotary_factor", partial, f"{family} turns the whole head")
    return dict(rope_theta=theta, rope_scaling=scaling)


def _no_sliding_layers(hf: dict, family: str) -> None:
    """Qwen's sliding window is per layer (``layer_types``); tuna-jax runs full attention only."""
    if hf.get("use_sliding_window"):
        raise _refuse(family, "use_sliding_window", True, "sliding-window layers are not implemented")
    kinds = set(hf.get("layer_types") or ["full_attention"])
    if kinds != {"full_attention"}:
        raise _refuse(family, "layer_types", sorted(kinds), "only full_attention layers are implemented")


def read_llama(hf: dict) -> dict:
    return dict(_common(hf), **_rotary_llama_style(hf, "llama"), rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
                qkv_bias=bool(hf.get("attention_bias")), o_bias=bool(hf.get("attention_bias")),
                mlp_bias=bool(hf.get("mlp_bias")))


def read_mistral(hf: dict) -> dict:
    if hf.get("layer_types"):
        raise _refuse("mistral", "layer_types", hf["layer_types"], "alternating attention layers (Ministral) are "
                      "not implemented; MistralForCausalLM applies one sliding window to every layer")
    # MistralConfig's default window is 4096 when the key is absent; null means none.
    return dict(_common(hf), **_rotary_llama_style(hf, "mistral"), rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
                sliding_window=hf.get("sliding_window", 4096))


def read_qwen2(hf: dict) -> dict:
    _no_sliding_layers(hf, "qwen2")
    return dict(_common(hf), **_rotary_llama_style(hf, "qwen2"), rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
                qkv_bias=True)


def read_qwen3(hf: dict) -> dict:
    _no_sliding_layers(hf, "qwen3")
    return dict(_common(hf, head_dim=hf.get("head_dim") or 128), **_rotary_llama_style(hf, "qwen3"),
                rms_norm_eps=hf.get("rms_norm_eps", 1e-6), qk_norm=True,
                qkv_bias=bool(hf.get("attention_bias")), o_bias=bool(hf.get("attention_bias")))


def _rotary_partial(hf: dict, family: str, **keys) -> dict:
    theta, scaling, partial = _rope(hf, default_partial=0.25, **keys)
    if scaling is not None:
        raise _refuse(family, "rope_scaling", dict(scaling), "only plain RoPE is implemented for this family")
    return dict(rope_theta=theta, partial_rotary_factor=partial)


def read_stablelm(hf: dict) -> dict:
    if hf.get("qk_layernorm"):
        raise _refuse("stablelm", "qk_layernorm", True, "the per-head q/k LayerNorm (StableLM 2 12B) is not "
                      "implemented")
    return dict(_common(hf, head_dim=hf["hidden_size"] // hf["num_attention_heads"]),
                **_rotary_partial(hf, "stablelm"), norm="layer", rms_norm_eps=hf.get("layer_norm_eps", 1e-5),
                qkv_bias=bool(hf.get("use_qkv_bias")),
                residual="parallel_shared_norm" if hf.get("use_parallel_residual") else "sequential")


def read_neox(hf: dict) -> dict:
    bias = bool(hf.get("attention_bias", True))
    common = _common(hf, head_dim=hf["hidden_size"] // hf["num_attention_heads"])
    common.update(num_kv_heads=hf["num_attention_heads"], hidden_act=hf.get("hidden_act", "gelu"))
    return dict(common, **_rotary_partial(hf, "gpt_neox", theta_key="rotary_emb_base", partial_key="rotary_pct"),
                norm="layer", rms_norm_eps=hf.get("layer_norm_eps", 1e-5), qkv_bias=bias, o_bias=bias,
                mlp="plain", mlp_bias=True,
                residual="parallel" if hf.get("use_parallel_residual", True) else "sequential")


# ---- LlamaConfig -> config.json ---------------------------------------------------------

def _write_common(cfg: LlamaConfig, family: Family) -> dict:
    eos = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
    return {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": cfg.hidden_act,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos,
    }


def _write_rms(cfg: LlamaConfig) -> dict:
    return {"rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
            "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None}


def write_llama(cfg: LlamaConfig) -> dict:
    return dict(_write_common(cfg, LLAMA), **_write_rms(cfg), attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)


def write_mistral(cfg: LlamaConfig) -> dict:
    return dict(_write_common(cfg, MISTRAL), **_write_rms(cfg), sliding_window=cfg.sliding_window)


def _write_qwen(cfg: LlamaConfig, family: Family) -> dict:
    return dict(_write_common(cfg, family), **_write_rms(cfg), use_sliding_window=False, sliding_window=None,
                max_window_layers=cfg.num_layers)


def write_qwen2(cfg: LlamaConfig) -> dict:
    return _write_qwen(cfg, QWEN2)


def write_qwen3(cfg: LlamaConfig) -> dict:
    return dict(_write_qwen(cfg, QWEN3), attention_bias=cfg.qkv_bias)


def write_stablelm(cfg: LlamaConfig) -> dict:
    return dict(_write_common(cfg, STABLELM), layer_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
                partial_rotary_factor=cfg.partial_rotary_factor, use_qkv_bias=cfg.qkv_bias, qk_layernorm=False,
                use_parallel_residual=cfg.residual == "parallel_shared_norm")


def write_neox(cfg: LlamaConfig) -> dict:
    out = _write_common(cfg, GPT_NEOX)
    del out["num_key_value_heads"], out["head_dim"]  # NeoX has neither: H kv heads, D / H dims
    return dict(out, layer_norm_eps=cfg.rms_norm_eps, rotary_emb_base=cfg.rope_theta,
                rotary_pct=cfg.partial_rotary_factor, attention_bias=cfg.qkv_bias,
                use_parallel_residual=cfg.residual == "parallel")


# ---- the families -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Family:
    architecture: str  # the HF class, config.json's "architectures"
    model_type: str  # config.json's "model_type"; also ``LlamaConfig.family``
    layer_prefix: str  # layer i's tensors are "<layer_prefix>.<i>.<row name>"
    read: Callable[[dict], dict]
    write: Callable[[LlamaConfig], dict]
    tensors: Callable[[LlamaConfig], tuple[list[Tensor], list[Tensor]]]
    ignored: tuple[str, ...] = ()  # suffixes of buffers some checkpoints carry; never read


LLAMA = Family("LlamaForCausalLM", "llama", "model.layers", read_llama, write_llama, llama_tensors)
MISTRAL = Family("MistralForCausalLM", "mistral", "model.layers", read_mistral, write_mistral, llama_tensors)
QWEN2 = Family("Qwen2ForCausalLM", "qwen2", "model.layers", read_qwen2, write_qwen2, llama_tensors)
QWEN3 = Family("Qwen3ForCausalLM", "qwen3", "model.layers", read_qwen3, write_qwen3, llama_tensors)
STABLELM = Family("StableLmForCausalLM", "stablelm", "model.layers", read_stablelm, write_stablelm, llama_tensors)
# Old NeoX checkpoints carry the causal-mask buffers attention.bias / attention.masked_bias.
GPT_NEOX = Family("GPTNeoXForCausalLM", "gpt_neox", "gpt_neox.layers", read_neox, write_neox, neox_tensors,
                  ignored=("attention.bias", "attention.masked_bias"))
FAMILIES = {f.model_type: f for f in (LLAMA, MISTRAL, QWEN2, QWEN3, STABLELM, GPT_NEOX)}


def family_of(cfg: LlamaConfig) -> Family:
    if cfg.family not in FAMILIES:
        raise ValueError(f"family={cfg.family!r}; choose one of {', '.join(FAMILIES)}")
    return FAMILIES[cfg.family]


def config_from_hf(hf: dict) -> dict:
    """A HF ``config.json`` dict -> ``LlamaConfig`` fields (``family`` included). An architecture
    outside ``FAMILIES``, or a key the decoder does not run, is a one-line ValueError."""
    model_type = hf.get("model_type", "llama")
    family = FAMILIES.get(model_type)
    archs = hf.get("architectures") or [family.architecture if family else None]
    if family is None or family.architecture not in archs:
        supported = ", ".join(f.architecture for f in FAMILIES.values())
        raise ValueError(f"unsupported architecture model_type={hf.get('model_type')!r} architectures={archs}: "
                         f"tuna-jax loads {supported} checkpoints")
    return dict(family.read(hf), family=family.model_type)


def config_to_hf(cfg: LlamaConfig) -> dict:
    """``LlamaConfig`` -> the complete ``config.json`` dict of its family."""
    return family_of(cfg).write(cfg)


def hf_name(cfg: LlamaConfig, row: Tensor, layer: int | None = None) -> str:
    """The HF tensor name of a global row, or of a layer row in layer ``layer``."""
    return row.hf if layer is None else f"{family_of(cfg).layer_prefix}.{layer}.{row.hf}"

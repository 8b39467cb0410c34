"""Test helpers for the llama2.c import: an independent writer of llama2.c legacy files and an independent
numpy forward pass that follows run.c line by line (interleaved RoPE, GQA, RMSNorm, SwiGLU).

Nothing here imports tuna_jax: the conversion is checked against this, not against itself.
Weights use llama2.c's own names and layout (nn.Linear [out, in], stacked over layers).
"""
from __future__ import annotations

import struct

import numpy as np

THETA = 10000.0
EPS = 1e-5


def random_llama2c_weights(rng: np.random.Generator, *, dim: int, hidden_dim: int, n_layers: int, n_heads: int,
                           n_kv_heads: int, vocab_size: int, shared: bool, scale: float = 0.3) -> dict:
    """Random llama2.c weights: {"token_embedding": [V, dim], "wq": [L, dim, dim], ...}; "wcls" only if not shared."""
    hs = dim // n_heads
    kv = n_kv_heads * hs

    def r(*shape, s=scale):
        return (rng.standard_normal(shape) * s).astype(np.float32)

    w = {
        "token_embedding": r(vocab_size, dim, s=1.0),
        "rms_att": (1.0 + r(n_layers, dim, s=0.1)),
        "wq": r(n_layers, n_heads * hs, dim),
        "wk": r(n_layers, kv, dim),
        "wv": r(n_layers, kv, dim),
        "wo": r(n_layers, dim, n_heads * hs),
        "rms_ffn": (1.0 + r(n_layers, dim, s=0.1)),
        "w1": r(n_layers, hidden_dim, dim),
        "w2": r(n_layers, dim, hidden_dim),
        "w3": r(n_layers, hidden_dim, dim),
        "rms_final": (1.0 + r(dim, s=0.1)),
    }
    if not shared:
        w["wcls"] = r(vocab_size, dim)
    return w


def rope_tables(head_size: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """llama2.c model.py precompute_freqs_cis, in float32: (cos, sin), each [seq_len, head_size // 2]."""
    freqs = (1.0 / (np.float32(THETA) ** (np.arange(0, head_size, 2)[: head_size // 2].astype(np.float32)
                                          / np.float32(head_size)))).astype(np.float32)
    t = np.arange(seq_len, dtype=np.float32)
    ang = np.outer(t, freqs).astype(np.float32)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def write_llama2c_legacy(path, w: dict, *, n_heads: int, n_kv_heads: int, max_seq_len: int,
                         header_override: tuple | None = None, rope_override: tuple | None = None) -> None:
    """Write a llama2.c legacy checkpoint exactly as llama2.c's export.py legacy_export does."""
    vocab_size, dim = w["token_embedding"].shape
    n_layers, hidden_dim, _ = w["w1"].shape
    shared = "wcls" not in w
    header = header_override or (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
                                 vocab_size if shared else -vocab_size, max_seq_len)
    cos, sin = rope_override or rope_tables(dim // n_heads, max_seq_len)
    with open(path, "wb") as f:
        f.write(struct.pack("7i", *header))
        for name in ["token_embedding", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3",
                     "rms_final"]:
            f.write(np.ascontiguousarray(w[name], dtype="<f4").tobytes())
        f.write(np.ascontiguousarray(cos, dtype="<f4").tobytes())
        f.write(np.ascontiguousarray(sin, dtype="<f4").tobytes())
        if not shared:
            f.write(np.ascontiguousarray(w["wcls"], dtype="<f4").tobytes())


def write_llama2c_tokenizer(path, pieces: list[tuple[str, float]]) -> None:
    """Write a llama2.c tokenizer.bin as llama2.c tokenizer.py export does: <unk>, "\\n<s>\\n", "\\n</s>\\n",
    the 256 byte pieces, then ``pieces`` (text with U+2581 written as a space, score)."""
    entries = [("<unk>", 0.0), ("\n<s>\n", 0.0), ("\n</s>\n", 0.0)]
    entries += [(f"<0x{b:02X}>", 0.0) for b in range(256)]
    entries += [(t.replace("\u2581", " "), s) for t, s in pieces]
    blobs = [(t.encode("utf-8"), s) for t, s in entries]
    with open(path, "wb") as f:
        f.write(struct.pack("I", max(len(b) for b, _ in blobs)))
        for b, s in blobs:
            f.write(struct.pack("fI", s, len(b)))
            f.write(b)


def _rmsnorm(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    ss = np.mean(x * x) + EPS
    return weight * (x / np.sqrt(ss))


def llama2c_forward(w: dict, tokens: list[int], *, n_heads: int, n_kv_heads: int) -> np.ndarray:
    """run.c's forward(), token by token with a KV cache, in float64. Returns logits [len(tokens), vocab]."""
    w = {k: np.asarray(v, dtype=np.float64) for k, v in w.items()}
    vocab, dim = w["token_embedding"].shape
    n_layers = w["wq"].shape[0]
    hs = dim // n_heads
    kv_dim = n_kv_heads * hs
    kv_mul = n_heads // n_kv_heads
    T = len(tokens)
    key_cache = np.zeros((n_layers, T, kv_dim))
    value_cache = np.zeros((n_layers, T, kv_dim))
    wcls = w.get("wcls", w["token_embedding"])
    out = np.zeros((T, vocab))
    for pos, token in enumerate(tokens):
        x = w["token_embedding"][token].copy()
        for l in range(n_layers):
            xb = _rmsnorm(x, w["rms_att"][l])
            q = w["wq"][l] @ xb
            k = w["wk"][l] @ xb
            v = w["wv"][l] @ xb
            # RoPE relative positional encoding: complex-valued rotate q and k in each head (run.c)
            for i in range(0, dim, 2):
                head_dim = i % hs
                freq = 1.0 / (THETA ** (head_dim / hs))
                val = pos * freq
                fcr, fci = np.cos(val), np.sin(val)
                rotn = 2 if i < kv_dim else 1
                for vi in range(rotn):
                    vec = q if vi == 0 else k
                    v0, v1 = vec[i], vec[i + 1]
                    vec[i] = v0 * fcr - v1 * fci
                    vec[i + 1] = v0 * fci + v1 * fcr
            key_cache[l, pos] = k
            value_cache[l, pos] = v
            xb = np.zeros(dim)
            for h in range(n_heads):
                qh = q[h * hs:(h + 1) * hs]
                kvh = h // kv_mul
                keys = key_cache[l, :pos + 1, kvh * hs:(kvh + 1) * hs]
                att = keys @ qh / np.sqrt(hs)
                att = np.exp(att - att.max())
                att /= att.sum()
                xb[h * hs:(h + 1) * hs] = att @ value_cache[l, :pos + 1, kvh * hs:(kvh + 1) * hs]
            x = x + w["wo"][l] @ xb
            xb = _rmsnorm(x, w["rms_ffn"][l])
            hb = w["w1"][l] @ xb
            hb2 = w["w3"][l] @ xb
            hb = hb * (1.0 / (1.0 + np.exp(-hb))) * hb2
            x = x + w["w2"][l] @ hb
        out[pos] = wcls @ _rmsnorm(x, w["rms_final"])
    return out

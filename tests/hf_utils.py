"""Tiny random Hugging Face LLaMA models for parity and conversion tests (PyTorch CPU)."""
from __future__ import annotations

import numpy as np

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}


def tiny_hf_config(num_kv_heads=2, tie=False, llama3=False, vocab=128, layers=2, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=num_kv_heads, vocab_size=vocab, max_position_embeddings=128,
                       rms_norm_eps=1e-5, tie_word_embeddings=tie,
                       rope_theta=500000.0 if llama3 else 10000.0,
                       rope_scaling=dict(LLAMA3_SCALING) if llama3 else None, **kw)


def tiny_hf_model(seed=0, **cfg_kw):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_hf_config(**cfg_kw)).eval()
    # HF inits norms to 1; randomise them so a swapped norm would show up.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model


def hf_logits(model, ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    import torch

    with torch.no_grad():
        kw = {} if attention_mask is None else {"attention_mask": torch.tensor(attention_mask)}
        return model(torch.tensor(ids), **kw).logits.float().numpy()


def save_hf(model, path, dtype=None):
    import torch

    if dtype is not None:
        model = model.to({"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype])
    model.save_pretrained(str(path), safe_serialization=True)
    return path

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


# ---- tiny random models of every supported family ------------------------------------------

# model_type -> (transformers config class, causal-LM class)
FAMILY_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM"),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM"),
}


def tiny_family_config(family: str, hidden=32, heads=4, layers=2, vocab=128, tie=False, **kw):
    """A tiny transformers config of ``family`` (a FAMILY_CLASSES key); ``kw`` are its own keys
    (num_key_value_heads, sliding_window, use_qkv_bias, rotary_pct, ...; max_position_embeddings, bos_token_id
    and eos_token_id default to 128, 1 and 2). Weights are drawn with std
    0.1, not HF's 0.02, so that greedy continuations depend on the prompt (at 0.02 the random
    biases decide them)."""
    kw = {"initializer_range": 0.1, "max_position_embeddings": 128, "bos_token_id": 1, "eos_token_id": 2, **kw}
    import transformers

    cls = getattr(transformers, FAMILY_CLASSES[family][0])
    return cls(hidden_size=hidden, intermediate_size=2 * hidden - 16, num_hidden_layers=layers,
               num_attention_heads=heads, vocab_size=vocab, tie_word_embeddings=tie, **kw)


def tiny_family_model(family: str, seed=0, **cfg_kw):
    """A tiny random HF model of ``family`` in float32, eval mode. Norm scales are 1 + noise and biases
    noise (HF initialises them to 1 and 0), so a missing or swapped norm or bias would show."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, FAMILY_CLASSES[family][1])(tiny_family_config(family, **cfg_kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def hf_greedy(model, prompt: list[int], max_new_tokens: int, eos_id: int) -> list[int]:
    """HF ``generate`` (greedy) on one unpadded prompt -> the new tokens (EOS included when it stops)."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=0)
    return [int(t) for t in out[0, len(prompt):]]

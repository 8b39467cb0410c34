"""The model: Flax LLaMA, conversion to and from Hugging Face, Orbax checkpoints."""
from __future__ import annotations

import os

from tuna_jax.model.llama import KVCache, Llama, LlamaConfig  # noqa: F401


def load_model(path: str | os.PathLike, mesh=None, **runtime) -> Llama:
    """A HF LlamaForCausalLM folder (safetensors), a tuna-jax params checkpoint, or a LoRA adapter folder
    (PEFT's format: its base loaded and the adapters merged, ``model/lora.py``) -> ``Llama``,
    placed on ``mesh`` by the rules table. ``runtime``: dtype, param_dtype, scan_layers, remat_policy.
    ``path`` may be in cloud storage (``gs://...``)."""
    from tuna_jax.io import paths
    from tuna_jax.model.checkpoint import is_params_dir, load_params
    from tuna_jax.model.convert import ConversionError, load_hf_model

    p = os.fspath(path)
    if not paths.exists(p):
        raise ConversionError(f"{path}: no such file or directory")
    if is_params_dir(p):
        return load_params(p, mesh, **runtime)
    from tuna_jax.model.lora import is_adapter_dir, load_adapter_model

    if is_adapter_dir(p):
        return load_adapter_model(p, mesh, **runtime)
    return load_hf_model(p, mesh, **runtime)

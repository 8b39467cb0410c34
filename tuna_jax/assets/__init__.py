"""Small MIT-licensed assets shipped with the package, so the demo and the default tests need
no download and no ../shared: the stories260K llama2.c model and its 512-piece tokenizer
(karpathy/tinyllamas, MIT; see stories260K/LICENSE)."""
from __future__ import annotations

import os
import pathlib
import shutil

ASSETS = pathlib.Path(__file__).resolve().parent
STORIES260K_BIN = ASSETS / "stories260K" / "stories260K.bin"
STORIES260K_TOKENIZER_BIN = ASSETS / "stories260K" / "tok512.bin"


def stories260k_hf_dir(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The stories260K model as a Hugging Face folder (converted once, then cached).

    cache_dir: default ``$TUNA_JAX_CACHE`` or ``~/.cache/tuna-jax``."""
    from tuna_jax.assets.llama2c import convert_llama2c_to_hf

    root = pathlib.Path(cache_dir or os.environ.get("TUNA_JAX_CACHE") or pathlib.Path.home() / ".cache" / "tuna-jax")
    out = root / "stories260K-hf"
    if not (out / "model.safetensors").is_file() or not (out / "tokenizer.model").is_file():
        tmp = root / f"stories260K-hf.tmp{os.getpid()}"
        convert_llama2c_to_hf(STORIES260K_BIN, STORIES260K_TOKENIZER_BIN, tmp)
        if out.exists():  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.rename(out)
    return out

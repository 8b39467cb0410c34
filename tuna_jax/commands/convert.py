"""Convert checkpoints: a Hugging Face LLaMA folder (safetensors) to a tuna-jax params checkpoint and back, and a
llama2.c model.bin + tokenizer.bin to a Hugging Face folder (``tuna_jax/model/``)."""
from __future__ import annotations

import dataclasses
import sys

from tuna_jax.commands.shared import Mesh
from tuna_jax.io.fields import arg, pos

HELP = "convert checkpoints (HF safetensors, Orbax, llama2.c)"


HF_TO_ORBAX_HELP = "HF LlamaForCausalLM folder (safetensors) -> tuna-jax params checkpoint"


@dataclasses.dataclass(kw_only=True)
class HfToOrbax(Mesh):
    hf_dir: str = pos("HF folder (config.json, *.safetensors)")
    ckpt_dir: str = pos("the tuna-jax params checkpoint to write")
    param_dtype: str = arg("float32", "stored parameter dtype", choices=("float32", "bfloat16"))


def run_hf_to_orbax(cfg: HfToOrbax) -> int:
    from tuna_jax.io import paths
    from tuna_jax.model.checkpoint import convert_hf_to_params
    from tuna_jax.model.convert import ConversionError

    if paths.same_place(cfg.ckpt_dir, cfg.hf_dir):
        raise ConversionError(f"{cfg.ckpt_dir}: the checkpoint folder is the HF folder being read; choose another")
    cfg.make_mesh()  # multi-host start-up and --mesh checked; the export streams from host memory and fits any mesh
    out, model_cfg = convert_hf_to_params(cfg.hf_dir, cfg.ckpt_dir, param_dtype=cfg.param_dtype)
    print(f"wrote {out} ({model_cfg.num_params() / 1e6:.2f}M parameters, {model_cfg.param_dtype})")
    return 0


ORBAX_TO_HF_HELP = "tuna-jax checkpoint -> HF folder (sharded safetensors + index)"


@dataclasses.dataclass(kw_only=True)
class OrbaxToHf(Mesh):
    ckpt_dir: str = pos("tuna-jax params checkpoint (or a LoRA run's adapter folder)")
    out_dir: str = pos("the HF folder to write")
    like: str | None = arg(None, "the HF folder it came from: its config.json fields, dtype and tokenizer files are "
                           "carried over", metavar="HF_DIR")
    dtype: str | None = arg(None, "storage dtype (default: that of --like, so bf16 stays bf16)",
                            choices=("float32", "bfloat16", "float16"))
    max_shard_gb: float = arg(5.0, "largest safetensors shard in GiB")
    overwrite: bool = arg(False, "write into a folder that is not empty (the old shards there are removed)")
    merge: bool = arg(False, "CKPT_DIR is a LoRA adapter folder: write the base with the adapters merged (default "
                      "for an adapter folder: a PEFT adapter folder, --like its base)")


def run_orbax_to_hf(cfg: OrbaxToHf) -> int:
    from flax import nnx

    from tuna_jax.model import load_model
    from tuna_jax.model.convert import ConversionError, prepare_export_dir, save_hf_model
    from tuna_jax.model.lora import adapter_base, export_peft, is_adapter_dir

    prepare_export_dir(cfg.out_dir, [cfg.ckpt_dir, cfg.like], overwrite=cfg.overwrite)  # before loading
    adapters = is_adapter_dir(cfg.ckpt_dir)  # a LoRA run's export: PEFT's folder, or merged with --merge
    if cfg.merge and not adapters:
        raise ConversionError(f"{cfg.ckpt_dir}: --merge: not a LoRA adapter folder, there is nothing to merge")
    if adapters and not cfg.merge:
        print(f"wrote {export_peft(cfg.ckpt_dir, cfg.out_dir, base=cfg.like)} (a PEFT adapter folder; --merge "
              f"writes merged weights)")
        return 0
    model = load_model(cfg.ckpt_dir, cfg.make_mesh())
    like = cfg.like or (adapter_base(cfg.ckpt_dir) if adapters else None)  # the base: config, dtype, tokenizer
    if like is None:
        print("note: no --like HF_DIR given: config.json is written from the checkpoint alone and tokenizer "
              "files are copied from the checkpoint folder if it has them", file=sys.stderr)
        like = cfg.ckpt_dir
    out = save_hf_model(nnx.state(model, nnx.Param), model.cfg, cfg.out_dir, like=like, dtype=cfg.dtype,
                        max_shard_bytes=int(cfg.max_shard_gb * 2**30))
    print(f"wrote {out}")
    return 0


LLAMA2C_TO_HF_HELP = "llama2.c legacy model.bin + tokenizer.bin -> HF folder"


@dataclasses.dataclass(kw_only=True)
class Llama2cToHf:
    model_bin: str = pos("llama2.c model.bin (legacy format)")
    tokenizer_bin: str = pos("its tokenizer.bin")
    out_dir: str = pos("the HF folder to write")


def run_llama2c_to_hf(cfg: Llama2cToHf) -> int:
    from tuna_jax.assets.llama2c import convert_llama2c_to_hf

    print(f"wrote {convert_llama2c_to_hf(cfg.model_bin, cfg.tokenizer_bin, cfg.out_dir)}")
    return 0

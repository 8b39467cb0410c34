"""Hugging Face safetensors <-> tuna-jax parameters, streaming one tensor at a time.

HF layout -> ours (per layer i; ours is stacked on a leading ``layers`` axis):

=========================================  ==============================  =====================
HF tensor                                  ours                            transform
=========================================  ==============================  =====================
model.embed_tokens.weight [V, D]           embed_tokens [V, D]             -
model.norm.weight [D]                      norm.weight [D]                 -
lm_head.weight [V, D] (untied only)        lm_head [D, V]                  transpose
layers.i.input_layernorm.weight [D]        layers.input_layernorm.weight   stack
layers.i.self_attn.q_proj.weight [H*Dh,D]  layers.self_attn.q_proj [D,H,Dh] transpose, reshape
layers.i.self_attn.k/v_proj.weight         layers.self_attn.k/v_proj       [D, K, Dh]
layers.i.self_attn.o_proj.weight [D,H*Dh]  layers.self_attn.o_proj [H,Dh,D] transpose, reshape
layers.i.mlp.gate/up_proj.weight [F, D]    layers.mlp.gate/up_proj [D, F]  transpose
layers.i.mlp.down_proj.weight [D, F]       layers.mlp.down_proj [F, D]     transpose
=========================================  ==============================  =====================

No q/k permutation: the model uses HF's half-split rotary layout.

Host memory: reading holds one stacked parameter group (e.g. all q_proj of every layer) at a
time, placed on the mesh and dropped before the next; writing holds one output shard plus one
stacked parameter. A 7B model never needs twice its size in host memory.

Only ``*.safetensors`` files are read. A folder with only ``pytorch_model.bin`` (pickle) is
refused with instructions: pickle can execute code on load.

Cloud storage (``gs://...``, :mod:`tuna_jax.io.paths`): safetensors are opened by file name, so a HF folder
read from a bucket is first copied into the local cache (``paths.local_copy``); a ``--like`` folder in a
bucket gives only its small files (config, tokenizer), never its weights, and the export dtype then comes
from its config.json; an export to a bucket is written to a local staging folder and uploaded.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Iterator

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from tuna_jax.io import paths
from tuna_jax.io.errors import InputError
from tuna_jax.io.jsonl import read_json
from tuna_jax.model.llama import Llama, LlamaConfig, abstract_model
from tuna_jax.parallel import RULES, state_shardings, to_host

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json")
# Buffers some old checkpoints carry; recomputed by the model, safe to skip.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


# A checkpoint that cannot be converted; the message names the file and tensor. The project's one
# input-error type under the name this module has always used.
ConversionError = InputError


# ---- the name/layout table -------------------------------------------------------------

def _layer_specs(cfg: LlamaConfig):
    """(HF suffix in layer i, our path, to_ours(hf_array) -> ours, to_hf(ours) -> hf_array)."""
    d, h, k, dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    return [
        ("input_layernorm.weight", ("layers", "input_layernorm", "weight"), lambda w: w, lambda w: w),
        ("post_attention_layernorm.weight", ("layers", "post_attention_layernorm", "weight"), lambda w: w, lambda w: w),
        ("self_attn.q_proj.weight", ("layers", "self_attn", "q_proj"),
         lambda w: w.T.reshape(d, h, dh), lambda w: w.reshape(d, h * dh).T),
        ("self_attn.k_proj.weight", ("layers", "self_attn", "k_proj"),
         lambda w: w.T.reshape(d, k, dh), lambda w: w.reshape(d, k * dh).T),
        ("self_attn.v_proj.weight", ("layers", "self_attn", "v_proj"),
         lambda w: w.T.reshape(d, k, dh), lambda w: w.reshape(d, k * dh).T),
        ("self_attn.o_proj.weight", ("layers", "self_attn", "o_proj"),
         lambda w: w.T.reshape(h, dh, d), lambda w: w.reshape(h * dh, d).T),
        ("mlp.gate_proj.weight", ("layers", "mlp", "gate_proj"), lambda w: w.T, lambda w: w.T),
        ("mlp.up_proj.weight", ("layers", "mlp", "up_proj"), lambda w: w.T, lambda w: w.T),
        ("mlp.down_proj.weight", ("layers", "mlp", "down_proj"), lambda w: w.T, lambda w: w.T),
    ]


def _global_specs(cfg: LlamaConfig):
    specs = [("model.embed_tokens.weight", ("embed_tokens",), lambda w: w, lambda w: w),
             ("model.norm.weight", ("norm", "weight"), lambda w: w, lambda w: w)]
    if not cfg.tie_word_embeddings:
        specs.append(("lm_head.weight", ("lm_head",), lambda w: w.T, lambda w: w.T))
    return specs


def hf_tensor_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name the config implies, with its HF shape."""
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    qd, kd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = {"input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
                 "self_attn.q_proj.weight": (qd, d), "self_attn.k_proj.weight": (kd, d),
                 "self_attn.v_proj.weight": (kd, d), "self_attn.o_proj.weight": (d, qd),
                 "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d), "mlp.down_proj.weight": (d, f)}
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    for i in range(cfg.num_layers):
        shapes.update({f"model.layers.{i}.{k}": s for k, s in per_layer.items()})
    return shapes


# ---- reading a HF folder ---------------------------------------------------------------

# What a HF folder may hold that is never read here (pickled weights, Meta's original/ checkpoint).
_NOT_READ = tuple(p for p in paths.MODEL_WEIGHTS if p != "*.safetensors") + ("original",)


def read_hf_config(hf_dir: str | os.PathLike) -> dict:
    path = paths.join(hf_dir, "config.json")
    if not paths.is_file(path):
        raise ConversionError(f"{hf_dir}: no config.json; is this a Hugging Face model folder?")
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise ConversionError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def _open_safetensors(path: pathlib.Path):
    """``safe_open`` of one file; a damaged file (truncated download, not safetensors) is one line."""
    try:
        return safe_open(str(path), framework="numpy")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError, OSError, ...
        raise ConversionError(f"{path}: not a readable safetensors file ({' '.join(str(e).split())}); it is "
                              f"probably truncated (an interrupted download or copy): fetch or export it "
                              f"again") from None


class SafetensorsIndex:
    """Which file holds which tensor, for a single ``model.safetensors`` or a sharded set
    with ``model.safetensors.index.json``. Reads lazily, one tensor at a time."""

    def __init__(self, hf_dir: str | os.PathLike):
        self.dir = pathlib.Path(hf_dir)
        if not self.dir.is_dir():
            raise ConversionError(f"{hf_dir}: not a directory")
        index = self.dir / "model.safetensors.index.json"
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in self.dir.glob("*.bin")) + sorted(p.name for p in self.dir.glob("*.pt*"))
            hint = ""
            if pickles:
                hint = (f" It has {', '.join(pickles)}: PyTorch pickle files, which tuna-jax never loads "
                        "(unpickling can run arbitrary code). Re-save it as safetensors in an environment you "
                        "trust: AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, safe_serialization=True).")
            raise ConversionError(f"{hf_dir}: no *.safetensors files.{hint}")
        self.where: dict[str, pathlib.Path] = {}
        if index.is_file():
            doc = read_json(index)
            weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{index}: no 'weight_map' object (tensor name -> shard file)")
            for name, fname in weight_map.items():
                self.where[name] = self.dir / fname
            missing = {p for p in self.where.values() if not p.is_file()}
            if missing:
                raise ConversionError(f"{index}: lists missing shard file(s) {sorted(str(m) for m in missing)}")
        else:
            for path in files:
                with _open_safetensors(path) as f:
                    for name in f.keys():
                        self.where[name] = path

    def get(self, name: str) -> np.ndarray:
        if name not in self.where:
            raise ConversionError(f"{self.dir}: tensor {name!r} is missing from the checkpoint")
        with _open_safetensors(self.where[name]) as f:
            try:
                return f.get_tensor(name)
            except Exception as e:  # noqa: BLE001 - a header that promises more bytes than the file has
                raise ConversionError(f"{self.where[name]}: tensor {name!r} cannot be read "
                                      f"({' '.join(str(e).split())}); the file is probably truncated") from None

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.where:
            raise ConversionError(f"{self.dir}: tensor {name!r} is missing from the checkpoint")
        with _open_safetensors(self.where[name]) as f:
            return tuple(f.get_slice(name).get_shape())

    def dtype_name(self) -> str:
        """The checkpoint's storage dtype, from the embedding."""
        with _open_safetensors(self.where["model.embed_tokens.weight"]) as f:
            return {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(
                f.get_slice("model.embed_tokens.weight").get_dtype(), "float32")


def validate_hf_checkpoint(index: SafetensorsIndex, cfg: LlamaConfig) -> None:
    """Every expected tensor present with the right shape; no unexpected ones."""
    expected = hf_tensor_shapes(cfg)
    for name, shape in expected.items():
        got = index.shape(name)
        if got != shape:
            raise ConversionError(f"{index.where[name]}: tensor {name!r} has shape {list(got)}, "
                                  f"but config.json implies {list(shape)}")
    extra = [n for n in index.where if n not in expected and not n.endswith(IGNORED_SUFFIXES)]
    if extra:
        raise ConversionError(f"{index.where[extra[0]]}: unexpected tensor(s) {extra[:5]} for a LlamaForCausalLM "
                              f"with this config.json (tie_word_embeddings={cfg.tie_word_embeddings})")


def iter_hf_params(index: SafetensorsIndex, cfg: LlamaConfig) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """Yield (our path, our array in param_dtype), one parameter group at a time."""
    dt = NP_DTYPES[cfg.param_dtype]
    for name, path, to_ours, _ in _global_specs(cfg):
        yield path, to_ours(index.get(name)).astype(dt)
    for suffix, path, to_ours, _ in _layer_specs(cfg):
        first = to_ours(index.get(f"model.layers.0.{suffix}"))
        stacked = np.empty((cfg.num_layers,) + first.shape, dt)
        stacked[0] = first
        for i in range(1, cfg.num_layers):
            stacked[i] = to_ours(index.get(f"model.layers.{i}.{suffix}"))
        yield path, stacked


def _lookup(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def load_hf_model(hf_dir: str | os.PathLike, mesh: jax.sharding.Mesh | None = None, rules=RULES,
                  **runtime) -> Llama:
    """A HF LlamaForCausalLM folder -> our ``Llama`` module, each parameter placed on the mesh
    (or the default device) as soon as it is read. ``runtime``: dtype, param_dtype, scan_layers..."""
    hf_cfg = read_hf_config(hf_dir)
    try:
        cfg = LlamaConfig.from_hf(hf_cfg, **runtime)
    except ValueError as e:
        raise ConversionError(f"{paths.join(hf_dir, 'config.json')}: {e}") from None
    # safetensors opens files by name: a folder in a bucket is read from a local copy of what is read here
    index = SafetensorsIndex(paths.local_copy(hf_dir, skip=_NOT_READ))
    validate_hf_checkpoint(index, cfg)
    graphdef, state = nnx.split(abstract_model(cfg))
    shardings = state_shardings(state, mesh, rules) if mesh is not None else None
    for path, value in iter_hf_params(index, cfg):
        var = _lookup(state, path)
        target = _lookup(shardings, path).get_value() if shardings is not None else None
        var.set_value(jax.device_put(value, target) if target is not None else jax.numpy.asarray(value))
        del value
    return nnx.merge(graphdef, state)


# ---- writing a HF folder ---------------------------------------------------------------

def iter_hf_tensors(state: nnx.State, cfg: LlamaConfig, dtype: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, HF array in ``dtype``) in HF's order, one stacked group on host at a time."""
    dt = NP_DTYPES[dtype]
    glob = {name: (path, to_hf) for name, path, _, to_hf in _global_specs(cfg)}
    yield "model.embed_tokens.weight", glob["model.embed_tokens.weight"][1](
        to_host(_lookup(state, ("embed_tokens",))[...])).astype(dt)
    for suffix, path, _, to_hf in _layer_specs(cfg):
        stacked = to_host(_lookup(state, path)[...])
        for i in range(cfg.num_layers):
            yield f"model.layers.{i}.{suffix}", np.ascontiguousarray(to_hf(stacked[i]).astype(dt))
        del stacked
    yield "model.norm.weight", to_host(_lookup(state, ("norm", "weight"))[...]).astype(dt)
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", np.ascontiguousarray(to_host(_lookup(state, ("lm_head",))[...]).T.astype(dt))


def save_hf_model(state: nnx.State, cfg: LlamaConfig, out_dir: str | os.PathLike, *, like: str | None = None,
                  dtype: str | None = None, max_shard_bytes: int = 5 * 2**30):
    """Write a HF folder transformers loads: sharded safetensors + index (one file when it
    fits), a complete config.json (``like``'s config updated with our architecture fields and
    the dtype), and the tokenizer files copied from ``like``. ``out_dir`` and ``like`` may be in cloud
    storage (module docstring). Returns the folder's ``etils.epath.Path``.

    dtype: storage dtype; default the ``like`` checkpoint's (bf16 stays bf16), else param_dtype.
    """
    if like and paths.is_remote(like):
        like = paths.local_copy(like, skip=paths.MODEL_WEIGHTS)
    base_cfg = read_hf_config(like) if like else {}
    if dtype is None:
        dtype = (SafetensorsIndex(like).dtype_name() if like and list(pathlib.Path(like).glob("*.safetensors"))
                 else base_cfg.get("dtype") or base_cfg.get("torch_dtype") or cfg.param_dtype)
    if dtype not in NP_DTYPES:
        raise ConversionError(f"export dtype {dtype!r}: choose float32, bfloat16 or float16")

    if jax.process_index() != 0:  # every host joins the gathers; host 0 writes
        for _ in iter_hf_tensors(state, cfg, dtype):
            pass
        return paths.resolve(out_dir)
    with paths.staged_dir(out_dir) as local:
        written = _write_hf_folder(state, cfg, pathlib.Path(local), like, base_cfg, dtype, max_shard_bytes)
    for old in paths.glob(out_dir, "model*.safetensors"):  # shards of an earlier export into this folder
        if paths.basename(old) not in written:
            paths.remove(old)
    if written == ["model.safetensors"]:  # one file needs no index (an earlier sharded export's would mislead)
        paths.remove(paths.join(out_dir, "model.safetensors.index.json"))
    return paths.resolve(out_dir)


def _write_hf_folder(state: nnx.State, cfg: LlamaConfig, out: pathlib.Path, like: str | None, base_cfg: dict,
                     dtype: str, max_shard_bytes: int) -> list[str]:
    """The files of :func:`save_hf_model` in local folder ``out``; returns the weight files' names."""
    shards: list[dict[str, np.ndarray]] = [{}]
    shard_names: list[str] = []
    weight_map: dict[str, str] = {}
    size = total = 0

    def flush():
        name = f"model-{len(shard_names) + 1:05d}.safetensors"
        save_file(shards[-1], str(out / (name + ".tmp")), metadata={"format": "pt"})
        shard_names.append(name)
        for k in shards[-1]:
            weight_map[k] = name
        shards[-1] = {}

    for name, arr in iter_hf_tensors(state, cfg, dtype):
        if size and size + arr.nbytes > max_shard_bytes:
            flush()
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
        total += arr.nbytes
    if shards[-1]:
        flush()
    n = len(shard_names)
    if n == 1:
        os.replace(out / (shard_names[0] + ".tmp"), out / "model.safetensors")
    else:
        final = {}
        for i, old in enumerate(shard_names):
            new = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(out / (old + ".tmp"), out / new)
            final[old] = new
        index = {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in weight_map.items()}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    written = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    config = dict(base_cfg)
    for stale in ("rope_parameters", "torch_dtype", "dtype", "rope_scaling", "rope_theta"):
        config.pop(stale, None)
    config.update(cfg.to_hf())
    config["torch_dtype"] = config["dtype"] = dtype
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if like:
        copy_tokenizer_files(like, out)
    write_chat_template(out)
    # safetensors writes its files 0600; an export is meant to be shared and served: normal permissions
    umask = os.umask(0)
    os.umask(umask)
    for f in out.iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)
    return written


def write_chat_template(out_dir: str | os.PathLike) -> bool:
    """Put the Alpaca chat template (``templates.alpaca_chat_template``) in ``OUT/tokenizer_config.json`` when
    the folder has tokenizer files, so ``apply_chat_template`` gives the prompt the model was trained on.
    A template already there (e.g. copied from a chat model's ``--like``) is replaced: this model was
    trained on the Alpaca prompt. Returns whether a template was written."""
    from tuna_jax.data.templates import alpaca_chat_template

    out = pathlib.Path(out_dir)
    if not any((out / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
        return False
    path = out / "tokenizer_config.json"
    cfg = read_json(path) if path.is_file() else {}
    if not isinstance(cfg, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    cfg["chat_template"] = alpaca_chat_template()
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return True


def prepare_export_dir(out_dir: str | os.PathLike, sources: list, overwrite: bool = False):
    """Check an export target before anything is loaded: never one of the ``sources`` (the checkpoint being
    exported, the ``--like`` folder: an export there would overwrite the weights it reads), and, unless
    ``overwrite``, empty or absent (an export into a folder with other files would mix two models).
    ``save_hf_model`` removes the old shards of an overwritten export."""
    out = os.fspath(out_dir)
    for src in sources:
        if src is not None and paths.same_place(out, src):
            raise ConversionError(f"{out}: the export folder is the folder being read ({src}); choose another "
                                  f"folder")
    if paths.exists(out) and not paths.is_dir(out):
        raise ConversionError(f"{out}: exists and is not a folder")
    if paths.is_dir(out) and paths.listdir(out) and not overwrite:
        n = len(paths.listdir(out))
        raise ConversionError(f"{out}: not empty ({n} entries); pass --overwrite to replace the export there "
                              f"(its old shards are removed), or choose an empty folder")
    return paths.resolve(out)


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy the tokenizer (and generation config) files that exist in ``src`` (either may be in cloud storage)."""
    copied = []
    for name in TOKENIZER_FILES:
        p = paths.join(src, name)
        if paths.is_file(p):
            paths.copy_file(p, paths.join(dst, name))
            copied.append(name)
    return copied

"""Hugging Face safetensors <-> tuna-jax parameters, streaming one tensor at a time.

Each family's table (HF name, shape, our path, transforms) is in ``model/families.py``; every
transform only moves data (transpose, reshape, split; ours are stacked on a leading ``layers`` axis),
and there is no q/k permutation: the model uses HF's half-split rotary layout. :func:`load_hf_model`
reads a HF folder into the model, :func:`hf_param_blocks` streams its pieces for ``convert
hf-to-orbax``, :func:`save_hf_model` writes sharded safetensors and a complete ``config.json`` (with
:func:`write_chat_template`: the Alpaca prompt as the chat template).

Host memory: reading holds one stacked parameter group at a time and writing one output shard plus
one stacked parameter, so a 7B model never needs twice its size in host memory. Only
``*.safetensors`` files are read: pickle can execute code on load. HF folders in cloud storage are
copied into the local cache first (safetensors are opened by file name); an export to a bucket is
staged locally and uploaded.

The LLaMA table, host memory and cloud storage in full: docs/models.md#convert.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Callable, Iterator

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from tuna_jax.io import paths
from tuna_jax.io.errors import InputError
from tuna_jax.io.jsonl import read_json
from tuna_jax.model.families import family_of
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
# One table per family, in model/families.py; these give its rows in the (name, path, to_ours, to_hf) form
# the readers and writers below use.

def _layer_specs(cfg: LlamaConfig):
    """(HF suffix in layer i, our path, to_ours(hf_array) -> ours, to_hf(ours) -> hf_array). Rows that
    share a suffix are the parts of one fused HF tensor; their to_hf takes all parts (``families``)."""
    return [(t.hf, t.ours, t.to_ours, t.to_hf) for t in family_of(cfg).tensors(cfg)[1]]


def _global_specs(cfg: LlamaConfig):
    """As ``_layer_specs`` for the tensors outside the layers, the embedding first."""
    return [(t.hf, t.ours, t.to_ours, t.to_hf) for t in family_of(cfg).tensors(cfg)[0]]


def _layer_name(cfg: LlamaConfig, i: int, suffix: str) -> str:
    """The HF name of layer i's tensor ``suffix`` (``model.layers.i.suffix`` for LLaMA)."""
    return f"{family_of(cfg).layer_prefix}.{i}.{suffix}"


def hf_tensor_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name the config implies, with its HF shape."""
    glob, layers = family_of(cfg).tensors(cfg)
    shapes = {t.hf: t.shape for t in glob}
    for i in range(cfg.num_layers):
        shapes.update({_layer_name(cfg, i, t.hf): t.shape for t in layers})
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
                        "trust: AutoModelForCausalLM.from_pretrained(DIR)"
                        ".save_pretrained(OUT, safe_serialization=True).")
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

    def get(self, name: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        """The tensor, or its rows [start, stop) (clipped; only those bytes are read)."""
        if name not in self.where:
            raise ConversionError(f"{self.dir}: tensor {name!r} is missing from the checkpoint")
        with _open_safetensors(self.where[name]) as f:
            try:
                if start is None and stop is None:
                    return f.get_tensor(name)
                t = f.get_slice(name)
                n = t.get_shape()[0]
                return t[min(start or 0, n):min(n if stop is None else stop, n)]
            except Exception as e:  # noqa: BLE001 - a header that promises more bytes than the file has
                raise ConversionError(f"{self.where[name]}: tensor {name!r} cannot be read "
                                      f"({' '.join(str(e).split())}); the file is probably truncated") from None

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.where:
            raise ConversionError(f"{self.dir}: tensor {name!r} is missing from the checkpoint")
        with _open_safetensors(self.where[name]) as f:
            return tuple(f.get_slice(name).get_shape())

    def dtype_name(self) -> str:
        """The checkpoint's storage dtype, from the embedding (LLaMA's or GPT-NeoX's name)."""
        name = next((n for n in ("model.embed_tokens.weight", "gpt_neox.embed_in.weight") if n in self.where),
                    "model.embed_tokens.weight")
        with _open_safetensors(self.where[name]) as f:
            return {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(
                f.get_slice(name).get_dtype(), "float32")


def validate_hf_checkpoint(index: SafetensorsIndex, cfg: LlamaConfig) -> None:
    """Every expected tensor present with the right shape; no unexpected ones."""
    expected = hf_tensor_shapes(cfg)
    for name, shape in expected.items():
        got = index.shape(name)
        if got != shape:
            raise ConversionError(f"{index.where[name]}: tensor {name!r} has shape {list(got)}, "
                                  f"but config.json implies {list(shape)}")
    family = family_of(cfg)
    ignored = IGNORED_SUFFIXES + family.ignored
    extra = [n for n in index.where if n not in expected and not n.endswith(ignored)]
    if extra:
        raise ConversionError(f"{index.where[extra[0]]}: unexpected tensor(s) {extra[:5]} for a {family.architecture} "
                              f"with this config.json (tie_word_embeddings={cfg.tie_word_embeddings})")


Blocks = Callable[[], Iterator[tuple[object, np.ndarray]]]
# A tensor outside the layers (the embedding, the head: 0.5 GB each in float32 for LLaMA-2-7B, 2 GB
# for LLaMA-3-8B's 128k vocabulary) is read in row ranges of about this many bytes.
PIECE_BYTES = 64 * 2**20


def _our_shape(to_ours, hf_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Our shape of a HF tensor of ``hf_shape``, traced: nothing is allocated."""
    return tuple(jax.eval_shape(to_ours, jax.ShapeDtypeStruct(hf_shape, np.float32)).shape)


def hf_param_blocks(index: SafetensorsIndex, cfg: LlamaConfig
                    ) -> Iterator[tuple[tuple[str, ...], tuple[int, ...], np.dtype, tuple[int, ...], Blocks]]:
    """For each of our parameters: (path, shape, dtype = param_dtype, chunk shape, blocks). Nothing
    is read until ``blocks()`` is iterated; it then reads one piece at a time and yields (where, array)
    pieces that tile the parameter on the chunk grid: ``where`` an index of ours (``i``: layer i of a
    stacked parameter, one HF tensor; a tuple of slices: a range of a global tensor's HF rows, or
    ``()``: all of it). The in-memory and the streaming conversion both fill from here."""
    dt = np.dtype(NP_DTYPES[cfg.param_dtype])
    hf_shapes = hf_tensor_shapes(cfg)

    def per_layer(suffix, to_ours):
        return lambda: ((i, to_ours(index.get(_layer_name(cfg, i, suffix))).astype(dt))
                        for i in range(cfg.num_layers))

    def rows(name, to_ours, shape, chunk):
        axis = [a for a in range(len(shape)) if chunk[a] != shape[a]]
        if not axis:
            return lambda: iter([((), to_ours(index.get(name)).astype(dt))])
        n, step = hf_shapes[name][0], chunk[axis[0]]

        def where(r0, r1):
            return tuple(slice(r0, r1) if a == axis[0] else slice(None) for a in range(len(shape)))

        return lambda: ((where(r, min(r + step, n)), to_ours(index.get(name, r, r + step)).astype(dt))
                        for r in range(0, n, step))

    for name, path, to_ours, _ in _global_specs(cfg):
        hf_shape = hf_shapes[name]
        shape = _our_shape(to_ours, hf_shape)
        step = max(1, PIECE_BYTES // (int(np.prod(hf_shape[1:])) * dt.itemsize))
        chunk = shape
        if step < hf_shape[0]:  # a row range of HF is a range of one axis of ours (the head: transposed)
            piece = _our_shape(to_ours, (step,) + hf_shape[1:])
            if sum(p != s for p, s in zip(piece, shape)) == 1 and step in piece:
                chunk = piece
        yield path, shape, dt, chunk, rows(name, to_ours, shape, chunk)
    for suffix, path, to_ours, _ in _layer_specs(cfg):
        layer = _our_shape(to_ours, hf_shapes[_layer_name(cfg, 0, suffix)])
        yield path, (cfg.num_layers,) + layer, dt, (1,) + layer, per_layer(suffix, to_ours)


def iter_hf_params(index: SafetensorsIndex, cfg: LlamaConfig) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """Yield (our path, our array in param_dtype), one parameter group at a time."""
    for path, shape, dt, _, blocks in hf_param_blocks(index, cfg):
        out = np.empty(shape, dt)
        for where, block in blocks():
            out[where] = block
            del block
        yield path, out


def _lookup(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def open_hf_checkpoint(hf_dir: str | os.PathLike, **runtime) -> tuple[LlamaConfig, SafetensorsIndex]:
    """The config (``runtime`` fields applied) and the index of a HF folder whose tensors were all
    checked against it (names and shapes, from the file headers: no weights are read)."""
    hf_cfg = read_hf_config(hf_dir)
    try:
        cfg = LlamaConfig.from_hf(hf_cfg, **runtime)
    except ValueError as e:
        raise ConversionError(f"{paths.join(hf_dir, 'config.json')}: {e}") from None
    # safetensors opens files by name: a folder in a bucket is read from a local copy of what is read here
    index = SafetensorsIndex(paths.local_copy(hf_dir, skip=_NOT_READ))
    validate_hf_checkpoint(index, cfg)
    return cfg, index


def load_hf_model(hf_dir: str | os.PathLike, mesh: jax.sharding.Mesh | None = None, rules=RULES,
                  **runtime) -> Llama:
    """A HF LlamaForCausalLM folder -> our ``Llama`` module, each parameter placed on the mesh
    (or the default device) as soon as it is read. ``runtime``: dtype, param_dtype, scan_layers..."""
    cfg, index = open_hf_checkpoint(hf_dir, **runtime)
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
    """Yield (HF name, HF array in ``dtype``) in HF's order (embedding, layers, final norm, head), one
    stacked group on host at a time (a fused tensor's parts together: NeoX's query_key_value)."""
    dt = NP_DTYPES[dtype]

    def groups(specs):  # (name, [our paths], to_hf): rows sharing a name are one fused tensor's parts
        out: dict[str, tuple[list, object]] = {}
        for name, path, _, to_hf in specs:
            out.setdefault(name, ([], to_hf))[0].append(path)
        return [(name, paths_, to_hf) for name, (paths_, to_hf) in out.items()]

    def one(name, paths_, to_hf):
        return name, np.ascontiguousarray(to_hf(*(to_host(_lookup(state, p)[...]) for p in paths_)).astype(dt))

    embedding, *rest = groups(_global_specs(cfg))
    yield one(*embedding)
    for suffix, paths_, to_hf in groups(_layer_specs(cfg)):
        stacked = [to_host(_lookup(state, p)[...]) for p in paths_]
        for i in range(cfg.num_layers):
            yield _layer_name(cfg, i, suffix), np.ascontiguousarray(to_hf(*(s[i] for s in stacked)).astype(dt))
        del stacked
    for g in rest:
        yield one(*g)


def save_hf_model(state: nnx.State, cfg: LlamaConfig, out_dir: str | os.PathLike, *, like: str | None = None,
                  dtype: str | None = None, max_shard_bytes: int = 5 * 2**30):
    """Write a HF folder transformers loads: sharded safetensors + index (one file when it
    fits), a complete config.json (``like``'s config updated with our architecture fields and
    the dtype), and the tokenizer files copied from ``like``. ``out_dir`` and ``like`` may be in cloud
    storage (docs/models.md#convert). Returns the folder's ``etils.epath.Path``.

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
    for stale in ("rope_parameters", "torch_dtype", "dtype", "rope_scaling", "rope_theta", "partial_rotary_factor",
                  "rotary_pct", "rotary_emb_base"):
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

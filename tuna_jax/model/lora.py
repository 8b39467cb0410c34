"""LoRA (Hu et al., 2021): low-rank adapters on the frozen model's projections, in PEFT's format.

Each targeted projection W of every layer runs as

    W' = W + (alpha / r) * A @ B,    A [in, r], B [r, out]

with ``in`` / ``out`` W's input and output dims flattened (q_proj: D -> H*Dh), the scale PEFT's
``lora_alpha / r``; B starts at zero, so a fresh adapter leaves the model exactly as it was.

The adapters are merged one layer at a time, inside the layer scan: a targeted parameter's value is
a :class:`LoraWeight` (W, A, B) whose ``[...]`` -- how ``model/llama.py`` reads every parameter --
returns that layer's W + s A B. So the model code runs unchanged, and W is never differentiated:
gradients, AdamW moments and checkpoints exist for the adapters (and ``lora.train_also``) only
(:class:`LoraRun`). A LoRA step therefore saves memory but not the layers' FLOPs, and offers no
dropout. :func:`save_adapter` writes what PEFT's ``save_pretrained`` writes; every command that
takes a model takes that folder (:func:`load_adapter_model` merges the adapters at load time).

The costs of merging, why not ``qwix``, and the adapter folder's files: docs/models.md#lora.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

from tuna_jax.io import paths
from tuna_jax.io.errors import InputError

# Our name -> (path in the params tree, how many of W's dims after the layers axis are its input).
TARGETS: dict[str, tuple[tuple[str, ...], int]] = {
    "q_proj": (("layers", "self_attn", "q_proj"), 1),
    "k_proj": (("layers", "self_attn", "k_proj"), 1),
    "v_proj": (("layers", "self_attn", "v_proj"), 1),
    "o_proj": (("layers", "self_attn", "o_proj"), 2),
    "gate_proj": (("layers", "mlp", "gate_proj"), 1),
    "up_proj": (("layers", "mlp", "up_proj"), 1),
    "down_proj": (("layers", "mlp", "down_proj"), 1),
}
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """rank r, alpha (scale alpha / r), the targeted projections, the parameters trained in full."""

    rank: int
    alpha: float
    targets: tuple[str, ...]
    train_also: tuple[str, ...] = ()

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, lc) -> "LoraSpec | None":
        """From the ``lora`` config section (``tuna_jax.config.LoraConfig``); None when rank is 0."""
        from tuna_jax.config import ConfigError

        if not lc.rank:
            return None
        if lc.dropout:
            raise ConfigError(f"lora.dropout={lc.dropout}: not supported: adapters are merged into each layer's "
                             f"weights inside the layer scan (tuna_jax/model/lora.py), where the per-token input "
                             f"LoRA dropout masks is not seen; set lora.dropout=0")
        for key, values in (("targets", lc.targets), ("train_also", lc.train_also)):
            if len(set(values)) != len(values):
                raise ConfigError(f"lora.{key}={values}: a name is given twice")
        if not lc.targets:
            raise ConfigError("lora.targets is empty: name the projections to adapt, e.g. [q_proj, v_proj]")
        return cls(lc.rank, float(lc.alpha), tuple(lc.targets), tuple(lc.train_also))

    def check(self, cfg, params: dict) -> None:
        """Every target exists in this model and every extra can be trained (one-line errors)."""
        for t in self.targets:
            if _get(params, TARGETS[t][0]) is None:
                raise InputError(f"lora.targets: {t}: this model has no {t} (a plain, ungated MLP has no gate_proj)")
        if "lm_head" in self.train_also and cfg.tie_word_embeddings:
            raise InputError("lora.train_also=[lm_head]: this model ties its LM head to the embedding; training it "
                             "would train the embedding too, which PEFT's adapter format cannot express")


# ---- the merged weight ---------------------------------------------------------------------------

@functools.partial(jax.tree_util.register_dataclass, data_fields=["w", "a", "b"], meta_fields=["scale"])
@dataclasses.dataclass(frozen=True)
class LoraWeight:
    """A targeted parameter as the model reads it: ``self[...]`` = W + scale * A @ B in float32.

    w [*lead, *W] (the frozen weight; ``lead`` the layers axis, or nothing inside the layer scan),
    a [*lead, in, r], b [*lead, r, out]. A pytree: the layer scan slices w, a and b together."""

    w: jax.Array
    a: jax.Array
    b: jax.Array
    scale: float

    @property
    def shape(self):
        return self.w.shape

    @property
    def dtype(self):
        return jnp.result_type(self.w.dtype, self.a.dtype)

    def merged(self) -> jax.Array:
        # HIGHEST: TPUs run float32 matmuls as bf16 passes by default; the delta must not be rounded so.
        delta = jnp.einsum("...ir,...ro->...io", self.a, self.b, precision=jax.lax.Precision.HIGHEST)
        return self.w.astype(self.dtype) + self.scale * delta.reshape(self.w.shape).astype(self.dtype)

    def __getitem__(self, key):
        return self.merged()[key]


def _get(tree: dict, path: tuple[str, ...]):
    for p in path:
        if not isinstance(tree, dict) or p not in tree:
            return None
        tree = tree[p]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> dict:
    """A copy of the nested dict ``tree`` with ``path`` set (only the dicts on the path are copied)."""
    out = dict(tree)
    out[path[0]] = value if len(path) == 1 else _set(tree.get(path[0], {}), path[1:], value)
    return out


def extra_paths(params: dict, spec: LoraSpec) -> list[tuple[str, ...]]:
    """Paths of the parameters ``spec.train_also`` trains in full: "norms" every parameter of a module
    whose name ends with "norm" (input/post-attention/final norms, q/k norms), "lm_head" the LM head."""
    out = []
    for path in flatten_dict(params):
        if ("norms" in spec.train_also and any(p.endswith("norm") for p in path[:-1])) or \
                ("lm_head" in spec.train_also and path == ("lm_head",)):
            out.append(path)
    return out


# ---- split, bind, merge --------------------------------------------------------------------------

def adapter_axes(cfg, spec: LoraSpec) -> dict[str, dict[str, tuple]]:
    """Logical axis names of each adapter, from its base weight's: A [layers, in, r] is split like W's
    first input dim, B [layers, r, out] like W's first output dim; the rank dim is replicated."""
    from flax import nnx

    from tuna_jax.model.llama import abstract_model

    state = nnx.state(abstract_model(cfg), nnx.Param)
    out = {}
    for t in spec.targets:
        path, n_in = TARGETS[t]
        var = state
        for p in path:
            var = var[p]
        axes = var.get_metadata()["logical_axes"]
        out[t] = {"a": (axes[0], axes[1], None), "b": (axes[0], None, axes[1 + n_in])}
    return out


def adapter_shapes(params: dict, spec: LoraSpec) -> dict[str, dict[str, tuple[int, ...]]]:
    out = {}
    for t in spec.targets:
        path, n_in = TARGETS[t]
        shape = _get(params, path).shape
        n_layers, d_in, d_out = shape[0], int(np.prod(shape[1:1 + n_in])), int(np.prod(shape[1 + n_in:]))
        out[t] = {"a": (n_layers, d_in, spec.rank), "b": (n_layers, spec.rank, d_out)}
    return out


def _shardings(cfg, spec: LoraSpec, shapes: dict, mesh):
    from tuna_jax.parallel import logical_to_spec

    if mesh is None:
        return None
    axes = adapter_axes(cfg, spec)
    return {t: {k: jax.sharding.NamedSharding(mesh, logical_to_spec(axes[t][k], shapes[t][k], mesh))
                for k in ("a", "b")} for t in spec.targets}


def init_adapters(cfg, params: dict, spec: LoraSpec, seed: int, mesh=None) -> dict:
    """Fresh float32 adapters {target: {"a": [N_l, in, r], "b": [N_l, r, out]}}, placed by the rules table.
    A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming_uniform(a=sqrt(5)) of lora_A), B = 0."""
    shapes = adapter_shapes(params, spec)

    def init():
        out = {}
        for i, t in enumerate(spec.targets):
            n, d_in, r = shapes[t]["a"]
            bound = 1.0 / np.sqrt(d_in)
            key = jax.random.fold_in(jax.random.key(seed), i)
            out[t] = {"a": jax.random.uniform(key, (n, d_in, r), jnp.float32, -bound, bound),
                      "b": jnp.zeros(shapes[t]["b"], jnp.float32)}
        return out

    return jax.jit(init, out_shardings=_shardings(cfg, spec, shapes, mesh))()


def split_for_training(cfg, params: dict, spec: LoraSpec, seed: int, mesh=None) -> tuple[dict, dict]:
    """(frozen, trainable) of a LoRA run. ``frozen`` is ``params`` as loaded (the base, in its
    param_dtype: bf16 halves it, it is never updated); ``trainable`` = {"adapters": fresh adapters,
    "params": float32 copies of the ``train_also`` parameters (nested like ``params``)}."""
    spec.check(cfg, params)
    extras: dict = {}
    for path in extra_paths(params, spec):  # a copy even in float32: the step donates it, the base must stay
        extras = _set(extras, path, jnp.array(_get(params, path), dtype=jnp.float32, copy=True))
    return params, {"adapters": init_adapters(cfg, params, spec, seed, mesh), "params": extras}


def abstract_split(cfg, params: dict, spec: LoraSpec, mesh=None) -> tuple[dict, dict]:
    """:func:`split_for_training` of abstract ``params`` (ShapeDtypeStructs), nothing computed: the same
    (frozen, trainable) trees as ShapeDtypeStructs placed as a run places them (``tuna-jax plan``)."""
    _, trainable = jax.eval_shape(functools.partial(split_for_training, cfg, spec=spec, seed=0), params)
    adapters = _shardings(cfg, spec, adapter_shapes(params, spec), mesh)
    place = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
    extras: dict = {}
    for path, x in flatten_dict(trainable["params"]).items():  # placed like the base parameter they copy
        extras = _set(extras, path, place(x, getattr(_get(params, path), "sharding", None)))
    return params, {"adapters": {t: {k: place(x, adapters and adapters[t][k]) for k, x in ab.items()}
                                 for t, ab in trainable["adapters"].items()}, "params": extras}


def combine(frozen: dict, trainable: dict, spec: LoraSpec) -> dict:
    """The params tree the model runs with: each target a :class:`LoraWeight`, each trained extra its
    trained value; the rest the frozen base."""
    tree = frozen
    for path, value in flatten_dict(trainable.get("params", {})).items():
        tree = _set(tree, path, value)
    for t, ab in trainable["adapters"].items():
        path = TARGETS[t][0]
        tree = _set(tree, path, LoraWeight(_get(frozen, path), ab["a"], ab["b"], spec.scale))
    return tree


def merge(frozen: dict, trainable: dict, spec: LoraSpec) -> dict:
    """Plain params with the adapters merged (W + s A B, rounded once to W's dtype): for export and
    inference."""
    def one(x):
        return x.merged().astype(x.w.dtype) if isinstance(x, LoraWeight) else x

    return jax.tree.map(one, combine(frozen, trainable, spec), is_leaf=lambda x: isinstance(x, LoraWeight))


class LoraBinder:
    """The ``ParamBinder`` of a LoRA run: ``bind(trainable)`` is the model with the adapters on the
    frozen base; ``bind_reference()`` the frozen base itself (``loss.reference=model``). ``frozen`` is
    an argument of the jitted step (a tracer there), never a closed-over constant."""

    def __init__(self, binder, frozen: dict, spec: LoraSpec):
        self.binder, self.frozen, self.spec = binder, frozen, spec

    @property
    def cfg(self):
        return self.binder.cfg

    def bind(self, trainable: dict):
        from flax import nnx

        tree = combine(self.frozen, trainable, self.spec)
        leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, LoraWeight))
        return nnx.merge(self.binder.graphdef, jax.tree.unflatten(self.binder.treedef, leaves))

    def bind_reference(self):
        return self.binder.bind(self.frozen)


class _WithFrozen:
    """A jitted function whose keyword argument ``frozen`` is bound: called, and lowered (ahead-of-time
    compiles), like the jitted step it stands for."""

    def __init__(self, fn, frozen: dict):
        self.fn, self.frozen = fn, frozen

    def __call__(self, *args):
        return self.fn(*args, frozen=self.frozen)

    def lower(self, *args):
        return self.fn.lower(*args, frozen=self.frozen)

    def trace(self, *args):
        return self.fn.trace(*args, frozen=self.frozen)


def check_run_config(cfg) -> None:
    """The LoRA settings of a training config, before any data or model is read (one-line errors)."""
    from tuna_jax.config import ConfigError

    if cfg.loss.reference == "model":
        if not cfg.lora.rank:
            raise ConfigError("loss.reference=model needs LoRA (lora.rank > 0): the frozen base is the reference. "
                              "Without LoRA, store the reference model's scores with the data: loss.reference=data")
        if cfg.train.mode != "ranking":
            raise ConfigError(f"loss.reference=model: train.mode={cfg.train.mode} has no ranking scores to "
                              f"compare with a reference (use train.mode=ranking)")
    if cfg.lora.rank:
        if not cfg.model.path:
            raise ConfigError(f"lora.rank={cfg.lora.rank} needs model.path: adapters are trained on, and exported "
                              f"against, a saved base model (a HF folder or params checkpoint)")
        LoraSpec.from_config(cfg.lora)


class LoraRun:
    """What ``train.py`` asks of a LoRA run: the frozen base and the trainable part, the jitted steps over
    them, and the exports.

    ``trainable`` = {"adapters": {target: {"a", "b"}}, "params": the ``train_also`` parameters}: the
    train state's params, so the optimizer state and the checkpoints hold only these."""

    def __init__(self, cfg, binder, params: dict, mesh, abstract: bool = False, peft_export: bool = True):
        self.spec = LoraSpec.from_config(cfg.lora)
        self.binder, self.base = binder, cfg.model.path
        if peft_export:  # the export's format, before any step (a PRM folder holds merged weights)
            check_peft(binder.cfg, self.spec)
        if abstract:  # ShapeDtypeStruct params: the run's shapes and placements only (`tuna-jax plan`)
            self.frozen, self.trainable = abstract_split(binder.cfg, params, self.spec, mesh)
        else:
            self.frozen, self.trainable = split_for_training(binder.cfg, params, self.spec, cfg.train.seed, mesh)

    def jit_steps(self, make_step: Callable, make_eval: Callable):
        """``(step_fn, eval_fn)`` called like train.py's (``step_fn(state, batch, *flag)``,
        ``eval_fn(params, batch)``): ``make_step(binder)`` / ``make_eval(binder)`` get a :class:`LoraBinder`
        over the frozen base, which every call passes to the jitted function (not donated, not
        differentiated)."""
        binder, spec = self.binder, self.spec

        def step(state, batch, *flag, frozen):
            return make_step(LoraBinder(binder, frozen, spec))(state, batch, *flag)

        def evaluate(params, batch, *, frozen):
            return make_eval(LoraBinder(binder, frozen, spec))(params, batch)

        return (_WithFrozen(jax.jit(step, donate_argnums=(0,)), self.frozen),
                _WithFrozen(jax.jit(evaluate), self.frozen))

    def merged(self, trainable: dict) -> dict:
        """The base's params with the adapters merged (on the device, sharded like the base)."""
        out = jax.tree.map(lambda x: x.sharding, self.frozen)
        return jax.jit(lambda f, t: merge(f, t, self.spec), out_shardings=out)(self.frozen, trainable)

    def merged_prm(self, params: dict) -> dict:
        """A PRM's {"backbone", "head"} with the backbone's adapters merged (the PRM folder holds full weights)."""
        return {"backbone": self.merged(params["backbone"]), "head": params["head"]}

    def save(self, out, trainable: dict, tokenizer_src=None):
        """The run's export: a PEFT adapter folder recording ``model.path`` as its base."""
        return save_adapter(out, trainable, self.spec, self.binder.cfg, self.base, tokenizer_src)


# ---- PEFT adapter folders ------------------------------------------------------------------------

def is_adapter_dir(path: str | os.PathLike) -> bool:
    return paths.is_file(paths.join(path, ADAPTER_CONFIG))


def _hf_rows(cfg) -> dict[tuple[str, ...], tuple]:
    """{our path: (HF tensor name, to_hf, to_ours, per_layer, fused)} from the converter's table of this
    family (``model/families.py``); ``fused``: the HF tensor holds several of ours (NeoX's q/k/v)."""
    import collections

    from tuna_jax.model import convert

    layer = convert._layer_specs(cfg)
    parts = collections.Counter(suffix for suffix, *_ in layer)
    out = {path: (suffix, to_hf, to_ours, True, parts[suffix] > 1) for suffix, path, to_ours, to_hf in layer}
    out.update({path: (name, to_hf, to_ours, False, False)
                for name, path, to_ours, to_hf in convert._global_specs(cfg)})
    return out


def _hf_name(cfg, row: tuple, i: int) -> str:
    """The HF tensor name of a row (layer i's for a per-layer row)."""
    from tuna_jax.model import convert

    return convert._layer_name(cfg, i, row[0]) if row[3] else row[0]


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0]  # "model.layers.3.self_attn.q_proj.weight" -> "...q_proj"


def peft_targets(cfg) -> dict[str, tuple]:
    """{our target: its HF row} for the targets this model has and PEFT can hold: a separate HF weight per
    layer that the converter writes as our [in, out] flattened and transposed (then PEFT's factors are
    lora_A = A^T, lora_B = B^T). Checked on a small copy of the architecture (the same code, tiny dims)."""
    from flax import nnx

    from tuna_jax.model.llama import abstract_model

    small = dataclasses.replace(cfg, hidden_size=6, intermediate_size=10, num_heads=2, num_kv_heads=1, head_dim=8,
                                num_layers=1, vocab_size=16)
    rows, state = _hf_rows(small), nnx.to_pure_dict(nnx.state(abstract_model(small), nnx.Param))
    full, out = _hf_rows(cfg), {}
    for t, (path, n_in) in TARGETS.items():
        row, var = rows.get(path), _get(state, path)
        if row is None or var is None or not row[3] or row[4] or not row[0].endswith(".weight"):
            continue
        shape = var.shape[1:]
        d_in, d_out = int(np.prod(shape[:n_in])), int(np.prod(shape[n_in:]))
        probe = np.arange(d_in * d_out)
        if np.array_equal(np.asarray(row[1](probe.reshape(shape))), probe.reshape(d_in, d_out).T):
            out[t] = full[path]
    return out


def _modules_to_save(cfg, spec: LoraSpec) -> list[str]:
    """PEFT's ``modules_to_save`` for ``spec.train_also``: "norm" (PEFT wraps every module whose name ends
    with it: every norm, as "norms" is here) and the LM head's HF module name."""
    out = ["norm"] if "norms" in spec.train_also else []
    if "lm_head" in spec.train_also:
        out.append(_module(_hf_rows(cfg)[("lm_head",)][0]))
    return out


def check_peft(cfg, spec: LoraSpec) -> None:
    """Refuse, before training, a spec whose adapters would have no PEFT form for this model."""
    head = _hf_rows(cfg).get(("lm_head",))
    if "lm_head" in spec.train_also and head is not None and head[0] != "lm_head.weight":
        raise InputError(f"lora.train_also=[lm_head]: this model's HF checkpoint calls its LM head {head[0]!r}, and "
                         f"transformers versions name that module differently, so PEFT's modules_to_save cannot "
                         f"name it reliably; leave lm_head out of lora.train_also for this model")
    missing = [t for t in spec.targets if t not in peft_targets(cfg)]
    if missing:
        raise InputError(f"lora.targets: {missing}: this model's Hugging Face checkpoint has no separate weight per "
                         f"layer for them (e.g. GPT-NeoX's fused query_key_value), so the adapters would have no "
                         f"PEFT form; target {sorted(peft_targets(cfg))} instead")


def save_adapter(out: str | os.PathLike, trainable: dict, spec: LoraSpec, cfg, base: str | None,
                 tokenizer_src: str | os.PathLike | None = None):
    """Write ``trainable`` ({"adapters", "params"}) as a PEFT adapter folder (docs/models.md#lora) recording
    ``base`` (the HF folder or params checkpoint trained on) as ``base_model_name_or_path``. Every host
    joins the gathers; host 0 writes. Returns the folder's resolved path."""
    from safetensors.numpy import save_file

    from tuna_jax.model.convert import copy_tokenizer_files
    from tuna_jax.parallel import to_host

    check_peft(cfg, spec)
    targets, rows, saved = peft_targets(cfg), _hf_rows(cfg), _modules_to_save(cfg, spec)
    tensors: dict[str, np.ndarray] = {}
    for t, ab in trainable["adapters"].items():
        a, b = to_host(ab["a"]).astype(np.float32), to_host(ab["b"]).astype(np.float32)
        for i in range(a.shape[0]):
            name = PEFT_PREFIX + _module(_hf_name(cfg, targets[t], i))
            tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(a[i].T)  # [r, in]
            tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(b[i].T)  # [out, r]
    for path, value in flatten_dict(trainable.get("params", {})).items():
        row = rows[path]
        host = to_host(value).astype(np.float32)
        for i in range(host.shape[0] if row[3] else 1):
            key = _hf_name(cfg, row, i)
            if not any(_module(key).endswith(m) for m in saved):
                raise InputError(f"lora.train_also: {key} is not matched by PEFT's modules_to_save {saved}")
            tensors[PEFT_PREFIX + key] = np.ascontiguousarray(row[1](host[i] if row[3] else host))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.rank, "lora_alpha": spec.alpha,
              "lora_dropout": 0.0, "target_modules": sorted(_module(targets[t][0]).rsplit(".", 1)[-1]
                                                            for t in spec.targets),
              "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "init_lora_weights": True, "inference_mode": True, "modules_to_save": saved or None,
              "base_model_name_or_path": None if base is None else str(paths.resolve(base)),
              "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}, "revision": None}
    if jax.process_index() != 0:
        return paths.resolve(out)
    with paths.staged_dir(out) as local:
        save_file(tensors, os.path.join(local, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(local, ADAPTER_CONFIG), "w") as fh:
            fh.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
        with open(os.path.join(local, "config.json"), "w") as fh:
            fh.write(json.dumps(cfg.to_hf(), indent=2, sort_keys=True) + "\n")
        if tokenizer_src is not None:
            copy_tokenizer_files(tokenizer_src, local)
    return paths.resolve(out)


# Keys of adapter_config.json that select a LoRA variant this module does not compute, with their plain value.
_PLAIN = {"use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "bias": "none", "layers_to_transform": None,
          "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "layer_replication": None,
          "target_parameters": None, "trainable_token_indices": None, "exclude_modules": None}


def read_adapter_config(path: str | os.PathLike) -> dict:
    """An adapter folder's ``adapter_config.json``, checked: plain LoRA (no rsLoRA, DoRA, per-layer ranks,
    ...; an error names the key), r a positive integer, lora_alpha a number, target_modules a list."""
    from tuna_jax.io.jsonl import read_json

    where = paths.join(path, ADAPTER_CONFIG)
    doc = read_json(where)
    if not isinstance(doc, dict):
        raise InputError(f"{where}: expected a JSON object")
    if doc.get("peft_type") != "LORA":
        raise InputError(where, "peft_type", f"{doc.get('peft_type')!r}: only LORA adapters are supported")
    for key, plain in _PLAIN.items():
        if doc.get(key) not in (None, plain):
            raise InputError(where, key, f"{doc[key]!r}: not supported (tuna-jax computes plain LoRA)")
    r, alpha = doc.get("r"), doc.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1 or isinstance(alpha, bool) \
            or not isinstance(alpha, (int, float)):
        raise InputError(where, "r", f"r={r!r}, lora_alpha={alpha!r}: expected a positive integer and a number")
    for key in ("target_modules", "modules_to_save"):
        value = doc.get(key)
        if (value is not None or key == "target_modules") and \
                (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
            raise InputError(where, key, f"{value!r}: expected a list of module names")
    return doc


def adapter_spec(doc: dict, cfg, where: str = ADAPTER_CONFIG) -> LoraSpec:
    """The spec of a checked ``adapter_config.json`` for a model of config ``cfg``: its HF module names
    mapped to our targets and extras."""
    by_module = {_module(row[0]).rsplit(".", 1)[-1]: t for t, row in peft_targets(cfg).items()}
    unknown = [m for m in doc["target_modules"] if m not in by_module]
    if unknown or not doc["target_modules"]:
        raise InputError(where, "target_modules", f"{unknown or '[]'}: this model's LoRA targets are "
                         f"{sorted(by_module)}")
    extras = []
    for m in doc.get("modules_to_save") or []:
        lm_head = ("lm_head",) in _hf_rows(cfg) and m == _module(_hf_rows(cfg)[("lm_head",)][0])
        if m != "norm" and not lm_head:
            raise InputError(where, "modules_to_save", f"{m!r}: only 'norm' (every norm) and the LM head are supported")
        extras.append("norms" if m == "norm" else "lm_head")
    return LoraSpec(doc["r"], float(doc["lora_alpha"]), tuple(by_module[m] for m in doc["target_modules"]),
                    tuple(extras))


def read_adapter(path: str | os.PathLike, cfg, params: dict, mesh=None) -> tuple[LoraSpec, dict]:
    """(spec, trainable) of an adapter folder in our layout, for the base ``params`` of config ``cfg``,
    placed like the adapters of a training run (adapters by the rules table, extras like their base
    parameter). Every tensor is checked against the base's shapes; a missing or extra one is an error."""
    from safetensors.numpy import load_file

    spec = adapter_spec(read_adapter_config(path), cfg, paths.join(path, ADAPTER_CONFIG))
    spec.check(cfg, params)
    where = paths.join(path, ADAPTER_WEIGHTS)
    if not paths.is_file(where):
        raise InputError(f"{where}: missing (an adapter folder holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    tensors = load_file(paths.local_copy(where) if paths.is_remote(where) else os.fspath(where))
    targets, rows, shapes = peft_targets(cfg), _hf_rows(cfg), adapter_shapes(params, spec)

    def take(key, shape):
        if key not in tensors:
            raise InputError(where, key, "missing")
        got = tensors.pop(key)
        if tuple(got.shape) != tuple(shape):
            raise InputError(where, key, f"shape {list(got.shape)}, but the base model implies {list(shape)}")
        return got.astype(np.float32)

    shardings = _shardings(cfg, spec, shapes, mesh)
    place = lambda x, s: jax.device_put(x, s) if s is not None else jnp.asarray(x)  # noqa: E731
    adapters = {}
    for t in spec.targets:
        n, d_in, r = shapes[t]["a"]
        d_out = shapes[t]["b"][2]
        names = [PEFT_PREFIX + _module(_hf_name(cfg, targets[t], i)) for i in range(n)]
        a = np.stack([take(f"{name}.lora_A.weight", (r, d_in)).T for name in names])
        b = np.stack([take(f"{name}.lora_B.weight", (d_out, r)).T for name in names])
        adapters[t] = {"a": place(a, shardings and shardings[t]["a"]), "b": place(b, shardings and shardings[t]["b"])}
    extras: dict = {}
    for p in extra_paths(params, spec):
        row, base = rows[p], _get(params, p)
        block = jax.ShapeDtypeStruct(base.shape[1:] if row[3] else base.shape, jnp.float32)
        hf_shape = jax.eval_shape(row[1], block).shape
        blocks = [row[2](take(PEFT_PREFIX + _hf_name(cfg, row, i), hf_shape))
                  for i in range(base.shape[0] if row[3] else 1)]
        value = np.stack(blocks) if row[3] else blocks[0]
        extras = _set(extras, p, place(value, base.sharding if mesh is not None else None))
    if tensors:
        raise InputError(where, sorted(tensors)[0], f"unexpected tensor ({len(tensors)} in all) for this adapter "
                         f"config and base model")
    return spec, {"adapters": adapters, "params": extras}


def load_adapter_model(path: str | os.PathLike, mesh=None, base: str | None = None, **runtime):
    """An adapter folder -> ``Llama`` with the adapters merged (W + s A B, rounded once to param_dtype):
    the base named by ``adapter_config.json`` (or ``base``) loaded with ``tuna_jax.model.load_model``
    (a HF folder, a params checkpoint, or another adapter folder), then merged on the device."""
    from flax import nnx

    from tuna_jax.model import load_model
    from tuna_jax.model.params import ParamBinder

    doc = read_adapter_config(path)
    base = base or doc.get("base_model_name_or_path")
    config = paths.join(path, ADAPTER_CONFIG)
    if not base:
        raise InputError(config, "base_model_name_or_path", "not set: name the base model the adapter was trained on")
    if not paths.exists(base):
        raise InputError(config, "base_model_name_or_path",
                         f"{base}: no such folder (the adapter needs the base model it was trained on)")
    model = load_model(base, mesh, **runtime)
    binder = ParamBinder(model.cfg)
    params = binder.to_pure(model)
    del model
    spec, trainable = read_adapter(path, binder.cfg, params, mesh)
    out = None if mesh is None else jax.tree.map(lambda x: x.sharding, params)
    merged = jax.jit(lambda p, t: merge(p, t, spec), out_shardings=out, donate_argnums=(0,))(params, trainable)
    return nnx.merge(binder.graphdef, jax.tree.unflatten(binder.treedef, jax.tree.leaves(merged)))


def adapter_base(path: str | os.PathLike) -> str | None:
    """The model an adapter folder was trained on, followed through adapter folders trained on adapter
    folders to the first HF folder or params checkpoint (None when the config names none)."""
    seen = set()
    while is_adapter_dir(path) and str(path) not in seen:
        seen.add(str(path))
        path = read_adapter_config(path).get("base_model_name_or_path")
        if not path:
            return None
    return None if str(path) in seen else str(path)


def export_peft(src: str | os.PathLike, out: str | os.PathLike, base: str | None = None):
    """Copy adapter folder ``src`` as a plain PEFT folder (``adapter_config.json``, ``adapter_model.safetensors``,
    the tokenizer files) into ``out``, ``base_model_name_or_path`` set to ``base`` when given (e.g. the HF
    folder or hub id the adapter will be loaded onto). Checked as :func:`read_adapter_config` reads it."""
    from tuna_jax.model.convert import copy_tokenizer_files

    doc = read_adapter_config(src)
    if base is not None:
        doc["base_model_name_or_path"] = str(base)
    if not paths.is_file(paths.join(src, ADAPTER_WEIGHTS)):
        raise InputError(f"{paths.join(src, ADAPTER_WEIGHTS)}: missing")
    paths.makedirs(out)
    paths.copy_file(paths.join(src, ADAPTER_WEIGHTS), paths.join(out, ADAPTER_WEIGHTS))
    paths.write_atomic(paths.join(out, ADAPTER_CONFIG), json.dumps(doc, indent=2, sort_keys=True) + "\n")
    copy_tokenizer_files(src, out)
    return paths.resolve(out)

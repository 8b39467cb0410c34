"""Run configuration: dataclass schemas, YAML files, ``base:`` includes and dotted overrides.

A config file is YAML with the sections below; ``base: other.yaml`` (a path relative to the
file, or a list of them) is merged first, so a stage config names a model preset and changes
only what the stage changes. Command-line overrides are ``section.key=value`` (the value parsed
as YAML: ``train.global_batch=8``, ``optim.lr=1e-5``, ``data.eval=null``).

Unknown keys are errors, with the closest valid key suggested: a typo must not silently fall
back to a default on a run that costs real money.

One config system. Every YAML config of the project (``train``, ``eval run``, the pipeline) is read by
:func:`read_yaml` and checked by :func:`build` against its dataclass: each value must have its field's
type (``train.global_batch=eight`` is an error, not a traceback), every number must be finite and in the
range its schema's table gives (:data:`LIMITS` here; ``optim.lr=nan``, ``train.save_every=0`` are errors),
strings among their :data:`CHOICES`, and a field without a default must be given. Each error is one
line naming where the value was written (``FILE:LINE``, or ``command line`` for an override) and the
dotted key. A new field slots in by its annotation and one row in the tables; other schemas (the eval
config in ``eval/run.py``) pass their own tables to :func:`load` / :func:`build`.

Hand-written rather than a typed-config library (pydantic or OmegaConf would be a new dependency): the schemas
stay plain dataclasses, errors can name the YAML line (which a validator of dicts never sees), and the
whole checker is a hundred lines for the five kinds of value the configs hold.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from typing import Any, Sequence

import yaml

from tuna_jax.io.errors import InputError


class ConfigError(InputError):
    """A bad config file or override; the message names the place (FILE:LINE or the command line) and key."""


@dataclasses.dataclass(frozen=True)
class Limit:
    """The range a number must lie in: ``lo`` / ``hi`` (None: unbounded), each bound open or closed."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def allows(self, v: float) -> bool:
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)

    def __str__(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        return f"{'<' if self.hi_open else '<='} {self.hi:g}" if self.hi is not None else "any number"


def at_least(lo: float) -> Limit:
    return Limit(lo)


def above(lo: float) -> Limit:
    return Limit(lo, lo_open=True)


def between(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Limit:
    return Limit(lo, hi, lo_open, hi_open)


@dataclasses.dataclass
class ModelConfig:
    path: str | None = None  # HF folder or tuna-jax params checkpoint; None: random init from `hf_config`
    hf_config: dict | None = None  # a HF config.json dict, for random init (tests, benchmarks)
    tokenizer: str | None = None  # default: the model folder
    dtype: str = "float32"  # compute dtype; bfloat16 on accelerators
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"  # none | full | dots | dots_no_batch | nothing_saveable
    attention: str = "auto"  # auto | einsum | xla | cudnn | splash (model/attention.py)


@dataclasses.dataclass
class DataConfig:
    train: str | list | None = None  # JSON/JSONL/hf:/tfds: source, or a list of them (concatenated)
    max_examples: int | None = None  # a seeded random subset of the training records (the paper's Tuna_cp-13K / 39K
    # are the first / last instructions: `select:` in the pipeline, data/select.py)
    eval: str | None = None  # held-out set; or eval_fraction of train
    eval_fraction: float = 0.0
    format: str = "auto"  # ranking formats: auto | native | reference | probabilistic | contextual
    max_len: int = 512
    num_candidates: int = 4
    truncate: str = "left_prompt"  # left_prompt | drop; the response's EOS is never cut
    on_error: str = "raise"  # raise | skip (counted and reported)
    beta: float = 1.3  # length exponent when importing probabilistic-ranking files
    rescore_beta: float | None = None  # score the teacher's records again, logprobs / num_tokens ** this (Table 5)
    pad_to_multiple: int = 64  # batch length = longest in the global batch, rounded up; 0: one shape per run
    layout: str = "auto"  # auto | padded | prefix_shared | packed (data/layouts.py); all give the same losses
    row_len: int = 0  # packed row length in tokens (>= max_len); 0: max_len. Longer groups are split, prompt repeated
    shape_buckets: int = 4  # at most this many batch shapes (compiles) per run, planned from the data; 1: one shape
    # block table for the xla attention to skip masked blocks (prefix_shared/packed); 0: dense
    attention_block: int = 64
    add_bos: bool = True
    add_eos: bool = True
    eos_as_bos: bool = False  # the reference code's quirk: </s> used as BOS


@dataclasses.dataclass
class OptimConfig:
    lr: float = 1e-5
    warmup_steps: int = 2
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    end_lr_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # global-norm clip; 0 disables


@dataclasses.dataclass
class LossConfig:
    form: str = "paper"  # paper | reference | listmle | infonca | dpo_pairs | dpo_best | lipo_lambda (losses.py)
    margin: float = 0.1
    beta: float = 1.0  # score scale of listmle, infonca, dpo_*, lipo_lambda (margin is for paper/reference)
    score: str = "mean"  # mean: v = log-prob / tokens (Tuna) | sum: summed log-probs (the DPO convention)
    reference: str | None = None  # "data": s = v - v_ref from the records' ref_logprob_sum/ref_num_tokens; None: s = v
    # "model" (with LoRA): v_ref from the frozen base, adapters off, in the same step (no file, no second model)
    mle_weight: float = 1.0  # lambda
    rank_weight: float = 1.0  # the ranking term's weight; 0 trains the MLE-only control of an experiment
    mle_target: str = "original"  # original | best | all (the candidates) | every (original + candidates: Alpaca-Mul)
    chunk: int = 0  # tokens per vocabulary-projection chunk; 0: all at once if they fit logits_budget_mb
    # float32 logits one projection pass may hold (memory stays flat in V); raise on big GPUs
    logits_budget_mb: int = 256


@dataclasses.dataclass
class TrainConfig:
    mode: str = "ranking"  # sft | ranking | prm (a reward head trained on rankings, model/reward.py)
    output_dir: str = "runs/default"
    epochs: int = 1
    max_steps: int | None = None  # stop earlier than `epochs`
    global_batch: int = 128  # prompts per optimizer step, over all hosts
    grad_accum: int = 1  # micro-batches per step (global_batch must divide)
    seed: int = 0
    mesh: str | None = None  # "DATA,FSDP,TENSOR", one may be -1; default all devices on fsdp
    log_every: int = 1
    eval_every: int = 0  # 0: only at the end (when there is an eval set)
    save_every: int = 100
    keep_checkpoints: int = 2
    async_checkpoints: bool = True
    export: bool = True  # write a params-only export to output_dir/final at the end
    progress: bool = True
    tensorboard: bool = True  # when tensorboardX is installed
    wandb: bool = False  # also log to Weights & Biases (pip install wandb; WANDB_MODE=offline logs to disk only)
    wandb_project: str = "tuna-jax"  # the W&B project (WANDB_ENTITY picks the team)
    run_name: str | None = None  # the W&B run's name (default: output_dir's last folder)
    compile_cache: str | bool = True  # XLA's persistent cache: a folder; true: JAX's if set, else ~/.cache/tuna-jax/xla


@dataclasses.dataclass
class LoraConfig:
    """LoRA (``model/lora.py``): only rank-``rank`` adapters on the frozen base's projections are trained."""

    rank: int = 0  # 0: off (every parameter is trained)
    alpha: float = 8.0  # the adapters' scale is alpha / rank (PEFT's lora_alpha)
    dropout: float = 0.0  # only 0: adapters are merged per layer, where LoRA's per-token input dropout has no place
    targets: list[str] = dataclasses.field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    train_also: list[str] = dataclasses.field(default_factory=list)  # norms | lm_head: trained in full too


@dataclasses.dataclass
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    name: str = ""
    description: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    ("model", "dtype"): ("float32", "bfloat16"),
    ("model", "param_dtype"): ("float32", "bfloat16"),
    ("model", "remat_policy"): ("none", "full", "dots", "dots_no_batch", "nothing_saveable"),
    ("model", "attention"): ("auto", "einsum", "xla", "cudnn", "splash"),
    ("data", "layout"): ("auto", "padded", "prefix_shared", "packed"),
    ("data", "truncate"): ("left_prompt", "drop"),
    ("data", "on_error"): ("raise", "skip"),
    ("data", "format"): ("auto", "native", "reference", "probabilistic", "contextual"),
    ("optim", "schedule"): ("cosine", "linear", "constant"),
    ("loss", "form"): ("paper", "reference", "listmle", "infonca", "dpo_pairs", "dpo_best", "lipo_lambda"),
    ("loss", "score"): ("mean", "sum"),
    ("loss", "reference"): (None, "data", "model"),
    ("loss", "mle_target"): ("original", "best", "all", "every"),
    ("train", "mode"): ("sft", "ranking", "prm"),
    ("lora", "targets"): ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    ("lora", "train_also"): ("norms", "lm_head"),
}


# Every number a config holds is range-checked against a table like this one (a field missing here is
# still type-checked and, when a float, must be finite; ``tests/unit/test_config.py`` asks every number of
# ``Config`` to have a row, so a new field states its range where it is added).
LIMITS = {
    ("data", "max_examples"): at_least(1),
    ("data", "eval_fraction"): between(0, 1, hi_open=True),
    ("data", "max_len"): at_least(2),
    ("data", "num_candidates"): at_least(1),
    ("data", "beta"): at_least(0),
    ("data", "rescore_beta"): at_least(0),
    ("data", "pad_to_multiple"): at_least(0),
    ("data", "row_len"): at_least(0),
    ("data", "shape_buckets"): at_least(1),
    ("data", "attention_block"): at_least(0),
    ("optim", "lr"): at_least(0),  # 0: a run that measures losses without moving the params (tests do)
    ("optim", "warmup_steps"): at_least(0),
    ("optim", "end_lr_ratio"): between(0, 1),
    ("optim", "b1"): between(0, 1, hi_open=True),
    ("optim", "b2"): between(0, 1, hi_open=True),
    ("optim", "eps"): above(0),
    ("optim", "weight_decay"): at_least(0),
    ("optim", "grad_clip"): at_least(0),
    ("loss", "margin"): at_least(0),
    ("loss", "beta"): above(0),
    ("loss", "mle_weight"): at_least(0),
    ("loss", "rank_weight"): at_least(0),
    ("loss", "chunk"): at_least(0),
    ("loss", "logits_budget_mb"): at_least(1),
    ("train", "epochs"): at_least(1),
    ("train", "max_steps"): at_least(1),
    ("train", "global_batch"): at_least(1),
    ("train", "grad_accum"): at_least(1),
    ("train", "seed"): at_least(0),
    ("train", "log_every"): at_least(1),
    ("train", "eval_every"): at_least(0),
    ("train", "save_every"): at_least(1),
    ("train", "keep_checkpoints"): at_least(1),
    ("lora", "rank"): at_least(0),
    ("lora", "alpha"): above(0),
    ("lora", "dropout"): between(0, 1, hi_open=True),
}


# ---- reading YAML: every mapping remembers where its keys were written ------------------------------

OVERRIDE = "command line"  # the place named for a value set by a section.key=value override


class Node(dict):
    """A config mapping that remembers where it (``where``) and each of its keys (``where_of(key)``) were
    written: ``"FILE:LINE"``, or ``"command line"`` for an override. Error messages point there."""

    def __init__(self, *args, where: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.where = where
        self.origins: dict = {}

    def where_of(self, key) -> str:
        return self.origins.get(key, self.where)


class _DuplicateKey(Exception):
    def __init__(self, key, line: int, first: int):
        self.key, self.line, self.first = key, line, first


class _Loader(yaml.SafeLoader):
    source = ""


def _construct_mapping(loader: _Loader, node) -> Node:
    loader.flatten_mapping(node)
    m = Node(where=f"{loader.source}:{node.start_mark.line + 1}")
    lines: dict = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if key in m:  # PyYAML would silently keep the last one
            raise _DuplicateKey(key, line, lines[key])
        m[key] = loader.construct_object(value_node, deep=True)
        lines[key] = line
        m.origins[key] = f"{loader.source}:{line}"
    return m


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

# Mappings taken whole, never merged key by key with a base file's (a HF config.json dict).
_OPAQUE = {"hf_config"}


def _merge(base: Node, top: Node) -> Node:
    out = Node(base, where=top.where or base.where)
    out.origins = dict(base.origins)
    for k, v in top.items():
        both = isinstance(v, Node) and isinstance(out.get(k), Node) and k not in _OPAQUE
        out[k] = _merge(out[k], v) if both else v
        out.origins[k] = top.where_of(k)
    return out


def parse_yaml(text: str, source: str) -> Node:
    """One YAML document of config ``source`` (a name for messages) as a :class:`Node`; an empty document is
    an empty Node. Bad YAML, a key given twice or a document that is not a mapping is a ConfigError."""
    loader = _Loader(text)
    loader.source = source
    try:
        raw = loader.get_single_data()
    except _DuplicateKey as e:
        raise ConfigError(f"{source}:{e.line}: key {e.key!r} given twice (first at line {e.first})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    finally:
        loader.dispose()
    if raw is None:
        return Node(where=f"{source}:1")
    if not isinstance(raw, Node):
        raise ConfigError(f"{source}:1: a config file must be a mapping of sections, got {type(raw).__name__}")
    return raw


def read_yaml(path: str | os.PathLike, _seen: tuple = ()) -> Node:
    """A config file with its ``base:`` chain merged in (the file's own keys win)."""
    from tuna_jax.io import paths
    from tuna_jax.io.jsonl import read_text

    path = os.fspath(path)
    key = str(paths.resolve(path))
    if key in _seen:
        raise ConfigError(f"{path}: 'base:' includes form a cycle")
    if not paths.is_file(path):
        raise ConfigError(f"{path}: no such config file")
    raw = parse_yaml(read_text(path, what="config file"), path)
    bases = raw.pop("base", None) or []
    merged = Node(where=raw.where)
    for b in [bases] if isinstance(bases, str) else bases:
        merged = _merge(merged, read_yaml(paths.join(paths.parent(path), b), _seen + (key,)))
    return _merge(merged, raw)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: write section.key=value, e.g. optim.lr=1e-5")
    key, value = text.split("=", 1)
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    # YAML 1.1 reads 1e-5 as a string; numbers are what users mean.
    if isinstance(parsed, str):
        try:
            parsed = float(parsed) if any(c in parsed for c in ".eE") else int(parsed)
        except ValueError:
            pass
    return key.strip().split("."), parsed


def apply_overrides(raw: Node, overrides: Sequence[str]) -> None:
    """Sets each ``section.key=value`` in ``raw`` (sections are made as needed), remembered as set on the
    command line."""
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = Node(where=OVERRIDE)
            elif not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {k} is not a section")
            elif not isinstance(child, Node):
                child = Node(child, where=node.where_of(k))
            node[k] = child
            node = child
        node[keys[-1]] = value
        node.origins[keys[-1]] = OVERRIDE


# ---- building typed dataclasses ---------------------------------------------------------------------

def _at(where: str, message: str) -> ConfigError:
    return ConfigError(f"{where}: {message}" if where else message)


def _plain(value):
    """Nodes as plain dicts (a built config holds no Node: it is dumped to YAML and compared)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _type_name(tp) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
            dict: "a mapping"}.get(typing.get_origin(tp) or tp, getattr(tp, "__name__", str(tp)))


class _Schema:
    """What :func:`build` checks against: the limits and choices tables, fields the file may not set."""

    def __init__(self, limits: dict, choices: dict, hidden: Sequence[str]):
        self.limits, self.choices, self.hidden = limits, choices, tuple(hidden)


def _check(value, tp, where: str, full: str, table_key: tuple, schema: _Schema):
    """``value`` checked against the annotation ``tp`` (and the tables at ``table_key``); returns it typed."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        fits = [a for a in inner if isinstance(value, (typing.get_origin(a) or a) if not dataclasses.is_dataclass(a)
                                               else dict)]
        if len(inner) > 1 and not fits:
            raise _at(where, f"{full}={value!r}: expected {' or '.join(_type_name(a) for a in inner)}")
        return _check(value, (fits or inner)[0], where, full, table_key, schema)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _at(where, f"{full} must be a mapping of keys (a section), got {value!r}")
        node = value if isinstance(value, Node) else Node(value, where=where)
        return build(tp, node, full, _schema=schema)
    if tp is list or origin is list:
        if not isinstance(value, list):
            raise _at(where, f"{full}={value!r}: expected a list")
        if not args:
            return _plain(value)
        return [_check(v, args[0], where, f"{full}[{i}]", table_key, schema) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise _at(where, f"{full}={value!r}: expected a mapping")
        return _plain(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise _at(where, f"{full}={value!r}: expected true or false")
    elif tp is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _at(where, f"{full}={value!r}: expected an integer")
    elif tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _at(where, f"{full}={value!r}: expected a number")
        value = float(value)
        if not math.isfinite(value):
            raise _at(where, f"{full}={value!r}: must be a finite number")
    elif tp is str:
        if not isinstance(value, str):
            raise _at(where, f"{full}={value!r}: expected a string (quote it)")
    elif tp is not Any:
        raise TypeError(f"config field {full}: unsupported type {tp}")  # a schema bug, not a user error
    choices = schema.choices.get(table_key)
    if choices is not None and value not in choices:
        raise _at(where, f"{full}={value!r}: choose one of {', '.join(map(str, choices))}")
    limit = schema.limits.get(table_key)
    if limit is not None and not limit.allows(value):
        raise _at(where, f"{full}={value!r}: must be {limit}")
    return value


def build(cls, values: Node, section: str = "", *, limits: dict | None = None, choices: dict | None = None,
          hidden: Sequence[str] = (), given: dict | None = None, _schema: _Schema | None = None):
    """The dataclass ``cls`` from a config mapping: every key known, every value of its field's type and in
    its range (``limits``, default :data:`LIMITS`) or among its choices (``choices``, default
    :data:`CHOICES`; both keyed by ``(section, key)``), every field without a default given. ``hidden``:
    fields the program sets, not the file (``given``: their values, where they have no default). A problem is a
    ConfigError naming where the value was written and the dotted key."""
    schema = _schema or _Schema(LIMITS if limits is None else limits, CHOICES if choices is None else choices,
                                hidden)
    if not isinstance(values, Node):
        values = Node(values)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in schema.hidden}
    table_section = re.sub(r"\[\d+\]", "", section)
    prefix = f"{section}." if section else ""
    kwargs = {}
    for key, value in values.items():
        where = values.where_of(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise _at(where, f"unknown config key {prefix}{key}{hint}; valid keys: {', '.join(fields)}")
        kwargs[key] = _check(value, hints[key], where, f"{prefix}{key}", (table_section, key), schema)
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise _at(values.where, f"{section or 'the config'} needs {', '.join(missing)}")
    return cls(**{**(given or {}), **kwargs})


def load(cls, path: str | os.PathLike | None, overrides: Sequence[str] = (), **tables) -> tuple[Any, Node]:
    """``(config, raw)``: the dataclass ``cls`` from a YAML file (or nothing: the defaults) and
    ``section.key=value`` overrides, checked by :func:`build` (``tables``: its limits / choices / hidden).
    ``raw`` is the merged :class:`Node` tree, for checks that name a key's place. An override naming a
    ``.yaml`` file (a topology preset: ``configs/topologies/v5e-16.yaml``) merges that file where it stands."""
    raw = read_yaml(path) if path else Node(where="config")
    for item in overrides:
        if "=" not in item and item.endswith((".yaml", ".yml")):
            raw = _merge(raw, read_yaml(item))
        else:
            apply_overrides(raw, [item])
    return build(cls, raw, **tables), raw


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Config:
    """A training config: file (or the defaults) + ``section.key=value`` overrides -> Config."""
    return load(Config, path, overrides)[0]

"""Run configuration: dataclass schemas, YAML files, ``base:`` includes and dotted overrides.

A config file is YAML with the sections below; ``base: other.yaml`` (a path relative to the
file, or a list of them) is merged first, so a stage config names a model preset and changes
only what the stage changes. Command-line overrides are ``section.key=value`` (the value parsed
as YAML: ``train.global_batch=8``, ``optim.lr=1e-5``, ``data.eval=null``).

Unknown keys are errors, with the closest valid key suggested: a typo must not silently fall
back to a default on a run that costs real money.
"""
from __future__ import annotations

import dataclasses
import difflib
import pathlib
from typing import Any, Sequence

import yaml


class ConfigError(ValueError):
    """A bad config file or override; the message names the file and key."""


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
    max_examples: int | None = None  # a seeded random subset of the training records (Tuna_cp-13K ...)
    eval: str | None = None  # held-out set; or eval_fraction of train
    eval_fraction: float = 0.0
    format: str = "auto"  # ranking formats: auto | native | reference | probabilistic | contextual
    max_len: int = 512
    num_candidates: int = 4
    truncate: str = "left_prompt"  # left_prompt | drop; the response's EOS is never cut
    on_error: str = "raise"  # raise | skip (counted and reported)
    beta: float = 1.3  # length exponent when importing probabilistic-ranking files
    pad_to_multiple: int = 64  # batch length = longest in the global batch, rounded up; 0: one shape per run
    layout: str = "packed"  # padded | prefix_shared | packed (data/layouts.py); all give the same losses
    row_len: int = 0  # packed row length in tokens (>= max_len); 0: max_len. Longer groups are split, prompt repeated
    attention_block: int = 64  # block table for the xla attention to skip masked blocks (prefix_shared/packed); 0: dense
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
    mle_weight: float = 1.0  # lambda
    rank_weight: float = 1.0  # the ranking term's weight; 0 trains the MLE-only control of an experiment
    mle_target: str = "original"  # original | best | all
    chunk: int = 0  # tokens per vocabulary-projection chunk; 0: all at once if they fit logits_budget_mb
    logits_budget_mb: int = 256  # float32 logits one projection pass may hold (memory stays flat in V); raise on big GPUs


@dataclasses.dataclass
class TrainConfig:
    mode: str = "ranking"  # sft | ranking
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


@dataclasses.dataclass
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    name: str = ""
    description: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    ("model", "dtype"): ("float32", "bfloat16"),
    ("model", "param_dtype"): ("float32", "bfloat16"),
    ("model", "remat_policy"): ("none", "full", "dots", "dots_no_batch", "nothing_saveable"),
    ("model", "attention"): ("auto", "einsum", "xla", "cudnn", "splash"),
    ("data", "layout"): ("padded", "prefix_shared", "packed"),
    ("data", "truncate"): ("left_prompt", "drop"),
    ("data", "on_error"): ("raise", "skip"),
    ("data", "format"): ("auto", "native", "reference", "probabilistic", "contextual"),
    ("optim", "schedule"): ("cosine", "linear", "constant"),
    ("loss", "form"): ("paper", "reference", "listmle", "infonca", "dpo_pairs", "dpo_best", "lipo_lambda"),
    ("loss", "score"): ("mean", "sum"),
    ("loss", "reference"): (None, "data"),
    ("loss", "mle_target"): ("original", "best", "all"),
    ("train", "mode"): ("sft", "ranking"),
}


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "hf_config" else v
    return out


def read_yaml(path: str | pathlib.Path, _seen: tuple = ()) -> dict:
    """A config file with its ``base:`` chain merged in (the file's own keys win)."""
    path = pathlib.Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: 'base:' includes form a cycle")
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of sections")
    bases = raw.pop("base", None) or []
    merged: dict = {}
    for b in [bases] if isinstance(bases, str) else bases:
        merged = _merge(merged, read_yaml(path.parent / b, _seen + (path,)))
    return _merge(merged, raw)


def _build(cls, values: dict, where: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean {where + '.' if where else ''}{close[0]}?)" if close else ""
            raise ConfigError(f"unknown config key {where + '.' if where else ''}{key}{hint}; "
                              f"valid keys: {', '.join(fields)}")
        f = fields[key]
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            if not isinstance(value, dict):
                raise ConfigError(f"config section {key!r} must be a mapping, got {value!r}")
            kwargs[key] = _build(f.default_factory, value, key)
        else:
            choices = CHOICES.get((where, key))
            if choices and value not in choices:
                raise ConfigError(f"{where}.{key}={value!r}: choose one of {', '.join(map(str, choices))}")
            if isinstance(value, str) and "float" in str(f.type):
                try:  # PyYAML (YAML 1.1) reads 1e-5 as a string
                    value = float(value)
                except ValueError:
                    raise ConfigError(f"{where}.{key}={value!r}: expected a number") from None
            kwargs[key] = value
    return cls(**kwargs)


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


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """Config file (or the defaults) + ``section.key=value`` overrides -> Config."""
    raw = read_yaml(path) if path else {}
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {k} is not a section")
        node[keys[-1]] = value
    try:
        return _build(Config, raw, "")
    except ConfigError as e:
        raise ConfigError(f"{path or 'config'}: {e}") from None
    except TypeError as e:
        raise ConfigError(f"{path or 'config'}: {e}") from None

"""The evaluation driver of ``tuna-jax eval run CONFIG`` / ``tuna-jax eval CONFIG.yaml`` (the command and the
scoring-only subcommands ``eval superni|lmentry|vicuna|alpaca-eval``: ``commands/eval.py``).

For a YAML config listing models and benchmarks (:func:`load_eval_config`, checked against
:data:`EVAL_LIMITS` and :data:`EVAL_CHOICES`), :func:`run_eval` builds every benchmark's prompts with each
model's tokenizer and prompt template (``alpaca`` by default: the benchmark prompt is the Alpaca
instruction; ``raw``: as it is), generates the ones not yet cached with the sampler (greedy unless
configured), scores them with ``superni`` / ``lmentry``, runs the pairwise reviews of ``vicuna`` through the
judge endpoint, and writes the table (Markdown + JSON) and the chart (PNG) with ``report``.

Everything is cached under ``output_dir``: predictions in ``predictions/<model>/<benchmark>.jsonl``, a line
per prompt, appended as generated and dropped when the hash of its prompt ids changes (the generation
settings beside it; a rerun with others is an error), judge requests in ``judge.store.jsonl``: a killed
run resumes, a rerun loads no model. A prompt over ``max_prompt_tokens`` keeps BOS and its last tokens.

Exit status: 0 done; 1 some review items failed; 2 a review stopped (the table holds what finished).
Single host only: every process would generate and write the same files.

The config's keys, caching, templates and prompt lengths: docs/evaluation.md#run.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import pathlib
import re
import sys
from typing import Sequence

from tuna_jax.config import above, at_least, between
from tuna_jax.config import load as load_dataclass
from tuna_jax.eval import lmentry as lmentry_mod
from tuna_jax.eval import report as report_mod
from tuna_jax.eval import superni as superni_mod
from tuna_jax.eval import vicuna as vicuna_mod
from tuna_jax.eval.common import read_predictions_jsonl, warn
from tuna_jax.io import paths as io_paths
from tuna_jax.io.errors import InputError
from tuna_jax.io.jsonl import check_settings, dumps, read_json, write_json
from tuna_jax.llm_api.client import ClientConfig

logger = logging.getLogger("tuna_jax.eval")

__all__ = ["EvalConfig", "ModelSpec", "GenerationSettings", "SuperNISettings",
           "LMentrySettings", "VicunaSettings", "AlpacaEvalSettings", "JudgeSettings", "load_eval_config",
           "run_eval"]


# ================================================================================================ schema
@dataclasses.dataclass
class Published:
    """A paper's numbers for one row, printed beside ours: the table they come from (e.g. "Tuna, Table 1"), and any
    of the report's columns; Vicuna QA as [win, lose, tie] in percent (docs/evaluation.md#published)."""

    table: str
    superni_0shot: float | None = None
    superni_2shot: float | None = None
    lmentry: float | None = None
    vicuna: list[float] | None = None
    alpaca_eval: float | None = None


@dataclasses.dataclass
class ModelSpec:
    name: str
    path: str
    tokenizer: str | None = None
    template: str | None = None
    base_url: str | None = None  # a serving engine that serves `path` (default: generation.base_url)
    served_model: str | None = None  # its name for the model (default: path)
    published: Published | None = None  # the paper's numbers for this model, shown beside ours


@dataclasses.dataclass
class GenerationSettings:
    template: str = "alpaca"
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    max_new_tokens: int = 256
    max_prompt_tokens: int | None = None
    batch_size: int = 8
    dtype: str = "float32"
    mesh: str | None = None
    add_bos: bool = True
    base_url: str | None = None  # generate with this OpenAI-compatible server (tuna_jax/serving.py)
    concurrency: int = 4  # its requests in flight
    api_key_env: str = ""  # the variable holding its API key, if it wants one ("": none is sent)


@dataclasses.dataclass
class SuperNISettings:
    tasks: str
    shots: list[int] = dataclasses.field(default_factory=lambda: [0, 2])
    num_instances: int = superni_mod.DEFAULT_NUM_INSTANCES
    num_tasks: int | None = None
    task_names: list[str] | None = None
    max_new_tokens: int | None = None
    template: str | None = None
    max_source_length: int | None = 1024  # Tk-Instruct's eval script (docs/evaluation.md#prompt-length); null: none


@dataclasses.dataclass
class LMentrySettings:
    data: str
    tasks: list[str] | None = None
    max_new_tokens: int | None = None
    template: str | None = None
    truncate_predictions: bool = False
    allow_partial: bool = False


@dataclasses.dataclass
class VicunaSettings:
    data: str | None = None
    questions: str | None = None
    prompts: str | None = None
    reviewers: str | None = None
    baseline: str | None = None
    baseline_model: str | None = None
    orders: str = "one"
    review: bool = True
    limit: int | None = None
    max_new_tokens: int | None = None
    template: str | None = None
    max_parse_retries: int = 2
    temperature: float | None = None
    max_tokens: int | None = None


@dataclasses.dataclass
class AlpacaEvalSettings:
    reference: str
    prompt_template: str | None = None
    review: bool = True
    limit: int | None = None
    max_new_tokens: int | None = None
    template: str | None = None
    max_parse_retries: int = 2
    temperature: float | None = None
    max_tokens: int | None = None


@dataclasses.dataclass(kw_only=True)
class JudgeSettings(ClientConfig):
    """The ``judge`` section: the client's settings (``llm_api.client.ClientConfig``'s fields, declared there
    once: base_url, model, api_key_env, timeout_s, retries, backoff, concurrency) and the request store's."""

    model: str = dataclasses.field(default=dataclasses.MISSING)  # required here: a judge has no default model
    store: str | None = None
    retry_failed: bool = True
    max_usd: float | None = None
    max_requests: int | None = None
    price_input: float = 0.0
    price_output: float = 0.0


@dataclasses.dataclass
class EvalConfig:
    output_dir: str
    models: list[ModelSpec]
    name: str | None = None
    generation: GenerationSettings = dataclasses.field(default_factory=GenerationSettings)
    superni: SuperNISettings | None = None
    lmentry: LMentrySettings | None = None
    vicuna: VicunaSettings | None = None
    alpaca_eval: AlpacaEvalSettings | None = None
    judge: JudgeSettings | None = None
    source: str = ""  # the config file (set by the loader)


# The ranges and choices of the eval config's values (tuna_jax.config checks them; keys: (section, key)).
_TEMPLATE_SECTIONS = ("models", "generation", "superni", "lmentry", "vicuna", "alpaca_eval")
EVAL_CHOICES = {**{(s, "template"): ("alpaca", "raw") for s in _TEMPLATE_SECTIONS},
                ("generation", "dtype"): ("float32", "bfloat16"), ("vicuna", "orders"): vicuna_mod.ORDERS}
EVAL_LIMITS = {
    ("generation", "temperature"): at_least(0),
    ("generation", "top_p"): between(0, 1, lo_open=True),
    ("generation", "top_k"): at_least(0),
    ("generation", "seed"): at_least(0),
    ("generation", "max_new_tokens"): at_least(1),
    ("generation", "max_prompt_tokens"): at_least(1),
    ("generation", "batch_size"): at_least(1),
    ("generation", "concurrency"): at_least(1),
    ("superni", "num_instances"): at_least(1),
    ("superni", "num_tasks"): at_least(1),
    ("superni", "max_source_length"): at_least(2),
    **{(s, "max_new_tokens"): at_least(1) for s in ("superni", "lmentry", "vicuna", "alpaca_eval")},
    **{(s, "limit"): at_least(1) for s in ("vicuna", "alpaca_eval")},
    **{(s, "max_parse_retries"): at_least(0) for s in ("vicuna", "alpaca_eval")},
    ("vicuna", "temperature"): at_least(0),
    ("vicuna", "max_tokens"): at_least(1),
    ("judge", "timeout_s"): above(0),
    ("judge", "max_retries"): at_least(0),
    ("judge", "backoff_initial_s"): at_least(0),
    ("judge", "backoff_max_s"): at_least(0),
    ("judge", "max_retry_after_s"): at_least(0),
    ("judge", "concurrency"): at_least(1),
    ("judge", "max_usd"): at_least(0),
    ("judge", "max_requests"): at_least(1),
    ("judge", "price_input"): at_least(0),
    ("judge", "price_output"): at_least(0),
}
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def load_eval_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> EvalConfig:
    """Reads and checks an eval config (see docs/evaluation.md#run); ``overrides``: ``section.key=value``."""
    path = os.fspath(path)
    cfg, raw = load_dataclass(EvalConfig, path, overrides, limits=EVAL_LIMITS, choices=EVAL_CHOICES,
                              hidden=("source",))
    cfg.source = path
    where = raw.where_of("models")
    if not cfg.models:
        raise InputError(f"{where}: models is empty")
    seen = set()
    for m in cfg.models:
        if not _NAME_RE.fullmatch(m.name):
            raise InputError(f"{where}: model name {m.name!r}: use letters, digits, '.', '_', '-' (it names "
                             f"files)")
        if m.name in seen:
            raise InputError(f"{where}: model name {m.name!r} appears twice")
        seen.add(m.name)
        if m.published and m.published.vicuna is not None and len(m.published.vicuna) != 3:
            raise InputError(f"{where}: model {m.name!r}: published.vicuna is [win, lose, tie] in percent, got "
                             f"{m.published.vicuna}")
    if not any((cfg.superni, cfg.lmentry, cfg.vicuna, cfg.alpaca_eval)):
        raise InputError(f"{path}: no benchmark configured (add superni, lmentry, vicuna or alpaca_eval)")
    if cfg.superni is not None:
        shots = cfg.superni.shots
        if not shots or any(k not in (0, 2) for k in shots) or len(set(shots)) != len(shots):
            raise InputError(f"{raw['superni'].where_of('shots')}: superni.shots must be a non-empty "
                             f"subset of [0, 2], got {shots}")
    v = cfg.vicuna
    if v is not None:
        vl = raw.where_of("vicuna")
        if v.data is None and not (v.questions and v.prompts and v.reviewers):
            raise InputError(f"{vl}: vicuna needs data (a folder) or questions, prompts and reviewers")
        if v.review and (v.baseline is None) == (v.baseline_model is None):
            raise InputError(f"{vl}: vicuna needs exactly one of baseline (an answer file) and baseline_model "
                             f"(a model of this config), or review: false")
        if v.baseline_model is not None and v.baseline_model not in seen:
            raise InputError(f"{vl}: vicuna.baseline_model {v.baseline_model!r} is not one of the models "
                             f"{sorted(seen)}")
    a = cfg.alpaca_eval
    if a is not None and a.review and not a.prompt_template:
        raise InputError(f"{raw.where_of('alpaca_eval')}: alpaca_eval needs prompt_template (the annotator "
                         f"prompt, judge_prompts/alpaca_eval_gpt4/alpaca_eval.txt) or review: false")
    if ((v is not None and v.review) or (a is not None and a.review)) and cfg.judge is None:
        raise InputError(f"{path}: a review is configured but there is no judge section (base_url, model)")
    if cfg.judge is not None and cfg.judge.store:  # checked now, not after hours of generation
        io_paths.require_local(cfg.judge.store, f"{raw['judge'].where_of('store')}: judge.store",
                               "the request store is appended to as replies arrive",
                               "give a local path, or leave it out (OUTPUT_DIR/judge.store.jsonl)")
    if cfg.name is None:
        cfg.name = pathlib.Path(path).stem
    if not _NAME_RE.fullmatch(cfg.name):
        raise InputError(f"{path}: name {cfg.name!r}: use letters, digits, '.', '_', '-' (it names files)")
    return cfg


# ================================================================================================ prompts
@dataclasses.dataclass
class _Job:
    benchmark: str
    id: str
    ids: list[int]
    truncated: int
    max_new_tokens: int
    text: str  # what a serving engine is sent: the prompt, or the text of the tokens kept when it was cut

    @property
    def sha1(self) -> str:
        return hashlib.sha1(json.dumps(self.ids).encode()).hexdigest()

    @property
    def rng_id(self) -> int:  # the random stream of a prompt (temperature > 0) depends on what it is only
        return int(hashlib.sha1(f"{self.benchmark}/{self.id}".encode()).hexdigest()[:8], 16) % (2**31)


def _wrap(template: str, text: str) -> str:
    from tuna_jax.data.templates import format_prompt

    return format_prompt(text, "") if template == "alpaca" else text


def _context_length(model_path: str) -> int:
    cfg_path = io_paths.join(model_path, "config.json")
    try:
        return int(read_json(cfg_path)["max_position_embeddings"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{cfg_path}: cannot read max_position_embeddings ({e}); is {model_path} a HF "
                         f"folder or a tuna-jax params checkpoint?") from None


class _Prompter:
    """Text -> prompt ids for one model: template, BOS policy, length limit (see docs/evaluation.md#run)."""

    def __init__(self, cfg: EvalConfig, spec: ModelSpec):
        from tuna_jax.data.templates import SpecialTokenPolicy, load_tokenizer

        self.cfg, self.spec = cfg, spec
        self.tokenizer = load_tokenizer(spec.tokenizer or spec.path)
        self.policy = SpecialTokenPolicy(add_bos=cfg.generation.add_bos)
        self.context = _context_length(spec.path)

    def template(self, bench_template: str | None) -> str:
        return self.spec.template or bench_template or self.cfg.generation.template

    def limit(self, max_new_tokens: int) -> int:
        g = self.cfg.generation
        limit = self.context - max_new_tokens
        if g.max_prompt_tokens is not None:
            limit = min(limit, g.max_prompt_tokens)
        if limit < 2:
            raise InputError(f"{self.cfg.source}: model {self.spec.name} has a context of {self.context} "
                             f"tokens; max_new_tokens={max_new_tokens} leaves no room for a prompt")
        return limit

    def encode(self, text: str) -> list[int]:
        from tuna_jax.data.templates import encode_prompt

        return encode_prompt(self.tokenizer, text, self.policy)

    def cut_source(self, text: str, max_source_length: int) -> tuple[str, int]:
        """(source, tokens cut): a source over ``max_source_length`` tokens (BOS counted, as Tk-Instruct's
        collator counts its special token) keeps its last tokens; the collator keeps the first ones, which
        for a decoder-only model would cut off the instance and the "Output: " it answers."""
        ids = self.tokenizer.encode(text)
        keep = max_source_length - (1 if self.cfg.generation.add_bos else 0)
        if len(ids) <= keep:
            return text, 0
        return self.tokenizer.decode(ids[len(ids) - keep:]), len(ids) - keep

    def job(self, benchmark: str, id_: str, text: str, max_new_tokens: int, cut: int = 0) -> _Job:
        """The job of prompt ``text``; ``cut``: tokens its source already lost."""
        ids = self.encode(text)
        limit = self.limit(max_new_tokens)
        if len(ids) > limit:
            cut += len(ids) - limit
            head = ids[:1] if self.cfg.generation.add_bos else []
            ids = head + ids[len(ids) - (limit - len(head)):]
            text = self.tokenizer.decode(ids[len(head):])
        return _Job(benchmark, id_, ids, cut, max_new_tokens, text)


def _mnt(cfg: EvalConfig, bench) -> int:
    return bench.max_new_tokens if bench.max_new_tokens is not None else cfg.generation.max_new_tokens


def _superni_source(cfg: EvalConfig):
    s = cfg.superni
    src = superni_mod.load_source(s.tasks, num_instances=s.num_instances)
    instances = list(superni_mod.iter_eval_instances(src, num_instances=s.num_instances, tasks=s.task_names))
    if s.num_tasks is not None:
        keep = list(dict.fromkeys(i.task for i in instances))[:s.num_tasks]
        instances = [i for i in instances if i.task in set(keep)]
    if not instances:
        raise InputError(f"{s.tasks}: no Super-NI instances to generate for")
    return src, instances


def _vicuna_data(cfg: EvalConfig):
    v = cfg.vicuna
    return vicuna_mod.load_vicuna_data(v.data, questions=v.questions, prompts=v.prompts, reviewers=v.reviewers)


def _alpaca_reference(cfg: EvalConfig) -> list[dict]:
    refs = vicuna_mod.read_alpaca_eval_outputs(cfg.alpaca_eval.reference)
    return refs[:cfg.alpaca_eval.limit] if cfg.alpaca_eval.limit else refs


class _Data:
    """Benchmark data, read once per run -- all of it before any generation, so a wrong path fails in
    seconds, not after hours of decoding."""

    def __init__(self, cfg: EvalConfig):
        self.superni = _superni_source(cfg) if cfg.superni else None
        self.lmentry = lmentry_mod.load_data(cfg.lmentry.data, cfg.lmentry.tasks) if cfg.lmentry else None
        self.vicuna = _vicuna_data(cfg) if cfg.vicuna else None
        if self.vicuna is not None and cfg.vicuna.limit:
            self.vicuna.questions = self.vicuna.questions[:cfg.vicuna.limit]
        if cfg.vicuna and cfg.vicuna.review and cfg.vicuna.baseline:
            vicuna_mod.read_answers(cfg.vicuna.baseline)  # checked now, read again at review time
        self.alpaca = _alpaca_reference(cfg) if cfg.alpaca_eval else None
        self.alpaca_template = None
        if cfg.alpaca_eval and cfg.alpaca_eval.review:
            self.alpaca_template = vicuna_mod.load_alpaca_eval_template(cfg.alpaca_eval.prompt_template)


def _jobs(cfg: EvalConfig, data: _Data, p: _Prompter) -> dict[str, list[_Job]]:
    """benchmark -> its prompts for this model, in data order."""
    out: dict[str, list[_Job]] = {}
    if cfg.superni:
        s = cfg.superni
        mnt, tpl = _mnt(cfg, s), p.template(s.template)
        # Tk-Instruct's collator: examples must keep the source (untemplated) within max_source_length tokens,
        # and a longer source is cut to it; without a limit, the prompt's (templated) room in the context.
        if s.max_source_length is not None:
            msl, count = s.max_source_length, (lambda text: len(p.encode(text)))
        else:
            msl, count = p.limit(mnt), (lambda text: len(p.encode(_wrap(tpl, text))))
        for k in s.shots:
            bench, jobs = f"superni_{k}shot", []
            for inst in data.superni[1]:
                source = inst.prompt(k, count_tokens=count if k else None, max_source_length=msl if k else None)
                source, cut = p.cut_source(source, msl) if s.max_source_length is not None else (source, 0)
                jobs.append(p.job(bench, inst.id, _wrap(tpl, source), mnt, cut))
            out[bench] = jobs
    if cfg.lmentry:
        mnt, tpl = _mnt(cfg, cfg.lmentry), p.template(cfg.lmentry.template)
        out["lmentry"] = [p.job("lmentry", inst.id, _wrap(tpl, inst.prompt), mnt)
                          for inst in lmentry_mod.iter_eval_instances(data.lmentry)]
    if cfg.vicuna:
        mnt, tpl = _mnt(cfg, cfg.vicuna), p.template(cfg.vicuna.template)
        out["vicuna"] = [p.job("vicuna", str(q.question_id), _wrap(tpl, q.text), mnt) for q in data.vicuna.questions]
    if cfg.alpaca_eval:
        mnt, tpl = _mnt(cfg, cfg.alpaca_eval), p.template(cfg.alpaca_eval.template)
        out["alpaca_eval"] = [p.job("alpaca_eval", str(i), _wrap(tpl, r["instruction"]), mnt)
                              for i, r in enumerate(data.alpaca)]
    return out


# ================================================================================================ predictions cache
class _Cache:
    """One benchmark's predictions file for one model (see docs/evaluation.md#run)."""

    def __init__(self, path: str, settings: dict):
        self.path, self.settings = path, settings

    def check_settings(self) -> None:
        check_settings(self.path, self.settings,
                       hint=f"use another output_dir, or delete {self.path} to generate it again")

    def load(self, jobs: Sequence[_Job]) -> dict[str, dict]:
        """Lines of the current prompts; stale lines (prompt changed, id gone, a torn last line) are removed."""
        if not os.path.exists(self.path):
            return {}
        want = {j.id: j.sha1 for j in jobs}
        kept: dict[str, dict] = {}
        dropped = 0
        with open(self.path, encoding="utf-8") as f:
            lines = f.readlines()
        for n, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
                rid, sha = str(rec["id"]), rec["prompt_sha1"]
            except (ValueError, KeyError, TypeError) as e:
                if n == len(lines) and not raw.endswith("\n"):  # killed while writing: generate it again
                    dropped += 1
                    continue
                raise InputError(f"{self.path}:{n}: unreadable predictions line ({e}); delete the file to "
                                 f"generate it again") from None
            if want.get(rid) == sha and rid not in kept:
                kept[rid] = rec
            else:
                dropped += 1
        if dropped:
            logger.info("%s: %d stale line(s) dropped (prompt changed or id gone); they are generated again",
                        self.path, dropped)
            tmp = self.path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                for rec in kept.values():
                    f.write(dumps(rec) + "\n")
            os.replace(tmp, self.path)
        return kept


def _served(cfg: EvalConfig, spec: ModelSpec) -> tuple[str, str] | None:
    """(base_url, model name) of the serving engine that generates for ``spec``, or None (the local sampler)."""
    url = spec.base_url or cfg.generation.base_url
    return (url, spec.served_model or spec.path) if url else None


class _Generator:
    """The model and sampler, loaded on first use (a rerun with every prediction cached loads nothing); or the
    serving engine's client, whose request store is ``predictions/<model>/requests.store.jsonl``."""

    def __init__(self, cfg: EvalConfig, spec: ModelSpec, prompter: _Prompter):
        self.cfg, self.spec, self.prompter = cfg, spec, prompter
        self.sampler = None
        self.store = None

    def _load(self):
        served = _served(self.cfg, self.spec)
        if served is not None:
            return self._connect(*served)
        self._load_model()

    def _connect(self, base_url: str, model: str):
        from tuna_jax.llm_api.client import OpenAIClient
        from tuna_jax.llm_api.store import Store
        from tuna_jax.serving import ServedSampler

        g = self.cfg.generation
        client = OpenAIClient(ClientConfig(base_url=base_url, model=model, concurrency=g.concurrency,
                                           api_key_env=g.api_key_env))
        self.store = Store(os.path.join(self.cfg.output_dir, "predictions", self.spec.name, "requests.store.jsonl"))
        client.store = self.store
        self.sampler = ServedSampler(client, n_per_request=1)

    def _load_model(self):
        from tuna_jax import parallel
        from tuna_jax.generate import Sampler
        from tuna_jax.model import load_model

        g = self.cfg.generation
        parallel.initialize_distributed()
        mesh = parallel.make_mesh(g.mesh)
        logger.info("loading %s from %s", self.spec.name, self.spec.path)
        model = load_model(self.spec.path, mesh, dtype=g.dtype, param_dtype="float32")
        tok = self.prompter.tokenizer
        if tok.vocab_size > model.cfg.vocab_size:
            raise InputError(f"tokenizer {tok.name} has {tok.vocab_size} tokens but model {self.spec.path} has "
                             f"a vocabulary of {model.cfg.vocab_size}: they do not belong together")
        self.sampler = Sampler(model, tok, self.prompter.policy, mesh=mesh, batch_size=g.batch_size)

    def generate(self, jobs: Sequence[_Job], max_new_tokens: int):
        from tuna_jax.generate import SamplingParams

        if self.sampler is None:
            self._load()
        g = self.cfg.generation
        params = SamplingParams(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
                                max_new_tokens=max_new_tokens, seed=g.seed)
        prompts = [j.text for j in jobs] if self.store is not None else [j.ids for j in jobs]
        out = self.sampler.generate(prompts, params, n=1, rng_ids=[j.rng_id for j in jobs])
        return [o[0] for o in out]

    def close(self):
        self.sampler = None
        if self.store is not None:
            self.store.close()


def _settings(cfg: EvalConfig, spec: ModelSpec, max_new_tokens: int) -> dict:
    g = cfg.generation
    return {"model": str(io_paths.resolve(spec.path)),
            "tokenizer": str(io_paths.resolve(spec.tokenizer)) if spec.tokenizer else None,
            "dtype": g.dtype, "temperature": g.temperature, "top_p": g.top_p, "top_k": g.top_k, "seed": g.seed,
            "max_new_tokens": max_new_tokens, **_served_settings(cfg, spec)}


def _served_settings(cfg: EvalConfig, spec: ModelSpec) -> dict:
    """The serving engine in a predictions file's settings: switching engines generates again."""
    served = _served(cfg, spec)
    return {} if served is None else {"base_url": served[0], "served_model": served[1]}


def _predict(cfg: EvalConfig, spec: ModelSpec, prompter: _Prompter, jobs: dict[str, list[_Job]],
             progress: bool) -> dict[str, str]:
    """Fills every benchmark's cache file for one model; returns benchmark -> predictions path."""
    from tqdm import tqdm

    pred_dir = os.path.join(cfg.output_dir, "predictions", spec.name)
    paths, todo = {}, []
    for bench, bjobs in jobs.items():
        path = os.path.join(pred_dir, f"{bench}.jsonl")
        cache = _Cache(path, _settings(cfg, spec, bjobs[0].max_new_tokens if bjobs else 0))
        cache.check_settings()
        done = cache.load(bjobs)
        todo += [j for j in bjobs if j.id not in done]
        paths[bench] = path
    if not todo:
        logger.info("%s: every prediction is cached", spec.name)
        return paths
    gen = _Generator(cfg, spec, prompter)
    chunk = 8 * cfg.generation.batch_size
    by_mnt: dict[int, list[_Job]] = {}
    for j in todo:
        by_mnt.setdefault(j.max_new_tokens, []).append(j)
    files = {b: open(p, "a", encoding="utf-8") for b, p in paths.items()}
    try:
        with tqdm(total=len(todo), desc=f"generate {spec.name}", unit="prompt", disable=not progress,
                  file=sys.stderr) as bar:
            for mnt, group in by_mnt.items():
                group = sorted(group, key=lambda j: len(j.ids))  # similar lengths share a batch: less padding
                for s in range(0, len(group), chunk):
                    part = group[s:s + chunk]
                    for j, smp in zip(part, gen.generate(part, mnt)):
                        rec = {"id": j.id, "prediction": (smp.text or "").strip(), "finish_reason": smp.finish_reason,
                               "num_tokens": smp.num_tokens, "prompt_tokens": len(j.ids),
                               "prompt_truncated": j.truncated, "prompt_sha1": j.sha1}
                        files[j.benchmark].write(dumps(rec) + "\n")
                    for f in files.values():
                        f.flush()
                    bar.update(len(part))
    finally:
        for f in files.values():
            f.close()
        gen.close()
    return paths


# ================================================================================================ scoring
def _read_preds(path: str) -> dict[str, dict]:
    return {r.id: {"prediction": r.prediction, **r.extra} for r in read_predictions_jsonl(path)}


def _gen_details(preds: dict[str, dict], path: str) -> dict:
    return {"predictions": path, "num_predictions": len(preds),
            "prompts_truncated": sum(1 for p in preds.values() if p.get("prompt_truncated")),
            "length_cut": sum(1 for p in preds.values() if p.get("finish_reason") == "length")}


def _score_superni(cfg: EvalConfig, data: _Data, bench: str, path: str, score_dir: str, progress: bool = False):
    src, instances = data.superni
    preds = _read_preds(path)
    refs = []
    for inst in instances:  # the generated instances' references, as the scorer reads them from the source
        refs.append(src.references.get(inst.id) or superni_mod.ReferenceRecord(inst.id, inst.task, inst.category,
                                                                               inst.references))
    result = superni_mod.score_predictions({i: p["prediction"] for i, p in preds.items()}, refs, progress=progress)
    result.update(predictions_file=path, tasks_source=src.path)
    out = os.path.join(score_dir, f"{bench}.json")
    write_json(out, result)
    return result["overall"], {**_gen_details(preds, path), "scores": out, "num_scored": result["num_scored"],
                               "num_tasks": result["num_tasks"], "missing": result["missing"]}


def _score_lmentry(cfg: EvalConfig, data: _Data, path: str, score_dir: str, progress: bool = False):
    preds = _read_preds(path)
    result = lmentry_mod.score_predictions({i: p["prediction"] for i, p in preds.items()}, data.lmentry,
                                           truncate=cfg.lmentry.truncate_predictions,
                                           allow_partial=cfg.lmentry.allow_partial, progress=progress)
    result["predictions_file"] = path
    out = os.path.join(score_dir, "lmentry.json")
    write_json(out, result)
    return result["overall"], {**_gen_details(preds, path), "scores": out, "accuracy": result["accuracy"],
                               "robustness": result["robustness"], "partial": result["partial"],
                               "missing": result["missing"]}


def _vicuna_answers(cfg: EvalConfig, data: _Data, spec: ModelSpec, path: str) -> str:
    preds = _read_preds(path)
    recs = [vicuna_mod.answer_record(spec.name, q.question_id, preds[str(q.question_id)]["prediction"],
                                     {"generator": "tuna-jax", "finish_reason": preds[str(q.question_id)]
                                      .get("finish_reason")})
            for q in data.vicuna.questions if str(q.question_id) in preds]
    return vicuna_mod.write_answers(os.path.join(cfg.output_dir, "answers", f"{spec.name}.jsonl"), recs)


def _alpaca_outputs(cfg: EvalConfig, data: _Data, spec: ModelSpec, path: str) -> str:
    preds = _read_preds(path)
    outs = [{"instruction": r["instruction"], "output": preds[str(i)]["prediction"], "generator": spec.name,
             "dataset": r.get("dataset")} for i, r in enumerate(data.alpaca) if str(i) in preds]
    out = os.path.join(cfg.output_dir, "alpaca_eval", f"{spec.name}.outputs.json")
    write_json(out, outs)
    return out


# ================================================================================================ the run
def _columns(cfg: EvalConfig) -> list[str]:
    cols = []
    if cfg.superni:
        cols += [f"superni_{k}shot" for k in sorted(cfg.superni.shots)]
    if cfg.lmentry:
        cols.append("lmentry")
    if cfg.vicuna and cfg.vicuna.review:
        cols.append("vicuna")
    if cfg.alpaca_eval and cfg.alpaca_eval.review:
        cols.append("alpaca_eval")
    return cols


def _judge_client(cfg: EvalConfig):
    from tuna_jax.llm_api.client import OpenAIClient
    from tuna_jax.llm_api.store import Budget, Prices, Store

    j = cfg.judge
    client = OpenAIClient(j)  # a JudgeSettings is a ClientConfig; base_url is checked before the store is created
    client.store = Store(j.store or os.path.join(cfg.output_dir, "judge.store.jsonl"),
                         prices=Prices(j.price_input, j.price_output), budget=Budget(j.max_usd, j.max_requests),
                         retry_failed=j.retry_failed)
    return client, client.store


def _notes(cfg: EvalConfig, data: _Data) -> list[str]:
    g = cfg.generation
    dec = "greedy" if g.temperature == 0 else f"temperature {g.temperature}, top_p {g.top_p}, top_k {g.top_k}"
    notes = [f"Generation: {dec}; template {g.template} unless a model or benchmark sets another; "
             f"max_new_tokens {g.max_new_tokens} unless a benchmark sets another."]
    if cfg.superni:
        _, inst = data.superni
        tasks = len({i.task for i in inst})
        notes.append(f"Super-NI: ROUGE-L x100 over {len(inst)} instances of {tasks} test task(s) (first "
                     f"{cfg.superni.num_instances} per task); the benchmark has 119 tasks x 100 instances.")
    if cfg.lmentry:
        notes.append(f"LMentry: score = accuracy x robustness / 100 over {len(data.lmentry)} task file(s) "
                     f"(the benchmark has 41).")
    return notes


def run_eval(cfg: EvalConfig, *, progress: bool = True) -> tuple[dict, dict[str, str], int]:
    """Runs the whole evaluation; returns (the JSON table, the report's paths, the exit status).

    ``output_dir`` may be in cloud storage (``gs://...``): the run works in a local mirror of it (its caches
    are appended to as they grow) that is fetched first and uploaded when the run ends, stopped or not."""
    data = _Data(cfg)  # every benchmark file is read and checked before a folder is made or a model loads
    with io_paths.mirrored_dir(cfg.output_dir) as local:
        table, written, status = _run_eval(dataclasses.replace(cfg, output_dir=local), data, cfg.output_dir,
                                           progress)
    return table, _relocate(written, local, cfg.output_dir), status


def _relocate(obj, local: str, public: str):
    """``obj`` with every path under the working folder ``local`` named under ``public`` (the output folder
    as configured: the same folder, or the bucket it is uploaded to)."""
    if isinstance(obj, str):
        return public.rstrip("/") + obj[len(local):] if local != public and obj.startswith(local) else obj
    if isinstance(obj, dict):
        return {k: _relocate(v, local, public) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_relocate(v, local, public) for v in obj]
    return obj


def _run_eval(cfg: EvalConfig, data: _Data, public_output_dir: str, progress: bool):
    status = 0
    rows: dict[str, dict] = {m.name: {"model": m.name, "path": m.path, "details": {},
                                      "published": dataclasses.asdict(m.published) if m.published else None}
                             for m in cfg.models}
    preds_paths: dict[str, dict[str, str]] = {}

    # 1. predictions (model by model: one model in memory at a time)
    for spec in cfg.models:
        prompter = _Prompter(cfg, spec)
        preds_paths[spec.name] = _predict(cfg, spec, prompter, _jobs(cfg, data, prompter), progress)

    # 2. scores
    for spec in cfg.models:
        row, paths = rows[spec.name], preds_paths[spec.name]
        score_dir = os.path.join(cfg.output_dir, "scores", spec.name)
        if cfg.superni:
            for k in cfg.superni.shots:
                b = f"superni_{k}shot"
                row[b], row["details"][b] = _score_superni(cfg, data, b, paths[b], score_dir, progress)
        if cfg.lmentry:
            row["lmentry"], row["details"]["lmentry"] = _score_lmentry(cfg, data, paths["lmentry"], score_dir,
                                                                       progress)
        if cfg.vicuna:
            row["details"]["vicuna_answers"] = _vicuna_answers(cfg, data, spec, paths["vicuna"])
        if cfg.alpaca_eval:
            row["details"]["alpaca_eval_outputs"] = _alpaca_outputs(cfg, data, spec, paths["alpaca_eval"])

    # 3. reviews
    notes = _notes(cfg, data)
    reviews = [b for b in ("vicuna", "alpaca_eval") if getattr(cfg, b) is not None and getattr(cfg, b).review]
    if reviews:
        status = _reviews(cfg, data, rows, notes, progress)

    table = report_mod.make_table(cfg.name, _relocate([rows[m.name] for m in cfg.models], cfg.output_dir,
                                                      public_output_dir), _columns(cfg), notes=notes,
                                  settings={"config": str(io_paths.resolve(cfg.source)) if cfg.source else None,
                                            "output_dir": str(io_paths.resolve(public_output_dir)),
                                            "generation": dataclasses.asdict(cfg.generation),
                                            "judge": cfg.judge.model if cfg.judge else None})
    paths = report_mod.write_report(table, cfg.output_dir, cfg.name)
    return table, paths, status


def _vicuna_baseline(cfg: EvalConfig, rows: dict) -> tuple[str, str]:
    """(answer file, name) of the Vicuna baseline."""
    v = cfg.vicuna
    if v.baseline_model:
        return rows[v.baseline_model]["details"]["vicuna_answers"], v.baseline_model
    ids = {a.model_id for a in vicuna_mod.read_answers(v.baseline).values() if a.model_id}
    return v.baseline, (ids.pop() if len(ids) == 1 else pathlib.Path(v.baseline).stem)


def _reviews(cfg: EvalConfig, data: _Data, rows: dict, notes: list, progress: bool) -> int:
    """Runs the configured reviews model by model; fills the rows' vicuna / alpaca_eval cells. A budget stop
    or a fatal endpoint error ends the reviews (noted in the table, status 2); failed items give status 1."""
    from tuna_jax.llm_api.store import BudgetExceeded, FatalRunError

    client, store = _judge_client(cfg)
    planned = []  # (benchmark, model, output stem, review function)
    if cfg.vicuna and cfg.vicuna.review:
        v = cfg.vicuna
        baseline, base_name = _vicuna_baseline(cfg, rows)
        rc = vicuna_mod.ReviewConfig(orders=v.orders, max_parse_retries=v.max_parse_retries,
                                     temperature=v.temperature, max_tokens=v.max_tokens,
                                     concurrency=cfg.judge.concurrency, progress=progress)
        for spec in cfg.models:
            if spec.name != v.baseline_model:
                stem = os.path.join(cfg.output_dir, "vicuna", f"{spec.name}_vs_{_safe(base_name)}")
                planned.append(("vicuna", spec.name, stem, functools.partial(
                    vicuna_mod.review_vicuna, rows[spec.name]["details"]["vicuna_answers"], baseline,
                    stem + ".reviews.jsonl", client, data.vicuna, rc, model_name=spec.name,
                    baseline_name=base_name)))
    if cfg.alpaca_eval and cfg.alpaca_eval.review:
        a = cfg.alpaca_eval
        template = data.alpaca_template
        rc = vicuna_mod.ReviewConfig(max_parse_retries=a.max_parse_retries, temperature=a.temperature,
                                     max_tokens=a.max_tokens, concurrency=cfg.judge.concurrency, progress=progress)
        ref_name = str(data.alpaca[0].get("generator") or "reference") if data.alpaca else "reference"
        for spec in cfg.models:
            stem = os.path.join(cfg.output_dir, "alpaca_eval", f"{spec.name}_vs_{_safe(ref_name)}")
            planned.append(("alpaca_eval", spec.name, stem, functools.partial(
                vicuna_mod.review_alpaca_eval, rows[spec.name]["details"]["alpaca_eval_outputs"], data.alpaca,
                stem + ".reviews.jsonl", client, template, rc, model_name=spec.name, reference_name=ref_name)))
    status = 0
    try:
        for bench, name, stem, review in planned:
            try:
                result = review()
            except (BudgetExceeded, FatalRunError) as e:
                notes.append(f"{bench} review of {name} STOPPED: {e} Rerun the same command to continue.")
                warn(f"{bench} review of {name} stopped: {e}")
                status = 2
                break
            write_json(stem + ".json", result)
            keep = ("win", "lose", "tie", "win_pct", "tie_pct", "lose_pct", "failed", "missing", "judged",
                    "baseline", "judge", "orders")
            if bench == "alpaca_eval":
                keep += ("win_rate", "win_rate_stderr")
            rows[name][bench] = {k: result[k] for k in keep}
            rows[name]["details"][bench] = {"summary": stem + ".json", "reviews": result["reviews_file"],
                                            "failed_file": result["failed_file"],
                                            "unparsed_replies": result["unparsed_replies"]}
            if result["failed"]:
                warn(f"{bench} review of {name}: {result['failed']} item(s) failed; see {result['failed_file']}")
                status = max(status, 1)
        print(f"eval: judge {store.summary()}", file=sys.stderr)
    finally:
        store.close()
    return status


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)

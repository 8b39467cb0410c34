"""The stage kinds of a pipeline file, each composing the Python API of the step it runs.

==================  ============================================================  ==========================
kind                keys                                                          outputs (stage folder)
==================  ============================================================  ==========================
convert             source, format (hf | llama2c), tokenizer, param_dtype         model: model/
train               config (a training YAML, relative to the pipeline file),      model: final/
                    set (``section.key: value`` over it); a PRM is a train stage
                    with a ``train.mode=prm`` config (configs/prm.yaml)
teacher             the fields of ``tuna-jax teacher``'s Config: input, n, beta   data: ranked.jsonl
sample-diverse      the fields of ``tuna-jax sample-diverse``'s Config            data: candidates.jsonl
judge               the fields of ``tuna-jax judge``'s Config; ``judge: llm |     data: ranked.jsonl
                    metric`` is its ``--kind``
prm-rerank          the fields of ``tuna-jax prm rerank``'s Config                data: ranked.jsonl
mix                 parts: [{path, select}] (a one-part mix is a selection)       data: data.jsonl
reference-scores    model, data (``tuna-jax score`` + ``reference-scores``)       data: ranked_ref.jsonl
eval                config (an eval YAML, ``eval/run.py``), set                   report: the stage folder
export              model, like, dtype (``convert orbax-to-hf``)                  model: hf/
synthetic, heldout  the demo's data and its held-out evaluation (heldout.py)
==================  ============================================================  ==========================

What an interrupted stage keeps (``Kind.resumes``): ``train`` continues from its last checkpoint
(``train(cfg, resume=True)``: params, optimizer, step, RNG and data position); ``teacher`` and ``judge``
take every finished request from their store (``stores/STAGE.jsonl`` in the pipeline folder, kept across
reruns with other settings: a request is keyed by its content); ``sample-diverse`` keeps the records
already in its output; a command stage whose command has ``--resume`` is run with it; the others start
again (each takes seconds to minutes).
"""
from __future__ import annotations

import dataclasses
import json

from tuna_jax.commands import judge, prm, sample_diverse, teacher
from tuna_jax.config import ConfigError, load_config
from tuna_jax.eval.tables import Source
from tuna_jax.io import paths
from tuna_jax.pipeline import heldout
from tuna_jax.pipeline.stage import Kind, StageFailed, StageRun, command_kind, dataclass_kind

# ---- train and eval: a YAML config of their own, and ``set`` over it ----------------------------------


def flatten(node, prefix: str = "") -> list[tuple[str, object]]:
    """``(dotted key, value)`` pairs of a nested ``set`` mapping (``hf_config`` stays one value)."""
    out = []
    for k, v in node.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not key.endswith("hf_config"):
            out += flatten(v, key + ".")
        else:
            out.append((key, v))
    return out


@dataclasses.dataclass
class ConfigStage:
    """A stage that runs from a config file: ``config`` (relative to the pipeline file that names it) and
    ``set``."""

    config: str | None = None
    set: dict = dataclasses.field(default_factory=dict)


def _with_set(load, node, section: str, base_dir: str, fixed: dict):
    """``load(path, overrides)`` with the stage's ``set`` as overrides and ``fixed`` (what the pipeline
    decides) after them; an error in a ``set`` value names the pipeline file's line."""
    from tuna_jax.config import build

    stage = build(ConfigStage, node, section)
    where = node.where_of("set")
    pairs = flatten(node.get("set") or {})
    for key, _ in pairs:
        if key in fixed:
            raise ConfigError(f"{where}: {section}.set.{key}: the pipeline sets it (the stage folder)")
    written = node.where_of("config").rsplit(":", 1)[0]  # relative to the file that names it (base: includes)
    path = paths.join(paths.parent(written) if paths.is_file(written) else base_dir, stage.config) \
        if stage.config else None
    overrides = [f"{k}={json.dumps(v)}" for k, v in [*pairs, *fixed.items()]]
    try:
        return load(path, overrides)
    except ConfigError as e:
        text = str(e)
        if text.startswith("command line: "):
            raise ConfigError(f"{where}: {section}.set: {text[len('command line: '):]}") from None
        raise


def _build_train(node, section, base_dir, stage_dir):
    return _with_set(load_config, node, section, base_dir, {"train.output_dir": stage_dir})


def _run_train(cfg, stage: StageRun) -> dict:
    from tuna_jax.train import train

    cfg.train.progress = cfg.train.progress and stage.progress
    result = train(cfg, resume=True)  # continues from the stage folder's last checkpoint, if any
    return {"steps": result.step, "train": result.metrics, "eval": result.eval_metrics}


def _build_eval(node, section, base_dir, stage_dir):
    from tuna_jax.eval.run import load_eval_config

    def load(path, overrides):
        if path is None:
            raise ConfigError(f"{node.where}: {section}.config: an eval stage needs its eval config file")
        return load_eval_config(path, overrides)

    return _with_set(load, node, section, base_dir, {"output_dir": stage_dir})


def _run_eval(cfg, stage: StageRun) -> dict:
    from tuna_jax.eval.run import run_eval

    table, written, status = run_eval(cfg, progress=stage.progress)
    if status:
        raise StageFailed(f"the evaluation ended with exit status {status}")
    return {"table": table, "files": written}


# ---- convert, export, mix, reference scores ------------------------------------------------------------

@dataclasses.dataclass
class ConvertStage:
    """``format: hf``: a HF LLaMA folder -> a tuna-jax params checkpoint; ``llama2c``: a llama2.c model.bin
    (+ ``tokenizer``: its tokenizer.bin) -> a HF folder. Either is a model every other stage reads."""

    source: str
    format: str = "hf"
    tokenizer: str | None = None
    param_dtype: str = "float32"
    mesh: str | None = None


def _run_convert(p: ConvertStage, stage: StageRun) -> dict:
    out = stage.out("model")
    if p.format == "llama2c":
        from tuna_jax.assets.llama2c import convert_llama2c_to_hf

        if not p.tokenizer:
            raise ConfigError(f"{stage.instance.where}: stages.{stage.instance.stage}.tokenizer: format llama2c "
                              f"needs the model's tokenizer.bin")
        convert_llama2c_to_hf(p.source, p.tokenizer, out)
        return {}
    from tuna_jax import parallel
    from tuna_jax.model.checkpoint import convert_hf_to_params

    parallel.initialize_distributed()
    parallel.make_mesh(p.mesh)  # checked; the export streams from host memory and fits any mesh
    _, cfg = convert_hf_to_params(p.source, out, param_dtype=p.param_dtype)
    return {"parameters": cfg.num_params()}


@dataclasses.dataclass
class ExportStage:
    """A tuna-jax checkpoint -> a HF folder (``tuna-jax convert orbax-to-hf``); ``like``: the HF folder it
    came from (config fields, dtype and tokenizer files carried over)."""

    model: str
    like: str | None = None
    dtype: str | None = None
    max_shard_gb: float = 5.0
    mesh: str | None = None


def _run_export(p: ExportStage, stage: StageRun) -> dict:
    from flax import nnx

    from tuna_jax import parallel
    from tuna_jax.model import load_model
    from tuna_jax.model.convert import prepare_export_dir, save_hf_model

    out = stage.out("model")
    prepare_export_dir(out, [p.model] + ([p.like] if p.like else []), overwrite=True)
    parallel.initialize_distributed()
    model = load_model(p.model, parallel.make_mesh(p.mesh))
    save_hf_model(nnx.state(model, nnx.Param), model.cfg, out, like=p.like or p.model, dtype=p.dtype,
                  max_shard_bytes=int(p.max_shard_gb * 2**30))
    return {}


@dataclasses.dataclass
class Part:
    path: str
    select: str = "all"


@dataclasses.dataclass
class MixStage:
    """Rows of each part's file (``select``: which; ``data/select.py``), one after the other, as JSONL."""

    parts: list[Part]


def _build_mix(node, section, base_dir, stage_dir):
    from tuna_jax.config import build
    from tuna_jax.data.select import Selection

    mix = build(MixStage, node, section)
    for i, part in enumerate(mix.parts):
        part.select = str(Selection.parse(part.select, node.where_of("parts"), f"{section}.parts[{i}].select"))
    if not mix.parts:
        raise ConfigError(f"{node.where_of('parts')}: {section}.parts: give at least one {{path, select}}")
    return mix


def _run_mix(p: MixStage, stage: StageRun) -> dict:
    from tuna_jax.data.records import iter_rows
    from tuna_jax.data.select import Selection
    from tuna_jax.io.errors import InputError
    from tuna_jax.io.jsonl import dumps

    counts, lines = [], []
    for part in p.parts:
        rows = Selection.parse(part.select).apply(list(iter_rows(part.path)), part.path)
        for _, row in rows:
            if isinstance(row, InputError):
                raise row
            lines.append(dumps(row) + "\n")
        counts.append(len(rows))
    paths.write_atomic(stage.out("data"), "".join(lines))
    return {"rows": counts}


@dataclasses.dataclass(kw_only=True)
class Scoring:
    """How a stage runs ``tuna-jax score``'s scorer: tokenizer (default: the model's), rows per forward pass, the
    longest prompt + response, compute dtype, device mesh."""

    tokenizer: str | None = None
    batch_size: int = 8
    max_len: int | None = None
    dtype: str = "float32"
    mesh: str | None = None


@dataclasses.dataclass(kw_only=True)
class ReferenceScoresStage(Scoring):
    """``tuna-jax score MODEL DATA`` then ``tuna-jax reference-scores``: the ranking rows of ``data`` with the
    frozen starting model's candidate log-likelihoods attached, for ``loss.reference: data``."""

    model: str
    data: str


def _run_reference_scores(p: ReferenceScoresStage, stage: StageRun) -> dict:
    from tuna_jax import parallel
    from tuna_jax.data.reference import attach_reference_scores
    from tuna_jax.model import load_model
    from tuna_jax.scoring import make_candidate_encoder, read_lines, score_file

    lines = read_lines(p.data)
    parallel.initialize_distributed()
    mesh = parallel.make_mesh(p.mesh)
    model = load_model(p.model, mesh, dtype=p.dtype, param_dtype="float32")
    scores = paths.join(stage.dir, "ref_scores.jsonl")
    n = score_file(model, p.data, scores, encoder=make_candidate_encoder(p.tokenizer or p.model), mesh=mesh,
                   batch_rows=p.batch_size, max_len=p.max_len, lines=lines, progress=stage.progress)
    stage.say(attach_reference_scores(p.data, scores, stage.out("data")).summary(stage.out("data")))
    return {"scored": n}


@dataclasses.dataclass
class RankingsTableStage:
    """Table 4 (``tuna-jax eval rankings``): the mean response length at each rank of each ranking file."""

    sources: list[Source]
    tokenizer: str | None = None


def _run_rankings_table(p: RankingsTableStage, stage: StageRun) -> dict:
    from tuna_jax.data.templates import load_tokenizer
    from tuna_jax.eval.tables import ranking_lengths

    return _write_table(ranking_lengths(p.sources, load_tokenizer(p.tokenizer) if p.tokenizer else None), stage)


@dataclasses.dataclass
class CostsTableStage:
    """Table 6 (``tuna-jax eval costs``): what the request store of the stage that made each file paid for (a file no
    stage of this pipeline made is read as a store itself)."""

    sources: list[Source]
    price_input: float | None = None
    price_output: float | None = None


def _run_costs_table(p: CostsTableStage, stage: StageRun) -> dict:
    from tuna_jax.eval.tables import api_costs

    stores = []
    for src in p.sources:
        made_by = stage.plan.produced.get(src.path)
        path = paths.join(stage.plan.output_dir, "stores", f"{made_by[0]}.jsonl") if made_by else src.path
        stores.append(Source(src.name, path))
    return _write_table(api_costs(stores, p.price_input, p.price_output), stage)


@dataclasses.dataclass(kw_only=True)
class LikelihoodTableStage(Scoring):
    """Table 5 (the beta study): the token-level log-likelihood of ``data``'s responses (LIMA's training set: Alpaca
    rows or LIMA's ``conversations``) under each model, by ``tuna-jax score``'s exact scorer."""

    models: list[Source]
    data: str


def _run_likelihood_table(p: LikelihoodTableStage, stage: StageRun) -> dict:
    from tuna_jax import parallel
    from tuna_jax.eval.tables import likelihood_row, response_rows
    from tuna_jax.io.jsonl import dumps
    from tuna_jax.model import load_model
    from tuna_jax.scoring import make_candidate_encoder, read_lines, score_file

    lines = paths.join(stage.dir, "responses.jsonl")
    paths.write_atomic(lines, "".join(dumps(r) + "\n" for r in response_rows(p.data)))
    parallel.initialize_distributed()
    mesh = parallel.make_mesh(p.mesh)
    rows = []
    for m in p.models:
        model = load_model(m.path, mesh, dtype=p.dtype, param_dtype="float32")
        out = paths.join(stage.dir, f"scores-{len(rows)}.jsonl")
        score_file(model, lines, out, encoder=make_candidate_encoder(p.tokenizer or m.path), mesh=mesh,
                   batch_rows=p.batch_size, max_len=p.max_len, lines=read_lines(lines), progress=stage.progress)
        rows.append(likelihood_row(m.name, m.path, [json.loads(x) for x in paths.read_text(out).splitlines()
                                                    if x.strip()]))
    return _write_table({"table": "log-likelihood", "data": p.data, "rows": rows}, stage)


def _write_table(table: dict, stage: StageRun) -> dict:
    from tuna_jax.eval.tables import to_markdown
    from tuna_jax.io.jsonl import dumps

    md = to_markdown(table)
    paths.write_atomic(stage.out("report"), md)
    paths.write_atomic(paths.join(stage.dir, "table.json"), dumps(table) + "\n")
    stage.say("\n" + md)
    return {"rows": len(table["rows"])}


# ---- the registry ----------------------------------------------------------------------------------

_TRAIN_COSMETIC = ("name", "description", "train.output_dir", "train.progress", "train.tensorboard",
                   "train.log_every", "train.save_every", "train.keep_checkpoints", "train.async_checkpoints",
                   "train.compile_cache")  # where compiled steps are cached changes no result
_FEEDBACK = "finished requests come from the store; only the rest are sent"


def _kinds() -> dict[str, Kind]:
    kinds = [
        dataclass_kind("convert", "bring a HF LLaMA (or a llama2.c checkpoint) in", ConvertStage, {"model": "model"},
                       _run_convert, choices={"format": ("hf", "llama2c"), "param_dtype": ("float32", "bfloat16")},
                       input_fields=("source", "tokenizer")),
        Kind("train", "SFT, ranking or PRM training from a training YAML", {"model": "final"}, _build_train,
             lambda cfg: cfg.to_dict(), _run_train, input_fields=("model.path", "model.tokenizer", "data.train",
                                                                  "data.eval"),
             cosmetic=_TRAIN_COSMETIC, resumes="continues from its last checkpoint (params, optimizer, step, RNG, "
                                               "data position)"),
        command_kind("teacher", "probabilistic ranking: N teacher samples per instruction, s = logp/|r|^beta",
                     teacher.Config, teacher.run, {"data": "ranked.jsonl"}, {"out": "data"}, store="store",
                     input_fields=("input", "local_model", "local_tokenizer"), resumes=_FEEDBACK),
        command_kind("sample-diverse", "N diverse samples per instruction from the model being tuned",
                     sample_diverse.Config, sample_diverse.run, {"data": "candidates.jsonl"}, {"out": "data"},
                     input_fields=("model", "input", "tokenizer"), resumes="keeps the records already written"),
        command_kind("judge", "contextual ranking by a judge LLM (or an offline metric)", judge.Config, judge.run,
                     {"data": "ranked.jsonl"}, {"out": "data"}, store="store", input_fields=("input",),
                     resumes=_FEEDBACK),
        command_kind("prm-rerank", "rank candidates with a proxy ranking model", prm.Rerank, prm.run_rerank,
                     {"data": "ranked.jsonl"}, {"out": "data"}, input_fields=("prm", "input", "tokenizer")),
        Kind("mix", "rows of several files (each selected) in one JSONL: data selection and mixing",
             {"data": "data.jsonl"}, _build_mix, dataclasses.asdict, _run_mix, input_fields=("parts",)),
        dataclass_kind("reference-scores", "attach a frozen reference model's candidate scores (loss.reference)",
                       ReferenceScoresStage, {"data": "ranked_ref.jsonl"}, _run_reference_scores,
                       choices={"dtype": ("float32", "bfloat16")}, input_fields=("model", "data", "tokenizer")),
        Kind("eval", "Super-NI, LMentry, Vicuna QA, AlpacaEval from an eval YAML (eval/run.py)", {"report": "."},
             _build_eval, dataclasses.asdict, _run_eval, input_fields=("models",), cosmetic=("output_dir", "source")),
        dataclass_kind("export", "a checkpoint as a Hugging Face folder", ExportStage, {"model": "hf"}, _run_export,
                       choices={"dtype": (None, "float32", "bfloat16", "float16")}, input_fields=("model", "like")),
        dataclass_kind("rankings-table", "Table 4: mean response length at each rank of ranking files",
                       RankingsTableStage, {"report": "table.md"}, _run_rankings_table,
                       input_fields=("sources", "tokenizer")),
        dataclass_kind("costs-table", "Table 6: requests, tokens and USD of the stages that made these files",
                       CostsTableStage, {"report": "table.md"}, _run_costs_table, input_fields=("sources",)),
        dataclass_kind("likelihood-table", "Table 5: token-level log-likelihood of a dataset under each model",
                       LikelihoodTableStage, {"report": "table.md"}, _run_likelihood_table,
                       choices={"dtype": ("float32", "bfloat16")}, input_fields=("models", "data", "tokenizer")),
        *heldout.KINDS,
    ]
    return {k.name: k for k in kinds}


KINDS = _kinds()

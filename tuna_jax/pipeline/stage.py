"""What a stage kind is, and the one way most kinds are made: from the ``Config`` of a ``tuna-jax`` command.

A :class:`Kind` says what a stage of that kind reads (``input_fields`` of its resolved config), writes
(``outputs``, paths in its stage folder) and does (``run``). :func:`command_kind` makes a kind of an existing
command (``teacher``, ``judge``, ``sample-diverse``, ``prm rerank``): the stage's keys are the fields of
the command's ``Config`` dataclass (``--max-tokens`` is ``max_tokens``; ``tuna_jax/commands/``), checked by
``config.build`` like every config (types, choices, unknown keys with a suggestion, FILE:LINE), and the stage
runs the command's own ``run(cfg)`` in this process, so a stage does exactly what the command documents and a
new option needs no change here.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable

from tuna_jax.config import build
from tuna_jax.io import paths


class StageFailed(RuntimeError):
    """A stage ran and did not finish its work (its command's exit status, failed items)."""


@dataclasses.dataclass
class StageRun:
    """What a kind's ``run`` gets besides its params: its folder, its (selected) input file, the plan."""

    dir: str
    instance: Any  # spec.Instance
    plan: Any  # spec.Plan
    progress: bool = True
    input: str | None = None  # the selected rows of the stage's input (selectable kinds)
    store: str | None = None  # the request store of kinds that have one (in the pipeline's stores/ folder)

    def out(self, name: str) -> str:
        return paths.join(self.dir, self.instance.kind.outputs[name])

    def say(self, message: str) -> None:
        print(f"[{self.instance.id}] {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class Kind:
    """A stage kind. ``build(node, section, base_dir, stage_dir)`` checks the stage's keys and returns its
    params; ``describe(params)`` is the resolved config (JSON: recorded in the manifest, hashed into the
    stage's key but for the ``cosmetic`` keys); ``input_fields`` are the dotted keys of it holding paths the
    stage reads (a path, a list of paths or of ``{path, select}``); ``run(params, StageRun)`` does the work
    and returns metrics. ``resumes`` says what an interrupted run keeps."""

    name: str
    summary: str
    outputs: dict
    build: Callable
    describe: Callable
    run: Callable
    input_fields: tuple = ()
    cosmetic: tuple = ()
    selectable: bool = False
    resumes: str = "starts again"


def dataclass_kind(name: str, summary: str, params: type, outputs: dict, run: Callable, *, choices: dict | None = None,
                   **kw) -> Kind:
    """A kind whose keys are the fields of dataclass ``params`` (``choices``: field -> allowed values)."""

    def build_params(node, section, base_dir, stage_dir):
        return build(params, node, section, choices={(section, k): v for k, v in (choices or {}).items()})

    return Kind(name, summary, outputs, build_params, dataclasses.asdict, run, **kw)


def input_paths(kind: Kind, config: dict) -> list[tuple[str, str]]:
    """``(dotted key, path)`` of every path at the kind's ``input_fields`` of a resolved config: a path, or
    lists and mappings of them, a ``{path, ...}`` mapping counting by its ``path`` (``data.train`` sources,
    eval models, mix parts)."""

    def collect(value, key: str):
        if isinstance(value, str) and value:
            yield key, value
        elif isinstance(value, list):
            for i, v in enumerate(value):
                yield from collect(v, f"{key}[{i}]")
        elif isinstance(value, dict):
            if "path" in value:
                yield from collect(value["path"], key)
            else:
                for k, v in value.items():
                    yield from collect(v, f"{key}.{k}")

    out = []
    for field in kind.input_fields:
        value = config
        for k in field.split("."):
            value = value.get(k) if isinstance(value, dict) else None
        out += list(collect(value, field))
    return out


# ---- kinds made from a command's Config ---------------------------------------------------------------

# The pipeline sets these: the store, the rows (`select`) and its progress bars.
_HIDDEN = ("store", "limit", "no_progress")


def command_kind(name: str, summary: str, config: type, run: Callable, outputs: dict, filled: dict, *,
                 input_fields: tuple = (), store: str | None = None, resumes: str = "starts again") -> Kind:
    """The kind of command ``tuna-jax NAME``: its params are the command's own ``config`` dataclass (the stage's
    keys are its fields, checked by ``config.build``: types, choices, unknown keys with a suggestion, FILE:LINE),
    and it runs the command's ``run(cfg)`` in this process. ``filled`` maps the fields the pipeline fills (the
    output positionals) to the output they write. A positional ``input`` makes the kind selectable: it runs on the
    selected rows. ``store``: the field naming the command's request store, kept in the pipeline's ``stores/``
    folder (``StageRun.store``)."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    hidden = tuple(k for k in (*filled, *_HIDDEN, *((store,) if store else ())) if k in fields)
    choices = {k: tuple(f.metadata["choices"]) for k, f in fields.items() if "choices" in f.metadata}

    def build_params(node, section, base_dir, stage_dir):
        return build(config, node, section, choices={(section, k): v for k, v in choices.items()}, hidden=hidden,
                     given={k: "" for k in filled})  # the outputs: set when the stage runs

    def describe(params) -> dict:
        return {k: v for k, v in dataclasses.asdict(params).items() if k not in hidden}

    def run_stage(params, stage: StageRun) -> dict:
        given = {field: stage.out(output) for field, output in filled.items()}
        if stage.input is not None:
            given["input"] = stage.input
        if store is not None:
            # A local model's cache key holds its path, not its weights (feedback/local.py): a retrained model
            # at the same path must not be served old samples, so its store lives and dies with the stage.
            local = getattr(params, "local_model", None)
            given[store] = paths.join(stage.dir, "store.jsonl") if local else stage.store
        given["no_progress"] = not stage.progress
        status = run(dataclasses.replace(params, **given))
        if status and not (status == 1 and stage.instance.allow_failures):
            raise StageFailed(f"tuna-jax {name} ended with exit status {status}" +
                              ("; some items failed: rerun to retry them, or set allow_failures: true"
                               if status == 1 else ""))
        return {"exit_status": status}

    selectable = "input" in fields and bool(fields["input"].metadata.get("positional"))
    return Kind(name, summary, outputs, build_params, describe, run_stage, input_fields=input_fields,
                selectable=selectable, resumes=resumes)

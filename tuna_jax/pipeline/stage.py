"""What a stage kind is, and the one way most kinds are made: from the options of a ``tuna-jax`` command.

A :class:`Kind` says what a stage of that kind reads (``input_fields`` of its resolved config), writes
(``outputs``, paths in its stage folder) and does (``run``). :func:`command_kind` makes a kind of an existing
command (``teacher``, ``judge``, ``sample-diverse``, ``prm train|rerank``): the stage's keys are the command's
options (``--max-tokens`` is ``max_tokens``), checked by ``config.build`` like every config (types,
choices, unknown keys with a suggestion, FILE:LINE), and the stage runs the command's own ``run(args)`` in
this process, so a stage does exactly what the command documents and a new option needs no change here.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
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


# ---- kinds made from a command's options ------------------------------------------------------------

# The pipeline sets these: the store, the rows (`select`), its progress bars, and resuming (always: a stage
# folder only holds an interrupted run of the same stage, see engine.py).
_HIDDEN = ("store", "limit", "no_progress", "resume")


def command_parser(module: str, sub: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"tuna-jax {module.rsplit('.', 1)[-1]}")
    importlib.import_module(module).add_arguments(parser)
    if sub is not None:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[sub]
    return parser


def _options(parser: argparse.ArgumentParser, filled: dict) -> list[argparse.Action]:
    return [a for a in parser._actions if a.dest != "help" and a.dest not in filled and a.dest not in _HIDDEN
            and not isinstance(a, argparse._SubParsersAction)]


def _schema(name: str, parser: argparse.ArgumentParser, filled: dict, renamed: dict) -> tuple[type, dict]:
    """A dataclass with a field per option of ``parser`` (positionals without a default; ``renamed``: stage
    key -> option, for options named like a key every stage has), and its choices."""
    key_of = {dest: key for key, dest in renamed.items()}
    fields, choices = [], {}
    for a in _options(parser, filled):
        if isinstance(a, argparse._StoreTrueAction):
            tp: Any = bool
        else:
            tp = a.type if a.type in (int, float) else str
            if a.default is None and a.option_strings:
                tp = tp | None
        if a.choices is not None:
            choices[key_of.get(a.dest, a.dest)] = tuple(a.choices)
        field = dataclasses.field() if not a.option_strings else dataclasses.field(default=a.default)
        fields.append((key_of.get(a.dest, a.dest), tp, field))
    fields.sort(key=lambda f: f[2].default is not dataclasses.MISSING)  # required fields first
    return dataclasses.make_dataclass(f"{name.replace('-', '_')}_stage", fields), choices


def command_argv(parser: argparse.ArgumentParser, params, filled: dict, renamed: dict | None = None) -> list[str]:
    """The command line that runs ``params`` (positionals from ``params`` or ``filled``)."""
    values = {(renamed or {}).get(k, k): v for k, v in dataclasses.asdict(params).items()}
    values.update(filled)
    argv: list[str] = []
    for a in parser._actions:
        if a.dest == "help" or isinstance(a, argparse._SubParsersAction):
            continue
        v = values.get(a.dest, a.default)
        if not a.option_strings:
            argv.append(str(v))
        elif isinstance(a, argparse._StoreTrueAction):
            argv += [a.option_strings[0]] if v else []
        elif v is not None and v != a.default:
            argv += [a.option_strings[0], str(v)]
    return argv


def command_kind(name: str, summary: str, module: str, outputs: dict, filled: dict, *, sub: str | None = None,
                 input_fields: tuple = (), store: str | None = None, renamed: dict | None = None,
                 resumes: str = "starts again") -> Kind:
    """The kind of command ``tuna-jax NAME`` (``module``'s ``add_arguments`` / ``run``; ``sub``: its
    sub-command). ``filled`` maps the positionals the pipeline fills to the output they write. A positional
    named ``input`` makes the kind selectable: it runs on the selected rows. ``store``: the option naming
    the command's request store, kept in the pipeline's ``stores/`` folder (``StageRun.store``).
    ``renamed``: stage key -> option, for an option named like a key of every stage (judge's ``--kind``)."""
    renamed = renamed or {}

    def parser() -> argparse.ArgumentParser:
        return command_parser(module, sub)

    def build_params(node, section, base_dir, stage_dir):
        schema, choices = _schema(name, parser(), {**filled, **({store: None} if store else {})}, renamed)
        return build(schema, node, section, choices={(section, k): v for k, v in choices.items()})

    def run(params, stage: StageRun) -> dict:
        given = {dest: stage.out(output) for dest, output in filled.items()}
        if stage.input is not None:
            given["input"] = stage.input
        if store is not None:
            # A local model's cache key holds its path, not its weights (feedback/local.py): a retrained model
            # at the same path must not be served old samples, so its store lives and dies with the stage.
            local = getattr(params, "local_model", None)
            given[store] = paths.join(stage.dir, "store.jsonl") if local else stage.store
        given["no_progress"] = not stage.progress
        p = parser()
        if any(a.dest == "resume" for a in p._actions):
            given["resume"] = True
        args = p.parse_args(command_argv(p, params, given, renamed))
        if sub is not None:
            args.prm_command = sub  # set by the parent parser, which is not the one parsing here
        status = importlib.import_module(module).run(args)
        if status and not (status == 1 and stage.instance.allow_failures):
            raise StageFailed(f"tuna-jax {name} ended with exit status {status}" +
                              ("; some items failed: rerun to retry them, or set allow_failures: true"
                               if status == 1 else ""))
        return {"exit_status": status}

    selectable = any(a.dest == "input" and not a.option_strings for a in parser()._actions)
    return Kind(name, summary, outputs, build_params, dataclasses.asdict, run, input_fields=input_fields,
                selectable=selectable, resumes=resumes)

"""Command-line settings as dataclass fields: defaults and help written once, in field metadata.
:func:`add_arguments` makes a command's argparse flags from its ``Config`` dataclass and
:func:`config_from_args` the dataclass back from the parsed namespace, so the CLI, the pipeline and any other
caller build the same ``Config``; library settings (``feedback/teacher.py``'s ``TeacherSettings``, ...) are
declared with the same fields, where the code that reads them lives.

Field metadata: ``help`` (required), ``positional`` (an argument, not a ``--flag``), ``nargs``,
``metavar``, ``choices``, ``flags`` (the option strings, when not ``--field-name``), ``group`` (the
heading it is listed under in ``--help``). A ``bool`` field is a ``--flag`` that sets it to True; a
``list`` option is repeatable (``--until A --until B``). :func:`arg`, :func:`pos` and :func:`req` write
the common cases in one line.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing

MISSING = dataclasses.MISSING


def arg(default, help: str, **meta) -> dataclasses.Field:  # noqa: A002 - the metadata key argparse uses
    """An option with a default (a list default becomes a factory)."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=default.copy, metadata={"help": help, **meta})
    return dataclasses.field(default=default, metadata={"help": help, **meta})


def pos(help: str, **meta) -> dataclasses.Field:  # noqa: A002
    """A positional argument (required; with ``nargs="*"`` a list, empty by default)."""
    if meta.get("nargs") == "*":
        return dataclasses.field(default_factory=list, metadata={"help": help, "positional": True, **meta})
    return dataclasses.field(metadata={"help": help, "positional": True, **meta})


def req(help: str, **meta) -> dataclasses.Field:  # noqa: A002
    """A required option (``--predictions PRED.jsonl``)."""
    return dataclasses.field(metadata={"help": help, **meta})


def default_of(f: dataclasses.Field):
    """A field's default (MISSING when it has none)."""
    return f.default_factory() if f.default_factory is not MISSING else f.default


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One argument per field of the dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    groups: dict = {}  # heading -> its argument group
    for f in dataclasses.fields(cls):
        meta = f.metadata
        kw = {k: meta[k] for k in ("nargs", "metavar", "choices") if k in meta}
        default = default_of(f)
        tp = hints[f.name]
        is_list = tp is list or typing.get_origin(tp) is list
        args = () if is_list else typing.get_args(tp)
        base = next((a for a in args if a is not type(None)), tp)  # X | None -> X
        shown = default is not MISSING and default is not None and default is not False and default != []
        help_text = meta["help"] + (" (default: %(default)s)" if shown else "")
        target = parser
        if "group" in meta:
            target = groups.get(meta["group"]) or groups.setdefault(meta["group"],
                                                                    parser.add_argument_group(meta["group"]))
        flags = meta.get("flags") or ("--" + f.name.replace("_", "-"),)
        if meta.get("positional"):
            if is_list:
                kw.setdefault("nargs", "*")
            target.add_argument(f.name, help=help_text, **kw)
        elif base is bool:
            target.add_argument(*flags, dest=f.name, action="store_true", help=help_text)
        elif is_list:
            target.add_argument(*flags, dest=f.name, action="append", default=default, help=help_text, **kw)
        else:
            target.add_argument(*flags, dest=f.name, type=base, default=None if default is MISSING else default,
                                required=default is MISSING, help=help_text, **kw)


def config_from_args(cls, args: argparse.Namespace):
    """The dataclass ``cls`` from a namespace :func:`add_arguments` parsed."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})

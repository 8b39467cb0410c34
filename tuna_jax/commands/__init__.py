"""Commands as data: each verb is a ``Config`` dataclass (defaults and help written once, in field
metadata) and a ``run(cfg) -> int``. :func:`add_arguments` makes a verb's argparse flags from its
dataclass and :func:`config_from_args` the dataclass back from the parsed namespace, so the CLI and any
other caller build the same ``Config``.

Field metadata: ``help`` (required), ``positional`` (an argument, not a ``--flag``), ``nargs``,
``metavar``, ``choices``. A ``bool`` field is a ``--flag`` that sets it to True.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One argument per field of the dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        kw = {k: meta[k] for k in ("nargs", "metavar", "choices") if k in meta}
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        tp = hints[f.name]
        is_list = tp is list or typing.get_origin(tp) is list
        args = () if is_list else typing.get_args(tp)
        base = next((a for a in args if a is not type(None)), tp)  # X | None -> X
        help_text = meta["help"] + ("" if default in (None, False, []) else " (default: %(default)s)")
        if meta.get("positional"):
            if is_list:
                kw.setdefault("nargs", "*")
            parser.add_argument(f.name, help=help_text, **kw)
        elif base is bool:
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, action="store_true", help=help_text)
        else:
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=base, default=default,
                                required=f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
                                help=help_text, **kw)


def config_from_args(cls, args: argparse.Namespace):
    """The dataclass ``cls`` from a namespace :func:`add_arguments` parsed."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})

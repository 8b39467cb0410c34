"""Each command is declared once, in its ``Config`` dataclass: the CLI's flags and defaults are its fields and
defaults, a pipeline stage of that command takes exactly those fields, and ``tuna-jax VERB --help`` imports
neither jax nor any other heavy library (the reason command modules import inside ``run``)."""
import dataclasses
import subprocess
import sys
import typing

import pytest

from tuna_jax import cli
from tuna_jax.io.fields import MISSING, default_of
from tuna_jax.pipeline.stages import KINDS

COMMANDS = {" ".join(words): cls for words, _, cls, _, _ in cli.COMMANDS}
PLACEHOLDER = {str: "x", int: "1", float: "1.5"}
# What the pipeline sets for a stage, not its file: the outputs, the store, the rows, progress.
PIPELINE_SETS = {"out", "store", "limit", "no_progress"}


def _required(cls) -> tuple[list[str], dict]:
    """The shortest command line of ``cls``'s command (its positionals and required options) and the values
    it gives."""
    argv, given = [], {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if default_of(f) is not MISSING:
            continue
        hint = hints[f.name]
        many = typing.get_origin(hint) is list  # nargs="+": one value
        tp = next(a for a in (*typing.get_args(hint), hint) if a in PLACEHOLDER)
        text = f.metadata["choices"][0] if "choices" in f.metadata else PLACEHOLDER[tp]
        given[f.name] = [tp(text)] if many else tp(text)
        flag = f.metadata.get("flags", ("--" + f.name.replace("_", "-"),))[0]
        argv += [text] if f.metadata.get("positional") else [flag, text]
    return argv, given


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_the_cli_gives_the_dataclass_defaults(command):
    """Parsing the shortest command line gives the Config made directly from the same values: every flag's
    default is its field's, every field has a flag, and no flag has a field of its own."""
    cls = COMMANDS[command]
    argv, given = _required(cls)
    assert cli.parse_config([*command.split(), *argv]) == cls(**given)


def test_every_verb_is_listed_once():
    words = [w for w, *_ in cli.COMMANDS]
    assert len(words) == len(set(words))
    assert {w[0] for w in words} == {"demo", "convert", "score", "reference-scores", "train", "plan", "generate",
                                     "teacher", "sample-diverse", "judge", "prm", "pipeline", "eval"}


@pytest.mark.parametrize("kind,command", [("teacher", "teacher"), ("sample-diverse", "sample-diverse"),
                                          ("judge", "judge"), ("prm-rerank", "prm rerank")])
def test_a_pipeline_stage_of_a_command_takes_its_fields(kind, command, tmp_path):
    """A stage's keys are the command's fields but for those the pipeline sets (outputs, store, progress);
    built from the same values, the stage's params equal the command's Config."""
    cls = COMMANDS[command]
    _, given = _required(cls)
    stage = {k: v for k, v in given.items() if k not in PIPELINE_SETS}
    params = KINDS[kind].build(stage, kind, str(tmp_path), str(tmp_path / "stage"))
    assert type(params) is cls
    described = KINDS[kind].describe(params)
    fields = {f.name for f in dataclasses.fields(cls)}
    assert fields - set(described) <= PIPELINE_SETS, fields - set(described)
    assert described == {k: v for k, v in dataclasses.asdict(cls(**given)).items() if k in described}


def test_help_of_every_verb_imports_no_heavy_library():
    script = ("import contextlib, io, sys\n"
              "from tuna_jax import cli\n"
              f"for words in {[list(w) for w, *_ in cli.COMMANDS]!r}:\n"
              "    with contextlib.redirect_stdout(io.StringIO()):\n"
              "        try:\n"
              "            cli.main([*words, '--help'])\n"
              "        except SystemExit as e:\n"
              "            assert e.code == 0, words\n"
              "print(sorted(m for m in ('jax', 'jaxlib', 'flax', 'numpy', 'torch', 'transformers', 'orbax') "
              "if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"

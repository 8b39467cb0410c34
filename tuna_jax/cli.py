"""`tuna-jax` entry point: builds its parser from the commands' dataclasses and dispatches. No logic of its own:
each verb (and sub-verb) is a ``Config`` dataclass and a ``run(cfg) -> int`` in ``tuna_jax/commands/VERB.py``,
listed in :data:`COMMANDS`. Command modules import nothing heavy at module level (jax, torch come inside ``run``),
so `tuna-jax --help` and `tuna-jax VERB --help` are instant."""
from __future__ import annotations

import argparse
import sys

from tuna_jax.commands import (
    convert,
    generate,
    judge,
    plan,
    prm,
    reference_scores,
    sample_diverse,
    score,
    teacher,
    train,
)
from tuna_jax.commands import eval as evaluate
from tuna_jax.io.fields import add_arguments, config_from_args
from tuna_jax.pipeline import commands as pipeline

EPILOG = """The staged pipeline (see README.md):
  tuna-jax pipeline configs/pipelines/tuna.yaml   every stage below, resumable, one command
  tuna-jax convert hf-to-orbax HF_DIR CKPT        bring a Hugging Face LLaMA in
  tuna-jax train configs/alpaca_sft.yaml          SFT ("Alpaca")
  tuna-jax teacher ... / tuna-jax judge ...       feedback from stronger LLMs
  tuna-jax train configs/tuna_p.yaml              Tuna_p, then configs/tuna.yaml
  tuna-jax eval ...                               Super-NI, LMentry, Vicuna QA
  tuna-jax convert orbax-to-hf CKPT OUT --like HF_DIR   take it home
"""

PLAN_HELP = ("will a training config fit a TPU slice or GPUs: per-chip memory, FLOPs and step time from an "
             "ahead-of-time compile, no hardware needed")
PLAN_DESCRIPTION = ("Compile the train step of CONFIG for a topology (no weights, no data, no accelerator) and report "
                    "per-chip memory against HBM, FLOPs and the step time at 40% / 55% MFU. Exit status 0: fits, 1: "
                    "does not fit. See launch/README.md.")

# Verbs with sub-verbs: name -> (one-line help, description, metavar of the sub-verb).
GROUPS = {
    "convert": (convert.HELP, convert.__doc__, "DIRECTION"),
    "prm": (prm.HELP, prm.__doc__, "{train,rerank}"),
    "eval": (evaluate.HELP, evaluate.__doc__, "{run,superni,lmentry,vicuna,alpaca-eval} | CONFIG.yaml"),
}

# Every command: (its words, one-line help, Config, run, description (default: the help)), in --help's order.
COMMANDS = [
    (("demo",), pipeline.DEMO_HELP, pipeline.Demo, pipeline.run_demo, pipeline.DEMO_DESCRIPTION),
    (("convert", "hf-to-orbax"), convert.HF_TO_ORBAX_HELP, convert.HfToOrbax, convert.run_hf_to_orbax, None),
    (("convert", "orbax-to-hf"), convert.ORBAX_TO_HF_HELP, convert.OrbaxToHf, convert.run_orbax_to_hf, None),
    (("convert", "llama2c-to-hf"), convert.LLAMA2C_TO_HF_HELP, convert.Llama2cToHf, convert.run_llama2c_to_hf, None),
    (("score",), score.HELP, score.Config, score.run, score.__doc__),
    (("reference-scores",), reference_scores.HELP, reference_scores.Config, reference_scores.run,
     reference_scores.__doc__),
    (("train",), train.HELP, train.Config, train.run, train.__doc__),
    (("plan",), PLAN_HELP, plan.Config, plan.run, PLAN_DESCRIPTION),
    (("generate",), generate.HELP, generate.Config, generate.run, generate.__doc__),
    (("teacher",), teacher.HELP, teacher.Config, teacher.run, teacher.__doc__),
    (("sample-diverse",), sample_diverse.HELP, sample_diverse.Config, sample_diverse.run, sample_diverse.__doc__),
    (("judge",), judge.HELP, judge.Config, judge.run, judge.__doc__),
    (("prm", "train"), prm.TRAIN_HELP, prm.Train, prm.run_train, prm.TRAIN_DESCRIPTION),
    (("prm", "rerank"), prm.RERANK_HELP, prm.Rerank, prm.run_rerank, prm.RERANK_DESCRIPTION),
    (("pipeline",), pipeline.PIPELINE_HELP, pipeline.Pipeline, pipeline.run_pipeline, pipeline.Pipeline.__doc__),
    (("eval", "run"), evaluate.RUN_HELP, evaluate.Run, evaluate.run, evaluate.RUN_DESCRIPTION),
    (("eval", "superni"), evaluate.SUPERNI_HELP, evaluate.Superni, evaluate.run_superni, evaluate.Superni.__doc__),
    (("eval", "lmentry"), evaluate.LMENTRY_HELP, evaluate.Lmentry, evaluate.run_lmentry, evaluate.Lmentry.__doc__),
    (("eval", "vicuna"), evaluate.VICUNA_HELP, evaluate.Vicuna, evaluate.run_vicuna, evaluate.VICUNA_DESCRIPTION),
    (("eval", "alpaca-eval"), evaluate.ALPACA_EVAL_HELP, evaluate.AlpacaEval, evaluate.run_alpaca_eval,
     evaluate.ALPACA_EVAL_DESCRIPTION),
    (("eval", "rankings"), evaluate.RANKINGS_HELP, evaluate.Rankings, evaluate.run_rankings, evaluate.Rankings.__doc__),
    (("eval", "costs"), evaluate.COSTS_HELP, evaluate.Costs, evaluate.run_costs, evaluate.Costs.__doc__),
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tuna-jax", description="Tuna: instruction tuning with feedback from LLMs, "
                                "in JAX/Flax.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbs = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups = {}
    for words, help_text, cls, run, description in COMMANDS:
        parent = verbs
        if len(words) == 2:
            if words[0] not in groups:
                g_help, g_description, metavar = GROUPS[words[0]]
                g = verbs.add_parser(words[0], help=g_help, description=g_description)
                groups[words[0]] = g.add_subparsers(dest="sub_command", metavar=metavar, required=True)
            parent = groups[words[0]]
        q = parent.add_parser(words[-1], help=help_text, description=description or help_text)
        add_arguments(q, cls)
        q.set_defaults(command_config=cls, command_run=run)  # names no field has
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    """``argv`` parsed (a bad flag exits as argparse does); ``command_config`` is the command's Config class and
    ``command_run`` its run."""
    argv = list(argv)
    verb = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if verb is not None and argv[verb] == "eval" and verb + 1 < len(argv) and evaluate.is_config_path(argv[verb + 1]):
        argv.insert(verb + 1, "run")  # `tuna-jax eval CONFIG.yaml` is `tuna-jax eval run CONFIG.yaml`
    return build_parser().parse_args(argv)


def parse_config(argv: list[str]):
    """The ``Config`` that ``tuna-jax ARGV`` runs."""
    args = parse_args(argv)
    return config_from_args(args.command_config, args)


def main(argv: list[str] | None = None) -> int:
    from tuna_jax.io.cli import quiet_libraries, run_command, setup_logging

    quiet_libraries()  # before any library is imported
    args = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(args.verbose)  # INFO for tuna-jax, WARNING for the libraries (jax, Orbax, transformers)
    # The Config is made inside run_command: a setting its checks refuse is a one-line error.
    return run_command(f"tuna-jax {args.command}", lambda a: a.command_run(config_from_args(a.command_config, a)), args,
                       args.verbose)


if __name__ == "__main__":
    sys.exit(main())

"""The pipeline's own verbs: ``tuna-jax pipeline CONFIG`` (any pipeline YAML) and ``tuna-jax demo`` (the packaged
``demo.yaml``), each a ``Config`` dataclass and a run function as the verbs of ``tuna_jax/commands/`` are. They
live here, above those commands, because a pipeline runs them: its stages build the commands' ``Config``."""
from __future__ import annotations

import dataclasses
import os
import sys

from tuna_jax.commands.shared import Progress
from tuna_jax.io import paths
from tuna_jax.io.cli import error_line
from tuna_jax.io.errors import RunStopped
from tuna_jax.io.fields import arg, pos

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO, DEMO_FAST, OBJECTIVES = (os.path.join(HERE, f) for f in ("demo.yaml", "demo_fast.yaml", "objectives.yaml"))

PIPELINE_HELP = ("run a pipeline YAML: every stage in order, finished stages skipped, interrupted ones resumed, "
                 "changed ones run again")
DEMO_HELP = "the whole Tuna pipeline on the shipped stories260K model (CPU, offline)"
DEMO_DESCRIPTION = (
    "The pipeline tuna_jax/pipeline/demo.yaml, with data of the paper's shape: SFT a teacher on correct answers, "
    "train an 'Alpaca' on the teacher's sampled answers, gather probabilistic (teacher) and contextual (diverse "
    "samples graded by the tasks' rules) rankings, train Tuna_p and Tuna next to MLE-only controls and Alpaca-Mul, "
    "evaluate every stage on held-out prompts and export Hugging Face weights. No download, no GPU, no API key; "
    "under 10 minutes on 2 CPU cores. Rerunning continues where it stopped.")


@dataclasses.dataclass(kw_only=True)
class Pipeline(Progress):
    """Run a pipeline YAML (configs/pipelines/*.yaml): every stage in order, finished stages skipped, interrupted
    ones resumed, changed ones run again."""

    config: str = pos("pipeline YAML (configs/pipelines/*.yaml)")
    overrides: list = pos("e.g. output_dir=runs/x inputs.alpaca=data/a.json vars.seeds=[0,1]", nargs="*",
                          metavar="KEY=VALUE")
    until: list = arg([], "run only STAGE and the stages it needs (repeatable)", metavar="STAGE")
    start: list = arg([], "run STAGE and every stage after it again, even if finished (repeatable)", flags=("--from",),
                      metavar="STAGE")
    no_progress: bool = arg(False, "no progress bars")


@dataclasses.dataclass(kw_only=True)
class Demo:
    out: str = arg("runs/demo", "output folder")
    fast: bool = arg(False, "a smaller run (used by the tests)")
    objectives: bool = arg(False, "train the demo's Tuna_p stage with every ranking objective (loss.form) next to its "
                           "MLE-only control (tuna_jax/pipeline/objectives.yaml)")


def run_pipeline(cfg: Pipeline) -> int:
    """``tuna-jax pipeline``: 1 a stage failed, 3 training diverged, 128+N a signal stopped training."""
    return run_and_report(cfg.config, cfg.overrides, cfg.until, cfg.start, not cfg.no_progress)


def run_demo(cfg: Demo) -> int:
    """``tuna-jax demo``."""
    return demo(cfg.out, fast=cfg.fast, objectives=cfg.objectives)


def run_and_report(config: str, overrides, until=(), start=(), progress: bool = True) -> int:
    """Run a pipeline and print what each stage did and the seconds spent in all. A stage that stops is one
    line and an exit status: 1 it failed (failed items, a command's status), 3 training diverged, 128+N a
    signal N stopped training (a checkpoint was saved); a rerun resumes it."""
    from tuna_jax.pipeline.engine import run_pipeline
    from tuna_jax.pipeline.stage import StageFailed

    try:
        plan, steps, summary = run_pipeline(config, overrides, until=until, start=start, progress=progress)
    except StageFailed as e:
        print(error_line("tuna-jax pipeline: ", e), file=sys.stderr)
        return 1
    except RunStopped as e:  # training stopped: 128+N for signal N (checkpoint saved), 3 diverged
        print(error_line("tuna-jax pipeline: ", e), file=sys.stderr)
        return e.exit_status
    width = max(len(s.id) for s in steps)
    for s in steps:
        print(f"{s.id:<{width}}  {s.action:<8} {s.reason}")
    print(f"{len([s for s in steps if s.action != 'skipped'])} of {len(steps)} stages ran; "
          f"{summary['total_s']:.0f} s in all over every run ({paths.join(plan.output_dir, 'pipeline.json')})")
    return 0


def demo(out: str, fast: bool = False, objectives: bool = False) -> int:
    """``tuna-jax demo``: the packaged demo pipeline into ``out`` (``objectives``: the ranking objectives
    compared on its Tuna_p stage, reusing the demo's stages there, at full size); prints its report."""
    config, stage = (OBJECTIVES, "objectives") if objectives else (DEMO_FAST if fast else DEMO, "evaluate")
    status = run_and_report(config, [f"output_dir={out}"], progress=sys.stderr.isatty())
    report = paths.join(out, stage, "report.md")
    print(f"\n{paths.read_text(report)}\nreport: {report}")
    if not objectives:
        print(f"Hugging Face export of Tuna: {paths.join(out, 'export', 'hf')}")
    return status

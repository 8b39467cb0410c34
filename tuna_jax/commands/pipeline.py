"""Run a pipeline YAML (configs/pipelines/*.yaml): every stage in order, finished stages skipped, interrupted ones
resumed, changed ones run again (``tuna_jax/pipeline/``)."""
from __future__ import annotations

import dataclasses

from tuna_jax.commands.shared import Progress
from tuna_jax.io.fields import arg, pos

HELP = ("run a pipeline YAML: every stage in order, finished stages skipped, interrupted ones resumed, changed ones "
        "run again")


@dataclasses.dataclass(kw_only=True)
class Config(Progress):
    config: str = pos("pipeline YAML (configs/pipelines/*.yaml)")
    overrides: list = pos("e.g. output_dir=runs/x inputs.alpaca=data/a.json vars.seeds=[0,1]", nargs="*",
                          metavar="KEY=VALUE")
    until: list = arg([], "run only STAGE and the stages it needs (repeatable)", metavar="STAGE")
    start: list = arg([], "run STAGE and every stage after it again, even if finished (repeatable)", flags=("--from",),
                      metavar="STAGE")
    no_progress: bool = arg(False, "no progress bars")


def run(cfg: Config) -> int:
    """1 a stage failed, 3 training diverged, 128+N a signal stopped training (``pipeline/commands.py``)."""
    from tuna_jax.pipeline.commands import run_and_report

    return run_and_report(cfg.config, cfg.overrides, cfg.until, cfg.start, not cfg.no_progress)

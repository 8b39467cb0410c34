"""What ``tuna-jax pipeline CONFIG`` and ``tuna-jax demo`` (the packaged pipeline ``demo.yaml``) do; their flags:
``commands/pipeline.py``, ``commands/demo.py``."""
from __future__ import annotations

import os
import sys

from tuna_jax.io import paths
from tuna_jax.io.cli import error_line
from tuna_jax.io.errors import RunStopped

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO, DEMO_FAST, OBJECTIVES = (os.path.join(HERE, f) for f in ("demo.yaml", "demo_fast.yaml", "objectives.yaml"))


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

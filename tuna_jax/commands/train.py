"""Train one stage. CONFIG is a YAML file (see configs/); overrides are section.key=value, e.g. optim.lr=1e-5
train.global_batch=64 data.train=ranked.jsonl, or a YAML file merged where it stands (a topology preset:
configs/topologies/v5e-16.yaml). Unknown keys are errors."""
from __future__ import annotations

import dataclasses

from tuna_jax.io.fields import arg, pos

HELP = "train a stage (SFT, ranking or a PRM) from a YAML config"


@dataclasses.dataclass(kw_only=True)
class Config:
    config: str = pos("YAML config (configs/tuna_p.yaml, ...)")
    overrides: list = pos("section.key=value, or a YAML file merged where it stands", nargs="*", metavar="KEY=VALUE")
    resume: bool = arg(False, "continue from the latest checkpoint in train.output_dir (params, optimizer, step, RNG "
                       "and data position)")


def run(cfg: Config) -> int:
    from tuna_jax.config import load_config

    return run_loaded(load_config(cfg.config, cfg.overrides), cfg.resume)


def run_loaded(config, resume: bool) -> int:
    """Train the loaded training ``config`` and print what it did (`prm train` checks its mode first)."""
    from tuna_jax.train import train

    # A stop (signal, divergence) is one line and its status: io.cli.run_command.
    result = train(config, resume=resume)
    summary = {k: round(v, 5) if isinstance(v, float) else v for k, v in result.metrics.items()}
    print(f"finished at step {result.step}: {summary}")
    if result.eval_metrics:
        print(f"held-out: {result.eval_metrics}")
        if result.first_eval and "pair_accuracy" in result.first_eval:
            print(f"held-out pair accuracy {result.first_eval['pair_accuracy']:.3f} -> "
                  f"{result.eval_metrics['pair_accuracy']:.3f} ({result.eval_metrics.get('pairs')} pairs)")
    if result.export_dir:
        print(f"params export: {result.export_dir}")
    return 0

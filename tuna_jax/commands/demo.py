"""The pipeline tuna_jax/pipeline/demo.yaml: SFT a teacher and an 'Alpaca', gather probabilistic (teacher) and
contextual (diverse samples + metric judge) rankings, train Tuna_p and Tuna next to MLE-only controls, evaluate every
stage on held-out prompts and export Hugging Face weights. No download, no GPU, no API key; under 10 minutes on 2 CPU
cores. Rerunning continues where it stopped."""
from __future__ import annotations

import dataclasses

from tuna_jax.io.fields import arg

HELP = "the whole Tuna pipeline on the shipped stories260K model (CPU, offline)"


@dataclasses.dataclass(kw_only=True)
class Config:
    out: str = arg("runs/demo", "output folder")
    fast: bool = arg(False, "a smaller run (used by the tests)")
    objectives: bool = arg(False, "train the demo's Tuna_p stage with every ranking objective (loss.form) next to its "
                           "MLE-only control (tuna_jax/pipeline/objectives.yaml)")


def run(cfg: Config) -> int:
    from tuna_jax.pipeline.commands import demo

    return demo(cfg.out, fast=cfg.fast, objectives=cfg.objectives)

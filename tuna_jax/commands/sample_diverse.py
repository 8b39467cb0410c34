"""Contextual ranking candidates (Tuna_c): N samples per instruction from MODEL; while some pair has ROUGE-L F >= tau,
sample again 0.1 hotter -- only the too-similar responses (--mode similar, the paper's description) or the whole set
(--mode set, the reference code) -- up to 3 trials, else keep the least similar set. Output lines {id, instruction,
input, output?, candidates, diversity} are the input of `tuna-jax judge`. A rerun skips instructions already in
OUT. With --base-url a serving engine samples (``tuna_jax/serving.py``), with the same records and counters."""
from __future__ import annotations

import dataclasses
import sys

from tuna_jax.commands.shared import Progress, Runtime, Sampling, Served
from tuna_jax.feedback.diverse import DiverseSettings
from tuna_jax.io.fields import arg, pos

HELP = "N diverse samples per instruction (pairwise ROUGE-L < tau)"


@dataclasses.dataclass(kw_only=True)
class Config(DiverseSettings, Sampling, Runtime, Served, Progress):
    model: str = pos("HF folder or tuna-jax params checkpoint (the model being tuned)")
    input: str = pos("Alpaca-format instructions: JSON list or JSONL of {id?, instruction, input?, output?}")
    out: str = pos("output JSONL (appended to; a rerun resumes)")
    items_per_call: int | None = arg(None, "instructions sampled together and written per flush (default: 4 x "
                                     "batch-size / n)")
    limit: int | None = arg(None, "only the first LIMIT instructions")


def run(cfg: Config) -> int:
    """Sample, write, report (also to OUT.report.json)."""
    from tuna_jax.feedback.diverse import run_diverse

    def diverse(sampler=None, mesh=None):
        return run_diverse(cfg.model, cfg.input, cfg.out, cfg, tokenizer=cfg.tokenizer,
                           max_new_tokens=cfg.max_new_tokens, top_p=cfg.top_p, top_k=cfg.top_k, seed=cfg.seed,
                           batch_size=cfg.batch_size, max_prompt_len=cfg.max_prompt_len,
                           items_per_call=cfg.items_per_call, mesh=mesh, dtype=cfg.dtype, limit=cfg.limit,
                           progress=not cfg.no_progress, sampler=sampler)

    if cfg.base_url:
        status, report = cfg.run_served("sample-diverse", cfg.model, cfg.out, diverse)
        if status:
            return status
    else:
        report = diverse(mesh=cfg.make_mesh())
    print(f"sample-diverse: {report.line()}", file=sys.stderr)
    if report.empty_candidates:
        print(f"sample-diverse: {report.empty_candidates} empty candidate(s) kept: ranking records cannot train on "
              f"them (the records reader reports them)", file=sys.stderr)
    return 0

"""Contextual ranking candidates (Tuna_c): N samples per instruction from MODEL; while some pair has ROUGE-L F >= tau,
sample again 0.1 hotter -- only the too-similar responses (--mode similar, the paper's description) or the whole set
(--mode set, the reference code) -- up to 3 trials, else keep the least similar set. Output lines {id, instruction,
input, output?, candidates, diversity} are the input of `tuna-jax judge`. A rerun skips instructions already in
OUT. With --base-url a serving engine samples (``tuna_jax/serving.py``), with the same records and counters."""
from __future__ import annotations

import contextlib
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
    from tuna_jax.io.cli import report_stop
    from tuna_jax.io.items import StopRun

    with contextlib.ExitStack() as stack:
        served = cfg.served_sampler(cfg.model, cfg.out, stack) if cfg.base_url else None
        try:
            report = run_diverse(cfg.model, cfg.input, cfg.out, cfg, tokenizer=cfg.tokenizer,
                                 max_new_tokens=cfg.max_new_tokens, top_p=cfg.top_p, top_k=cfg.top_k,
                                 seed=cfg.seed, batch_size=cfg.batch_size, max_prompt_len=cfg.max_prompt_len,
                                 items_per_call=cfg.items_per_call, mesh=None if served else cfg.make_mesh(),
                                 dtype=cfg.dtype, limit=cfg.limit, progress=not cfg.no_progress, sampler=served)
        except StopRun as e:
            if served is None:
                raise
            return report_stop("sample-diverse", e, served.client.store)
        if served is not None:
            print(f"sample-diverse: {served.client.store.summary()}", file=sys.stderr)
    print(f"sample-diverse: {report.line()}", file=sys.stderr)
    if report.empty_candidates:
        print(f"sample-diverse: {report.empty_candidates} empty candidate(s) kept: ranking records cannot train on "
              f"them (the records reader reports them)", file=sys.stderr)
    return 0

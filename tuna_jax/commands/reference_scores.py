"""Join a native ranking file with the `tuna-jax score` output for it (made with the starting model) line by line,
checking index, id and candidate counts, and write the ranking rows with ref_logprob_sum / ref_num_tokens added."""
from __future__ import annotations

import dataclasses

from tuna_jax.io.fields import pos

HELP = ("store a frozen reference model's `tuna-jax score` output with ranking data (ref_logprob_sum, "
        "ref_num_tokens), for loss.reference=data")


@dataclasses.dataclass(kw_only=True)
class Config:
    ranked: str = pos("native ranking JSONL (the file that was scored)")
    scores: str = pos("`tuna-jax score` output for it")
    out: str = pos("output ranking JSONL (may be RANKED itself)")


def run(cfg: Config) -> int:
    from tuna_jax.data.reference import attach_reference_scores

    print(attach_reference_scores(cfg.ranked, cfg.scores, cfg.out).summary(cfg.out))
    return 0

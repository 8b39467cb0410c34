"""Each input line: {instruction, input?, candidates: [str]} or pre-tokenised {prompt_ids, candidate_ids}. Each output
line: {index, id?, candidates: [{logprob_sum, num_tokens}], logprob_sum: [...], num_tokens: [...]}."""
from __future__ import annotations

import dataclasses
import sys

from tuna_jax.commands.shared import Runtime
from tuna_jax.io.fields import arg, pos

HELP = "exact log-likelihoods of candidates (response tokens + EOS)"


@dataclasses.dataclass(kw_only=True)
class Config(Runtime):
    model: str = pos("HF folder or tuna-jax params checkpoint")
    data: str = pos("input JSONL")
    out: str = pos("output JSONL")
    batch_size: int = arg(8, "input lines (prompts) per forward pass")
    max_len: int | None = arg(None, "longest prompt+candidate (default: model maximum)")
    layout: str = arg("auto", "how candidates are laid out (the training layouts; same numbers, different speed; "
                      "auto: the platform's fastest)", choices=("auto", "padded", "prefix_shared", "packed"))


def run(cfg: Config) -> int:
    from tuna_jax.model import load_model
    from tuna_jax.scoring import make_candidate_encoder, read_lines, score_file

    lines = read_lines(cfg.data)  # every line checked before the model loads
    mesh = cfg.make_mesh()
    model = load_model(cfg.model, mesh, dtype=cfg.dtype, param_dtype="float32")
    encoder = None
    try:
        encoder = make_candidate_encoder(cfg.tokenizer or cfg.model)
    except (FileNotFoundError, OSError, ValueError) as e:
        print(f"note: no tokenizer ({e}); only pre-tokenised lines can be scored", file=sys.stderr)
    n = score_file(model, cfg.data, cfg.out, encoder=encoder, mesh=mesh, batch_rows=cfg.batch_size,
                   max_len=cfg.max_len, lines=lines, layout=cfg.layout)
    print(f"scored {n} lines -> {cfg.out}")
    return 0

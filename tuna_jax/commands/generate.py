"""Sample continuations with a model. Each input line: {id?, instruction, input?} (formatted with the Alpaca
template, BOS prepended), {prompt: str} (raw text, BOS prepended) or {prompt_ids: [int]} (used as given). Each
output line: {index, id?, samples: [{text, token_ids, token_logprobs, finish_reason}]}; token_ids include the EOS
token when finish_reason is 'stop'; token_logprobs are log p under the model at temperature 1. A rerun skips lines
already in OUT."""
from __future__ import annotations

import dataclasses
import sys

from tuna_jax.commands.shared import Runtime, Sampling, Served
from tuna_jax.io.fields import arg, pos

HELP = "sample responses (greedy, temperature, top-p/top-k) with token log-probs"


@dataclasses.dataclass(kw_only=True)
class Config(Sampling, Runtime, Served):
    model: str = pos("HF folder or tuna-jax params checkpoint")
    prompts: str = pos("input JSONL")
    out: str = pos("output JSONL (appended to; a rerun resumes)")
    n: int = arg(1, "samples per prompt")
    temperature: float = arg(1.0, "0 = greedy")
    sampling_logprobs: bool = arg(False, "also write each token's log-prob under the sampling distribution")


def run(cfg: Config) -> int:
    """Load the model and tokenizer, generate, report."""
    from tuna_jax.data.templates import load_tokenizer
    from tuna_jax.generate import Sampler, SamplingParams, generate_file, is_main_process, read_prompts
    from tuna_jax.model import load_model

    params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                            max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    if cfg.n < 1:
        raise ValueError(f"--n {cfg.n}: must be >= 1")
    prompts = read_prompts(cfg.prompts)  # every line checked before the model loads
    if cfg.base_url:
        return _run_served(cfg, params, prompts)
    mesh = cfg.make_mesh()
    tokenizer = None
    try:
        tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    except (FileNotFoundError, OSError, ValueError) as e:
        if cfg.tokenizer:
            raise
        print(f"note: no tokenizer with the model ({e}); only prompt_ids lines can be generated from and "
              f"'text' will be null", file=sys.stderr)
    model = load_model(cfg.model, mesh, dtype=cfg.dtype, param_dtype="float32")
    if tokenizer is not None and tokenizer.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} tokens but the model's vocabulary "
                         f"is {model.cfg.vocab_size}: they do not belong together")
    sampler = Sampler(model, tokenizer, mesh=mesh, batch_size=cfg.batch_size, max_prompt_len=cfg.max_prompt_len)
    n = generate_file(sampler, cfg.prompts, cfg.out, params, n=cfg.n, sampling_logprobs=cfg.sampling_logprobs,
                      progress=is_main_process(), meta={"dtype": cfg.dtype}, prompts=prompts)
    print(f"generated {n} lines ({cfg.n} samples each) -> {cfg.out}")
    return 0


def _run_served(cfg: Config, params, prompts) -> int:
    """``--base-url``: the serving engine generates; 0 done, 2 stopped (budget or a fatal endpoint error)."""
    from tuna_jax.generate import generate_file

    if cfg.sampling_logprobs:
        raise ValueError("--sampling-logprobs: a serving engine does not report the sampling distribution's "
                         "log-probs; drop the flag or generate locally")
    status, n = cfg.run_served("generate", cfg.model, cfg.out, lambda sampler: generate_file(
        sampler, cfg.prompts, cfg.out, params, n=cfg.n, progress=True, prompts=prompts))
    if status == 0:
        print(f"generated {n} lines ({cfg.n} samples each) -> {cfg.out}")
    return status

"""Probabilistic ranking data (Tuna_p): a teacher LLM samples N responses per instruction with token log-probs;
each response is scored s = logp / |r|^beta and the candidates are written best first as ranking records
(JSONL). Every request is cached in an append-only store, so rerunning the same command after a crash or a
budget stop pays for nothing twice and gives the same output."""
from __future__ import annotations

import dataclasses
import sys

from tuna_jax.commands.shared import DTYPES, MESH_HELP, TOKENIZER_HELP, Budget, Endpoint, Progress, endpoint_session
from tuna_jax.feedback.local import RESCORE
from tuna_jax.feedback.teacher import SCORING, TeacherSettings
from tuna_jax.io.fields import arg, pos

HELP = "probabilistic ranking: N teacher responses + log-likelihoods, s = logp / |r|^beta"
LOCAL = ("local teacher (a tuna-jax model on this machine instead of an endpoint; --n, --temperature, --top-p, "
         "--max-tokens, --seed, --beta, --store apply; endpoint options are ignored)")


@dataclasses.dataclass(kw_only=True)
class Config(TeacherSettings, Endpoint, Budget, Progress):
    input: str = pos("Alpaca-format instructions: JSON list or JSONL of {instruction, input, output}")
    out: str = pos("output JSONL of ranking records (failures go to OUT.failed.jsonl)")
    model: str | None = arg(None, "model name as the server knows it (required unless --local-model is given)",
                            group="endpoint (OpenAI-compatible: OpenAI, vLLM, SGLang, llama.cpp)")
    limit: int | None = arg(None, "only the first LIMIT instructions", group=SCORING)
    local_model: str | None = arg(None, "HF folder or tuna-jax params checkpoint of the teacher; sampled with "
                                  "tuna-jax, token log-probs exact (response tokens + EOS)", metavar="PATH",
                                  group=LOCAL)
    local_tokenizer: str | None = arg(None, TOKENIZER_HELP, metavar="PATH", group=LOCAL)
    local_top_k: int = arg(0, "keep the k most likely tokens (0 = off)", group=LOCAL)
    local_batch_size: int = arg(8, "sampler rows per device call (>= --n)", group=LOCAL)
    local_max_prompt_len: int | None = arg(None, "longer prompts fail their item (default: only the model's "
                                           "context length limits)", group=LOCAL)
    local_dtype: str = arg("float32", "compute dtype", choices=DTYPES, group=LOCAL)
    local_mesh: str | None = arg(None, MESH_HELP, metavar="DATA,FSDP,TENSOR", group=LOCAL)
    local_rescore: str = arg("noncanonical", "re-score samples by teacher forcing: 'noncanonical' (those whose "
                             "sampled tokens are not the tokenizer's segmentation of their text), 'always' or "
                             "'never'", choices=RESCORE, group=LOCAL)


def run(cfg: Config) -> int:
    """0 done, 1 some items failed (see OUT.failed.jsonl), 2 stopped (budget or a fatal endpoint error; rerun to
    continue). The input is read and checked before anything else happens: a bad row costs no request, loads no
    model and leaves no store behind."""
    from tuna_jax.data.rows import read_instructions
    from tuna_jax.feedback.teacher import RemoteTeacher, run_teacher
    from tuna_jax.io.cli import report_run

    if not cfg.local_model and not cfg.model:
        raise ValueError("--model is required (the endpoint's model name), or give --local-model PATH")
    items = read_instructions(cfg.input, cfg.limit)
    if cfg.local_model:
        return _run_local(cfg, items)
    with endpoint_session(cfg, cfg.out) as (client, store):
        backend = RemoteTeacher(client, cfg)
        meta = {"model": cfg.model, "api": cfg.api, "temperature": cfg.temperature, "max_tokens": cfg.max_tokens}
        return report_run("teacher", lambda: run_teacher(cfg.input, cfg.out, backend, cfg, meta=meta,
                                                         concurrency=cfg.concurrency, items=items,
                                                         progress=not cfg.no_progress),
                          store, "item(s) failed, listed in")


def _run_local(cfg: Config, items: list) -> int:
    """``--local-model PATH``: 0 done, 1 some items failed (OUT.failed.jsonl); Ctrl-C stops it (rerun the same
    command to continue from the store)."""
    from tuna_jax import parallel
    from tuna_jax.feedback.local import LocalTeacher
    from tuna_jax.feedback.teacher import run_teacher
    from tuna_jax.io.cli import report_run

    parallel.initialize_distributed()
    mesh = parallel.make_mesh(cfg.local_mesh)
    seed = max(cfg.seed, 0)
    with cfg.open_store(cfg.out) as store:
        backend = LocalTeacher(cfg.local_model, tokenizer=cfg.local_tokenizer, mesh=mesh,
                               temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.local_top_k,
                               max_new_tokens=cfg.max_tokens, seed=seed, batch_size=cfg.local_batch_size,
                               max_prompt_len=cfg.local_max_prompt_len, dtype=cfg.local_dtype,
                               rescore=cfg.local_rescore, store=store)
        meta = {"model": cfg.model or cfg.local_model, "api": "local", "temperature": cfg.temperature,
                "top_p": cfg.top_p, "top_k": cfg.local_top_k, "max_tokens": cfg.max_tokens, "seed": seed}
        # One item at a time: the device is the bottleneck, threads would only queue on it.
        status = report_run("teacher", lambda: run_teacher(cfg.input, cfg.out, backend, cfg, meta=meta,
                                                           concurrency=1, items=items, progress=not cfg.no_progress),
                            store, "item(s) failed, listed in")
        print(f"teacher (local): {backend.stats.line()}", file=sys.stderr)
        return status

"""Proxy ranking model: a LLaMA with a scalar head on the EOS hidden state, trained on judge rankings with the Tuna
pairwise loss (`prm train`), then used to rank candidates of more data (`prm rerank`); ``feedback/prm.py``."""
from __future__ import annotations

import dataclasses
import sys

from tuna_jax.commands.shared import Progress, Runtime
from tuna_jax.feedback.prm import PRMSettings
from tuna_jax.io.fields import arg, pos

HELP = "proxy ranking model: train on judge rankings, re-rank more data"
TRAIN_HELP = "train a PRM on ranking records"
TRAIN_DESCRIPTION = (
    "Train a PRM from BASE (HF folder or params checkpoint) on ranking records (native, or any format `tuna-jax "
    "train` reads; higher score = better) and save it to OUT_DIR (backbone/, head.safetensors, prm.json, "
    "metrics.jsonl). Held-out pair accuracy is logged before and after training.")
RERANK_HELP = "rank candidates with a trained PRM"
RERANK_DESCRIPTION = (
    "Score each candidate of INPUT ({id?, instruction, input?, output?, candidates: [str]}, e.g. `tuna-jax "
    "sample-diverse` output) with the PRM and write ranking records, candidates best first, scores = rewards.")


@dataclasses.dataclass(kw_only=True)
class Train(PRMSettings, Runtime, Progress):
    base: str = pos("backbone: HF folder or tuna-jax params checkpoint (e.g. the Alpaca model)")
    train: str = pos("ranking records JSON/JSONL (e.g. `tuna-jax judge` output)")
    out_dir: str = pos("where the PRM is written")
    eval: str | None = arg(None, "held-out ranking records (default: --eval-fraction of train)")
    resume: bool = arg(False, "continue from OUT_DIR's last checkpoint (the trainer's exact resume; the default "
                       "starts over)")


@dataclasses.dataclass(kw_only=True)
class Rerank(Runtime, Progress):
    prm: str = pos("a PRM folder written by `tuna-jax prm train`")
    input: str = pos("JSON/JSONL rows with candidates")
    out: str = pos("output JSONL of ranking records (unscorable rows go to OUT.failed.jsonl)")
    batch_size: int = arg(8, "sequences per forward pass")
    max_len: int | None = arg(None, "tokens per sequence (default: the PRM's training max_len)")
    limit: int | None = arg(None, "only the first LIMIT rows")


def run_train(cfg: Train) -> int:
    """0 done; 3 the loss diverged (nothing saved), 128+N stopped by signal N (checkpoint saved): a stop is one
    line and its status (``io.cli.run_command``)."""
    from tuna_jax.feedback.prm import train_prm

    res = train_prm(cfg.base, cfg.train, cfg.out_dir, cfg, eval_path=cfg.eval, tokenizer=cfg.tokenizer,
                    mesh=cfg.make_mesh(), dtype=cfg.dtype, progress=not cfg.no_progress, resume=cfg.resume)
    msg = f"prm train: {res.steps} steps, last batch {res.last_train.get('loss', float('nan')):.4f} loss"
    if res.final_eval:
        msg += (f"; held-out pair accuracy {res.start_eval['pair_accuracy']:.3f} -> "
                f"{res.final_eval['pair_accuracy']:.3f} ({res.final_eval['pairs']} pairs)")
    print(f"{msg}; saved {res.out_dir}")
    return 0


def run_rerank(cfg: Rerank) -> int:
    """0 done; 1 some rows could not be scored (listed in OUT.failed.jsonl)."""
    import jax

    from tuna_jax.data.rows import read_candidates
    from tuna_jax.feedback.prm import load_prm, rerank_file

    mesh = cfg.make_mesh()
    items = read_candidates(cfg.input, limit=cfg.limit)  # checked before the PRM loads
    prm = load_prm(cfg.prm, mesh, cfg.dtype)
    with jax.set_mesh(mesh):
        summary = rerank_file(prm, cfg.input, cfg.out, tokenizer=cfg.tokenizer, batch_rows=cfg.batch_size,
                              max_len=cfg.max_len, limit=cfg.limit, progress=not cfg.no_progress, items=items)
    print(f"prm rerank: {summary.line()} -> {cfg.out}", file=sys.stderr)
    if summary.failed:
        print(f"prm rerank: {summary.failed} row(s) could not be scored, listed in {cfg.out}.failed.jsonl",
              file=sys.stderr)
        return 1
    return 0

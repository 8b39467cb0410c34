"""Proxy ranking model: a backbone with a scalar reward head on the EOS hidden state, trained on judge rankings
with the Tuna pairwise loss (`prm train`: `tuna-jax train` with a ``train.mode=prm`` config, configs/prm.yaml),
then used to rank candidates of more data (`prm rerank`; ``feedback/prm.py``)."""
from __future__ import annotations

import dataclasses
import sys

from tuna_jax.commands import train as train_cmd
from tuna_jax.commands.shared import Progress, Runtime
from tuna_jax.io.fields import arg, pos

HELP = "proxy ranking model: train on judge rankings, re-rank more data"
TRAIN_HELP = "train a PRM: `tuna-jax train` with a train.mode=prm config (configs/prm.yaml)"
TRAIN_DESCRIPTION = (
    "Train a PRM with the project's one trainer: exactly `tuna-jax train CONFIG [KEY=VALUE ...]`, for a config with "
    "train.mode=prm, e.g. `tuna-jax prm train configs/prm.yaml model.path=ALPACA data.train=judge_ranked.jsonl "
    "train.output_dir=runs/prm`. The PRM folder (backbone/, head.safetensors, prm.json) is written to "
    "train.output_dir/final; held-out pair accuracy is logged before and after training.")
RERANK_HELP = "rank candidates with a trained PRM"
RERANK_DESCRIPTION = (
    "Score each candidate of INPUT ({id?, instruction, input?, output?, candidates: [str]}, e.g. `tuna-jax "
    "sample-diverse` output) with the PRM and write ranking records, candidates best first, scores = rewards.")

Train = train_cmd.Config  # one declaration: `prm train` takes exactly `train`'s arguments


@dataclasses.dataclass(kw_only=True)
class Rerank(Runtime, Progress):
    prm: str = pos("a PRM folder written by `tuna-jax prm train`")
    input: str = pos("JSON/JSONL rows with candidates")
    out: str = pos("output JSONL of ranking records (unscorable rows go to OUT.failed.jsonl)")
    batch_size: int = arg(8, "sequences per forward pass")
    max_len: int | None = arg(None, "tokens per sequence (default: the PRM's training max_len)")
    limit: int | None = arg(None, "only the first LIMIT rows")


def run_train(cfg: Train) -> int:
    """`tuna-jax train`'s run, for a PRM config only (another mode is refused before anything is read)."""
    from tuna_jax.config import ConfigError, load_config

    config = load_config(cfg.config, cfg.overrides)
    if config.train.mode != "prm":
        raise ConfigError(f"{cfg.config}: train.mode={config.train.mode}; `prm train` trains a PRM (train.mode=prm, "
                          f"e.g. configs/prm.yaml); use `tuna-jax train` for other stages")
    return train_cmd.run_loaded(config, cfg.resume)


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

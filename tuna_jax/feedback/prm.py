"""Proxy ranking model (PRM): a LLaMA with a scalar head, trained on judge rankings, then used to rank
more data without paying the judge (``tuna-jax prm train|rerank``; the paper's Tuna_c(PRM)).

The model (``model/reward.py``): r(i, c) = w . h_last + b, h_last the backbone's final-norm hidden
state at the EOS of ``[BOS] + prompt + response + [EOS]``; every token goes through the project's one
template and BOS/EOS policy, exactly as in training. The saved folder format is described there.

Training goes through the project's one trainer (``train.mode=prm``, ``tuna_jax/train.py``): each
ranking record (instruction, N candidates, scores: higher is better, e.g. a judge's Borda scores)
gives rewards r [N]; the loss is ``losses.ranking_loss(r, scores, mask, margin, form)`` averaged over
prompts, backbone and head trained together with AdamW, in any candidate layout, with gradient
accumulation, exact resume, SIGTERM checkpoints and metrics.jsonl like every other stage. The head
starts random (std 1/sqrt(D), numpy-seeded), so the held-out pair accuracy at step 0 is a fair
chance-level baseline, logged next to the final one. ``OUT_DIR`` holds the PRM folder (prm.json,
head.safetensors, backbone/) beside the trainer's checkpoints/ and metrics.jsonl.

Rerank. Input rows ``{id?, instruction, input?, output?, candidates: [str]}`` (e.g. ``sample-diverse``
output); each candidate gets its reward and the row is written as a ranking record, candidates best first
(stable on their input order), ``scores`` = rewards, plus ``prm: {model, dropped}``. Empty candidates
cannot be scored (no response tokens) and are dropped and listed; a row with none left goes to
OUT.failed.jsonl. Prompts too long for ``max_len`` are cut from the left after the BOS, as in training.

The command (its flags, ``PRMSettings``) is ``tuna_jax/commands/prm.py``.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import TYPE_CHECKING, Sequence

from tuna_jax.io import paths
from tuna_jax.io.fields import arg
from tuna_jax.io.jsonl import dumps
from tuna_jax.io.lock import OutputLock


@dataclasses.dataclass(kw_only=True)
class PRMSettings:
    """Training settings (the trainer's ``train.mode=prm``, through :func:`train_config`). batch_size: prompts
    per step (each with up to num_candidates responses); max_len: tokens per sequence (prompt cut from the left to
    fit); pad_to_multiple: batch length = the batch's longest rounded up to this (0: always max_len, one compiled
    shape); eval_fraction: held out of the training records when no eval file is given."""

    eval_fraction: float = arg(0.0, "held out of train when --eval is not given")
    max_len: int = arg(512, "tokens per sequence; longer prompts are cut from the left")
    num_candidates: int = arg(4, "most candidates per record")
    batch_size: int = arg(8, "prompts per step")
    epochs: int = arg(1, "passes over the data")
    max_steps: int | None = arg(None, "stop after this many steps")
    lr: float = arg(1e-5, "peak learning rate (AdamW)")
    warmup_steps: int = arg(2, "linear warmup steps")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    grad_clip: float = arg(1.0, "global-norm gradient clip (0: off)")
    margin: float = arg(0.1, "ranking-loss margin m (paper: 0.1)")
    seed: int = arg(0, "data and head seed")
    pad_to_multiple: int = arg(64, "batch length rounded up to this (0: always max_len)")
    schedule: str = arg("cosine", "learning-rate decay after warmup", choices=("cosine", "linear", "constant"))
    form: str = arg("paper", "ranking loss form, see losses.ranking_loss", choices=("paper", "reference"))
    on_error: str = arg("raise", "a bad record stops the run, or is skipped and counted", choices=("raise", "skip"))

    def __post_init__(self):
        if self.form not in ("paper", "reference"):
            raise ValueError(f"form={self.form!r}: choose 'paper' or 'reference'")
        if self.margin < 0:
            raise ValueError(f"margin={self.margin}: must be >= 0")
        if self.batch_size < 1 or self.epochs < 1 or self.num_candidates < 2:
            raise ValueError("batch_size and epochs must be >= 1 and num_candidates >= 2")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction={self.eval_fraction}: must be in [0, 1)")


if TYPE_CHECKING:
    from tuna_jax.model.reward import ProxyRankingModel


# ---------------------------------------------------------------------------- training
@dataclasses.dataclass
class PRMTrainResult:
    steps: int
    start_eval: dict | None  # {"loss", "pair_accuracy", "pairs"} on the held-out set before training
    final_eval: dict | None
    last_train: dict
    out_dir: str
    prm: "ProxyRankingModel"  # the trained model, as saved in out_dir


def train_config(base_model: str | os.PathLike, train_path: str, out_dir: str | os.PathLike, cfg: PRMSettings,
                 *, eval_path: str | None = None, tokenizer: str | None = None, mesh=None, dtype: str = "float32",
                 progress: bool = True, overrides: Sequence[str] = ()):
    """The trainer config (``train.mode=prm``) for these PRM settings; ``overrides`` go on top."""
    from tuna_jax.config import load_config

    mesh_spec = None if mesh is None else ",".join(str(mesh.shape[a]) for a in ("data", "fsdp", "tensor"))
    return load_config(None, [
        "train.mode=prm", f"model.path={base_model}", f"model.dtype={dtype}", f"data.train={train_path}",
        f"data.max_len={cfg.max_len}", f"data.num_candidates={cfg.num_candidates}",
        f"data.pad_to_multiple={cfg.pad_to_multiple}", f"data.eval_fraction={cfg.eval_fraction}",
        f"data.on_error={cfg.on_error}",
        f"train.output_dir={out_dir}", f"train.epochs={cfg.epochs}", f"train.global_batch={cfg.batch_size}",
        f"train.seed={cfg.seed}", f"train.progress={progress}", "train.tensorboard=false",
        f"optim.lr={cfg.lr}", f"optim.warmup_steps={cfg.warmup_steps}", f"optim.schedule={cfg.schedule}",
        f"optim.weight_decay={cfg.weight_decay}", f"optim.grad_clip={cfg.grad_clip}",
        f"loss.margin={cfg.margin}", f"loss.form={cfg.form}",
        *([f"train.max_steps={cfg.max_steps}"] if cfg.max_steps else []),
        *([f"data.eval={eval_path}"] if eval_path else []), *([f"model.tokenizer={tokenizer}"] if tokenizer else []),
        *([f"train.mesh={mesh_spec}"] if mesh_spec else []), *overrides])


def train_prm(base_model: str | os.PathLike, train_path: str, out_dir: str | os.PathLike,
              cfg: PRMSettings | None = None, *, eval_path: str | None = None, tokenizer: str | None = None,
              mesh=None, dtype: str = "float32", progress: bool = True, resume: bool = False) -> PRMTrainResult:
    """Train a PRM from ``base_model`` (HF folder or params checkpoint) on the ranking records of
    ``train_path`` with the project's one trainer (``train.mode=prm``: gradient accumulation, exact
    resume, SIGTERM checkpoints, metrics.jsonl), save it to ``out_dir`` and load it back; return the
    held-out pair accuracy before and after. ``mesh``: its shape becomes ``train.mesh``."""
    from tuna_jax.model.reward import ProxyRankingModel, eval_summary
    from tuna_jax.train import train

    cfg = cfg or PRMSettings()
    res = train(train_config(base_model, train_path, out_dir, cfg, eval_path=eval_path, tokenizer=tokenizer,
                             mesh=mesh, dtype=dtype, progress=progress), resume=resume)
    prm = ProxyRankingModel.load(res.output_dir, mesh, dtype)
    start = res.first_eval or prm.meta.get("metrics", {}).get("start_eval")
    return PRMTrainResult(res.step, eval_summary(start), eval_summary(res.eval_metrics), res.metrics, res.output_dir,
                          prm)


# ---------------------------------------------------------------------------- rerank
@dataclasses.dataclass
class RerankSummary:
    items: int = 0
    written: int = 0
    failed: int = 0
    dropped_candidates: int = 0
    truncated_prompts: int = 0

    def line(self) -> str:
        return (f"items: {self.items}, written: {self.written}, failed: {self.failed}, dropped candidates "
                f"(empty): {self.dropped_candidates}, prompts cut to max_len: {self.truncated_prompts}")


def rerank_file(prm: "ProxyRankingModel", input_path: str, out_path: str, *, tokenizer=None, batch_rows: int = 8,
                max_len: int | None = None, items_per_flush: int = 256, limit: int | None = None,
                progress: bool = True, items: list | None = None) -> RerankSummary:
    """Score every candidate of ``input_path`` with ``prm`` and write ranking records (module docstring).

    tokenizer: a ``templates.Tokenizer`` or path (default: the PRM folder's backbone/). max_len: default
    the PRM's training max_len. Output goes through OUT.partial, renamed when complete; rows that cannot
    be scored go to OUT.failed.jsonl (absent when none)."""
    from tqdm import tqdm

    from tuna_jax.data.batching import tokenize_ranking
    from tuna_jax.data.records import DataError, RankingRecord, SkipReport
    from tuna_jax.data.rows import read_candidates
    from tuna_jax.data.templates import SpecialTokenPolicy, load_tokenizer

    if tokenizer is None and prm.path is None:
        raise ValueError("rerank needs a tokenizer: this PRM was not loaded from a folder")
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer or os.path.join(prm.path, "backbone"))
    policy = SpecialTokenPolicy(add_bos=prm.meta.get("add_bos", True), add_eos=prm.meta.get("add_eos", True))
    max_len = max_len or prm.meta.get("max_len") or prm.cfg.max_position_embeddings
    items = read_candidates(input_path, limit=limit) if items is None else items
    summary = RerankSummary(items=len(items))
    partial, failed_path = out_path + ".partial", out_path + ".failed.jsonl"
    paths.makedirs(paths.parent(out_path))
    model_name = prm.path or "prm"
    failures = []
    # One run per OUT (OUT.lock): two would write one OUT.partial at once; an earlier OUT is set aside.
    with OutputLock(out_path, rewrites=True) as lock:
        with open(partial, "w", encoding="utf-8") as out, tqdm(total=len(items), desc="prm rerank", unit="ex",
                                                               disable=not progress, file=sys.stderr) as bar:
            for s in range(0, len(items), items_per_flush):
                group = items[s:s + items_per_flush]
                rows, owners, prepared = [], [], []
                for item in group:
                    keep = [k for k, c in enumerate(item.candidates) if c.strip()]
                    dropped = [{"index": k, "reason": "empty_response"} for k in range(len(item.candidates))
                               if k not in keep]
                    summary.dropped_candidates += len(dropped)
                    report = SkipReport()
                    rec = RankingRecord(item.instruction, item.input, item.output, [item.candidates[k] for k in keep],
                                        [0.0] * len(keep), str(item.id), source=item.where)
                    try:
                        if not keep:
                            raise DataError(item.where, "candidates", "no non-empty candidate to score",
                                            reason="empty_candidates")
                        (ex,), report = tokenize_ranking([rec], tokenizer, policy, max_len, len(keep),
                                                         mle_target="all", report=report)
                    except DataError as e:
                        failures.append({"id": item.id, "where": item.where, "error": str(e)})
                        prepared.append(None)
                        continue
                    summary.truncated_prompts += report.changed.get("prompt_truncated_left", 0)
                    prompt = [int(t) for t in ex.prompt_ids]
                    for k, resp in zip(keep, ex.responses):
                        rows.append(prompt + [int(t) for t in resp])
                        owners.append((len(prepared), k))
                    prepared.append((item, keep, dropped))
                rewards = prm.rewards(rows, batch_rows=batch_rows, max_len=max_len) if rows else []
                per_item: dict[int, dict[int, float]] = {}
                for (p, k), r in zip(owners, rewards):
                    per_item.setdefault(p, {})[k] = r
                for p, entry in enumerate(prepared):
                    if entry is None:
                        continue
                    item, keep, dropped = entry
                    order = sorted(keep, key=lambda k: (-per_item[p][k], k))  # best first, ties in input order
                    rec = {"id": item.id, "instruction": item.instruction, "input": item.input, "output": item.output,
                           "candidates": [item.candidates[k] for k in order], "scores": [per_item[p][k] for k in order],
                           "prm": {"model": model_name, "candidate_index": order, "dropped": dropped}}
                    out.write(dumps(rec) + "\n")
                    summary.written += 1
                out.flush()
                bar.update(len(group))
        summary.failed = len(failures)
        os.replace(partial, out_path)
        if failures:
            with open(failed_path, "w", encoding="utf-8") as f:
                f.writelines(dumps(x) + "\n" for x in failures)
        elif os.path.exists(failed_path):
            os.remove(failed_path)  # a stale failure list from an earlier run would mislead
        lock.commit()
    return summary


def load_prm(path: str | os.PathLike, mesh=None, dtype: str = "float32") -> "ProxyRankingModel":
    """A saved PRM folder (``model.reward.ProxyRankingModel.load``)."""
    from tuna_jax.model.reward import ProxyRankingModel

    return ProxyRankingModel.load(path, mesh, dtype)

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

jax is imported inside functions: ``tuna-jax --help`` builds this module's parser and must stay instant.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import TYPE_CHECKING, Sequence

from tuna_jax.io import paths
from tuna_jax.io.jsonl import dumps
from tuna_jax.io.lock import OutputLock

if TYPE_CHECKING:
    from tuna_jax.model.reward import ProxyRankingModel


@dataclasses.dataclass
class PRMConfig:
    """Training settings. batch_size: prompts per step (each with up to num_candidates responses);
    max_len: tokens per sequence (prompt cut from the left to fit); pad_to_multiple: batch length = the
    batch's longest rounded up to this (0: always max_len, one compiled shape); eval_fraction: held out
    of the training records when no eval file is given."""

    max_len: int = 512
    num_candidates: int = 4
    batch_size: int = 8
    epochs: int = 1
    max_steps: int | None = None
    lr: float = 1e-5
    warmup_steps: int = 2
    schedule: str = "cosine"
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    margin: float = 0.1
    form: str = "paper"
    seed: int = 0
    pad_to_multiple: int = 64
    eval_fraction: float = 0.0
    on_error: str = "raise"
    add_bos: bool = True
    add_eos: bool = True

    def __post_init__(self):
        if self.form not in ("paper", "reference"):
            raise ValueError(f"form={self.form!r}: choose 'paper' or 'reference'")
        if self.margin < 0:
            raise ValueError(f"margin={self.margin}: must be >= 0")
        if self.batch_size < 1 or self.epochs < 1 or self.num_candidates < 2:
            raise ValueError("batch_size and epochs must be >= 1 and num_candidates >= 2")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction={self.eval_fraction}: must be in [0, 1)")

    def optim(self):
        from tuna_jax.config import OptimConfig

        return OptimConfig(lr=self.lr, warmup_steps=self.warmup_steps, schedule=self.schedule,
                           weight_decay=self.weight_decay, grad_clip=self.grad_clip)


# ---------------------------------------------------------------------------- training
@dataclasses.dataclass
class PRMTrainResult:
    steps: int
    start_eval: dict | None  # {"loss", "pair_accuracy", "pairs"} on the held-out set before training
    final_eval: dict | None
    last_train: dict
    out_dir: str
    prm: "ProxyRankingModel"  # the trained model, as saved in out_dir


def train_config(base_model: str | os.PathLike, train_path: str, out_dir: str | os.PathLike, cfg: PRMConfig,
                 *, eval_path: str | None = None, tokenizer: str | None = None, mesh=None, dtype: str = "float32",
                 progress: bool = True, overrides: Sequence[str] = ()):
    """The trainer config (``train.mode=prm``) for these PRM settings; ``overrides`` go on top."""
    from tuna_jax.config import load_config

    mesh_spec = None if mesh is None else ",".join(str(mesh.shape[a]) for a in ("data", "fsdp", "tensor"))
    o = cfg.optim()
    return load_config(None, [
        "train.mode=prm", f"model.path={base_model}", f"model.dtype={dtype}", f"data.train={train_path}",
        f"data.max_len={cfg.max_len}", f"data.num_candidates={cfg.num_candidates}",
        f"data.pad_to_multiple={cfg.pad_to_multiple}", f"data.eval_fraction={cfg.eval_fraction}",
        f"data.on_error={cfg.on_error}", f"data.add_bos={cfg.add_bos}", f"data.add_eos={cfg.add_eos}",
        f"train.output_dir={out_dir}", f"train.epochs={cfg.epochs}", f"train.global_batch={cfg.batch_size}",
        f"train.seed={cfg.seed}", f"train.progress={progress}", "train.tensorboard=false",
        f"optim.lr={o.lr}", f"optim.warmup_steps={o.warmup_steps}", f"optim.schedule={o.schedule}",
        f"optim.weight_decay={o.weight_decay}", f"optim.grad_clip={o.grad_clip}",
        f"loss.margin={cfg.margin}", f"loss.form={cfg.form}",
        *([f"train.max_steps={cfg.max_steps}"] if cfg.max_steps else []),
        *([f"data.eval={eval_path}"] if eval_path else []), *([f"model.tokenizer={tokenizer}"] if tokenizer else []),
        *([f"train.mesh={mesh_spec}"] if mesh_spec else []), *overrides])


def train_prm(base_model: str | os.PathLike, train_path: str, out_dir: str | os.PathLike, cfg: PRMConfig = PRMConfig(),
              *, eval_path: str | None = None, tokenizer: str | None = None, mesh=None, dtype: str = "float32",
              progress: bool = True, resume: bool = False) -> PRMTrainResult:
    """Train a PRM from ``base_model`` (HF folder or params checkpoint) on the ranking records of
    ``train_path`` with the project's one trainer (``train.mode=prm``: gradient accumulation, exact
    resume, SIGTERM checkpoints, metrics.jsonl), save it to ``out_dir`` and load it back; return the
    held-out pair accuracy before and after. ``mesh``: its shape becomes ``train.mesh``."""
    from tuna_jax.model.reward import ProxyRankingModel, eval_summary
    from tuna_jax.train import train

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


# ---------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``tuna-jax prm train ...`` and ``tuna-jax prm rerank ...`` (sub-commands in ``args.prm_command``)."""
    parser.description = ("Proxy ranking model: a LLaMA with a scalar head on the EOS hidden state, trained on "
                          "judge rankings with the Tuna pairwise loss (train), then used to rank candidates of "
                          "more data (rerank).")
    sub = parser.add_subparsers(dest="prm_command", metavar="{train,rerank}", required=True)
    t = sub.add_parser("train", help="train a PRM on ranking records", description=(
        "Train a PRM from BASE (HF folder or params checkpoint) on ranking records (native, or any format "
        "`tuna-jax train` reads; higher score = better) and save it to OUT_DIR (backbone/, head.safetensors, "
        "prm.json, metrics.jsonl). Held-out pair accuracy is logged before and after training."))
    t.add_argument("base", help="backbone: HF folder or tuna-jax params checkpoint (e.g. the Alpaca model)")
    t.add_argument("train", help="ranking records JSON/JSONL (e.g. `tuna-jax judge` output)")
    t.add_argument("out_dir", help="where the PRM is written")
    t.add_argument("--eval", default=None, help="held-out ranking records (default: --eval-fraction of train)")
    t.add_argument("--eval-fraction", type=float, default=0.0, help="held out of train when --eval is not given")
    d = PRMConfig()
    for name, typ, hlp in (("max_len", int, "tokens per sequence; longer prompts are cut from the left"),
                           ("num_candidates", int, "most candidates per record"),
                           ("batch_size", int, "prompts per step"), ("epochs", int, "passes over the data"),
                           ("max_steps", int, "stop after this many steps"),
                           ("lr", float, "peak learning rate (AdamW)"), ("warmup_steps", int, "linear warmup steps"),
                           ("weight_decay", float, "AdamW weight decay"),
                           ("grad_clip", float, "global-norm gradient clip (0: off)"),
                           ("margin", float, "ranking-loss margin m (paper: 0.1)"), ("seed", int, "data and head seed"),
                           ("pad_to_multiple", int, "batch length rounded up to this (0: always max_len)")):
        t.add_argument("--" + name.replace("_", "-"), type=typ, default=getattr(d, name),
                       help=f"{hlp} (default: %(default)s)")
    t.add_argument("--schedule", choices=("cosine", "linear", "constant"), default=d.schedule,
                   help="learning-rate decay after warmup (default: %(default)s)")
    t.add_argument("--form", choices=("paper", "reference"), default=d.form,
                   help="ranking loss form, see losses.ranking_loss (default: %(default)s)")
    t.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                   help="a bad record stops the run, or is skipped and counted (default: %(default)s)")
    t.add_argument("--resume", action="store_true", help="continue from OUT_DIR's last checkpoint (the trainer's "
                   "exact resume; the default starts over)")
    _common(t)
    r = sub.add_parser("rerank", help="rank candidates with a trained PRM", description=(
        "Score each candidate of INPUT ({id?, instruction, input?, output?, candidates: [str]}, e.g. "
        "`tuna-jax sample-diverse` output) with the PRM and write ranking records, candidates best first, "
        "scores = rewards."))
    r.add_argument("prm", help="a PRM folder written by `tuna-jax prm train`")
    r.add_argument("input", help="JSON/JSONL rows with candidates")
    r.add_argument("out", help="output JSONL of ranking records (unscorable rows go to OUT.failed.jsonl)")
    r.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default: %(default)s)")
    r.add_argument("--max-len", type=int, default=None, help="tokens per sequence (default: the PRM's training max_len)")
    r.add_argument("--limit", type=int, default=None, help="only the first LIMIT rows")
    _common(r)


def _common(p) -> None:
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or tokenizer.model (default: the model's)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--mesh", default=None, metavar="DATA,FSDP,TENSOR",
                   help="device mesh sizes, one may be -1 (default: all devices on fsdp)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    """``tuna-jax prm train|rerank``: 0 done; 1 (rerank) some rows could not be scored; (train) 3 the loss
    diverged (nothing saved), 128+N stopped by signal N (checkpoint saved)."""
    import jax

    from tuna_jax import parallel

    parallel.initialize_distributed()
    mesh = parallel.make_mesh(args.mesh)
    if args.prm_command == "train":
        cfg = PRMConfig(max_len=args.max_len, num_candidates=args.num_candidates, batch_size=args.batch_size,
                        epochs=args.epochs, max_steps=args.max_steps, lr=args.lr, warmup_steps=args.warmup_steps,
                        schedule=args.schedule, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                        margin=args.margin, form=args.form, seed=args.seed, pad_to_multiple=args.pad_to_multiple,
                        eval_fraction=args.eval_fraction, on_error=args.on_error)
        # A stop (SIGTERM: 143, a diverged loss: 3) is one line and its status (io.cli.run_command).
        res = train_prm(args.base, args.train, args.out_dir, cfg, eval_path=args.eval, tokenizer=args.tokenizer,
                        mesh=mesh, dtype=args.dtype, progress=not args.no_progress, resume=args.resume)
        msg = f"prm train: {res.steps} steps, last batch {res.last_train.get('loss', float('nan')):.4f} loss"
        if res.final_eval:
            msg += (f"; held-out pair accuracy {res.start_eval['pair_accuracy']:.3f} -> "
                    f"{res.final_eval['pair_accuracy']:.3f} ({res.final_eval['pairs']} pairs)")
        print(f"{msg}; saved {res.out_dir}")
        return 0
    from tuna_jax.data.rows import read_candidates

    items = read_candidates(args.input, limit=args.limit)  # checked before the PRM loads
    prm = load_prm(args.prm, mesh, args.dtype)
    with jax.set_mesh(mesh):
        summary = rerank_file(prm, args.input, args.out, tokenizer=args.tokenizer, batch_rows=args.batch_size,
                              max_len=args.max_len, limit=args.limit, progress=not args.no_progress, items=items)
    print(f"prm rerank: {summary.line()} -> {args.out}", file=sys.stderr)
    if summary.failed:
        print(f"prm rerank: {summary.failed} row(s) could not be scored, listed in {args.out}.failed.jsonl",
              file=sys.stderr)
        return 1
    return 0

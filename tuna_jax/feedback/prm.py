"""Proxy ranking model (PRM): a LLaMA with a scalar head, trained on judge rankings, then used to rank
more data without paying the judge (``tuna-jax prm train|rerank``; the paper's Tuna_c(PRM)).

The model. r(i, c) = w . h_last + b, where h_last [D] is the backbone's final-norm hidden state at the
LAST real token of ``[BOS] + prompt + response + [EOS]`` -- the EOS, i.e. after the model has read the
whole response -- and (w [D], b []) is the head. The backbone is our ``Llama`` (its LM head is unused);
every token goes through the project's one template and BOS/EOS policy, exactly as in training.

Training. Each ranking record (instruction, N candidates, scores: higher is better, e.g. a judge's
Borda scores) gives rewards r [N]; the loss is the Tuna pairwise hinge on them,
``losses.ranking_loss(r, scores, mask, margin, form)`` (paper form: sum over non-tied pairs j better
than k of max(0, r_k - r_j + margin * (k - j)) after sorting by score), averaged over prompts. The
backbone and the head are trained together with AdamW (``train.make_optimizer``); batches are
``data.layouts`` padded ranking batches ([B, N, L] token rows, no MLE target). The head starts
random (std 1/sqrt(D), numpy-seeded), so the held-out pair accuracy at step 0 is a fair chance-level
baseline, and it is logged next to the final one.

Saved folder (``OUT_DIR/``)::

    prm.json            {"format": "tuna-jax-prm", "version": 1, "base_model", "max_len", "add_bos",
                         "add_eos", "hidden_size", "train": {settings}, "metrics": {...}}
    head.safetensors    w float32 [D], b float32 [1]
    backbone/           a params-only export (``model.checkpoint.save_params``) with the tokenizer files

``backbone/`` is an ordinary tuna-jax checkpoint: ``convert orbax-to-hf`` and every other command read it.

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
import json
import math
import os
import pathlib
import sys
import time
from typing import Sequence

from tuna_jax.io.jsonl import dumps
from tuna_jax.io import paths
from tuna_jax.io.lock import OutputLock

PRM_FORMAT, PRM_VERSION = "tuna-jax-prm", 1


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


# ---------------------------------------------------------------------------- the model
def reward_fn(binder):
    """``f(params, input_ids, positions, segment_ids) -> rewards [M] float32`` for right-padded rows [M, L];
    params = {"backbone": Llama params (pure dict), "head": {"w": [D], "b": [1]}}."""
    import jax.numpy as jnp

    def f(params, input_ids, positions, segment_ids):
        model = binder.bind(params["backbone"])
        hidden, _ = model.hidden_states(input_ids, positions, segment_ids)  # [M, L, D]
        # Right padding: the last real token (the EOS) is at (number of real tokens - 1). An all-padding
        # row (a missing candidate) reads position 0; its reward is masked out by the caller.
        last = jnp.maximum(jnp.sum(segment_ids > 0, axis=-1) - 1, 0)
        h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)  # [M, D]
        return h @ params["head"]["w"] + params["head"]["b"][0]

    return f


_REWARD_JITS: dict = {}


def _reward_jit(binder):
    """The jitted ``reward_fn`` per architecture, shared by every PRM object of it (a saved and a reloaded
    PRM compile once: compiles dominate on CPU)."""
    import jax

    key = repr(binder.cfg)
    if key not in _REWARD_JITS:
        _REWARD_JITS[key] = jax.jit(reward_fn(binder))
    return _REWARD_JITS[key]


def init_head(hidden_size: int, seed: int = 0) -> dict:
    """w ~ N(0, 1/D) (rewards start at unit scale, ranked at random), b = 0; numpy, so no PRNG compile."""
    import numpy as np

    rng = np.random.default_rng([seed, 7919])
    return {"w": rng.normal(0.0, 1.0 / math.sqrt(hidden_size), (hidden_size,)).astype(np.float32),
            "b": np.zeros((1,), np.float32)}


class ProxyRankingModel:
    """A PRM: ``params`` ({"backbone": pure dict, "head": {"w" [D], "b" [1]}}), the backbone's ``LlamaConfig``,
    ``meta`` (prm.json without its format fields), the mesh it lives on and the folder it was loaded from
    (``path``, None when built in memory). ``rewards(rows)`` scores token rows; ``save``/``load``."""

    def __init__(self, params: dict, cfg, meta: dict, mesh=None, path: str | None = None):
        from tuna_jax.train import ParamBinder

        self.params, self.cfg, self.meta, self.mesh, self.path = params, cfg, meta, mesh, path
        self.binder = ParamBinder(cfg)

    @classmethod
    def from_backbone(cls, model, head: dict, meta: dict, mesh=None, path: str | None = None) -> "ProxyRankingModel":
        """From a loaded ``Llama`` and head arrays (replicated over ``mesh``: D floats)."""
        import jax
        from flax import nnx

        where = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()) if mesh is not None else None
        head = {k: jax.device_put(v, where) for k, v in head.items()}
        return cls({"backbone": nnx.to_pure_dict(nnx.state(model, nnx.Param)), "head": head}, model.cfg, meta, mesh,
                   path)

    def rewards(self, rows: Sequence[Sequence[int]], batch_rows: int = 8, max_len: int | None = None) -> list[float]:
        """rows: full token sequences ([BOS] + prompt + response + [EOS]) -> one reward each. Rows are
        sorted by length and right-padded to a bucketed length (few compiled shapes)."""
        import jax

        from tuna_jax import parallel
        from tuna_jax.data.shapes import bucket_length

        fn = _reward_jit(self.binder)
        limit = max_len or self.cfg.max_position_embeddings
        n_data = 1 if self.mesh is None else self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        batch_rows = -(-batch_rows // n_data) * n_data
        out: list[float | None] = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        for s in range(0, len(order), batch_rows):
            idx = order[s:s + batch_rows]
            longest = max(len(rows[i]) for i in idx)
            if longest > limit:
                raise ValueError(f"a sequence of {longest} tokens exceeds max_len={limit}")
            batch = _right_padded([rows[i] for i in idx], batch_rows, min(bucket_length(longest), limit))
            arrays = parallel.shard_batch(batch, self.mesh) if self.mesh is not None else batch
            r = jax.device_get(fn(self.params, arrays["input_ids"], arrays["positions"], arrays["segment_ids"]))
            for j, i in enumerate(idx):
                out[i] = float(r[j])
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ folder format
    def save(self, path: str | os.PathLike, tokenizer_src: str | os.PathLike | None = None):
        """Write ``path/`` (module docstring; local or gs://): backbone export, head.safetensors, prm.json."""
        import jax
        import numpy as np
        from safetensors.numpy import save

        from tuna_jax.model.checkpoint import save_params

        out = paths.resolve(path)
        paths.makedirs(out)
        save_params(out / "backbone", self.binder.bind(self.params["backbone"]), tokenizer_src=tokenizer_src)
        if jax.process_index() == 0:
            head = {k: np.asarray(jax.device_get(v), np.float32) for k, v in self.params["head"].items()}
            paths.write_atomic(out / "head.safetensors", save(head))
            meta = {"format": PRM_FORMAT, "version": PRM_VERSION, "hidden_size": self.cfg.hidden_size, **self.meta}
            paths.write_atomic(out / "prm.json", json.dumps(meta, indent=1, sort_keys=True) + "\n")
        return out

    @classmethod
    def load(cls, path: str | os.PathLike, mesh=None, dtype: str = "float32") -> "ProxyRankingModel":
        """Restore a saved PRM folder onto ``mesh`` (any shape; the head is replicated)."""
        import numpy as np
        from safetensors.numpy import load

        from tuna_jax.model.checkpoint import load_params

        p = paths.resolve(path)
        meta_path = p / "prm.json"
        if not paths.is_file(meta_path):
            raise FileNotFoundError(f"{path}: not a tuna-jax PRM folder (no prm.json; `tuna-jax prm train` writes one)")
        meta = json.loads(paths.read_text(meta_path))
        if meta.get("format") != PRM_FORMAT or meta.get("version") != PRM_VERSION:
            raise ValueError(f"{meta_path}: format {meta.get('format')!r} version {meta.get('version')!r}; expected "
                             f"{PRM_FORMAT!r} version {PRM_VERSION}")
        head = load(paths.read_bytes(p / "head.safetensors"))
        backbone = load_params(p / "backbone", mesh, dtype=dtype, param_dtype="float32")
        d = backbone.cfg.hidden_size
        if set(head) != {"w", "b"} or head["w"].shape != (d,) or head["b"].shape != (1,):
            raise ValueError(f"{p / 'head.safetensors'}: expected w [{d}] and b [1], got "
                             f"{ {k: v.shape for k, v in head.items()} }")
        meta = {k: v for k, v in meta.items() if k not in ("format", "version", "hidden_size")}
        return cls.from_backbone(backbone, {k: np.asarray(v, np.float32) for k, v in head.items()}, meta, mesh,
                                 str(path))


def _right_padded(rows: Sequence[Sequence[int]], batch_rows: int, length: int) -> dict:
    """Token rows -> right-padded ``input_ids, positions, segment_ids`` [batch_rows, length] (missing rows
    are all padding)."""
    import numpy as np

    ids = np.zeros((batch_rows, length), np.int32)
    seg, pos = np.zeros_like(ids), np.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, :len(row)], seg[r, :len(row)], pos[r, :len(row)] = row, 1, np.arange(len(row))
    return {"input_ids": ids, "positions": pos, "segment_ids": seg}


# ---------------------------------------------------------------------------- training
def batch_sums(f, params, batch: dict, margin: float, form: str) -> dict:
    """Summed ranking loss and pair counts of a [B, N, L] ranking batch (divide by ``count`` for means)."""
    import jax.numpy as jnp

    from tuna_jax.losses import pair_accuracy, ranking_loss

    b, n, l = batch["input_ids"].shape  # padded layout, no MLE row: sub-row k is candidate k
    flat = lambda k: batch[k].reshape(b * n, l)  # noqa: E731: every candidate is one row
    r = f(params, flat("input_ids"), flat("positions"), flat("segment_ids")).reshape(b, n)
    mask, target = batch["candidate_mask"].reshape(b, n), batch["target"].reshape(b, n)
    ex = batch["example_mask"].reshape(b).astype(jnp.float32)
    rank = ranking_loss(r, target, mask, margin=margin, form=form)  # [B]
    correct, counted = pair_accuracy(r, target, mask)
    return {"loss": jnp.sum(rank * ex), "pairs_correct": jnp.sum(correct * ex), "pairs": jnp.sum(counted * ex),
            "count": jnp.sum(ex)}


@dataclasses.dataclass
class PRMTrainResult:
    steps: int
    start_eval: dict | None  # {"loss", "pair_accuracy", "pairs"} on the held-out set before training
    final_eval: dict | None
    last_train: dict
    out_dir: str
    prm: "ProxyRankingModel"  # the trained model, as saved in out_dir


def _means(sums: dict) -> dict:
    return {"loss": float(sums["loss"]) / max(float(sums["count"]), 1.0),
            "pair_accuracy": float(sums["pairs_correct"]) / max(float(sums["pairs"]), 1.0),
            "pairs": int(sums["pairs"])}


def train_prm(base_model: str | os.PathLike, train_path: str, out_dir: str | os.PathLike, cfg: PRMConfig = PRMConfig(),
              *, eval_path: str | None = None, tokenizer: str | None = None, mesh=None, dtype: str = "float32",
              progress: bool = True, model=None) -> PRMTrainResult:
    """Train a PRM from ``base_model`` (HF folder or params checkpoint; or a loaded ``model``) on the ranking
    records of ``train_path``; save it to ``out_dir``; return the held-out pair accuracy before and after.

    ``mesh``: None runs on one device; otherwise the backbone is loaded onto it and batches are split over
    data x fsdp (``batch_size`` must divide).
    """
    import contextlib

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from tqdm import tqdm

    from tuna_jax import parallel
    from tuna_jax.data.batching import BatchIterator, tokenize_ranking
    from tuna_jax.data.layouts import LayoutCollator
    from tuna_jax.data.records import read_records
    from tuna_jax.data.templates import SpecialTokenPolicy, load_tokenizer
    from tuna_jax.train import TrainingDiverged, make_optimizer

    out = pathlib.Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    tok_src = tokenizer or base_model
    tok = load_tokenizer(tok_src)
    policy = SpecialTokenPolicy(add_bos=cfg.add_bos, add_eos=cfg.add_eos)

    def examples(path, report=None):
        records, report = read_records(path, kind="ranking", on_error=cfg.on_error, report=report)
        return tokenize_ranking(records, tok, policy, cfg.max_len, cfg.num_candidates, mle_target="all",
                                on_error=cfg.on_error, report=report)

    train_ex, report = examples(train_path)
    eval_ex = None
    if eval_path:
        eval_ex, report = examples(eval_path, report)
    elif cfg.eval_fraction > 0:
        k = max(1, int(len(train_ex) * cfg.eval_fraction))
        order = np.random.default_rng([cfg.seed, 1]).permutation(len(train_ex))
        eval_ex, train_ex = [train_ex[i] for i in order[:k]], [train_ex[i] for i in order[k:]]
    if report.num_skipped or report.changed:
        print(report.summary(), file=sys.stderr)

    collator = LayoutCollator("padded", "ranking", cfg.max_len, tok.pad_id, cfg.num_candidates, mle_target="all",
                              pad_to_multiple=cfg.pad_to_multiple)
    pidx, pcount = jax.process_index(), jax.process_count()
    it = BatchIterator(train_ex, collator, cfg.batch_size, seed=cfg.seed, num_epochs=cfg.epochs,
                       process_index=pidx, process_count=pcount)
    total = cfg.epochs * it.steps_per_epoch
    if cfg.max_steps:
        total = min(total, cfg.max_steps)

    ctx = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
    put = (lambda b: parallel.shard_batch(b, mesh)) if mesh is not None else (lambda b: b)  # noqa: E731
    with ctx:
        if model is None:
            from tuna_jax.model import load_model

            model = load_model(base_model, mesh, dtype=dtype, param_dtype="float32")
        if tok.vocab_size > model.cfg.vocab_size:
            raise ValueError(f"tokenizer {tok.name} has {tok.vocab_size} tokens but the model's vocabulary is "
                             f"{model.cfg.vocab_size}: they do not belong together")
        prm = ProxyRankingModel.from_backbone(model, init_head(model.cfg.hidden_size, cfg.seed), {}, mesh)
        del model
        f = reward_fn(prm.binder)
        tx, schedule = make_optimizer(cfg.optim(), total)

        def step(state, batch):
            def loss_fn(params):
                sums = batch_sums(f, params, batch, cfg.margin, cfg.form)
                return sums["loss"] / jnp.maximum(sums["count"], 1.0), sums

            (_, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
            updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
            new = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
                   "step": state["step"] + 1}
            grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
            return new, dict(sums, grad_norm=grad_norm, lr=schedule(state["step"]))

        step_fn = jax.jit(step, donate_argnums=(0,))
        eval_fn = jax.jit(lambda params, batch: batch_sums(f, params, batch, cfg.margin, cfg.form))

        def evaluate(params) -> dict | None:
            if not eval_ex:
                return None
            ev = BatchIterator(eval_ex, collator, cfg.batch_size, shuffle=False, num_epochs=1, drop_remainder=False,
                               process_index=pidx, process_count=pcount)
            totals: dict = {}
            for batch in ev:
                sums = jax.device_get(eval_fn(params, put(batch)))
                totals = {k: totals.get(k, 0.0) + float(v) for k, v in sums.items()}
            return _means(totals)

        state = {"params": prm.params, "opt_state": jax.jit(tx.init)(prm.params), "step": jnp.zeros((), jnp.int32)}
        main = jax.process_index() == 0
        mlog = open(out / "metrics.jsonl", "w", encoding="utf-8") if main else None

        def log_line(rec: dict) -> None:
            if mlog:
                mlog.write(json.dumps(rec) + "\n")
                mlog.flush()

        last: dict = {}
        try:
            start_eval = evaluate(state["params"])
            if start_eval:
                log_line({"step": 0, "split": "eval", **start_eval})
            with tqdm(total=total, desc="prm train", unit="step", disable=not progress or not main,
                      file=sys.stderr) as bar:
                for n in range(1, total + 1):
                    t0 = time.perf_counter()
                    state, m = step_fn(state, put(next(it)))
                    m = jax.device_get(m)
                    if not (math.isfinite(float(m["loss"])) and math.isfinite(float(m["grad_norm"]))):
                        raise TrainingDiverged(f"prm step {n}: loss={float(m['loss'])} grad_norm="
                                               f"{float(m['grad_norm'])} is not finite; nothing was saved. Try a "
                                               f"lower --lr.")
                    last = {"step": n, **_means(m), "grad_norm": float(m["grad_norm"]), "lr": float(m["lr"]),
                            "step_time": time.perf_counter() - t0}
                    log_line({"split": "train", **last})
                    bar.update(1)
                    bar.set_postfix(loss=f"{last['loss']:.4f}", acc=f"{last['pair_accuracy']:.2f}")
            final_eval = evaluate(state["params"])
            if final_eval:
                log_line({"step": total, "split": "eval", **final_eval})
        finally:
            if mlog:
                mlog.close()
        prm.params = state["params"]
        prm.meta = {"base_model": str(base_model), "max_len": cfg.max_len, "add_bos": cfg.add_bos,
                    "add_eos": cfg.add_eos, "train": {**dataclasses.asdict(cfg), "data": str(train_path),
                                                      "eval": eval_path, "steps": total},
                    "metrics": {"start_eval": start_eval, "final_eval": final_eval, "last_train": last}}
        tok_dir = pathlib.Path(tok_src)
        prm.save(out, tokenizer_src=tok_dir if tok_dir.is_dir() else tok_dir.parent)
        prm.path = str(out)
    return PRMTrainResult(total, start_eval, final_eval, last, str(out), prm)


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


def rerank_file(prm: ProxyRankingModel, input_path: str, out_path: str, *, tokenizer=None, batch_rows: int = 8,
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


def load_prm(path: str | os.PathLike, mesh=None, dtype: str = "float32") -> ProxyRankingModel:
    """A saved PRM folder (``ProxyRankingModel.load``)."""
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
    """``tuna-jax prm train|rerank``: 0 done; 1 (rerank) some rows could not be scored; 3 (train) the loss
    diverged (nothing saved)."""
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
        from tuna_jax.train import TrainingDiverged

        try:
            res = train_prm(args.base, args.train, args.out_dir, cfg, eval_path=args.eval, tokenizer=args.tokenizer,
                            mesh=mesh, dtype=args.dtype, progress=not args.no_progress)
        except TrainingDiverged as e:
            print(f"tuna-jax prm train: {e}", file=sys.stderr)
            return 3
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

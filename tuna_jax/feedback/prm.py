"""Proxy ranking model (PRM): a backbone with a scalar reward head, trained on judge rankings, then used to
rank more data without paying the judge (the paper's Tuna_c (PRM)). This module reranks; training is the
project's one trainer with a ``train.mode=prm`` config (``configs/prm.yaml``; ``tuna-jax train`` or its alias
``tuna-jax prm train``), which writes the PRM folder to ``train.output_dir/final`` (``model/reward.py``).

Rerank. Input rows ``{id?, instruction, input?, output?, candidates: [str]}`` (e.g. ``sample-diverse``
output); each candidate gets its reward r = w . h_EOS + b and the row is written as a ranking record,
candidates best first (stable on their input order), ``scores`` = rewards, plus ``prm: {model, dropped}``.
Every token goes through the project's one template and BOS/EOS policy, as in training. Empty candidates
cannot be scored (no response tokens) and are dropped and listed; a row with none left goes to
OUT.failed.jsonl. Prompts too long for ``max_len`` are cut from the left after the BOS, as in training.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import TYPE_CHECKING

from tuna_jax.io import paths
from tuna_jax.io.jsonl import dumps
from tuna_jax.io.lock import OutputLock

if TYPE_CHECKING:
    from tuna_jax.model.reward import ProxyRankingModel


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

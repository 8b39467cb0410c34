"""Teacher-forced log-probs of continuations given their prompts: the one scorer.

``tuna-jax score``, the local teacher, the demo's held-out pair accuracy and anything else that
needs log p(continuation | prompt) from a model use :class:`Scorer`. It lays its input out with the
training layouts (:mod:`tuna_jax.data.layouts`): the continuations of one prompt form a
prefix-shared group (the prompt computed once), and groups go to the device a batch at a time,
sorted by length, with bucketed shapes so that few shapes compile. The numbers are the training
step's numbers (:func:`tuna_jax.logprobs.scored_token_logprobs`): float32, only scored tokens
projected to the vocabulary.

Multi-host: every host calls the scorer with the same input; each batch runs on the global mesh,
each host placing its own shards of the batch (``parallel.put_global_batch``), and every host gets
every result.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import numpy as np

from tuna_jax import parallel
from tuna_jax.data.batching import TokenizedExample
from tuna_jax.data.layouts import BatchShape, LayoutCollator, resolve_layout
from tuna_jax.data.shapes import bucket_length

TOKEN_KEYS = ("input_ids", "positions", "segment_ids", "branch_ids", "score_src", "score_tgt", "kv_blocks")


@dataclasses.dataclass
class Group:
    """One prompt and the continuations to score after it: int token ids, no template added."""

    prompt: Sequence[int]
    continuations: Sequence[Sequence[int]]


@functools.cache
def _kernel():
    """The jitted scoring step, built once per process: the graphdef is a static argument, so every
    Scorer of one architecture (a reloaded model, the teacher and `score` in one process) shares its
    compilations, which dominate on CPU."""
    import jax
    from flax import nnx

    from tuna_jax.logprobs import scored_token_logprobs

    def step(graphdef, state, tokens, *, budget):
        return scored_token_logprobs(nnx.merge(graphdef, state), tokens, budget_mb=budget)

    return jax.jit(step, static_argnames=("graphdef", "budget"))


def _bucket(n: int) -> int:
    return bucket_length(max(n, 1))


class Scorer:
    """log p of every continuation token, with ``model`` on an optional ``mesh``.

    layout: a training layout name or ``auto`` (the platform's fastest); batch_groups: prompts per
    device call; budget_mb: ``loss.logits_budget_mb`` for the vocabulary projection.
    """

    def __init__(self, model, mesh=None, layout: str = "auto", batch_groups: int = 8, budget_mb: float | None = None,
                 attention_block: int = 64):
        from flax import nnx

        from tuna_jax.logprobs import DEFAULT_BUDGET_MB

        self.model, self.mesh, self.cfg = model, mesh, model.cfg
        self.layout = resolve_layout(layout, None if mesh is None else mesh.devices.flat[0].platform)
        self.n_data = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
        self.batch_groups = -(-batch_groups // self.n_data) * self.n_data
        self.block = attention_block
        self.budget = float(DEFAULT_BUDGET_MB if budget_mb is None else budget_mb)
        self._graphdef, self._state = nnx.split(model)

    # ---- the API -----------------------------------------------------------------------------

    def token_logprobs(self, groups: Sequence[Group]) -> list[list[np.ndarray]]:
        """For each group, each continuation: float32 [len(continuation)] log-probs (nats)."""
        limit = self.cfg.max_position_embeddings
        for g in groups:
            if not len(g.prompt):
                raise ValueError("an empty prompt: the first continuation token needs a context")
            longest = len(g.prompt) + max([len(c) for c in g.continuations] + [0])
            if longest > limit:
                raise ValueError(f"{longest} tokens exceed the model's max_position_embeddings={limit}")
        out = [[np.zeros((len(c),), np.float32) for c in g.continuations] for g in groups]
        todo = [(i, g) for i, g in enumerate(groups) if any(len(c) for c in g.continuations)]
        todo.sort(key=lambda x: len(x[1].prompt) + sum(len(c) for c in x[1].continuations))
        for s in range(0, len(todo), self.batch_groups):
            part = todo[s:s + self.batch_groups]
            for (i, _), res in zip(part, self._run([g for _, g in part])):
                for k, lp in res.items():
                    out[i][k] = lp
        return out

    def score(self, groups: Sequence[Group]) -> list[list[tuple[float, int]]]:
        """For each group, each continuation: (sum of log-probs in nats, number of tokens)."""
        return [[(float(np.sum(lp, dtype=np.float64)), len(lp)) for lp in g] for g in self.token_logprobs(groups)]

    # ---- one device call ---------------------------------------------------------------------

    def _run(self, groups: Sequence[Group]) -> list[dict[int, np.ndarray]]:
        """Score a batch of groups; per group {continuation index: log-probs} (empty ones left out)."""
        examples, keep = [], []
        for g in groups:
            ks = [k for k, c in enumerate(g.continuations) if len(c)]
            keep.append(ks)
            examples.append(TokenizedExample(np.asarray(g.prompt, np.int32),
                                             [np.asarray(g.continuations[k], np.int32) for k in ks],
                                             np.zeros(len(ks), np.float32), None, ""))
        n = max(len(e.responses) for e in examples)
        longest = max(len(e.prompt_ids) + max(len(r) for r in e.responses) for e in examples)
        row_len = _bucket(longest)  # packed rows (and the padded cap): a bucketed length
        if self.block:
            row_len = -(-row_len // self.block) * self.block
        coll = LayoutCollator(self.layout, "ranking", row_len, 0, n, "all", pad_to_multiple=1,
                              attention_block=self.block)
        rows = list(examples) + [None] * (self.batch_groups - len(examples))
        batch = coll(rows, self._bucketed(coll.plan([rows])))
        tokens = {k: batch[k] for k in TOKEN_KEYS if k in batch}
        arrays = parallel.put_global_batch(tokens, self.mesh) if self.mesh is not None else tokens
        lp = parallel.to_host(_kernel()(self._graphdef, self._state, arrays, budget=self.budget))  # [U, S]
        result: list[dict[int, list]] = [dict() for _ in examples]
        for u, s in zip(*np.nonzero(batch["score_slot"] >= 0)):
            slot = int(batch["score_slot"][u, s])
            e = int(batch["unit_example"][u, slot // coll.slots])
            result[e].setdefault(keep[e][slot % coll.slots], []).append(float(lp[u, s]))
        return [{k: np.asarray(v, np.float32) for k, v in r.items()} for r in result]

    def _bucketed(self, s: BatchShape) -> BatchShape:
        """Round a planned shape up to a few sizes, so that few shapes compile across calls."""
        units = s.units
        if self.layout == "packed":  # a power of two, rounded up to a multiple of the data shards
            units = -(-max(1, 1 << (s.units - 1).bit_length()) // self.n_data) * self.n_data
        if self.layout == "packed":
            length = s.length
        else:
            length = _bucket(s.length)
            if self.block and self.layout != "padded":
                length = -(-length // self.block) * self.block
        m = s.kv_blocks and min(_bucket(s.kv_blocks), length // self.block)
        return BatchShape(units, s.rows, length, min(_bucket(s.scored), s.rows * length), s.examples, m)

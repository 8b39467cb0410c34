"""Candidate layouts: how tokenised examples become device batches (``data.layout``).

Every layout gives the model the same per-sequence log-likelihoods (tested against ``padded`` at
1e-5); they differ in how many token positions the device computes.

* ``padded``: one sub-row per sequence (each candidate, and the MLE target), all right-padded to
  the batch's longest: the prompt is computed N + 1 times. What the reference code does.
* ``prefix_shared``: one row per example: the prompt once (branch 0), then each candidate and
  the MLE target as a branch (branch k sees branch 0 and itself; positions restart after the
  prompt). The prompt is computed once and only the batch's longest *group* sets the padding.
* ``packed``: prefix-shared groups (or SFT examples) packed first-fit-decreasing into rows of
  ``row_len`` tokens, several per row with their own segment ids, never attending across
  examples. One batch shape for the whole run (no recompiles) and little padding.

The batch every layout produces (U units, Q sub-rows per unit, L tokens per sub-row, S scored
tokens per sub-row, E examples per unit, N candidates; N + 1 sequence slots per example, slot N
being the separate MLE target)::

  input_ids, positions, segment_ids  int32 [U, Q, L]   segment 0 = padding
  branch_ids                         int32 [U, Q, L]   prefix_shared / packed ranking only
  score_src    int32 [U, S]     index into the unit's flattened [Q * L] positions of the hidden
                                state that predicts the scored token
  score_tgt    int32 [U, S]     the scored token (a response token or the EOS)
  score_slot   int32 [U, S]     e * (N + 1) + k for candidate k (k = N: the MLE target) of the
                                unit's example e; -1 for unused entries
  kv_blocks    int32 [U, Q, L/c, M]  prefix_shared / packed with ``attention_block`` c > 0: for
                                each block of c queries, the M blocks of c keys it may see
                                (ascending, -1 = none); lets attention skip fully masked blocks
  example_mask bool  [U, E]     a real example in that place
  real_tokens  float32 [U]      prompt + response tokens of every sequence the loss reads,
                                counted once per sequence: the layout-independent throughput unit
  ranking only:
  target         float32 [U, E, N]  candidate quality, higher is better (0 where masked)
  candidate_mask bool    [U, E, N]
  mle_slot       int32   [U, E]     the slot holding the MLE target: N (a separate sequence,
                                    ``mle_target=original``), the best candidate (``best``, no
                                    extra tokens), or -1 (``all``: every candidate)

``padded`` has U = examples, Q = N (+1 with a separate MLE target), E = 1; ``prefix_shared`` has
U = examples, Q = 1, E = 1; ``packed`` has U = rows, Q = 1, E = the most examples in a row.
SFT batches are the same with N = 0 (slot 0 is the response).

Shapes are agreed over the global batch (:meth:`LayoutCollator.plan`), so every host builds the
same shapes from its own rows.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import numpy as np

from tuna_jax.data.batching import MLE_TARGETS, TokenizedExample

LAYOUTS = ("padded", "prefix_shared", "packed")


@dataclasses.dataclass(frozen=True)
class BatchShape:
    """Static shape of one host's batch: U units of Q sub-rows of L tokens, S scored entries per
    unit, E examples per unit."""

    units: int
    rows: int
    length: int
    scored: int
    examples: int
    kv_blocks: int = 0  # M, the most key blocks a query block sees (0: no block table)

    def union(self, other: "BatchShape") -> "BatchShape":
        return BatchShape(*(max(a, b) for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


@dataclasses.dataclass
class _Piece:
    """Tokens of one example laid out in one sub-row: ids, positions, branches, scored entries."""

    ids: np.ndarray
    pos: np.ndarray
    branch: np.ndarray
    src: np.ndarray  # index of the predicting token, relative to the piece start
    tgt: np.ndarray
    slot: np.ndarray  # k (candidate) or N (MLE target); made absolute per example at collation


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple if multiple else n


class LayoutCollator:
    """Examples -> the layout batch described in the module docstring.

    mode: ``sft`` or ``ranking``; ``pad_to_multiple``: L and S are the batch's longest rounded up
    to this (0: fixed for the run, see :meth:`plan`); ``row_len``: packed row length (0: the run's
    longest group rounded up to 128); ``unit_multiple``: U per host is a multiple of this for
    ``packed`` (the data-parallel devices x gradient-accumulation steps on each host).
    """

    def __init__(self, layout: str, mode: str, max_len: int, pad_id: int, num_candidates: int = 0,
                 mle_target: str = "original", pad_to_multiple: int = 64, row_len: int = 0, unit_multiple: int = 1,
                 attention_block: int = 64):
        if layout not in LAYOUTS:
            raise ValueError(f"data.layout={layout!r}: choose one of {', '.join(LAYOUTS)}")
        if mode not in ("sft", "ranking"):
            raise ValueError(f"mode must be 'sft' or 'ranking', got {mode!r}")
        if mle_target not in MLE_TARGETS:
            raise ValueError(f"mle_target must be one of {MLE_TARGETS}, got {mle_target!r}")
        self.layout, self.mode, self.max_len, self.pad_id = layout, mode, int(max_len), int(pad_id)
        self.n = int(num_candidates) if mode == "ranking" else 0
        self.mle_target = mle_target if mode == "ranking" else "original"
        self.pad_to_multiple, self.row_len, self.unit_multiple = int(pad_to_multiple or 0), int(row_len), int(unit_multiple)
        self.slots = self.n + 1
        # The padded layout's rows are single causal sequences: a block table would skip nothing.
        self.block = int(attention_block) if layout != "padded" else 0
        # Run-wide shapes: packed always (U varies by batch otherwise); the others when pad_to_multiple=0.
        self.fixed_shapes = layout == "packed" or not self.pad_to_multiple

    # ---- per-example pieces ------------------------------------------------------------------

    def _sequences(self, e: TokenizedExample) -> list[tuple[int, np.ndarray]]:
        """(slot, response ids) of every sequence of the example that the device computes."""
        if self.mode == "sft":
            return [(0, e.responses[0])]
        if len(e.responses) > self.n:
            raise ValueError(f"{e.source or e.id}: {len(e.responses)} candidates > num_candidates {self.n}")
        seqs = list(enumerate(e.responses))
        if self.mle_target == "original":
            if e.mle is None:
                raise ValueError(f"{e.source or e.id}: tokenised without an MLE target but mle_target='original'")
            seqs.append((self.n, e.mle))
        return seqs

    def _pieces(self, e: TokenizedExample) -> list[_Piece]:
        """The example's sub-rows: one per sequence (padded) or one group (prefix_shared / packed)."""
        p = np.asarray(e.prompt_ids, np.int32)
        plen = len(p)
        seqs = self._sequences(e)
        if self.layout == "padded":
            out = []
            for slot, r in seqs:
                n = plen + len(r)
                out.append(_Piece(np.concatenate([p, r]).astype(np.int32), np.arange(n, dtype=np.int32),
                                  np.zeros(n, np.int32), np.arange(plen - 1, n - 1, dtype=np.int32),
                                  np.asarray(r, np.int32), np.full(len(r), slot, np.int32)))
            return out
        ids, pos, branch, src, tgt, slots = [p], [np.arange(plen, dtype=np.int32)], [np.zeros(plen, np.int32)], [], [], []
        at = plen
        for b, (slot, r) in enumerate(seqs, 1):
            m = len(r)
            ids.append(np.asarray(r, np.int32))
            pos.append(np.arange(plen, plen + m, dtype=np.int32))
            branch.append(np.full(m, b, np.int32))
            # The first token of every branch is predicted by the prompt's last token.
            src.append(np.concatenate([[plen - 1], np.arange(at, at + m - 1)]).astype(np.int32))
            tgt.append(np.asarray(r, np.int32))
            slots.append(np.full(m, slot, np.int32))
            at += m
        cat = np.concatenate
        return [_Piece(cat(ids), cat(pos), cat(branch), cat(src), cat(tgt), cat(slots))]

    @staticmethod
    def real_tokens(e: TokenizedExample, mode: str, mle_target: str) -> int:
        """Prompt + response tokens of every sequence the loss reads, counted once per sequence."""
        p = len(e.prompt_ids)
        n = sum(p + len(r) for r in e.responses)
        if mode == "ranking" and mle_target == "original" and e.mle is not None:
            n += p + len(e.mle)
        return n

    # ---- shapes ------------------------------------------------------------------------------

    def _sizes(self, e: TokenizedExample) -> tuple[int, int]:
        """(tokens of the example's longest sub-row, scored entries of the example), without
        building them."""
        plen = len(e.prompt_ids)
        resp = [len(r) for _, r in self._sequences(e)]
        return plen + (max(resp) if self.layout == "padded" else sum(resp)), sum(resp)

    def group_length(self, e: TokenizedExample) -> int:
        return self._sizes(e)[0]

    def _pack(self, examples: Sequence[TokenizedExample], row_len: int) -> list[list[int]]:
        """First-fit decreasing: indices of ``examples`` per row, every row at most row_len tokens."""
        lengths = [self.group_length(e) for e in examples]
        rows: list[list[int]] = []
        free: list[int] = []
        for i in sorted(range(len(examples)), key=lambda i: -lengths[i]):
            if lengths[i] > row_len:
                raise ValueError(f"{examples[i].source or examples[i].id}: a group of {lengths[i]} tokens does not "
                                 f"fit in data.row_len={row_len}; raise data.row_len (0 picks the longest group)")
            for r, f in enumerate(free):
                if lengths[i] <= f:
                    rows[r].append(i)
                    free[r] -= lengths[i]
                    break
            else:
                rows.append([i])
                free.append(row_len - lengths[i])
        return [sorted(r) for r in rows]

    def host_shape(self, rows: Sequence[Optional[TokenizedExample]], row_len: int = 0) -> BatchShape:
        """The smallest shape that holds these (one host's) rows, before any rounding."""
        real = [e for e in rows if e is not None]
        sizes = [self._sizes(e) for e in real]
        longest = max([t for t, _ in sizes] + [1])
        scored = max([sc for _, sc in sizes] + [1])
        if self.layout == "padded":
            return BatchShape(len(rows), self.n + (self.mle_target == "original") if self.mode == "ranking" else 1,
                              longest, scored, 1)
        if self.layout == "prefix_shared":
            packs = [[i] for i in range(len(real))]
            length = _round_up(longest, self._length_multiple())
        else:
            packs = self._pack(real, row_len)
            length = row_len
        per_row_scored = [sum(sizes[i][1] for i in r) for r in packs] or [1]
        m = max([self._max_kv_blocks([real[i] for i in r], length) for r in packs] + [1]) if self.block else 0
        return BatchShape(len(packs) if self.layout == "packed" else len(rows), 1, length, max(per_row_scored),
                          max([len(r) for r in packs] + [1]), m)

    def plan(self, host_rows: Sequence[Sequence[Optional[TokenizedExample]]], row_len: int = 0) -> BatchShape:
        """One shape for a global batch given every host's rows: the union of the host shapes,
        rounded (L and S up to ``pad_to_multiple``; packed U up to ``unit_multiple``)."""
        shape = None
        for rows in host_rows:
            s = self.host_shape(rows, row_len)
            shape = s if shape is None else shape.union(s)
        return self.round(shape)

    def round(self, s: BatchShape) -> BatchShape:
        m = self.pad_to_multiple or 1
        units = _round_up(max(s.units, 1), self.unit_multiple) if self.layout == "packed" else s.units
        length = s.length
        if self.layout == "padded":
            length = min(_round_up(s.length, m), self.max_len)
        return BatchShape(units, s.rows, length, min(_round_up(s.scored, m), s.rows * length), s.examples,
                          s.kv_blocks and min(_round_up(s.kv_blocks, 2), length // self.block))

    def _length_multiple(self) -> int:
        """Row lengths of prefix_shared batches are multiples of this (and of the block size)."""
        m = self.pad_to_multiple or 1
        return m * self.block // math.gcd(m, self.block) if self.block else m

    def auto_row_len(self, examples: Sequence[TokenizedExample]) -> int:
        """``row_len`` when ``data.row_len=0``: the longest group rounded up to 128 (at least max_len)."""
        if self.row_len:
            if self.block and self.row_len % self.block:
                raise ValueError(f"data.row_len={self.row_len} is not a multiple of data.attention_block={self.block}")
            return self.row_len
        longest = max([self.group_length(e) for e in examples] + [self.max_len])
        return _round_up(longest, 128 * self.block // math.gcd(128, self.block) if self.block else 128)

    # ---- key-block table ---------------------------------------------------------------------

    def _runs(self, group: Sequence[TokenizedExample]) -> list[tuple[int, int, int, int]]:
        """The row's token runs in order: (start, end, lo, hi) where a query in [start, end) sees
        keys in [lo, hi) (its group's prompt, for a branch) and in [start, itself]."""
        runs, at = [], 0
        for e in group:
            plen = len(e.prompt_ids)
            resp = [len(r) for _, r in self._sequences(e)]
            if self.mode == "sft":  # one causal sequence
                runs.append((at, at + plen + sum(resp), at, at))
            else:
                runs.append((at, at + plen, at, at))
                b = at + plen
                for r in resp:
                    runs.append((b, b + r, at, at + plen))
                    b += r
            at += plen + sum(resp)
        return runs

    def _needed_blocks(self, group: Sequence[TokenizedExample], length: int) -> list[list[int]]:
        """For each block of queries of the row, the key blocks holding a key some query may see."""
        c = self.block
        nb = length // c
        need: list[set] = [set() for _ in range(nb)]
        end = 0
        for start, stop, lo, hi in self._runs(group):
            end = stop
            for j in range(start // c, (stop - 1) // c + 1):
                last = (min(stop, (j + 1) * c) - 1) // c
                need[j].update(range(start // c, last + 1))
                if hi > lo:
                    need[j].update(range(lo // c, (hi - 1) // c + 1))
        for j in range(end // c, nb):  # blocks with padding queries: each sees itself
            need[j].add(j)
        if end % c:
            need[end // c].add(end // c)
        return [sorted(n) for n in need]

    def _max_kv_blocks(self, group: Sequence[TokenizedExample], length: int) -> int:
        return max(len(n) for n in self._needed_blocks(group, length))

    # ---- collation ---------------------------------------------------------------------------

    def __call__(self, rows: Sequence[Optional[TokenizedExample]], shape: BatchShape, row_len: int = 0) -> dict:
        """This host's rows (None = padding rows of a last partial batch) -> the batch dict."""
        u, q, length, s, e_max = shape.units, shape.rows, shape.length, shape.scored, shape.examples
        if self.layout == "packed":
            real = [e for e in rows if e is not None]
            units = [[real[i] for i in r] for r in self._pack(real, row_len or length)]
            if len(units) > u:
                raise ValueError(f"{len(units)} packed rows > the planned {u}")
        else:
            units = [[e] if e is not None else [] for e in rows]
        units += [[] for _ in range(u - len(units))]
        ids = np.full((u, q, length), self.pad_id, np.int32)
        pos, seg, branch = (np.zeros((u, q, length), np.int32) for _ in range(3))
        src, tgt = np.zeros((u, s), np.int32), np.zeros((u, s), np.int32)
        slot = np.full((u, s), -1, np.int32)
        kv = np.full((u, q, length // self.block if self.block else 0, shape.kv_blocks), -1, np.int32)
        ex_mask = np.zeros((u, e_max), bool)
        real_tokens = np.zeros((u,), np.float32)
        n = self.n
        if self.mode == "ranking":
            target = np.zeros((u, e_max, n), np.float32)
            cmask = np.zeros((u, e_max, n), bool)
            mle_slot = np.full((u, e_max), -1, np.int32)
        for ui, group in enumerate(units):
            if self.block:
                for j, blocks in enumerate(self._needed_blocks(group, length)):
                    if len(blocks) > shape.kv_blocks:
                        raise ValueError(f"row needs {len(blocks)} key blocks > the planned {shape.kv_blocks}")
                    kv[ui, 0, j, : len(blocks)] = blocks
            at = np.zeros(q, np.int64)  # next free token per sub-row
            at_s = 0  # next free scored entry of the unit
            for ei, e in enumerate(group):
                ex_mask[ui, ei] = True
                real_tokens[ui] += self.real_tokens(e, self.mode, self.mle_target)
                for pi, pc in enumerate(self._pieces(e)):
                    row = pi if self.layout == "padded" else 0
                    if self.layout == "padded":
                        row = int(pc.slot[0]) if self.mode == "ranking" and int(pc.slot[0]) < n else q - 1
                    a, b = int(at[row]), int(at[row]) + len(pc.ids)
                    sa, sb = at_s, at_s + len(pc.tgt)
                    if b > length or sb > s:
                        raise ValueError(f"{e.source or e.id}: {len(pc.ids)} tokens do not fit the planned "
                                         f"batch length {length}")
                    ids[ui, row, a:b], pos[ui, row, a:b], branch[ui, row, a:b] = pc.ids, pc.pos, pc.branch
                    seg[ui, row, a:b] = ei + 1
                    src[ui, sa:sb], tgt[ui, sa:sb] = pc.src + a + row * length, pc.tgt
                    slot[ui, sa:sb] = ei * self.slots + pc.slot
                    at[row], at_s = b, sb
                if self.mode == "ranking":
                    k = len(e.responses)
                    target[ui, ei, :k], cmask[ui, ei, :k] = e.scores, True
                    mle_slot[ui, ei] = {"original": n, "all": -1}.get(self.mle_target, _best(e))
        out = {"input_ids": ids, "positions": pos, "segment_ids": seg, "score_src": src, "score_tgt": tgt,
               "score_slot": slot, "example_mask": ex_mask, "real_tokens": real_tokens}
        if self.mode == "ranking" and self.layout != "padded":
            out["branch_ids"] = branch
        if self.block:
            out["kv_blocks"] = kv
        if self.mode == "ranking":
            out.update(target=target, candidate_mask=cmask, mle_slot=mle_slot)
        return out


def _best(e: TokenizedExample) -> int:
    """The best candidate's index: the first of tied best, as a stable sort gives (and as
    ``tokenize_ranking`` picks the ``best`` MLE target)."""
    return int(np.argmax(np.asarray(e.scores)))


def num_real_tokens(examples: Sequence[TokenizedExample], mode: str, mle_target: str) -> int:
    return sum(LayoutCollator.real_tokens(e, mode, mle_target) for e in examples)


def padding_fraction(batch: dict) -> float:
    """Share of the batch's token positions that are padding."""
    return 1.0 - float(np.mean(batch["segment_ids"] > 0))


def describe(shape: BatchShape) -> str:
    return f"U={shape.units} Q={shape.rows} L={shape.length} S={shape.scored} E={shape.examples}"



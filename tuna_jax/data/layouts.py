"""Candidate layouts: how tokenised examples become device batches (``data.layout``).

Every layout gives the model the same per-sequence log-likelihoods (tested against ``padded`` at
1e-5); they differ in how many token positions the device computes. ``padded``: a sub-row per
sequence (each candidate, and the MLE target), the prompt computed N + 1 times, as the reference code
does. ``prefix_shared``: a row per example, the prompt once (branch 0), each sequence a branch that
sees the prompt and itself. ``packed``: rows of ``row_len`` tokens filled with prefix-shared pieces of
several examples, each piece its own segment.

:class:`LayoutCollator` turns B examples (per host) into U units of Q sub-rows of L tokens:
``input_ids``, ``positions``, ``segment_ids`` (and ``branch_ids``) int32 [U, Q, L], the scored tokens'
indices ``score_*`` int32 [U, S], ``unit_example`` int32 [U, E], the optional key-block table
``kv_blocks`` int32 [U, Q, L/c, M], and per example the masks, ``real_tokens`` and, for ranking, the
targets [B, N]. Log-likelihood sums are computed per unit and summed into their examples through
``unit_example``. Shapes are agreed over the global batch (:meth:`LayoutCollator.plan`), at most
``shape_buckets`` of them per run.

Every array, the units per layout, hosts and micro-batches: docs/data.md#layouts.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import numpy as np

from tuna_jax.data.batching import MLE_TARGETS, WITH_ORIGINAL, TokenizedExample

LAYOUTS = ("padded", "prefix_shared", "packed")


def resolve_layout(layout: str, platform: str | None = None) -> str:
    """``auto``: ``prefix_shared`` on CPU and ``packed`` on GPU, the fastest layouts measured there
    by ``bench/rank_step.py`` (docs/performance.md; on an H200 at 8 prompts packed 1.73x padded,
    prefix_shared 1.70x): block-sparse attention makes one long row per example cheap on CPU,
    while cuDNN with a mask pays for the whole of a long row. TPU takes ``packed`` too, for the same
    reason and its few compiled shapes per run; that choice is not measured on a TPU."""
    if layout != "auto":
        return layout
    if platform is None:
        import jax

        platform = jax.default_backend()
    return "prefix_shared" if platform == "cpu" else "packed"


@dataclasses.dataclass(frozen=True)
class BatchShape:
    """Static shape of one host's batch: U units of Q sub-rows of L tokens, S scored entries and E
    examples per unit, M key blocks per query block (0: no block table)."""

    units: int
    rows: int
    length: int
    scored: int
    examples: int
    kv_blocks: int = 0

    @property
    def positions(self) -> int:
        """Token positions the device computes per host batch (U * Q * L): a shape's cost."""
        return self.units * self.rows * self.length

    def union(self, other: "BatchShape") -> "BatchShape":
        return BatchShape(*(max(a, b) for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


@dataclasses.dataclass
class _Piece:
    """A prompt and some of its example's sequences, contiguous in one sub-row.

    example: index of the example in the host's rows; seqs: (slot, response ids) in order;
    branched: the sequences are branches after the prompt (prefix-shared), else one causal
    sequence (padded, SFT)."""

    example: int
    prompt: np.ndarray
    seqs: list
    branched: bool

    @property
    def length(self) -> int:
        return len(self.prompt) + sum(len(r) for _, r in self.seqs)

    @property
    def scored(self) -> int:
        return sum(len(r) for _, r in self.seqs)

    def runs(self, at: int) -> list[tuple[int, int, int, int]]:
        """Token runs (start, end, lo, hi) when placed at ``at``: a query in [start, end) sees
        keys in [start, itself] and, for a branch, its prompt [lo, hi)."""
        p = len(self.prompt)
        if not self.branched:
            return [(at, at + self.length, at, at)]
        runs, b = [(at, at + p, at, at)], at + p
        for _, r in self.seqs:
            runs.append((b, b + len(r), at, at + p))
            b += len(r)
        return runs

    def arrays(self):
        """ids, positions, branch ids [length]; then src, tgt, slot, tgt_at [scored] (src and tgt_at
        relative to the piece's start)."""
        p = len(self.prompt)
        ids, pos, branch = [self.prompt], [np.arange(p)], [np.zeros(p, np.int32)]
        src, tgt, slot, tgt_at = [], [], [], []
        at = p
        for b, (k, r) in enumerate(self.seqs, 1):
            m = len(r)
            ids.append(r)
            pos.append(np.arange(p, p + m) if self.branched else np.arange(at, at + m))
            branch.append(np.full(m, b if self.branched else 0, np.int32))
            # A branch's first token is predicted by the prompt's last token; the others by their predecessor.
            first = p - 1 if self.branched else at - 1
            src.append(np.concatenate([[first], np.arange(at, at + m - 1)]))
            tgt.append(r)
            slot.append(np.full(m, k, np.int32))
            tgt_at.append(np.arange(at, at + m))
            at += m
        cat = lambda xs: np.concatenate(xs).astype(np.int32)  # noqa: E731
        return cat(ids), cat(pos), cat(branch), cat(src), cat(tgt), cat(slot), cat(tgt_at)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple if multiple else n


class LayoutCollator:
    """Examples -> the layout batch described in docs/data.md#layouts.

    mode: ``sft`` or ``ranking``; ``pad_to_multiple``: L and S are the batch's longest rounded up
    to this (0: not rounded, and padded / prefix_shared runs take one shape); ``row_len``: packed row
    length (0: ``max_len``); ``unit_multiple``: packed rows per host are a multiple of it (this
    host's data-parallel devices x ``micro_batches``); ``micro_batches``: gradient-accumulation
    steps the train step splits a batch into; ``attention_block``: block size of the key-block
    table (0: none); ``shape_buckets``: a run's batches take at most this many shapes (planned by
    :class:`tuna_jax.data.batching.BatchIterator`).
    """

    def __init__(self, layout: str, mode: str, max_len: int, pad_id: int, num_candidates: int = 0,
                 mle_target: str = "original", pad_to_multiple: int = 64, row_len: int = 0, unit_multiple: int = 1,
                 attention_block: int = 64, micro_batches: int = 1, shape_buckets: int = 1):
        layout = resolve_layout(layout)
        if layout not in LAYOUTS:
            raise ValueError(f"data.layout={layout!r}: choose auto or one of {', '.join(LAYOUTS)}")
        if mode not in ("sft", "ranking"):
            raise ValueError(f"mode must be 'sft' or 'ranking', got {mode!r}")
        if mle_target not in MLE_TARGETS:
            raise ValueError(f"mle_target must be one of {MLE_TARGETS}, got {mle_target!r}")
        self.layout, self.mode, self.max_len, self.pad_id = layout, mode, int(max_len), int(pad_id)
        self.n = int(num_candidates) if mode == "ranking" else 0
        self.mle_target = mle_target if mode == "ranking" else "original"
        self.pad_to_multiple, self.unit_multiple = int(pad_to_multiple or 0), int(unit_multiple)
        self.micro_batches = int(micro_batches)
        self.slots = self.n + 1
        # The padded layout's rows are single causal sequences: a block table would skip nothing.
        self.block = int(attention_block) if layout != "padded" else 0
        self.row_len = _round_up(int(row_len) or self.max_len, self.block or 1) if layout == "packed" else 0
        if layout == "packed" and self.row_len < self.max_len:
            raise ValueError(f"data.row_len={row_len} < data.max_len={max_len}: every sequence must fit a row")
        # A run's batches take at most this many shapes (BatchIterator); pad_to_multiple=0 has always
        # meant one shape per run for the padded and prefix_shared layouts, and still does.
        self.shape_buckets = max(1, int(shape_buckets)) if self.pad_to_multiple or layout == "packed" else 1

    # ---- examples -> pieces -> units ---------------------------------------------------------

    def _sequences(self, e: TokenizedExample) -> list[tuple[int, np.ndarray]]:
        """(slot, response ids) of every sequence of the example that the device computes."""
        if self.mode == "sft":
            return [(0, np.asarray(e.responses[0], np.int32))]
        if len(e.responses) > self.n:
            raise ValueError(f"{e.source or e.id}: {len(e.responses)} candidates > num_candidates {self.n}")
        seqs = [(k, np.asarray(r, np.int32)) for k, r in enumerate(e.responses)]
        if self.mle_target in WITH_ORIGINAL:
            if e.mle is None:
                raise ValueError(f"{e.source or e.id}: tokenised without an MLE target but "
                                 f"mle_target={self.mle_target!r}")
            seqs.append((self.n, np.asarray(e.mle, np.int32)))
        return seqs

    def _groups(self, i: int, e: TokenizedExample) -> list[_Piece]:
        """The example as the device computes it: the padded layout and SFT one causal piece per
        sequence; the others one prompt with every sequence as a branch (packing may split it)."""
        p = np.asarray(e.prompt_ids, np.int32)
        seqs = self._sequences(e)
        if self.layout == "padded" or self.mode == "sft":
            return [_Piece(i, p, [s], False) for s in seqs]
        return [_Piece(i, p, seqs, True)]

    def _pack(self, groups: list[_Piece]) -> list[list[_Piece]]:
        """Rows of at most ``row_len`` tokens holding every sequence of ``groups`` once.

        Groups go in decreasing length, each whole into the fullest row it fits (best fit). A
        group that fits no row is split, since its prompt can be computed again before any subset
        of its branches: the branches that fit go into the row with the most room when they move at
        least twice the prompt's length there (a smaller move costs about what it saves), and the
        rest continues; otherwise a new row takes the longest branches that fit. On the Alpaca-GPT4
        lengths of ``bench/rank_step.py --gpu`` (48 prompts, 4 candidates + the MLE target, rows of
        1024) this needs 7.8% fewer rows than first-fit-decreasing of whole groups cut in order.
        Causal (unbranched) groups are never split; ``max_len <= row_len`` makes each fit a row.
        """
        def fill(rest: list, room: int) -> list:  # longest first, every branch that still fits
            take = []
            for s in rest:
                if len(s[1]) <= room:
                    take.append(s)
                    room -= len(s[1])
            return take

        rows: list[list[_Piece]] = []
        free: list[int] = []
        for g in sorted(groups, key=lambda g: -g.length):
            p = len(g.prompt)
            rest = sorted(g.seqs, key=lambda s: -len(s[1]))
            while rest:
                need = p + sum(len(r) for _, r in rest)
                fits = [j for j, f in enumerate(free) if f >= need]
                if fits:
                    j, take = min(fits, key=free.__getitem__), rest
                else:
                    j = max(range(len(free)), key=free.__getitem__, default=None)
                    take = fill(rest, free[j] - p) if g.branched and j is not None else []
                    if sum(len(r) for _, r in take) < 2 * p:
                        j, take = None, fill(rest, self.row_len - p) if g.branched else rest
                if j is None:
                    rows.append([])
                    free.append(self.row_len)
                    j = len(rows) - 1
                piece = _Piece(g.example, g.prompt, sorted(take, key=lambda s: s[0]), g.branched)
                rows[j].append(piece)
                free[j] -= piece.length
                taken = {id(s) for s in take}
                rest = [s for s in rest if id(s) not in taken]
        return rows

    def _units(self, rows: Sequence[Optional[TokenizedExample]]) -> list[list[tuple[int, _Piece]]]:
        """Each unit's (sub-row, piece) list. Padded and prefix_shared: one unit per row (a None row
        gives an empty unit); packed: ``_pack`` per micro-batch part."""
        if self.layout != "packed":
            units = []
            for i, e in enumerate(rows):
                pieces = [] if e is None else self._groups(i, e)
                if self.layout == "padded" and self.mode == "ranking":
                    q = self.n + (self.mle_target in WITH_ORIGINAL)
                    units.append([(pc.seqs[0][0] if pc.seqs[0][0] < self.n else q - 1, pc) for pc in pieces])
                else:
                    units.append([(0, pc) for pc in pieces])
            return units
        units = []
        for part in self._parts(rows):
            groups = [pc for i in part if rows[i] is not None for pc in self._groups(i, rows[i])]
            units.append([[(0, pc) for pc in sorted(b, key=lambda pc: pc.example)] for b in self._pack(groups)])
        return units  # packed: one list of units per part

    def _parts(self, rows: Sequence) -> list[range]:
        """The host's rows split into the micro-batch parts it packs separately."""
        if self.micro_batches % self._hosts and self._hosts % self.micro_batches:
            # The step takes micro-batch j as the j-th equal slice of the global units: it must be whole
            # hosts' units or whole parts of one host's, never a host's packing cut in the middle.
            raise ValueError(f"packed layout: train.grad_accum={self.micro_batches} micro-batches do not split over "
                             f"{self._hosts} hosts; make one a multiple of the other")
        parts = max(1, self.micro_batches // self._hosts)
        if len(rows) % parts:
            raise ValueError(f"{len(rows)} examples per host do not split into {parts} micro-batches")
        size = len(rows) // parts
        return [range(j * size, (j + 1) * size) for j in range(parts)]

    _hosts = 1  # set per call by the iterator (process count)

    # ---- shapes ------------------------------------------------------------------------------

    def host_shape(self, rows: Sequence[Optional[TokenizedExample]]) -> BatchShape:
        """The smallest shape that holds these (one host's) rows, before rounding."""
        if self.layout == "packed":
            parts = self._units(rows)
            per_part = max([len(p) for p in parts] + [1])
            units = [u for p in parts for u in p]
            length = self.row_len
            count = per_part * len(parts)
        else:
            units = self._units(rows)
            length = max([pc.length for u in units for _, pc in u] + [1])
            count = len(rows)
        q = self.n + (self.mle_target in WITH_ORIGINAL) if self.layout == "padded" and self.mode == "ranking" else 1
        scored = max([sum(pc.scored for _, pc in u) for u in units] + [1])
        per_unit = max([len({pc.example for _, pc in u}) for u in units] + [1])
        if self.layout == "prefix_shared":
            length = _round_up(length, self._length_multiple())
        m = max([self._max_blocks(u, length) for u in units] + [1]) if self.block else 0
        return BatchShape(count, q, length, scored, per_unit, m)

    def plan(self, host_rows: Sequence[Sequence[Optional[TokenizedExample]]]) -> BatchShape:
        """One shape for a global batch given every host's rows: the union of the host shapes,
        rounded (L and S up to ``pad_to_multiple``; packed U per part up to ``unit_multiple``)."""
        self._hosts = len(host_rows)
        shape = None
        for rows in host_rows:
            s = self.host_shape(rows)
            shape = s if shape is None else shape.union(s)
        return self.round(shape)

    def round(self, s: BatchShape) -> BatchShape:
        m = self.pad_to_multiple or 1
        units, length = s.units, s.length
        if self.layout == "packed":
            parts = max(1, self.micro_batches // self._hosts)
            units = parts * _round_up(s.units // parts, max(1, self.unit_multiple // parts))
        if self.layout == "padded":
            length = min(_round_up(length, m), self.max_len)
        return BatchShape(units, s.rows, length, min(_round_up(s.scored, m), s.rows * length), s.examples,
                          s.kv_blocks and min(_round_up(s.kv_blocks, 2), length // self.block))

    def _length_multiple(self) -> int:
        """Row lengths of prefix_shared batches are multiples of this (and of the block size)."""
        m = self.pad_to_multiple or 1
        return m * self.block // math.gcd(m, self.block) if self.block else m

    # ---- key-block table ---------------------------------------------------------------------

    def _needed_blocks(self, unit: list, length: int) -> list[list[int]]:
        """For each block of queries of the (single-row) unit, the key blocks holding a key some
        query may see: its own run up to itself, and its prompt for a branch."""
        c = self.block
        need: list[set] = [set() for _ in range(length // c)]
        at = 0
        for _, pc in unit:
            for start, stop, lo, hi in pc.runs(at):
                for j in range(start // c, (stop - 1) // c + 1):
                    need[j].update(range(start // c, (min(stop, (j + 1) * c) - 1) // c + 1))
                    if hi > lo:
                        need[j].update(range(lo // c, (hi - 1) // c + 1))
            at += pc.length
        for j in range(at // c, len(need)):  # blocks holding padding queries: each sees itself
            need[j].add(j)
        return [sorted(n) for n in need]

    def _max_blocks(self, unit: list, length: int) -> int:
        return max(len(n) for n in self._needed_blocks(unit, length))

    # ---- collation ---------------------------------------------------------------------------

    def __call__(self, rows: Sequence[Optional[TokenizedExample]], shape: BatchShape, process_index: int = 0,
                 process_count: int = 1) -> dict:
        """This host's rows (None = padding rows of a last partial batch) -> the batch dict.
        ``process_index`` / ``process_count`` place the rows in the global batch (for the
        micro-batch-relative example indices)."""
        self._hosts = process_count
        b, (u, q, length, s, e_max, m) = len(rows), dataclasses.astuple(shape)
        if self.layout == "packed":
            parts = self._units(rows)
            per_part = u // len(parts)
            if any(len(p) > per_part for p in parts):
                raise ValueError(f"packing needs {max(map(len, parts))} rows per micro-batch > the planned {per_part}")
            units = [x for p in parts for x in p + [[] for _ in range(per_part - len(p))]]
        else:
            units = self._units(rows)
        micro = b * process_count // self.micro_batches  # examples per micro-batch
        rel = lambda i: (process_index * b + i) % micro  # example index within its micro-batch
        ids = np.full((u, q, length), self.pad_id, np.int32)
        pos, seg, branch = (np.zeros((u, q, length), np.int32) for _ in range(3))
        src, tgt, tgt_pos = (np.zeros((u, s), np.int32) for _ in range(3))
        slot = np.full((u, s), -1, np.int32)
        unit_example = np.full((u, e_max), -1, np.int32)
        kv = np.full((u, q, length // self.block if self.block else 0, m), -1, np.int32)
        for ui, unit in enumerate(units):
            if self.block:
                for j, blocks in enumerate(self._needed_blocks(unit, length)):
                    if len(blocks) > m:
                        raise ValueError(f"a row needs {len(blocks)} key blocks > the planned {m}")
                    kv[ui, 0, j, : len(blocks)] = blocks
            examples = sorted({pc.example for _, pc in unit})
            unit_example[ui, : len(examples)] = [rel(i) for i in examples]
            at, at_s = np.zeros(q, np.int64), 0  # next free token per sub-row; next scored entry of the unit
            pieces_in_row = np.zeros(q, np.int64)
            for row, pc in unit:
                p_ids, p_pos, p_branch, p_src, p_tgt, p_slot, p_at = pc.arrays()
                a, z, sz = int(at[row]), int(at[row]) + len(p_ids), at_s + len(p_tgt)
                if z > length or sz > s:
                    raise ValueError(f"{rows[pc.example].source or rows[pc.example].id}: {len(p_ids)} tokens do "
                                     f"not fit the planned batch length {length}")
                ids[ui, row, a:z], pos[ui, row, a:z], branch[ui, row, a:z] = p_ids, p_pos, p_branch
                pieces_in_row[row] += 1
                seg[ui, row, a:z] = pieces_in_row[row]  # each piece of a row its own segment: 1, 2, ...
                src[ui, at_s:sz], tgt[ui, at_s:sz] = p_src + a + row * length, p_tgt
                tgt_pos[ui, at_s:sz] = p_at + a + row * length
                slot[ui, at_s:sz] = examples.index(pc.example) * self.slots + p_slot
                at[row], at_s = z, sz
        out = {"input_ids": ids, "positions": pos, "segment_ids": seg, "score_src": src, "score_tgt": tgt,
               "score_pos": tgt_pos, "score_slot": slot, "unit_example": unit_example,
               "example_mask": np.array([e is not None for e in rows], bool),
               "real_tokens": np.array([0 if e is None else self.real_tokens(e, self.mode, self.mle_target)
                                        for e in rows], np.float32)}
        if self.mode == "ranking" and self.layout != "padded":
            out["branch_ids"] = branch
        if self.block:
            out["kv_blocks"] = kv
        if self.mode == "ranking":
            target, cmask = np.zeros((b, self.n), np.float32), np.zeros((b, self.n), bool)
            mle_slot = np.full((b,), -1, np.int32)
            for i, e in enumerate(rows):
                if e is not None:
                    k = len(e.responses)
                    target[i, :k], cmask[i, :k] = e.scores, True
                    mle_slot[i] = {"original": self.n, "all": -1, "every": -1}.get(self.mle_target, _best(e))
            out.update(target=target, candidate_mask=cmask, mle_slot=mle_slot)
            if any(e is not None and e.ref_logprob_sum is not None for e in rows):
                ref_sum, ref_n = np.zeros((b, self.n), np.float32), np.zeros((b, self.n), np.float32)
                for i, e in enumerate(rows):
                    if e is not None and e.ref_logprob_sum is not None:
                        k = len(e.responses)
                        ref_sum[i, :k], ref_n[i, :k] = e.ref_logprob_sum, e.ref_num_tokens
                out.update(ref_logprob_sum=ref_sum, ref_num_tokens=ref_n)
        return out

    @staticmethod
    def real_tokens(e: TokenizedExample, mode: str, mle_target: str) -> int:
        """Prompt + response tokens of every sequence the loss reads, counted once per sequence."""
        p = len(e.prompt_ids)
        n = sum(p + len(r) for r in e.responses)
        if mode == "ranking" and mle_target in WITH_ORIGINAL and e.mle is not None:
            n += p + len(e.mle)
        return n


def _best(e: TokenizedExample) -> int:
    """The best candidate's index: the first of tied best, as a stable sort gives (and as
    ``tokenize_ranking`` picks the ``best`` MLE target)."""
    return int(np.argmax(np.asarray(e.scores)))

"""Tokenised examples and the resumable, per-host batch iterator.

Tokenisation fixes every example's token ids once, the same for every layout: one prompt per
example, shared by its candidates (and its MLE target), each response ending in EOS.
How examples become device arrays (padded, prefix-shared or packed) is
:mod:`tuna_jax.data.layouts`.

Every example fits in ``max_len``: when prompt + longest response (+EOS) is too long, either the
prompt is cut from the left, after the BOS (``truncate="left_prompt"``, counted as changed), or the
example is dropped (``truncate="drop"``, counted); if the response alone does not fit next to one
prompt token, the example is dropped and counted. The EOS is never cut.

All examples are tokenised up front on every host: every host must agree on the example list,
the shuffle and each global batch's shape, and then it collates only its own rows.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Optional, Sequence

import numpy as np

from tuna_jax.data.records import DataError, RankingRecord, SFTRecord, SkipReport, record_prompt
from tuna_jax.data.shapes import bucket_shapes
from tuna_jax.data.templates import SpecialTokenPolicy, Tokenizer, encode_prompt, encode_response

MLE_TARGETS = ("original", "best", "all", "every")
WITH_ORIGINAL = ("original", "every")  # the targets that read the original response as a sequence of its own
TRUNCATE = ("left_prompt", "drop")


@dataclasses.dataclass
class TokenizedExample:
    """One prompt and its responses as ids.

    prompt_ids: int32 [P], BOS included (after any truncation). responses: N arrays int32 [R_k],
    EOS included. scores: float32 [N] (ranking) or None (SFT). mle: int32 [R] for the MLE target
    ("original"/"best") or None. source: file:line, for messages. ref_logprob_sum / ref_num_tokens:
    float32 [N], a frozen reference model's candidate log-likelihoods stored with the data, or None.
    """

    prompt_ids: np.ndarray
    responses: list
    scores: Optional[np.ndarray]
    mle: Optional[np.ndarray]
    id: str
    source: str = ""
    ref_logprob_sum: Optional[np.ndarray] = None
    ref_num_tokens: Optional[np.ndarray] = None

    def seq_len(self) -> int:
        """Length of the longest sequence this example puts in a batch."""
        longest = max(len(r) for r in self.responses)
        if self.mle is not None:
            longest = max(longest, len(self.mle))
        return len(self.prompt_ids) + longest


def _fit_prompt(prompt: list, need: int, max_len: int, has_bos: bool, truncate: str, where: str,
                report: SkipReport) -> list:
    """The prompt ids that fit next to ``need`` response tokens, or DataError (dropped)."""
    if len(prompt) + need <= max_len:
        return prompt
    if truncate == "drop":
        raise DataError(where, None, f"{len(prompt)} prompt + {need} response tokens > max_len {max_len}",
                        reason="too_long")
    keep = max_len - need  # prompt tokens that fit
    if keep < 1:  # the first response token needs one token before it to be predicted from
        raise DataError(where, None, f"response alone ({need} tokens with EOS) does not fit in max_len "
                        f"{max_len} after one prompt token", reason="response_too_long")
    # Keep the BOS: the model was trained with it at position 0.
    cut = prompt[:1] + prompt[len(prompt) - (keep - 1):] if has_bos else prompt[len(prompt) - keep:]
    report.note("prompt_truncated_left", f"{where}: prompt {len(prompt)} -> {len(cut)} tokens")
    return cut


def _check_args(max_len: int, truncate: str, on_error: str) -> None:
    if truncate not in TRUNCATE:
        raise ValueError(f"truncate must be one of {TRUNCATE}, got {truncate!r}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")


def _ids(x: Sequence[int]) -> np.ndarray:
    return np.asarray(x, dtype=np.int32)


def tokenize_sft(records: Iterable[SFTRecord], tok: Tokenizer, policy: SpecialTokenPolicy, max_len: int,
                 *, truncate: str = "left_prompt", on_error: str = "raise",
                 report: Optional[SkipReport] = None) -> tuple[list, SkipReport]:
    """SFT records -> TokenizedExamples (one response each). Returns ``(examples, report)``."""
    _check_args(max_len, truncate, on_error)
    report = report if report is not None else SkipReport()
    has_bos = policy.add_bos
    out = []
    for rec in records:
        where = rec.source or str(rec.id)
        try:
            prompt = encode_prompt(tok, record_prompt(rec), policy)
            resp = _encode_resp(tok, rec.output, policy, where, "output")
            _need_prompt(prompt, where)
            prompt = _fit_prompt(prompt, len(resp), max_len, has_bos, truncate, where, report)
        except DataError as e:
            if on_error == "raise":
                raise
            report.skip(e.reason, str(e))
            continue
        out.append(TokenizedExample(_ids(prompt), [_ids(resp)], None, None, rec.id, rec.source))
    return out, report


def tokenize_ranking(records: Iterable[RankingRecord], tok: Tokenizer, policy: SpecialTokenPolicy,
                     max_len: int, num_candidates: int, *, mle_target: str = "original",
                     truncate: str = "left_prompt", on_error: str = "raise",
                     report: Optional[SkipReport] = None, reference: bool = False) -> tuple[list, SkipReport]:
    """Ranking records -> TokenizedExamples with up to ``num_candidates`` responses.

    One prompt per example, shared by all its candidates, truncated so the longest candidate (and
    the MLE target) fits. A record with more than ``num_candidates`` candidates, or with no
    original response when ``mle_target="original"``, is an error or a counted skip.

    ``reference``: every record must carry reference scores (``ref_logprob_sum``/``ref_num_tokens``),
    and they must be over the same tokens this run scores: each candidate's token count equal to
    ``ref_num_tokens`` (same tokenizer and EOS policy) and the prompt not cut (the reference model saw
    all of it). Otherwise an error or a counted skip.
    """
    _check_args(max_len, truncate, on_error)
    if mle_target not in MLE_TARGETS:
        raise ValueError(f"mle_target must be one of {MLE_TARGETS}, got {mle_target!r}")
    report = report if report is not None else SkipReport()
    out = []
    for rec in records:
        where = rec.source or str(rec.id)
        try:
            if len(rec.candidates) > num_candidates:
                raise DataError(where, "candidates", f"{len(rec.candidates)} candidates > num_candidates "
                                f"{num_candidates}", reason="too_many_candidates")
            if len(rec.scores) != len(rec.candidates):
                raise DataError(where, "scores", f"{len(rec.scores)} scores for {len(rec.candidates)} "
                                "candidates", reason="length_mismatch")
            prompt = encode_prompt(tok, record_prompt(rec), policy)
            _need_prompt(prompt, where)
            resps = [_encode_resp(tok, c, policy, where, f"candidates[{k}]") for k, c in enumerate(rec.candidates)]
            scores = np.asarray(rec.scores, dtype=np.float32)
            mle = None
            if mle_target in WITH_ORIGINAL:
                if not rec.output.strip():
                    raise DataError(where, "output", f"no original response for mle_target={mle_target!r}",
                                    reason="no_original_response")
                mle = _encode_resp(tok, rec.output, policy, where, "output")
            elif mle_target == "best":
                mle = resps[int(np.argmax(scores))]  # the first of tied best, as a stable sort gives
            need = max([len(r) for r in resps] + ([len(mle)] if mle is not None else []))
            full = len(prompt)
            prompt = _fit_prompt(prompt, need, max_len, policy.add_bos, truncate, where, report)
            if reference:
                _check_reference(rec, resps, full != len(prompt), where)
        except DataError as e:
            if on_error == "raise":
                raise
            report.skip(e.reason, str(e))
            continue
        ref = (None, None) if rec.ref_logprob_sum is None else (
            np.asarray(rec.ref_logprob_sum, np.float32), np.asarray(rec.ref_num_tokens, np.float32))
        out.append(TokenizedExample(_ids(prompt), [_ids(r) for r in resps], scores,
                                    None if mle is None else _ids(mle), rec.id, rec.source, *ref))
    return out, report


def _check_reference(rec: RankingRecord, resps: list, prompt_cut: bool, where: str) -> None:
    """Reference scores must exist and cover exactly the tokens this run scores."""
    if rec.ref_logprob_sum is None:
        raise DataError(where, "ref_logprob_sum", "loss.reference=data needs the reference model's scores on "
                        "every record: run `tuna-jax score` on the starting model, then `tuna-jax "
                        "reference-scores`", reason="no_reference_scores")
    for k, (r, n) in enumerate(zip(resps, rec.ref_num_tokens)):
        if len(r) != int(n):
            raise DataError(where, f"ref_num_tokens[{k}]", f"{int(n)} reference tokens but this run scores {len(r)} "
                            "(a different tokenizer or BOS/EOS policy?)", reason="reference_mismatch")
    if prompt_cut:
        raise DataError(where, "ref_logprob_sum", "the prompt was cut to fit data.max_len, but the reference "
                        "scores saw all of it; raise data.max_len or drop the record", reason="reference_mismatch")


def _encode_resp(tok, text, policy, where, field) -> list:
    if not text.strip():
        raise DataError(where, field, "empty response", reason="empty_response")
    return encode_response(tok, text, policy)


def _need_prompt(prompt: list, where: str) -> None:
    if not prompt:  # no BOS and an empty prompt: nothing would predict the first response token
        raise DataError(where, "instruction", "empty prompt and no BOS", reason="empty_prompt")


# ---------------------------------------------------------------------------------------------

class BatchIterator:
    """Seeded, resumable iterator over this host's part of each global batch.

    ``collator`` is a :class:`tuna_jax.data.layouts.LayoutCollator`. Each global batch's shape is
    planned over every host's rows, so all hosts build the same shapes. Before the first batch, the
    shapes of every batch of the run (``num_epochs`` epochs, or one when endless) are planned and the
    run is given at most ``collator.shape_buckets`` of them (:func:`tuna_jax.data.shapes.bucket_shapes`:
    the batches grouped by token positions, each taking its group's union, the groups chosen to compute
    the fewest positions over the run), so the step compiles at most that many times. They depend only
    on the examples, the seed, the batch size and the collator, so a resumed run takes the same ones.
    :meth:`planned_shapes` lists them. An endless run's later epochs take the union of all of them.

    Epoch e visits the examples in ``permutation(seed, e)`` order (``numpy`` PCG64 seeded with
    ``(seed, e)``, so any epoch's order is known without replaying earlier ones), in consecutive
    global batches of ``global_batch_size`` prompts. ``drop_remainder=True`` leaves the last
    ``num_examples % global_batch_size`` of each epoch's order out (``dropped_per_epoch``; a
    different set each epoch); ``False`` fills the last batch with padding rows
    (``example_mask`` False). Host ``process_index`` of ``process_count`` gets rows
    ``[p*B/P, (p+1)*B/P)`` of every global batch.

    ``state()`` is ``{"seed", "epoch", "index", "num_examples", "global_batch_size"}``, ``index``
    being the next batch within the epoch; ``restore(state)`` continues exactly there.
    """

    def __init__(self, examples: Sequence[TokenizedExample], collator, global_batch_size: int,
                 *, seed: int = 0, shuffle: bool = True, num_epochs: Optional[int] = None,
                 drop_remainder: bool = True, process_index: int = 0, process_count: int = 1):
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is not in 0..process_count-1 ({process_count})")
        if global_batch_size % process_count:
            raise ValueError(f"global batch of {global_batch_size} prompts does not divide over "
                             f"{process_count} hosts; choose a multiple of {process_count}")
        n = len(examples)
        self.steps_per_epoch = n // global_batch_size if drop_remainder else math.ceil(n / global_batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{n} examples make no full global batch of {global_batch_size}"
                             + ("" if n else " (no examples)"))
        self.examples, self.collator = list(examples), collator
        self.global_batch_size, self.shuffle, self.num_epochs = global_batch_size, shuffle, num_epochs
        self.drop_remainder = drop_remainder
        self.dropped_per_epoch = n - self.steps_per_epoch * global_batch_size if drop_remainder else 0
        self.per_host = global_batch_size // process_count
        self.process_index = process_index
        self.seed, self.epoch, self.index = int(seed), 0, 0
        self._order_epoch, self._order = None, None
        self.process_count = process_count
        self._shapes, self._largest = None, None

    def _global_rows(self, epoch: int, index: int) -> list:
        g = self.global_batch_size
        idx = self.order(epoch)[index * g: (index + 1) * g]
        return [self.examples[i] for i in idx] + [None] * (g - len(idx))

    def _host_rows(self, rows: list) -> list[list]:
        return [rows[p * self.per_host: (p + 1) * self.per_host] for p in range(self.process_count)]

    def _plan(self) -> dict:
        """(epoch, index) -> shape of every batch of the run (planned once, before the first)."""
        if self._shapes is None:
            exact = {(e, i): self.collator.plan(self._host_rows(self._global_rows(e, i)))
                     for e in range(self.num_epochs or 1) for i in range(self.steps_per_epoch)}
            self._shapes = bucket_shapes(exact, self.collator.shape_buckets,
                                         lambda s: s.positions)
            for s in self._shapes.values():
                self._largest = s if self._largest is None else self._largest.union(s)
        return self._shapes

    def shape_for(self, epoch: int, index: int):
        """The planned shape (a ``BatchShape``) of batch ``index`` of ``epoch``."""
        return self._plan().get((epoch, index), self._largest)  # an endless run's later epochs: the union

    def planned_shapes(self) -> list:
        """The distinct batch shapes of the run (``BatchShape``, smallest first): what the step compiles."""
        return sorted(set(self._plan().values()), key=lambda s: (s.positions, dataclasses.astuple(s)))

    def upcoming(self, steps: Optional[int] = None) -> list[tuple[int, int]]:
        """(epoch, index) of the first batch of each distinct shape among the next ``steps`` batches
        (default: the rest of the run; one epoch when endless), in the order they come: what to
        compile ahead."""
        if steps is None:
            steps = len(self) if self.num_epochs is not None else self.steps_per_epoch
        seen, out = set(), []
        epoch, index = self.epoch, self.index
        for _ in range(steps):
            if index >= self.steps_per_epoch:
                epoch, index = epoch + 1, 0
            if self.num_epochs is not None and epoch >= self.num_epochs:
                break
            shape = self.shape_for(epoch, index)
            if shape not in seen:
                seen.add(shape)
                out.append((epoch, index))
            index += 1
        return out

    def batch_at(self, epoch: int, index: int) -> dict:
        """This host's batch ``index`` of ``epoch`` (the iterator's position does not move)."""
        shape = self.shape_for(epoch, index)
        rows = self._host_rows(self._global_rows(epoch, index))[self.process_index]
        return self.collator(rows, shape, self.process_index, self.process_count)

    def __len__(self) -> int:
        """Batches left to yield (needs num_epochs)."""
        if self.num_epochs is None:
            raise TypeError("an endless BatchIterator (num_epochs=None) has no length")
        return max(0, (self.num_epochs - self.epoch) * self.steps_per_epoch - self.index)

    def order(self, epoch: int) -> np.ndarray:
        """Example indices in epoch ``epoch``'s order."""
        if self._order_epoch != epoch:
            n = len(self.examples)
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, epoch]).permutation(n)
            else:
                self._order = np.arange(n)
            self._order_epoch = epoch
        return self._order

    def state(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "index": self.index,
                "num_examples": len(self.examples), "global_batch_size": self.global_batch_size}

    def restore(self, state: dict) -> None:
        for key, have in (("num_examples", len(self.examples)), ("global_batch_size", self.global_batch_size)):
            if int(state[key]) != have:
                raise ValueError(f"cannot resume the data position: checkpoint has {key}={state[key]}, "
                                 f"this run has {have} (data or batch size changed)")
        if not 0 <= int(state["index"]) <= self.steps_per_epoch:
            raise ValueError(f"data position index {state['index']} is outside 0..{self.steps_per_epoch}")
        self.seed, self.epoch, self.index = int(state["seed"]), int(state["epoch"]), int(state["index"])
        self._order_epoch = None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.index >= self.steps_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        batch = self.batch_at(self.epoch, self.index)
        self.index += 1
        return batch

"""Teacher-forced log-probs of continuations given their prompts: the one scorer.

``tuna-jax score``, the local teacher, the demo's held-out pair accuracy and anything else that
needs log p(continuation | prompt) from a model use :class:`Scorer`. It lays its input out with the
training layouts (:mod:`tuna_jax.data.layouts`): the continuations of one prompt form a
prefix-shared group (the prompt computed once), and groups go to the device a batch at a time,
sorted by length, with bucketed shapes so that few shapes compile. The numbers are the training
step's numbers (:func:`tuna_jax.logprobs.scored_token_logprobs`): float32, only scored tokens
projected to the vocabulary. Multi-host: every host calls the scorer with the same input, places
its own shards of each batch, and gets every result.

Below the Scorer, files of candidates (what ``tuna-jax score`` runs, :func:`score_file`): exact
log-likelihoods of given candidates under a model, text candidates scored as the response to the
Alpaca prompt (response tokens plus EOS, the score v_k of ``losses.py``) or pre-tokenised ones as
given; per candidate ``logprob_sum`` (nats) and ``num_tokens`` (scored tokens), in input order.

The file formats: docs/objectives.md#scoring-candidates; the scorer: docs/feedback.md#scorer.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import pathlib
import sys
from typing import Sequence

import jax
import numpy as np

from tuna_jax import parallel
from tuna_jax.data.batching import TokenizedExample
from tuna_jax.data.layouts import BatchShape, LayoutCollator, resolve_layout
from tuna_jax.data.shapes import bucket_length
from tuna_jax.io.errors import InputError
from tuna_jax.io.jsonl import dumps, iter_jsonl
from tuna_jax.io.lock import OutputLock

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


# ---- files of candidates: `tuna-jax score` ----------------------------------------------------------


def _int_list(value, where: str, field: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise InputError(where, field, "must be a list of integer token ids", reason="wrong_type")
    return value


def check_line(obj: dict, where: str) -> None:
    """Structural checks of one input line, the same rules as training data: text fields are strings,
    candidates a non-empty list of non-empty responses, token ids integers, ``id`` a string or integer.
    Needs no model or tokenizer, so a whole file is checked before anything loads."""
    if "id" in obj and (isinstance(obj["id"], bool) or not isinstance(obj["id"], (str, int))):
        raise InputError(where, "id", f"expected a string or integer, got {type(obj['id']).__name__}",
                         reason="wrong_type")
    if "prompt_ids" in obj or "candidate_ids" in obj:
        for field in ("prompt_ids", "candidate_ids"):
            if field not in obj:
                raise InputError(f"{where}: pre-tokenised line is missing field {field!r}")
        if not _int_list(obj["prompt_ids"], where, "prompt_ids"):
            raise InputError(f"{where}: 'prompt_ids' is empty; the first candidate token needs a context")
        if not isinstance(obj["candidate_ids"], list) or not obj["candidate_ids"]:
            raise InputError(f"{where}: 'candidate_ids' must be a non-empty list of token-id lists")
        for k, cand in enumerate(obj["candidate_ids"]):
            if not _int_list(cand, where, f"candidate_ids[{k}]"):
                raise InputError(where, f"candidate_ids[{k}]", "empty candidate: there is no token to score",
                                 reason="empty_response")
        return
    for field in ("instruction", "candidates"):
        if field not in obj:
            raise InputError(f"{where}: missing field {field!r} (or give prompt_ids/candidate_ids)")
    if not isinstance(obj["instruction"], str):
        raise InputError(where, "instruction", f"expected a string, got {type(obj['instruction']).__name__}",
                         reason="wrong_type")
    if obj.get("input") is not None and not isinstance(obj["input"], str):
        raise InputError(where, "input", f"expected a string, got {type(obj['input']).__name__}", reason="wrong_type")
    cands = obj["candidates"]
    if not isinstance(cands, list) or not cands:
        raise InputError(f"{where}: 'candidates' must be a non-empty list of strings")
    for k, c in enumerate(cands):
        if not isinstance(c, str):
            raise InputError(where, f"candidates[{k}]", f"expected a string, got {type(c).__name__}",
                             reason="wrong_type")
        if not c.strip():
            raise InputError(where, f"candidates[{k}]", "empty response", reason="empty_response")


def read_lines(path: str) -> list[tuple[int, dict]]:
    """``(line number, object)`` for every non-blank line of a ``tuna-jax score`` input, each checked by
    :func:`check_line`; the first bad line is an InputError naming file, line and field."""
    lines = []
    for lineno, where, obj in iter_jsonl(path, what="input file"):
        check_line(obj, where)
        lines.append((lineno, obj))
    return lines


def group_for_line(obj: dict, where: str, encoder, vocab_size: int, max_len: int) -> Group:
    """One input line as a scoring group: the prompt's ids and each candidate's ids (pre-tokenised or
    text under the Alpaca template and the shared BOS/EOS policy)."""
    check_line(obj, where)
    if "prompt_ids" in obj:
        prompt, conts = obj["prompt_ids"], obj["candidate_ids"]
    else:
        if encoder is None:
            raise InputError(f"{where}: text candidates need a tokenizer (none found with the model; "
                             f"pass --tokenizer)")
        seqs = [encoder(obj["instruction"], obj.get("input") or "", c) for c in obj["candidates"]]
        prompt = seqs[0][0][:seqs[0][1]]  # every candidate follows the same prompt ids
        conts = [ids[start:] for ids, start in seqs]
    for k, cand in enumerate(conts):
        ids = list(prompt) + list(cand)
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise InputError(f"{where}: candidate {k}: token id {bad[0]} is outside the vocabulary (size {vocab_size})")
        if len(ids) > max_len:
            raise InputError(f"{where}: candidate {k} is {len(ids)} tokens with its prompt, over --max-len "
                             f"{max_len}; shorten it or raise --max-len (the model allows "
                             f"{max_len} positions here)")
    return Group(list(prompt), [list(c) for c in conts])


def make_candidate_encoder(tokenizer_path, policy=None):
    """(instruction, input, response) -> (ids, response_start) under the Alpaca template and
    the shared BOS/EOS policy. Raises FileNotFoundError when there is no tokenizer there."""
    from tuna_jax.data.templates import SpecialTokenPolicy, encode_prompt_response, format_prompt, load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    policy = policy or SpecialTokenPolicy()

    def encode(instruction: str, input_text: str, response: str):
        return encode_prompt_response(tok, format_prompt(instruction, input_text), response, policy)

    return encode


def _finite(x: float) -> float | None:
    """A log-likelihood for the output: None (JSON null) when it is not finite, never NaN in a file."""
    return x if math.isfinite(x) else None


def score_file(model, data: str, out: str, encoder=None, mesh=None, batch_rows: int = 8, max_len: int | None = None,
               examples_per_flush: int = 64, progress: bool = True,
               lines: list[tuple[int, dict]] | None = None, layout: str = "auto") -> int:
    """Score every line of ``data`` and write ``out``; returns the number of lines written.

    ``lines``: ``read_lines(data)`` when the caller already read them (the CLI does, before loading the
    model). A log-likelihood that is not finite (a numerical overflow, e.g. in bfloat16) is written as
    null and counted in a warning.

    Multi-host: every host runs this with the same arguments and scores every line on the global mesh
    (:class:`tuna_jax.scoring.Scorer`, ``layout`` one of the training layouts); process 0 alone writes
    ``out``, and no host returns before it is in place."""
    from tqdm import tqdm

    cfg = model.cfg
    max_len = max_len or cfg.max_position_embeddings
    lines = read_lines(data) if lines is None else lines
    scorer = Scorer(model, mesh, layout=layout, batch_groups=batch_rows)
    # Every line is encoded and checked (vocabulary, length) before any file is made: a refused run leaves nothing.
    groups = [group_for_line(obj, f"{data}:{lineno}", encoder, cfg.vocab_size, max_len) for lineno, obj in lines]
    non_finite = 0
    written = 0
    # One run per OUT (OUT.lock): two would write one OUT.partial at once; an earlier OUT is set aside.
    writer = jax.process_index() == 0
    with OutputLock(out, rewrites=True) if writer else contextlib.nullcontext() as lock:
        tmp = pathlib.Path(str(out) + ".partial")
        with open(tmp if writer else os.devnull, "w", encoding="utf-8") as f, \
                tqdm(total=len(lines), desc="score", unit="ex", disable=not progress or not writer,
                     file=sys.stderr) as bar:
            for s in range(0, len(lines), examples_per_flush):
                group = lines[s:s + examples_per_flush]
                per_example = scorer.score(groups[s:s + examples_per_flush])
                for e, (lineno, obj) in enumerate(group):
                    rec = {"index": s + e}
                    if "id" in obj:
                        rec["id"] = obj["id"]
                    sums = [_finite(lp) for lp, _ in per_example[e]]
                    non_finite += sum(x is None for x in sums)
                    rec["candidates"] = [{"logprob_sum": lp, "num_tokens": n}
                                         for lp, (_, n) in zip(sums, per_example[e])]
                    rec["logprob_sum"] = sums
                    rec["num_tokens"] = [n for _, n in per_example[e]]
                    f.write(dumps(rec) + "\n")
                    written += 1
                bar.update(len(group))
        if writer:
            tmp.replace(out)
            lock.commit()
    parallel.sync_hosts("tuna_jax_score_written")
    if non_finite and writer:
        print(f"score: WARNING: {non_finite} log-likelihood(s) were not finite (numerical overflow; try --dtype "
              f"float32) and are written as null", file=sys.stderr)
    return written

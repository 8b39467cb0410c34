"""`tuna-jax score`: exact log-likelihoods of given candidates under a model.

Input lines (JSONL), either

* text: ``{"id"?, "instruction", "input"?, "candidates": [str, ...]}`` -- each candidate is
  scored as the response to the Alpaca prompt, response tokens plus EOS (DESIGN's v_k), with
  the project's one BOS/EOS policy (``data/templates.py``);
* pre-tokenised: ``{"id"?, "prompt_ids": [int, ...], "candidate_ids": [[int, ...], ...]}`` --
  no template, no BOS/EOS added; exactly the given candidate tokens are scored, each given
  ``prompt_ids`` and the candidate's earlier tokens.

Output lines: ``{"index", "id"?, "candidates": [{"logprob_sum", "num_tokens"}, ...],
"logprob_sum": [...], "num_tokens": [...]}`` in input order; logprob_sum in nats (float32
accumulation), num_tokens the number of scored tokens.

This is also the local teacher's scorer (``feedback/teacher.py``).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
from typing import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tuna_jax import parallel
from tuna_jax.logprobs import sequence_logprobs


class ScoreInputError(ValueError):
    """A bad input line; the message names file:line and the field."""


@dataclasses.dataclass
class ScoreRow:
    """One (prompt, candidate) sequence: ids [T] and the index where scored tokens start."""

    example: int
    candidate: int
    ids: list[int]
    start: int


def bucket_length(n: int, multiple: int = 64) -> int:
    """Round a length up so that few distinct shapes are compiled (powers of two up to
    ``multiple``, then multiples of it)."""
    if n <= multiple:
        return max(8, 1 << (n - 1).bit_length())
    return -(-n // multiple) * multiple


def rows_to_batch(rows: Sequence[ScoreRow], batch_rows: int, length: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Right-padded [batch_rows, length] arrays; missing rows are all padding (masked)."""
    ids = np.full((batch_rows, length), pad_id, np.int32)
    seg = np.zeros((batch_rows, length), np.int32)
    pos = np.zeros((batch_rows, length), np.int32)
    mask = np.zeros((batch_rows, length), np.float32)
    for r, row in enumerate(rows):
        n = len(row.ids)
        ids[r, :n], seg[r, :n], pos[r, :n] = row.ids, 1, np.arange(n)
        mask[r, row.start:n] = 1.0
    return {"input_ids": ids, "segment_ids": seg, "positions": pos, "loss_mask": mask}


class Scorer:
    """Scores (prompt, candidate) rows with a model on a mesh, bucketed by length."""

    def __init__(self, model, mesh=None, batch_rows: int = 8, chunk: int = 128):
        self.model, self.mesh, self.chunk = model, mesh, chunk
        n_data = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
        self.batch_rows = -(-batch_rows // n_data) * n_data  # a multiple of the data axes
        from flax import nnx

        graphdef, state = nnx.split(model)

        @jax.jit
        def step(state, batch):
            m = nnx.merge(graphdef, state)
            return sequence_logprobs(m, batch["input_ids"], batch["loss_mask"], batch["segment_ids"],
                                     batch["positions"], chunk=chunk)

        self._state, self._step = state, step

    def score_rows(self, rows: Sequence[ScoreRow]) -> list[tuple[float, int]]:
        """(logprob_sum, num_tokens) for each row, in order."""
        out: list[tuple[float, int] | None] = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i].ids))
        for s in range(0, len(order), self.batch_rows):
            idx = order[s:s + self.batch_rows]
            chunk_rows = [rows[i] for i in idx]
            batch = rows_to_batch(chunk_rows, self.batch_rows, bucket_length(max(len(r.ids) for r in chunk_rows)))
            arrays = parallel.shard_batch(batch, self.mesh) if self.mesh is not None else batch
            total, count = jax.device_get(self._step(self._state, arrays))
            for j, i in enumerate(idx):
                out[i] = (float(total[j]), int(count[j]))
        return out  # type: ignore[return-value]


def read_jsonl(path: str | pathlib.Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line; malformed JSON is a ScoreInputError."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ScoreInputError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise ScoreInputError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def _int_list(value, where: str, field: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise ScoreInputError(f"{where}: field {field!r} must be a list of integer token ids")
    return value


def rows_for_line(obj: dict, where: str, example: int, encoder, vocab_size: int, max_len: int) -> list[ScoreRow]:
    """Turn one input line into scoring rows (pre-tokenised or text)."""
    if "prompt_ids" in obj or "candidate_ids" in obj:
        for field in ("prompt_ids", "candidate_ids"):
            if field not in obj:
                raise ScoreInputError(f"{where}: pre-tokenised line is missing field {field!r}")
        prompt = _int_list(obj["prompt_ids"], where, "prompt_ids")
        if not prompt:
            raise ScoreInputError(f"{where}: 'prompt_ids' is empty; the first candidate token needs a context")
        if not isinstance(obj["candidate_ids"], list) or not obj["candidate_ids"]:
            raise ScoreInputError(f"{where}: 'candidate_ids' must be a non-empty list of token-id lists")
        seqs = []
        for k, cand in enumerate(obj["candidate_ids"]):
            cand = _int_list(cand, where, f"candidate_ids[{k}]")
            seqs.append((prompt + cand, len(prompt)))
    else:
        for field in ("instruction", "candidates"):
            if field not in obj:
                raise ScoreInputError(f"{where}: missing field {field!r} (or give prompt_ids/candidate_ids)")
        if not isinstance(obj["candidates"], list) or not obj["candidates"] or \
                not all(isinstance(c, str) for c in obj["candidates"]):
            raise ScoreInputError(f"{where}: 'candidates' must be a non-empty list of strings")
        if encoder is None:
            raise ScoreInputError(f"{where}: text candidates need a tokenizer (none found with the model; "
                                  f"pass --tokenizer)")
        seqs = [encoder(obj["instruction"], obj.get("input") or "", c) for c in obj["candidates"]]
    rows = []
    for k, (ids, start) in enumerate(seqs):
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ScoreInputError(f"{where}: candidate {k}: token id {bad[0]} is outside the vocabulary (size {vocab_size})")
        if len(ids) > max_len:
            raise ScoreInputError(f"{where}: candidate {k} is {len(ids)} tokens with its prompt, over --max-len "
                                  f"{max_len}; shorten it or raise --max-len (the model allows "
                                  f"{max_len} positions here)")
        rows.append(ScoreRow(example, k, ids, start))
    return rows


def make_candidate_encoder(tokenizer_path, policy=None):
    """(instruction, input, response) -> (ids, response_start) under the Alpaca template and
    the shared BOS/EOS policy. Raises FileNotFoundError when there is no tokenizer there."""
    from tuna_jax.data.templates import SpecialTokenPolicy, encode_prompt_response, format_prompt, load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    policy = policy or SpecialTokenPolicy()

    def encode(instruction: str, input_text: str, response: str):
        return encode_prompt_response(tok, format_prompt(instruction, input_text), response, policy)

    return encode


def score_file(model, data: str, out: str, encoder=None, mesh=None, batch_rows: int = 8, max_len: int | None = None,
               examples_per_flush: int = 64, progress: bool = True) -> int:
    """Score every line of ``data`` and write ``out``; returns the number of lines written."""
    from tqdm import tqdm

    cfg = model.cfg
    max_len = max_len or cfg.max_position_embeddings
    scorer = Scorer(model, mesh, batch_rows)
    lines = list(read_jsonl(data))
    written = 0
    tmp = pathlib.Path(str(out) + ".partial")
    with open(tmp, "w", encoding="utf-8") as f, tqdm(total=len(lines), desc="score", unit="ex",
                                                      disable=not progress, file=sys.stderr) as bar:
        for s in range(0, len(lines), examples_per_flush):
            group = lines[s:s + examples_per_flush]
            rows: list[ScoreRow] = []
            for e, (lineno, obj) in enumerate(group):
                rows += rows_for_line(obj, f"{data}:{lineno}", e, encoder, cfg.vocab_size, max_len)
            results = scorer.score_rows(rows)
            per_example: list[list[tuple[float, int]]] = [[] for _ in group]
            for row, res in zip(rows, results):
                per_example[row.example].append(res)
            for e, (lineno, obj) in enumerate(group):
                rec = {"index": s + e}
                if "id" in obj:
                    rec["id"] = obj["id"]
                rec["candidates"] = [{"logprob_sum": lp, "num_tokens": n} for lp, n in per_example[e]]
                rec["logprob_sum"] = [lp for lp, _ in per_example[e]]
                rec["num_tokens"] = [n for _, n in per_example[e]]
                f.write(json.dumps(rec) + "\n")
                written += 1
            bar.update(len(group))
    tmp.replace(out)
    return written

"""Store a frozen reference model's candidate scores with the ranking data.

Objectives that compare the policy with a reference model (``losses.ranking_loss`` with ``v_ref``:
DPO, LiPO, InfoNCA) need log p_ref of every candidate. They are computed once, on the starting
model, before training, and stored on each ranking record, so no second model is in memory
while training::

    tuna-jax score START_MODEL ranked.jsonl ref_scores.jsonl
    tuna-jax reference-scores ranked.jsonl ref_scores.jsonl ranked_ref.jsonl

``attach_reference_scores`` joins the two files line by line: the i-th ``tuna-jax score`` line
(``{"index", "id"?, "logprob_sum": [...], "num_tokens": [...]}``) belongs to the i-th ranking
record, and must say so (``index`` = i, the same ``id``, one value per candidate). The output is
the ranking file with ``ref_logprob_sum`` / ``ref_num_tokens`` added to every row (see
``records.py``, native format); every other field of a row is kept as it was.
"""
from __future__ import annotations

import dataclasses
import json

from tuna_jax.data.records import (
    DataError,
    SkipReport,
    candidate_logprobs,
    detect_ranking_format,
    iter_rows,
    parse_native,
)
from tuna_jax.io import paths


@dataclasses.dataclass
class AttachReport:
    """What ``attach_reference_scores`` wrote: ``records`` rows, of which ``replaced`` already had
    reference scores (now overwritten)."""

    records: int
    replaced: int

    def summary(self, out: str) -> str:
        text = f"wrote {self.records} ranking records with reference scores -> {out}"
        if self.replaced:
            text += f" ({self.replaced} had reference scores already: replaced)"
        return text


def _rows(path: str) -> list[tuple[str, dict]]:
    """Every row of a JSON/JSONL file as (file:line, row); a malformed line raises."""
    rows = []
    for where, row in iter_rows(path):
        if isinstance(row, DataError):
            raise row
        if not isinstance(row, dict):
            raise DataError(where, None, f"expected a JSON object, got {type(row).__name__}", reason="wrong_type")
        rows.append((where, row))
    return rows


def _check_ranked(where: str, row: dict):
    """A native ranking row scored the way ``tuna-jax score`` scores it; returns its record."""
    if detect_ranking_format(row) != "native":
        raise DataError(where, "candidates", "reference scores attach to native ranking rows ({instruction, "
                        "input?, candidates, scores | ranks}), the rows `tuna-jax score` reads", reason="format")
    rec = parse_native(row, where, SkipReport())
    if rec.prompt is not None:
        raise DataError(where, "prompt", "`tuna-jax score` scores text candidates under the Alpaca template of "
                        "instruction/input and does not read 'prompt', so its scores would be for another prompt "
                        "than the one this record trains on", reason="prompt_mismatch")
    return rec


def _check_scores(where: str, line: dict, index: int, ranked_where: str, ranked_row: dict, n: int):
    """The (logprob_sum, num_tokens) of a score line that belongs to ``ranked_row``."""
    if line.get("index") != index:
        raise DataError(where, "index", f"{line.get('index')!r}, expected {index}: the scores must be "
                        f"`tuna-jax score` output for the ranking file, one line per record in its order",
                        reason="misaligned")
    if line.get("id") != ranked_row.get("id"):
        raise DataError(where, "id", f"{line.get('id')!r} but the ranking record at {ranked_where} has id "
                        f"{ranked_row.get('id')!r}: were the scores made from another file?", reason="misaligned")
    return candidate_logprobs(line, where, n, "logprob_sum", "num_tokens", required=True)


def attach_reference_scores(ranked: str, scores: str, out: str) -> AttachReport:
    """Write ``out``: the rows of ``ranked`` (native ranking JSON/JSONL) with the reference scores
    of ``scores`` (``tuna-jax score`` output for ``ranked``) as ``ref_logprob_sum`` /
    ``ref_num_tokens``. Raises DataError (naming file:line and field) when the files do not line
    up or a value is bad; ``out`` is then not written. ``out`` may be ``ranked`` itself."""
    ranked_rows, score_rows = _rows(ranked), _rows(scores)
    if len(ranked_rows) != len(score_rows):
        raise DataError(scores, None, f"{len(score_rows)} score lines for the {len(ranked_rows)} ranking records of "
                        f"{ranked}: score the whole ranking file with `tuna-jax score`", reason="misaligned")
    rows, replaced = [], 0
    for i, ((where, row), (swhere, line)) in enumerate(zip(ranked_rows, score_rows)):
        rec = _check_ranked(where, row)
        sums, tokens = _check_scores(swhere, line, i, where, row, len(rec.candidates))
        replaced += rec.ref_logprob_sum is not None
        rows.append({**row, "ref_logprob_sum": sums, "ref_num_tokens": tokens})
    paths.write_atomic(out, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))  # local or gs://
    return AttachReport(len(rows), replaced)

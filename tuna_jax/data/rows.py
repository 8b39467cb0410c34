"""Readers of the feedback commands' inputs, with the checks training applies to the same fields.

* instruction rows ``{id?, instruction, input?, output?}`` -- the input of ``tuna-jax teacher`` and
  ``tuna-jax sample-diverse``;
* candidate rows ``{id?, instruction, input?, output?, candidates: [str], logprobs?, num_tokens?,
  finish_reasons?}`` -- the input of ``tuna-jax judge`` and ``tuna-jax prm rerank``. An empty candidate
  is allowed here (``sample-diverse`` keeps and counts the empty responses a model gives): the judge
  and the PRM drop it from their record with a count, as training would refuse it.

Sources: JSON lists, JSON Lines, ``hf:NAME`` (``records.iter_rows``). Text fields are strings,
candidates a non-empty list of strings, candidate-aligned fields have one finite value per
candidate, ``id`` is a string or an integer (the row number when absent). The first bad row is an
InputError naming ``FILE:LINE`` and the field: these commands pay per row, so a bad file stops before
the first request rather than after a skipped row nobody reads about.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator

from tuna_jax.data.records import _get, _num_list, iter_rows
from tuna_jax.io.errors import InputError


def iter_objects(path: str, limit: int | None = None) -> Iterator[tuple[int, str, dict]]:
    """(row number from 0, "FILE:LINE", row) for the first ``limit`` rows; an unreadable row or one that
    is not a JSON object is an InputError."""
    for n, (where, row) in enumerate(iter_rows(path)):
        if limit is not None and n >= limit:
            break
        if isinstance(row, InputError):
            raise row
        if not isinstance(row, dict):
            raise InputError(where, None, f"expected a JSON object, got {type(row).__name__}", reason="wrong_type")
        yield n, where, row


def _row_id(row: dict, where: str, default: int) -> Any:
    """The row's id as given (str or int, so outputs echo it unchanged), else the row number."""
    v = row.get("id")
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise InputError(where, "id", f"expected str or int, got {type(v).__name__}", reason="wrong_type")
    return v


def _text_fields(row: dict, where: str) -> tuple[str, str, str]:
    ins = row.get("instruction")
    if not isinstance(ins, str) or not ins.strip():
        raise InputError(where, "instruction", "missing or empty" if not ins else
                         f"expected str, got {type(ins).__name__}", reason="missing_field")
    return ins, _get(row, "input", where, str, default=""), _get(row, "output", where, str, default="")


@dataclasses.dataclass
class InstructionRow:
    """One Alpaca row: id (as given, or the row number), instruction, input ("" if none), output (the
    original response, "" if none), where ("FILE:LINE")."""

    id: Any
    instruction: str
    input: str
    output: str
    where: str


def read_instructions(path: str, limit: int | None = None) -> list[InstructionRow]:
    """Alpaca-format rows {instruction, input?, output?, id?} from JSON/JSONL/hf:."""
    items = []
    for n, where, row in iter_objects(path, limit):
        ins, inp, out = _text_fields(row, where)
        items.append(InstructionRow(_row_id(row, where, n), ins, inp, out, where))
    return items


# Candidate-aligned fields a judge carries through to its output: name -> element type.
ALIGNED_FIELDS = {"logprobs": float, "num_tokens": int, "finish_reasons": str}


@dataclasses.dataclass
class CandidateRow:
    """One row to rank: the instruction row's fields, candidates [K str], aligned {field: [K values]} (the
    ALIGNED_FIELDS the row has), reference (the ``reference_field`` text, or None), where."""

    id: Any
    instruction: str
    input: str
    output: str
    candidates: list
    aligned: dict
    reference: str | None
    where: str


def read_candidates(path: str, reference_field: str = "output", limit: int | None = None) -> list[CandidateRow]:
    """Rows {id?, instruction, input?, output?, candidates: [str], logprobs?, num_tokens?, finish_reasons?}."""
    items = []
    for n, where, row in iter_objects(path, limit):
        ins, inp, out = _text_fields(row, where)
        cands = _get(row, "candidates", where, list)
        if not cands:
            raise InputError(where, "candidates", "empty list", reason="empty_candidates")
        for k, c in enumerate(cands):
            if not isinstance(c, str):
                raise InputError(where, f"candidates[{k}]", f"expected str, got {type(c).__name__}",
                                 reason="wrong_type")
        aligned = {}
        for field, typ in ALIGNED_FIELDS.items():
            if row.get(field) is None:
                continue
            if typ is str:  # finish reasons: a string or null per candidate
                vals = row[field]
                if not isinstance(vals, list) or len(vals) != len(cands):
                    raise InputError(where, field, f"expected a list of {len(cands)} values, one per candidate",
                                     reason="length_mismatch")
                for k, v in enumerate(vals):
                    if v is not None and not isinstance(v, str):
                        raise InputError(where, f"{field}[{k}]", f"expected str, got {type(v).__name__}",
                                         reason="wrong_type")
                aligned[field] = list(vals)
            else:
                aligned[field] = _num_list(row, field, where, len(cands), typ)
        ref = row.get(reference_field)
        if ref is not None and not isinstance(ref, str):
            raise InputError(where, reference_field, f"expected str, got {type(ref).__name__}", reason="wrong_type")
        items.append(CandidateRow(_row_id(row, where, n), ins, inp, out, cands, aligned, ref, where))
    return items

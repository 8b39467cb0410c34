"""Small pieces shared by the benchmark scorers (Super-NI, LMentry, ...).

Predictions made elsewhere (vLLM, another framework, our own sampler) arrive as JSON Lines, one
object per line with at least ``{"id": ..., "prediction": ...}``. Reading them is strict: a line
that is not a JSON object, lacks a field, has a non-string prediction, or repeats an id is an error
naming the file and line, because a silently dropped or overwritten prediction changes a score
without anyone noticing.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Iterable

from tuna_jax.io.errors import InputError
from tuna_jax.io.jsonl import iter_jsonl, write_json

__all__ = ["InputError", "PredictionRecord", "read_predictions_jsonl", "check_unique", "emit_json", "warn"]


@dataclasses.dataclass(frozen=True)
class PredictionRecord:
    """One line of a predictions file: the id, the text, where it came from and any other fields."""

    id: str
    prediction: str
    path: str
    line: int
    extra: dict[str, Any]


def read_predictions_jsonl(path: str | os.PathLike, *, id_field: str = "id") -> list[PredictionRecord]:
    """Reads ``{"id", "prediction", ...}`` lines; blank lines are allowed, everything else is checked.

    Ids may be JSON strings or integers (integers are turned into their decimal string, since the
    benchmarks' own ids are strings); a prediction must be a string (``null`` is an error, not an
    empty answer: an empty answer is ``""``).
    """
    path = os.fspath(path)
    records: list[PredictionRecord] = []
    for lineno, where, obj in iter_jsonl(path, what="predictions file",
                                                expected="a JSON object with 'id' and 'prediction'"):
        if id_field not in obj:
            raise InputError(f"{where}: missing field '{id_field}'")
        if "prediction" not in obj:
            raise InputError(f"{where}: missing field 'prediction'")
        id_ = obj[id_field]
        if isinstance(id_, bool) or not isinstance(id_, (str, int)):
            raise InputError(f"{where}: field '{id_field}' must be a string or an integer, "
                             f"got {type(id_).__name__}")
        id_ = str(id_)
        pred = obj["prediction"]
        if not isinstance(pred, str):
            raise InputError(f"{where}: field 'prediction' must be a string, got "
                             f"{type(pred).__name__} (write \"\" for an empty answer)")
        extra = {k: v for k, v in obj.items() if k not in (id_field, "prediction")}
        records.append(PredictionRecord(id_, pred, path, lineno, extra))
    return records


def check_unique(records: Iterable[PredictionRecord], key=lambda r: r.id) -> dict[Any, PredictionRecord]:
    """Indexes records by ``key``; a repeated key is an error naming both lines."""
    out: dict[Any, PredictionRecord] = {}
    for r in records:
        k = key(r)
        if k in out:
            prev = out[k]
            raise InputError(f"{r.path}:{r.line}: duplicate prediction for id {k!r} "
                             f"(first given at line {prev.line}); keep one prediction per id")
        out[k] = r
    return out


def emit_json(result: dict, out_path: str | os.PathLike | None) -> None:
    """Prints ``result`` as JSON on stdout and, if asked, writes it to ``out_path`` too."""
    if out_path:
        write_json(out_path, result)
    print(json.dumps(result, indent=2, ensure_ascii=False, allow_nan=False))


def warn(message: str) -> None:
    """A loud, unmissable warning on stderr (scores with missing data must not look complete)."""
    print(f"WARNING: {message}", file=sys.stderr)

"""Which rows of a data file a stage reads: ``all``, ``first:N``, ``last:N`` or ``range:A:B``.

The paper's data flow is positional: GPT-4 ranks the FIRST 13K of Alpaca's 52K instructions,
Tuna_cp-13K trains on the first 13K probabilistic rankings and Tuna_cp-39K on the LAST 39K, so the two
never share an instruction. A seeded random subset would overlap (a random 39K holds ~75% of any 13K).

* ``first:N``: rows 0..N-1; ``last:N``: the last N rows; ``range:A:B``: rows A..B-1, counted from 0 and
  end-exclusive like a Python slice (``range:13000:52000`` is the last 39K of 52K); ``all``: every row.
* Rows are counted in file order as the readers see them (``records.iter_rows``): blank JSONL lines are
  not rows, a malformed line is one.
* A selection asking for rows the file does not have is an error, never a shorter result: ``last:39000``
  of a 38,000-row file is a different experiment, and with ``first:13000`` it would overlap.
* A positional selection of a file that lost rows is an error too: a stage run with ``allow_failures``
  writes its failed items to ``FILE.failed.jsonl``, and its rows no longer stand where its input's did
  (``last:39000`` of 51,990 rows would reach into the first 13K).

Training configs name a selection with the file, ``data.train: [{path: ranked.jsonl, select: last:39000}]``
(``split_source``); pipeline stages record it in their manifest.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

from tuna_jax.io import paths
from tuna_jax.io.errors import InputError

_SPEC = re.compile(r"(all)|(first|last):(\d+)|range:(\d+):(\d+)")
FORMS = "all, first:N, last:N or range:A:B (rows A..B-1, counted from 0)"


@dataclasses.dataclass(frozen=True)
class Selection:
    """A parsed selection: ``kind`` all | first | last | range, ``a`` / ``b`` its numbers."""

    kind: str = "all"
    a: int = 0
    b: int = 0

    @classmethod
    def parse(cls, spec: Any, where: str | None = None, field: str = "select") -> "Selection":
        m = _SPEC.fullmatch(spec.strip()) if isinstance(spec, str) else None
        if m is None:
            raise InputError(where, field, f"{spec!r} is not a selection: write {FORMS}", reason="select")
        if m.group(1):
            return cls()
        if m.group(2):
            n = int(m.group(3))
            if n < 1:
                raise InputError(where, field, f"{spec!r}: N must be at least 1", reason="select")
            return cls(m.group(2), n)
        a, b = int(m.group(4)), int(m.group(5))
        if a >= b:
            raise InputError(where, field, f"{spec!r}: A must be below B (rows A..B-1)", reason="select")
        return cls("range", a, b)

    def __str__(self) -> str:
        return {"all": "all", "first": f"first:{self.a}", "last": f"last:{self.a}",
                "range": f"range:{self.a}:{self.b}"}[self.kind]

    def bounds(self, total: int, where: str | None = None) -> tuple[int, int]:
        """``(start, stop)`` of the selected rows of a file of ``total`` rows."""
        need = {"all": 0, "first": self.a, "last": self.a, "range": self.b}[self.kind]
        if total < need:
            raise InputError(where, None, f"select {self} needs {need} rows but there are {total}", reason="select")
        if self.kind == "all":
            return 0, total
        if self.kind == "first":
            return 0, self.a
        if self.kind == "last":
            return total - self.a, total
        return self.a, self.b

    def apply(self, rows: Sequence, where: str | None = None) -> list:
        """The selected ``rows`` of the file ``where`` (its path, for the errors and the failed-items check)."""
        if self.kind != "all" and where and paths.is_file(where + ".failed.jsonl"):
            raise InputError(where, None, f"select {self}: the stage that wrote this file left items out (listed "
                             f"in {where}.failed.jsonl), so its rows no longer line up with its input's and a "
                             f"positional selection would take other instructions; rerun that stage to finish "
                             f"them", reason="select")
        start, stop = self.bounds(len(rows), where)
        return list(rows[start:stop])


def split_source(source: Any, where: str = "data.train") -> tuple[str, Selection | None]:
    """A data source as ``(path, selection)``: a path string (no selection), or a mapping
    ``{path, select?}`` as ``data.train`` lists may hold."""
    if isinstance(source, Mapping):
        unknown = sorted(set(source) - {"path", "select"})
        if unknown or not isinstance(source.get("path"), str):
            raise InputError(where, None, f"a data source is a path or {{path: FILE, select: SPEC}}; got keys "
                             f"{sorted(source)}", reason="select")
        return source["path"], Selection.parse(source.get("select", "all"), f"{where} ({source['path']})")
    return source, None

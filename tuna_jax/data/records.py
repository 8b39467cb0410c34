"""Record schemas, readers, importers of the Tuna reference code's files, and validation.

Records are plain text (no tokens). ``read_records(path, kind)`` returns ``(records, SkipReport)``, from
``*.json``, ``*.jsonl``, ``hf:NAME[:SPLIT]`` and local ``*.parquet|*.csv|*.arrow`` (Hugging Face
``datasets``, optional) or ``tfds:NAME[:SPLIT]`` (the ``tfds`` extra). Ranking rows come in four
formats, told apart by the first row's keys (``format="auto"``, :func:`detect_ranking_format`): native
(candidates with ``scores``, or ``ranks`` stored as ``score = -rank``; optional reference-model scores),
and three of the reference code (microsoft/LMOps tuna): its training files, its released raw teacher
file (scored ``s = logprob / length ** beta``, beta = 1.3) and its judge's output (``gpt-eval.py``). A
templated instruction byte-identical to the Alpaca template is split back into (instruction, input);
otherwise it is kept verbatim in ``prompt``.

Errors: ``DataError`` naming ``file:line`` and the field; with ``on_error="skip"`` the row is counted in
the ``SkipReport`` instead (nothing is dropped without a count).

The sources and the four formats, field by field: docs/data.md#records.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

from tuna_jax.data.select import split_source
from tuna_jax.data.templates import format_prompt, parse_prompt
from tuna_jax.io import paths
from tuna_jax.io.errors import InputError
from tuna_jax.io.jsonl import dumps, read_text

# Bad input data: ``where`` is ``file:line`` (or ``file[row]``), ``field`` the offending key. The
# project's one input-error type under the name this module has always used.
DataError = InputError


@dataclasses.dataclass
class SkipReport:
    """Counts of rows/examples dropped (``skipped``) or kept but changed (``changed``), by reason,
    with the first ``max_examples`` messages per reason. The caller prints ``summary()``."""

    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    changed: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: dict = dataclasses.field(default_factory=dict)
    max_examples: int = 3

    def skip(self, reason: str, message: str) -> None:
        self.skipped[reason] += 1
        self._example(reason, message)

    def note(self, reason: str, message: str, count: int = 1) -> None:
        self.changed[reason] += count
        self._example(reason, message)

    def _example(self, reason: str, message: str) -> None:
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples:
            ex.append(message)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def merge(self, other: "SkipReport") -> "SkipReport":
        self.skipped.update(other.skipped)
        self.changed.update(other.changed)
        for r, ex in other.examples.items():
            for m in ex:
                self._example(r, m)
        return self

    def summary(self) -> str:
        if not self.skipped and not self.changed:
            return "data: nothing skipped or changed"
        lines = []
        for title, counts in (("skipped", self.skipped), ("changed", self.changed)):
            for reason, n in sorted(counts.items()):
                lines.append(f"data {title}: {n} x {reason}")
                lines.extend(f"    e.g. {m}" for m in self.examples.get(reason, []))
        return "\n".join(lines)

    __str__ = summary


@dataclasses.dataclass
class SFTRecord:
    """One Alpaca example. ``prompt`` (optional): the exact model prompt, overriding the template.
    ``source``: ``file:line`` it came from (for messages)."""

    instruction: str
    input: str
    output: str
    id: str
    prompt: Optional[str] = None
    source: str = dataclasses.field(default="", compare=False)


@dataclasses.dataclass
class RankingRecord:
    """One prompt with N candidate responses and their scores (higher is better, ties allowed).

    ``output``: the original response ("" when the source has none). ``prompt``/``source`` as in
    ``SFTRecord``.
    """

    instruction: str
    input: str
    output: str
    candidates: list
    scores: list
    id: str
    prompt: Optional[str] = None
    source: str = dataclasses.field(default="", compare=False)
    ref_logprob_sum: Optional[list] = None  # reference model's log p(candidate) per candidate, nats
    ref_num_tokens: Optional[list] = None  # the token counts those sums are over (> 0)


Record = Union[SFTRecord, RankingRecord]


def normalise_response(text: str) -> str:
    """The text two responses are compared by for duplicates: lower case, whitespace collapsed."""
    return " ".join(text.lower().split())


def duplicate_groups(candidates: Sequence[str]) -> list[list[int]]:
    """The indices of each response that occurs more than once (``normalise_response``), in order."""
    groups: dict[str, list[int]] = {}
    for k, c in enumerate(candidates):
        groups.setdefault(normalise_response(c), []).append(k)
    return [g for g in groups.values() if len(g) > 1]


def identical_pairs(candidates: Sequence[str]) -> int:
    """How many pairs of candidates are the same response (``normalise_response``)."""
    return sum(len(g) * (len(g) - 1) // 2 for g in duplicate_groups(candidates))


def tie_identical(rec: RankingRecord, report: SkipReport) -> RankingRecord:
    """Identical responses are one answer: tied, whatever scores they came with.

    A teacher's log-probs of the same text differ from call to call and a judge may rank copies apart;
    asking the model to separate two identical sequences by a margin can never succeed. Each group of
    copies gets the mean of its scores (so no pair forms between them, and a copy is never both above
    and below a third candidate); counted in ``report`` as ``identical_candidates`` (pairs), and
    ``all_candidates_identical`` for a row that is left with only its MLE term.
    """
    dups = duplicate_groups(rec.candidates)
    if not dups:
        return rec
    scores = list(rec.scores)
    for g in dups:
        mean = math.fsum(float(rec.scores[k]) for k in g) / len(g)
        for k in g:
            scores[k] = mean
    shown = ", ".join("/".join(str(k) for k in g) for g in dups)
    report.note("identical_candidates", f"{rec.source}: candidates {shown} are the same text; ranked as ties",
                count=identical_pairs(rec.candidates))
    if len(dups) == 1 and len(dups[0]) == len(rec.candidates):
        report.note("all_candidates_identical", f"{rec.source}: every candidate is the same text; only the MLE "
                    "term trains on this row")
    return dataclasses.replace(rec, scores=scores)


def record_prompt(rec: Record) -> str:
    """The exact prompt text the model sees for this record."""
    return rec.prompt if rec.prompt is not None else format_prompt(rec.instruction, rec.input)


def rank_to_score(rank: int) -> float:
    """Rank 1 (best) -> the highest score. ``-rank`` keeps ties and needs no N."""
    return -float(rank)


# ---------------------------------------------------------------------------------------------
# Reading raw rows: (where, row) pairs.

def iter_rows(path: str) -> Iterator[tuple[str, Any]]:
    """Yields ``(where, row)``; a malformed JSONL line is yielded as ``(where, DataError)`` so the
    caller can count it and go on."""
    spath = os.fspath(path)
    if spath.startswith("hf:"):
        yield from _iter_hf(spath)
        return
    if spath.startswith("tfds:"):
        yield from _iter_tfds(spath)
        return
    if not paths.is_file(spath):  # a local file or gs://...
        raise FileNotFoundError(f"{spath}: no such file")
    ext = os.path.splitext(spath)[1].lower()
    if ext in (".parquet", ".csv", ".arrow"):
        yield from _iter_hf(spath)
        return
    text = read_text(spath)
    first = text.lstrip()[:1]
    if ext == ".json" and first == "[":
        yield from _iter_json_list(spath, text)
    elif ext in (".json", ".jsonl") or first == "{":
        yield from _iter_jsonl(spath, text)
    else:
        raise DataError(spath, None, f"unknown format (extension {ext!r}); expected .json, .jsonl, "
                        ".parquet, .csv, .arrow, hf:NAME or tfds:NAME", reason="format")


def _iter_jsonl(path: str, text: str) -> Iterator[tuple[str, Any]]:
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # blank lines are not records
        where = f"{path}:{i}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as e:
            yield where, DataError(where, None, f"malformed JSON: {e.msg} (column {e.colno})",
                                   reason="malformed_json")


def _iter_json_list(path: str, text: str) -> Iterator[tuple[str, Any]]:
    """Elements of a JSON list with the line each starts on. A malformed list cannot be resumed
    past the error, so it always raises (with the line)."""
    dec = json.JSONDecoder()
    pos, line, counted = text.index("[") + 1, 1, 0

    def lineno(p: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, p)
        counted = p
        return line

    def skip_ws(p: int) -> int:
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    pos = skip_ws(pos)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        pos = skip_ws(pos)
        try:
            obj, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}", None, f"malformed JSON: {e.msg} (column {e.colno})",
                            reason="malformed_json") from None
        yield f"{path}:{lineno(pos)}", obj
        pos = skip_ws(end)
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos < len(text) and text[pos] == "]":
            if text[pos + 1:].strip():
                raise DataError(f"{path}:{lineno(pos)}", None, "malformed JSON: text after the list",
                                reason="malformed_json")
            return
        else:
            raise DataError(f"{path}:{lineno(min(pos, len(text)))}", None,
                            "malformed JSON: expected ',' or ']'", reason="malformed_json")


def _split_source(spec: str, prefix: str) -> tuple[str, str]:
    body = spec[len(prefix):]
    name, _, split = body.partition(":")
    return name, split or "train"


def _iter_hf(spec: str) -> Iterator[tuple[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{spec}: reading this source needs Hugging Face `datasets`: "
                          "pip install 'tuna-jax[datasets]' (or pip install datasets)") from None
    if spec.startswith("hf:"):
        name, split = _split_source(spec, "hf:")
        ds = datasets.load_dataset(name, split=split)
    else:
        ext = os.path.splitext(spec)[1].lower().lstrip(".")
        ds = datasets.load_dataset(ext, data_files=spec, split="train")
    for i, row in enumerate(ds):
        yield f"{spec}[{i}]", _to_py(row)


def _iter_tfds(spec: str) -> Iterator[tuple[str, Any]]:
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ImportError(f"{spec}: reading a tfds: source needs TensorFlow Datasets: "
                          "pip install 'tuna-jax[tfds]'") from None
    name, split = _split_source(spec, "tfds:")
    for i, row in enumerate(tfds.as_numpy(tfds.load(name, split=split))):
        yield f"{spec}[{i}]", _to_py(row)


def _to_py(x: Any) -> Any:
    """numpy / bytes values from datasets and tfds -> plain JSON-like Python values."""
    if isinstance(x, bytes):
        return x.decode("utf-8")
    if isinstance(x, dict):
        return {(k.decode() if isinstance(k, bytes) else k): _to_py(v) for k, v in x.items()}
    if hasattr(x, "tolist"):  # numpy arrays and scalars
        return _to_py(x.tolist())
    if isinstance(x, (list, tuple)):
        return [_to_py(v) for v in x]
    return x


# ---------------------------------------------------------------------------------------------
# Field checks. Each raises DataError naming the field.

def _get(row, key, where: str, typ, *, default=dataclasses.MISSING, nonempty=False,
         name: Optional[str] = None):
    """``row[key]`` checked against ``typ``; ``name`` is the field as messages spell it."""
    name = name or key
    missing = key not in row if isinstance(row, dict) else key >= len(row)
    if missing or (row[key] is None and default is not dataclasses.MISSING):
        if default is dataclasses.MISSING:
            raise DataError(where, name, "missing field", reason="missing_field")
        return default
    v = row[key]
    if typ is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise DataError(where, name, f"expected a finite number, got {v!r}", reason="wrong_type")
        return float(v)
    if typ is int and isinstance(v, float) and v.is_integer():
        return int(v)  # 57.0 from a writer that stores every number as a float
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise DataError(where, name, f"expected {getattr(typ, '__name__', typ)}, got {type(v).__name__}",
                        reason="wrong_type")
    if nonempty and isinstance(v, str) and not v.strip():
        raise DataError(where, name, "empty response", reason="empty_response")
    return v


def _str_list(row: dict, key: str, where: str, *, strip: bool = False) -> list[str]:
    v = _get(row, key, where, list)
    if not v:
        raise DataError(where, key, "empty list", reason="empty_candidates")
    out = []
    for k, s in enumerate(v):
        if not isinstance(s, str):
            raise DataError(where, f"{key}[{k}]", f"expected str, got {type(s).__name__}", reason="wrong_type")
        if strip:
            s = s.strip()
        if not s.strip():
            raise DataError(where, f"{key}[{k}]", "empty response", reason="empty_response")
        out.append(s)
    return out


def _num_list(row: dict, key: str, where: str, n: int, typ=float) -> list:
    v = _get(row, key, where, list)
    if len(v) != n:
        raise DataError(where, key, f"has {len(v)} values for {n} candidates", reason="length_mismatch")
    out = []
    for k in range(n):
        out.append(_get(v, k, where, typ, name=f"{key}[{k}]"))
    return out


def _row_id(row: dict, where: str, default: str) -> str:
    v = row.get("id")
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise DataError(where, "id", f"expected str or int, got {type(v).__name__}", reason="wrong_type")
    return str(v)


def _prompt_fields(templated: str) -> tuple[str, str, Optional[str]]:
    """(instruction, input, prompt) from a templated prompt: split if it is exactly Alpaca's."""
    parsed = parse_prompt(templated)
    if parsed is not None:
        return parsed[0], parsed[1], None
    return templated, "", templated


# ---------------------------------------------------------------------------------------------
# Row parsers. Each returns a record and may add notes to ``report``.

def parse_sft(row: Any, where: str, report: SkipReport) -> SFTRecord:
    row = _as_dict(row, where)
    prompt = _get(row, "prompt", where, str, default=None)
    ins = _get(row, "instruction", where, str, default="" if prompt is not None else dataclasses.MISSING)
    return SFTRecord(
        instruction=ins,
        input=_get(row, "input", where, str, default=""),
        output=_get(row, "output", where, str, nonempty=True),
        id=_row_id(row, where, where), prompt=prompt, source=where)


def parse_native(row: Any, where: str, report: SkipReport, rescore_beta: float | None = None) -> RankingRecord:
    """``rescore_beta``: score the candidates again, s = logprobs / num_tokens ** beta, from the teacher's columns
    (the beta study: one teacher run, rankings for any beta)."""
    row = _as_dict(row, where)
    cands = _str_list(row, "candidates", where)
    if rescore_beta is not None:
        lps, lens = candidate_logprobs(row, where, len(cands), "logprobs", "num_tokens", required=True)
        row = {k: v for k, v in row.items() if k not in ("scores", "ranks")}
        row["scores"] = [lp / n ** rescore_beta for lp, n in zip(lps, lens)]
    if "scores" in row and "ranks" in row:
        raise DataError(where, "scores", "give scores or ranks, not both", reason="ambiguous")
    if "ranks" in row:
        ranks = _num_list(row, "ranks", where, len(cands), typ=int)
        for k, r in enumerate(ranks):
            if r < 1:
                raise DataError(where, f"ranks[{k}]", f"rank {r} < 1 (1 is best)", reason="wrong_type")
        scores = [rank_to_score(r) for r in ranks]
    else:
        scores = _num_list(row, "scores", where, len(cands))
    prompt = _get(row, "prompt", where, str, default=None)
    ref_sum, ref_tokens = candidate_logprobs(row, where, len(cands), "ref_logprob_sum", "ref_num_tokens")
    return RankingRecord(
        instruction=_get(row, "instruction", where, str, default="" if prompt is not None else dataclasses.MISSING),
        input=_get(row, "input", where, str, default=""),
        output=_get(row, "output", where, str, default=""),
        candidates=cands, scores=scores, id=_row_id(row, where, where), prompt=prompt, source=where,
        ref_logprob_sum=ref_sum, ref_num_tokens=ref_tokens)


def candidate_logprobs(row: dict, where: str, n: int, sum_field: str, tokens_field: str, *,
                       required: bool = False) -> tuple[Optional[list], Optional[list]]:
    """Per-candidate log-likelihoods of a row: ``row[sum_field]`` (n finite numbers) and
    ``row[tokens_field]`` (n token counts > 0). Both or neither, unless ``required``;
    (None, None) when neither is there."""
    has_sum, has_tokens = row.get(sum_field) is not None, row.get(tokens_field) is not None
    if not has_sum and not has_tokens and not required:
        return None, None
    for field, other, present in ((sum_field, tokens_field, has_sum), (tokens_field, sum_field, has_tokens)):
        if not present:
            why = "" if required and not (has_sum or has_tokens) else f" ({other} is given; both are needed)"
            raise DataError(where, field, "missing field" + why, reason="missing_field")
    sums = _num_list(row, sum_field, where, n)
    tokens = _num_list(row, tokens_field, where, n, typ=int)
    for k, t in enumerate(tokens):
        if t <= 0:
            raise DataError(where, f"{tokens_field}[{k}]", f"token count {t} <= 0", reason="wrong_type")
    return sums, tokens


def parse_reference(row: Any, where: str, report: SkipReport) -> RankingRecord:
    row = _as_dict(row, where)
    ins, inp, prompt = _prompt_fields(_get(row, "instruction", where, str))
    cands = _str_list(row, "output", where)
    scores = _num_list(row, "score", where, len(cands))
    return RankingRecord(ins, inp, "", cands, scores, _row_id(row, where, where), prompt, where)


def parse_probabilistic(row: Any, where: str, report: SkipReport, *, beta: float = 1.3,
                        strip: bool = True) -> RankingRecord:
    row = _as_dict(row, where)
    orig = _get(row, "orig", where, dict)
    ins = _get(orig, "instruction", where, str, name="orig.instruction")
    inp = _get(orig, "input", where, str, default="", name="orig.input")
    out = _get(orig, "output", where, str, default="", name="orig.output")
    cands = _str_list(row, "text", where, strip=strip)
    logprob = _num_list(row, "logprob", where, len(cands))
    length = _num_list(row, "length", where, len(cands), typ=int)
    scores = []
    for k, (lp, n) in enumerate(zip(logprob, length)):
        if n <= 0:
            raise DataError(where, f"length[{k}]", f"token length {n} <= 0", reason="wrong_type")
        scores.append(lp / n ** beta)
    rid = _row_id(orig, where, "") or _row_id(row, where, where)
    return RankingRecord(ins, inp, out, cands, scores, rid, None, where)


_RESPONSE_HEADER = re.compile(r"\n\n###Response \d+:\n")


def parse_contextual(row: Any, where: str, report: SkipReport, *, include_judge_response: bool = False,
                     strip: bool = True) -> RankingRecord:
    row = _as_dict(row, where)
    if "instruct" in row and row["instruct"] is not None:
        templated = _get(row, "instruct", where, str)
    else:
        judge_prompt = _get(row, "prompt", where, str)
        m = _RESPONSE_HEADER.search(judge_prompt)
        if m is None:
            raise DataError(where, "prompt", "no '###Response k:' header to split the instruction from",
                            reason="wrong_type")
        templated = judge_prompt[: m.start()]
    ins, inp, prompt = _prompt_fields(templated)
    gen = _get(row, "generation", where, list)
    key = "ranks" if "ranks" in row else "rank"
    order = _get(row, key, where, list)
    judge = row.get("response_4")
    n_ids = len(gen) + (1 if isinstance(judge, str) and judge.strip() else 0)
    if not order:
        raise DataError(where, key, "empty ranking", reason="empty_candidates")
    seen = set()
    for k, i in enumerate(order):
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_ids:
            raise DataError(where, f"{key}[{k}]", f"{i!r} is not a response id in 0..{n_ids - 1}",
                            reason="bad_rank")
        if i in seen:
            raise DataError(where, f"{key}[{k}]", f"response {i} ranked twice", reason="bad_rank")
        seen.add(i)
    cands, scores = [], []
    for pos, i in enumerate(order):
        if i == len(gen) and not include_judge_response:
            continue
        text = gen[i] if i < len(gen) else judge
        f = f"generation[{i}]" if i < len(gen) else "response_4"
        if not isinstance(text, str):
            raise DataError(where, f, f"expected str, got {type(text).__name__}", reason="wrong_type")
        text = text.strip() if strip else text
        if not text.strip():
            raise DataError(where, f, "empty response", reason="empty_response")
        cands.append(text)
        scores.append(rank_to_score(pos + 1))
    unranked = len(gen) - len([i for i in order if i < len(gen)])
    if unranked:
        report.note("unranked_generation_dropped", f"{where}: {unranked} generation(s) not in {key}",
                    count=unranked)
    if not cands:
        raise DataError(where, key, "no ranked candidate left", reason="empty_candidates")
    return RankingRecord(ins, inp, "", cands, scores, _row_id(row, where, where), prompt, where)


def _as_dict(row: Any, where: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(where, None, f"expected a JSON object, got {type(row).__name__}", reason="wrong_type")
    return row


RANKING_FORMATS = ("native", "reference", "probabilistic", "contextual")


def detect_ranking_format(row: Any) -> Optional[str]:
    """Which ranking format a row is in, from its keys (see docs/data.md#records); None if none."""
    if isinstance(row, dict):
        if "candidates" in row:
            return "native"
        if "orig" in row or "logprob" in row:
            return "probabilistic"
        if "generation" in row:
            return "contextual"
        if "score" in row or isinstance(row.get("output"), list):
            return "reference"
    return None


# ---------------------------------------------------------------------------------------------

def read_records(path: str | dict, kind: str = "sft", on_error: str = "raise", *, format: str = "auto",
                 beta: float = 1.3, include_judge_response: bool = False, strip_responses: bool = True,
                 report: Optional[SkipReport] = None, rescore_beta: float | None = None) -> tuple[list, SkipReport]:
    """Read SFT or ranking records from ``path``.

    kind: "sft" -> SFTRecord, "ranking" -> RankingRecord. on_error: "raise" (DataError at the first
    bad row) or "skip" (count it in the report and go on). format: "auto" or one of
    ``RANKING_FORMATS`` (ranking only). beta: length-normalisation exponent of the probabilistic
    importer. rescore_beta: native records scored again from their teacher columns (``parse_native``).
    strip_responses: strip whitespace around imported teacher/model responses
    (probabilistic and contextual formats only). ``path`` may be a mapping ``{path, select}``: only the
    selected rows are read (``data/select.py``: ``first:N``, ``last:N``, ``range:A:B``). Returns
    ``(records, report)``.
    """
    if kind not in ("sft", "ranking"):
        raise ValueError(f"kind must be 'sft' or 'ranking', got {kind!r}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if format != "auto" and format not in RANKING_FORMATS:
        raise ValueError(f"format must be 'auto' or one of {RANKING_FORMATS}, got {format!r}")
    report = report if report is not None else SkipReport()
    records: list = []
    fmt = None if format == "auto" else format
    ref_n: Optional[int] = None  # candidate count of the reference format (fixed per file)
    path, selection = split_source(path)
    rows = iter_rows(path) if selection is None else selection.apply(list(iter_rows(path)), path)
    for where, row in rows:
        try:
            if isinstance(row, DataError):
                raise row
            if kind == "sft":
                rec = parse_sft(row, where, report)
            else:
                if fmt is None:
                    fmt = detect_ranking_format(row)
                    if fmt is None:
                        keys = sorted(row)[:12] if isinstance(row, dict) else type(row).__name__
                        raise DataError(where, None, f"unrecognised ranking row (keys {keys}); expected "
                                        f"one of the formats {RANKING_FORMATS}", reason="format")
                if fmt == "native":
                    rec = parse_native(row, where, report, rescore_beta)
                elif fmt == "reference":
                    rec = parse_reference(row, where, report)
                    if ref_n is None:
                        ref_n = len(rec.candidates)
                    elif len(rec.candidates) != ref_n:
                        raise DataError(where, "output", f"has {len(rec.candidates)} candidates; earlier rows "
                                        f"have {ref_n} (the reference format has a fixed N)",
                                        reason="candidate_count")
                elif fmt == "probabilistic":
                    rec = parse_probabilistic(row, where, report, beta=beta, strip=strip_responses)
                else:
                    rec = parse_contextual(row, where, report, include_judge_response=include_judge_response,
                                           strip=strip_responses)
        except DataError as e:
            if on_error == "raise":
                raise
            report.skip(e.reason, str(e))
            continue
        records.append(rec if kind == "sft" else tie_identical(rec, report))
    return records, report


def record_to_dict(rec: Record) -> dict:
    """The native JSON form of a record (what ``read_records`` reads back)."""
    d: dict = {"id": rec.id, "instruction": rec.instruction, "input": rec.input, "output": rec.output}
    if isinstance(rec, RankingRecord):
        d["candidates"] = list(rec.candidates)
        d["scores"] = [float(s) for s in rec.scores]
        if rec.ref_logprob_sum is not None:
            d["ref_logprob_sum"] = [float(x) for x in rec.ref_logprob_sum]
            d["ref_num_tokens"] = [int(x) for x in rec.ref_num_tokens]
    if rec.prompt is not None:
        d["prompt"] = rec.prompt
    return d


def write_jsonl(path: str, records: Iterable[Record], *, append: bool = True) -> int:
    """Write records as native JSONL, one per line, flushed per line; returns the count.

    Appending is safe after a crash: if the file's last line is unterminated (a partial write),
    a newline is written first so that line stays a separate (malformed, hence reported) line.
    """
    mode = "a" if append else "w"
    if append and os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            needs_nl = f.read(1) != b"\n"
    else:
        needs_nl = False
    n = 0
    with open(path, mode, encoding="utf-8") as f:
        if needs_nl:
            f.write("\n")
        for rec in records:
            f.write(dumps(record_to_dict(rec)) + "\n")
            f.flush()
            n += 1
    return n

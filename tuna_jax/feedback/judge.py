"""Contextual ranking data: a judge ranks N candidate responses per instruction.

(a) LLM judge (``--kind llm``, :class:`LLMJudge`): an OpenAI-compatible chat model is shown the Alpaca
    prompt and the N candidates as "###Response 0..N-1" with the Tuna contextual ranking prompt
    (``RANKING_PROMPT_N4``, microsoft/LMOps ``tuna/src/gpt-eval.py`` byte for byte), and replies with
    per-response scores, its own best response ("###Response N"), and ``rank: [...]``.
(b) Metric judge (``--kind metric``, :class:`MetricJudge`): ROUGE-L F or exact match of each candidate
    against a reference answer (the record's original ``output`` by default), for offline runs.

:func:`parse_rank` is strict and never guesses: the LAST ``rank:`` followed by digits decides, and its
list must be a permutation of a subset of the ids shown; a reply that does not parse is asked again, then
recorded as failed. The judge's own response is kept in the record and removed from the ranking.
``orders=K`` shows K presentation orders (K=1, the given order, reproduces the paper) and aggregates
them by Borda count (:func:`borda`). Records (:func:`run_judge`) are native ranking JSONL
(``tuna_jax.data.records``), candidates best first, with a ``judge`` field.

The prompt, the accepted rank forms, the own response, Borda and the records: docs/feedback.md#judge.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import random
import re
from typing import Any, Sequence

from tuna_jax.data.records import identical_pairs, normalise_response
from tuna_jax.data.rows import CandidateRow, read_candidates
from tuna_jax.data.templates import format_prompt
from tuna_jax.io.fields import arg
from tuna_jax.io.items import ItemOutcome, RunSummary, run_items
from tuna_jax.llm_api.ask import ask_parsed
from tuna_jax.llm_api.client import APIError, OpenAIClient
from tuna_jax.llm_api.replies import ReplyError
from tuna_jax.llm_api.store import BudgetExceeded, FatalRunError

JUDGE = "judge"


@dataclasses.dataclass(kw_only=True)
class JudgeSettings:
    """How candidates are judged (the flags of `tuna-jax judge`). ``judge`` is ``--kind`` on the command line
    (a pipeline stage's ``kind`` is the stage kind)."""

    judge: str = arg("llm", "an LLM judge over an OpenAI-compatible chat endpoint, or an offline metric",
                     flags=("--kind",), choices=("llm", "metric"), group=JUDGE)
    temperature: float = arg(0.0, "judge sampling temperature (the reference code used 1.0)", group=JUDGE)
    max_tokens: int = arg(2048, "longest judge reply in tokens", group=JUDGE)
    orders: int = arg(1, "presentation orders per record, aggregated by Borda count; 1 = the paper (no shuffling)",
                      group=JUDGE)
    seed: int = arg(0, "seed of the shuffled orders", group=JUDGE)
    max_parse_retries: int = arg(2, "new requests for a reply whose rank does not parse, before the record is "
                                 "failed", group=JUDGE)
    no_system_prompt: bool = arg(False, "send no system message (default: 'You are a professional and experienced "
                                 "data annotator.', as the reference)", group=JUDGE)
    metric: str = arg("rougeL", "metric judge: ROUGE-L F (stemmer on) or exact match", choices=("rougeL", "exact"),
                      group=JUDGE)
    reference_field: str = arg("output", "metric judge: the record field with the reference answer", group=JUDGE)


logger = logging.getLogger("tuna_jax.feedback")

# --------------------------------------------------------------------------------------------- prompt
PAPER_SYSTEM_PROMPT = "You are a professional and experienced data annotator."

# microsoft/LMOps tuna/src/gpt-eval.py, byte for byte (see docs/feedback.md#judge).
RANKING_PROMPT_N4 = (
    "\n\nWe would like you to rate Response 0/1/2/3 in reply to the given instruction displayed above.\n"
    "First, identify if the instruction requires open-ended or close-ended responses."
    "Second, you need to generate one high quality '###Response 4' in answer to the instruction. It needs to "
    "have the same format as other responses and will be used as a reference later.\n"
    "Third, identify if there are duplicate responses and keep only one of the duplicate responses for the "
    "following steps."
    "Fourth, compare Response 4 with Response 0/1/2/3/4 and assign each response an overall score on a scale "
    "of 0 to 15 where a higher score indicates better overall quality. For an open-ended instruction, please "
    "rate based on the relevance (score 0 to 5), level of details/justification: (score 0 to 5) and accuracy "
    "(score 0 to 5) of each response; for a close-ended instruction, please rate based on the accuracy (score "
    "0 to 5), level of details/justification (score 0 to 5) and clarity (score 0 to 5) of each response. The "
    "ratings should have the format: 'Response k: [sum of the 3 individual scores you give to response k]'.\n"
    "Last, rank the responses in decreasing order of their overall scores. The ranking should have the "
    "format: 'rank: [i, j ,k, l, m]'. If there are duplicate responses, keep only one of them in the rank, "
    "that is, the ranking may become: 'rank: [i, j, k, l]', 'rank: [i, j, k]' 'rank: [i, j]' or even "
    "'rank: [i]'.\n"
)


def ranking_instructions(n: int) -> str:
    """The ranking instructions for n shown responses (exactly RANKING_PROMPT_N4 when n == 4)."""
    if n < 1:
        raise ValueError("need at least one response to rank")
    shown = "/".join(str(i) for i in range(n))
    every = "/".join(str(i) for i in range(n + 1))
    return (RANKING_PROMPT_N4.replace("Response 0/1/2/3/4", "Response \x00ALL")
            .replace("Response 0/1/2/3", "Response \x00SHOWN")
            .replace("'###Response 4'", "'###Response \x00OWN'")
            .replace("compare Response 4 with", "compare Response \x00OWN with")
            .replace("\x00ALL", every).replace("\x00SHOWN", shown).replace("\x00OWN", str(n)))


def build_ranking_prompt(instruction: str, input: str, responses: Sequence[str]) -> str:  # noqa: A002
    """The user message: Alpaca prompt, "\\n\\n", the responses as "###Response j:\\n{r}\\n" joined by
    "\\n", then the ranking instructions -- the reference's layout exactly."""
    shown = [f"###Response {j}:\n{r}\n" for j, r in enumerate(responses)]
    return format_prompt(instruction, input) + "\n\n" + "\n".join(shown) + ranking_instructions(len(responses))


# --------------------------------------------------------------------------------------------- parsing
class RankParseError(ReplyError):
    """A judge reply whose ranking cannot be read without guessing."""


_RANK_LABEL = re.compile(r"\brank(?:ings?)?\b[ \t]*(?:\([^()\n]{0,60}\))?[ \t*_`]*:", re.IGNORECASE)
# One ranked item: an integer, optionally written "Response 2" / "###Response 2" / "#2", optionally quoted.
_TOKEN = re.compile(
    r"(?P<ws>\s+)"
    r"|(?P<item>(?:#{0,3}\s*response\s*)?#?(?P<num>\d+)(?!\d)(?!\.\d))"
    r"|(?P<sep>->|→|>>|>|≻|,|;)"
    r"|(?P<tie>=|≈|~)"
    r"|(?P<quote>[\"'`*_])"
    r"|(?P<other>.)", re.IGNORECASE | re.DOTALL)


def _parse_items(segment: str, bracketed: bool) -> list[int]:
    """Items of one list segment; raises RankParseError with the reason."""
    items: list[int] = []
    last = None  # "item" | "sep"
    text = segment.strip()
    if not bracketed:
        text = text.rstrip("*_` \t")
        if text.endswith("."):
            text = text[:-1]  # "rank: 2, 1, 4, 3." ends a sentence
    for m in _TOKEN.finditer(text):
        kind = m.lastgroup
        if kind in ("ws", "quote"):
            continue
        if kind == "item" or kind == "num":
            items.append(int(m.group("num")))
            last = "item"
        elif kind == "sep":
            if last != "item":
                raise RankParseError(f"separator {m.group()!r} without an id before it in {segment.strip()!r}")
            last = "sep"
        elif kind == "tie":
            raise RankParseError(f"a tie ({m.group()!r}) in {segment.strip()!r}: a rank must be a strict order")
        else:
            where = "inside the brackets" if bracketed else "after the rank list on its line"
            raise RankParseError(f"unexpected text {text[m.start():m.start() + 20]!r} {where} in "
                                 f"{segment.strip()!r}")
    if not items:
        raise RankParseError(f"no ids in {segment.strip()!r}")
    return items


def _rank_segments(reply: str) -> list[tuple[str, bool]]:
    """(segment, bracketed) after each "rank:" label."""
    out = []
    for m in _RANK_LABEL.finditer(reply):
        pos = m.end()
        eol = reply.find("\n", pos)
        eol = len(reply) if eol < 0 else eol
        same_line = reply[pos:eol]
        j = pos
        while j < len(reply) and reply[j] in " \t*_`\"'":
            j += 1
        if j >= eol:  # nothing on the line: a bracketed list may start on the next line
            k = eol
            while k < len(reply) and reply[k] in " \t\r\n":
                k += 1
            if k < len(reply) and reply[k] in "[(":
                j = k
                eol = reply.find("\n", j)
                eol = len(reply) if eol < 0 else eol
            else:
                out.append((same_line, False))
                continue
        if reply[j] in "[(":
            close = "]" if reply[j] == "[" else ")"
            end = reply.find(close, j + 1)
            if end < 0:  # unclosed: an error when it has digits (bracketed=None marks it)
                out.append((reply[j:eol], None))  # type: ignore[arg-type]
                continue
            out.append((reply[j + 1:end], True))
        else:
            out.append((reply[j:eol], False))
    return out


def parse_rank(reply: str, shown_ids: list[int]) -> list[int]:
    """The judge's ranking (ids best first) from ``reply``, or RankParseError.

    shown_ids: the ids the judge may rank (e.g. [0, 1, 2, 3, 4] for 4 shown responses plus its own). The
    result, read from the reply's last ``rank:`` list, is a permutation of a non-empty subset of shown_ids:
    fewer ids are allowed (a judge that removed duplicates), repeats, ids not in shown_ids and ties are
    errors. See docs/feedback.md#judge for the accepted forms.
    """
    if not isinstance(reply, str):
        raise RankParseError(f"reply is {type(reply).__name__}, not text")
    allowed = set()
    for i in shown_ids:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"shown_ids must be ints, got {i!r}")
        allowed.add(i)
    # "rank: [i, j, k]" echoed from the instructions, or prose after "rank:", has no digits: not a ranking.
    candidates = [(seg, br) for seg, br in _rank_segments(reply) if re.search(r"\d", seg)]
    if not candidates:
        raise RankParseError("no 'rank:' followed by a list of ids in the reply")
    segment, bracketed = candidates[-1]  # the final ranking decides; mentions in the reasoning before it do not
    if bracketed is None:
        raise RankParseError(f"unclosed bracket after 'rank:' in {segment.strip()[:60]!r}")
    ids = _parse_items(segment, bracketed)
    seen = set()
    for i in ids:
        if i not in allowed:
            raise RankParseError(f"id {i} was not shown (shown ids: {sorted(allowed)}) in {segment.strip()!r}")
        if i in seen:
            raise RankParseError(f"id {i} ranked twice in {segment.strip()!r}")
        seen.add(i)
    return ids


_SCORE_LINE = re.compile(
    r"^[ \t>*_#-]*(?:\d+\.\s+)?(?:[A-Za-z]+,[ \t]*)?[ \t*#]*Response\s*(?P<id>\d+)\s*\**\s*:\s*\**\s*(?P<val>[^\n]*)$",
    re.IGNORECASE | re.MULTILINE)
_SCORE_VALUE = re.compile(
    r"^[\[(]?\s*(?:\d+(?:\.\d+)?\s*(?:\+\s*\d+(?:\.\d+)?\s*)*=\s*)?(?P<total>\d+(?:\.\d+)?)\s*[\])]?"
    r"\s*(?:/\s*15|out of 15|points?)?\s*[.,;]?\s*\**\s*$", re.IGNORECASE)


def parse_scores(reply: str, ids: Sequence[int]) -> dict[int, float]:
    """Per-response overall scores where the reply gives them as "Response k: [13]", "Response k: 13",
    "Response k: 5 + 4 + 4 = 13" or "Response k: 13/15" (the prompt's format); ids not in ``ids`` and lines
    that are not a bare score are ignored; the last score of an id wins. Informational: the ranking comes
    from parse_rank."""
    allowed = set(ids)
    out: dict[int, float] = {}
    for m in _SCORE_LINE.finditer(reply):
        i = int(m.group("id"))
        v = _SCORE_VALUE.match(m.group("val").strip())
        if i in allowed and v is not None:
            out[i] = float(v.group("total"))
    return out


_OWN_HEADER = r"^[ \t>*_]*(?:\w+,\s*)?[ \t*_]*#{{0,6}}\s*\**\s*Response\s*{own}\s*\**\s*:[ \t*]*"
_SECTION_END = re.compile(
    r"^[ \t>*_]*(?:#{0,6}\s*\**\s*Response\s*\d+\s*\**\s*:|rank(?:ing)?\b[^\n:]{0,20}:|"
    r"(?:Third|Fourth|Fifth|Last|Lastly|Finally)\s*,|#{1,6}\s*Step\b)", re.IGNORECASE | re.MULTILINE)


def extract_own_response(reply: str, own_id: int) -> str | None:
    """The judge's own response ("###Response {own_id}:" ...) up to the next "Response k:" line, "rank:"
    line or step marker ("Third,", "Fourth,", "Last,"); all its paragraphs are kept. None if absent.

    The first "Response {own_id}:" whose text is not just a score is the response (the prompt asks for it
    before the scores)."""
    header = re.compile(_OWN_HEADER.format(own=own_id), re.IGNORECASE | re.MULTILINE)
    for m in header.finditer(reply):
        rest = reply[m.end():]
        first_line = rest.split("\n", 1)[0]
        if first_line.strip() and _SCORE_VALUE.match(first_line.strip()):
            continue  # "Response 4: [15]" is a score line
        end = _SECTION_END.search(rest, pos=len(first_line) + 1 if "\n" in rest else len(rest))
        text = rest[: end.start()] if end else rest
        text = text.strip()
        return text or None
    return None


# --------------------------------------------------------------------------------------------- orders
def presentation_orders(n: int, k: int, seed: int, item_id: Any) -> list[list[int]]:
    """K presentation orders of n candidates: order 0 is the identity, the others seeded permutations
    (a sha256 of (seed, item id, k) seeds each, so runs and processes agree), distinct while n! allows."""
    orders = [list(range(n))]
    if k <= 1:
        return orders
    total = math.factorial(n) if n <= 10 else None
    seen = {tuple(orders[0])}
    for j in range(1, k):
        h = hashlib.sha256(f"{seed}|{item_id!r}|{j}".encode()).digest()
        rng = random.Random(int.from_bytes(h[:8], "big"))
        for _ in range(100):
            perm = list(range(n))
            rng.shuffle(perm)
            if tuple(perm) not in seen or (total is not None and len(seen) >= total):
                break
        seen.add(tuple(perm))
        orders.append(perm)
    return orders


def borda(rankings: Sequence[Sequence[int]], n: int) -> list[float | None]:
    """Mean Borda points per candidate (N-1-p for position p; None if never ranked). See docs/feedback.md#judge."""
    pts: list[list[int]] = [[] for _ in range(n)]
    for r in rankings:
        for p, c in enumerate(r):
            pts[c].append(n - 1 - p)
    return [sum(p) / len(p) if p else None for p in pts]


# --------------------------------------------------------------------------------------------- judges
def _record(item: CandidateRow, scores: Sequence[float | None], judge_meta: dict) -> tuple[dict, list[int]]:
    """Candidates with a score, best first (stable on candidate index); returns (record, dropped indices)."""
    kept = [c for c in range(len(item.candidates)) if scores[c] is not None]
    kept.sort(key=lambda c: (-scores[c], c))
    dropped = [c for c in range(len(item.candidates)) if scores[c] is None]
    rec = {"id": item.id, "instruction": item.instruction, "input": item.input, "output": item.output,
           "candidates": [item.candidates[c] for c in kept], "scores": [float(scores[c]) for c in kept]}
    for f, vals in item.aligned.items():
        rec[f] = [vals[c] for c in kept]
    rec["judge"] = {**judge_meta, "candidate_index": kept, "dropped": dropped}
    return rec, dropped


def _with_identical(rec: dict, counters: dict) -> dict:
    """Count the pairs of identical candidates a record holds (training ranks them as ties)."""
    n = identical_pairs(rec["candidates"])
    return {**counters, "identical_pairs": n} if n else counters


class LLMJudge:
    """The contextual-ranking judge over an OpenAI-compatible chat endpoint (cached and budgeted)."""

    def __init__(self, client: OpenAIClient, config: JudgeSettings):
        self.client = client
        self.config = config

    def judge(self, item: CandidateRow) -> ItemOutcome:
        c = self.config
        # Empty responses (sample-diverse keeps and counts them) are not shown to the judge: they cannot win
        # and would cost tokens. They are dropped from the record, counted and listed.
        shown = [k for k, text in enumerate(item.candidates) if text.strip()]
        n = len(shown)
        counters: dict[str, int] = {}
        if n < len(item.candidates):
            counters["empty_candidates"] = len(item.candidates) - n
        if not shown:
            return ItemOutcome(failure={"id": item.id, "where": item.where, "error": "every candidate is empty",
                                        "cause": "no_ranked_candidate"},
                               counters={**counters, "no_ranked_candidate": 1})
        orders = presentation_orders(n, c.orders, c.seed, item.id)
        per_order = []
        rankings = []  # over positions in ``shown``
        msgs0 = [] if c.no_system_prompt else [{"role": "system", "content": PAPER_SYSTEM_PROMPT}]
        params = {"temperature": c.temperature, "top_p": 1.0, "max_tokens": c.max_tokens}  # top_p: in the cache key
        for perm in orders:
            prompt = build_ranking_prompt(item.instruction, item.input, [item.candidates[shown[p]] for p in perm])
            # A reply whose rank does not parse is stored as unusable and asked again as a new request.
            try:
                got = ask_parsed(self.client, msgs0 + [{"role": "user", "content": prompt}],
                                 lambda reply: parse_rank(reply, list(range(n + 1))),
                                 max_parse_retries=c.max_parse_retries, params=params)
            except (BudgetExceeded, FatalRunError):
                raise
            except APIError as e:
                counters["request_failed"] = 1
                return ItemOutcome(failure={"id": item.id, "where": item.where, "error": str(e), "cause": e.cause},
                                   counters=counters)
            for k, v in got.counters.items():
                counters[k] = counters.get(k, 0) + v
            for t in got.tries:
                if "error" in t:
                    logger.info("judge: item %r: a reply did not parse: %s", item.id, t["error"])
            if got.value is None:
                counters["parse_failed"] = 1
                return ItemOutcome(failure={"id": item.id, "where": item.where, "order": perm,
                                            "error": f"no parseable ranking in {len(got.tries)} replies",
                                            "replies": got.tries, "cause": "parse_failed"}, counters=counters)
            labels = got.value
            rankings.append([perm[l] for l in labels if l != n])
            reply = got.tries[-1]["reply"]
            own_scores = parse_scores(reply, list(range(n + 1)))
            per_order.append({  # candidate indices of the input row
                "order": [shown[p] for p in perm], "rank": labels,
                "ranking": [shown[perm[l]] for l in labels if l != n],
                "own_rank": labels.index(n) if n in labels else None,
                "response_own": extract_own_response(reply, n),
                "response_scores": {str(shown[perm[l]]): s for l, s in own_scores.items() if l != n},
                "own_score": own_scores.get(n), "reply": reply, "attempts": len(got.tries),
                "failed_replies": [t for t in got.tries if "error" in t]})
        scores: list[float | None] = [None] * len(item.candidates)
        for pos, score in enumerate(borda(rankings, n)):  # Borda points among the candidates shown
            scores[shown[pos]] = score
        meta = {"kind": "llm", "model": self.client.config.model, "prompt": "tuna-reference", "orders": len(orders),
                "temperature": c.temperature, "per_order": per_order}
        rec, dropped = _record(item, scores, meta)
        if len(dropped) > len(item.candidates) - n:
            counters["unranked_candidates"] = len(dropped) - (len(item.candidates) - n)
        if not rec["candidates"]:
            counters["no_ranked_candidate"] = 1
            return ItemOutcome(failure={"id": item.id, "where": item.where, "error": "no candidate was ranked",
                                        "cause": "no_ranked_candidate"}, counters=counters)
        return ItemOutcome(record=rec, counters=_with_identical(rec, counters))


class MetricJudge:
    """Scores candidates by ROUGE-L F (rouge_score rougeL, stemmer on) or exact match against a reference."""

    def __init__(self, config: JudgeSettings):
        if config.metric not in ("rougeL", "exact"):
            raise ValueError(f"metric must be 'rougeL' or 'exact', got {config.metric!r}")
        self.config = config
        self._scorer = None
        if config.metric == "rougeL":
            from rouge_score import rouge_scorer

            self._scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

    def score(self, reference: str, candidate: str) -> float:
        if self._scorer is None:
            return 1.0 if normalise_response(candidate) == normalise_response(reference) else 0.0
        return float(self._scorer.score(reference, candidate)["rougeL"].fmeasure)

    def judge(self, item: CandidateRow) -> ItemOutcome:
        if item.reference is None or not item.reference.strip():
            return ItemOutcome(failure={"id": item.id, "where": item.where,
                                        "error": f"no reference answer in field {self.config.reference_field!r}",
                                        "cause": "no_reference"}, counters={"no_reference": 1})
        scores = [self.score(item.reference, c) if c.strip() else None for c in item.candidates]
        meta = {"kind": "metric", "metric": self.config.metric, "reference_field": self.config.reference_field}
        rec, dropped = _record(item, scores, meta)  # empty responses are dropped, counted and listed
        if not rec["candidates"]:
            return ItemOutcome(failure={"id": item.id, "where": item.where, "error": "every candidate is empty",
                                        "cause": "no_ranked_candidate"},
                               counters={"empty_candidates": len(dropped), "no_ranked_candidate": 1})
        counters = {"empty_candidates": len(dropped)} if dropped else {}
        return ItemOutcome(record=rec, counters=_with_identical(rec, counters))


def run_judge(input_path: str, out_path: str, judge: LLMJudge | MetricJudge, *, reference_field: str = "output",
              concurrency: int = 4, limit: int | None = None, progress: bool = True,
              items: list[CandidateRow] | None = None) -> RunSummary:
    """Judge every record of ``input_path`` (or the already read ``items``); write ranking records to
    ``out_path`` (see io.items.run_items)."""
    items = read_candidates(input_path, reference_field, limit) if items is None else items
    return run_items(items, judge.judge, out_path, concurrency=concurrency, desc="judge", progress=progress)

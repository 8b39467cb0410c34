"""Pairwise LLM review: Vicuna QA (80 questions, the published GPT-4 review prompts) and an AlpacaEval-style
win rate (805 instructions, the ``alpaca_eval_gpt4`` annotator prompt), through the OpenAI-compatible client.

One idea: show a judge two answers to the same question, parse its verdict strictly, and count per question a
win, a loss or a tie for the model under test. :func:`review_vicuna` follows FastChat's ``fastchat/eval`` (the
version the Tuna paper used): ``orders="one"`` (the default) is FastChat's default order (the paper does not say
which it used), the model under test as Assistant 1, win / tie / lose by the judge's two scores; ``"both"`` is
ours: both orders are asked, and a question is a win or a loss only when they agree, else a tie (against position
bias, twice the requests). :func:`review_alpaca_eval` judges both orders of every instruction against the
reference outputs; win rate = 100 x (wins + ties / 2) / judged. Replies are parsed strictly, never guessed
(:func:`parse_score_pair`, :func:`parse_alpaca_eval_ranking`); one that does not parse is asked again, then the
question is failed, never a win, loss or tie. Results are counts and percentages of the judged questions.
Everything is cached in the store (``tuna_jax.llm_api.store``): a rerun with the same store makes no request that
already succeeded, and writes the same files.

Data, requests, the parsing rules and where they differ from FastChat and alpaca_eval:
docs/evaluation.md#vicuna.
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import logging
import math
import os
import re
from typing import Any, Callable, Mapping, Sequence

from tuna_jax.eval.common import warn
from tuna_jax.io import paths
from tuna_jax.io.errors import InputError
from tuna_jax.io.items import ItemOutcome, RunSummary, run_items
from tuna_jax.io.jsonl import dumps, iter_jsonl, read_json, read_records, read_text
from tuna_jax.llm_api.ask import ask_parsed
from tuna_jax.llm_api.client import APIError, OpenAIClient
from tuna_jax.llm_api.replies import ReplyError
from tuna_jax.llm_api.store import BudgetExceeded, FatalRunError

logger = logging.getLogger("tuna_jax.eval")

ORDERS = ("one", "both")  # Vicuna QA: FastChat's default (model as Assistant 1) | both orders, agreement or tie

__all__ = [
    "Question", "Answer", "ReviewPrompt", "Reviewer", "VicunaData", "read_questions", "read_answers",
    "read_review_prompts", "read_reviewers", "load_vicuna_data", "make_answer_id", "answer_record",
    "write_answers", "ScoreParseError", "parse_score_pair", "build_review_messages", "combine_orders", "outcome",
    "ORDERS",
    "ReviewConfig", "review_vicuna", "AlpacaEvalTemplate", "load_alpaca_eval_template",
    "parse_alpaca_eval_ranking", "read_alpaca_eval_outputs", "review_alpaca_eval",
]

MODEL_FIRST, BASELINE_FIRST = "model_first", "baseline_first"
MAX_SCORE = 10.0


# ================================================================================================ data
@dataclasses.dataclass(frozen=True)
class Question:
    question_id: int
    text: str
    category: str


@dataclasses.dataclass(frozen=True)
class Answer:
    question_id: int
    text: str
    answer_id: str | None = None
    model_id: str | None = None


@dataclasses.dataclass(frozen=True)
class ReviewPrompt:
    prompt_id: int
    system_prompt: str
    prompt_template: str
    defaults: dict
    category: str


@dataclasses.dataclass(frozen=True)
class Reviewer:
    reviewer_id: str
    prompt_id: int
    metadata: dict
    category: str


def _jsonl(path: str | os.PathLike):
    """(where, object) per non-blank line; a line that is not a JSON object is an error naming file:line."""
    return ((where, obj) for _, where, obj in iter_jsonl(path))


def _field(obj: Mapping, name: str, types, where: str):
    if name not in obj:
        raise InputError(f"{where}: missing field '{name}'")
    v = obj[name]
    if isinstance(v, bool) or not isinstance(v, types):
        want = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise InputError(f"{where}: field '{name}' must be {want}, got {type(v).__name__}")
    return v


def read_questions(path: str | os.PathLike) -> list[Question]:
    """``question.jsonl``: {question_id: int, text: str, category: str}; ids unique."""
    out, seen = [], {}
    for where, obj in _jsonl(path):
        q = Question(_field(obj, "question_id", int, where), _field(obj, "text", str, where),
                     _field(obj, "category", str, where))
        if q.question_id in seen:
            raise InputError(f"{where}: question_id {q.question_id} repeats (first at {seen[q.question_id]})")
        seen[q.question_id] = where
        out.append(q)
    if not out:
        raise InputError(f"{os.fspath(path)}: no questions")
    return out


def read_answers(path: str | os.PathLike) -> dict[int, Answer]:
    """A FastChat answer file: {question_id: int, text: str, answer_id?, model_id?}; one answer per question."""
    out: dict[int, Answer] = {}
    seen: dict[int, str] = {}
    for where, obj in _jsonl(path):
        qid = _field(obj, "question_id", int, where)
        a = Answer(qid, _field(obj, "text", str, where), obj.get("answer_id"), obj.get("model_id"))
        if qid in seen:
            raise InputError(f"{where}: a second answer for question_id {qid} (first at {seen[qid]})")
        seen[qid] = where
        out[qid] = a
    return out


def read_review_prompts(path: str | os.PathLike) -> dict[int, ReviewPrompt]:
    """``prompt.jsonl``: {prompt_id, system_prompt, prompt_template, defaults, category}."""
    out: dict[int, ReviewPrompt] = {}
    for where, obj in _jsonl(path):
        p = ReviewPrompt(_field(obj, "prompt_id", int, where), _field(obj, "system_prompt", str, where),
                         _field(obj, "prompt_template", str, where), dict(_field(obj, "defaults", dict, where)),
                         _field(obj, "category", str, where))
        for name in ("{question}", "{answer_1}", "{answer_2}"):
            if name not in p.prompt_template:
                raise InputError(f"{where}: prompt_template has no {name} placeholder")
        if p.prompt_id in out:
            raise InputError(f"{where}: prompt_id {p.prompt_id} repeats")
        out[p.prompt_id] = p
    return out


def read_reviewers(path: str | os.PathLike) -> list[Reviewer]:
    """``reviewer.jsonl``: {reviewer_id, prompt_id, metadata: {temperature, max_tokens}, category}."""
    out = []
    for where, obj in _jsonl(path):
        meta = obj.get("metadata") or {}
        if not isinstance(meta, dict):
            raise InputError(f"{where}: field 'metadata' must be an object")
        out.append(Reviewer(_field(obj, "reviewer_id", str, where), _field(obj, "prompt_id", int, where),
                            dict(meta), _field(obj, "category", str, where)))
    if not out:
        raise InputError(f"{os.fspath(path)}: no reviewers")
    return out


@dataclasses.dataclass
class VicunaData:
    """Questions, review prompts and reviewers (the reviewer of a question: see :meth:`reviewer_for`)."""

    questions: list[Question]
    prompts: dict[int, ReviewPrompt]
    reviewers: list[Reviewer]
    source: str = ""

    def __post_init__(self):
        for r in self.reviewers:
            if r.prompt_id not in self.prompts:
                raise InputError(f"{self.source}: reviewer {r.reviewer_id} uses prompt_id {r.prompt_id}, "
                                 f"which prompt.jsonl does not have")
        if not any(r.category == "general" for r in self.reviewers):
            raise InputError(f"{self.source}: no reviewer of category 'general' (the fallback of every "
                             f"question category without its own reviewer)")

    def reviewer_for(self, category: str) -> Reviewer:
        """The reviewer whose category is the question's, else the general one (FastChat's gen_prompt)."""
        for r in self.reviewers:
            if r.category == category:
                return r
        return next(r for r in self.reviewers if r.category == "general")


def load_vicuna_data(data_dir: str | os.PathLike | None = None, *, questions: str | None = None,
                     prompts: str | None = None, reviewers: str | None = None) -> VicunaData:
    """Reads question.jsonl, prompt.jsonl and reviewer.jsonl from ``data_dir`` (explicit paths win)."""
    def pick(explicit, name):
        if explicit:
            return os.fspath(explicit)
        if data_dir is None:
            raise InputError(f"no {name} given: pass the Vicuna data folder or the file itself")
        return paths.join(data_dir, name)

    q, p, r = pick(questions, "question.jsonl"), pick(prompts, "prompt.jsonl"), pick(reviewers, "reviewer.jsonl")
    return VicunaData(read_questions(q), read_review_prompts(p), read_reviewers(r), source=f"{p}, {r}")


def make_answer_id(model_id: str, question_id: int, text: str) -> str:
    """A deterministic answer id (FastChat uses a random shortuuid; a rerun should write the same file)."""
    return hashlib.sha1(f"{model_id}\x00{question_id}\x00{text}".encode("utf-8")).hexdigest()[:22]


def answer_record(model_id: str, question_id: int, text: str, metadata: Mapping[str, Any] | None = None) -> dict:
    """One line of a FastChat answer file."""
    rec = {"question_id": int(question_id), "text": text, "answer_id": make_answer_id(model_id, question_id, text),
           "model_id": model_id}
    if metadata:
        rec["metadata"] = dict(metadata)
    return rec


def write_answers(path: str | os.PathLike, records: Sequence[Mapping[str, Any]]) -> str:
    """Writes answer records (``answer_record``) atomically; returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(dumps(r) + "\n")
    os.replace(tmp, path)
    return path


# ================================================================================================ parsing
class ScoreParseError(ReplyError):
    """A judge reply without a valid verdict (the message says why)."""


_NUM = r"(\d+(?:\.\d+)?)"
_PAIR_LINE = re.compile(rf"\s*{_NUM}\s*(?:,\s*|\s+){_NUM}\s*")
_TUPLE = re.compile(rf"\(\s*{_NUM}\s*,\s*{_NUM}\s*\)")


def _check_range(a: float, b: float, what: str) -> tuple[float, float]:
    for x in (a, b):
        if not 0.0 <= x <= MAX_SCORE:
            raise ScoreParseError(f"{what}: score {x:g} is outside [0, {MAX_SCORE:g}]")
    return a, b


def parse_score_pair(reply: str, *, tuple_fallback: bool = False) -> tuple[float, float]:
    """(score of assistant 1, score of assistant 2) from a Vicuna review reply; see docs/evaluation.md#vicuna.

    ``tuple_fallback``: for the math reviewer, read the LAST "(a, b)" tuple when the first line is not a
    score pair. Raises :class:`ScoreParseError` for anything else.
    """
    if not isinstance(reply, str) or not reply.strip():
        raise ScoreParseError("empty reply")
    first = reply.strip().split("\n", 1)[0]
    m = _PAIR_LINE.fullmatch(first)
    if m:
        return _check_range(float(m.group(1)), float(m.group(2)), "first line")
    if tuple_fallback:
        tuples = _TUPLE.findall(reply)
        if tuples:
            a, b = tuples[-1]
            return _check_range(float(a), float(b), "last tuple")
        raise ScoreParseError(f"first line {first[:60]!r} is not two scores and the reply has no '(a, b)' tuple")
    raise ScoreParseError(f"first line {first[:60]!r} is not two scores (expected e.g. '8 7')")


def build_review_messages(prompt: ReviewPrompt, question: str, answer_1: str, answer_2: str) -> list[dict]:
    """FastChat's request: the prompt's system message and its template filled in."""
    user = prompt.prompt_template.format(question=question, answer_1=answer_1, answer_2=answer_2, **prompt.defaults)
    return [{"role": "system", "content": prompt.system_prompt}, {"role": "user", "content": user}]


def combine_orders(model_first: int, baseline_first: int) -> str:
    """The both-orders rule (ours): per-question outcome from the two orders' preferences FOR THE
    MODEL (+1 better, -1 worse, 0 even): "win" when both say better, "lose" when both say worse, else "tie"
    (disagreement or both even)."""
    if model_first > 0 and baseline_first > 0:
        return "win"
    if model_first < 0 and baseline_first < 0:
        return "lose"
    return "tie"


def outcome(prefs: Mapping[str, int]) -> str:
    """The outcome of the orders asked: one order (FastChat's default) is decided by its own preference
    (+1 win, -1 lose, 0 tie), two by :func:`combine_orders`."""
    if set(prefs) == {MODEL_FIRST}:
        return {1: "win", -1: "lose", 0: "tie"}[prefs[MODEL_FIRST]]
    return combine_orders(prefs[MODEL_FIRST], prefs[BASELINE_FIRST])


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


# ================================================================================================ the engine
@dataclasses.dataclass
class ReviewConfig:
    """temperature / max_tokens: None = the reviewer's metadata (Vicuna: 0.2, 1024) or the annotator's
    config (AlpacaEval: 0, 100). max_parse_retries: new requests for a reply without a verdict. orders: the
    Vicuna QA protocol, "one" (FastChat's default order) or "both" (docs/evaluation.md#vicuna)."""

    orders: str = "one"
    max_parse_retries: int = 2
    temperature: float | None = None
    max_tokens: int | None = None
    concurrency: int = 4
    limit: int | None = None
    progress: bool = True


@dataclasses.dataclass
class _PairItem:
    id: Any
    category: str
    reviewer_id: str
    orders: dict  # {MODEL_FIRST: chat messages, BASELINE_FIRST: chat messages}
    extra: dict   # fields copied to the record


class _PairwiseJudge:
    """Asks each item's two orders, retries unparseable replies, combines the verdicts."""

    def __init__(self, client: OpenAIClient, parse: Callable[[str, _PairItem], tuple[int, dict]],
                 params: Callable[[_PairItem], dict], max_parse_retries: int):
        self.client, self.parse, self.params, self.max_parse_retries = client, parse, params, max_parse_retries

    def review(self, item: _PairItem) -> ItemOutcome:
        counters: dict[str, int] = {}
        per_order = {}
        prefs = {}
        failed_orders = []
        for order, messages in item.orders.items():
            # A reply without a verdict is stored as unusable and asked again as a new request.
            try:
                got = ask_parsed(self.client, messages, lambda reply: self.parse(reply, item),
                                 max_parse_retries=self.max_parse_retries, params=self.params(item))
            except (BudgetExceeded, FatalRunError):
                raise
            except APIError as e:
                counters["request_failed"] = 1
                return ItemOutcome(failure={"id": item.id, **item.extra, "category": item.category,
                                            "order": order, "error": str(e), "cause": e.cause}, counters=counters)
            for k, v in got.counters.items():
                counters[k] = counters.get(k, 0) + v
            tries = got.tries
            verdict = got.value
            if verdict is None:
                failed_orders.append(order)
                per_order[order] = {"error": f"no verdict in {len(tries)} replies", "replies": tries}
                continue
            pref, detail = verdict
            model_pref = pref if order == MODEL_FIRST else -pref
            prefs[order] = model_pref
            per_order[order] = {**detail, "model_preference": model_pref, "reply": tries[-1]["reply"],
                                "attempts": len(tries), "failed_replies": [t for t in tries if "error" in t]}
        if failed_orders:
            counters["parse_failed"] = 1
            return ItemOutcome(failure={"id": item.id, **item.extra, "category": item.category,
                                        "reviewer_id": item.reviewer_id,
                                        "error": f"no parseable verdict for order(s) {failed_orders}",
                                        "cause": "parse_failed", "orders": per_order}, counters=counters)
        result = outcome(prefs)
        counters[result] = 1
        rec = {"id": item.id, **item.extra, "category": item.category, "reviewer_id": item.reviewer_id,
               "outcome": result, "orders": per_order}
        return ItemOutcome(record=rec, counters=counters)


def _summarise(summary: RunSummary, out_path: str, n_items: int, missing: list, extra: dict) -> dict:
    records = read_records(out_path)
    failures = read_records(summary.failed_path)
    counts = {k: sum(1 for r in records if r["outcome"] == k) for k in ("win", "lose", "tie")}
    judged = sum(counts.values())
    per_category: dict[str, dict[str, int]] = {}
    for r in records:
        c = per_category.setdefault(r.get("category", ""), {"win": 0, "lose": 0, "tie": 0, "failed": 0})
        c[r["outcome"]] += 1
    for f in failures:
        c = per_category.setdefault(f.get("category", ""), {"win": 0, "lose": 0, "tie": 0, "failed": 0})
        c["failed"] += 1
    scores = [1.0] * counts["win"] + [0.5] * counts["tie"] + [0.0] * counts["lose"]
    win_rate = 100.0 * sum(scores) / judged if judged else None
    stderr = None
    if judged > 1:
        mean = sum(scores) / judged
        stderr = 100.0 * math.sqrt(sum((s - mean) ** 2 for s in scores) / (judged - 1) / judged)
    pct = {f"{k}_pct": 100.0 * counts[k] / judged if judged else None for k in ("win", "tie", "lose")}
    return {**extra, **counts, **pct, "failed": len(failures), "missing": len(missing), "missing_ids": missing[:20],
            "judged": judged, "num_items": n_items,
            "win_rate": win_rate, "win_rate_stderr": stderr,
            "per_category": per_category,
            "unparsed_replies": summary.counters.get("unparsed_replies", 0),
            "request_failed": summary.counters.get("request_failed", 0),
            "reviews_file": out_path, "failed_file": summary.failed_path if failures else None}


def _run(items: list[_PairItem], judge: _PairwiseJudge, out_path: str, cfg: ReviewConfig, desc: str) -> RunSummary:
    return run_items(items, judge.review, out_path, concurrency=cfg.concurrency, desc=desc, progress=cfg.progress)


# ================================================================================================ Vicuna QA
def _answers_map(answers: str | os.PathLike | Mapping[int, Answer | str]) -> dict[int, str]:
    if isinstance(answers, (str, os.PathLike)):
        return {q: a.text for q, a in read_answers(answers).items()}
    return {int(q): (a.text if isinstance(a, Answer) else str(a)) for q, a in answers.items()}


def review_vicuna(answers: str | os.PathLike | Mapping[int, Any], baseline: str | os.PathLike | Mapping[int, Any],
                  out_path: str, client: OpenAIClient, data: VicunaData, config: ReviewConfig = ReviewConfig(), *,
                  model_name: str = "model", baseline_name: str = "baseline") -> dict:
    """Reviews the model's answers against the baseline's, in one order (``config.orders="one"``, the paper's
    protocol: the model as Assistant 1) or both (``"both"``, agreement or tie; see docs/evaluation.md#vicuna).

    Writes one record per reviewed question to ``out_path`` (JSONL: outcome, both orders' scores and
    replies) and failures to ``out_path + ".failed.jsonl"``; returns the summary dict (win, lose, tie,
    failed, missing, win_rate, per_category, ...). Questions without an answer on either side are counted
    as ``missing`` and not reviewed. Raises BudgetExceeded / FatalRunError (with ``.summary``) on a stop.
    """
    model_answers = _answers_map(answers)
    base_answers = _answers_map(baseline)
    if config.orders not in ORDERS:
        raise ValueError(f"orders={config.orders!r}: choose one of {', '.join(ORDERS)}")
    questions = data.questions[:config.limit] if config.limit else data.questions
    items, missing = [], []
    for q in questions:
        if q.question_id not in model_answers or q.question_id not in base_answers:
            missing.append(q.question_id)
            continue
        reviewer = data.reviewer_for(q.category)
        prompt = data.prompts[reviewer.prompt_id]
        a, b = model_answers[q.question_id], base_answers[q.question_id]
        orders = {MODEL_FIRST: build_review_messages(prompt, q.text, a, b)}
        if config.orders == "both":
            orders[BASELINE_FIRST] = build_review_messages(prompt, q.text, b, a)
        items.append(_PairItem(id=q.question_id, category=q.category, reviewer_id=reviewer.reviewer_id,
                               orders=orders, extra={"question_id": q.question_id}))
    if missing:
        warn(f"Vicuna review {model_name} vs {baseline_name}: {len(missing)} question(s) lack an answer on one "
             f"side and are not reviewed (counted as missing): {missing[:10]}")
    by_id = {r.reviewer_id: r for r in data.reviewers}

    def params(item: _PairItem) -> dict:
        meta = by_id[item.reviewer_id].metadata
        t = config.temperature if config.temperature is not None else float(meta.get("temperature", 0.2))
        m = config.max_tokens if config.max_tokens is not None else int(meta.get("max_tokens", 1024))
        return {"temperature": t, "max_tokens": m}

    def parse(reply: str, item: _PairItem) -> tuple[int, dict]:
        math_prompt = data.prompts[by_id[item.reviewer_id].prompt_id].category == "math"
        s1, s2 = parse_score_pair(reply, tuple_fallback=math_prompt)
        return _sign(s1 - s2), {"scores": [s1, s2]}

    judge = _PairwiseJudge(client, parse, params, config.max_parse_retries)
    summary = _run(items, judge, out_path, config, "vicuna review")
    return _summarise(summary, out_path, len(questions), missing,
                      {"benchmark": "vicuna", "model": model_name, "baseline": baseline_name,
                       "judge": client.config.model, "orders": config.orders, "num_questions": len(questions)})


# ================================================================================================ AlpacaEval
_IM_START, _IM_END = "<|im_start|>", "<|im_end|>"
_PLACEHOLDER = re.compile(r"\{(instruction|output_1|output_2)\}")
ALPACA_EVAL_PARAMS = {"temperature": 0.0, "max_tokens": 100}  # alpaca_eval_gpt4/configs.yaml


@dataclasses.dataclass(frozen=True)
class AlpacaEvalTemplate:
    """The annotator prompt as chat messages [(role, content with placeholders)]."""

    messages: tuple[tuple[str, str], ...]
    path: str

    def fill(self, instruction: str, output_1: str, output_2: str) -> list[dict]:
        values = {"instruction": instruction, "output_1": output_1, "output_2": output_2}
        return [{"role": role, "content": _PLACEHOLDER.sub(lambda m: values[m.group(1)], content)}
                for role, content in self.messages]


def load_alpaca_eval_template(path: str | os.PathLike) -> AlpacaEvalTemplate:
    """A ChatML prompt file (``<|im_start|>role\\ncontent<|im_end|>`` blocks) -> messages."""
    path = os.fspath(path)
    if not paths.is_file(path):
        raise InputError(f"{path}: prompt template not found")
    text = read_text(path).strip()
    if not text.startswith(_IM_START) or not text.endswith(_IM_END):
        raise InputError(f"{path}: expected ChatML blocks '{_IM_START}role ... {_IM_END}'")
    msgs = []
    for block in text.split(_IM_START)[1:]:
        head, _, rest = block.partition("\n")
        role = head.strip()
        if role not in ("system", "user", "assistant"):
            raise InputError(f"{path}: unknown ChatML role {role!r}")
        msgs.append((role, rest.split(_IM_END, 1)[0].strip()))
    joined = "\n".join(c for _, c in msgs)
    for name in ("{instruction}", "{output_1}", "{output_2}"):
        if name not in joined:
            raise InputError(f"{path}: the template has no {name} placeholder")
    return AlpacaEvalTemplate(tuple(msgs), path)


def parse_alpaca_eval_ranking(reply: str) -> int:
    """1 if the judge ranks model_1 first, 2 if model_2; ScoreParseError otherwise (see docs/evaluation.md#vicuna)."""
    text = (reply or "").strip()
    if not text:
        raise ScoreParseError("empty reply")
    try:
        obj = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
        raise ScoreParseError(f"not a Python literal ({type(e).__name__}): {text[:60]!r}") from None
    if not isinstance(obj, (list, tuple)) or len(obj) != 2 or not all(isinstance(d, dict) for d in obj):
        raise ScoreParseError(f"expected a list of two {{'model', 'rank'}} dicts, got {text[:60]!r}")
    ranks = {}
    for d in obj:
        model, rank = d.get("model"), d.get("rank")
        if model not in ("model_1", "model_2") or model in ranks:
            raise ScoreParseError(f"models must be 'model_1' and 'model_2', once each: {text[:80]!r}")
        if isinstance(rank, bool) or rank not in (1, 2):
            raise ScoreParseError(f"rank {rank!r} of {model} is not 1 or 2")
        ranks[model] = rank
    if sorted(ranks.values()) != [1, 2]:
        raise ScoreParseError(f"ranks must be 1 and 2: {text[:80]!r}")
    return ranks["model_1"]


def read_alpaca_eval_outputs(path: str | os.PathLike) -> list[dict]:
    """An alpaca_eval outputs file: a JSON list of {instruction, output, generator?, dataset?}."""
    path = os.fspath(path)
    data = read_json(path, what="outputs file")
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of {{instruction, output}} objects")
    seen: dict[str, int] = {}
    for i, r in enumerate(data):
        where = f"{path}: entry {i}"
        if not isinstance(r, dict):
            raise InputError(f"{where}: expected an object")
        _field(r, "instruction", str, where)
        _field(r, "output", str, where)
        if r["instruction"] in seen:
            raise InputError(f"{where}: instruction repeats entry {seen[r['instruction']]}: outputs are "
                             f"matched by instruction, so each must be unique")
        seen[r["instruction"]] = i
    return data


def review_alpaca_eval(outputs: str | os.PathLike | Sequence[Mapping[str, Any]],
                       reference: str | os.PathLike | Sequence[Mapping[str, Any]], out_path: str,
                       client: OpenAIClient, template: AlpacaEvalTemplate, config: ReviewConfig = ReviewConfig(), *,
                       model_name: str = "model", reference_name: str | None = None) -> dict:
    """AlpacaEval-style win rate of ``outputs`` against ``reference`` (both orders per instruction).

    Instructions are the reference's (in its order; ``config.limit`` keeps the first N); a model output is
    found by its instruction text; instructions without one are ``missing``. Returns the summary dict
    (win_rate with ties as half, win/lose/tie, failed, missing, per dataset in ``per_category``).
    """
    outs = read_alpaca_eval_outputs(outputs) if isinstance(outputs, (str, os.PathLike)) else list(outputs)
    refs = read_alpaca_eval_outputs(reference) if isinstance(reference, (str, os.PathLike)) else list(reference)
    by_instruction = {r["instruction"]: r["output"] for r in outs}
    refs = refs[:config.limit] if config.limit else refs
    if reference_name is None:
        reference_name = str(refs[0].get("generator", "reference")) if refs else "reference"
    items, missing = [], []
    for i, r in enumerate(refs):
        ins = r["instruction"]
        if ins not in by_instruction:
            missing.append(i)
            continue
        m, b = by_instruction[ins], r["output"]
        items.append(_PairItem(id=i, category=str(r.get("dataset", "")), reviewer_id="alpaca_eval_gpt4",
                               orders={MODEL_FIRST: template.fill(ins, m, b), BASELINE_FIRST: template.fill(ins, b, m)},
                               extra={"instruction": ins}))
    if missing:
        warn(f"AlpacaEval {model_name}: {len(missing)} instruction(s) have no model output and are not judged "
             f"(counted as missing)")
    params = dict(ALPACA_EVAL_PARAMS)
    if config.temperature is not None:
        params["temperature"] = config.temperature
    if config.max_tokens is not None:
        params["max_tokens"] = config.max_tokens

    def parse(reply: str, item: _PairItem) -> tuple[int, dict]:
        rank_1 = parse_alpaca_eval_ranking(reply)
        return (1 if rank_1 == 1 else -1), {"rank_model_1": rank_1}

    judge = _PairwiseJudge(client, parse, lambda item: params, config.max_parse_retries)
    summary = _run(items, judge, out_path, config, "alpaca_eval review")
    return _summarise(summary, out_path, len(refs), missing,
                      {"benchmark": "alpaca_eval", "model": model_name, "baseline": reference_name,
                       "judge": client.config.model, "orders": "both", "annotator": "alpaca_eval_gpt4 (both orders)",
                       "num_instructions": len(refs)})

"""Probabilistic ranking data: a teacher LLM samples N responses per instruction with their log-probs.

For each instruction i (the Alpaca prompt, ``tuna_jax.data.templates.format_prompt``) the teacher
samples N responses r_k and returns the log-prob of every sampled token. Then

    s_k = logp_k / |r_k| ** beta       (logp_k summed in nats, |r_k| in tokens; beta = 1.3, the paper's)

and the candidates are written best first (stable sort on s) as one ranking record per instruction,
the native format of ``tuna_jax.data.records`` (:func:`run_teacher`, :func:`rank_samples`). Guards,
each counted, nothing silently dropped: a missing log-prob (the -9999 sentinel, None, non-finite), a
reply without log-probs or an empty response drops the candidate; a length cut is kept and counted;
fewer than ``min_candidates`` fails the item. Candidates are stripped of surrounding whitespace by
default. Backends, through :class:`TeacherBackend`: :class:`RemoteTeacher` (an OpenAI-compatible
endpoint, completions or chat completions with log-probs) and :class:`tuna_jax.feedback.local.LocalTeacher`
(a local tuna-jax model, ``--local-model PATH``). Every request goes through the store
(``llm_api/store.py``), so a rerun requests nothing already answered and writes a byte-identical output.

The record's fields and the guards in full: docs/feedback.md#teacher.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Protocol, Sequence

from tuna_jax.data.records import identical_pairs
from tuna_jax.data.rows import InstructionRow, read_instructions
from tuna_jax.data.templates import format_prompt
from tuna_jax.io.fields import arg
from tuna_jax.io.items import ItemOutcome, RunSummary, run_items
from tuna_jax.llm_api.client import APIError, OpenAIClient
from tuna_jax.llm_api.replies import SERVER_CAUSES, ReplyError, check_choices
from tuna_jax.llm_api.store import BudgetExceeded, FatalRunError
from tuna_jax.samples import Sample

SCORING = "sampling and scoring"


@dataclasses.dataclass(kw_only=True)
class TeacherSettings:
    """Sampling and scoring (paper: N=4, beta=1.3, temperature 1); the flags of `tuna-jax teacher`."""

    api: str = arg("completions", "legacy /completions with logprobs (the paper's text-davinci-003 set-up) or "
                   "/chat/completions with logprobs: true", choices=("completions", "chat"), group=SCORING)
    n: int = arg(4, "responses per instruction (paper: 4)", group=SCORING)
    n_per_request: int | None = arg(None, "responses per request (the `n` parameter); 1 for servers that ignore "
                                    "`n`, such as llama.cpp (default: all N in one request)", group=SCORING)
    beta: float = arg(1.3, "length exponent in s = logp / |r|^beta (paper: 1.3)", group=SCORING)
    temperature: float = arg(1.0, "sampling temperature (paper: 1)", group=SCORING)
    top_p: float = arg(1.0, "nucleus sampling", group=SCORING)
    max_tokens: int = arg(512, "longest response in tokens", group=SCORING)
    seed: int = arg(0, "sampling seed sent to the server (request j of an instruction uses seed+j); -1: none",
                    group=SCORING)
    top_logprobs: int | None = arg(None, "chat only: also ask for the top-k alternatives", group=SCORING)
    min_candidates: int = arg(2, "fewer valid responses than this fails the item", group=SCORING)
    drop_length_cut: bool = arg(False, "drop responses cut at --max-tokens (finish_reason 'length') instead of "
                                "keeping them", group=SCORING)
    no_strip: bool = arg(False, "keep the whitespace around responses (stripped by default)", group=SCORING)


logger = logging.getLogger("tuna_jax.feedback")

DEFAULT_SENTINEL = -9999.0
LEGACY_LOGPROBS = 1  # /completions' ``logprobs`` (top-k alternatives); the sampled token's comes with any value >= 0


class TeacherBackend(Protocol):
    """What a teacher must do. Remote: :class:`RemoteTeacher`; local tuna-jax model: ``local.LocalTeacher``."""

    def sample(self, prompt: str, n: int) -> list[Sample]:
        """n sampled responses to ``prompt`` with the log-prob of every sampled token."""

    def score(self, prompt: str, responses: Sequence[str]) -> list[Sample]:
        """The log-probs of given ``responses`` after ``prompt`` (teacher forcing)."""


def _sample_from_choice(choice: dict, api: str) -> Sample:
    lp = choice.get("logprobs")
    if api == "chat":
        text = (choice.get("message") or {}).get("content") or ""
        content = lp.get("content") if isinstance(lp, dict) else None
        toks = None if content is None else [t.get("logprob") if isinstance(t, dict) else None for t in content]
    else:
        text = choice.get("text") or ""
        toks = lp.get("token_logprobs") if isinstance(lp, dict) else None
    return Sample(text=text, token_logprobs=toks if toks is not None else None,
                  finish_reason=choice.get("finish_reason"))


class RemoteTeacher:
    """A TeacherBackend over an OpenAI-compatible endpoint (through the client, so cached and budgeted)."""

    def __init__(self, client: OpenAIClient, config: TeacherSettings):
        if config.api not in ("completions", "chat"):
            raise ValueError(f"api must be 'completions' or 'chat', got {config.api!r}")
        per = config.n_per_request or config.n
        if per < 1 or config.n % per:
            raise ValueError(f"n_per_request={per} must divide n={config.n}")
        self.client = client
        self.config = config

    def _params(self, n: int, group: int) -> dict:
        c = self.config
        p: dict[str, Any] = {"max_tokens": c.max_tokens, "temperature": c.temperature, "top_p": c.top_p, "n": n}
        if c.seed >= 0:  # -1: no seed sent
            p["seed"] = c.seed + group
        if c.api == "chat":
            p["logprobs"] = True
            if c.top_logprobs is not None:
                p["top_logprobs"] = c.top_logprobs
        else:
            p["logprobs"] = LEGACY_LOGPROBS
        return p

    def _requests(self, prompt: str, n: int) -> list[tuple[str, dict, dict, int]]:
        """(path, body, cache-key extra, responses asked) of each request that samples ``n`` responses."""
        c = self.config
        per = min(c.n_per_request or c.n, n)
        out = []
        for group in range(math.ceil(n / per)):
            k = min(per, n - group * per)
            if c.api == "chat":
                body = {"model": self.client.config.model, "messages": [{"role": "user", "content": prompt}]}
                path = "chat/completions"
            else:
                body = {"model": self.client.config.model, "prompt": prompt}
                path = "completions"
            # The sample group is part of the cache key: N equal bodies must be N cached replies.
            out.append((path, {**body, **self._params(k, group)}, {"sample_group": group}, k))
        return out

    def sample(self, prompt: str, n: int) -> list[Sample]:
        """n responses with their token log-probs. A reply with other than the asked number of choices,
        choices that are not objects, or no log-probs is never cached as good (replies.check_choices): it
        is retried, then the item fails with an APIError."""
        api = self.config.api
        out: list[Sample] = []
        for path, body, extra, k in self._requests(prompt, n):
            def validate(response, k=k):
                check_choices(response, k, api, logprobs=True)

            r = self.client.post(path, body, extra_key=extra, validate=validate)
            out.extend(_sample_from_choice(ch, api) for ch in check_choices(r.response, k, api, logprobs=True))
        return out

    def forget(self, prompt: str, n: int, reason: str) -> None:
        """Mark the cached replies of ``sample(prompt, n)`` unusable (the item could not use them), so a
        rerun requests them again instead of failing on the same replies."""
        for path, body, extra, _ in self._requests(prompt, n):
            self.client.invalidate(path, body, extra_key=extra, reason=reason)

    def score(self, prompt: str, responses: Sequence[str]) -> list[Sample]:
        """Legacy completions with ``echo``: the log-probs of prompt+response, cut at the prompt's end.

        Needs a server that echoes prompt log-probs (OpenAI legacy models, vLLM; not llama.cpp). The text
        is tokenised as one string, so a token that starts before the prompt's end counts as a prompt token
        (a real BPE rarely merges across "### Response:" and the response; the local backend, which
        tokenises the two separately, is exact). The first echoed token has no log-prob.
        """
        if self.config.api != "completions":
            raise ValueError("score() needs the legacy completions API (echo); chat cannot score given text")

        def validate(response):
            ch = check_choices(response, 1, "completions", logprobs=True)[0]
            offsets = ch["logprobs"].get("text_offset")
            if not isinstance(offsets, list) or len(offsets) != len(ch["logprobs"]["token_logprobs"]):
                raise ReplyError("logprobs.text_offset is missing or does not match the token log-probs: the "
                                 "server cannot echo prompt log-probs")

        out = []
        for resp in responses:
            full = prompt + resp
            # max_tokens=1, logprobs=1: what vLLM needs for echoed prompt log-probs (0 is rejected by some
            # servers); the one generated token starts at len(full) and is cut off below.
            r = self.client.complete(full, validate=validate, max_tokens=1, echo=True, logprobs=1, temperature=0.0)
            lp = r.response["choices"][0]["logprobs"]
            keep = [t for o, t in zip(lp["text_offset"], lp["token_logprobs"]) if len(prompt) <= o < len(full)]
            out.append(Sample(resp, keep, "stop"))
        return out


def check_logprobs(sample: Sample, sentinel: float = DEFAULT_SENTINEL) -> str | None:
    """None if ``sample.token_logprobs`` is usable, else the reason (a counter name)."""
    t = sample.token_logprobs
    if t is None:
        return "no_logprobs"
    if len(t) == 0:
        return "empty_response"
    for v in t:
        # bool is an int: a server writing `true` is broken, not a log-prob.
        if v is None or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or v <= sentinel or v > 1e-4:  # a log-prob is <= 0; allow float round-off
            return "missing_logprob"
    return None


def quality_score(logp: float, num_tokens: int, beta: float) -> float:
    """s = logp / num_tokens ** beta (logp in nats, num_tokens > 0)."""
    if num_tokens <= 0:
        raise ValueError("num_tokens must be > 0 (an empty response has no score)")
    return logp / num_tokens ** beta


def rank_samples(samples: Sequence[Sample], cfg: TeacherSettings) -> tuple[dict, dict, list]:
    """Valid samples scored and sorted best first.

    Returns (columns, counters, dropped): columns has candidates/scores/logprobs/num_tokens/finish_reasons
    lists; dropped lists {"index", "reason", "finish_reason"} of the samples left out.
    """
    counters: dict[str, int] = {}
    dropped = []
    rows = []
    for j, s in enumerate(samples):
        reason = check_logprobs(s)
        text = s.text if cfg.no_strip else s.text.strip()
        if reason is None and not text.strip():
            reason = "empty_response"
        if reason is None and s.finish_reason == "length":
            counters["length_cut"] = counters.get("length_cut", 0) + 1
            if cfg.drop_length_cut:
                reason = "length_cut_dropped"
        if reason is not None:
            counters[reason] = counters.get(reason, 0) + 1
            dropped.append({"index": j, "reason": reason, "finish_reason": s.finish_reason})
            continue
        logp = math.fsum(float(v) for v in s.token_logprobs)
        n = len(s.token_logprobs)
        rows.append((quality_score(logp, n, cfg.beta), j, text, logp, n, s.finish_reason))
    rows.sort(key=lambda r: (-r[0], r[1]))  # best first; ties keep sampling order
    cols = {"candidates": [r[2] for r in rows], "scores": [r[0] for r in rows], "logprobs": [r[3] for r in rows],
            "num_tokens": [r[4] for r in rows], "finish_reasons": [r[5] for r in rows]}
    same = identical_pairs(cols["candidates"])  # kept (the record is what the teacher said); training ties them
    if same:
        counters["identical_pairs"] = same
    return cols, counters, dropped


def make_work(backend: TeacherBackend, cfg: TeacherSettings, meta: dict):
    """The per-item function for :func:`tuna_jax.io.items.run_items`."""

    def work(item: InstructionRow) -> ItemOutcome:
        prompt = format_prompt(item.instruction, item.input)
        try:
            samples = backend.sample(prompt, cfg.n)
        except (BudgetExceeded, FatalRunError):
            raise
        except (APIError, ReplyError) as e:
            return ItemOutcome(failure={"id": item.id, "where": item.where, "error": str(e), "cause": e.cause},
                               counters={"request_failed": 1})
        cols, counters, dropped = rank_samples(samples, cfg)
        if len(cols["candidates"]) < cfg.min_candidates:
            counters["too_few_candidates"] = 1
            error = (f"{len(cols['candidates'])} valid candidates of {len(samples)} "
                     f"(min_candidates={cfg.min_candidates})")
            forget = getattr(backend, "forget", None)
            if forget is not None:  # the item could not use these replies: a rerun asks again
                forget(prompt, cfg.n, error)
            return ItemOutcome(failure={"id": item.id, "where": item.where, "error": error, "dropped": dropped,
                                        "cause": "too_few_candidates"}, counters=counters)
        rec = {"id": item.id, "instruction": item.instruction, "input": item.input, "output": item.output, **cols,
               "teacher": {**meta, "dropped": dropped}}
        return ItemOutcome(record=rec, counters=counters)

    return work


def run_teacher(input_path: str, out_path: str, backend: TeacherBackend, cfg: TeacherSettings, *,
                meta: dict | None = None, concurrency: int = 4, limit: int | None = None,
                progress: bool = True, items: list[InstructionRow] | None = None) -> RunSummary:
    """Sample, score and rank every instruction of ``input_path`` (or the already read ``items``); write
    ranking records to ``out_path``.

    Raises BudgetExceeded / FatalRunError after saving (see io.items.run_items); returns the RunSummary.
    """
    items = read_instructions(input_path, limit) if items is None else items
    meta = dict(meta or {})
    meta.update({"n": cfg.n, "beta": cfg.beta})
    return run_items(items, make_work(backend, cfg, meta), out_path, concurrency=concurrency,
                     desc="teacher", progress=progress, stop_causes=SERVER_CAUSES)

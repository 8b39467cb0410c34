"""Probabilistic ranking data: a teacher LLM samples N responses per instruction with their log-probs.

For each instruction i (the Alpaca prompt, ``tuna_jax.data.templates.format_prompt``) the teacher
samples N responses r_k and returns the log-prob of every sampled token. Then

    logp_k = sum_t log p(r_k,t | i, r_k,<t)        (nats; over the tokens the endpoint returned)
    |r_k|  = number of log-prob entries             (tokens)
    s_k    = logp_k / |r_k| ** beta                  (beta = 1.3, the paper's)

and the candidates are written best first (stable sort on s, ties keep sampling order) as one ranking
record per instruction (JSONL; the native format of ``tuna_jax.data.records``):

    {"id", "instruction", "input", "output" (the original response), "candidates": [K str],
     "scores": [K float, descending], "logprobs": [K float, summed], "num_tokens": [K int],
     "finish_reasons": [K str], "teacher": {"model", "api", "n", "beta", "dropped": [...]}}

Guards (each counted in the run summary, nothing silently dropped):
  - The -9999 sentinel: vLLM (and some OpenAI replies) put -9999.0 where a log-prob is missing. Any
    log-prob <= ``sentinel`` (default -9999), None, or non-finite makes the candidate's logp unknown: the
    candidate is dropped (``missing_logprob``), never summed.
  - A reply with no log-probs at all (the server ignored ``logprobs``): dropped (``no_logprobs``).
  - An empty response (0 tokens): |r|=0 would give 0/0: dropped (``empty_response``).
  - ``finish_reason == "length"``: the response was cut at max_tokens; kept and counted (``length_cut``),
    or dropped with ``drop_length_cut``.
  - Fewer than ``min_candidates`` valid candidates: the item is failed (written to OUT.failed.jsonl).

Candidates are stripped of surrounding whitespace by default (a completion API returns the text after
"### Response:" with its leading newline, which the student never generates there -- the same policy as
the records importer); ``logprobs``/``num_tokens`` are those of the text as sampled.

Backends: :class:`RemoteTeacher` (OpenAI-compatible endpoint, ``/v1/completions`` with ``logprobs`` or
``/v1/chat/completions`` with ``logprobs: true``) and :class:`tuna_jax.feedback.local.LocalTeacher` (a local
tuna-jax model, ``--local-model PATH``), both through the :class:`TeacherBackend` protocol.

Resumability: every request goes through the store (store.py); a rerun (after a crash, a SIGKILL, a
budget stop) requests nothing already answered and writes a byte-identical output.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
from typing import Any, Protocol, Sequence

from tuna_jax.data.records import identical_pairs
from tuna_jax.data.rows import InstructionRow, read_instructions
from tuna_jax.data.templates import format_prompt

from tuna_jax.io.cli import cli_main, report_run
from tuna_jax.io.items import ItemOutcome, RunSummary, run_items

from tuna_jax.samples import Sample

from .client import APIError, OpenAIClient, add_client_arguments, client_config_from_args, store_from_args
from .replies import ReplyError, check_choices
from .store import BudgetExceeded, FatalRunError

logger = logging.getLogger("tuna_jax.feedback")

DEFAULT_SENTINEL = -9999.0


class TeacherBackend(Protocol):
    """What a teacher must do. Remote: :class:`RemoteTeacher`; local tuna-jax model: ``local.LocalTeacher``."""

    def sample(self, prompt: str, n: int) -> list[Sample]:
        """n sampled responses to ``prompt`` with the log-prob of every sampled token."""

    def score(self, prompt: str, responses: Sequence[str]) -> list[Sample]:
        """The log-probs of given ``responses`` after ``prompt`` (teacher forcing)."""


@dataclasses.dataclass
class TeacherConfig:
    """Sampling and scoring settings (paper: N=4, beta=1.3, temperature 1).

    api: "completions" (legacy /v1/completions, the paper's text-davinci-003 set-up) or "chat".
    n_per_request: responses asked for in one request (``n``); 1 sends N requests with seeds seed+j
      (for servers that ignore ``n``, e.g. llama.cpp).
    logprobs: the legacy ``logprobs`` value (top-k alternatives; the sampled token's log-prob comes with
      any value >= 0). top_logprobs: chat ``top_logprobs`` (None: not sent).
    """

    n: int = 4
    beta: float = 1.3
    api: str = "completions"
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 512
    n_per_request: int = 4
    seed: int | None = 0
    logprobs: int = 1
    top_logprobs: int | None = None
    sentinel: float = DEFAULT_SENTINEL
    min_candidates: int = 2
    drop_length_cut: bool = False
    strip: bool = True


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

    def __init__(self, client: OpenAIClient, config: TeacherConfig):
        if config.api not in ("completions", "chat"):
            raise ValueError(f"api must be 'completions' or 'chat', got {config.api!r}")
        if config.n_per_request < 1 or config.n % config.n_per_request:
            raise ValueError(f"n_per_request={config.n_per_request} must divide n={config.n}")
        self.client = client
        self.config = config

    def _params(self, n: int, group: int) -> dict:
        c = self.config
        p: dict[str, Any] = {"max_tokens": c.max_tokens, "temperature": c.temperature, "top_p": c.top_p, "n": n}
        if c.seed is not None:
            p["seed"] = c.seed + group
        if c.api == "chat":
            p["logprobs"] = True
            if c.top_logprobs is not None:
                p["top_logprobs"] = c.top_logprobs
        else:
            p["logprobs"] = c.logprobs
        return p

    def _requests(self, prompt: str, n: int) -> list[tuple[str, dict, dict, int]]:
        """(path, body, cache-key extra, responses asked) of each request that samples ``n`` responses."""
        c = self.config
        per = min(c.n_per_request, n)
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


def rank_samples(samples: Sequence[Sample], cfg: TeacherConfig) -> tuple[dict, dict, list]:
    """Valid samples scored and sorted best first.

    Returns (columns, counters, dropped): columns has candidates/scores/logprobs/num_tokens/finish_reasons
    lists; dropped lists {"index", "reason", "finish_reason"} of the samples left out.
    """
    counters: dict[str, int] = {}
    dropped = []
    rows = []
    for j, s in enumerate(samples):
        reason = check_logprobs(s, cfg.sentinel)
        text = s.text.strip() if cfg.strip else s.text
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


def make_work(backend: TeacherBackend, cfg: TeacherConfig, meta: dict):
    """The per-item function for :func:`tuna_jax.io.items.run_items`."""

    def work(item: InstructionRow) -> ItemOutcome:
        prompt = format_prompt(item.instruction, item.input)
        try:
            samples = backend.sample(prompt, cfg.n)
        except (BudgetExceeded, FatalRunError):
            raise
        except (APIError, ReplyError) as e:
            return ItemOutcome(failure={"id": item.id, "where": item.where, "error": str(e)},
                               counters={"request_failed": 1})
        cols, counters, dropped = rank_samples(samples, cfg)
        if len(cols["candidates"]) < cfg.min_candidates:
            counters["too_few_candidates"] = 1
            error = (f"{len(cols['candidates'])} valid candidates of {len(samples)} "
                     f"(min_candidates={cfg.min_candidates})")
            forget = getattr(backend, "forget", None)
            if forget is not None:  # the item could not use these replies: a rerun asks again
                forget(prompt, cfg.n, error)
            return ItemOutcome(failure={"id": item.id, "where": item.where, "error": error, "dropped": dropped},
                               counters=counters)
        rec = {"id": item.id, "instruction": item.instruction, "input": item.input, "output": item.output, **cols,
               "teacher": {**meta, "dropped": dropped}}
        return ItemOutcome(record=rec, counters=counters)

    return work


def run_teacher(input_path: str, out_path: str, backend: TeacherBackend, cfg: TeacherConfig, *,
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
                     desc="teacher", progress=progress)


# ---------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `tuna-jax teacher INPUT OUT ...`."""
    parser.description = (
        "Probabilistic ranking data (Tuna_p): a teacher LLM samples N responses per instruction with token "
        "log-probs; each response is scored s = logp / |r|^beta and the candidates are written best first as "
        "ranking records (JSONL). Every request is cached in an append-only store, so rerunning the same "
        "command after a crash or a budget stop pays for nothing twice and gives the same output.")
    parser.add_argument("input", help="Alpaca-format instructions: JSON list or JSONL of {instruction, input, output}")
    parser.add_argument("out", help="output JSONL of ranking records (failures go to OUT.failed.jsonl)")
    t = parser.add_argument_group("sampling and scoring")
    t.add_argument("--api", choices=("completions", "chat"), default="completions",
                   help="legacy /completions with logprobs (the paper's text-davinci-003 set-up) or "
                        "/chat/completions with logprobs: true (default: %(default)s)")
    t.add_argument("--n", type=int, default=4, help="responses per instruction (paper: 4)")
    t.add_argument("--n-per-request", type=int, default=None,
                   help="responses per request (the `n` parameter); 1 for servers that ignore `n`, such as "
                        "llama.cpp (default: all N in one request)")
    t.add_argument("--beta", type=float, default=1.3, help="length exponent in s = logp / |r|^beta (paper: 1.3)")
    t.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (paper: 1)")
    t.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default: %(default)s)")
    t.add_argument("--max-tokens", type=int, default=512, help="longest response in tokens (default: %(default)s)")
    t.add_argument("--seed", type=int, default=0,
                   help="sampling seed sent to the server (request j of an instruction uses seed+j); -1: none")
    t.add_argument("--top-logprobs", type=int, default=None, help="chat only: also ask for the top-k alternatives")
    t.add_argument("--min-candidates", type=int, default=2,
                   help="fewer valid responses than this fails the item (default: %(default)s)")
    t.add_argument("--drop-length-cut", action="store_true",
                   help="drop responses cut at --max-tokens (finish_reason 'length') instead of keeping them")
    t.add_argument("--no-strip", action="store_true",
                   help="keep the whitespace around responses (stripped by default)")
    t.add_argument("--limit", type=int, default=None, help="only the first LIMIT instructions")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_client_arguments(parser)
    add_local_arguments(parser)


def add_local_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--local-*`` options: a tuna-jax model as the teacher (``local.LocalTeacher``). With
    ``--local-model`` the endpoint's ``--model`` is not needed, so it is made optional here (``run`` asks for
    it when there is no local model)."""
    from .local import RESCORE

    g = parser.add_argument_group(
        "local teacher (a tuna-jax model on this machine instead of an endpoint; --n, --temperature, --top-p, "
        "--max-tokens, --seed, --beta, --store apply; endpoint options are ignored)")
    g.add_argument("--local-model", metavar="PATH", default=None,
                   help="HF folder or tuna-jax params checkpoint of the teacher; sampled with tuna-jax, token "
                        "log-probs exact (response tokens + EOS)")
    g.add_argument("--local-tokenizer", metavar="PATH", default=None,
                   help="tokenizer folder or tokenizer.model (default: the model's)")
    g.add_argument("--local-top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--local-batch-size", type=int, default=8, help="sampler rows per device call (>= --n)")
    g.add_argument("--local-max-prompt-len", type=int, default=None,
                   help="longer prompts fail their item (default: only the model's context length limits)")
    g.add_argument("--local-dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    g.add_argument("--local-mesh", default=None, metavar="DATA,FSDP,TENSOR",
                   help="device mesh sizes, one may be -1 (default: all devices on fsdp)")
    g.add_argument("--local-rescore", default="noncanonical", choices=RESCORE,
                   help="re-score samples by teacher forcing: 'noncanonical' (those whose sampled tokens are not "
                        "the tokenizer's segmentation of their text; default), 'always' or 'never'")
    action = parser._option_string_actions.get("--model")  # argparse keeps no public handle on an option
    if action is not None:
        action.required = False
        action.help = "model name as the server knows it (required unless --local-model is given)"


def config_from_args(args) -> TeacherConfig:
    return TeacherConfig(n=args.n, beta=args.beta, api=args.api, temperature=args.temperature, top_p=args.top_p,
                         max_tokens=args.max_tokens, n_per_request=args.n_per_request or args.n,
                         seed=None if args.seed is not None and args.seed < 0 else args.seed,
                         top_logprobs=args.top_logprobs, min_candidates=args.min_candidates,
                         drop_length_cut=args.drop_length_cut, strip=not args.no_strip)


def run(args) -> int:
    """`tuna-jax teacher`: 0 done, 1 some items failed (see OUT.failed.jsonl), 2 stopped (budget or a fatal
    endpoint error; rerun to continue). The input is read and checked before anything else happens: a bad
    row costs no request, loads no model and leaves no store behind."""
    local = getattr(args, "local_model", None)
    if not local and not args.model:
        raise ValueError("--model is required (the endpoint's model name), or give --local-model PATH")
    cfg = config_from_args(args)
    items = read_instructions(args.input, args.limit)
    if local:
        return _run_local(args, cfg, items)
    ccfg = client_config_from_args(args)
    client = OpenAIClient(ccfg)  # checks --base-url before the store file is created
    with store_from_args(args, args.out) as store:
        client.store = store
        backend = RemoteTeacher(client, cfg)
        meta = {"model": ccfg.model, "api": cfg.api, "temperature": cfg.temperature, "max_tokens": cfg.max_tokens}
        return report_run("teacher", lambda: run_teacher(args.input, args.out, backend, cfg, meta=meta,
                                                         concurrency=ccfg.concurrency, items=items,
                                                         progress=not args.no_progress),
                          store, "item(s) failed, listed in")


def _run_local(args, cfg: TeacherConfig, items: list[InstructionRow]) -> int:
    """``tuna-jax teacher ... --local-model PATH``: 0 done, 1 some items failed (OUT.failed.jsonl); Ctrl-C
    stops it (rerun the same command to continue from the store)."""
    from tuna_jax import parallel

    from .local import LocalTeacher

    parallel.initialize_distributed()
    mesh = parallel.make_mesh(args.local_mesh)
    seed = 0 if cfg.seed is None else cfg.seed
    with store_from_args(args, args.out) as store:
        backend = LocalTeacher(args.local_model, tokenizer=args.local_tokenizer, mesh=mesh,
                               temperature=cfg.temperature, top_p=cfg.top_p, top_k=args.local_top_k,
                               max_new_tokens=cfg.max_tokens, seed=seed, batch_size=args.local_batch_size,
                               max_prompt_len=args.local_max_prompt_len, dtype=args.local_dtype,
                               rescore=args.local_rescore, store=store)
        meta = {"model": args.model or args.local_model, "api": "local", "temperature": cfg.temperature,
                "top_p": cfg.top_p, "top_k": args.local_top_k, "max_tokens": cfg.max_tokens, "seed": seed}
        # One item at a time: the device is the bottleneck, threads would only queue on it.
        status = report_run("teacher", lambda: run_teacher(args.input, args.out, backend, cfg, meta=meta,
                                                           concurrency=1, items=items, progress=not args.no_progress),
                            store, "item(s) failed, listed in")
        print(f"teacher (local): {backend.stats.line()}", file=sys.stderr)
        return status


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main("tuna-jax teacher", add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())

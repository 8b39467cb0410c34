"""Contextual-ranking candidates: N diverse samples per instruction from the model being tuned
(``tuna-jax sample-diverse MODEL INPUT OUT``), ready for ``tuna-jax judge``.

Trial 1 samples N responses at ``temperature`` (1.0); a set is accepted when every pair has ROUGE-L F
< ``tau`` (0.8; two responses equal after stripping whitespace count as 1.0); each further trial samples
``temperature_step`` (0.1) hotter, for at most ``max_trials`` (3); if no set is accepted, the one with
the lowest mean pairwise ROUGE-L is kept and marked ``fallback``. What a further trial resamples is
``DiverseSettings.mode`` / ``--mode``: ``similar`` (the default, the paper's description, Sec. 3.1)
removes only the responses too similar to an earlier kept one and samples replacements; ``set`` (what
the reference code, microsoft/LMOps tuna, does) samples the whole set again.

Output (:func:`sample_diverse_file`): one JSON line per instruction, in input order, the candidates as
sampled plus a ``diversity`` record of trials, temperatures and pairwise ROUGE-L. A sample depends on
(seed, id, trial, prompt) only (``rng_id = sha256(id, trial)``), so a resumed run (lines already in OUT
are skipped, a torn last line regenerated, other settings refused) writes what an uninterrupted one
would. The sampling function is injectable (:data:`SampleFn`; the real sampler: :func:`sampler_fn`).

The procedure, the output's fields and resuming in full: docs/feedback.md#diverse.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import sys
from typing import Any, Callable, Sequence

from tuna_jax.io.errors import InputError
from tuna_jax.io.fields import arg
from tuna_jax.io.jsonl import check_settings, dumps, read_out_lines, write_json
from tuna_jax.io.lock import OutputLock

MODES = ("similar", "set")  # resample the too-similar responses (the paper) | the whole set (the reference code)
DIVERSITY = "diversity (the paper's settings by default)"


@dataclasses.dataclass(kw_only=True)
class DiverseSettings:
    """The procedure (docs/feedback.md#diverse; the flags of `tuna-jax sample-diverse`); checked when made."""

    n: int = arg(4, "samples per instruction", group=DIVERSITY)
    tau: float = arg(0.8, "a pair with ROUGE-L F >= tau is too similar", group=DIVERSITY)
    temperature: float = arg(1.0, "temperature of the first trial", group=DIVERSITY)
    temperature_step: float = arg(0.1, "added to the temperature on each retry", group=DIVERSITY)
    max_trials: int = arg(3, "trials in all, the first included", group=DIVERSITY)
    mode: str = arg("similar", "what a retry resamples: 'similar' = only the responses too similar to an earlier "
                    "one (the paper's description), 'set' = the whole set (what the reference code does)",
                    choices=MODES, group=DIVERSITY)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}: choose one of {', '.join(MODES)}")
        if self.n < 2:
            raise ValueError(f"n={self.n}: diverse sampling compares pairs, so n must be >= 2")
        if not 0 < self.tau <= 1:
            raise ValueError(f"tau={self.tau}: must be in (0, 1]")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature}: must be > 0 (greedy samples are all equal)")
        if self.temperature_step < 0:
            raise ValueError(f"temperature_step={self.temperature_step}: must be >= 0")
        if self.max_trials < 1:
            raise ValueError(f"max_trials={self.max_trials}: must be >= 1")

    def temperature_of(self, trial: int) -> float:
        """Temperature of 0-based ``trial``; rounded so 1.0 + 2 * 0.1 is 1.2, not 1.2000000000000002."""
        return round(self.temperature + trial * self.temperature_step, 10)


logger = logging.getLogger("tuna_jax.feedback")

#: sample_fn(prompts, n, temperature, rng_ids) -> texts [len(prompts)][n]. ``prompts`` are full Alpaca prompts;
#: ``rng_ids`` [len(prompts)] ints in [0, 2**31) name each prompt's random stream (see docs/feedback.md#diverse).
SampleFn = Callable[[Sequence[str], int, float, Sequence[int]], list]


# ---------------------------------------------------------------------------- similarity
class PairwiseRougeL:
    """Pairwise ROUGE-L F of a set of responses (rouge_score ``rougeL``, ``use_stemmer=True``)."""

    def __init__(self):
        from rouge_score import rouge_scorer

        self._scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

    def pair(self, a: str, b: str) -> float:
        if a.strip() == b.strip():
            return 1.0  # equal texts are never diverse, even when rouge's tokenizer sees no words in them
        return float(self._scorer.score(a, b)["rougeL"].fmeasure)  # F is symmetric in (a, b)

    def matrix(self, texts: Sequence[str]) -> list[float]:
        """ROUGE-L F of every pair i < j, in (0,1), (0,2), ..., (n-2,n-1) order."""
        return [self.pair(texts[i], texts[j]) for i in range(len(texts)) for j in range(i + 1, len(texts))]


@dataclasses.dataclass
class Trial:
    """One sampled set: its 0-based index, temperature, texts and pairwise ROUGE-L summary; ``new``: how
    many of its texts this trial sampled (all of them, or the slots it refilled)."""

    index: int
    temperature: float
    texts: list
    max_rouge: float
    mean_rouge: float
    new: int = 0

    def accepted(self, tau: float) -> bool:
        return self.max_rouge < tau


def evaluate_trial(index: int, temperature: float, texts: Sequence[str], sim: PairwiseRougeL,
                   new: int | None = None) -> Trial:
    pairs = sim.matrix(texts)
    return Trial(index, temperature, list(texts), max(pairs), sum(pairs) / len(pairs),
                 len(texts) if new is None else new)


def too_similar(texts: Sequence[str], tau: float, sim: PairwiseRougeL) -> list[int]:
    """The slots ``similar`` mode resamples: in order, each text whose ROUGE-L F with an earlier kept text
    is >= tau (of two near-copies the earlier stays)."""
    kept: list[int] = []
    drop = []
    for j, t in enumerate(texts):
        if any(sim.pair(texts[i], t) >= tau for i in kept):
            drop.append(j)
        else:
            kept.append(j)
    return drop


def choose(trials: Sequence[Trial], tau: float) -> tuple[Trial, bool]:
    """(kept trial, fallback): the accepted trial (only the last can be), else the lowest mean ROUGE-L
    (the earliest on a tie)."""
    if trials[-1].accepted(tau):
        return trials[-1], False
    return min(trials, key=lambda t: (t.mean_rouge, t.index)), True


# ---------------------------------------------------------------------------- items and output
@dataclasses.dataclass
class DiverseItem:
    id: Any
    instruction: str
    input: str
    output: str | None  # None: the input row had no (non-empty) original response
    where: str


def read_items(path: str, limit: int | None = None) -> list[DiverseItem]:
    """Alpaca-format rows {instruction, input?, output?, id?} (JSON/JSONL/hf:), id defaulting to the row
    number; ids must be unique (they key the resume). Errors name file:line and field."""
    from tuna_jax.data.rows import read_instructions

    items, seen = [], {}
    for t in read_instructions(path, limit):  # validates the fields; output "" when the row has none
        key = json.dumps(t.id)
        if key in seen:
            raise InputError(t.where, "id", f"id {t.id!r} also on {seen[key]}: ids must be unique (resume uses "
                             f"them)", reason="duplicate_id")
        seen[key] = t.where
        items.append(DiverseItem(t.id, t.instruction, t.input, t.output if t.output != "" else None, t.where))
    return items


def make_record(item: DiverseItem, kept: Trial, trials: Sequence[Trial], fallback: bool, mode: str) -> dict:
    rec: dict[str, Any] = {"id": item.id, "instruction": item.instruction, "input": item.input}
    if item.output is not None:
        rec["output"] = item.output
    rec["candidates"] = list(kept.texts)
    rec["diversity"] = {"mode": mode, "trials": len(trials), "resampled": sum(t.new for t in trials[1:]),
                        "temperature": kept.temperature, "kept_trial": kept.index + 1,
                        "max_pairwise_rougeL": kept.max_rouge, "mean_pairwise_rougeL": kept.mean_rouge,
                        "fallback": fallback}
    return rec


def rng_id(item_id: Any, trial: int) -> int:
    """The sampler stream of (item, 0-based trial): 31 bits of sha256, stable across runs and machines."""
    h = hashlib.sha256(f"{json.dumps(item_id)}\x00{trial}".encode("utf-8")).digest()
    return int.from_bytes(h[:4], "big") & 0x7FFFFFFF


def _sample(sample_fn: SampleFn, items: Sequence[DiverseItem], n: int, temp: float, trial: int) -> list[list[str]]:
    """``n`` texts for each of ``items`` at ``temp`` (trial ``trial``'s random streams), checked."""
    from tuna_jax.data.templates import format_prompt

    prompts = [format_prompt(it.instruction, it.input) for it in items]
    texts = sample_fn(prompts, n, temp, [rng_id(it.id, trial) for it in items])
    if len(texts) != len(items) or any(len(x) != n for x in texts):
        raise RuntimeError(f"sample_fn returned {[len(x) for x in texts]} samples for {len(items)} prompts x n={n}")
    for it, got in zip(items, texts):
        if any(not isinstance(s, str) for s in got):
            raise RuntimeError(f"sample_fn returned a non-text sample for item {it.id!r}")
    return texts


def diversify(items: Sequence[DiverseItem], sample_fn: SampleFn, cfg: DiverseSettings,
              sim: PairwiseRougeL | None = None) -> list[dict]:
    """The procedure for a group of items (sampled together: one call per trial, and in ``similar`` mode one
    per number of slots to refill): records in item order."""
    sim = sim or PairwiseRougeL()
    trials: list[list[Trial]] = [[] for _ in items]
    pending = list(range(len(items)))
    for t in range(cfg.max_trials):
        if not pending:
            break
        temp = cfg.temperature_of(t)
        if t == 0 or cfg.mode == "set":
            for i, got in zip(pending, _sample(sample_fn, [items[i] for i in pending], cfg.n, temp, t)):
                trials[i].append(evaluate_trial(t, temp, got, sim))
        else:  # similar: refill only the slots of the too-similar responses, grouped by how many
            drop = {i: too_similar(trials[i][-1].texts, cfg.tau, sim) for i in pending}
            for k in sorted({len(d) for d in drop.values()}):
                group = [i for i in pending if len(drop[i]) == k]
                for i, got in zip(group, _sample(sample_fn, [items[i] for i in group], k, temp, t)):
                    texts = list(trials[i][-1].texts)
                    for slot, text in zip(drop[i], got):
                        texts[slot] = text
                    trials[i].append(evaluate_trial(t, temp, texts, sim, new=k))
        pending = [i for i in pending if not trials[i][-1].accepted(cfg.tau)]
    out = []
    for item, tr in zip(items, trials):
        kept, fallback = choose(tr, cfg.tau)
        out.append(make_record(item, kept, tr, fallback, cfg.mode))
    return out


@dataclasses.dataclass
class DiverseReport:
    """Counts over the records of OUT (all runs): items; accepted_at[k] items accepted at trial k+1;
    attempted[k] items that reached trial k+1; retries (further trials = sum of trials - 1); resampled
    (responses sampled in those trials: whole sets in ``set`` mode, the too-similar ones in ``similar``);
    fallbacks; empty_candidates."""

    items: int = 0
    accepted_at: list = dataclasses.field(default_factory=list)
    attempted: list = dataclasses.field(default_factory=list)
    retries: int = 0
    resampled: int = 0
    fallbacks: int = 0
    empty_candidates: int = 0

    @classmethod
    def from_records(cls, records: Sequence[dict], max_trials: int) -> "DiverseReport":
        r = cls(accepted_at=[0] * max_trials, attempted=[0] * max_trials)
        for rec in records:
            d = rec["diversity"]
            r.items += 1
            r.retries += d["trials"] - 1
            r.resampled += d["resampled"]
            for k in range(d["trials"]):
                r.attempted[k] += 1
            if d["fallback"]:
                r.fallbacks += 1
            else:
                r.accepted_at[d["trials"] - 1] += 1
            r.empty_candidates += sum(1 for c in rec["candidates"] if not c.strip())
        return r

    def line(self) -> str:
        per = ", ".join(f"trial {k + 1}: {a}/{n} accepted"
                        for k, (a, n) in enumerate(zip(self.accepted_at, self.attempted)))
        return (f"items: {self.items}, retries: {self.retries} ({self.resampled} responses resampled), fallbacks "
                f"(least similar set kept): {self.fallbacks}, empty candidates: {self.empty_candidates} | {per}")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    __str__ = line


# ---------------------------------------------------------------------------- resume
def _read_done(out_path: str, items: Sequence[DiverseItem]) -> dict[str, dict]:
    """Records already in OUT by json id; cuts a torn last line; a record of another input is an error."""
    done: dict[str, dict] = {}
    known = {json.dumps(it.id) for it in items}
    for where, rec in read_out_lines(out_path, logger=logger):
        if not isinstance(rec, dict) or "id" not in rec or not isinstance(rec.get("diversity"), dict):
            raise InputError(f"{where}: not an output record of `tuna-jax sample-diverse` (cannot resume)")
        key = json.dumps(rec["id"])
        if key not in known:
            raise InputError(f"{where}: id {rec['id']!r} is not in the input; OUT belongs to another input")
        done[key] = rec
    return done


def sample_diverse_file(input_path: str, out_path: str, sample_fn: SampleFn, cfg: DiverseSettings = DiverseSettings(),
                        *, settings: dict | None = None, items_per_call: int = 16, limit: int | None = None,
                        progress: bool = True, check_prompt: Callable[[str, str], None] | None = None,
                        items: list[DiverseItem] | None = None, lock: bool = True) -> DiverseReport:
    """Run the procedure for every instruction of ``input_path`` not yet in ``out_path`` and append the
    records (flushed and fsynced per group of ``items_per_call`` items). ``settings``: what else defines the
    samples (model, seed, max_new_tokens ...), recorded in OUT.params.json with ``cfg``. ``check_prompt(prompt,
    where)``: raises ValueError for a prompt the model cannot take; every prompt is checked before anything
    is sampled, so a bad line fails at once with its file:line. Returns the report over every record of OUT
    (this run and earlier ones)."""
    from tqdm import tqdm

    items = read_items(input_path, limit) if items is None else items
    if check_prompt is not None:
        from tuna_jax.data.templates import format_prompt

        for it in items:
            try:
                check_prompt(format_prompt(it.instruction, it.input), it.where)
            except ValueError as e:
                raise InputError(str(e)) from None
    # One run per OUT: a second one would sample and append the same instructions again. ``lock=False``
    # on the processes of a multi-host run other than the first (they share OUT on a shared filesystem).
    with OutputLock(out_path) if lock else contextlib.nullcontext():
        procedure = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(DiverseSettings)}  # cfg may be a Config
        check_settings(out_path, {**procedure, **(settings or {})})
        done = _read_done(out_path, items)
        todo = [it for it in items if json.dumps(it.id) not in done]
        if done:
            print(f"resuming: {len(done)} of {len(items)} instructions already in {out_path}", file=sys.stderr)
        sim = PairwiseRougeL()
        group = max(1, items_per_call)
        new: dict[str, dict] = {}
        with open(out_path, "a", encoding="utf-8") as f, tqdm(total=len(items), initial=len(done),
                                                            desc="sample-diverse", unit="ex", file=sys.stderr,
                                                            disable=not progress) as bar:
            for s in range(0, len(todo), group):
                part = todo[s:s + group]
                for rec in diversify(part, sample_fn, cfg, sim):
                    f.write(dumps(rec) + "\n")
                    new[json.dumps(rec["id"])] = rec
                f.flush()
                os.fsync(f.fileno())
                bar.update(len(part))
                recs = [*done.values(), *new.values()]
                bar.set_postfix(retries=sum(r["diversity"]["trials"] - 1 for r in recs),
                                fallbacks=sum(r["diversity"]["fallback"] for r in recs))
    all_records = [done.get(json.dumps(it.id)) or new[json.dumps(it.id)] for it in items]
    return DiverseReport.from_records(all_records, cfg.max_trials)


# ---------------------------------------------------------------------------- the real sampler
def sampler_fn(sampler, max_new_tokens: int = 256, top_p: float = 1.0, top_k: int = 0, seed: int = 0) -> SampleFn:
    """A :data:`SampleFn` over ``tuna_jax.generate.Sampler`` (which needs a tokenizer for text)."""
    from tuna_jax.generate import SamplingParams

    if not sampler.gives_text:
        raise ValueError("diverse sampling needs the model's tokenizer (texts are compared and judged)")

    def sample(prompts: Sequence[str], n: int, temperature: float, rng_ids: Sequence[int]) -> list[list[str]]:
        params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
                                seed=seed)
        out = sampler.generate(list(prompts), params, n=n, rng_ids=list(rng_ids))
        return [[s.text for s in row] for row in out]

    return sample


def run_diverse(model_path: str, input_path: str, out_path: str, cfg: DiverseSettings = DiverseSettings(), *,
                tokenizer: str | None = None, max_new_tokens: int = 256, top_p: float = 1.0, top_k: int = 0,
                seed: int = 0, batch_size: int = 8, max_prompt_len: int | None = None,
                items_per_call: int | None = None, mesh=None, dtype: str = "float32", limit: int | None = None,
                progress: bool = True, sampler=None) -> DiverseReport:
    """Load ``model_path`` (HF folder or params checkpoint) and its tokenizer (or ``tokenizer``), run the
    procedure over ``input_path`` into ``out_path`` (resuming), write OUT.report.json; returns the report
    (``str(report)`` is its one-line summary). mesh: None = one device. ``sampler``: a ``serving.ServedSampler``
    that samples instead (nothing is loaded; tokenizer, batch_size, max_prompt_len, mesh and dtype do not apply)."""
    from tuna_jax.generate import SamplingParams

    SamplingParams(temperature=cfg.temperature_of(cfg.max_trials - 1), top_p=top_p, top_k=top_k,
                   max_new_tokens=max_new_tokens, seed=seed)  # validate before loading anything
    items = read_items(input_path, limit)  # the input too: a bad line fails in a second, not after the model
    if sampler is None:
        sampler = _local_sampler(model_path, tokenizer, mesh, dtype, batch_size, max_prompt_len)
    fn = sampler_fn(sampler, max_new_tokens=max_new_tokens, top_p=top_p, top_k=top_k, seed=seed)
    settings = {"model": str(model_path), "top_p": top_p, "top_k": top_k, "max_new_tokens": max_new_tokens,
                "seed": seed, **sampler.settings()}

    def check_prompt(prompt: str, where: str) -> None:
        sampler.check_length(len(sampler.encode(prompt, where)), max_new_tokens, where)

    main = jax_main_process()
    report = sample_diverse_file(input_path, out_path, fn, cfg, settings=settings,
                                 items_per_call=items_per_call or max(1, (4 * sampler.batch_size) // cfg.n),
                                 limit=limit, progress=progress and main, check_prompt=check_prompt, items=items,
                                 lock=main)
    if main:
        write_json(out_path + ".report.json", report.to_json(), indent=1)
    return report


def _local_sampler(model_path: str, tokenizer: str | None, mesh, dtype: str, batch_size: int,
                   max_prompt_len: int | None):
    """``generate.Sampler`` over the model at ``model_path`` and its tokenizer (or ``tokenizer``)."""
    from tuna_jax.data.templates import load_tokenizer
    from tuna_jax.generate import Sampler
    from tuna_jax.model import load_model

    tok = load_tokenizer(tokenizer or model_path)
    model = load_model(model_path, mesh, dtype=dtype, param_dtype="float32")
    if tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"tokenizer {tok.name} has {tok.vocab_size} tokens but the model's vocabulary "
                         f"is {model.cfg.vocab_size}: they do not belong together")
    return Sampler(model, tok, mesh=mesh, batch_size=batch_size, max_prompt_len=max_prompt_len)


def jax_main_process() -> bool:
    import jax

    return jax.process_index() == 0

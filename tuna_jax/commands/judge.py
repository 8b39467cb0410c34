"""Contextual ranking data (Tuna_c): rank each record's candidate responses with an LLM judge (the Tuna contextual
ranking prompt, strict parsing, optional shuffled orders aggregated by Borda count) or with a metric against a
reference answer, and write ranking records (JSONL, best first). LLM requests are cached in an append-only store:
rerunning the same command repeats nothing finished."""
from __future__ import annotations

import dataclasses
import sys

from tuna_jax.commands.shared import ENDPOINT, Budget, Endpoint, Progress, endpoint_session
from tuna_jax.feedback.judge import JUDGE, JudgeSettings
from tuna_jax.io.fields import arg, pos

HELP = "contextual ranking by a judge LLM (or an offline metric judge)"


@dataclasses.dataclass(kw_only=True)
class Config(JudgeSettings, Endpoint, Budget, Progress):
    input: str = pos("JSON/JSONL records {id?, instruction, input?, output?, candidates: [str]}")
    out: str = pos("output JSONL of ranking records (failures go to OUT.failed.jsonl)")
    model: str | None = arg(None, "model name as the server knows it (required for --kind llm)", group=ENDPOINT)
    limit: int | None = arg(None, "only the first LIMIT records", group=JUDGE)


def run(cfg: Config) -> int:
    """0 done, 1 some records failed (see OUT.failed.jsonl), 2 stopped (budget or a fatal endpoint error; rerun to
    continue)."""
    from tuna_jax.data.rows import read_candidates
    from tuna_jax.feedback.judge import LLMJudge, MetricJudge, run_judge
    from tuna_jax.io.cli import report_run

    progress = not cfg.no_progress
    if cfg.judge == "llm" and not cfg.model:
        raise ValueError("--model is required with --kind llm (the judge endpoint's model name)")
    items = read_candidates(cfg.input, cfg.reference_field, cfg.limit)  # before any store or request
    if cfg.judge == "metric":
        summary = run_judge(cfg.input, cfg.out, MetricJudge(cfg), concurrency=1, items=items, progress=progress)
        print(f"judge: {summary.line()}", file=sys.stderr)
        if summary.failed:
            print(f"judge: {summary.failed} record(s) failed, listed in {summary.failed_path}", file=sys.stderr)
        return 1 if summary.failed else 0
    with endpoint_session(cfg, cfg.out) as (client, store):
        judge = LLMJudge(client, cfg)
        return report_run("judge", lambda: run_judge(cfg.input, cfg.out, judge, concurrency=cfg.concurrency,
                                                     items=items, progress=progress),
                          store, "record(s) failed, listed with the judge's replies in")

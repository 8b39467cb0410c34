"""The paper's data tables from the files a run made: the length of the responses at each rank of each ranking source
(Table 4: do rankers prefer longer answers?), the API cost of each stage that called a paid endpoint (Table 6), read
from its request store, and the token-level log-likelihood of a dataset's responses under each model (Table 5, the
beta study on LIMA). `tuna-jax eval rankings NAME=FILE ...` and `tuna-jax eval costs NAME=STORE ...`; the
pipeline's `table_4` / `table_6` / `table_5` stages. Each table is Markdown and JSON, every number with its n.

What is counted, and the units: docs/evaluation.md#data-tables.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from tuna_jax.io.errors import InputError


@dataclasses.dataclass
class Source:
    """One row of a table: its label and its file (ranking records, or a request store)."""

    name: str
    path: str


def parse_sources(items: Sequence[str]) -> list[Source]:
    """``NAME=PATH`` arguments (a bare PATH is named by itself)."""
    out = []
    for item in items:
        name, eq, path = item.partition("=")
        out.append(Source(name, path) if eq else Source(item, item))
    return out


def ranking_lengths(sources: Sequence[Source], tokenizer=None) -> dict:
    """Table 4: for each source, the mean length of its rank-k responses (k = 1 best, by the record's scores or
    ranks; ties keep file order), in words (whitespace) and, with a ``data.templates.Tokenizer``, in tokens; ``n`` at
    each rank is the number of records with a k-th one. Records are read as training reads them (``read_records``):
    any ranking format, errors naming FILE:LINE."""
    from tuna_jax.data.records import read_records

    rows = []
    for src in sources:
        words: list[list[int]] = []
        tokens: list[list[int]] = []
        records, _ = read_records(src.path, kind="ranking")
        if not records:
            raise InputError(f"{src.path}: no ranking records")
        for rec in records:
            order = sorted(range(len(rec.candidates)), key=lambda k: -rec.scores[k])
            for k, i in enumerate(order):
                while len(words) <= k:
                    words.append([])
                    tokens.append([])
                words[k].append(len(rec.candidates[i].split()))
                if tokenizer is not None:
                    tokens[k].append(len(tokenizer.encode(rec.candidates[i])))
        row = {"name": src.name, "path": src.path, "records": len(records), "n": [len(w) for w in words],
               "words": [sum(w) / len(w) for w in words]}
        if tokenizer is not None:
            row["tokens"] = [sum(t) / len(t) for t in tokens]
        rows.append(row)
    return {"table": "ranking lengths", "unit": "tokens" if tokenizer is not None else "words", "rows": rows}


def api_costs(sources: Sequence[Source], price_input: float | None = None, price_output: float | None = None) -> dict:
    """Table 6: for each request store, by the store's own accounting (``llm_api.store.Store``, as its budget and
    summary count): the HTTP requests it sent, retries included; its distinct requests by their last status
    (answered, unusable, failed); the prompt and completion tokens of the replies; the USD recorded when they were
    made and, with prices (USD per 1M tokens), the USD at those prices."""
    from tuna_jax.io import paths
    from tuna_jax.llm_api.store import Store

    rows = []
    for src in sources:
        if not paths.is_file(src.path):  # Store would make an empty one
            raise InputError(f"{src.path}: no such request store")
        with Store(src.path) as store:
            row = {"name": src.name, "path": src.path, "requests": store.total_requests, **store.statuses(),
                   "prompt_tokens": store.total_prompt_tokens, "completion_tokens": store.total_completion_tokens,
                   "usd_recorded": store.total_cost_usd}
        if price_input is not None or price_output is not None:
            row["usd_at_prices"] = (row["prompt_tokens"] * (price_input or 0.0)
                                    + row["completion_tokens"] * (price_output or 0.0)) / 1e6
        rows.append(row)
    return {"table": "api costs", "rows": rows}


def response_rows(path: str) -> list[dict]:
    """The (instruction, input, response) rows of a dataset to score: Alpaca rows ``{instruction, input?, output}`` or
    LIMA rows ``{conversations: [prompt, response, ...]}`` (its first exchange), as ``score`` input lines
    ``{instruction, input, candidates: [response]}``."""
    from tuna_jax.data.records import iter_rows

    out = []
    for where, row in iter_rows(path):
        if isinstance(row, Exception):
            raise row
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected a JSON object")
        if "conversations" in row:
            conv = row["conversations"]
            if not isinstance(conv, list) or len(conv) < 2 or not all(isinstance(t, str) for t in conv[:2]):
                raise InputError(f"{where}: field 'conversations' must start with a prompt and a response")
            ins, inp, out_text = conv[0], "", conv[1]
        else:
            ins, inp, out_text = row.get("instruction"), row.get("input") or "", row.get("output")
            if not isinstance(ins, str) or not isinstance(out_text, str) or not isinstance(inp, str):
                raise InputError(f"{where}: expected {{instruction, input?, output}} or {{conversations}} text")
        if not out_text.strip():
            raise InputError(f"{where}: the response is empty")
        out.append({"instruction": ins, "input": inp, "candidates": [out_text]})
    if not out:
        raise InputError(f"{path}: no rows")
    return out


def likelihood_row(name: str, path: str, scored: Sequence[dict]) -> dict:
    """Table 5's row of one model from its ``score`` output lines: the summed log-probability of every response
    (+ EOS) over their summed tokens (nats per token), and the mean over responses of each one's per-token mean."""
    lp = sum(line["logprob_sum"][0] for line in scored)
    tokens = sum(line["num_tokens"][0] for line in scored)
    per = [line["logprob_sum"][0] / line["num_tokens"][0] for line in scored]
    return {"name": name, "path": path, "responses": len(scored), "tokens": tokens,
            "logprob_per_token": lp / tokens, "mean_of_response_means": sum(per) / len(per)}


def to_markdown(table: dict) -> str:
    """The table in Markdown, each number with its n."""
    rows = table["rows"]
    if table["table"] == "log-likelihood":
        lines = ["| model | responses | tokens | log p per token (nats) | mean of per-response means |",
                 "|---|---|---|---|---|"]
        lines += [f"| {r['name']} | {r['responses']} | {r['tokens']} | {r['logprob_per_token']:.4f} | "
                  f"{r['mean_of_response_means']:.4f} |" for r in rows]
        return "\n".join(lines) + "\n"
    if table["table"] == "ranking lengths":
        unit = table["unit"]
        ranks = max(len(r["n"]) for r in rows)
        head = "| source | records | " + " | ".join(f"rank {k + 1} ({unit})" for k in range(ranks)) + " |"
        lines = [head, "|" + "---|" * (ranks + 2)]
        for r in rows:
            means = r.get("tokens", r["words"])
            cells = [f"{means[k]:.1f} (n={r['n'][k]})" if k < len(means) else "" for k in range(ranks)]
            lines.append(f"| {r['name']} | {r['records']} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"
    priced = any("usd_at_prices" in r for r in rows)
    head = ("| stage | HTTP requests | requests ok / unusable / failed | prompt tokens | completion tokens | "
            "USD recorded |")
    lines = [head + (" USD at the given prices |" if priced else ""),
             "|---|---|---|---|---|---|" + ("---|" if priced else "")]
    for r in rows:
        line = (f"| {r['name']} | {r['requests']} | {r['ok']} / {r['invalid']} / {r['error']} | {r['prompt_tokens']} | "
                f"{r['completion_tokens']} | {r['usd_recorded']:.4f} |")
        lines.append(line + (f" {r.get('usd_at_prices', 0.0):.4f} |" if priced else ""))
    return "\n".join(lines) + "\n"

"""The demo's own stage kinds: its data (``synthetic``) and its evaluation on held-out prompts (``heldout``).

``synthetic`` writes the synthetic instruction tasks of ``tuna_jax/data/synthetic.py``: the "Alpaca" SFT set, the
teacher's larger SFT set (both from the training side of the prompt split), and, from the held-out side,
prompts with their answers (``eval``) and prompts with four candidates of known quality (``ranking``).

``heldout`` evaluates models, one table row each (a row may list one model per seed):

* ROUGE-L (x100, Super-NI's ``rouge_l``) and exact match of greedy answers to the ``eval`` prompts;
* pair accuracy on the ``ranking`` prompts: of the candidate pairs of different quality (correct > near
  miss > wrong > off-topic), the share the model orders right by v = its mean log-prob per response token
  (EOS included): the quantity Tuna's ranking loss trains.

Before evaluating it checks that no evaluation prompt (instruction + input) appears in any file a stage
upstream of it read (the SFT sets, the prompts the teacher and the sampler saw, every ranking file), and
fails if one does. Rows with several models give the mean and the sample standard deviation over them.
``compare: [[method, control], ...]`` puts a method next to its control; the report checks from the stage
manifests that both trained for the same steps on the same files, the control with ``loss.rank_weight=0``,
and says per metric whether the method's mean beat the control's and in how many seeds.
Each model's results are kept in ``STAGE/evals/``, so an interrupted evaluation loses at most one model.
"""
from __future__ import annotations

import dataclasses
import json
import math

from tuna_jax.data import synthetic
from tuna_jax.io import paths
from tuna_jax.pipeline.manifest import read_manifest
from tuna_jax.pipeline.stage import StageFailed, StageRun, dataclass_kind, input_paths

METRICS = (("rougeL", "ROUGE-L"), ("exact_match", "exact match"), ("pair_accuracy", "pair accuracy"))


@dataclasses.dataclass
class SyntheticStage:
    """Row counts of each file and the seed of the first (the others use seed+1, +2, +3)."""

    sft: int = 512
    teacher_sft: int = 2048
    eval: int = 48
    ranking: int = 48
    seed: int = 0


def _write(path: str, rows: list[dict]) -> None:
    paths.write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def _run_synthetic(p: SyntheticStage, stage: StageRun) -> dict:
    _write(stage.out("sft"), synthetic.sft_records(p.sft, p.seed, split="train"))
    _write(stage.out("teacher_sft"), synthetic.sft_records(p.teacher_sft, p.seed + 1, split="train"))
    _write(stage.out("eval"), synthetic.sft_records(p.eval, p.seed + 2, split="heldout", distinct=True))
    _write(stage.out("ranking"), synthetic.ranking_records(p.ranking, p.seed + 3, split="heldout", distinct=True))
    return dataclasses.asdict(p)


@dataclasses.dataclass
class HeldoutStage:
    eval: str
    ranking: str
    models: dict  # row name -> a model path, or a list of them (one per seed)
    compare: list = dataclasses.field(default_factory=list)  # [[method row, control row], ...]
    tokenizer: str | None = None  # default: each model's folder
    max_new_tokens: int = 16
    batch_size: int = 64
    title: str = "Held-out evaluation"


def _rows(path: str) -> list[dict]:
    from tuna_jax.data.rows import iter_objects

    return [row for _, _, row in iter_objects(path)]


def _keys(rows) -> set[str]:
    return {synthetic.prompt_key(r["instruction"], r.get("input") or "") for r in rows
            if isinstance(r, dict) and isinstance(r.get("instruction"), str) and isinstance(r.get("input", ""), str)}


def check_disjoint(p: HeldoutStage, stage: StageRun) -> tuple[list[str], dict]:
    """The data files read upstream, and how often each ranking file's best candidate is the reference
    answer; raises StageFailed if one of them holds an evaluation prompt."""
    from tuna_jax.data.records import iter_rows

    held = _keys(_rows(p.eval)) | _keys(_rows(p.ranking))
    checked, quality = [], {}
    for iid in stage.plan.upstream(stage.instance.id):
        m = read_manifest(stage.plan.stage_dir(iid)) or {}
        for field, path in input_paths(stage.plan.instances[iid].kind, m.get("config") or {}):
            if not path.endswith((".json", ".jsonl")) or not paths.is_file(path) or path in checked:
                continue  # models, tokenizers: not data
            rows = [row for _, row in iter_rows(path)]
            overlap = held & _keys(rows)
            if overlap:
                raise StageFailed(f"{len(overlap)} evaluation prompt(s) appear in {path} (read by stage {iid}, "
                                  f"{field}), e.g. {sorted(overlap)[0]!r}: the evaluation would not be held out")
            checked.append(path)
            ranked = [r for r in rows if isinstance(r, dict) and r.get("candidates") and r.get("scores")
                      and r.get("output")]
            if ranked:
                same = [[" ".join(c.split()) == " ".join(r["output"].split()) for c in r["candidates"]] for r in ranked]
                name = path[len(stage.plan.output_dir) + 1:] if path.startswith(stage.plan.output_dir) else path
                quality[name] = {
                    "prompts": len(ranked), "best_is_reference": sum(x[0] for x in same) / len(same),
                    "candidates_reference": sum(map(sum, same)) / sum(map(len, same))}
    return checked, quality


def evaluate_model(model_path: str, tokenizer_path: str, eval_rows: list[dict], ranking_rows: list[dict],
                   max_new_tokens: int = 16, batch_size: int = 16) -> dict:
    """Greedy answers scored against the references, and the pair accuracy of v on graded candidates."""
    import numpy as np

    from tuna_jax.data.templates import SpecialTokenPolicy, format_prompt, load_tokenizer
    from tuna_jax.eval.superni import exact_match, rouge_l
    from tuna_jax.generate import Sampler, SamplingParams
    from tuna_jax.model import load_model
    from tuna_jax.scoring import Scorer, group_for_line, make_candidate_encoder

    model = load_model(model_path)
    sampler = Sampler(model, load_tokenizer(tokenizer_path), SpecialTokenPolicy(), batch_size=batch_size)
    outs = sampler.generate([format_prompt(r["instruction"], r["input"]) for r in eval_rows],
                            SamplingParams.greedy(max_new_tokens))
    preds = [o[0].text.strip() for o in outs]
    encoder = make_candidate_encoder(tokenizer_path)
    groups = [group_for_line(r, f"ranking:{e}", encoder, model.cfg.vocab_size, model.cfg.max_position_embeddings)
              for e, r in enumerate(ranking_rows)]
    v = [[lp / n for lp, n in g] for g in Scorer(model, batch_groups=batch_size).score(groups)]
    correct = counted = 0
    for e, r in enumerate(ranking_rows):
        s = r["scores"]
        for j in range(len(s)):
            for k in range(len(s)):
                if s[j] > s[k]:
                    counted += 1
                    correct += v[e][j] > v[e][k]
    return {"rougeL": 100 * float(np.mean([rouge_l(p, r["output"]) for p, r in zip(preds, eval_rows)])),
            "exact_match": 100 * float(np.mean([exact_match(p, r["output"]) for p, r in zip(preds, eval_rows)])),
            "pair_accuracy": correct / max(counted, 1), "pairs": counted,
            "examples": [{"prompt": f"{r['instruction']} {r['input']}", "prediction": p, "reference": r["output"]}
                         for p, r in list(zip(preds, eval_rows))[:3]]}


def _made_by(stage: StageRun, model_path: str) -> dict:
    """What the manifest of the stage that wrote ``model_path`` says about it (empty for a path from outside)."""
    made = stage.plan.produced.get(model_path)
    m = read_manifest(stage.plan.stage_dir(made[0])) if made else None
    if not m:
        return {}
    cfg = m.get("config") or {}
    info = {"stage": m["stage"], "kind": m["kind"], "seconds": m.get("total_s")}
    if m["kind"] == "train":
        loss = cfg.get("loss", {})
        info.update(mode=cfg["train"]["mode"], steps=(m.get("metrics") or {}).get("steps"), lr=cfg["optim"]["lr"],
                    rank_weight=loss.get("rank_weight") if cfg["train"]["mode"] == "ranking" else None,
                    seed=cfg["train"]["seed"], loss=((m.get("metrics") or {}).get("train") or {}).get("loss"),
                    data=_targets(cfg),
                    start=(m.get("inputs") or {}).get("model.path", {}).get("path"))
    return info


def _targets(cfg: dict) -> str:
    """A digest of what a training stage learned from besides rankings: its prompts and reference answers, in
    order (a ranking file with reference-model scores attached has the same ones as the file without)."""
    from tuna_jax.data.records import read_records
    from tuna_jax.pipeline.manifest import digest

    sources = cfg["data"]["train"] if isinstance(cfg["data"]["train"], list) else [cfg["data"]["train"]]
    rows = [(r.instruction, r.input, r.output) for s in sources for r in read_records(s, kind=cfg["train"]["mode"])[0]]
    return digest(rows)


def _stats(values: list[float]) -> dict:
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((x - mean) ** 2 for x in values) / (len(values) - 1)) if len(values) > 1 else None
    return {"mean": mean, "sd": sd, "values": values}


def _run_heldout(p: HeldoutStage, stage: StageRun) -> dict:
    checked, quality = check_disjoint(p, stage)
    eval_rows, ranking_rows = _rows(p.eval), _rows(p.ranking)
    table, made = {}, {}
    for name, models in p.models.items():
        results = []
        for i, path in enumerate(models if isinstance(models, list) else [models]):
            cache = paths.join(stage.dir, "evals", f"{name}-{i}.json")
            if paths.is_file(cache):
                results.append(json.loads(paths.read_text(cache)))
                continue
            r = evaluate_model(path, p.tokenizer or path, eval_rows, ranking_rows, p.max_new_tokens, p.batch_size)
            paths.write_atomic(cache, json.dumps(r, indent=1))
            stage.say(f"{name} [{i}]: ROUGE-L {r['rougeL']:.1f}, exact match {r['exact_match']:.1f}, "
                      f"pair accuracy {r['pair_accuracy']:.3f}")
            results.append(r)
        table[name] = {m: _stats([r[m] for r in results]) for m, _ in METRICS}
        table[name]["examples"] = results[0]["examples"]
        made[name] = [_made_by(stage, path) for path in (models if isinstance(models, list) else [models])]
    comparisons = [_compare(table, made, method, control) for method, control in p.compare]
    upstream_s = sum((read_manifest(stage.plan.stage_dir(i)) or {}).get("total_s") or 0.0
                     for i in stage.plan.upstream(stage.instance.id))
    report = {"title": p.title, "table": table, "made_by": made, "comparisons": comparisons,
              "max_new_tokens": p.max_new_tokens,
              "n": {"eval": len(eval_rows), "ranking": len(ranking_rows), "pairs": results[-1]["pairs"]},
              "checked_disjoint_from": checked, "ranking_data": quality, "upstream_seconds": round(upstream_s, 1)}
    paths.write_atomic(stage.out("report"), json.dumps(report, indent=1) + "\n")
    paths.write_atomic(stage.out("markdown"), markdown(report))
    return {"table": {n: {m: t[m]["mean"] for m, _ in METRICS} for n, t in table.items()},
            "comparisons": comparisons}


def _compare(table: dict, made: dict, method: str, control: str) -> dict:
    """Per metric: the difference of means and the seeds the method won; and whether the two rows trained
    alike (same steps, same data files, control without the ranking term)."""
    a, b = made.get(method) or [], made.get(control) or []
    alike = (len(a) == len(b) and all(x.get("steps") == y.get("steps") and x.get("data") == y.get("data")
                                       and y.get("rank_weight") == 0 and (x.get("rank_weight") or 0) > 0
                                       for x, y in zip(a, b)))
    out = {"method": method, "control": control, "same_steps_and_data": alike, "metrics": {}}
    for m, _ in METRICS:
        va, vb = table[method][m]["values"], table[control][m]["values"]
        # Rounded so that float noise (a mean of equal exact-match rates) is neither a win nor a loss.
        out["metrics"][m] = {"difference": round(sum(va) / len(va) - sum(vb) / len(vb), 9) + 0.0,
                             "method_won": sum(round(x - y, 9) > 0 for x, y in zip(va, vb)),
                             "seeds": min(len(va), len(vb))}
    return out


def _cell(s: dict, scale: str) -> str:
    if s["sd"] is None:
        return f"{s['mean']:{scale}}"
    return f"{s['mean']:{scale}} ± {s['sd']:{scale}}"


def markdown(report: dict) -> str:
    """report.md: the table, what it measures, and in plain words what this run found."""
    table, n = report["table"], report["n"]
    seeds = max(len(t["rougeL"]["values"]) for t in table.values())
    lines = [f"# {report['title']}", "",
             "| model | seeds | ROUGE-L | exact match | pair accuracy | steps | rank weight |",
             "|---|---|---|---|---|---|---|"]
    for name, t in table.items():
        info = (report["made_by"].get(name) or [{}])[0]
        lines.append(f"| {name} | {len(t['rougeL']['values'])} | {_cell(t['rougeL'], '.1f')} | "
                     f"{_cell(t['exact_match'], '.1f')} | {_cell(t['pair_accuracy'], '.3f')} | "
                     f"{info.get('steps', '')} | {'' if info.get('rank_weight') is None else info['rank_weight']} |")
    spread = (f"mean ± sample standard deviation over {seeds} seeds (a row's seed is its training stages' "
              f"train.seed, the order they see the data in, and the sampling seed of any stage that samples for "
              f"them)" if seeds > 1 else "one seed")
    lines += ["", f"Numbers: {spread}.", "",
              "## What is measured", "",
              f"- **ROUGE-L** (x100, Super-NI's) and **exact match** of the greedy answer (up to "
              f"{report['max_new_tokens']} tokens) to "
              f"n={n['eval']} held-out prompts of the four synthetic tasks (repeat a word three times, the next "
              f"number, reverse three words, name the first word), against the reference answer.",
              f"- **pair accuracy**: on n={n['ranking']} other held-out prompts, each with four candidates of known "
              f"quality (correct > near miss > wrong > off-topic; {n['pairs']} ordered pairs), the share of pairs "
              f"the model orders right by v = its mean log-prob per response token, the score Tuna's ranking loss "
              f"trains.",
              f"- **Held out**: no evaluation prompt (instruction + input) appears in any of the "
              f"{len(report['checked_disjoint_from'])} files the stages before the evaluation read (checked in "
              f"code before evaluating; the tasks with few inputs hold some inputs out entirely).",
              "- Each method row stands next to a **control** trained for the same steps, on the same files (the "
              "same instructions and reference answers), with `loss.rank_weight=0`: MLE on the reference answer "
              "only, no ranking term. Tuna_p's control starts from Alpaca as Tuna_p does; Tuna's control starts "
              "from Tuna_p's control (Tuna from Tuna_p), so that row compares two ranking stages with none.", "",
              "## The ranking data", ""]
    for path, q in report["ranking_data"].items():
        lines.append(f"- `{path}` ({q['prompts']} prompts): the best-ranked candidate is the reference answer for "
                     f"{100 * q['best_is_reference']:.0f}% of the prompts; {100 * q['candidates_reference']:.0f}% of "
                     f"all candidates are the reference answer.")
    lines += ["", "## What this run found", ""]
    for c in report["comparisons"]:
        won = [label for m, label in METRICS if c["metrics"][m]["difference"] > 0]
        lost = [label for m, label in METRICS if c["metrics"][m]["difference"] <= 0]  # a tie is not a win
        parts = [f"{label} {c['metrics'][m]['difference']:+.3g} (better in {c['metrics'][m]['method_won']} of "
                 f"{c['metrics'][m]['seeds']} seeds)" for m, label in METRICS]
        verdict = ("ranking beat the control on every metric" if not lost else
                   "ranking did not beat the control on any metric" if not won else
                   f"mixed: ranking beat the control on {' and '.join(won)}, not on {' and '.join(lost)}")
        fair = ("" if c["same_steps_and_data"] else " NOTE: the manifests do not show the same steps and data for "
                "the two rows, or the control has a ranking term: this pair is not a fair comparison.")
        lines.append(f"- **{c['method']}** vs its control **{c['control']}**: {verdict} in this run. Differences "
                     f"of the means: " + "; ".join(parts) + "." + fair)
    lines += ["", "With this few seeds and prompts, a difference smaller than the spread is noise: read the table, "
              "not the verdict, before concluding anything.", "",
              f"Stages before the evaluation took {report['upstream_seconds']:.0f} s in all (summed over every run "
              f"that made them; `pipeline.json` has every stage).", ""]
    example = next(iter(table.values()))["examples"][:2]
    lines += ["Example greedy answers of the first row:"] + [
        f"- {e['prompt']!r} -> {e['prediction']!r} (reference {e['reference']!r})" for e in example]
    return "\n".join(lines) + "\n"


KINDS = (
    dataclass_kind("synthetic", "the demo's synthetic tasks: SFT sets and held-out evaluation sets", SyntheticStage,
                   {"sft": "sft.jsonl", "teacher_sft": "teacher_sft.jsonl", "eval": "eval.jsonl",
                    "ranking": "ranking.jsonl"}, _run_synthetic),
    dataclass_kind("heldout", "the demo's evaluation: held-out prompts, every row next to its control",
                   HeldoutStage, {"report": "report.json", "markdown": "report.md"}, _run_heldout,
                   input_fields=("eval", "ranking", "models", "tokenizer"),
                   resumes="keeps every model already evaluated"),
)

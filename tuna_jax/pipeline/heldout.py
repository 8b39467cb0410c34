"""The demo's own stage kinds: its data (``synthetic``), its "Alpaca" answers (``answers``), its contextual judge
(``rubric-judge``) and its evaluation on held-out prompts (``heldout``).

``synthetic`` writes the synthetic tasks of ``tuna_jax/data/synthetic.py``: the "Alpaca" instructions (no answer),
the teacher's SFT set with correct answers (both from the training side of the prompt split), and, from the
held-out side, prompts with their correct answers (``eval``) and prompts with four graded candidates (``ranking``).
``answers`` samples one answer per instruction from a model (the teacher): the demo's Alpaca data, whose answers
are teacher samples as Alpaca's are text-davinci-003's. ``rubric-judge`` ranks sampled candidates by the tasks'
own rules (``synthetic.grade``), without any reference answer.

``heldout`` evaluates models, one table row each (a row may list one model per seed):

* exact match and ROUGE-L (x100, Super-NI's) of greedy answers to the ``eval`` prompts, against correct answers;
* pair accuracy on the ``ranking`` prompts: of the candidate pairs of different grade, the share the model orders
  right by v = its mean log-prob per response token (EOS included): the quantity Tuna's ranking loss trains.

Before evaluating it checks that no evaluation prompt appears in any file a stage upstream of it read, and fails
if one does; it grades every ranking file it finds there (how often a candidate beats Alpaca's answer r, how often
the file's scores order two candidates as their grades do). ``compare: [[method, control], ...]`` puts a method
next to a control and says, from the stage manifests, whether both started from the same model, trained the same
steps on the same data, and whether the control is MLE only; per metric, whether the method's mean beat the
control's and in how many seeds. Each model's results are kept in ``STAGE/evals/``, so an interrupted evaluation
loses at most one model.
"""
from __future__ import annotations

import dataclasses
import json
import math

from tuna_jax.data import synthetic
from tuna_jax.io import paths
from tuna_jax.pipeline.manifest import read_manifest
from tuna_jax.pipeline.stage import StageFailed, StageRun, dataclass_kind, input_paths

METRICS = (("exact_match", "exact match"), ("rougeL", "ROUGE-L"), ("pair_accuracy", "pair accuracy"))


@dataclasses.dataclass
class SyntheticStage:
    """Row counts of each file and the seed of the first (the others use seed+1, +2, +3). ``sft`` rows are
    instructions only: their answers come from the teacher (kind ``answers``), never from the task."""

    sft: int = 512
    teacher_sft: int = 2048
    eval: int = 48
    ranking: int = 48
    seed: int = 0


def _write(path: str, rows: list[dict]) -> None:
    paths.write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def _run_synthetic(p: SyntheticStage, stage: StageRun) -> dict:
    instructions = [{k: r[k] for k in ("id", "instruction", "input")}
                    for r in synthetic.sft_records(p.sft, p.seed, split="train")]
    _write(stage.out("sft"), instructions)
    _write(stage.out("teacher_sft"), synthetic.sft_records(p.teacher_sft, p.seed + 1, split="train"))
    _write(stage.out("eval"), synthetic.sft_records(p.eval, p.seed + 2, split="heldout", distinct=True))
    _write(stage.out("ranking"), synthetic.ranking_records(p.ranking, p.seed + 3, split="heldout", distinct=True))
    return dataclasses.asdict(p)


@dataclasses.dataclass
class AnswersStage:
    """One answer per instruction of ``input``, sampled from ``model``; an empty answer is drawn again (3 tries)."""

    model: str
    input: str
    tokenizer: str | None = None  # default: the model's folder
    temperature: float = 1.0
    max_new_tokens: int = 24
    seed: int = 0
    batch_size: int = 64


def _run_answers(p: AnswersStage, stage: StageRun) -> dict:
    from tuna_jax.data.templates import SpecialTokenPolicy, format_prompt, load_tokenizer
    from tuna_jax.generate import Sampler, SamplingParams
    from tuna_jax.model import load_model

    rows = _rows(p.input)
    sampler = Sampler(load_model(p.model), load_tokenizer(p.tokenizer or p.model), SpecialTokenPolicy(),
                      batch_size=p.batch_size)
    params = SamplingParams(temperature=p.temperature, max_new_tokens=p.max_new_tokens, seed=p.seed)
    answers: list[str | None] = [None] * len(rows)
    redrawn = 0
    for attempt in range(4):  # the random stream of try t of row i is t * len(rows) + i: a redraw is a new sample
        todo = [i for i, a in enumerate(answers) if not a]
        if not todo:
            break
        redrawn += len(todo) if attempt else 0
        outs = sampler.generate([format_prompt(rows[i]["instruction"], rows[i].get("input") or "") for i in todo],
                                params, rng_ids=[attempt * len(rows) + i for i in todo])
        for i, out in zip(todo, outs):
            answers[i] = out[0].text.strip()
    if not all(answers):
        raise StageFailed(f"{answers.count('')} instruction(s) of {p.input} got an empty answer 4 times from "
                          f"{p.model}: a model that answers nothing cannot make SFT data")
    _write(stage.out("data"), [{**r, "output": a} for r, a in zip(rows, answers)])
    return {"rows": len(rows), "redrawn": redrawn}


@dataclasses.dataclass
class RubricJudgeStage:
    """Candidates of ``input`` (sample-diverse records) graded by their task's rules, best first."""

    input: str


def _run_rubric_judge(p: RubricJudgeStage, stage: StageRun) -> dict:
    from tuna_jax.data.rows import iter_objects

    out, informative = [], 0
    for _, where, r in iter_objects(p.input):
        try:
            grades = [float(synthetic.grade(r["instruction"], r.get("input") or "", c)) for c in r["candidates"]]
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise StageFailed(f"{where}: the rubric judge grades the demo's synthetic tasks' candidates only: "
                              f"{e!r}") from None
        order = sorted(range(len(grades)), key=lambda j: -grades[j])  # stable: equal grades keep their order
        out.append({k: r[k] for k in ("id", "instruction", "input", "output") if k in r}
                   | {"candidates": [r["candidates"][j] for j in order], "scores": [grades[j] for j in order],
                      "judge": "rubric"})
        informative += len(set(grades)) > 1
    _write(stage.out("data"), out)
    return {"records": len(out), "with_two_grades_or_more": informative}


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
    """The data files read upstream, and the shape of each ranking file among them (``ranking_shape``); raises
    StageFailed if one of them holds an evaluation prompt."""
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
            shape = ranking_shape(rows)
            if shape:
                inside = path.startswith(stage.plan.output_dir)
                quality[path[len(stage.plan.output_dir) + 1:] if inside else path] = shape
    return checked, quality


def _pair_counts(groups) -> tuple[int, int, int]:
    """Over ``(truth, scores)`` lists of equal length: the pairs (j, k) with truth[j] > truth[k], how many of them
    the scores order the same way (scores[j] > scores[k]), and how many they tie."""
    pairs = agree = tied = 0
    for truth, scores in groups:
        for j in range(len(truth)):
            for k in range(len(truth)):
                if truth[j] > truth[k]:
                    pairs += 1
                    agree += scores[j] > scores[k]
                    tied += scores[j] == scores[k]
    return pairs, agree, tied


def ranking_shape(rows: list) -> dict | None:
    """What a ranking file holds, graded by the tasks' rules (None for a file of no ranking records; only the
    count for records that are not synthetic tasks). Shares of prompts: candidates of at least two texts / two
    grades, some candidate graded above (below) Alpaca's answer r, r correct; of candidates: correct. Of the
    candidate pairs of different grade: the share the file's scores order as the grades do, and the share they
    tie."""
    ranked = [r for r in rows if isinstance(r, dict) and r.get("candidates") and r.get("scores")]
    if not ranked:
        return None
    try:
        graded = [([synthetic.grade(r["instruction"], r.get("input") or "", c) for c in r["candidates"]],
                   synthetic.grade(r["instruction"], r.get("input") or "", r.get("output") or ""), r)
                  for r in ranked]
    except (ValueError, KeyError, TypeError):
        return {"prompts": len(ranked)}
    pairs, agree, tied = _pair_counts((g, r["scores"]) for g, _, r in graded)
    n = len(graded)
    return {"prompts": n,
            "two_texts": sum(len({" ".join(c.split()) for c in r["candidates"]}) > 1 for _, _, r in graded) / n,
            "two_grades": sum(len(set(g)) > 1 for g, _, _ in graded) / n,
            "some_above_r": sum(max(g) > gr for g, gr, _ in graded) / n,
            "some_below_r": sum(min(g) < gr for g, gr, _ in graded) / n,
            "r_correct": sum(gr == 3 for _, gr, _ in graded) / n,
            "candidates_correct": sum(x == 3 for g, _, _ in graded for x in g) / sum(len(g) for g, _, _ in graded),
            "pairs": pairs, "pairs_agree": agree / max(pairs, 1), "pairs_tied": tied / max(pairs, 1)}


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
    counted, correct, _ = _pair_counts((r["scores"], v[e]) for e, r in enumerate(ranking_rows))
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
                    mle_target=loss.get("mle_target") if cfg["train"]["mode"] == "ranking" else None,
                    seed=cfg["train"]["seed"], loss=((m.get("metrics") or {}).get("train") or {}).get("loss"),
                    data=_targets(cfg),
                    start=(m.get("inputs") or {}).get("model.path", {}).get("path"))
    return info


def _targets(cfg: dict) -> str:
    """A digest of the texts a training stage learned from: its prompts, answers and candidates, in order (not
    their scores: a ranking file with reference-model scores attached has the same texts as the file without)."""
    from tuna_jax.data.records import read_records
    from tuna_jax.pipeline.manifest import digest

    sources = cfg["data"]["train"] if isinstance(cfg["data"]["train"], list) else [cfg["data"]["train"]]
    rows = [(r.instruction, r.input, r.output, list(getattr(r, "candidates", ())))
            for s in sources for r in read_records(s, kind=cfg["train"]["mode"])[0]]
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
    """Per metric: the difference of means and the seeds the method won; and, from the manifests, what the two
    rows share (start model, steps, training texts) and whether the control trained without a ranking term."""
    a, b = made.get(method) or [], made.get(control) or []
    pairs = list(zip(a, b)) if len(a) == len(b) else []

    def same(key: str) -> bool:
        return bool(pairs) and all(x.get(key) is not None and x.get(key) == y.get(key) for x, y in pairs)

    out = {"method": method, "control": control,
           "same": {"start": same("start"), "steps": same("steps"), "data": same("data")},
           "method_ranks": bool(a) and all((x.get("rank_weight") or 0) > 0 for x in a),
           "control_mle_only": bool(b) and all(y.get("mode") == "sft" or y.get("rank_weight") == 0 for y in b),
           "metrics": {}}
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


def _shared(c: dict) -> str:
    """In words, what a comparison's two rows share and what the control is."""
    same = [k for k in ("start", "steps", "data") if c["same"][k]]
    other = [k for k in ("start", "steps", "data") if not c["same"][k]]
    words = {"start": "start model", "steps": "steps", "data": "training texts"}
    def join(keys: list, last: str) -> str:
        names = [words[k] for k in keys]
        return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} {last} {names[-1]}"

    said = (f"same {join(same, 'and')}" if same else "nothing in common by the manifests") + (
        f"; not the same {join(other, 'or')}" if same and other else "")
    return said + ("; the control is MLE only" if c["control_mle_only"] else "; the control has a ranking term")


def _shape_line(path: str, q: dict) -> str:
    if "pairs" not in q:
        return f"- `{path}` ({q['prompts']} prompts): not synthetic tasks, not graded."
    by_rule = " (this judge's scores are the grades)" if q["pairs_agree"] == 1 else ""
    return (f"- `{path}` ({q['prompts']} prompts): Alpaca's answer r is correct for {100 * q['r_correct']:.0f}% of "
            f"the prompts; a candidate is graded above r for {100 * q['some_above_r']:.0f}% and below it for "
            f"{100 * q['some_below_r']:.0f}%; {100 * q['candidates_correct']:.0f}% of the candidates are correct; the "
            f"candidates differ in text for {100 * q['two_texts']:.0f}% of the prompts and in grade for "
            f"{100 * q['two_grades']:.0f}%. Of the {q['pairs']} candidate pairs of different grade, the file's scores "
            f"order {100 * q['pairs_agree']:.0f}% as the grades do and tie {100 * q['pairs_tied']:.0f}%{by_rule}.")


def markdown(report: dict) -> str:
    """report.md: the table, what it measures, the ranking data graded, and in plain words what this run found."""
    table, n = report["table"], report["n"]
    seeds = max(len(t["rougeL"]["values"]) for t in table.values())
    lines = [f"# {report['title']}", "",
             "| model | seeds | exact match | ROUGE-L | pair accuracy | steps | rank weight |",
             "|---|---|---|---|---|---|---|"]
    for name, t in table.items():
        info = (report["made_by"].get(name) or [{}])[0]
        lines.append(f"| {name} | {len(t['rougeL']['values'])} | {_cell(t['exact_match'], '.1f')} | "
                     f"{_cell(t['rougeL'], '.1f')} | {_cell(t['pair_accuracy'], '.3f')} | "
                     f"{info.get('steps', '')} | {'' if info.get('rank_weight') is None else info['rank_weight']} |")
    spread = (f"mean ± sample standard deviation over {seeds} seeds (a row's seed is its training stages' "
              f"train.seed, the order they see the data in, and the sampling seed of any stage that samples for "
              f"them)" if seeds > 1 else "one seed")
    lines += ["", f"Numbers: {spread}.", "",
              "## What is measured", "",
              f"- **exact match** (the primary measure) and **ROUGE-L** (x100, Super-NI's) of the greedy answer (up "
              f"to {report['max_new_tokens']} tokens) to n={n['eval']} held-out prompts of the four synthetic tasks "
              f"(repeat a word three times, the next number, reverse three words, name the first word), against "
              f"the correct answer.",
              f"- **pair accuracy**: on n={n['ranking']} other held-out prompts, each with four candidates graded by "
              f"the tasks' rules (correct > near miss > wrong > off-topic; {n['pairs']} ordered pairs), the share of "
              f"pairs the model orders right by v = its mean log-prob per response token, the score Tuna's ranking "
              f"loss trains.",
              f"- **Held out**: no evaluation prompt (instruction + input) appears in any of the "
              f"{len(report['checked_disjoint_from'])} files the stages before the evaluation read (checked in "
              f"code before evaluating; the tasks with few inputs hold some inputs out entirely).", "",
              "## The ranking data, graded by the tasks' rules", ""]
    lines += [_shape_line(path, q) for path, q in report["ranking_data"].items()]
    lines += ["", "## What this run found", ""]
    for c in report["comparisons"]:
        won = [label for m, label in METRICS if c["metrics"][m]["difference"] > 0]
        lost = [label for m, label in METRICS if c["metrics"][m]["difference"] <= 0]  # a tie is not a win
        parts = [f"{label} {c['metrics'][m]['difference']:+.3g} (better in {c['metrics'][m]['method_won']} of "
                 f"{c['metrics'][m]['seeds']} seeds)" for m, label in METRICS]
        verdict = (f"{c['method']} beat {c['control']} on every metric" if not lost else
                   f"{c['method']} did not beat {c['control']} on any metric" if not won else
                   f"mixed: {c['method']} beat {c['control']} on {' and '.join(won)}, not on {' and '.join(lost)}")
        lines.append(f"- **{c['method']}** vs **{c['control']}** ({_shared(c)}): {verdict} in this run. "
                     f"Differences of the means: " + "; ".join(parts) + ".")
    lines += ["", "With this few seeds and prompts, a difference smaller than the spread is noise: read the table, "
              "not the verdict, before concluding anything.", "",
              f"Stages before the evaluation took {report['upstream_seconds']:.0f} s in all (summed over every run "
              f"that made them; `pipeline.json` has every stage).", ""]
    example = next(iter(table.values()))["examples"][:2]
    lines += ["Example greedy answers of the first row:"] + [
        f"- {e['prompt']!r} -> {e['prediction']!r} (correct: {e['reference']!r})" for e in example]
    return "\n".join(lines) + "\n"


KINDS = (
    dataclass_kind("synthetic", "the demo's synthetic tasks: instructions, SFT sets and held-out evaluation sets",
                   SyntheticStage, {"sft": "sft.jsonl", "teacher_sft": "teacher_sft.jsonl", "eval": "eval.jsonl",
                                    "ranking": "ranking.jsonl"}, _run_synthetic),
    dataclass_kind("answers", "one sampled answer per instruction: the demo's Alpaca data", AnswersStage,
                   {"data": "sft.jsonl"}, _run_answers, input_fields=("model", "input", "tokenizer")),
    dataclass_kind("rubric-judge", "the demo's contextual judge: candidates graded by the tasks' rules",
                   RubricJudgeStage, {"data": "ranked.jsonl"}, _run_rubric_judge, input_fields=("input",)),
    dataclass_kind("heldout", "the demo's evaluation: held-out prompts, every row next to its control",
                   HeldoutStage, {"report": "report.json", "markdown": "report.md"}, _run_heldout,
                   input_fields=("eval", "ranking", "models", "tokenizer"),
                   resumes="keeps every model already evaluated"),
)

"""Evaluate: `tuna-jax eval CONFIG.yaml` (= `eval run CONFIG.yaml`) runs the whole evaluation (``eval/run.py``);
the other sub-commands score or review files made elsewhere (``eval/superni.py``, ``lmentry.py``, ``vicuna.py``)."""
from __future__ import annotations

import dataclasses
import os
import sys

from tuna_jax.commands.shared import ENDPOINT, Budget, Endpoint, Progress, endpoint_session
from tuna_jax.eval.superni import DEFAULT_NUM_INSTANCES, DEFAULT_SPLIT
from tuna_jax.eval.vicuna import ORDERS
from tuna_jax.io.fields import arg, pos, req

HELP = ("evaluate: `eval CONFIG.yaml` (Super-NI, LMentry, Vicuna QA, AlpacaEval -> table + chart), or score files: "
        "`eval superni|lmentry|vicuna|alpaca-eval ...`")

# ---- eval run CONFIG ---------------------------------------------------------------------------------
RUN_HELP = "the full evaluation from a YAML config (table + chart)"
RUN_DESCRIPTION = (
    "Generate with each configured model, score Super-NI / LMentry, review Vicuna QA / AlpacaEval with a judge "
    "LLM, and write the table (Markdown + JSON) and a chart (PNG). Predictions and judge replies are cached in the "
    "output folder: a rerun only does what is missing. See configs/eval_example.yaml.")


@dataclasses.dataclass(kw_only=True)
class Run(Progress):
    config: str = pos("eval config (YAML)")
    overrides: list = pos("section.key=value, e.g. generation.max_new_tokens=64 output_dir=runs/x", nargs="*",
                          metavar="KEY=VALUE")


def run(cfg: Run) -> int:
    """``tuna-jax eval run CONFIG`` (= ``tuna-jax eval CONFIG.yaml``)."""
    from tuna_jax.eval import report
    from tuna_jax.eval.run import load_eval_config, run_eval

    table, paths, status = run_eval(load_eval_config(cfg.config, cfg.overrides), progress=not cfg.no_progress)
    print(report.to_markdown(table))
    print("wrote " + ", ".join(paths.values()), file=sys.stderr)
    return status


def is_config_path(s: str) -> bool:
    """``tuna-jax eval CONFIG.yaml`` means ``tuna-jax eval run CONFIG.yaml``."""
    return s.endswith((".yaml", ".yml"))


# ---- eval superni / lmentry -------------------------------------------------------------------------
SUPERNI_HELP = "Super-NI ROUGE-L of a predictions file"


@dataclasses.dataclass(kw_only=True)
class Superni(Progress):
    """Super-NaturalInstructions ROUGE-L of a predictions file; prints the JSON {"overall", "per_task", ...}."""

    predictions: str = req('JSON Lines, one {"id": ..., "prediction": ...} per instance', metavar="PRED.jsonl")
    tasks: str = req("a natural-instructions checkout (tasks/*.json + splits/default/test_tasks.txt), or a folder / "
                     ".jsonl in the layout of shared/data/superni", metavar="PATH")
    out: str | None = arg(None, "also write the JSON result here", metavar="OUT.json")
    missing: str = arg("skip", "instances without a prediction: leave out of the means (skip: counted and "
                       "reported) or score as an empty answer (zero: the official script's choice)",
                       choices=("skip", "zero"))
    num_instances: int = arg(DEFAULT_NUM_INSTANCES, "instances per task when references come from task files")
    track: str = arg(DEFAULT_SPLIT, "benchmark track (default: the English one)", choices=("default", "xlingual"))


def run_superni(cfg: Superni) -> int:
    """Score a predictions file, print the JSON, write ``--out``; bad input raises InputError."""
    from tuna_jax.eval.common import check_unique, emit_json, read_predictions_jsonl, warn
    from tuna_jax.eval.superni import load_source, score_predictions

    records = read_predictions_jsonl(cfg.predictions)
    predictions = {r.id: r.prediction for r in check_unique(records).values()}
    source = load_source(cfg.tasks, num_instances=cfg.num_instances, track=cfg.track)
    result = score_predictions(predictions, source, missing=cfg.missing, track=cfg.track,
                               progress=not cfg.no_progress)
    result["predictions_file"] = os.fspath(cfg.predictions)
    result["tasks_source"] = source.path
    if result["missing"]:
        how = "left out of the means" if cfg.missing == "skip" else "scored as empty answers"
        warn(f"{result['missing']} of {result['num_references']} instances have no prediction "
             f"({how}); tasks affected: {len(result['missing_per_task'])}")
    if result["unknown"]:
        warn(f"{result['unknown']} predictions have ids that are not in the reference set "
             f"(not scored), e.g. {result['unknown_ids'][:3]}")
    emit_json(result, cfg.out)
    return 0


LMENTRY_HELP = "LMentry score of a predictions file"


@dataclasses.dataclass(kw_only=True)
class Lmentry(Progress):
    """LMentry accuracy, robustness and score of a predictions file; prints the JSON {"overall", "per_task", ...}."""

    predictions: str = req('JSON Lines: {"id": "<task>/<example id>", "prediction": ...} (or a separate "task" '
                           "field); or the repository's layout, a folder predictions/<task>/<model>.json",
                           metavar="PRED.jsonl|DIR")
    model: str | None = arg(None, "with a predictions folder: the model (file name without .json) to score; needed "
                            "only when the folder holds several")
    data: str = req("an lmentry checkout or its data/ folder (data/<task>.json)", metavar="PATH")
    out: str | None = arg(None, "also write the JSON result here", metavar="OUT.json")
    truncate_predictions: bool = arg(False, "score only the text before the first newline and then the first '.' "
                                     "(LMentry does this for models that do not stop generating)")
    allow_partial: bool = arg(False, "score even if some of the 41 task files have no predictions (the robustness "
                              "then uses complete items only and the result says partial)")


def run_lmentry(cfg: Lmentry) -> int:
    """Score a predictions file (or folder), print the JSON, write ``--out``; bad input raises InputError."""
    from tuna_jax.eval.common import emit_json, warn
    from tuna_jax.eval.lmentry import read_predictions, resolve_data_dir, score_predictions

    preds, model = read_predictions(cfg.predictions, cfg.model)
    result = score_predictions(preds, cfg.data, truncate=cfg.truncate_predictions, allow_partial=cfg.allow_partial,
                               progress=not cfg.no_progress)
    result["predictions_file"] = os.fspath(cfg.predictions)
    if model is not None:
        result["model"] = model
    result["data"] = str(resolve_data_dir(cfg.data))
    if result["missing"]:
        warn(f"{result['missing']} of {result['num_examples']} examples have no prediction (scored as "
             f"wrong, as LMentry does); tasks affected: {len(result['missing_per_task'])}")
    if result["unknown"]:
        warn(f"{result['unknown']} predictions match no example (not scored), e.g. {result['unknown_ids'][:3]}")
    if result["partial"]:
        warn(f"partial LMentry result: no predictions for {result['absent_tasks']}")
    emit_json(result, cfg.out)
    return 0


# ---- eval vicuna / alpaca-eval: reviews by a judge LLM -----------------------------------------------
REVIEW = "review"


@dataclasses.dataclass(kw_only=True)
class Review(Endpoint, Budget, Progress):
    """A pairwise review by a judge LLM over an endpoint (``eval/vicuna.py``)."""

    model: str = req("model name as the server knows it", group=ENDPOINT)
    out: str = req("summary JSON; per-item reviews go to OUT.reviews.jsonl (failures to "
                   "OUT.reviews.jsonl.failed.jsonl), the request cache to OUT.store.jsonl unless --store (OUT = the "
                   "path without .json)", metavar="OUT.json", group=REVIEW)
    orders: str = arg("one", "Vicuna QA: 'one' = the paper's protocol (the model as Assistant 1, win/tie/lose by the "
                      "two scores); 'both' = not the paper's: both orders, a win or loss only when they agree, else a "
                      "tie (twice the requests). AlpacaEval always judges both orders", choices=ORDERS, group=REVIEW)
    max_parse_retries: int = arg(2, "new requests for a reply without a verdict before the item counts as failed",
                                 group=REVIEW)
    temperature: float | None = arg(None, "judge temperature (default: the prompt's)", group=REVIEW)
    max_tokens: int | None = arg(None, "longest judge reply (default: the prompt's)", group=REVIEW)
    limit: int | None = arg(None, "only the first LIMIT questions / instructions", group=REVIEW)
    model_name: str | None = arg(None, "name in the summary (default: the answers' model_id, the outputs' "
                                 "generator)")

    def review_config(self):
        from tuna_jax.eval.vicuna import ReviewConfig

        return ReviewConfig(orders=self.orders, max_parse_retries=self.max_parse_retries,
                            temperature=self.temperature, max_tokens=self.max_tokens, concurrency=self.concurrency,
                            limit=self.limit, progress=not self.no_progress)


VICUNA_HELP = "Vicuna QA pairwise review of two answer files (judge LLM)"
VICUNA_DESCRIPTION = (
    "Vicuna QA pairwise review: a judge LLM (the published GPT-4 review prompts) compares the model's answers with "
    "a baseline's. --orders one (default; the paper's protocol): the model as Assistant 1, win/tie/lose by the two "
    "scores; --orders both (not the paper's): both orders, a win or loss only when they agree, else a tie. Reports "
    "counts and percentages. Requests are cached: rerunning the same command makes no new request.")


@dataclasses.dataclass(kw_only=True)
class Vicuna(Review):
    answers: str = req("the model's answers {question_id, text, ...} (FastChat format)", metavar="ANSWERS.jsonl")
    baseline: str = req("the baseline's answers", metavar="BASELINE.jsonl")
    data: str | None = arg(None, "folder with question.jsonl, prompt.jsonl, reviewer.jsonl", metavar="DIR")
    questions: str | None = arg(None, "question.jsonl (default: DIR/question.jsonl)")
    prompts: str | None = arg(None, "prompt.jsonl (default: DIR/prompt.jsonl)")
    reviewers: str | None = arg(None, "reviewer.jsonl (default: DIR/reviewer.jsonl)")
    baseline_name: str | None = arg(None, "name in the summary (default: its model_id)")


def run_vicuna(cfg: Vicuna) -> int:
    """0: reviewed; 1: some questions failed (listed); 2: stopped by the budget or a fatal endpoint error."""
    from tuna_jax.eval.vicuna import load_vicuna_data, review_vicuna

    data = load_vicuna_data(cfg.data, questions=cfg.questions, prompts=cfg.prompts, reviewers=cfg.reviewers)
    return _review(cfg, "eval vicuna", lambda client, reviews: review_vicuna(
        cfg.answers, cfg.baseline, reviews, client, data, cfg.review_config(),
        model_name=_model_id(cfg.answers, cfg.model_name), baseline_name=_model_id(cfg.baseline, cfg.baseline_name)))


ALPACA_EVAL_HELP = "AlpacaEval-style win rate of an outputs file (judge LLM)"
ALPACA_EVAL_DESCRIPTION = (
    "AlpacaEval-style win rate: a judge LLM (the alpaca_eval_gpt4 annotator prompt) ranks the model's output "
    "against the reference output (text-davinci-003), in both orders; win rate = wins + ties/2 over judged "
    "instructions. Requests are cached.")


@dataclasses.dataclass(kw_only=True)
class AlpacaEval(Review):
    outputs: str = req("the model's outputs: JSON list of {instruction, output, generator?}", metavar="OUTPUTS.json")
    reference: str = req("reference outputs, e.g. alpaca_eval/model_outputs_text_davinci_003.json",
                         metavar="REFERENCE.json")
    prompt_template: str = req("annotator prompt, e.g. alpaca_eval/judge_prompts/alpaca_eval_gpt4/alpaca_eval.txt",
                               metavar="alpaca_eval.txt")


def run_alpaca_eval(cfg: AlpacaEval) -> int:
    """0: reviewed; 1: some instructions failed (listed); 2: stopped by the budget or a fatal endpoint error."""
    from tuna_jax.eval.vicuna import load_alpaca_eval_template, read_alpaca_eval_outputs, review_alpaca_eval

    template = load_alpaca_eval_template(cfg.prompt_template)
    outs = read_alpaca_eval_outputs(cfg.outputs)
    name = cfg.model_name or (str(outs[0].get("generator")) if outs and outs[0].get("generator") else "model")
    return _review(cfg, "eval alpaca-eval", lambda client, reviews: review_alpaca_eval(
        outs, cfg.reference, reviews, client, template, cfg.review_config(), model_name=name))


def _review(cfg: Review, what: str, review) -> int:
    """``review(client, reviews_path)`` with the store at OUT.store.jsonl; the summary to ``--out``."""
    from tuna_jax.eval.common import emit_json, warn
    from tuna_jax.io.cli import report_stop
    from tuna_jax.llm_api.store import BudgetExceeded, FatalRunError

    stem = cfg.out[:-5] if cfg.out.endswith(".json") else cfg.out  # the reviews and the store go beside it
    with endpoint_session(cfg, stem) as (client, store):
        try:
            result = review(client, stem + ".reviews.jsonl")
        except (BudgetExceeded, FatalRunError) as e:
            return report_stop(what, e, store)
        print(f"{what}: {store.summary()}", file=sys.stderr)
    emit_json(result, cfg.out)
    if result["failed"]:
        warn(f"{what}: {result['failed']} item(s) failed (no parseable verdict or a failed request); they are "
             f"listed with the judge's replies in {result['failed_file']} and are not in win/lose/tie")
    return 1 if result["failed"] else 0


def _model_id(path: str, given: str | None) -> str:
    from tuna_jax.eval.vicuna import read_answers

    if given:
        return given
    ids = {a.model_id for a in read_answers(path).values() if a.model_id}
    return ids.pop() if len(ids) == 1 else os.path.splitext(os.path.basename(path))[0]


# ---- eval rankings / costs: the paper's data tables ---------------------------------------------------
RANKINGS_HELP = "Table 4: mean response length at each rank of ranking files"


@dataclasses.dataclass(kw_only=True)
class Rankings:
    """Table 4 of the paper: the mean length of the responses at each rank (1 = best) of each ranking file, in
    words, or in tokens with --tokenizer; prints the Markdown table, writes --out (JSON)."""

    sources: list[str] = pos("ranking records: NAME=FILE (the teacher's, the judge's, a PRM's)", nargs="+",
                        metavar="NAME=FILE")
    tokenizer: str | None = arg(None, "count tokens of this tokenizer (a model folder or tokenizer.model)")
    out: str | None = arg(None, "also write the JSON table here", metavar="OUT.json")


def run_rankings(cfg: Rankings) -> int:
    from tuna_jax.data.templates import load_tokenizer
    from tuna_jax.eval.common import emit_json
    from tuna_jax.eval.tables import parse_sources, ranking_lengths, to_markdown

    table = ranking_lengths(parse_sources(cfg.sources), load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None)
    print(to_markdown(table), file=sys.stderr)
    emit_json(table, cfg.out)
    return 0


COSTS_HELP = "Table 6: requests, tokens and USD of request stores"


@dataclasses.dataclass(kw_only=True)
class Costs:
    """Table 6 of the paper: what each stage's request store paid for (requests, prompt and completion tokens, the USD
    recorded when they were made, and the USD at --price-input/--price-output); prints the Markdown table, writes
    --out (JSON)."""

    sources: list[str] = pos("request stores: NAME=STORE (OUT.store.jsonl, or a pipeline's stores/STAGE.jsonl)",
                        nargs="+", metavar="NAME=STORE")
    price_input: float | None = arg(None, "USD per 1M prompt tokens, to price every store alike")
    price_output: float | None = arg(None, "USD per 1M completion tokens")
    out: str | None = arg(None, "also write the JSON table here", metavar="OUT.json")


def run_costs(cfg: Costs) -> int:
    from tuna_jax.eval.common import emit_json
    from tuna_jax.eval.tables import api_costs, parse_sources, to_markdown

    table = api_costs(parse_sources(cfg.sources), cfg.price_input, cfg.price_output)
    print(to_markdown(table), file=sys.stderr)
    emit_json(table, cfg.out)
    return 0

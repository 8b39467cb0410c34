"""The staged Tuna pipeline, end to end, as `tuna-jax demo`.

It runs every stage of the real workflow on a real (tiny) pretrained LLaMA, on CPU, with no
download and no API key:

  stories260K (llama2.c, shipped)  --convert-->  HF folder
    |-- SFT, long   -> the "teacher" (stands in for text-davinci-003 / GPT-4)
    |-- SFT, short  -> "Alpaca" (the model Tuna improves)
    |-- teacher samples N=4 responses with log-probs, s = logp/|r|^1.3   -> Tuna_p data
    |-- Tuna_p: ranking loss + MLE from Alpaca
    |-- Tuna_p samples N=4 diverse responses (pairwise ROUGE-L < 0.8)
    |     an offline metric judge ranks them against the reference       -> Tuna_c data
    |-- Tuna: ranking loss + MLE from Tuna_p
    |-- evaluate every stage: greedy ROUGE-L / exact match on held-out tasks, and pair accuracy
    |     of the model's own scores on held-out candidates of known quality
    '-- export Tuna as a Hugging Face folder (safetensors)

The data are synthetic instruction tasks with known answers (``synthetic.py``), because the
Alpaca data is CC BY-NC and stays outside the package. Each stage writes into ``out_dir`` and is
skipped when its output exists, so an interrupted demo continues where it stopped.
"""
from __future__ import annotations

import json
import pathlib
import sys
import time

from tuna_jax import synthetic
from tuna_jax.config import load_config

DEMO_MAX_LEN = 192  # the Alpaca template is ~150 tokens under stories260K's 512-piece vocabulary


def _write_jsonl(path: pathlib.Path, rows) -> pathlib.Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def _train_stage(name: str, out_dir: pathlib.Path, model: str, tokenizer: str, mode: str, data: pathlib.Path,
                 overrides: list[str]) -> pathlib.Path:
    """Train one stage (skipped if its export exists) and return its params export."""
    from tuna_jax.train import train

    run = out_dir / name
    if (run / "final" / "params").is_dir():
        _say(f"{name}: done already ({run / 'final'})")
        return run / "final"
    cfg = load_config(None, [f"name={name}", f"model.path={model}", f"model.tokenizer={tokenizer}",
                             f"data.train={data}", f"data.max_len={DEMO_MAX_LEN}", "data.pad_to_multiple=0",
                             f"train.mode={mode}", f"train.output_dir={run}", "train.mesh=1,-1,1",
                             "train.save_every=1000", "train.tensorboard=false", *overrides])
    t0 = time.time()
    result = train(cfg, resume=True)
    _say(f"{name}: {result.step} steps in {time.time() - t0:.0f}s, final loss {result.metrics.get('loss', 0):.3f}")
    return pathlib.Path(result.export_dir)


def evaluate_model(model_path: str, tokenizer_path: str, eval_rows: list[dict], ranking_rows: list[dict],
                   max_new_tokens: int = 16) -> dict:
    """Greedy answers on held-out tasks (ROUGE-L x100 as Super-NI computes it, exact match) and
    the pair accuracy of v (per-token mean log-likelihood) on candidates of known quality."""
    import numpy as np

    from tuna_jax.data.templates import SpecialTokenPolicy, format_prompt, load_tokenizer
    from tuna_jax.eval.superni import exact_match, rouge_l
    from tuna_jax.generate import Sampler, SamplingParams
    from tuna_jax.model import load_model
    from tuna_jax.score import group_for_line, make_candidate_encoder
    from tuna_jax.scoring import Scorer

    model = load_model(model_path)
    tok = load_tokenizer(tokenizer_path)
    sampler = Sampler(model, tok, SpecialTokenPolicy(), batch_size=16)
    prompts = [format_prompt(r["instruction"], r["input"]) for r in eval_rows]
    outs = sampler.generate(prompts, SamplingParams.greedy(max_new_tokens))
    preds = [o[0].text.strip() for o in outs]
    rouge = float(np.mean([rouge_l(p, r["output"]) for p, r in zip(preds, eval_rows)]))
    em = float(np.mean([exact_match(p, r["output"]) for p, r in zip(preds, eval_rows)]))

    encoder = make_candidate_encoder(tokenizer_path)
    groups = [group_for_line(r, f"heldout:{e}", encoder, model.cfg.vocab_size, model.cfg.max_position_embeddings)
              for e, r in enumerate(ranking_rows)]
    v = [[lp / n for lp, n in g] for g in Scorer(model, batch_groups=16).score(groups)]
    correct = counted = 0
    for e, r in enumerate(ranking_rows):
        s = r["scores"]
        for j in range(len(s)):
            for k in range(len(s)):
                if s[j] > s[k]:
                    counted += 1
                    correct += v[e][j] > v[e][k]
    return {"rougeL": 100 * rouge, "exact_match": 100 * em, "pair_accuracy": correct / max(counted, 1),
            "examples": [{"prompt": r["instruction"] + " " + r["input"], "prediction": p, "reference": r["output"]}
                         for p, r in list(zip(preds, eval_rows))[:3]]}


def run_demo(out_dir: str | pathlib.Path = "runs/demo", fast: bool = False) -> dict:
    """Run the whole pipeline; returns the evaluation table. ``fast`` shrinks every stage (tests)."""
    from tuna_jax.assets import stories260k_hf_dir
    from tuna_jax.feedback.diverse import DiverseConfig, run_diverse
    from tuna_jax.feedback.judge import JudgeConfig, MetricJudge, run_judge
    from tuna_jax.feedback.local import LocalTeacher
    from tuna_jax.feedback.teacher import TeacherConfig, run_teacher
    from tuna_jax.model import load_model
    from tuna_jax.model.convert import save_hf_model

    out = pathlib.Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    scale = 1 if not fast else 0.25
    n_sft, n_rank, n_eval = int(512 * scale), int(96 * scale), int(48 * scale)
    t_start = time.time()

    base = str(stories260k_hf_dir(out / "cache"))
    _say(f"base model: stories260K (llama2.c, MIT) converted to {base}")
    data = out / "data"
    data.mkdir(exist_ok=True)
    sft = _write_jsonl(data / "sft.jsonl", synthetic.sft_records(n_sft, seed=0))
    prompts = _write_jsonl(data / "prompts.jsonl", [
        {k: r[k] for k in ("id", "instruction", "input", "output")} for r in synthetic.sft_records(n_rank, seed=1)])
    eval_rows = synthetic.sft_records(n_eval, seed=2)
    heldout_ranking = synthetic.ranking_records(n_eval, seed=3)

    epochs_teacher = 3 if not fast else 1
    teacher = _train_stage("teacher-sft", out, base, base, "sft", sft,
                           ["train.global_batch=16", f"train.epochs={epochs_teacher}", "optim.lr=3e-3",
                            "optim.warmup_steps=5"])
    alpaca = _train_stage("alpaca", out, base, base, "sft", sft,
                          ["train.global_batch=16", "train.epochs=1", f"train.max_steps={16 if not fast else 4}",
                           "optim.lr=3e-3", "optim.warmup_steps=2"])

    # Probabilistic ranking: the teacher samples 4 responses with log-probs; s = logp / |r|^1.3.
    p_data = data / "tuna_p_ranked.jsonl"
    if not p_data.exists():
        summary = run_teacher(str(prompts), str(p_data), LocalTeacher(str(teacher), max_new_tokens=24, seed=0),
                              TeacherConfig(n=4, beta=1.3, temperature=1.0, max_tokens=24), concurrency=1)
        _say(f"teacher: {summary.line()}")
    ranking = ["train.global_batch=8", f"train.epochs={3 if not fast else 1}", "data.num_candidates=4", "loss.margin=0.1",
               "loss.mle_weight=1.0", "optim.warmup_steps=2"]
    tuna_p = _train_stage("tuna-p", out, str(alpaca), base, "ranking", p_data,
                          ranking + ["optim.lr=2e-3", "loss.mle_target=original"])

    # Contextual ranking: Tuna_p samples 4 diverse responses; an offline metric judge ranks them.
    c_cands, c_data = data / "tuna_c_candidates.jsonl", data / "tuna_c_ranked.jsonl"
    if not c_data.exists():
        d = run_diverse(str(tuna_p), str(prompts), str(c_cands), DiverseConfig(n=4, tau=0.8), max_new_tokens=24,
                        seed=0, tokenizer=base, progress=False)
        _say(f"sample-diverse: {d}")
        summary = run_judge(str(c_cands), str(c_data), MetricJudge(JudgeConfig(kind="metric", metric="rougeL")),
                            concurrency=1, progress=False)
        _say(f"judge (metric, ROUGE-L vs reference): {summary.line()}")
    tuna = _train_stage("tuna", out, str(tuna_p), base, "ranking", c_data,
                        ranking + ["optim.lr=1e-3", "loss.mle_target=original"])

    table = {}
    for name, path in (("alpaca", alpaca), ("tuna-p", tuna_p), ("tuna", tuna)):
        cached = out / f"eval-{name}.json"
        if cached.exists():
            table[name] = json.loads(cached.read_text())
        else:
            table[name] = evaluate_model(str(path), base, eval_rows, heldout_ranking)
            cached.write_text(json.dumps(table[name], indent=2))
        _say(f"eval {name}: ROUGE-L {table[name]['rougeL']:.1f}, exact match {table[name]['exact_match']:.1f}, "
             f"pair accuracy {table[name]['pair_accuracy']:.3f}")

    hf_out = out / "tuna-hf"
    if not (hf_out / "config.json").exists():
        from flax import nnx

        model = load_model(tuna)
        save_hf_model(nnx.state(model, nnx.Param), model.cfg, hf_out, like=base)
    report = {"models": table, "export": str(hf_out), "seconds": round(time.time() - t_start, 1)}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown_table(table))
    return report


def markdown_table(table: dict) -> str:
    lines = ["| model | ROUGE-L | exact match | pair accuracy |", "|---|---|---|---|"]
    for name, m in table.items():
        lines.append(f"| {name} | {m['rougeL']:.1f} | {m['exact_match']:.1f} | {m['pair_accuracy']:.3f} |")
    return "\n".join(lines) + "\n"


def main(out_dir: str = "runs/demo", fast: bool = False) -> int:
    report = run_demo(out_dir, fast=fast)
    print(markdown_table(report["models"]))
    for ex in report["models"]["tuna"]["examples"]:
        print(f"  {ex['prompt']!r} -> {ex['prediction']!r} (reference {ex['reference']!r})")
    print(f"Hugging Face export of Tuna: {report['export']}  ({report['seconds']}s in all)")
    return 0

"""The proxy ranking model (tuna_jax/feedback/prm.py): training on synthetic rankings raises held-out pair
accuracy, save/load round trip, rerank writing valid ranking records (also through the CLI).

One tiny random backbone (the local-teacher fixture) and one training shape (8 prompts x 4 candidates x
48 tokens; the synthetic records carry a short ``prompt`` instead of the ~110-token Alpaca template) keep
the compiles to one train step, one eval step and one reward function."""
from __future__ import annotations

import json

import pytest

from tuna_jax.cli import parse_config
from tuna_jax.commands import prm as prm_cmd
from tuna_jax.data.records import read_records
from tuna_jax.data.synthetic import ranking_records
from tuna_jax.data.templates import SpecialTokenPolicy, encode_prompt, encode_response, format_prompt, load_tokenizer
from tuna_jax.feedback import prm as P
from tuna_jax.model.reward import eval_summary

MAX_LEN = 48


def short_prompts(rows):
    """Synthetic ranking rows with an exact short prompt (records.py's ``prompt`` field): ~15 tokens."""
    return [dict(r, prompt=f"{r['instruction']}\n{r['input']}\n") for r in rows]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def prm_config(base, data, out, *overrides):
    """configs/prm.yaml (train.mode=prm) on the tiny backbone: one training shape (8 prompts x 4 x MAX_LEN)."""
    from tuna_jax.config import load_config

    return load_config("configs/prm.yaml", [f"model.path={base}", f"model.tokenizer={base / 'tokenizer.model'}",
                                            f"data.train={data}", f"train.output_dir={out}", f"data.max_len={MAX_LEN}",
                                            "data.pad_to_multiple=0", "train.progress=false", *overrides])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from tests.unit.feedback.test_local import eos_happy_model
    from tuna_jax.train import train

    tmp = tmp_path_factory.mktemp("prm")
    base = eos_happy_model(tmp / "base")
    train_rows = write_rows(tmp / "train.jsonl", short_prompts(ranking_records(64, seed=0)))
    held_out = write_rows(tmp / "eval.jsonl", short_prompts(ranking_records(32, seed=1)))
    res = train(prm_config(base, train_rows, tmp / "run", f"data.eval={held_out}", "train.epochs=3", "optim.lr=3e-3"))
    assert res.export_dir == str(tmp / "run" / "final")
    return res, tmp, P.load_prm(tmp / "run")  # the run's folder reads as its export, run/final


@pytest.mark.slow
def test_training_raises_heldout_pair_accuracy(trained):
    res, tmp, _ = trained
    start, final = eval_summary(res.first_eval), eval_summary(res.eval_metrics)
    assert start["pairs"] == final["pairs"] == 32 * 6  # 4 candidates, all scores distinct: 6 pairs each
    assert final["pair_accuracy"] >= start["pair_accuracy"] + 0.2, (start, final)
    assert final["loss"] < start["loss"]
    assert res.step == 3 * 64 // 8
    logged = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in logged if x["split"] == "train"] == list(range(1, res.step + 1))
    assert [x["pair_accuracy"] for x in logged if x["split"] == "eval"] == [start["pair_accuracy"],
                                                                         final["pair_accuracy"]]
    meta = json.loads((tmp / "run" / "final" / "prm.json").read_text())
    assert meta["format"] == "tuna-jax-prm" and meta["max_len"] == MAX_LEN and meta["hidden_size"] == 32
    assert meta["metrics"]["final_eval"] == final and meta["train"]["loss"]["margin"] == 0.1
    assert meta["train"]["train"]["mode"] == "prm"  # the trainer's resolved config: one trainer, one config


@pytest.mark.slow
def test_save_load_round_trip(trained):
    res, tmp, prm = trained
    loaded = P.load_prm(tmp / "run" / "final")
    rows = [[1, 5, 9, 300, 2], [1, 7, 2], list(range(1, 40)) + [2]]
    # max_len=MAX_LEN: rows padded to 48 tokens, the shape rerank uses (one compile)
    assert loaded.rewards(rows, max_len=MAX_LEN) == prm.rewards(rows, max_len=MAX_LEN)  # bit for bit
    assert loaded.meta["max_len"] == MAX_LEN and loaded.cfg == prm.cfg
    # The backbone folder is an ordinary params checkpoint (tokenizer included).
    from tuna_jax.model import load_model

    assert load_model(tmp / "run" / "final" / "backbone").cfg.hidden_size == 32
    assert load_tokenizer(str(tmp / "run" / "final" / "backbone")).vocab_size == 512
    with pytest.raises(FileNotFoundError, match="not a tuna-jax PRM folder"):
        P.load_prm(tmp / "run" / "final" / "backbone")


def _expected_reward(prm, tok, row, cand):
    """The reward of one candidate, built independently: template, BOS/EOS, and the record's one prompt cut
    from the left after the BOS so that its LONGEST candidate fits MAX_LEN (as in training)."""
    policy = SpecialTokenPolicy()
    prompt = encode_prompt(tok, format_prompt(row["instruction"], row["input"]), policy)
    keep = MAX_LEN - max(len(encode_response(tok, c, policy)) for c in row["candidates"] if c.strip())
    if len(prompt) > keep:
        prompt = prompt[:1] + prompt[len(prompt) - (keep - 1):]
    return prm.rewards([prompt + encode_response(tok, cand, policy)], max_len=MAX_LEN)[0]


@pytest.mark.slow
def test_rerank_writes_ranking_records(trained, tmp_path):
    res, tmp, prm = trained
    rows = [{k: r[k] for k in ("id", "instruction", "input", "output", "candidates")}
            for r in ranking_records(5, seed=2)]
    rows[1]["candidates"].insert(1, "  ")  # an empty candidate: dropped and listed
    rows.append({"id": "nothing", "instruction": "Say it.", "candidates": [""]})  # nothing to score: failed
    src = write_rows(tmp_path / "cands.jsonl", rows)
    out = tmp_path / "reranked.jsonl"
    summary = P.rerank_file(prm, src, str(out), progress=False)
    assert (summary.items, summary.written, summary.failed, summary.dropped_candidates) == (6, 5, 1, 2)
    assert summary.truncated_prompts == 5  # each Alpaca prompt (~130 tokens) is cut to fit MAX_LEN = 48

    records, report = read_records(str(out), kind="ranking")
    assert report.num_skipped == 0 and [r.id for r in records] == [r["id"] for r in rows[:5]]
    written = [json.loads(x) for x in out.read_text().splitlines()]
    tok = load_tokenizer(str(tmp / "run" / "final" / "backbone"))
    for row, rec, raw in zip(rows, records, written):
        assert rec.scores == sorted(rec.scores, reverse=True)
        assert sorted(rec.candidates) == sorted(c for c in row["candidates"] if c.strip())
        assert rec.output == row["output"] and raw["prm"]["model"] == str(tmp / "run" / "final")
        for cand, score in zip(rec.candidates, rec.scores):
            assert score == pytest.approx(_expected_reward(prm, tok, row, cand), abs=1e-5)
    assert written[1]["prm"]["dropped"] == [{"index": 1, "reason": "empty_response"}]
    failed = [json.loads(x) for x in (tmp_path / "reranked.jsonl.failed.jsonl").read_text().splitlines()]
    assert [f["id"] for f in failed] == ["nothing"]


@pytest.mark.slow
def test_rerank_cli(trained, tmp_path, capsys):
    res, tmp, _ = trained
    src = write_rows(tmp_path / "cands.jsonl", [{"instruction": "Name the first word.", "input": "cat dog sun",
                                                 "candidates": ["cat.", "dog.", "The sun is big."]}])
    out = tmp_path / "out.jsonl"
    assert prm_cmd.run_rerank(parse_config(["prm", "rerank", str(tmp / "run"), src, str(out), "--no-progress"])) == 0
    (rec,), _ = read_records(str(out), kind="ranking")
    assert len(rec.candidates) == 3 and rec.id == "0"
    assert "items: 1, written: 1, failed: 0" in capsys.readouterr().err


def test_prm_train_is_train_with_a_prm_config(tmp_path):
    """`prm train` takes `train`'s one declaration; a config of another mode is refused in one line."""
    from tuna_jax.commands import train as train_cmd
    from tuna_jax.config import ConfigError, load_config

    cfg = parse_config(["prm", "train", "configs/prm.yaml", "loss.margin=0.2", "--resume"])
    assert type(cfg) is train_cmd.Config and cfg == parse_config(["train", "configs/prm.yaml", "loss.margin=0.2",
                                                                  "--resume"])
    loaded = load_config(cfg.config, cfg.overrides)
    assert (loaded.train.mode, loaded.loss.margin, loaded.optim.lr, loaded.data.max_len) == ("prm", 0.2, 1e-5, 512)
    with pytest.raises(ConfigError, match="train.mode=ranking; `prm train` trains a PRM"):
        prm_cmd.run_train(parse_config(["prm", "train", "configs/tiny_ranking.yaml"]))


@pytest.mark.slow
def test_prm_training_resumes_exactly_through_the_one_trainer(tmp_path):
    """train.mode=prm runs in the project's one trainer: a run stopped after 2 steps and resumed ends
    with the parameters of an uninterrupted 4-step run (checkpoints hold the head too)."""
    import jax
    import numpy as np

    from tests.unit.feedback.test_local import eos_happy_model
    from tuna_jax.train import train

    base = eos_happy_model(tmp_path / "base")
    data = write_rows(tmp_path / "train.jsonl", short_prompts(ranking_records(32, seed=4)))

    def run(name, max_steps, resume=False):
        return train(prm_config(base, data, tmp_path / name, "optim.lr=3e-3", "optim.schedule=constant",
                                f"train.max_steps={max_steps}"), resume=resume)

    whole = run("whole", 4)
    run("resumed", 2)
    resumed = run("resumed", 4, resume=True)
    assert resumed.step == whole.step == 4
    a, b = (P.load_prm(tmp_path / n).params for n in ("whole", "resumed"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_prm_train_sigterm_exits_143_and_resumes(tmp_path, monkeypatch, capsys):
    """`tuna-jax prm train` stopped by SIGTERM: one line, status 143 (as `train`), and --resume finishes it."""
    import os
    import signal

    import tuna_jax.train as T
    from tests.unit.feedback.test_local import eos_happy_model
    from tuna_jax.cli import main as cli

    base = eos_happy_model(tmp_path / "base")
    data = write_rows(tmp_path / "train.jsonl", short_prompts(ranking_records(32, seed=4)))
    real_train = T.train

    def train_then_sigterm(cfg, resume=False, on_step=None):
        kill = (lambda step, _m: os.kill(os.getpid(), signal.SIGTERM) if step == 2 else None)
        return real_train(cfg, resume=resume, on_step=None if resume else kill)

    monkeypatch.setattr(T, "train", train_then_sigterm)
    args = ["prm", "train", "configs/prm.yaml", f"model.path={base}", f"model.tokenizer={base / 'tokenizer.model'}",
            f"data.train={data}", f"train.output_dir={tmp_path / 'prm'}", "train.max_steps=4",
            f"data.max_len={MAX_LEN}", "data.pad_to_multiple=0", "train.progress=false"]
    assert cli(args) == 143
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err[-1].startswith("tuna-jax prm: stopped by SIGTERM after step") and "Traceback" not in "".join(err)
    assert cli(args + ["--resume"]) == 0
    assert "finished at step 4" in capsys.readouterr().out

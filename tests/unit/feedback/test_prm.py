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
from tuna_jax.commands.prm import PRMSettings
from tuna_jax.data.records import read_records
from tuna_jax.data.synthetic import ranking_records
from tuna_jax.data.templates import SpecialTokenPolicy, encode_prompt, encode_response, format_prompt, load_tokenizer
from tuna_jax.feedback import prm as P

MAX_LEN = 48


def short_prompts(rows):
    """Synthetic ranking rows with an exact short prompt (records.py's ``prompt`` field): ~15 tokens."""
    return [dict(r, prompt=f"{r['instruction']}\n{r['input']}\n") for r in rows]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from tests.unit.feedback.test_local import eos_happy_model

    tmp = tmp_path_factory.mktemp("prm")
    base = eos_happy_model(tmp / "base")
    train = write_rows(tmp / "train.jsonl", short_prompts(ranking_records(64, seed=0)))
    held_out = write_rows(tmp / "eval.jsonl", short_prompts(ranking_records(32, seed=1)))
    cfg = PRMSettings(max_len=MAX_LEN, batch_size=8, epochs=3, lr=3e-3, pad_to_multiple=0, margin=0.1)
    res = P.train_prm(str(base), train, tmp / "prm", cfg, eval_path=held_out, tokenizer=str(base / "tokenizer.model"),
                      progress=False)
    return res, tmp


@pytest.mark.slow
def test_training_raises_heldout_pair_accuracy(trained):
    res, tmp = trained
    start, final = res.start_eval, res.final_eval
    assert start["pairs"] == final["pairs"] == 32 * 6  # 4 candidates, all scores distinct: 6 pairs each
    assert final["pair_accuracy"] >= start["pair_accuracy"] + 0.2, (start, final)
    assert final["loss"] < start["loss"]
    assert res.steps == 3 * 64 // 8
    logged = [json.loads(x) for x in (tmp / "prm" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in logged if x["split"] == "train"] == list(range(1, res.steps + 1))
    assert [x["pair_accuracy"] for x in logged if x["split"] == "eval"] == [start["pair_accuracy"],
                                                                         final["pair_accuracy"]]
    meta = json.loads((tmp / "prm" / "prm.json").read_text())
    assert meta["format"] == "tuna-jax-prm" and meta["max_len"] == MAX_LEN and meta["hidden_size"] == 32
    assert meta["metrics"]["final_eval"] == final and meta["train"]["loss"]["margin"] == 0.1
    assert meta["train"]["train"]["mode"] == "prm"  # the trainer's resolved config: one trainer, one config


@pytest.mark.slow
def test_save_load_round_trip(trained):
    res, tmp = trained
    loaded = P.load_prm(tmp / "prm")
    rows = [[1, 5, 9, 300, 2], [1, 7, 2], list(range(1, 40)) + [2]]
    # max_len=MAX_LEN: rows padded to 48 tokens, the shape rerank uses (one compile)
    assert loaded.rewards(rows, max_len=MAX_LEN) == res.prm.rewards(rows, max_len=MAX_LEN)  # bit for bit
    assert loaded.meta["max_len"] == MAX_LEN and loaded.cfg == res.prm.cfg
    # The backbone folder is an ordinary params checkpoint (tokenizer included).
    from tuna_jax.model import load_model

    assert load_model(tmp / "prm" / "backbone").cfg.hidden_size == 32
    assert load_tokenizer(str(tmp / "prm" / "backbone")).vocab_size == 512
    with pytest.raises(FileNotFoundError, match="not a tuna-jax PRM folder"):
        P.load_prm(tmp / "prm" / "backbone")


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
    res, tmp = trained
    prm = P.load_prm(tmp / "prm")
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
    tok = load_tokenizer(str(tmp / "prm" / "backbone"))
    for row, rec, raw in zip(rows, records, written):
        assert rec.scores == sorted(rec.scores, reverse=True)
        assert sorted(rec.candidates) == sorted(c for c in row["candidates"] if c.strip())
        assert rec.output == row["output"] and raw["prm"]["model"] == str(tmp / "prm")
        for cand, score in zip(rec.candidates, rec.scores):
            assert score == pytest.approx(_expected_reward(prm, tok, row, cand), abs=1e-5)
    assert written[1]["prm"]["dropped"] == [{"index": 1, "reason": "empty_response"}]
    failed = [json.loads(x) for x in (tmp_path / "reranked.jsonl.failed.jsonl").read_text().splitlines()]
    assert [f["id"] for f in failed] == ["nothing"]


@pytest.mark.slow
def test_rerank_cli(trained, tmp_path, capsys):
    res, tmp = trained
    src = write_rows(tmp_path / "cands.jsonl", [{"instruction": "Name the first word.", "input": "cat dog sun",
                                                 "candidates": ["cat.", "dog.", "The sun is big."]}])
    out = tmp_path / "out.jsonl"
    assert prm_cmd.run_rerank(parse_config(["prm", "rerank", str(tmp / "prm"), src, str(out), "--no-progress"])) == 0
    (rec,), _ = read_records(str(out), kind="ranking")
    assert len(rec.candidates) == 3 and rec.id == "0"
    assert "items: 1, written: 1, failed: 0" in capsys.readouterr().err
    cfg = parse_config(["prm", "train", "base", "train.jsonl", "out", "--margin", "0.2", "--form", "reference"])
    assert (type(cfg), cfg.margin, cfg.form, cfg.lr, cfg.max_len) == (prm_cmd.Train, 0.2, "reference", 1e-5, 512)


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="form='pairwise'"):
        PRMSettings(form="pairwise")
    with pytest.raises(ValueError, match="margin=-1"):
        PRMSettings(margin=-1)


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
    cfg = PRMSettings(max_len=MAX_LEN, batch_size=8, epochs=1, lr=3e-3, pad_to_multiple=0, schedule="constant")

    def run(name, max_steps, resume=False):
        c = PRMSettings(**{**cfg.__dict__, "max_steps": max_steps})
        return train(P.train_config(str(base), data, tmp_path / name, c, tokenizer=str(base / "tokenizer.model"),
                                    progress=False), resume=resume)

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
    args = ["prm", "train", str(base), data, str(tmp_path / "prm"), "--max-steps", "4", "--batch-size", "8",
            "--max-len", str(MAX_LEN), "--pad-to-multiple", "0", "--tokenizer", str(base / "tokenizer.model"),
            "--no-progress"]
    assert cli(args) == 143
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err[-1].startswith("tuna-jax prm: stopped by SIGTERM after step") and "Traceback" not in "".join(err)
    assert cli(args + ["--resume"]) == 0
    assert "prm train: 4 steps" in capsys.readouterr().out

"""Diverse sampling (tuna_jax/feedback/diverse.py): the retry / temperature / fallback procedure checked
exactly with scripted "models that repeat themselves", resume, and an end-to-end run with the real sampler
on a tiny model whose output goes through the metric judge into ranking records."""
from __future__ import annotations

import json

import pytest
from rouge_score import rouge_scorer

from tuna_jax.commands.sample_diverse import DiverseSettings
from tuna_jax.data.records import DataError, read_records
from tuna_jax.feedback import diverse as D
from tuna_jax.io.errors import InputError

SAME = "the cat sat on the mat"
OTHERS = ["a red apple fell down", "seven blue whales swim far", "we should code every night",
          "music fills quiet rooms today"]
ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge(a, b):
    return ROUGE.score(a, b)["rougeL"].fmeasure


class RepeatingModel:
    """A scripted SampleFn: asked for n texts, it returns the first n of ``script[instruction][temperature]``;
    every call is recorded as (instructions, n, temperature, rng_ids)."""

    def __init__(self, script):
        self.script, self.calls = script, []

    def __call__(self, prompts, n, temperature, rng_ids):
        names = [next(k for k in self.script if f"### Instruction:\n{k}\n" in p) for p in prompts]
        self.calls.append((names, n, temperature, list(rng_ids)))
        return [list(self.script[k][temperature][:n]) for k in names]


# A repeats itself at every temperature: no trial passes; the least similar set is trial 2 (T=1.1, mean
# ROUGE-L 1/6) -- neither the first nor the last, so "keep the last" or "keep the first" would both fail.
# B repeats itself at 1.0 only; C is diverse at once.
SCRIPT = {
    "A": {1.0: [SAME] * 4, 1.1: [SAME, SAME, OTHERS[0], OTHERS[1]], 1.2: [SAME, SAME, SAME, OTHERS[2]]},
    "B": {1.0: [SAME, SAME, OTHERS[0], OTHERS[1]], 1.1: OTHERS, 1.2: [OTHERS[2]]},  # 1.2: similar mode only
    "C": {1.0: OTHERS},
}
ROWS = [{"id": "a", "instruction": "A", "output": "ref A"}, {"id": "b", "instruction": "B"},
        {"id": "c", "instruction": "C", "input": "some input", "output": "ref C"}]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def read(path):
    return [json.loads(x) for x in open(path)]


def test_set_mode_retries_temperature_steps_and_least_similar_fallback(tmp_path):
    """mode="set" (the reference code's): every retry samples the whole set again."""
    model = RepeatingModel(SCRIPT)
    out = tmp_path / "div.jsonl"
    report = D.sample_diverse_file(write_rows(tmp_path / "in.jsonl", ROWS), str(out), model,
                                   DiverseSettings(mode="set"), progress=False)
    # One call per trial with exactly the items still pending, 1.0 -> 1.1 -> 1.2, fresh noise each trial.
    assert [(names, n, t) for names, n, t, _ in model.calls] == [
        (["A", "B", "C"], 4, 1.0), (["A", "B"], 4, 1.1), (["A"], 4, 1.2)]
    ids_a = [c[3][c[0].index("A")] for c in model.calls]
    assert len(set(ids_a)) == 3 and ids_a == [D.rng_id("a", t) for t in range(3)]

    a, b, c = read(out)
    assert a["candidates"] == SCRIPT["A"][1.1]
    assert a["diversity"] == {"mode": "set", "trials": 3, "resampled": 8, "temperature": 1.1, "kept_trial": 2,
                              "max_pairwise_rougeL": 1.0, "mean_pairwise_rougeL": pytest.approx(1 / 6),
                              "fallback": True}
    assert b["candidates"] == OTHERS and b["diversity"]["trials"] == 2 and b["diversity"]["temperature"] == 1.1
    assert b["diversity"]["fallback"] is False and b["diversity"]["kept_trial"] == 2
    assert c["candidates"] == OTHERS and c["diversity"]["trials"] == 1 and c["diversity"]["temperature"] == 1.0
    for rec in (b, c):  # the recorded ROUGE-L is rouge_score's, and below tau for an accepted set
        pairs = [rouge(x, y) for i, x in enumerate(OTHERS) for y in OTHERS[i + 1:]]
        assert rec["diversity"]["max_pairwise_rougeL"] == pytest.approx(max(pairs)) and max(pairs) < 0.8
        assert rec["diversity"]["mean_pairwise_rougeL"] == pytest.approx(sum(pairs) / len(pairs))
    # The original response only where the input had one; the input field always.
    assert a["output"] == "ref A" and "output" not in b and c["input"] == "some input"

    assert (report.items, report.retries, report.fallbacks) == (3, 3, 1)
    assert report.accepted_at == [1, 1, 0] and report.attempted == [3, 2, 1]
    assert report.resampled == 12  # 2 more sets of 4 for A, 1 for B
    assert "retries: 3 (12 responses resampled), fallbacks (least similar set kept): 1" in report.line()
    assert "trial 1: 1/3 accepted, trial 2: 1/2 accepted, trial 3: 0/1 accepted" in report.line()


# mode="similar": only the too-similar responses are sampled again (the earlier of two near-copies stays).
SIMILAR = {
    "A": {1.0: [SAME, SAME, OTHERS[0], OTHERS[1]], 1.1: [OTHERS[2]]},          # slot 1 refilled: accepted
    "B": {1.0: [SAME] * 4, 1.1: [SAME, OTHERS[0], SAME], 1.2: [OTHERS[1], OTHERS[2]]},  # 3 refilled, then 2
    "C": {1.0: OTHERS},
    "D": {1.0: [SAME] * 4, 1.1: [SAME] * 3, 1.2: [SAME] * 3},                  # never diverse: falls back
}


class ExactModel(RepeatingModel):
    """Like RepeatingModel, but the script says exactly how many texts each call must ask for."""

    def __call__(self, prompts, n, temperature, rng_ids):
        out = super().__call__(prompts, n, temperature, rng_ids)
        names = self.calls[-1][0]
        assert all(len(self.script[k][temperature]) == n for k in names), (names, n, temperature)
        return out


def test_similar_mode_resamples_only_the_too_similar_responses(tmp_path):
    rows = [{"id": k.lower(), "instruction": k} for k in SIMILAR]
    model = ExactModel(SIMILAR)
    out = tmp_path / "div.jsonl"
    report = D.sample_diverse_file(write_rows(tmp_path / "in.jsonl", rows), str(out), model, DiverseSettings(),
                                   progress=False)
    # trial 1: the whole set for everyone; then one call per number of slots to refill, hotter each trial,
    # with each trial's own random streams
    assert [(names, n, t) for names, n, t, _ in model.calls] == [
        (["A", "B", "C", "D"], 4, 1.0), (["A"], 1, 1.1), (["B", "D"], 3, 1.1), (["B"], 2, 1.2), (["D"], 3, 1.2)]
    assert model.calls[2][3] == [D.rng_id("b", 1), D.rng_id("d", 1)]
    a, b, c, d = read(out)
    assert a["candidates"] == [SAME, OTHERS[2], OTHERS[0], OTHERS[1]]
    assert a["diversity"]["mode"] == "similar" and (a["diversity"]["trials"], a["diversity"]["resampled"]) == (2, 1)
    assert a["diversity"]["fallback"] is False and a["diversity"]["temperature"] == 1.1
    assert b["candidates"] == [SAME, OTHERS[1], OTHERS[0], OTHERS[2]]
    assert (b["diversity"]["trials"], b["diversity"]["resampled"], b["diversity"]["kept_trial"]) == (3, 5, 3)
    assert c["candidates"] == OTHERS and c["diversity"]["resampled"] == 0
    assert d["candidates"] == [SAME] * 4 and d["diversity"]["fallback"] is True and d["diversity"]["kept_trial"] == 1
    assert (report.retries, report.resampled, report.fallbacks) == (5, 12, 1)
    assert DiverseSettings().mode == "similar"  # the paper's description is the default
    with pytest.raises(ValueError, match="mode='both'"):
        DiverseSettings(mode="both")
    # Resuming in the other mode would mix two procedures in one file.
    with pytest.raises(InputError, match=r"other settings \(mode: 'similar' -> 'set'\)"):
        D.sample_diverse_file(str(tmp_path / "in.jsonl"), str(out), model, DiverseSettings(mode="set"),
                              progress=False)


def test_too_similar_keeps_the_earlier_of_near_copies():
    sim = D.PairwiseRougeL()
    assert D.too_similar([SAME, OTHERS[0], SAME, SAME + " today", OTHERS[1]], 0.8, sim) == [2, 3]
    assert D.too_similar(OTHERS, 0.8, sim) == []


def test_similarity_rules_and_choice():
    sim = D.PairwiseRougeL()
    # Equal texts are never diverse, even when rouge_score sees no words in them (it would say 0.0).
    assert rouge("!!!", "!!!") == 0.0 and sim.pair("!!!", " !!! ") == 1.0 and sim.pair("", "") == 1.0
    assert sim.pair("The cats sat.", "the cat sits") == pytest.approx(rouge("The cats sat.", "the cat sits"))
    assert sim.matrix(["x y", "x y", "z"]) == [1.0, 0.0, 0.0]
    # A pair at exactly tau is too similar; ties in the mean keep the earliest trial.
    t = [D.Trial(0, 1.0, [], 0.8, 0.5), D.Trial(1, 1.1, [], 0.9, 0.4), D.Trial(2, 1.2, [], 0.85, 0.4)]
    assert not t[0].accepted(0.8) and D.choose(t, 0.8) == (t[1], True)
    assert D.choose(t[:2] + [D.Trial(2, 1.2, [], 0.79, 0.6)], 0.8)[1] is False
    assert DiverseSettings().temperature_of(2) == 1.2
    with pytest.raises(ValueError, match="temperature=0"):
        DiverseSettings(temperature=0)
    with pytest.raises(ValueError, match="n must be >= 2"):
        DiverseSettings(n=1)


def test_resume_skips_finished_items_and_matches_an_uninterrupted_run(tmp_path):
    src = write_rows(tmp_path / "in.jsonl", ROWS)
    whole = tmp_path / "whole.jsonl"
    D.sample_diverse_file(src, str(whole), RepeatingModel(SCRIPT), items_per_call=1, progress=False)
    out = tmp_path / "resumed.jsonl"
    lines = whole.read_text().splitlines(keepends=True)
    out.write_text(lines[0] + lines[1][:25])  # one record, then a write torn by a kill
    (tmp_path / "resumed.jsonl.params.json").write_text((tmp_path / "whole.jsonl.params.json").read_text())
    model = RepeatingModel(SCRIPT)
    report = D.sample_diverse_file(src, str(out), model, items_per_call=1, progress=False)
    assert out.read_bytes() == whole.read_bytes()
    assert all("A" not in names for names, *_ in model.calls)  # item a was not sampled again
    assert report.items == 3 and report.fallbacks == 1  # the report covers the earlier run's records too
    # Other settings, another input, duplicate ids: clear errors naming the file.
    with pytest.raises(InputError, match=r"other settings \(tau: 0.8 -> 0.5\)"):
        D.sample_diverse_file(src, str(out), model, DiverseSettings(tau=0.5), progress=False)
    with pytest.raises(InputError, match="resumed.jsonl:1: id 'a' is not in the input"):
        D.sample_diverse_file(write_rows(tmp_path / "other.jsonl", ROWS[1:]), str(out), model, progress=False)

    def too_long(prompt, where):
        if "### Instruction:\nB\n" in prompt:
            raise ValueError(f"{where}: 999 prompt tokens, over max_prompt_len=8")

    with pytest.raises(InputError, match=r"in.jsonl:2: 999 prompt tokens"):  # before any sampling
        D.sample_diverse_file(src, str(tmp_path / "new.jsonl"), model, check_prompt=too_long, progress=False)
    with pytest.raises(DataError, match="ids must be unique"):
        D.sample_diverse_file(write_rows(tmp_path / "dup.jsonl", [ROWS[0], ROWS[0]]), str(tmp_path / "d.jsonl"),
                              model, progress=False)


@pytest.mark.slow
def test_end_to_end_real_sampler_then_metric_judge(tmp_path_factory, tmp_path):
    """The real sampler on a tiny model (the local-teacher fixture: same shapes, so its compilations are
    reused), then `judge --kind metric` of the output: ranking records."""
    from tests.unit.feedback.test_local import INSTRUCTIONS, MAX_NEW, eos_happy_model
    from tuna_jax.commands.judge import JudgeSettings
    from tuna_jax.data.rows import read_candidates
    from tuna_jax.feedback.judge import MetricJudge, run_judge

    model_dir = eos_happy_model(tmp_path_factory.mktemp("diverse") / "model")
    rows = [dict(r, id=f"i{k}") for k, r in enumerate(INSTRUCTIONS[:3])]
    src = write_rows(tmp_path / "in.jsonl", rows)
    # tau=0.05: these random texts share a word now and then, so some sets are retried (hotter) as well.
    cfg = DiverseSettings(tau=0.05, mode="set")  # whole sets: the local-teacher tests' 4-row shape only

    def run(out):  # one instruction per call: 4 sampler rows, the local-teacher tests' shape
        return D.run_diverse(str(model_dir), src, str(out), cfg, tokenizer=str(model_dir / "tokenizer.model"),
                             max_new_tokens=MAX_NEW, items_per_call=1, progress=False)

    out = tmp_path / "div.jsonl"
    report = run(out)
    assert json.loads((tmp_path / "div.jsonl.report.json").read_text()) == report.to_json()
    recs = read(out)
    assert [r["id"] for r in recs] == ["i0", "i1", "i2"] and report.items == 3
    assert report.retries >= 1  # seed 0: one set is retried twice, at 1.1 and 1.2, and falls back
    sim = D.PairwiseRougeL()
    for r in recs:
        d = r["diversity"]
        assert len(r["candidates"]) == 4 and all(isinstance(c, str) for c in r["candidates"])
        assert d["temperature"] == cfg.temperature_of(d["kept_trial"] - 1) and 1 <= d["trials"] <= 3
        pairs = sim.matrix(r["candidates"])
        assert d["max_pairwise_rougeL"] == pytest.approx(max(pairs))
        assert d["fallback"] == (d["max_pairwise_rougeL"] >= cfg.tau)
    # Deterministic: a second run (another OUT) writes the same bytes.
    again = tmp_path / "again.jsonl"
    run(again)
    assert again.read_bytes() == out.read_bytes()
    # Ready for `tuna-jax judge`: the metric judge ranks the candidates against the original output.
    assert len(read_candidates(str(out))) == 3
    ranked = tmp_path / "ranked.jsonl"
    summary = run_judge(str(out), str(ranked), MetricJudge(JudgeSettings(judge="metric")), progress=False)
    assert summary.written == 3
    records, report = read_records(str(ranked), kind="ranking", on_error="skip")
    assert len(records) + report.num_skipped == 3  # an empty sampled response is counted, not dropped silently


def test_cli_arguments(capsys):
    from tuna_jax.cli import parse_config

    cfg = parse_config(["sample-diverse", "m", "in.jsonl", "out.jsonl", "--tau", "0.7", "--max-trials", "2"])
    assert (cfg.n, cfg.tau, cfg.temperature, cfg.temperature_step, cfg.max_trials) == (4, 0.7, 1.0, 0.1, 2)
    assert cfg.mode == "similar" and parse_config(["sample-diverse", "m", "i", "o", "--mode", "set"]).mode == "set"
    assert (cfg.model, cfg.input, cfg.out) == ("m", "in.jsonl", "out.jsonl")
    with pytest.raises(SystemExit):
        parse_config(["sample-diverse", "--help"])
    help_text = capsys.readouterr().out
    assert "the paper" in help_text and "the reference code" in help_text


def test_one_run_per_output(tmp_path):
    from tuna_jax.io.lock import OutputBusyError, OutputLock

    src = write_rows(tmp_path / "in.jsonl", ROWS)
    out = tmp_path / "out.jsonl"
    with OutputLock(str(out)):  # another run is writing OUT
        with pytest.raises(OutputBusyError, match="is being written by another run"):
            D.sample_diverse_file(src, str(out), RepeatingModel(SCRIPT), progress=False)
    assert not out.exists()
    D.sample_diverse_file(src, str(out), RepeatingModel(SCRIPT), progress=False)
    assert len(out.read_text().splitlines()) == len(ROWS) and not (tmp_path / "out.jsonl.lock").exists()

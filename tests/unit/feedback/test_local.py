"""The local teacher backend (tuna_jax/feedback/local.py): sampled log-probs against `tuna-jax score`, and a
teacher run with it writing ranking records (s = logp / |r|^beta), resumed from its store.

The model is a tiny random LLaMA edited so that EOS has ~15% probability per step (see
``eos_happy_model``): within 16 new tokens it yields both stopped and length-cut samples, and its random
byte-level pieces often decode to text whose canonical tokens differ from the sampled ones, so every path
(EOS included, no EOS, re-scored) is exercised. Every test uses one sampler shape (batch 8, 16 new tokens)
so the sampler compiles once per process (test_diverse.py reuses it)."""
from __future__ import annotations

import json
import math
import pathlib

import pytest

from tuna_jax.cli import parse_config
from tuna_jax.commands import teacher as teacher_cmd
from tuna_jax.commands.teacher import TeacherSettings
from tuna_jax.data.records import read_records
from tuna_jax.data.templates import format_prompt
from tuna_jax.feedback import teacher as T
from tuna_jax.feedback.local import LocalTeacher, stable_rng_id
from tuna_jax.llm_api.replies import ReplyError
from tuna_jax.llm_api.store import Store

MAX_NEW = 16
TINY = {"vocab_size": 512, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
# Short and without input: every prompt falls in the sampler's 128-token bucket (one compile).
INSTRUCTIONS = [
    {"instruction": "Tell me a story.", "input": "", "output": "Once upon a time."},
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Repeat the word cat.", "input": "", "output": "cat"},
    {"instruction": "Count to three.", "input": "", "output": "one two three"},
    {"instruction": "Say hello.", "input": "", "output": "Hello."},
]


def eos_happy_model(out_dir, eos_logit_scale: float = 0.45):
    """A tiny random LLaMA (stories260K tokenizer) that stops often, saved as a params checkpoint.

    Every input embedding gets a large constant in dimension 0, so the final hidden state's dimension 0
    is large and positive everywhere (~5.6); the lm_head row 0 is zero except for EOS and the pieces it
    suppresses. EOS then has a logit of about +2.5 over ~250 near-uniform word pieces: P(EOS) ~ 5% per step.
    """
    import jax
    import numpy as np
    from flax import nnx

    from tuna_jax.assets import stories260k_hf_dir
    from tuna_jax.model.checkpoint import save_params
    from tuna_jax.model.llama import LlamaConfig, abstract_model

    out_dir = pathlib.Path(out_dir)
    # Parameters drawn with numpy: jax's PRNG would compile one kernel per shape (~10 s on 2 CPU cores).
    graphdef, state = nnx.split(abstract_model(LlamaConfig.from_hf(TINY)))
    rng = np.random.default_rng(0)
    values = jax.tree_util.tree_map_with_path(
        lambda path, x: (np.ones(x.shape, np.float32) if "norm" in jax.tree_util.keystr(path)
                         else rng.normal(0.0, 0.02, x.shape).astype(np.float32)), nnx.to_pure_dict(state))
    values["embed_tokens"][:, 0] = 3.0
    values["lm_head"][0, :] = 0.0
    values["lm_head"][0, 2] = eos_logit_scale
    # <unk>, <s> and the 256 byte-fallback pieces <0x00>..<0xFF> (ids 3..258) get a logit of about -12:
    # never sampled, so texts are whole pieces and re-encode to about as many tokens (one length bucket).
    values["lm_head"][0, [0, 1] + list(range(3, 259))] = -2.0
    nnx.replace_by_pure_dict(state, values)
    m = nnx.merge(graphdef, state)
    return save_params(out_dir, m, tokenizer_src=stories260k_hf_dir(out_dir.parent / "tuna-cache"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return eos_happy_model(tmp_path_factory.mktemp("local_teacher") / "teacher")


@pytest.fixture(scope="module")
def model(model_dir):
    from tuna_jax.model import load_model

    return load_model(model_dir)


def teacher_for(model, model_dir, **kw):
    # tokenizer.model directly: sentencepiece, without importing transformers (~5 s) for the folder's
    # tokenizer_config.json; the same pieces either way.
    return LocalTeacher(str(model_dir), model=model, tokenizer=str(model_dir / "tokenizer.model"),
                        max_new_tokens=MAX_NEW, batch_size=8, **kw)


def tuna_score(model, model_dir, tmp_path, lines):
    """`tuna-jax score` (its implementation, one device) of JSONL ``lines`` -> the output records."""
    from tuna_jax.scoring import make_candidate_encoder, score_file

    src, out = tmp_path / "score_in.jsonl", tmp_path / "score_out.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    encoder = make_candidate_encoder(str(model_dir / "tokenizer.model"))
    score_file(model, str(src), str(out), encoder=encoder, progress=False)
    return [json.loads(x) for x in out.read_text().splitlines()]


@pytest.mark.slow
def test_sampled_and_scored_logprobs_equal_tuna_jax_score(model, model_dir, tmp_path):
    # Seed 5 gives 11 stopped (one empty), 9 length-cut and 3 non-canonical samples of 20.
    never = teacher_for(model, model_dir, rescore="never", seed=5)
    teacher = teacher_for(model, model_dir, seed=5)  # rescore="noncanonical", the default
    tok = teacher.tokenizer
    lines, expect, kinds = [], [], {"stop": 0, "length": 0, "noncanonical": 0}
    for row in INSTRUCTIONS:
        prompt = format_prompt(row["instruction"], row["input"])
        prompt_ids = teacher.sampler.encode(prompt)
        raw = teacher.sampler.generate([prompt_ids], teacher.params, n=4, rng_ids=[stable_rng_id(prompt)])[0]
        sampled, exact = never.sample(prompt, 4), teacher.sample(prompt, 4)
        for g, s, e in zip(raw, sampled, exact):
            assert s.text == e.text == g.text and s.finish_reason == e.finish_reason == g.finish_reason
            assert s.token_logprobs == g.token_logprobs  # rescore="never": the sampler's own values
            kinds[g.finish_reason] += 1
            # (1) the sampled tokens, teacher-forced by `tuna-jax score` (pre-tokenised: exactly those ids).
            lines.append({"prompt_ids": prompt_ids, "candidate_ids": [g.token_ids]})
            expect.append((sum(s.token_logprobs), len(s.token_logprobs)))
            # (2) the text as the student sees it: `tuna-jax score` of the text (+ EOS when it stopped).
            canonical = tok.encode_continuation(g.text) if g.text else []
            stop = [g.token_ids[-1]] if g.finish_reason == "stop" else []
            kinds["noncanonical"] += canonical + stop != g.token_ids
            if g.finish_reason == "stop":
                if not g.text:
                    continue  # an empty response: `score` refuses it, the teacher drops it
                lines.append({"instruction": row["instruction"], "input": row["input"], "candidates": [g.text]})
            else:
                lines.append({"prompt_ids": prompt_ids, "candidate_ids": [canonical]})
            expect.append((sum(e.token_logprobs), len(e.token_logprobs)))
    # score(): given responses, response tokens + EOS, as the text lines of `tuna-jax score`.
    row = INSTRUCTIONS[2]
    responses = ["cat", " cat cat", "The cat sat on the mat.", ""]
    scored = teacher.score(format_prompt(row["instruction"], row["input"]), responses)
    assert scored[-1].token_logprobs == [] and T.check_logprobs(scored[-1]) == "empty_response"
    lines.append({**row, "candidates": responses[:-1]})
    expect.append([(sum(s.token_logprobs), len(s.token_logprobs)) for s in scored[:-1]])
    # The fixture model must exercise every path.
    assert kinds["stop"] >= 2 and kinds["length"] >= 2 and kinds["noncanonical"] >= 1, kinds
    assert teacher.stats.rescored == teacher.stats.noncanonical >= 1
    got = tuna_score(model, model_dir, tmp_path, lines)  # one call: one Scorer, compiled once per length
    assert len(got) == len(lines)
    for line, out, want in zip(lines, got, expect):
        want = want if isinstance(want, list) else [want]
        assert out["num_tokens"] == [n for _, n in want], line
        for lp, (logp, _) in zip(out["logprob_sum"], want):
            assert abs(lp - logp) <= 1e-4, (line, out, want)


def _read(path):
    return pathlib.Path(path).read_bytes()


def test_teacher_run_writes_ranking_records_and_resumes(model, model_dir, tmp_path):
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(INSTRUCTIONS))
    out, store_path = tmp_path / "ranked.jsonl", tmp_path / "store.jsonl"
    cfg = TeacherSettings(n=4, beta=1.3, max_tokens=MAX_NEW, min_candidates=1)

    def run():
        with Store(store_path) as store:
            backend = teacher_for(model, model_dir, store=store)
            summary = T.run_teacher(str(data), str(out), backend, cfg, meta={"model": "tiny", "api": "local"},
                                    concurrency=1, progress=False)
            return summary, backend.stats

    summary, stats = run()
    assert stats.cache_hits == 0 and stats.samples == 4 * len(INSTRUCTIONS)
    records, report = read_records(str(out), kind="ranking")
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert report.num_skipped == 0 and len(records) == len(rows) == summary.written
    assert summary.written + summary.failed == len(INSTRUCTIONS)
    for rec, row in zip(records, rows):
        assert rec.candidates == row["candidates"] and rec.scores == row["scores"]
        assert rec.scores == sorted(rec.scores, reverse=True)
        for s, lp, n in zip(row["scores"], row["logprobs"], row["num_tokens"]):
            assert n >= 1 and lp <= 0
            assert s == pytest.approx(lp / n ** 1.3, rel=1e-12)  # s = logp / |r|^beta
        assert row["teacher"]["n"] == 4 and row["teacher"]["beta"] == 1.3
    first = _read(out)

    # A rerun answers every item from the store and writes the same bytes.
    summary2, stats2 = run()
    assert stats2.cache_hits == len(INSTRUCTIONS) and stats2.samples == 0
    assert _read(out) == first


@pytest.mark.slow
def test_teacher_cli_local_model(model_dir, tmp_path, capsys):
    """`tuna-jax teacher INPUT OUT --local-model PATH` (no --model, no endpoint) through commands/teacher.run."""
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(INSTRUCTIONS[:2]))
    out = tmp_path / "ranked.jsonl"
    base = ["teacher", str(data), str(out), "--max-tokens", str(MAX_NEW), "--min-candidates", "1", "--no-progress"]
    with pytest.raises(ValueError, match="--model is required"):
        teacher_cmd.run(parse_config(base))
    rc = teacher_cmd.run(parse_config(base + ["--local-model", str(model_dir), "--local-batch-size", "8",
                                              "--local-tokenizer", str(model_dir / "tokenizer.model")]))
    assert rc in (0, 1)  # 1 only if every sample of an instruction was empty
    assert (tmp_path / "ranked.jsonl.store.jsonl").is_file()
    records, _ = read_records(str(out), kind="ranking")
    assert records and all(len(r.candidates) <= 4 for r in records)
    row = json.loads(out.read_text().splitlines()[0])
    assert row["teacher"]["api"] == "local" and row["teacher"]["model"] == str(model_dir)
    assert "teacher (local): samples=8" in capsys.readouterr().err


def test_bad_settings_are_clear_errors(model, model_dir):
    with pytest.raises(ValueError, match="rescore='sometimes'"):
        teacher_for(model, model_dir, rescore="sometimes")
    teacher = teacher_for(model, model_dir, max_prompt_len=8)
    with pytest.raises(ReplyError, match="over max_prompt_len=8"):
        teacher.sample(format_prompt("Say hello."), 4)
    assert math.isfinite(stable_rng_id("x")) and stable_rng_id("x") == stable_rng_id("x") != stable_rng_id("y")

"""The sampler (tuna_jax/generate.py): KV-cache decoding against full recomputation and HF generate,
token log-probs against a teacher-forced forward, seeds, filters, EOS, a (2,2,2) mesh, the stories260K
golden text, and `tuna-jax generate` end to end with resume.

Most tests share one tiny model and one (batch 8, prompt bucket 8, 16 new tokens) shape, so the
sampler compiles once for them (compiles dominate the run time on CPU)."""
from __future__ import annotations

import io
import json
import pathlib
import re

import jax
import numpy as np
import pytest
from flax import nnx

from tests.support.hf_utils import save_hf, tiny_hf_model
from tuna_jax import generate as gen
from tuna_jax.generate import Sampler, SamplingParams
from tuna_jax.model import load_model

torch = pytest.importorskip("torch")

T = 16  # max_new_tokens in the shared shape
EOS = 2
# Lengths 1..8 (one prompt bucket, left padding exercised); 5 prompts -> an 8-row batch with 3 dummy rows.
PROMPTS = [[1, 17, 99, 4, 63], [1], [1, 50, 7], [1, 8, 120, 33, 5, 77, 90, 12], [1, 64, 3, 101]]


@pytest.fixture(scope="module")
def hf_model():
    return tiny_hf_model(seed=0, num_kv_heads=2)


@pytest.fixture(scope="module")
def model_dir(hf_model, tmp_path_factory):
    return save_hf(hf_model, tmp_path_factory.mktemp("tiny_hf"))


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(model_dir)


@pytest.fixture(scope="module")
def sampler(model):
    return Sampler(model, batch_size=8)


@pytest.fixture(scope="module")
def full_logprobs(model):
    """ids [L] -> [L, V] float32 log-softmax of a plain forward (no cache), padded to 32 (one compile)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def fwd(state, ids, seg):
        return jax.nn.log_softmax(nnx.merge(graphdef, state)(ids, segment_ids=seg), axis=-1)

    def run(ids):
        n = len(ids)
        assert n <= 32
        padded = np.zeros((1, 32), np.int32)
        seg = np.zeros((1, 32), np.int32)
        padded[0, :n], seg[0, :n] = ids, 1
        return np.asarray(fwd(state, padded, seg))[0, :n]

    return run


def recompute_greedy(full_logprobs, prompt, steps, stop=(EOS,)):
    """Greedy decoding by full recomputation every step: (tokens, logprobs, finish_reason)."""
    ids, lps = list(prompt), []
    for _ in range(steps):
        lp = full_logprobs(ids)[-1]
        tok = int(np.argmax(lp))
        ids.append(tok)
        lps.append(float(lp[tok]))
        if tok in stop:
            return ids[len(prompt):], lps, "stop"
    return ids[len(prompt):], lps, "length"


@pytest.fixture(scope="module")
def greedy_out(sampler):
    return sampler.generate(PROMPTS, SamplingParams.greedy(T))


def test_greedy_kv_cache_equals_full_recomputation(greedy_out, full_logprobs):
    assert [len(o) for o in greedy_out] == [1] * len(PROMPTS)
    for prompt, (s,) in zip(PROMPTS, greedy_out):
        tokens, lps, reason = recompute_greedy(full_logprobs, prompt, T)
        assert s.token_ids == tokens
        assert s.finish_reason == reason
        assert np.max(np.abs(np.array(s.token_logprobs) - lps)) <= 1e-4
        assert s.sampling_logprobs == [0.0] * len(tokens)  # greedy: a point mass
        assert s.text is None  # no tokenizer
    # some row must exercise each path of the test
    assert any(s.finish_reason == "length" for (s,) in greedy_out)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, seed=1, max_new_tokens=T),
    SamplingParams(temperature=0.7, top_p=0.8, seed=2, max_new_tokens=T),
    SamplingParams(temperature=1.3, top_k=5, seed=3, max_new_tokens=T),
])
def test_token_logprobs_equal_teacher_forced_forward(sampler, full_logprobs, params):
    out = sampler.generate(PROMPTS[:4], params, n=2)
    for prompt, samples in zip(PROMPTS, out):
        assert len(samples) == 2
        for s in samples:
            lp = full_logprobs(prompt + s.token_ids)
            n = len(prompt)
            want = [lp[n - 1 + t, tok] for t, tok in enumerate(s.token_ids)]
            assert np.max(np.abs(np.array(s.token_logprobs) - want)) <= 1e-4
            if s.finish_reason == "stop":
                assert s.token_ids[-1] == EOS and EOS not in s.token_ids[:-1]
            else:
                assert len(s.token_ids) == T and EOS not in s.token_ids
            # the filters and the sampling distribution's log-probs
            for t, tok in enumerate(s.token_ids):
                scaled = lp[n - 1 + t] / params.temperature
                order = np.argsort(-scaled, kind="stable")
                keep = np.ones_like(scaled, bool)
                if params.top_k:
                    keep[order[params.top_k:]] = False
                if params.top_p < 1:
                    p = np.exp(scaled - scaled.max()) * keep
                    p = p[order] / p.sum()
                    before = np.cumsum(p) - p
                    keep[order[before >= params.top_p]] = False
                assert keep[tok], f"token {tok} outside the top-k/top-p set at step {t}"
                q = np.where(keep, scaled, -np.inf)
                q = q - q.max() - np.log(np.sum(np.exp(q - q.max())))
                assert abs(s.sampling_logprobs[t] - q[tok]) <= 1e-4


def test_seed_reproduces_and_differs(sampler):
    p = SamplingParams(temperature=1.0, seed=7, max_new_tokens=T)
    a = sampler.generate(PROMPTS[:4], p, n=2)
    b = sampler.generate(PROMPTS[:4], p, n=2)
    c = sampler.generate(PROMPTS[:4], SamplingParams(temperature=1.0, seed=8, max_new_tokens=T), n=2)
    ids = lambda out: [[s.token_ids for s in o] for o in out]  # noqa: E731
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)
    assert a[0][0].token_ids != a[0][1].token_ids  # the n samples of a prompt differ
    # A sample depends on (seed, prompt, rng_id, j) only: not on the other rows of its batch, its
    # row in the batch or the call's order.
    mixed = sampler.generate([PROMPTS[3], PROMPTS[4], PROMPTS[0], PROMPTS[2]], p, n=2, rng_ids=[3, 4, 0, 2])
    assert [ids(mixed)[0], ids(mixed)[2], ids(mixed)[3]] == [ids(a)[3], ids(a)[0], ids(a)[2]]


def test_top_k_1_is_greedy(sampler, greedy_out):
    out = sampler.generate(PROMPTS, SamplingParams(temperature=1.0, top_k=1, seed=5, max_new_tokens=T))
    for (s,), (g,) in zip(out, greedy_out):
        assert s.token_ids == g.token_ids and s.finish_reason == g.finish_reason
        assert np.allclose(s.token_logprobs, g.token_logprobs, atol=1e-6)
        assert s.sampling_logprobs == [0.0] * len(s.token_ids)


def test_eos_stops_a_row(model, greedy_out, full_logprobs):
    row = next(i for i, (s,) in enumerate(greedy_out) if len(set(s.token_ids[:6])) == 6)
    stop = greedy_out[row][0].token_ids[3]  # first occurs at step 3 in that row
    out = Sampler(model, batch_size=8, stop_ids=[stop]).generate(PROMPTS, SamplingParams.greedy(T))
    assert out[row][0].token_ids == greedy_out[row][0].token_ids[:4]
    assert out[row][0].finish_reason == "stop"
    for prompt, (s,) in zip(PROMPTS, out):  # every row: cut at its own first stop id, or runs to the end
        tokens, _, reason = recompute_greedy(full_logprobs, prompt, T, stop=(stop,))
        assert (s.token_ids, s.finish_reason) == (tokens, reason)
    assert any(s.finish_reason == "length" for (s,) in out)


def test_no_recompile_within_a_length_bucket(sampler):
    prefill, decode = gen._kernels()
    p = SamplingParams(temperature=0.9, top_p=0.9, max_new_tokens=T)
    sampler.generate(PROMPTS, p)
    before = (prefill._cache_size(), decode._cache_size())
    # other lengths in the same bucket, other sampling parameters: no new compilation
    sampler.generate([[1, 2, 3, 4, 5, 6, 7], [9], [4, 5]], SamplingParams(temperature=0.5, top_k=3, seed=9,
                                                                       max_new_tokens=T), n=2)
    sampler.generate([[4, 5], [1, 2, 3, 4]] * 3, SamplingParams.greedy(T))
    assert (prefill._cache_size(), decode._cache_size()) == before


def test_greedy_matches_hf_generate(hf_model, greedy_out):
    for prompt, (s,) in zip(PROMPTS, greedy_out):
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                    do_sample=False, max_new_tokens=T, eos_token_id=EOS, pad_token_id=0)
        hf = out[0, len(prompt):].tolist()
        if EOS in hf:
            hf = hf[:hf.index(EOS) + 1]
        assert s.token_ids == hf


def test_mesh_222_matches_one_device(model_dir, sampler, greedy_out):
    from tuna_jax import parallel

    if jax.device_count() < 8:
        pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax import")
    mesh = parallel.make_mesh((2, 2, 2))
    sharded = Sampler(load_model(model_dir, mesh), mesh=mesh, batch_size=8)
    out = sharded.generate(PROMPTS, SamplingParams.greedy(T))
    assert [s.token_ids for (s,) in out] == [g.token_ids for (g,) in greedy_out]
    for (s,), (g,) in zip(out, greedy_out):
        assert np.allclose(s.token_logprobs, g.token_logprobs, atol=1e-5)
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_new_tokens=T)
    assert [[x.token_ids for x in o] for o in sharded.generate(PROMPTS, p)] == \
        [[x.token_ids for x in o] for o in sampler.generate(PROMPTS, p)]


def test_bad_arguments(sampler):
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match="prompt 1: token id 128 is outside the vocabulary"):
        sampler.generate([[1], [1, 128]], SamplingParams.greedy(4))
    with pytest.raises(ValueError, match="prompt 0: the prompt has no tokens"):
        sampler.generate([[]], SamplingParams.greedy(4))
    with pytest.raises(ValueError, match="max_position_embeddings=128"):
        sampler.generate([[1] * 100], SamplingParams.greedy(29))
    with pytest.raises(ValueError, match="needs a tokenizer"):
        sampler.generate(["hello"], SamplingParams.greedy(4))


# ---- stories260K golden -------------------------------------------------------------------------

@pytest.mark.slow
def test_stories260k_greedy_reproduces_golden_text(shared_dir, tmp_path):
    llama2c = pytest.importorskip("tuna_jax.assets.llama2c")
    from tuna_jax.data.templates import load_tokenizer

    src = shared_dir / "models" / "stories260K"
    out = llama2c.convert_llama2c_to_hf(src / "stories260K.bin", src / "tok512.bin", tmp_path / "hf")
    md = (src / "stories260K_doc_from_llama2c.md").read_text(encoding="utf-8")
    block = re.search(r"```[^\n]*\n(.*?)\n```", md[md.index("temperature 0.0"):], re.S).group(1)
    golden = block[block.index("Once upon a time"):].strip()
    assert len(golden) > 400

    tok = load_tokenizer(out)
    sampler = Sampler(load_model(out), tok, batch_size=1)
    (s,), = sampler.generate([[tok.bos_id]], SamplingParams.greedy(256))
    text = tok.decode(s.token_ids)
    common = next((i for i, (a, b) in enumerate(zip(text, golden)) if a != b), min(len(text), len(golden)))
    assert common >= 200, f"only {common} characters match:\n{text[:300]!r}\nvs\n{golden[:300]!r}"
    assert s.text.lstrip().startswith(golden[:200])  # decode_continuation keeps the first token's space


# ---- `tuna-jax generate` ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_model_dir(model_dir, tmp_path_factory):
    """The tiny model (vocab 128) with a 128-piece sentencepiece tokenizer trained here."""
    import shutil

    spm = pytest.importorskip("sentencepiece")
    from tuna_jax.data.templates import PROMPT_INPUT, PROMPT_NO_INPUT

    text = [PROMPT_INPUT, PROMPT_NO_INPUT, "Name a colour.", "Add the numbers 2 and 3.",
            "The quick brown fox jumps over the lazy dog.", "Once upon a time there was a girl named Lily."] * 20
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=proto, vocab_size=128,
                                   model_type="bpe", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
                                   pad_id=-1, minloglevel=2)
    out = tmp_path_factory.mktemp("cli_model")
    for f in model_dir.iterdir():
        shutil.copy(f, out / f.name)
    (out / "tokenizer.model").write_bytes(proto.getvalue())
    return out


LINES = [
    {"id": "a", "instruction": "Name a colour."},
    {"id": "b", "instruction": "Add the numbers.", "input": "2 and 3"},
    {"id": "c", "prompt": "Once upon a time"},
    {"prompt_ids": [1, 40, 41, 42]},
    {"id": 5, "prompt": "The quick brown fox"},
]


def _cli(args):
    from tuna_jax.cli import main
    return main(args)


@pytest.mark.slow
def test_cli_generate_end_to_end_and_resume(cli_model_dir, tmp_path, capsys):
    from tuna_jax.data.templates import SpecialTokenPolicy, encode_prompt, format_prompt, load_tokenizer

    data = tmp_path / "in.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in LINES[:3]) + "\n\n" +
                    "\n".join(json.dumps(x) for x in LINES[3:]) + "\n")
    out = tmp_path / "out.jsonl"
    args = ["generate", str(cli_model_dir), str(data), str(out), "--n", "2", "--temperature", "0.8", "--top-p", "0.95",
            "--max-new-tokens", str(T), "--seed", "3", "--batch-size", "16"]
    assert _cli(args) == 0
    full = out.read_text()
    recs = [json.loads(x) for x in full.splitlines()]
    assert [r["index"] for r in recs] == list(range(5))
    assert [r.get("id") for r in recs] == ["a", "b", "c", None, 5] and "id" not in recs[3]
    tok = load_tokenizer(cli_model_dir)
    for r in recs:
        assert len(r["samples"]) == 2
        for s in r["samples"]:
            assert set(s) == {"text", "token_ids", "token_logprobs", "finish_reason"}
            assert len(s["token_ids"]) == len(s["token_logprobs"]) >= 1
            assert s["finish_reason"] in ("stop", "length")
            body = s["token_ids"][:-1] if s["finish_reason"] == "stop" else s["token_ids"]
            assert s["text"] == tok.decode_continuation(body)

    # The same prompts through the library (here a raw prompt + BOS, ids as given; the Alpaca-template
    # lines are checked by text above), each seeded by its line index, give the same samples.
    from tuna_jax import parallel
    mesh = parallel.make_mesh(None)  # the CLI's default mesh: every device on fsdp (shares its compilation)
    pol = SpecialTokenPolicy()
    prompts = [encode_prompt(tok, "Once upon a time", pol), [1, 40, 41, 42],
               encode_prompt(tok, "The quick brown fox", pol)]
    assert encode_prompt(tok, format_prompt("Name a colour."), pol)[0] == 1
    lib = Sampler(load_model(cli_model_dir, mesh), tok, mesh=mesh, batch_size=16).generate(
        prompts, SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=T, seed=3), n=2, rng_ids=[2, 3, 4])
    for r, samples in zip(recs[2:], lib):
        assert [s["token_ids"] for s in r["samples"]] == [s.token_ids for s in samples]
        assert [s["text"] for s in r["samples"]] == [s.text for s in samples]

    # Resume: keep two lines plus a torn third; the rerun regenerates only the rest, with the same
    # samples (log-probs to float rounding: the resumed lines run in a batch of another shape).
    lines = full.splitlines(keepends=True)
    out.write_text(lines[0] + lines[1] + lines[2][:25])
    capsys.readouterr()
    assert _cli(args) == 0
    assert "resuming: 2 of 5 lines" in capsys.readouterr().err
    resumed = out.read_text()
    assert resumed.startswith(lines[0] + lines[1])
    again = [json.loads(x) for x in resumed.splitlines()]
    assert len(again) == 5
    for r, q in zip(recs, again):
        assert (r["index"], r.get("id")) == (q["index"], q.get("id"))
        for s, u in zip(r["samples"], q["samples"]):
            assert (s["token_ids"], s["text"], s["finish_reason"]) == (u["token_ids"], u["text"], u["finish_reason"])
            assert np.allclose(s["token_logprobs"], u["token_logprobs"], atol=1e-5)
    assert _cli(args) == 0  # all done: nothing regenerated
    assert out.read_text() == resumed

    # Resuming with other sampling settings would mix two distributions in one file: an error.
    assert _cli(args[:-4] + ["--seed", "4", "--batch-size", "16"]) == 2
    assert "other settings (seed: 3 -> 4)" in capsys.readouterr().err


@pytest.mark.parametrize("line,message", [
    ('{"instruction": "x"', "in.jsonl:2: not valid JSON"),
    ('{"input": "x"}', "in.jsonl:2: missing field 'instruction'"),
    ('{"prompt_ids": [1, 500]}', "in.jsonl:2: token id 500 is outside the vocabulary"),
    ('{"prompt_ids": [1, "a"]}', "in.jsonl:2: field 'prompt_ids' must be a list of integer"),
    ('{"prompt": "x", "instruction": "y"}', "in.jsonl:2: give exactly one of"),
    ('{"prompt_ids": []}', "in.jsonl:2: the prompt has no tokens"),
])
def test_cli_bad_lines_name_file_and_line(cli_model_dir, tmp_path, capsys, line, message):
    data = tmp_path / "in.jsonl"
    data.write_text('{"prompt": "ok"}\n' + line + "\n")
    out = tmp_path / "out.jsonl"
    assert _cli(["generate", str(cli_model_dir), str(data), str(out), "--max-new-tokens", "4"]) == 2
    assert re.search(re.escape(message), capsys.readouterr().err)
    assert not out.exists()


@pytest.mark.slow
def test_sigterm_stops_generate_with_143_and_a_rerun_finishes(tmp_path):
    """SIGTERM while generating: the lines written so far stay, the process exits 143 with one line, and the
    rerun writes only the rest (every line once, in input order)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tuna_jax.assets import stories260k_hf_dir

    model = stories260k_hf_dir(tmp_path / "cache")
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Once upon a time {i}"}) + "\n" for i in range(48)))
    out = tmp_path / "out.jsonl"
    repo = str(pathlib.Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "tuna_jax.cli", "generate", str(model), str(data), str(out), "--batch-size", "4",
           "--max-new-tokens", "24"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (out.exists() and out.read_text().count("\n") >= 4):
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "tuna-jax generate: stopped by SIGTERM; rerun the same command to continue"
    kept = out.read_text().count("\n")
    assert 4 <= kept < 48
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert [json.loads(x)["index"] for x in out.read_text().splitlines()] == list(range(48))

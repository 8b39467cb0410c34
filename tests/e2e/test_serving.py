"""Generation through a real serving engine: `transformers serve` on 127.0.0.1 serving stories260K's HF folder.

`generate --base-url` at temperature 0 writes what `tuna-jax generate` writes, token for token (the server counts the
same prompt and completion tokens, and the texts are equal); `sample-diverse --base-url` writes the local sampler's
record format and counters, and a rerun sends nothing; a server that ignores `n` (this one does) stops at the first
prompt with the fix in one line; `eval run` with ``generation.base_url`` sends the local prompts and records the
server's answers;
`judge` goes through the chat API end to end (a 260K-parameter story model cannot rank, so every record fails, by
cause, with the replies kept)."""
from __future__ import annotations

import json
import shutil

import pytest
import yaml

from tests.support.transformers_server import TransformersServer
from tests.unit.eval.test_run import lmentry_task, ni_checkout
from tuna_jax.assets import stories260k_hf_dir
from tuna_jax.cli import main as cli
from tuna_jax.data.templates import SpecialTokenPolicy, encode_prompt, format_prompt, load_tokenizer

pytestmark = pytest.mark.xdist_group("serving")  # one server for the module

PROMPTS = [{"id": "a", "instruction": "Tell me a story about a cat."},
           {"id": "b", "instruction": "What did Lily find in the park?"},
           {"id": "c", "instruction": "Write a short poem.", "input": "The sun"},
           {"id": "d", "prompt": "Once upon a time"}]


@pytest.fixture(scope="module")
def served():
    with TransformersServer() as srv:  # serves the folder each request names
        yield srv


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _read(path):
    return [json.loads(x) for x in open(path, encoding="utf-8") if x.strip()]


def _lead(text: str) -> str:
    """The text without the first token's leading space: transformers' detokenizer drops it (so does
    ``tokenizer.decode``), ours keeps the continuation's space."""
    return text[1:] if text.startswith(" ") else text


def test_generate_greedy_equals_local_sampler_token_for_token(served, tmp_path, capsys):
    model = str(stories260k_hf_dir())
    prompts = _write(tmp_path / "p.jsonl", PROMPTS)
    flags = ["--temperature", "0", "--max-new-tokens", "40"]
    assert cli(["generate", model, prompts, str(tmp_path / "local.jsonl"), *flags]) == 0
    out = str(tmp_path / "served.jsonl")
    assert cli(["generate", model, prompts, out, *flags, "--base-url", served.base_url]) == 0
    local, remote = _read(tmp_path / "local.jsonl"), _read(out)
    tok = load_tokenizer(model)
    usage = [json.loads(x)["usage"] for x in open(out + ".store.jsonl")]
    assert len(usage) == len(PROMPTS)  # one request per prompt, every one answered
    want = []
    for row, ours, theirs in zip(PROMPTS, local, remote):
        a, b = ours["samples"][0], theirs["samples"][0]
        assert _lead(b["text"]) == _lead(a["text"]) and a["text"].strip()
        assert b["finish_reason"] == a["finish_reason"] and b["token_ids"] is None
        text = row.get("prompt") or format_prompt(row["instruction"], row.get("input", ""))
        want.append({"prompt_tokens": len(encode_prompt(tok, text, SpecialTokenPolicy())),
                     "completion_tokens": len(a["token_ids"])})
    # The server saw our prompts (the Alpaca template, BOS added by its tokenizer) and generated our tokens (the
    # store keeps the replies in the order they came).
    key = lambda u: (u["prompt_tokens"], u["completion_tokens"])  # noqa: E731
    assert sorted(usage, key=key) == sorted(want, key=key)
    # A rerun resumes: every line is done, nothing is sent.
    capsys.readouterr()
    assert cli(["generate", model, prompts, out, *flags, "--base-url", served.base_url]) == 0
    assert _read(out) == remote and len(open(out + ".store.jsonl").readlines()) == len(PROMPTS)


# What the local sampler writes (tests/unit/feedback/test_diverse.py holds it to the procedure): a record's fields and
# its diversity record's, and OUT.report.json's counters.
RECORD_KEYS = ["id", "instruction", "input", "output", "candidates", "diversity"]
DIVERSITY_KEYS = ["mode", "trials", "resampled", "temperature", "kept_trial", "max_pairwise_rougeL",
                  "mean_pairwise_rougeL", "fallback"]


def test_sample_diverse_served_has_the_local_format_and_a_rerun_sends_nothing(served, tmp_path, capsys):
    from tuna_jax.feedback.diverse import DiverseReport

    model = str(stories260k_hf_dir())
    items = _write(tmp_path / "in.jsonl", [{"id": i, "instruction": f"Tell me about a {w}.", "output": w}
                                           for i, w in enumerate(["dog", "tree", "ball"])])
    out = str(tmp_path / "served.jsonl")
    flags = ["--n", "2", "--max-new-tokens", "16", "--no-progress", "--base-url", served.base_url,
             "--n-per-request", "1"]
    assert cli(["sample-diverse", model, items, out, *flags]) == 0
    first = capsys.readouterr().err
    remote = _read(out)
    assert [r["id"] for r in remote] == [0, 1, 2] and [r["output"] for r in remote] == ["dog", "tree", "ball"]
    for rec in remote:
        assert list(rec) == RECORD_KEYS and list(rec["diversity"]) == DIVERSITY_KEYS
        assert len(rec["candidates"]) == 2 and all(isinstance(c, str) for c in rec["candidates"])
        assert rec["diversity"]["mode"] == "similar"
    rep = json.loads(open(out + ".report.json").read())
    assert rep == DiverseReport.from_records(remote, 3).to_json() and rep["items"] == 3 and rep["attempted"][0] == 3
    # One request per response: 2 for each item's first trial, 1 for each response a further trial resampled.
    assert "0 from cache" in first and 2 * 3 + rep["resampled"] == len(open(out + ".store.jsonl").readlines())
    # The rerun reads OUT (nothing to do) and sends nothing; a new OUT with the same store is answered by it.
    assert cli(["sample-diverse", model, items, out, *flags]) == 0
    assert "0 sent" in capsys.readouterr().err and _read(out) == remote
    again = str(tmp_path / "again.jsonl")
    assert cli(["sample-diverse", model, items, again, *flags, "--store", out + ".store.jsonl"]) == 0
    assert "0 sent" in capsys.readouterr().err and _read(again) == remote


def test_server_that_ignores_n_stops_at_the_first_prompt_with_the_fix(served, tmp_path, capsys):
    items = _write(tmp_path / "in.jsonl", [{"instruction": f"Say {w}."} for w in ("a", "b", "c", "d")])
    out = str(tmp_path / "out.jsonl")
    status = cli(["sample-diverse", str(stories260k_hf_dir()), items, out, "--n", "2", "--max-new-tokens", "8",
                  "--no-progress", "--base-url", served.base_url, "--concurrency", "1"])
    err = capsys.readouterr().err
    assert status == 2 and "--n-per-request 1" in err and "returned 1" in err
    # The first prompt's request, sent 1 + 2 times (the retries of a reply that cannot be used); the other three
    # prompts are never sent, and nothing is written.
    assert len(open(out + ".store.jsonl").readlines()) == 3 and not open(out).read()


def test_eval_run_served_sends_the_local_prompts(served, tmp_path):
    """`eval run` with generation.base_url: each prediction is what the server answers to the prompt text of the
    local job (same prompt hash), as `generate --base-url` gets it; the local sampler's equality with the server is
    test_generate_greedy_equals_local_sampler_token_for_token's."""
    from tuna_jax.eval import run as R

    ni = ni_checkout(tmp_path, [("task001_animals", "Keyword Tagging", "Name the animal", 3)])
    lm = tmp_path / "lmentry" / "data"
    lm.mkdir(parents=True)
    lmentry_task(lm, "bigger_number", True)
    model = str(stories260k_hf_dir())
    path = tmp_path / "served.yaml"
    path.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "served"), "models": [{"name": "m", "path": model}],
        "generation": {"max_new_tokens": 12, "base_url": served.base_url},
        "superni": {"tasks": str(ni), "shots": [0, 2], "num_instances": 3},
        "lmentry": {"data": str(tmp_path / "lmentry"), "allow_partial": True}}))
    assert cli(["eval", str(path), "--no-progress"]) == 0
    cfg = R.load_eval_config(path)
    prompter = R._Prompter(cfg, cfg.models[0])
    jobs = R._jobs(cfg, R._Data(cfg), prompter)
    prompts = [{"id": f"{b}/{j.id}", "prompt": j.text} for b in jobs for j in jobs[b]]
    gen = str(tmp_path / "generate.jsonl")
    assert cli(["generate", model, _write(tmp_path / "p.jsonl", prompts), gen, "--temperature", "0",
                "--max-new-tokens", "12", "--base-url", served.base_url]) == 0
    answers = {r["id"]: r["samples"][0]["text"].strip() for r in _read(gen)}
    for bench, bjobs in jobs.items():
        theirs = {r["id"]: r for r in _read(tmp_path / "served" / "predictions" / "m" / f"{bench}.jsonl")}
        assert len(theirs) == len(bjobs) >= 3
        for j in bjobs:
            assert theirs[j.id]["prompt_sha1"] == j.sha1 and theirs[j.id]["prediction"] == answers[f"{bench}/{j.id}"]
            assert theirs[j.id]["num_tokens"] > 0
    assert (tmp_path / "served" / "served.json").exists()


def test_judge_through_the_chat_api(served, tmp_path, capsys):
    # stories260K with a chat template (its messages one per line) and the context the judge prompt needs
    model = tmp_path / "chat-model"
    shutil.copytree(stories260k_hf_dir(), model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 4096}))
    tok = json.loads((model / "tokenizer_config.json").read_text())
    tok["chat_template"] = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    (model / "tokenizer_config.json").write_text(json.dumps(tok))
    records = _write(tmp_path / "c.jsonl", [{"id": 1, "instruction": "Tell me about a dog.",
                                             "candidates": ["A dog is a pet.", "Dogs bark.", "The dog sat."]}])
    out = str(tmp_path / "ranked.jsonl")
    status = cli(["judge", records, out, "--base-url", served.base_url, "--model", str(model), "--max-tokens", "16",
                  "--max-parse-retries", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert status == 1 and "failed: 1 (parse_failed: 1)" in err
    (store,) = [json.loads(x) for x in open(out + ".store.jsonl")]
    assert store["meta"]["path"] == "chat/completions" and store["status"] == "invalid"
    assert store["response"]["choices"][0]["message"]["content"]  # the server's reply, kept
    (failed,) = _read(out + ".failed.jsonl")
    assert failed["id"] == 1 and len(failed["replies"]) == 1

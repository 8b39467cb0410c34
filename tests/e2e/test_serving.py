"""Generation through a real serving engine: `transformers serve` on 127.0.0.1 serving stories260K's HF folder.

`generate --base-url` at temperature 0 writes what `tuna-jax generate` writes, token for token (the server counts the
same prompt and completion tokens, and the texts are equal); `sample-diverse --base-url` writes the local sampler's
record format and counters, and a rerun sends nothing; a server that ignores `n` (this one does) stops at the first
prompt with the fix in one line; `eval run` with ``generation.base_url`` writes the local sampler's predictions;
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


def test_sample_diverse_served_has_the_local_format_and_a_rerun_sends_nothing(served, tmp_path, capsys):
    model = str(stories260k_hf_dir())
    items = _write(tmp_path / "in.jsonl", [{"id": i, "instruction": f"Tell me about a {w}.", "output": w}
                                           for i, w in enumerate(["dog", "tree", "ball"])])
    flags = ["--n", "2", "--max-new-tokens", "16", "--no-progress"]
    assert cli(["sample-diverse", model, items, str(tmp_path / "local.jsonl"), *flags]) == 0
    out = str(tmp_path / "served.jsonl")
    served_flags = [*flags, "--base-url", served.base_url, "--n-per-request", "1"]
    assert cli(["sample-diverse", model, items, out, *served_flags]) == 0
    first = capsys.readouterr().err
    local, remote = _read(tmp_path / "local.jsonl"), _read(out)
    assert [r["id"] for r in remote] == [0, 1, 2]
    for a, b in zip(local, remote):
        assert b.keys() == a.keys() and b["diversity"].keys() == a["diversity"].keys()
        assert len(b["candidates"]) == 2 and all(isinstance(c, str) for c in b["candidates"])
        assert b["output"] == a["output"] and b["diversity"]["mode"] == "similar"
    rep_local = json.loads(open(str(tmp_path / "local.jsonl") + ".report.json").read())
    rep = json.loads(open(out + ".report.json").read())
    assert rep.keys() == rep_local.keys() and rep["items"] == 3 and rep["attempted"][0] == 3
    # One request per response: 2 for each item's first trial, 1 for each response a further trial resampled.
    assert "0 from cache" in first and 2 * 3 + rep["resampled"] == len(open(out + ".store.jsonl").readlines())
    # The rerun reads OUT (nothing to do) and sends nothing; a new OUT with the same store is answered by it.
    assert cli(["sample-diverse", model, items, out, *served_flags]) == 0
    assert "0 sent" in capsys.readouterr().err and _read(out) == remote
    again = str(tmp_path / "again.jsonl")
    assert cli(["sample-diverse", model, items, again, *served_flags, "--store", out + ".store.jsonl"]) == 0
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


def test_eval_run_served_writes_the_local_predictions(served, tmp_path):
    ni = ni_checkout(tmp_path, [("task001_animals", "Keyword Tagging", "Name the animal", 3)])
    lm = tmp_path / "lmentry" / "data"
    lm.mkdir(parents=True)
    lmentry_task(lm, "bigger_number", True)
    model = str(stories260k_hf_dir())

    def config(name, **generation):
        cfg = {"output_dir": str(tmp_path / name), "models": [{"name": "m", "path": model}],
               "generation": {"max_new_tokens": 12, **generation},
               "superni": {"tasks": str(ni), "shots": [0, 2], "num_instances": 3},
               "lmentry": {"data": str(tmp_path / "lmentry"), "allow_partial": True}}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return str(path)

    assert cli(["eval", config("local"), "--no-progress"]) == 0
    assert cli(["eval", config("served", base_url=served.base_url), "--no-progress"]) == 0
    for bench in ("superni_0shot", "superni_2shot", "lmentry"):
        ours = _read(tmp_path / "local" / "predictions" / "m" / f"{bench}.jsonl")
        theirs = _read(tmp_path / "served" / "predictions" / "m" / f"{bench}.jsonl")
        assert [r["id"] for r in theirs] == [r["id"] for r in ours] and len(ours) >= 3
        for a, b in zip(ours, theirs):
            assert (b["prediction"], b["num_tokens"], b["finish_reason"], b["prompt_sha1"]) == \
                   (a["prediction"], a["num_tokens"], a["finish_reason"], a["prompt_sha1"])
    assert json.loads((tmp_path / "local" / "local.json").read_text())["rows"][0]["superni_0shot"] == \
           json.loads((tmp_path / "served" / "served.json").read_text())["rows"][0]["superni_0shot"]


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
                                             "candidates": ["A dog is a pet.", "Dogs bark.", "The dog sat."]},
                                            {"id": 2, "instruction": "Name a color.",
                                             "candidates": ["Red.", "Blue is a color.", "Green"]}])
    out = str(tmp_path / "ranked.jsonl")
    status = cli(["judge", records, out, "--base-url", served.base_url, "--model", str(model), "--max-tokens", "24",
                  "--max-parse-retries", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert status == 1 and "failed: 2 (parse_failed: 2)" in err
    store = [json.loads(x) for x in open(out + ".store.jsonl")]
    assert len(store) == 4 and {s["meta"]["path"] for s in store} == {"chat/completions"}
    assert all(s["status"] == "invalid" and s["response"]["choices"][0]["message"]["content"] for s in store)
    failed = _read(out + ".failed.jsonl")
    assert [f["id"] for f in failed] == [1, 2] and all(len(f["replies"]) == 2 for f in failed)

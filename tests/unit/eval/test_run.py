"""`tuna-jax eval CONFIG.yaml` end to end on a real tiny model (stories260K): Super-NI 0/2-shot on a tiny
natural-instructions checkout, LMentry on a tiny data folder, Vicuna QA and AlpacaEval reviewed by the
loopback judge; the table (Markdown + JSON) and the chart (PNG) are written, the table's numbers are what the
scoring-only subcommands print for the predictions the run wrote, and a rerun loads no model and asks the
judge nothing. Also: config errors name file and line."""
from __future__ import annotations

import json
import pathlib

import pytest
import yaml

from tests.support.openai_server import OpenAIServer
from tests.unit.eval.test_vicuna import first, write_answers, write_vicuna_data
from tuna_jax.assets import stories260k_hf_dir
from tuna_jax.cli import main as cli_main
from tuna_jax.eval import run as R
from tuna_jax.io.errors import InputError

KEY = "sk-test-eval-0123456789"


def ni_task(name, category, definition, n):
    return {"Definition": [definition], "Categories": [category], "Input_language": ["English"],
            "Positive Examples": [{"input": "The cat sat.", "output": "cat", "explanation": "."},
                                  {"input": "A dog ran.", "output": "dog", "explanation": "."}],
            "Negative Examples": [],
            "Instances": [{"id": f"{name}-{i}", "input": f"Lily saw a bird {i}.", "output": ["bird", "a bird"]}
                          for i in range(n)]}


def lmentry_task(data, name, bigger):
    examples = {}
    for t, (n1, n2) in enumerate(((12, 40), (77, 3), (5, 9))):
        ans = max(n1, n2) if bigger else min(n1, n2)
        word = "bigger" if bigger else "smaller"
        examples[str(t + 1)] = {"input": f"Q: Which number is {word}, {n1} or {n2}?\nA:",
                                "metadata": {"n1": n1, "n2": n2, "answer": ans, "distractor": n1 + n2 - ans,
                                             "answer_index": [n1, n2].index(ans), "template_id": t}}
    obj = {"settings": {"name": name, "num_examples_per_template": 1,
                        "input_templates": ["Q: {n1} {n2}?\nA:", "B {n1} {n2}", "C {n1} {n2}"]},
           "examples": examples}
    (data / f"{name}.json").write_text(json.dumps(obj))


def ni_checkout(root, tasks):
    """A tiny natural-instructions checkout under ROOT: tasks = [(name, category, definition, n_instances)], all
    in the default split's test tasks. Returns its folder."""
    ni = root / "natural-instructions"
    (ni / "tasks").mkdir(parents=True, exist_ok=True)
    (ni / "splits" / "default").mkdir(parents=True, exist_ok=True)
    for name, cat, definition, n in tasks:
        (ni / "tasks" / f"{name}.json").write_text(json.dumps(ni_task(name, cat, definition, n)))
    (ni / "splits" / "default" / "test_tasks.txt").write_text("".join(f"{t[0]}\n" for t in tasks))
    return ni


QUESTIONS = [(1, "Who was the little girl?", "generic")]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The benchmarks' data in tmp: NI checkout, LMentry data, Vicuna folder, AlpacaEval files; the model."""
    root = tmp_path_factory.mktemp("evalworld")
    ni = ni_checkout(root, [("task001_animals", "Keyword Tagging", "Name the animal", 3),
                            ("task002_things", "Keyword Tagging", "Say the thing", 3)])
    lm = root / "lmentry" / "data"
    lm.mkdir(parents=True)
    lmentry_task(lm, "bigger_number", True)
    lmentry_task(lm, "smaller_number", False)
    vic = write_vicuna_data(root / "vicuna", QUESTIONS)
    base = write_answers(root / "answer_alpaca.jsonl", "alpaca-13b", {1: "BASE ONE"})
    ae = root / "alpaca_eval"
    ae.mkdir()
    (ae / "ref.json").write_text(json.dumps([{"instruction": "Tell a story.", "output": "REF STORY",
                                              "generator": "text_davinci_003", "dataset": "x"}]))
    (ae / "t.txt").write_text('<|im_start|>system\nRank.\n<|im_end|>\n<|im_start|>user\n{instruction}\n'
                              'model_1: """{output_1}"""\nmodel_2: """{output_2}"""\n<|im_end|>')
    model = stories260k_hf_dir()
    return {"root": root, "ni": ni, "lmentry": root / "lmentry", "vicuna": vic, "baseline": base, "ae": ae,
            "model": model}


def write_config(world, out_dir, base_url, path):
    cfg = {
        "name": "tiny-stages",
        "output_dir": str(out_dir),
        "models": [{"name": "alpaca", "path": str(world["model"])},
                   {"name": "tuna", "path": str(world["model"]),  # made-up numbers, to see them placed
                    "published": {"table": "a test", "superni_0shot": 38.3, "lmentry": 23.9,
                                  "vicuna": [80, 12.5, 7.5]}}],
        # 16 prompts in all (8 Super-NI, 6 LMentry, 1 Vicuna, 1 AlpacaEval): one batch, one compile
        "generation": {"max_new_tokens": 8, "batch_size": 16},
        "superni": {"tasks": str(world["ni"]), "shots": [0, 2], "num_instances": 2},
        "lmentry": {"data": str(world["lmentry"]), "allow_partial": True},
        "vicuna": {"data": str(world["vicuna"]), "baseline": str(world["baseline"])},
        "alpaca_eval": {"reference": str(world["ae"] / "ref.json"), "prompt_template": str(world["ae"] / "t.txt")},
        "judge": {"base_url": base_url, "model": "judge-4", "max_retries": 1, "backoff_initial_s": 0.01,
                  "backoff_max_s": 0.02, "concurrency": 2},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.mark.slow
def test_eval_run_writes_table_and_chart_and_resumes(world, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    out = tmp_path / "out"
    with OpenAIServer(api_key=KEY) as server:
        # Vicuna (one order, FastChat's default): "8 7" with the model shown first, a win; the baseline is
        # never shown first. AlpacaEval: model_1 always ranked first -> the orders disagree, a tie (win rate 50).
        server.add_fault("reply", match=first("BASE ONE"), times=10**6, content="3 9")
        server.add_fault("reply", match="[System]", times=10**6, content="8 7")
        server.add_fault("reply", match="Rank.", times=10**6,
                         content="[{'model': 'model_1', 'rank': 1}, {'model': 'model_2', 'rank': 2}]")
        cfg = write_config(world, out, server.base_url, tmp_path / "tiny.yaml")
        assert cli_main(["eval", str(cfg), "--no-progress"]) == 0
        n_requests = server.count()
        # 1 question x 1 order + 1 instruction x 2 orders; the second model has the same weights, hence the
        # same answers and the same review requests: they come from the store, not paid for twice.
        assert n_requests == 1 + 2 and server.count(first("BASE ONE")) == 0

        table = json.loads((out / "tiny-stages.json").read_text())
        md = (out / "tiny-stages.md").read_text()
        png = (out / "tiny-stages.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
        assert table["columns"] == ["superni_0shot", "superni_2shot", "lmentry", "vicuna", "alpaca_eval"]
        assert [r["model"] for r in table["rows"]] == ["alpaca", "tuna"]
        assert md.startswith("# tiny-stages\n\n| Model | Super-NI 0-shot | Super-NI 2-shot | LMentry | "
                             "Vicuna QA win / lose / tie % | AlpacaEval win % |")
        row = table["rows"][0]
        assert (row["vicuna"]["win"], row["vicuna"]["lose"], row["vicuna"]["tie"]) == (1, 0, 0)
        assert row["vicuna"]["baseline"] == "alpaca-13b" and row["vicuna"]["judge"] == "judge-4"
        assert row["alpaca_eval"]["win_rate"] == 50.0
        assert row["vicuna"]["win_pct"] == 100.0 and row["vicuna"]["orders"] == "one"
        assert "| alpaca | " in md and " 100.0 / 0.0 / 0.0 (1 / 0 / 0) | 50.00 |" in md
        assert "in one order, the model as Assistant 1 (FastChat's default; the Tuna paper does not say" in md
        # a model's published numbers on the line below its own, as the config gives them
        lines = md.splitlines()
        assert lines[lines.index(next(x for x in lines if x.startswith("| tuna | "))) + 1] == \
            "| tuna (published: a test) | 38.3 | - | 23.9 | 80 / 12.5 / 7.5 | - |"
        assert table["rows"][1]["published"]["lmentry"] == 23.9 and "published" not in table["rows"][0]

        # The table's numbers are what the scoring-only subcommands print for the files the run wrote.
        pred = out / "predictions" / "alpaca"
        for shots in (0, 2):
            res = tmp_path / f"s{shots}.json"
            assert cli_main(["eval", "superni", "--predictions", str(pred / f"superni_{shots}shot.jsonl"),
                             "--tasks", str(world["ni"]), "--num-instances", "2", "--out", str(res)]) == 0
            scored = json.loads(res.read_text())
            assert scored["num_scored"] == 4 and scored["missing"] == 0
            assert row[f"superni_{shots}shot"] == scored["overall"]
        res = tmp_path / "lm.json"
        assert cli_main(["eval", "lmentry", "--predictions", str(pred / "lmentry.jsonl"), "--data",
                         str(world["lmentry"]), "--allow-partial", "--out", str(res)]) == 0
        assert row["lmentry"] == json.loads(res.read_text())["overall"]
        lines = [json.loads(x) for x in open(pred / "superni_2shot.jsonl")]
        assert len(lines) == 4 and all(x["finish_reason"] in ("stop", "length") for x in lines)
        # 2-shot prompts carry the examples (longer than 0-shot), within the model's 512-token context
        zero = {x["id"]: x for x in map(json.loads, open(pred / "superni_0shot.jsonl"))}
        assert all(x["prompt_tokens"] > zero[x["id"]]["prompt_tokens"] for x in lines)
        assert all(x["prompt_tokens"] + 8 <= 512 for x in lines)
        answers = [json.loads(x) for x in open(out / "answers" / "alpaca.jsonl")]
        assert [a["question_id"] for a in answers] == [1] and answers[0]["model_id"] == "alpaca"
        outputs = json.loads((out / "alpaca_eval" / "tuna.outputs.json").read_text())
        assert outputs[0]["instruction"] == "Tell a story." and outputs[0]["generator"] == "tuna"
        # the same weights under two names: the same greedy predictions
        assert table["rows"][1]["superni_0shot"] == row["superni_0shot"]

        # A rerun (the `eval run` spelling) loads no model and asks the judge nothing.
        def no_load(self):
            raise AssertionError("a rerun must not load a model")
        monkeypatch.setattr(R._Generator, "_load", no_load)
        assert cli_main(["eval", "run", str(cfg), "--no-progress"]) == 0
        assert server.count() == n_requests
        again = json.loads((out / "tiny-stages.json").read_text())
        assert again["rows"] == table["rows"]

        # A judge budget stop: the table is still written, the cells say nothing, the notes say why (status 2);
        # a rerun with the same store finishes without asking again what was answered.
        store2 = str(tmp_path / "store2.jsonl")
        stop = R.load_eval_config(cfg, [f"judge.store={store2}", "judge.max_requests=1"])
        stopped, _, status = R.run_eval(stop, progress=False)
        # (one request: the Vicuna reviews finish -- the second model's answers are the first's, cached -- and
        # the AlpacaEval reviews stop)
        assert status == 2 and [r["alpaca_eval"] for r in stopped["rows"]] == [None, None]
        assert [r["vicuna"] for r in stopped["rows"]] == [r["vicuna"] for r in table["rows"]]
        assert stopped["rows"][0]["lmentry"] == row["lmentry"]
        assert any("STOPPED" in n and "budget" in n for n in stopped["notes"])
        assert "| alpaca | " in (out / "tiny-stages.md").read_text()
        n = server.count()
        done, _, status = R.run_eval(R.load_eval_config(cfg, [f"judge.store={store2}"]), progress=False)
        assert status == 0 and done["rows"] == table["rows"] and server.count() == n + n_requests - 1

        # A changed prompt (another template for one benchmark) regenerates only that benchmark ...
        monkeypatch.undo()
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        before = (pred / "lmentry.jsonl").read_text()
        assert cli_main(["eval", "run", str(cfg), "lmentry.template=raw", "--no-progress"]) == 0
        assert (pred / "lmentry.jsonl").read_text() != before
        assert json.loads(open(pred / "lmentry.jsonl").readline())["prompt_tokens"] < 40
        # ... and other generation settings are an error naming the file, not a silent mix
        with pytest.raises(InputError, match=r"superni_0shot\.jsonl\.params\.json: .*max_new_tokens: 8 -> 9"):
            R.run_eval(R.load_eval_config(cfg, ["generation.max_new_tokens=9"]), progress=False)


BASE_CFG = """\
output_dir: {out}
models:
  - name: m
    path: {model}
generation:
  max_new_tokens: 8
lmentry:
  data: {lm}
"""


@pytest.mark.parametrize("extra,pattern", [
    ("generation:\n  temprature: 0.5\n", r"tiny\.yaml:9: key 'generation' given twice \(first at line 5\)"),
    ("superni:\n  tasks: x\n  shot: [0]\n",
     r"tiny\.yaml:11: unknown config key superni\.shot \(did you mean superni\.shots\?\)"),
    ("superni:\n  tasks: x\n  shots: [1]\n", r"tiny\.yaml:11: superni\.shots must be a non-empty subset of \[0, 2\]"),
    ("vicuna:\n  data: x\n  baseline: y\n", r"a review is configured but there is no judge section"),
    ("vicuna:\n  data: x\n", r"tiny\.yaml:9: vicuna needs exactly one of baseline"),
    ("judge:\n  base_url: http://127.0.0.1:1/v1\n", r"tiny\.yaml:10: judge needs model"),
    ("alpaca_eval:\n  reference: r\n  limit: ten\n", r"tiny\.yaml:11: alpaca_eval\.limit='ten': expected an integer"),
    ("name: a b\n", r"name 'a b'"),
    ("vicuna:\n  data: x\n  review: false\n  limit: 0\n", r"tiny\.yaml:12: vicuna\.limit=0: must be >= 1"),
    ("superni:\n  tasks: x\n  shots: [0, 0]\n", r"tiny\.yaml:11: superni\.shots must be a non-empty subset"),
    ("", r"tiny\.yaml:2: model 'm': published\.vicuna is \[win, lose, tie\] in percent, got \[80\.0\]"),
    ("", r"tiny\.yaml:5: unknown config key models\[0\]\.published\.rouge"),
])
def test_config_errors_name_file_and_line(tmp_path, extra, pattern):
    p = tmp_path / "tiny.yaml"
    text = BASE_CFG.format(out=tmp_path / "o", model=tmp_path, lm=tmp_path) + extra
    if "published" in pattern:  # a model's published numbers, wrongly given
        bad = "vicuna: [80]" if "vicuna" in pattern else "rouge: 40"
        text = text.replace(f"    path: {tmp_path}\n", f"    path: {tmp_path}\n    published: {{table: T1, {bad}}}\n")
    p.write_text(text)
    with pytest.raises(InputError, match=pattern):
        R.load_eval_config(p)


def test_config_template_choice_and_overrides(tmp_path):
    p = tmp_path / "tiny.yaml"
    p.write_text(BASE_CFG.format(out=tmp_path / "o", model=tmp_path, lm=tmp_path).replace(
        "max_new_tokens: 8", "max_new_tokens: 8\n  template: chat"))
    with pytest.raises(InputError, match=r"tiny\.yaml:7: generation\.template='chat': choose one of alpaca, raw"):
        R.load_eval_config(p)
    p.write_text(BASE_CFG.format(out=tmp_path / "o", model=tmp_path, lm=tmp_path))
    cfg = R.load_eval_config(p, ["generation.template=raw", "generation.temperature=0.7", "name=x1"])
    assert cfg.generation.template == "raw" and cfg.generation.temperature == 0.7 and cfg.name == "x1"
    assert cfg.lmentry.data == str(tmp_path) and cfg.superni is None
    with pytest.raises(InputError, match="a review is configured but there is no judge section"):
        R.load_eval_config(p, ["vicuna.data=x", "vicuna.baseline=y"])  # a section made by overrides


def test_example_config_is_valid():
    cfg = R.load_eval_config(pathlib.Path(__file__).resolve().parents[3] / "configs" / "eval_example.yaml")
    assert [m.name for m in cfg.models][:1] == ["alpaca-7b"] and cfg.superni.shots == [0, 2]
    assert cfg.vicuna.review and cfg.judge.model


def _superni_jobs(world, tmp_path, max_source_length):
    cfg_path = tmp_path / "s.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "o"), "models": [{"name": "m", "path": str(world["model"])}],
        "generation": {"max_new_tokens": 8},
        "superni": {"tasks": str(world["ni"]), "num_instances": 1, "max_source_length": max_source_length}}))
    cfg = R.load_eval_config(cfg_path)
    p = R._Prompter(cfg, cfg.models[0])
    return p, R._jobs(cfg, R._Data(cfg), p)


def test_superni_sources_are_held_to_tk_instructs_max_source_length(world, tmp_path):
    p, roomy = _superni_jobs(world, tmp_path, 1024)
    zero, two = roomy["superni_0shot"][0], roomy["superni_2shot"][0]
    assert "Positive Example 2 -" in two.text and zero.truncated == two.truncated == 0
    source = zero.text.split("### Instruction:\n", 1)[1].split("\n\n### Response:", 1)[0]
    # a limit that holds the 0-shot source exactly: the collator's rule keeps no example for the 2-shot one
    n0 = len(p.encode(source))
    _, exact = _superni_jobs(world, tmp_path, n0)
    assert exact["superni_2shot"][0].text == zero.text and exact["superni_2shot"][0].truncated == 0
    # a limit under it: the source keeps BOS and its last tokens, the instance and "Output:" among them
    _, tight = _superni_jobs(world, tmp_path, n0 - 5)
    job = tight["superni_0shot"][0]
    cut = job.text.split("### Instruction:\n", 1)[1].split("\n\n### Response:", 1)[0]
    assert job.truncated == 5 and source.endswith(cut) and cut.endswith("Output: ")
    assert len(p.encode(cut)) <= n0 - 5 and job.text.endswith("### Response:")

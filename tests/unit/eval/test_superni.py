"""Super-NaturalInstructions: ROUGE-L / exact match against an independent rouge_score computation,
the natural-instructions checkout layout, the prompt format, and the CLI's handling of bad input."""
import json
import random
import string
from collections import defaultdict

import pytest
from rouge_score import rouge_scorer

from tuna_jax.cli import main as cli_main
from tuna_jax.eval import superni as S
from tuna_jax.io.errors import InputError


def ni_cli(argv):
    """``tuna-jax eval superni ARGV``."""
    return cli_main(["eval", "superni", *argv])


# ---------------------------------------------------------------- an independent reference scorer
# Written from natural-instructions eval/automatic/evaluation.py, deliberately naive: rouge_score's own
# RougeScorer.score for every (prediction, reference) pair, its own normalisation for exact match.

_ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _official_em(pred, gold):
    def norm(s):
        s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
        return " ".join(s.split())
    return norm(pred) == norm(gold)


def _official_rouge(pred, gold):
    return _ROUGE.score(target=gold, prediction=pred)["rougeL"].fmeasure


def _official_grouped(pairs):
    """pairs: [(group, prediction, references)] -> {group: (rougeL, em)} and overall, x100."""
    sums = defaultdict(lambda: [0.0, 0.0, 0])
    for group, pred, refs in pairs:
        rl = max(_official_rouge(pred, g) for g in refs)
        em = max(_official_em(pred, g) for g in refs)
        for key in (group, "__all__"):
            sums[key][0] += rl
            sums[key][1] += em
            sums[key][2] += 1
    return {k: (100.0 * v[0] / v[2], 100.0 * v[1] / v[2]) for k, v in sums.items()}


def _perturb(rng, refs, other):
    """A spread of predictions: exact, another reference, reordered, cut, padded, recased, wrong, empty."""
    ref = rng.choice(refs)
    words = ref.split()
    kind = rng.randrange(9)
    if kind == 0:
        return ref
    if kind == 1:
        return refs[-1]
    if kind == 2:
        rng.shuffle(words)
        return " ".join(words)
    if kind == 3:
        return " ".join(words[: max(1, len(words) // 2)])
    if kind == 4:
        return ref + " and then some more words, running on."
    if kind == 5:
        return ref.upper().replace(" ", "  ") + "!!"
    if kind == 6:
        return other
    if kind == 7:
        return "running runs ran runner " + " ".join(words[::2])  # exercises the stemmer
    return ""


@pytest.fixture(scope="module")
def fixed_predictions(shared_dir, tmp_path_factory):
    """A fixed predictions file over the shared references, with a few missing and unknown ids."""
    refs_path = shared_dir / "data" / "superni" / "test_references.jsonl"
    records = [json.loads(line) for line in refs_path.read_text().splitlines() if line.strip()]
    rng = random.Random(1234)
    lines, kept = [], []
    seen = defaultdict(int)
    longest = defaultdict(int)
    for rec in records:
        longest[rec["task_id"]] = max([longest[rec["task_id"]]] + [len(r.split()) for r in rec["references"]])
    for i, rec in enumerate(records):
        # the first 25 instances of every task (the rest stay missing, which keeps the independent
        # computation below to a few seconds), minus a few more missing ones
        seen[rec["task_id"]] += 1
        # task760's references run to ~1,400 words: a few of its instances are enough
        cap = 3 if longest[rec["task_id"]] > 300 else 25
        if seen[rec["task_id"]] > cap or i % 97 == 5:
            continue
        other = records[(i * 7919) % len(records)]["references"][0]
        pred = _perturb(rng, rec["references"], other)
        lines.append({"id": rec["id"], "prediction": pred})
        kept.append((rec, pred))
    lines.append({"id": "task000-not-a-real-id", "prediction": "x"})
    lines.append({"id": "task001-also-unknown", "prediction": ""})
    path = tmp_path_factory.mktemp("superni") / "pred.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path, records, kept


def test_rouge_matches_rouge_score_per_task_and_overall(shared_dir, fixed_predictions, tmp_path):
    path, records, kept = fixed_predictions
    out = tmp_path / "res.json"
    rc = ni_cli(["--predictions", str(path), "--tasks", str(shared_dir / "data" / "superni"),
                 "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())

    by_task = _official_grouped([(r["task_id"], p, r["references"]) for r, p in kept])
    by_cat = _official_grouped([(r["task_category"], p, r["references"]) for r, p in kept])
    assert res["num_scored"] == len(kept)
    assert res["num_references"] == len(records) == 11810
    assert res["missing"] == len(records) - len(kept) > 0
    assert res["unknown"] == 2
    assert res["overall"] == pytest.approx(by_task["__all__"][0], abs=1e-9)
    assert res["exact_match"] == pytest.approx(by_task["__all__"][1], abs=1e-9)
    assert len(res["per_task"]) == 119
    for task, value in res["per_task"].items():
        assert value == pytest.approx(by_task[task][0], abs=1e-9), task
        assert res["per_task_exact_match"][task] == pytest.approx(by_task[task][1], abs=1e-9), task
    assert set(res["per_category"]) == set(by_cat) - {"__all__"}
    for cat, value in res["per_category"].items():
        assert value == pytest.approx(by_cat[cat][0], abs=1e-9), cat
    # a sanity anchor: the perturbations leave a middling score, not 0 or 100
    assert 20 < res["overall"] < 80


def test_instance_scores_are_bit_identical_to_rouge_score(shared_dir):
    src = S.load_source(shared_dir / "data" / "superni")
    rng = random.Random(7)
    recs = list(src.references.values())
    scorer = S.RougeL()
    for rec in rng.sample(recs, 400):
        other = rng.choice(recs).references[0]
        pred = _perturb(rng, list(rec.references), other)
        for g in rec.references:
            assert scorer.score(pred, g) == _official_rouge(pred, g)


def test_lcs_matches_rouge_score_table():
    rng = random.Random(0)
    for _ in range(2000):
        a = [rng.choice("abcde") for _ in range(rng.randrange(0, 60))]
        b = [rng.choice("abcde") for _ in range(rng.randrange(0, 60))]
        expected = rouge_scorer._lcs_table(a, b)[-1][-1] if a and b else 0
        assert S._lcs_length(a, b) == expected


def test_missing_zero_policy_is_the_official_empty_prediction():
    refs = [S.ReferenceRecord("a1", "task_a", "Cat X", ("the cat sat",)),
            S.ReferenceRecord("a2", "task_a", "Cat X", ("a dog ran", "dogs running")),
            S.ReferenceRecord("b1", "task_b", "Cat Y", ("Yes",))]
    preds = {"a1": "the cat sat.", "b1": "yes", "zz": "unknown"}
    skip = S.score_predictions(preds, refs)
    zero = S.score_predictions(preds, refs, missing="zero")
    assert skip["num_scored"] == 2 and skip["missing"] == 1 and skip["unknown"] == 1
    assert skip["overall"] == pytest.approx(100.0)
    assert skip["missing_per_task"] == {"task_a": 1}
    assert zero["num_scored"] == 3
    assert zero["overall"] == pytest.approx(200.0 / 3)
    assert zero["per_task"]["task_a"] == pytest.approx(50.0)
    assert zero["exact_match"] == pytest.approx(200.0 / 3)
    assert S.compute_metrics(["the cat sat.", "", "yes"],
                             [["the cat sat"], ["a dog ran", "dogs running"], ["Yes"]]) == \
        {"exact_match": pytest.approx(200.0 / 3), "rougeL": pytest.approx(200.0 / 3)}


def test_normalisation_and_exact_match():
    assert S.normalize_answer("  The  Cat, sat!\n") == "the cat sat"
    assert S.exact_match("An apple.", "an apple")      # articles are kept, punctuation dropped
    assert not S.exact_match("apple", "an apple")
    assert S.rouge_l("Running dogs", "the dog runs") == pytest.approx(_official_rouge("Running dogs", "the dog runs"))
    assert S.rouge_l("", "anything") == 0.0


# ---------------------------------------------------------------- natural-instructions checkout layout

def _ni_task(name, n_instances, category, definition="Answer the question", pos=None):
    pos = pos if pos is not None else [
        {"input": "What is 1+1", "output": "2", "explanation": "Adding."},
        {"input": "Capital of France?", "output": "Paris.", "explanation": "Geography."},
        {"input": "third", "output": "3", "explanation": "never shown in 2-shot"}]
    return {
        "Contributors": ["x"], "Source": ["y"], "URL": ["z"], "Categories": [category, "Other"],
        "Reasoning": [], "Definition": [definition, "an alternative definition"],
        "Positive Examples": pos,
        "Negative Examples": [{"input": "neg", "output": "bad", "explanation": "no"}],
        "Input_language": ["English"], "Output_language": ["English"],
        "Instruction_language": ["English"], "Domains": ["d"],
        "Instances": [{"id": f"{name.split('_')[0]}-{i:04d}", "input": f"question {i}",
                       "output": [f"answer {i}", f"alt {i}"]} for i in range(n_instances)],
    }


@pytest.fixture
def ni_checkout(tmp_path):
    root = tmp_path / "natural-instructions"
    (root / "tasks").mkdir(parents=True)
    (root / "splits" / "default").mkdir(parents=True)
    tasks = {"task001_alpha": _ni_task("task001_alpha", 130, "Question Answering"),
             "task002_beta": _ni_task("task002_beta", 3, "Title Generation", definition="Write a title:"),
             "task999_train_only": _ni_task("task999_train_only", 10, "Other")}
    for name, obj in tasks.items():
        (root / "tasks" / f"{name}.json").write_text(json.dumps(obj))
    (root / "splits" / "default" / "test_tasks.txt").write_text("task001_alpha\ntask002_beta\n")
    (root / "splits" / "default" / "train_tasks.txt").write_text("task999_train_only\n")
    return root


def test_reads_natural_instructions_checkout(ni_checkout):
    src = S.load_source(ni_checkout)
    assert src.kind == "natural-instructions"
    assert src.test_tasks == ["task001_alpha", "task002_beta"]
    assert len(src.references) == 100 + 3  # first 100 instances per task, train task ignored
    ids = list(src.references)
    assert ids[0] == "task001-0000" and ids[99] == "task001-0099" and ids[100] == "task002-0000"
    rec = src.references["task002-0001"]
    assert rec.task == "task002_beta" and rec.category == "Title Generation"
    assert rec.references == ("answer 1", "alt 1")
    # the tasks folder itself is accepted too
    assert list(S.load_source(ni_checkout / "tasks").references) == ids

    instances = list(S.iter_eval_instances(src))
    assert len(instances) == 103
    inst = instances[100]
    assert (inst.id, inst.task, inst.category, inst.references) == \
        ("task002-0000", "task002_beta", "Title Generation", ("answer 0", "alt 0"))
    assert inst.prompt_0shot == ("Definition: Write a title:\n\n"
                                 "Now complete the following example -\nInput: question 0.\nOutput: ")
    assert inst.prompt_2shot == (
        "Definition: Write a title:\n\n"
        " Positive Example 1 -\nInput: What is 1+1.\n Output: 2.\n\n"
        " Positive Example 2 -\nInput: Capital of France?\n Output: Paris.\n\n"
        "Now complete the following example -\nInput: question 0.\nOutput: ")
    assert instances[0].prompt_0shot.startswith("Definition: Answer the question.\n\n")


def test_cli_on_checkout_and_single_task_file(ni_checkout, tmp_path, capsys):
    pred = tmp_path / "p.jsonl"
    pred.write_text("\n".join(json.dumps({"id": f"task002-{i:04d}", "prediction": f"Answer {i}!"})
                              for i in range(3)) + "\n")
    assert ni_cli(["--predictions", str(pred), "--tasks", str(ni_checkout)]) == 0
    captured = capsys.readouterr()
    res = json.loads(captured.out)
    assert res["per_task"] == {"task002_beta": pytest.approx(100.0)}
    assert res["overall"] == pytest.approx(100.0) and res["exact_match"] == pytest.approx(100.0)
    assert res["missing"] == 100 and res["missing_per_task"] == {"task001_alpha": 100}
    assert "100 of 103 instances have no prediction" in captured.err

    one = S.load_source(ni_checkout / "tasks" / "task002_beta.json")
    assert list(one.references) == ["task002-0000", "task002-0001", "task002-0002"]
    assert one.tasks["task002_beta"].category == "Title Generation"


# ---------------------------------------------------------------- prompt format (golden)

def test_prompt_format_golden(shared_dir):
    src = S.load_source(shared_dir / "data" / "superni")
    insts = {}
    for inst in S.iter_eval_instances(
            src, tasks=["task1152_bard_analogical_reasoning_causation", "task648_answer_generation"]):
        insts.setdefault(inst.task, inst)  # the first instance of each task
    analogy = insts["task1152_bard_analogical_reasoning_causation"]
    definition = ('Definition: Two analogies that relate actions with their consequences are given in the '
                  'form "A : B. C : ?". The phrase "A : B" relates action A to consequence B. Your task is '
                  'to replace the question mark (?) with the appropriate consquence of the given action C, '
                  'following the "A : B" relation. Your answer should be a single verb, without further '
                  'explanation.\n\n')
    query = "Now complete the following example -\nInput: throw : fly. cut : ?\nOutput: "
    assert analogy.prompt_0shot == definition + query
    assert analogy.prompt_2shot == (definition
                                    + " Positive Example 1 -\nInput: throw : fly. aspire : ?\n Output: attain.\n\n"
                                    + " Positive Example 2 -\nInput: listen : hear. drop : ?\n Output: fall.\n\n"
                                    + query)
    pronoun = insts["task648_answer_generation"]
    assert pronoun.prompt_2shot == (
        "Definition: You will see a sentence and a given pronoun. Answer with the word in the sentence to "
        "which the pronoun is referring.\n\n"
        " Positive Example 1 -\nInput: text: this book introduced shakespeare to ovid; it was a fine "
        "selection of his writing.; pronoun: his.\n Output: shakespeare.\n\n"
        " Positive Example 2 -\nInput: text: madonna fired her trainer because she couldnt stand her "
        "boyfriend.; pronoun: her.\n Output: trainer.\n\n"
        "Now complete the following example -\nInput: text: the city councilmen refused the demonstrators "
        "a permit because they feared violence.; pronoun: they.\nOutput: ")
    assert pronoun.references == ("the city councilmen",)


def test_prompt_token_budget_drops_examples():
    pos = [{"input": "one two", "output": "three"}, {"input": "four five", "output": "six"}]
    count = lambda s: len(s.split())  # noqa: E731
    full = S.build_prompt("Do it", pos, "x", num_pos_examples=2)
    assert full.count("Positive Example") == 2
    limit = count(S.build_prompt("Do it", pos[:1], "x", num_pos_examples=1))
    cut = S.build_prompt("Do it", pos, "x", num_pos_examples=2, count_tokens=count, max_source_length=limit)
    assert cut == S.build_prompt("Do it", pos[:1], "x", num_pos_examples=1)
    assert S.build_prompt(["first", "second"], pos, "x").startswith("Definition: first.\n\n")


def test_shared_sample_has_six_full_tasks(shared_dir, capsys):
    src = S.load_source(shared_dir / "data" / "superni")
    assert len(src.test_tasks) == 119 and len(src.tasks) == 6
    instances = list(S.iter_eval_instances(src))
    assert len(instances) == 600
    assert "113 of 119 test tasks are not available in full" in capsys.readouterr().err
    with pytest.raises(InputError, match="not available in full"):
        list(S.iter_eval_instances(src, require_all_tasks=True))
    refs_only = S.load_source(shared_dir / "data" / "superni" / "test_references.jsonl")
    with pytest.raises(InputError, match="references only"):
        next(S.iter_eval_instances(refs_only))


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("lines, message", [
    (['{"id": "a", "prediction": "x"}', '{"id": "b", "prediction": '], "pred.jsonl:2: not valid JSON"),
    (['{"id": "a"}'], "pred.jsonl:1: missing field 'prediction'"),
    (['{"prediction": "x"}'], "pred.jsonl:1: missing field 'id'"),
    (['', '{"id": "a", "prediction": null}'], "pred.jsonl:2: field 'prediction' must be a string"),
    (['["a", "x"]'], "pred.jsonl:1: expected a JSON object"),
    (['{"id": "a", "prediction": "x"}', '{"id": "a", "prediction": "y"}'],
     "pred.jsonl:2: duplicate prediction for id 'a' (first given at line 1)"),
])
def test_malformed_predictions_name_file_and_line(tmp_path, ni_checkout, capsys, lines, message):
    pred = tmp_path / "pred.jsonl"
    pred.write_text("\n".join(lines) + "\n")
    assert ni_cli(["--predictions", str(pred), "--tasks", str(ni_checkout)]) == 2
    assert message in capsys.readouterr().err


def test_bad_sources_are_clear(tmp_path):
    with pytest.raises(InputError, match="not found"):
        S.load_source(tmp_path / "nope")
    bad = tmp_path / "refs.jsonl"
    bad.write_text('{"id": "a", "references": [], "task_id": "t"}\n')
    with pytest.raises(InputError, match=r"refs.jsonl:1: field 'references' is empty"):
        S.load_source(bad)
    bad.write_text('{"id": "a", "foo": 1}\n')
    with pytest.raises(InputError, match=r"refs.jsonl:1: neither a reference record"):
        S.load_source(bad)
    good = tmp_path / "good.jsonl"
    good.write_text('{"id": "a", "references": ["x"], "task_id": "t", "task_category": "C"}\n')
    with pytest.raises(InputError, match="none of the 1 reference instances has a prediction"):
        S.score_predictions({"b": "x"}, good)

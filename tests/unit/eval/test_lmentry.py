"""LMentry: table-driven scorer checks for the 25 tasks, the aggregate formula on a hand-made
results table, and the data / predictions plumbing of the CLI."""
import json

import pytest

from tuna_jax.cli import main as cli_main
from tuna_jax.eval import lmentry as L
from tuna_jax.io.errors import InputError


def lm_cli(argv):
    """``tuna-jax eval lmentry ARGV``."""
    return cli_main(["eval", "lmentry", *argv])


# ---------------------------------------------------------------- examples (metadata as in data/*.json)

EX = {
    "sentence_containing": {"word": "river"},
    "sentence_not_containing": {"word": "river"},
    "word_containing": {"letter": "z"},
    "word_not_containing": {"letter": "e"},
    "most_associated_word": {"category": "animals", "answer": "dog",
                             "distractors": ["chair", "spoon", "cloud", "book"], "answer_index": 2},
    "least_associated_word": {"category": "fruit", "answer": "hammer",
                              "distractors": ["apple", "banana", "cherry", "grape"], "answer_index": 0},
    "any_words_from_category": {"category": "fruit", "num_words": 5, "num_distractors": 4},
    "any_words_from_category/no": {"category": "fruit", "num_words": 5, "num_distractors": 5},
    "all_words_from_category": {"category": "items of clothing", "num_words": 5, "num_distractors": 0},
    "all_words_from_category/no": {"category": "furniture", "num_words": 5, "num_distractors": 2},
    "first_alphabetically": {"word1": "zebra", "word2": "apple", "answer": "apple", "distractor": "zebra",
                             "answer_index": 1},
    "more_letters": {"word1": "cat", "word2": "elephant", "answer": "elephant", "distractor": "cat",
                     "answer_index": 1},
    "less_letters": {"word1": "banana", "word2": "fig", "answer": "fig", "distractor": "banana",
                     "answer_index": 1},
    "bigger_number": {"n1": 101, "n2": 723, "answer": 723, "distractor": 101, "answer_index": 1},
    "smaller_number": {"n1": 56, "n2": 31, "answer": 31, "distractor": 56, "answer_index": 1},
    "rhyming_word": {"query": "cat", "answer": "hat", "distractor": "dog", "answer_index": 0},
    "homophones": {"query": "eight", "answer": "ate", "distractor": "four", "answer_index": 0},
    "word_after": {"sentence": "The quick brown fox jumps over the lazy dog.", "query": "brown",
                   "answer": "fox"},
    "word_before": {"sentence": "She sells sea shells by the sea shore.", "query": "shells",
                    "answer": "sea"},
    "starts_with_word": {"word": "apple"},
    "ends_with_word": {"word": "dog"},
    "starts_with_letter": {"letter": "b"},
    "ends_with_letter": {"letter": "t"},
    "first_word": {"sentence": "Birds fly south in winter.", "answer": "Birds"},
    "last_word": {"sentence": "Birds fly south in winter.", "answer": "winter"},
    "first_letter": {"word": "apple", "answer": "a"},
    "last_letter": {"word": "apple", "answer": "e"},
}
INPUTS = {"word_not_containing": 'Write a word that doesn\'t contain the letter "e":\n'}

# (example key, prediction, expected score): accepted phrasings score 1; wrong answers and
# phrasings the scorers do not accept score 0.
CASES = [
    # sentence_containing: a sentence (more than the word) with the word as a whole word
    ("sentence_containing", "The river flows to the sea.", 1),
    ("sentence_containing", "river banks flood in spring", 1),
    ("sentence_containing", "river", 0),
    ("sentence_containing", "The sea is calm.", 0),
    ("sentence_containing", "Rivers are long.", 0),
    ("sentence_containing", "the sentence", 0),
    # sentence_not_containing
    ("sentence_not_containing", "The sea is calm.", 1),
    ("sentence_not_containing", "Rivers are long.", 1),
    ("sentence_not_containing", "The river is wide.", 0),
    ("sentence_not_containing", "calm", 0),
    ("sentence_not_containing", "!!!", 0),
    # word_containing
    ("word_containing", "zebra", 1),
    ("word_containing", "Pizza.", 1),
    ("word_containing", "zebra contains z", 1),
    ("word_containing", "Zebra is a word that has the letter z", 1),
    ("word_containing", "The answer is zoo", 1),
    ("word_containing", "apple", 0),
    ("word_containing", "z", 0),
    # word_not_containing
    ("word_not_containing", "cat", 1),
    ("word_not_containing", "Cat.", 1),
    ("word_not_containing", "dog is a word that does not contain the letter e", 1),
    ("word_not_containing", "dog is a word without the letter e", 1),
    ("word_not_containing", "tree", 0),
    ("word_not_containing", "e", 0),
    ("word_not_containing", 'Write a word that doesn\'t contain the letter "x":', 0),
    ("word_not_containing", "A giraffe is bending down to eat some grass.", 0),
    # most_associated_word
    ("most_associated_word", "dog", 1),
    ("most_associated_word", "Dog.", 1),
    ("most_associated_word", "animals - dog", 1),
    ("most_associated_word", "The word most associated with animals is dog", 1),
    ("most_associated_word", "dog is the most related to animals", 1),
    ("most_associated_word", "Of the words chair, spoon, dog, cloud and book, dog is the most associated "
                             "with animals", 1),
    ("most_associated_word", "chair", 0),
    ("most_associated_word", "The word most associated with animals is chair", 0),
    ("most_associated_word", "I would not say dog", 0),
    # least_associated_word
    ("least_associated_word", "hammer", 1),
    ("least_associated_word", "The word least associated with fruit is hammer", 1),
    ("least_associated_word", "hammer is the least related to fruit", 1),
    ("least_associated_word", "The answer is hammer.", 1),
    ("least_associated_word", "apple", 0),
    ("least_associated_word", "hammer and apple", 0),
    # any_words_from_category
    ("any_words_from_category", "yes", 1),
    ("any_words_from_category", "Yes.", 1),
    ("any_words_from_category", "Yes, banana is a fruit", 1),
    ("any_words_from_category", "The answer is yes", 1),
    ("any_words_from_category", "no", 0),
    ("any_words_from_category", "maybe", 0),
    ("any_words_from_category/no", "No, none of them are fruit", 1),
    ("any_words_from_category/no", "yes", 0),
    # all_words_from_category
    ("all_words_from_category", "yes", 1),
    ("all_words_from_category", "Yes, all of these words are types of clothing", 1),
    ("all_words_from_category", "no", 0),
    ("all_words_from_category", "not really", 0),
    ("all_words_from_category/no", "no", 1),
    ("all_words_from_category/no", "No, the list contains other things", 1),
    ("all_words_from_category/no", "Yes.", 0),
    # first_alphabetically
    ("first_alphabetically", "apple", 1),
    ("first_alphabetically", "apple comes first", 1),
    ("first_alphabetically", "Alphabetically, apple comes before zebra.", 1),
    ("first_alphabetically", "zebra comes after apple", 1),
    ("first_alphabetically", "apple does", 1),
    ("first_alphabetically", "apple comes first in alphabetical order", 1),
    ("first_alphabetically", "zebra", 0),
    ("first_alphabetically", "zebra comes first", 0),
    ("first_alphabetically", "banana", 0),
    # more_letters
    ("more_letters", "elephant", 1),
    ("more_letters", "Elephant.", 1),
    ("more_letters", "elephant has more letters than cat", 1),
    ("more_letters", "cat has fewer letters than elephant", 1),
    ("more_letters", "The longer word is elephant", 1),
    ("more_letters", "elephant has 5 more letters", 1),
    ("more_letters", "elephant has five more letters than cat", 1),
    ("more_letters", "cat is shorter than elephant", 1),
    ("more_letters", "Of the words cat and elephant, elephant is longer.", 1),
    ("more_letters", "cat", 0),
    ("more_letters", "cat has more letters", 0),
    ("more_letters", "cat is longer than elephant", 0),
    ("more_letters", "elephant has 3 more letters", 0),
    # less_letters
    ("less_letters", "fig", 1),
    ("less_letters", "fig has fewer letters than banana", 1),
    ("less_letters", "fig has less letters", 1),
    ("less_letters", "banana has more letters than fig", 1),
    ("less_letters", "banana is longer than fig", 1),
    ("less_letters", "fig has three fewer letters", 1),
    ('less_letters', 'The shorter word is "fig".', 1),
    ("less_letters", "banana", 0),
    ("less_letters", "banana is shorter", 0),
    ("less_letters", "fig has 2 fewer letters", 0),
    # bigger_number
    ("bigger_number", "723", 1),
    ("bigger_number", "723.", 1),
    ("bigger_number", "The bigger number is 723.", 1),
    ("bigger_number", "723 is bigger than 101", 1),
    ("bigger_number", "101 is smaller than 723", 1),
    ("bigger_number", "Of the numbers 101 and 723, 723 is larger.", 1),
    ("bigger_number", "seven hundred and twenty-three", 1),
    ("bigger_number", "The answer is 723", 1),
    ("bigger_number", "723 723 723", 1),
    ("bigger_number", "101", 0),
    ("bigger_number", "101 is bigger than 723", 0),
    ("bigger_number", "7", 0),
    ("bigger_number", "", 0),
    # smaller_number
    ("smaller_number", "31", 1),
    ("smaller_number", "thirty-one", 1),
    ("smaller_number", "thirty one", 1),
    ("smaller_number", "31 is smaller than 56", 1),
    ("smaller_number", "56 is bigger than 31", 1),
    ("smaller_number", "The smaller number is 31", 1),
    ("smaller_number", "56", 0),
    ("smaller_number", "56 is smaller", 0),
    ("smaller_number", "fifty-six", 0),
    # rhyming_word
    ("rhyming_word", "hat", 1),
    ("rhyming_word", "hat.", 1),
    ("rhyming_word", "cat rhymes with hat", 1),
    ("rhyming_word", "hat rhymes with cat", 1),
    ("rhyming_word", "The word that rhymes with cat is hat", 1),
    ("rhyming_word", "cat and hat rhyme", 1),
    ("rhyming_word", "dog", 0),
    ("rhyming_word", "dog rhymes with cat", 0),
    ("rhyming_word", "I think hat", 0),
    # homophones
    ("homophones", "ate", 1),
    ('homophones', '"ate"', 1),
    ("homophones", "eight sounds like ate", 1),
    ("homophones", "ate sounds like eight", 1),
    ("homophones", "eight and ate are homophones", 1),
    ("homophones", "The homophone of eight is ate", 1),
    ("homophones", "eight sounds more like ate than four", 1),
    ("homophones", "eight sounds like ate, but not like four", 1),
    ("homophones", "four", 0),
    ("homophones", "eight sounds like four", 0),
    ("homophones", "it is ate, i guess", 0),
    # word_after
    ("word_after", "fox", 1),
    ("word_after", "Fox.", 1),
    ("word_after", "fox comes after brown", 1),
    ("word_after", "The word that comes after brown is fox", 1),
    ("word_after", "brown is followed by fox", 1),
    ("word_after", "brown comes right before fox", 1),
    ("word_after", "brown precedes fox", 1),
    ("word_after", "over", 0),
    ("word_after", "The quick brown fox jumps over the lazy dog", 0),
    ("word_after", "brown comes after fox", 0),
    # word_before
    ("word_before", "sea", 1),
    ("word_before", "sea comes before shells", 1),
    ("word_before", "shells comes after sea", 1),
    ("word_before", "The word that comes before shells is sea", 1),
    ("word_before", "shells follows sea", 1),
    ("word_before", "by", 0),
    ("word_before", "shells", 0),
    ("word_before", "sea comes after shells", 0),
    # starts_with_word
    ("starts_with_word", "Apple pies are delicious.", 1),
    ("starts_with_word", "apple is a fruit", 1),
    ("starts_with_word", '"Apple trees grow tall."', 1),
    ("starts_with_word", 'The sentence "apple pie is good" starts with apple', 1),
    ("starts_with_word", "I like apple pie.", 0),
    ("starts_with_word", "apple", 0),
    ("starts_with_word", "banana bread", 0),
    # ends_with_word
    ("ends_with_word", "I have a dog.", 1),
    ("ends_with_word", "My best friend is a dog", 1),
    ("ends_with_word", "A sentence ending with dog is: I walked the dog.", 1),
    ("ends_with_word", "dog is my best friend", 0),
    ("ends_with_word", "dog", 0),
    ("ends_with_word", "I have a cat", 0),
    # starts_with_letter
    ("starts_with_letter", "banana", 1),
    ("starts_with_letter", "Banana.", 1),
    ("starts_with_letter", "bear bear", 1),
    ("starts_with_letter", "banana starts with b", 1),
    ("starts_with_letter", "How about banana?", 1),
    ("starts_with_letter", 'A possible word is "bread"', 1),
    ("starts_with_letter", "apple", 0),
    ("starts_with_letter", "The word is apple", 0),
    ("starts_with_letter", "b", 0),
    # ends_with_letter
    ("ends_with_letter", "cat", 1),
    ("ends_with_letter", "basket.", 1),
    ("ends_with_letter", "cat ends with t", 1),
    ("ends_with_letter", "cat is a word that ends with t", 1),
    ("ends_with_letter", "cat is a word whose last letter is t", 1),
    ("ends_with_letter", "dog", 0),
    ("ends_with_letter", "t", 0),
    ("ends_with_letter", "tree", 0),
    # first_word
    ("first_word", "birds", 1),
    ("first_word", "Birds.", 1),
    ("first_word", "The first word is birds", 1),
    ("first_word", 'The first word of the sentence is "Birds"', 1),
    ("first_word", "first word: birds", 1),
    ("first_word", "birds is the first word", 1),
    ("first_word", "fly", 0),
    ("first_word", "The first word is fly", 0),
    ("first_word", "winter birds fly", 0),
    # last_word
    ("last_word", "winter", 1),
    ("last_word", "The last word is winter.", 1),
    ("last_word", "last word: winter", 1),
    ("last_word", "winter is the last word", 1),
    ("last_word", "birds", 0),
    ("last_word", "The last word is south", 0),
    ("last_word", "winter birds fly", 0),
    # first_letter
    ("first_letter", "a", 1),
    ("first_letter", "A.", 1),
    ('first_letter', '"a"', 1),
    ("first_letter", "The first letter is a", 1),
    ('first_letter', 'The first letter of apple is "a"', 1),
    ("first_letter", "apple starts with a", 1),
    ("first_letter", "first letter: a", 1),
    ("first_letter", "The letter a", 1),
    ("first_letter", "p", 0),
    ("first_letter", "The first letter is p", 0),
    ("first_letter", "apple", 0),
    # last_letter
    ("last_letter", "e", 1),
    ("last_letter", "The last letter is e.", 1),
    ("last_letter", "apple ends with e", 1),
    ("last_letter", "last letter: e", 1),
    ("last_letter", "e is the last letter of apple", 1),
    ("last_letter", "a", 0),
    ("last_letter", "The last letter is a", 0),
]


def _example(key):
    task = key.split("/")[0]
    return task, {"input": INPUTS.get(task, ""), "metadata": dict(EX[key], template_id=0)}


@pytest.mark.parametrize("key, prediction, expected", CASES,
                         ids=[f"{k}:{p[:40]}" for k, p, _ in CASES])
def test_scorer_table(key, prediction, expected):
    task, example = _example(key)
    score, certain = L.score_prediction(task, prediction, example)
    assert score == expected


def test_every_task_has_accepted_and_rejected_cases():
    for task in L.CORE_TASKS:
        scores = {s for k, _, s in CASES if k.split("/")[0] == task}
        assert scores == {0, 1}, task


def test_certainty_is_reported():
    task, ex = _example("bigger_number")
    assert L.score_prediction(task, "723", ex) == (1, True)
    assert L.score_prediction(task, "I think the answer is 723 but maybe not", ex) == (1, False)
    assert L.score_prediction(task, "101", ex) == (0, True)


def test_analysis_variants_use_their_base_scorer_and_truncation():
    task, ex = _example("more_letters")
    assert L.score_prediction("more_letters_length_diff_3plus", "elephant", ex) == (1, True)
    assert L.score_prediction(task, "elephant\nQ: Which word has more letters", ex, truncate=True) == (1, True)
    assert L.score_prediction(task, "cat. Or maybe elephant", ex, truncate=True)[0] == 0
    with pytest.raises(KeyError):
        L.score_prediction("no_such_task", "x", ex)


def test_non_ascii_only_prediction_is_not_a_direct_answer():
    task, ex = _example("word_containing")
    assert L.score_prediction(task, "日本", ex)[0] == 0


def test_arguments_are_escaped():
    # an unbalanced "(" and a "?" in the sentence: inserted raw into a pattern they would not compile
    ex = {"input": "", "metadata": {"sentence": "Is it (really true?", "query": "it", "answer": "really",
                                    "template_id": 0}}
    assert L.score_prediction("word_after", "really", ex) == (1, True)
    assert L.score_prediction("word_after", 'The word that comes after it in "is it (really true?" is really',
                              ex) == (1, True)
    assert L.score_prediction("word_after", "true", ex)[0] == 0


def test_number_words():
    assert [L.number_to_words(n) for n in (0, 13, 40, 42, 100, 101, 723, 999, 1005, 1234)] == [
        "zero", "thirteen", "forty", "forty-two", "one hundred", "one hundred and one",
        "seven hundred and twenty-three", "nine hundred and ninety-nine", "one thousand and five",
        "one thousand, two hundred and thirty-four"]


# ---------------------------------------------------------------- the aggregate formula

def _result(name, templates, answer_index=None, n_per_template=10):
    return L.TaskResult(name, n_per_template * len(templates), sum(templates),
                        [(c, n_per_template) for c in templates], answer_index)


def _hand_made_table():
    """Every task 50% with equal templates, except: bigger_number's templates 100/50/0 (same 50%
    overall), smaller_number 100%. The answer-position split is 60/40 (100/100 for smaller_number).
    The argument-content variants get chosen accuracies."""
    results = {}
    for t in L.CORE_TASKS:
        templates = (5, 5, 5)
        if t == "bigger_number":
            templates = (10, 5, 0)
        if t == "smaller_number":
            templates = (10, 10, 10)
        ai = None
        if t in L.ANSWER_INDEX_TASKS:
            ai = {0: (15, 15), 1: (15, 15)} if t == "smaller_number" else {0: (9, 15), 1: (6, 15)}
        results[t] = _result(t, templates, ai)
    variant_acc = {
        "first_alphabetically": (4, 5, 6, 7), "all_words_from_category": (5, 5, 5),
        "any_words_from_category": (2, 5, 8), "rhyming_word": (5, 4), "more_letters": (5, 5),
        "less_letters": (0, 10),
    }
    for base, accs in variant_acc.items():
        for variant, correct in zip(L.ARGUMENT_CONTENT_GROUPS[base], accs):
            name = f"{base}_{variant}"
            ai = {0: (correct, 5), 1: (0, 5)} if base in L.ANSWER_INDEX_TASKS else None
            results[name] = _result(name, (correct,), ai)
    return results


def test_aggregate_formula_on_hand_made_table():
    agg = L.aggregate(_hand_made_table())
    accuracy = (24 * 50 + 100) / 25                                   # 52.0
    argument_order = (6 * (100 - (60 - 40)) + 100) / 7                # 7 two-argument tasks
    argument_content = ((100 - 30) + 100 + (100 - 60) + (100 - 10) + 100 + (100 - 100)) / 6
    template = (23 * 100 + (100 - 100) + 100) / 25                    # bigger_number's gap is 100
    adjacent = (16 * 100 + (100 - 50)) / 17                           # bigger/smaller differ by 50
    robustness = round((argument_order + argument_content + template + adjacent) / 4, 1)
    assert robustness == 85.6
    assert agg["accuracy"] == pytest.approx(accuracy)
    assert agg["robustness_components"] == pytest.approx(
        {"argument_order": argument_order, "argument_content": argument_content,
         "template": template, "adjacent_tasks": adjacent})
    assert agg["robustness"] == robustness
    assert agg["lmentry_score"] == pytest.approx(52.0 * 85.6 / 100)   # 44.512
    assert agg["partial"] is False and agg["absent_tasks"] == []
    assert agg["adjacent_tasks_by_kind"]["by_definition"] == pytest.approx((4 * 100 + 50) / 5)
    assert len(agg["robustness_items"]["adjacent_tasks"]) == 17


def test_aggregate_rounding_and_partial():
    r = L.TaskResult("bigger_number", 3, 1, [(1, 1), (0, 1), (0, 1)], {0: (1, 2), 1: (0, 1)})
    assert r.accuracy == 33.33 and r.template_accuracies == [100.0, 0.0, 0.0]
    assert r.answer_index_accuracy(0) == 50.0 and r.answer_index_accuracy(1) == 0.0
    table = _hand_made_table()
    del table["less_letters_length_diff_1"]
    with pytest.raises(InputError, match="absent"):
        L.aggregate(table)
    agg = L.aggregate(table, allow_partial=True)
    assert agg["partial"] and agg["absent_tasks"] == ["less_letters_length_diff_1"]
    assert agg["robustness_components"]["argument_content"] == pytest.approx((70 + 100 + 40 + 90 + 100) / 5)


# ---------------------------------------------------------------- data layout and CLI

def _write_task(data_dir, name, examples, templates=("Q: {n1} or {n2}?\nA:", "B {n1} {n2}", "C {n1} {n2}")):
    n_per = max(1, len(examples) // len(templates))
    obj = {"settings": {"name": name, "num_examples_per_template": n_per, "input_templates": list(templates)},
           "examples": {str(i + 1): ex for i, ex in enumerate(examples)}}
    (data_dir / f"{name}.json").write_text(json.dumps(obj))


def _number_examples(bigger):
    out = []
    for t in range(3):
        for n1, n2 in ((12, 40), (77, 3)):
            ans = max(n1, n2) if bigger else min(n1, n2)
            out.append({"input": f"Q: Which number is {'bigger' if bigger else 'smaller'}, {n1} or {n2}?\nA:",
                        "metadata": {"n1": n1, "n2": n2, "answer": ans, "distractor": n1 + n2 - ans,
                                     "answer_index": [n1, n2].index(ans), "template_id": t}})
    return out


@pytest.fixture
def lmentry_checkout(tmp_path):
    data = tmp_path / "lmentry" / "data"
    data.mkdir(parents=True)
    _write_task(data, "bigger_number", _number_examples(True))
    _write_task(data, "smaller_number", _number_examples(False))
    (data / "capital.json").write_text("{}")  # a later addition to the repository: ignored
    return tmp_path / "lmentry"


def test_cli_scores_predictions(lmentry_checkout, tmp_path, capsys):
    instances = list(L.iter_eval_instances(lmentry_checkout))
    assert len(instances) == 12 and instances[0].id == "bigger_number/1"
    assert instances[0].prompt == "Q: Which number is bigger, 12 or 40?\nA:"
    lines = []
    for inst in instances:
        if inst.id == "smaller_number/6":
            continue  # missing: counted as wrong
        m = inst.metadata
        pred = str(m["answer"]) if inst.task == "bigger_number" else f"The smaller number is {m['answer']}."
        if inst.id == "smaller_number/1":
            pred = str(m["distractor"])
        if inst.task == "smaller_number":
            lines.append({"task": "smaller_number", "id": inst.example_id, "prediction": pred})
        else:
            lines.append({"id": inst.id, "prediction": pred})
    lines.append({"id": "bigger_number/999", "prediction": "1"})
    pred_path = tmp_path / "pred.jsonl"
    pred_path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out" / "lmentry.json"

    assert lm_cli(["--predictions", str(pred_path), "--data", str(lmentry_checkout)]) == 2
    assert "absent" in capsys.readouterr().err

    assert lm_cli(["--predictions", str(pred_path), "--data", str(lmentry_checkout / "data"),
                   "--out", str(out), "--allow-partial"]) == 0
    res = json.loads(out.read_text())
    assert res["per_task"] == {"bigger_number": 100.0, "smaller_number": pytest.approx(66.67)}
    assert res["missing"] == 1 and res["unknown"] == 1 and res["partial"] is True
    assert res["per_template"]["smaller_number"] == [50.0, 100.0, 50.0]
    assert res["overall"] == pytest.approx(res["accuracy"] * res["robustness"] / 100)
    err = capsys.readouterr().err
    assert "1 of 12 examples have no prediction" in err and "partial LMentry result" in err


@pytest.mark.parametrize("line, message", [
    ('{"id": "17", "prediction": "x"}', "pred.jsonl:1: id '17' does not name its task"),
    ('{"id": "bigger_number/1", "prediction": 3}', "pred.jsonl:1: field 'prediction' must be a string"),
    ('{"id": "bigger_number/1", "prediction": "1"}\n{"task": "bigger_number", "id": "1", "prediction": "2"}',
     "pred.jsonl:2: duplicate prediction for 'bigger_number/1' (first given at line 1)"),
])
def test_cli_malformed_lines(lmentry_checkout, tmp_path, capsys, line, message):
    pred = tmp_path / "pred.jsonl"
    pred.write_text(line + "\n")
    assert lm_cli(["--predictions", str(pred), "--data", str(lmentry_checkout), "--allow-partial"]) == 2
    assert message in capsys.readouterr().err


def test_bad_data_is_clear(tmp_path):
    with pytest.raises(InputError, match="not found"):
        L.load_data(tmp_path / "missing")
    d = tmp_path / "data"
    d.mkdir()
    _write_task(d, "bigger_number", [{"input": "x", "metadata": {"template_id": 5, "answer_index": 0}}])
    with pytest.raises(InputError, match=r"bigger_number.json: example '1': metadata.template_id"):
        L.load_data(d)


# ---------------------------------------------------------------- issue 11: truncation, argument order, layout

def _official_cut(prediction: str) -> str:
    """The repository's rule for --truncate-predictions, in its order: lower-case and squeeze spaces,
    then keep the text before the first newline, then before the first '.'."""
    p = prediction.strip().lower()
    while "  " in p:
        p = p.replace("  ", " ")
    return p.replace("_", " ").split("\n")[0].split(".")[0]


def test_truncate_predictions_reaches_the_scorer(lmentry_checkout, tmp_path, capsys):
    """--truncate-predictions is applied, and means exactly: score the text cut the repository's way."""
    instances = list(L.iter_eval_instances(lmentry_checkout))
    preds = {}
    for i, inst in enumerate(instances):
        m = inst.metadata
        # a model that does not stop: a right answer, then chatter; or a wrong one after a newline
        preds[inst.id] = (f"{m['answer']}\nQ: Which number is bigger, {m['distractor']}?" if i % 3 == 0 else
                          f"{m['distractor']}. Just kidding" if i % 3 == 1 else
                          f"The answer is {m['answer']}.\nThe answer is {m['distractor']}.")
    pred_path = tmp_path / "pred.jsonl"
    pred_path.write_text("".join(json.dumps({"id": k, "prediction": v}) + "\n" for k, v in preds.items()))
    got = {}
    for flag in ([], ["--truncate-predictions"]):
        out = tmp_path / f"out{len(flag)}.json"
        assert lm_cli(["--predictions", str(pred_path), "--data", str(lmentry_checkout), "--allow-partial",
                       "--no-progress", "--out", str(out), *flag]) == 0
        got[bool(flag)] = json.loads(out.read_text())
    capsys.readouterr()
    assert got[True]["truncate_predictions"] is True and got[False]["truncate_predictions"] is False
    assert got[True]["per_task"] != got[False]["per_task"]  # the flag changes the result ...
    data = L.load_data(lmentry_checkout)
    by_hand = L.score_predictions({k: _official_cut(v) for k, v in preds.items()}, data, allow_partial=True)
    assert got[True]["per_task"] == by_hand["per_task"]  # ... to what cutting by hand gives
    assert got[True]["per_template"] == by_hand["per_template"]


def test_argument_order_divides_by_the_predictions_present():
    """The repository's analysis counts, per answer position, the predictions it has (not the examples):
    with half the answer-position-1 examples unanswered, their accuracy is over the answered ones."""
    ex = {str(i): {"input": "Q", "metadata": {"n1": 1, "n2": 2, "answer": 2 if i % 2 else 1, "distractor": 0,
                                             "answer_index": i % 2, "template_id": 0}} for i in range(8)}
    task = L.LMentryTask("bigger_number", ["Q"], 8, ex, "mem")
    # positions: 0,2,4,6 -> index 0 (all right); 1,3,5,7 -> index 1 (1 right, 1 wrong, 2 missing)
    preds = {"0": "1", "2": "1", "4": "1", "6": "1", "1": "2", "3": "0"}
    r = L.score_task(task, preds)
    assert r.answer_index_counts == {0: (4, 4), 1: (1, 2)}
    assert r.answer_index_accuracy(0) == 100.0 and r.answer_index_accuracy(1) == 50.0  # not 1/4
    assert r.accuracy == round(100 * 5 / 8, 2) and r.n_missing == 2  # missing still count in accuracy


def test_repository_predictions_layout(lmentry_checkout, tmp_path, capsys):
    """predictions/<task>/<model>.json, as the repository's predict.py writes them, scored directly."""
    instances = list(L.iter_eval_instances(lmentry_checkout))
    root = tmp_path / "predictions"
    lines = []
    for inst in instances:
        pred = str(inst.metadata["answer"] if inst.example_id != "2" else inst.metadata["distractor"])
        folder = root / inst.task
        folder.mkdir(parents=True, exist_ok=True)
        f = folder / "my-model.json"
        obj = json.loads(f.read_text()) if f.exists() else {}
        obj[inst.example_id] = {"input": inst.prompt, "prediction": pred}
        f.write_text(json.dumps(obj))
        lines.append({"id": inst.id, "prediction": pred})
    (root / "bigger_number" / "other-model.json").write_text("{}")
    jsonl = tmp_path / "pred.jsonl"
    jsonl.write_text("".join(json.dumps(x) + "\n" for x in lines))
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert lm_cli(["--predictions", str(root), "--model", "my-model", "--data", str(lmentry_checkout),
                   "--allow-partial", "--out", str(a)]) == 0
    assert lm_cli(["--predictions", str(jsonl), "--data", str(lmentry_checkout), "--allow-partial",
                   "--out", str(b)]) == 0
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert ra["model"] == "my-model" and ra["per_task"] == rb["per_task"] and ra["overall"] == rb["overall"]
    assert ra["per_task"]["bigger_number"] < 100
    capsys.readouterr()
    assert lm_cli(["--predictions", str(root), "--data", str(lmentry_checkout), "--allow-partial"]) == 2
    assert "holds predictions of 2 models (my-model, other-model); choose one with --model" in capsys.readouterr().err
    (root / "smaller_number" / "my-model.json").write_text('{"1": {"prediction": 7}}')
    assert lm_cli(["--predictions", str(root), "--model", "my-model", "--data", str(lmentry_checkout),
                   "--allow-partial"]) == 2
    assert "my-model.json: example '1': expected {\"prediction\": text}" in capsys.readouterr().err

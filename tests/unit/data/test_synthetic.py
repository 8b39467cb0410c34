"""The synthetic tasks' rubric (``synthetic.grade``), which the demo's contextual judge and its data report use."""
import pytest

from tuna_jax.data import synthetic


def test_grade_gives_every_graded_candidate_its_score():
    """The rubric knows no candidate list, yet grades the generator's four candidates of each task exactly as
    the generator scored them (correct 3, near miss 2, wrong 1, off-topic 0), on both sides of the split."""
    rows = [r for seed in range(20) for r in synthetic.ranking_records(40, seed)]
    assert {r["instruction"] for r in rows} == set(synthetic.INSTRUCTIONS)
    for r in rows:
        assert [synthetic.grade(r["instruction"], r["input"], c) for c in r["candidates"]] == r["scores"], r


@pytest.mark.parametrize("instruction,given,answer,expected", [
    ("Write the word three times.", "cat", "Cat, cat, CAT!", 3),         # case and punctuation ignored
    ("Write the word three times.", "cat", "cat cat cat cat.", 2),       # the word, the wrong number of times
    ("Write the word three times.", "cat", "cat cat dog.", 1),           # words of the task, wrong
    ("Write the word three times.", "cat", "cat cat cat. The end", 0),   # trailing story text: off-topic
    ("What number comes after this one?", "four", "five", 3),
    ("What number comes after this one?", "four", "four.", 2),
    ("What number comes after this one?", "four", "six seven.", 1),
    ("What number comes after this one?", "four", "5.", 0),              # digits are not the task's words
    ("Reverse the order of the words.", "sun cat dog", "dog cat sun.", 3),
    ("Reverse the order of the words.", "sun cat dog", "cat sun dog.", 2),
    ("Reverse the order of the words.", "sun cat dog", "dog cat.", 1),
    ("Name the first word.", "sun cat dog", "sun", 3),
    ("Name the first word.", "sun cat dog", "dog.", 2),
    ("Name the first word.", "sun cat dog", "sun cat.", 1),
    ("Name the first word.", "sun cat dog", "", 0),
])
def test_grade_by_the_rules(instruction, given, answer, expected):
    assert synthetic.grade(instruction, given, answer) == expected


def test_grade_refuses_an_unknown_task():
    with pytest.raises(ValueError, match="not a synthetic task"):
        synthetic.grade("Write a poem.", "", "roses")

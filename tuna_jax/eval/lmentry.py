"""LMentry (Efrat, Honovich & Levy, 2022, "LMentry: A Language Model Benchmark of Elementary Language
Tasks"): rule-based scoring of the 25 tasks, accuracy, the four robustness aspects, the LMentry score,
and the predictions readers of ``tuna-jax eval lmentry`` (``commands/eval.py``).

An independent implementation of what the aviaefrat/lmentry repository's scorers and analysis do: that
repository states no licence, so no code is taken from it, and its data is not shipped (users clone it).
:func:`load_data` reads its ``data/<task>.json`` files (the 25 tasks and 16 controlled-argument variants);
a prediction line names task and id, ``{"id": "bigger_number/17", "prediction": "723"}``.
:func:`score_prediction` scores one prediction: task-specific negative checks, then a direct answer, then
the task's accepted phrasings, giving 1 or 0, certain or not (accuracy counts the 1s). :func:`aggregate`
gives task accuracy, robustness (four aspects) and LMentry score = accuracy x robustness / 100, with the
repository's rounding, so numbers match its tables. A few bugs of the repository's scorers are fixed (they
only matter for unusual predictions). Missing predictions count as wrong and are reported; a task with none
at all is an error unless ``allow_partial``.

Data layout, scoring rules, aggregates and the deviations: docs/evaluation.md#lmentry.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import pathlib
import re
import string
import sys
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from tuna_jax.eval.common import read_predictions_jsonl, warn
from tuna_jax.io import paths
from tuna_jax.io.errors import InputError
from tuna_jax.io.jsonl import read_json

# --------------------------------------------------------------------------------------------------
# Task lists (from the paper's Table 1 / the repository's analysis)
# --------------------------------------------------------------------------------------------------

CORE_TASKS: tuple[str, ...] = (
    "sentence_containing", "sentence_not_containing", "word_containing", "word_not_containing",
    "most_associated_word", "least_associated_word", "any_words_from_category",
    "all_words_from_category", "first_alphabetically", "more_letters", "less_letters",
    "bigger_number", "smaller_number", "rhyming_word", "homophones", "word_after", "word_before",
    "starts_with_word", "ends_with_word", "starts_with_letter", "ends_with_letter", "first_word",
    "last_word", "first_letter", "last_letter",
)

# argument content robustness: base task -> its controlled-argument variants (task name = base_variant)
ARGUMENT_CONTENT_GROUPS: dict[str, tuple[str, ...]] = {
    "first_alphabetically": ("far_first_letter", "different_first_letter",
                             "consecutive_first_letter", "same_first_letter"),
    "all_words_from_category": ("0_distractors", "1_distractors", "2_distractors"),
    "any_words_from_category": ("5_distractors", "4_distractors", "3_distractors"),
    "rhyming_word": ("orthographically_similar", "orthographically_different"),
    "more_letters": ("length_diff_3plus", "length_diff_1"),
    "less_letters": ("length_diff_3plus", "length_diff_1"),
}
ANALYSIS_TASKS: dict[str, str] = {f"{base}_{v}": base
                                  for base, vs in ARGUMENT_CONTENT_GROUPS.items() for v in vs}
ALL_TASKS: tuple[str, ...] = CORE_TASKS + tuple(ANALYSIS_TASKS)

# argument order robustness: tasks whose answer is one of two given arguments
ANSWER_INDEX_TASKS: tuple[str, ...] = ("more_letters", "less_letters", "first_alphabetically",
                                       "rhyming_word", "homophones", "bigger_number", "smaller_number")

# adjacent tasks robustness: 17 pairs in four kinds
ADJACENT_TASK_PAIRS: dict[str, tuple[tuple[str, str], ...]] = {
    "by_definition": (("bigger_number", "smaller_number"), ("more_letters", "less_letters"),
                      ("word_after", "word_before"), ("most_associated_word", "least_associated_word"),
                      ("any_words_from_category", "all_words_from_category")),
    "explicit_negation": (("sentence_containing", "sentence_not_containing"),
                          ("word_containing", "word_not_containing")),
    "character_awareness": (("starts_with_word", "starts_with_letter"),
                            ("ends_with_word", "ends_with_letter"),
                            ("sentence_containing", "word_containing"),
                            ("sentence_not_containing", "word_not_containing"),
                            ("first_word", "first_letter"), ("last_word", "last_letter")),
    "first_vs_last": (("starts_with_word", "ends_with_word"), ("starts_with_letter", "ends_with_letter"),
                      ("first_word", "last_word"), ("first_letter", "last_letter")),
}

__all__ = [
    "CORE_TASKS", "ANALYSIS_TASKS", "ALL_TASKS", "ARGUMENT_CONTENT_GROUPS", "ANSWER_INDEX_TASKS",
    "ADJACENT_TASK_PAIRS", "LMentryTask", "LMentryInstance", "TaskResult", "load_data",
    "iter_eval_instances", "prediction_id", "normalize_prediction", "number_to_words",
    "score_prediction", "score_task", "aggregate", "score_predictions", "read_predictions",
]

# --------------------------------------------------------------------------------------------------
# Normalisation and argument patterns
# --------------------------------------------------------------------------------------------------


def normalize_prediction(prediction: str, truncate: bool = False) -> str:
    """Strip, lower-case, runs of spaces -> one space, "_" -> space (so ``\\w`` never sees "_");
    ``truncate`` keeps the text before the first newline, then before the first "."."""
    p = re.sub(r" +", " ", prediction.strip().lower()).replace("_", " ")
    if truncate:
        p = p.split("\n")[0].split(".")[0]
    return p


def _normalize_text(s: str) -> str:
    return re.sub(r" +", " ", s.strip().lower())


_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
         "fifteen sixteen seventeen eighteen nineteen").split()
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


def number_to_words(n: int) -> str:
    """English words for 0 <= n < 10**6 the way ``num2words`` writes them ("one hundred and one",
    "twenty-three", "one thousand, two hundred and five"), which LMentry's scorer accepts."""
    if n < 0:
        return "minus " + number_to_words(-n)
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return f"{_ONES[hundreds]} hundred" + (f" and {number_to_words(rest)}" if rest else "")
    if n < 1_000_000:
        thousands, rest = divmod(n, 1000)
        head = f"{number_to_words(thousands)} thousand"
        if not rest:
            return head
        return head + (" and " if rest < 100 else ", ") + number_to_words(rest)
    raise ValueError(f"number_to_words supports 0..999999, got {n}")


_WRAP = r"[\"'.,]*"       # quotes / periods / commas allowed around an argument
_NW = r"[^a-z0-9_]"       # a non-word character of the (lower-cased) prediction


def _esc(text: Any) -> str:
    return re.escape(str(text).lower())


def _word(core: str) -> str:
    return rf"(the word )?{_WRAP}\b{core}\b{_WRAP}"


def _letter(core: str) -> str:
    return rf"(the letter )?{_WRAP}\b{core}\b{_WRAP}"


def _number_core(n: int, a_single: bool = False) -> str:
    words = number_to_words(int(n))
    alts = [rf"\b{int(n)}\b", re.escape(words), re.escape(words.replace("-", " "))]
    if a_single and int(n) == 1:
        alts.append("a single")
    return "(" + "|".join(dict.fromkeys(alts)) + ")"


def _number(n: int) -> str:
    return rf"(the number )?{_WRAP}\b{_number_core(n)}\b{_WRAP}"


def _sentence(core: str) -> str:
    return rf"((the sentence )?{_WRAP}{core}{_WRAP}|the sentence)"


def _words_list(words: Sequence[str]) -> str:
    """A list of the words in order, any separators, optionally "and" before the last one."""
    out = rf"(the words )?{_NW}*"
    for i, w in enumerate(words):
        out += _esc(w)
        if i < len(words) - 1:
            out += rf"{_NW}+"
            if i == len(words) - 2:
                out += rf"(and{_NW}+)?"
    return out + rf"{_NW}*"


def _shared(target: str) -> list[str]:
    """Answer framings every task accepts around its answer pattern."""
    return [rf"{target} is the answer", rf"the answer is {target}",
            rf"the correct answer is {target}", rf"answer: {target}"]


def _has_alnum(p: str) -> bool:
    return re.search(r"[^\W_]", p) is not None


def _direct(p: str, answer: str, repeats: bool = True) -> bool:
    """The whole prediction is the answer (+ optional "."), or -- with ``repeats`` -- every
    alphanumeric token of it is (a model that repeats its answer)."""
    if re.fullmatch(rf"(?:{answer})\.?", p):
        return True
    if repeats:
        tokens = re.findall(r"\b[a-z\d]+\b", p)
        if tokens and all(re.fullmatch(answer, t) for t in tokens):
            return True
    return False


def _alternation(parts: Sequence[str]) -> str:
    return "(?:" + "|".join(f"(?:{x})" for x in parts) + ")"


def _phrased(p: str, patterns: Sequence[str], prefixes: Sequence[str] = ("",),
             suffixes: Sequence[str] = ("",)) -> tuple[int, bool]:
    r"""Accepted phrasings (each pattern with each prefix and suffix): the whole prediction -> certain
    1; found inside it -> uncertain 1; else uncertain 0.

    Why one factored pattern: the repository tries the |prefixes| x |patterns| x |suffixes| phrasings
    one by one, and compiling those regexes is nearly all of the scoring time (each example has its own
    words in them, so nothing can be cached across examples). ``(?:P1|P2)(?:B1|B2)(?:S1|S2)`` matches
    exactly the strings that one of the phrasings ``Pi Bj Sk`` matches (concatenation distributes over
    alternation), so "any phrasing is the whole prediction / is found in it" is decided the same, with a
    pattern of |prefixes| + |patterns| + |suffixes| parts compiled once. ``(?:X)\.?`` fully matches p
    exactly when X fully matches p or p minus a final ".", so the one compiled pattern serves both
    questions."""
    combined = re.compile(_alternation(prefixes) + _alternation(patterns) + _alternation(suffixes))
    if combined.fullmatch(p) or (p.endswith(".") and combined.fullmatch(p[:-1])):
        return 1, True
    if combined.search(p):
        return 1, False
    return 0, False


CERTAIN_0 = (0, True)
CERTAIN_1 = (1, True)

# --------------------------------------------------------------------------------------------------
# The 25 scorers: (normalised prediction, metadata, example input) -> (score, certain)
# --------------------------------------------------------------------------------------------------


def _sentence_containing(p, m, _):
    w = _esc(m["word"])
    # a sentence: the word as a whole word plus at least one more character around it
    return CERTAIN_1 if re.search(rf"(.*\b{w}\b.+)|(.+\b{w}\b.*)", p) else CERTAIN_0


def _sentence_not_containing(p, m, _):
    word = str(m["word"]).lower()
    if re.search(rf"\b{re.escape(word)}\b", p):
        return CERTAIN_0
    words = re.findall(r"\b[a-z]+\b", p)
    if not words:
        return CERTAIN_0
    if len(words) == 1:  # one word is not counted as a sentence, but that is arguable
        return 0, False
    return (1, False) if word in p else CERTAIN_1  # e.g. "cats" for "cat": right, less sure


def _word_containing(p, m, _):
    letter = _esc(m["letter"])
    core = (rf"\w*{letter}\w*" if letter in ("a", "i")  # the only one-letter English words
            else rf"((\w+{letter}\w*)|(\w*{letter}\w+)|({letter}-\w+))")  # "x-ray", "e-mail"
    word = _word(core)
    if _direct(p, word):
        return CERTAIN_1
    return _phrased(p, [rf"{word} (is a word (that|which) )?(contains|uses|has) {_letter(letter)}"]
                    + _shared(word))


def _word_not_containing(p, m, input_):
    raw_letter = str(m["letter"]).lower()
    letter = re.escape(raw_letter)
    # repeating the question (perhaps with another letter) is not an answer
    question = re.escape(_normalize_text(input_)).replace(re.escape(f'"{raw_letter}"'), r'"\w"')
    if re.fullmatch(question, p):
        return CERTAIN_0
    if not re.search(r"\W", p) and raw_letter in p:  # a single word that has the letter
        return CERTAIN_0
    allowed = string.ascii_lowercase.replace(raw_letter, "")
    alts = [rf"(\b[{allowed}]{{2,}}\b)"] + [f"({w})" for w in ("a", "i") if w != raw_letter]
    word = _word("(" + "|".join(alts) + ")")
    # repeated-token acceptance is too lax here: every word of a long sentence may lack the letter
    if _direct(p, word, repeats=False):
        return CERTAIN_1
    that, doesnt = r"(that|which)", r"((does not)|(doesn't))"
    letter_re = _letter(letter)
    return _phrased(p, [
        rf"{word} (is a word {that} )?{doesnt} (contain|use|have) {letter_re}",
        rf"a word {that} {doesnt} (contain|use|have) {letter_re} is {word}",
        rf"a word not (containing|using|having) {letter_re} is {word}",
        rf"{word} is a word without {letter_re}",
    ])


def _associated_word(p, m, _, degree: str, category_dash_answer: bool):
    answer = str(m["answer"]).lower()
    if not re.search(rf"\b{re.escape(answer)}\b", p):
        return CERTAIN_0
    distractors = [str(d) for d in m["distractors"]]
    i = int(m["answer_index"])
    words = distractors[:i] + [answer] + distractors[i:]
    a, c = _word(_esc(answer)), _word(_esc(m["category"]))
    exacts = [a] + ([rf"{c} - {a}"] if category_dash_answer else [])
    if any(_direct(p, e) for e in exacts):
        return CERTAIN_1
    given = r"(above|given|listed|following)"
    options = rf"(of|from) ({_words_list(words)}|the (words|options) {given}|the {given} (words|options))"
    assoc = rf"{degree}( commonly)? (associated|related)"

    def forms(x, y):
        return [rf"the word {assoc} (to|with) {y} is {x}",
                rf"the word {assoc} (to|with) {y} {options} is {x}",
                rf"{y} (is|are) {assoc} (to|with) {x}",
                rf"{x} (is|are) the {assoc} (to|with) {y}",
                rf"{x} (is|are) the word {assoc} (to|with) {y}",
                rf"the word that relates to {y} the {degree} is {x}",
                rf"{x} relates to {y} the {degree}"]

    return _phrased(p, forms(a, c) + forms(c, a) + _shared(a),
                    prefixes=("", rf"{options}{_NW}*"), suffixes=("", rf"{_NW}*{options}"))


def _most_associated_word(p, m, i):
    return _associated_word(p, m, i, "most", category_dash_answer=True)


def _least_associated_word(p, m, i):
    return _associated_word(p, m, i, "least", category_dash_answer=False)


def _yes_no(p, answer, patterns):
    opposite = "no" if answer == "yes" else "yes"
    if re.fullmatch(rf"{opposite}\.?", p):
        return CERTAIN_0
    if _direct(p, answer):
        return CERTAIN_1
    return _phrased(p, patterns + [rf"^{answer}\b"] + _shared(answer))


def _any_words_from_category(p, m, _):
    answer = "yes" if int(m["num_words"]) > int(m["num_distractors"]) else "no"
    return _yes_no(p, answer, [])


_CATEGORY_SYNONYMS = {"items of clothing": ("clothes", "clothing"), "furniture": ("pieces of furniture",),
                      "fruit": ("fruits",)}


def _all_words_from_category(p, m, _):
    answer = "yes" if int(m["num_distractors"]) == 0 else "no"
    cat = str(m["category"]).lower()
    category = "(" + "|".join(re.escape(c) for c in (cat,) + _CATEGORY_SYNONYMS.get(cat, ())) + ")"
    all_words = r"(all of these words|all of those words|all of the words|they all)"
    return _yes_no(p, answer, [
        rf"{answer}, the list contains only {category}",
        rf"{answer}, {all_words}( (listed|in the list))? (represent|are types of|refer to types of) {category}",
    ])


def _single_other_word(p, answer) -> bool:
    words = re.findall(r"\b[a-z]+\b", p)
    return len(words) == 1 and words[0] != answer


def _first_alphabetically(p, m, _):
    answer = str(m["answer"]).lower()
    if _single_other_word(p, answer):
        return CERTAIN_0
    a, d = _word(_esc(answer)), _word(_esc(m["distractor"]))
    if _direct(p, a) or _direct(p, rf"{a} does"):
        return CERTAIN_1
    w1, w2 = _word(_esc(m["word1"])), _word(_esc(m["word2"]))
    comes = "(comes|is)"
    return _phrased(
        p, [rf"{a} {comes} first", rf"{d} {comes} second", rf"{d} {comes} after",
            rf"{a} {comes} before {d}", rf"{d} {comes} after {a}"] + _shared(a),
        prefixes=("", "alphabetically, ", "in an alphabetical order, ", "in alphabetical order, ",
                  rf"of the words {w1} and {w2}, "),
        suffixes=("", " alphabetically", " in an alphabetical order", " in alphabetical order",
                  " in the dictionary"))


def _has_forms(x, y, diff, more):
    return [rf"{x} has {more} letters", rf"{x} has {more} letters than {y}",
            rf"{x} has {diff} {more} letter(s)?", rf"{x} has {diff} {more} letter(s)? than {y}",
            rf"the word that has {more} letters is {x}", rf"{x} is the word that has {more} letters"]


def _is_forms(x, y, diff, longer):
    return [rf"{x} is {longer}", rf"{x} is {longer} than {y}", rf"{x} is {longer} than {y} by {diff} letter(s)?",
            rf"the {longer} word is {x}", rf"the word that is {longer} is {x}", rf"{x} is the word that is {longer}"]


def _letters_count(p, m, _, more: str, longer: str, fewer: str, shorter: str):
    """more_letters (more/longer) and, mirrored, less_letters ((less|fewer)/shorter)."""
    answer, distractor = str(m["answer"]), str(m["distractor"])
    diff = _number_core(abs(len(answer) - len(distractor)), a_single=True)
    a, d = _word(_esc(answer)), _word(_esc(distractor))
    # certain 0: the whole prediction picks the distractor ...
    negatives = ([d] + _has_forms(d, a, diff, more) + _is_forms(d, a, diff, longer)
                 + [rf"{d} is {longer} by {diff} letter(s)?"])
    if re.fullmatch("(?:" + "|".join(f"(?:{n})" for n in negatives) + r")\.?", p):
        return CERTAIN_0
    # ... or picks the answer but states a wrong difference in letters
    number = r"(?P<number>\d+|one|two|three|four|five|six|seven|eight|nine|ten|zero|a single)"
    for wrong in (rf"{a} has {number} {more} letter(s)?", rf"{a} has {number} {more} letter(s)? than {d}",
                  rf"{a} is {longer} by {number} letter(s)?", rf"{a} is {longer} than {d} by {number} letter(s)?"):
        mo = re.match(wrong, p)
        if mo and not re.fullmatch(diff, mo.group("number")):
            return CERTAIN_0
    if _direct(p, a):
        return CERTAIN_1
    w1, w2 = _word(_esc(m["word1"])), _word(_esc(m["word2"]))
    patterns = (_has_forms(a, d, diff, more) + _is_forms(a, d, diff, longer)
                + _has_forms(d, a, diff, fewer) + _is_forms(d, a, diff, shorter) + _shared(a))
    return _phrased(p, patterns, prefixes=("", rf"of the words {w1} and {w2}, ",
                                           rf"from the words {w1} and {w2}, "))


def _more_letters(p, m, i):
    return _letters_count(p, m, i, "more", "longer", "(less|fewer)", "shorter")


def _less_letters(p, m, i):
    return _letters_count(p, m, i, "(less|fewer)", "shorter", "more", "longer")


def _compare_number(p, m, _, cmp: str, opposite: str):
    answer = int(m["answer"])
    tokens = re.findall(r"\b[a-z\d]+\b", p)
    if len(set(tokens)) == 1 and tokens[0] != str(answer):  # just one (other) number or word
        return CERTAIN_0
    a, d = _number(answer), _number(int(m["distractor"]))
    if _direct(p, a):
        return CERTAIN_1

    def forms(x, y, c):
        return [rf"{x} is {c}", rf"{x} is {c} than {y}", rf"{x} is the {c} number", rf"the {c} number is {x}"]

    n1, n2 = int(m["n1"]), int(m["n2"])
    return _phrased(p, forms(a, d, cmp) + forms(d, a, opposite) + _shared(a),
                    prefixes=("", f"of the numbers {n1} and {n2}, ", f"from the numbers {n1} and {n2}, ",
                              f"between the numbers {n1} and {n2}, "))


def _bigger_number(p, m, i):
    return _compare_number(p, m, i, "(bigger|larger)", "smaller")


def _smaller_number(p, m, i):
    return _compare_number(p, m, i, "smaller", "(bigger|larger)")


def _exact_phrasings(p, answer_re, exacts) -> tuple[int, bool]:
    if _direct(p, answer_re) or _direct(p, "|".join(f"(?:{e})" for e in exacts)):
        return CERTAIN_1
    return 0, False


def _rhyming_word(p, m, _):
    answer = str(m["answer"]).lower()
    if _single_other_word(p, answer):
        return CERTAIN_0
    a, q, d = (_word(_esc(m[k])) for k in ("answer", "query", "distractor"))
    art, doesnt = r"(a|the)", r"(does not|doesn't)"

    def forms(x, y):
        return [rf"{x} rhymes with {y}( and not with {d})?", rf"{x} is {art} rhyme of {y}( and not of {d})?",
                rf"{x} and {y} rhyme", rf"{x} and {y} are rhymes", rf"{x} and {y} are words that rhyme",
                rf"{art} rhyme of {x} is {y}( and not {d})?", rf"{art} word rhyming with {x} is {y}",
                rf"{art} word that rhymes with {x} is {y}",
                rf"{x} and {y}( both)? rhyme( with each other)?, (while|but|and) {d} {doesnt} rhyme with "
                rf"either( word)?"]

    exacts = forms(q, a) + forms(a, q) + [
        rf"{d} {doesnt} rhyme with {q}(\s+{a} (rhymes|does rhyme) with {q})?",
        rf"{q} {doesnt} rhyme with {d}(\s+{q} (rhymes|does rhyme) with {a})?",
        rf"{a} rhymes with {q}\s+{d} {doesnt} rhyme with {q}",
    ]
    return _exact_phrasings(p, a, exacts)


def _homophones(p, m, _):
    answer = str(m["answer"]).lower()
    if not re.search(rf"\b{re.escape(answer)}\b", p):
        return CERTAIN_0
    a, q, d = (_word(_esc(m[k])) for k in ("answer", "query", "distractor"))
    like, but = "(like|similar to)", r"[.,]? (but|and)"

    def forms(x, y):
        return [rf"{x} sounds {like} {y}", rf"{x} sounds {like} {y}{but} not {like} {d}",
                rf"{x} sounds {like} {y}{but} {d} does not", rf"{x} and {y} sound alike",
                rf"{x} sounds more {like} {y}", rf"{x} sounds more {like} {y} than( like)? {d}( does)?",
                rf"{x} sounds most {like} {y}", rf"{x} is a homophone of {y}",
                rf"{x} and {y} are homophones( of each other)?", rf"the homophone of {x} is {y}"]

    return _exact_phrasings(p, a, forms(q, a) + forms(a, q))


_AFTER, _BEFORE = r"(immediately |right )?after", r"(immediately |right )?before"
_SUCCEEDS, _PRECEDES, _FOLLOWS = r"(immediately )?succeeds", r"(immediately )?precedes", r"(immediately )?follows"


def _neighbour_word(p, m, _, after: bool):
    answer, query, sentence = (str(m[k]).lower() for k in ("answer", "query", "sentence"))
    if not re.search(rf"\b{re.escape(answer)}\b", p):
        return CERTAIN_0
    if re.sub(r"[^\w ]+", "", p) == re.sub(r"[^\w ]+", "", sentence):  # repeating the sentence
        return CERTAIN_0
    a, q, s = _word(re.escape(answer)), _word(re.escape(query)), _sentence(re.escape(sentence))
    if _direct(p, a):
        return CERTAIN_1

    def comes(x, y, rel):  # "x comes <rel> y"
        return [rf"{x} comes {rel} {y}", rf"{x} is the word that comes {rel} {y}",
                rf"the word that comes {rel} {y} is {x}", rf"the word that comes {rel} {y} in {s} is {x}"]

    def verb(x, y, v):  # "x <v> y"
        return [rf"{x} {v} {y}", rf"{x} is the word that {v} {y}", rf"the word that {v} {y} is {x}"]

    if after:  # a comes right after q
        patterns = (comes(a, q, _AFTER) + verb(a, q, _SUCCEEDS)
                    + [rf"{a} {_FOLLOWS} {q}", rf"the word that {_FOLLOWS} {q} is {a}",
                       rf"{q} is succeeded by {a}", rf"{q} is followed by {a}"]
                    + comes(q, a, _BEFORE) + verb(q, a, _PRECEDES))
    else:      # a comes right before q
        patterns = (comes(a, q, _BEFORE) + verb(a, q, _PRECEDES)
                    + [rf"{a} is followed by {q}", rf"the word that {_FOLLOWS} {a} is {q}",
                       rf"{a} is succeeded by {q}", rf"{q} {_FOLLOWS} {a}"]
                    + comes(q, a, _AFTER) + verb(q, a, _SUCCEEDS))
    return _phrased(p, patterns + _shared(a), prefixes=("", rf"in {s} "), suffixes=("", rf" (of|in) {s}"))


def _word_after(p, m, i):
    return _neighbour_word(p, m, i, after=True)


def _word_before(p, m, i):
    return _neighbour_word(p, m, i, after=False)


_VALID_WORD = r"(a|i|\w\w+)"  # at least two letters, except the words "a" and "i"


def _starts_with_word(p, m, _):
    word = str(m["word"]).lower()
    if not re.search(rf"\b{re.escape(word)}\b", p):
        return CERTAIN_0
    w = _word(re.escape(word))
    # the word first, then at least one more word (we cannot check that it is English)
    sentence = rf"{_NW}*{w}{_NW}+{_VALID_WORD}.*"
    if _direct(p, sentence):
        return CERTAIN_1
    a = "(a|one)"
    # no empty prefix or suffix: with neither, the sentence pattern would be found anywhere
    return _phrased(p, [sentence] + _shared(sentence),
                    prefixes=(r"the sentence( is)?", rf"{a} sentence that starts with {w}( is)?",
                              rf"{a} sentence starting with {w}( is)?",
                              rf"{a} sentence whose first word is {w}( is)?"),
                    suffixes=(rf"starts with {w}", rf"is a sentence that starts with {w}",
                              rf"is a sentence starting with {w}", rf"is a sentence whose first word is {w}"))


def _ends_with_word(p, m, _):
    word = str(m["word"]).lower()
    if not re.search(rf"\b{re.escape(word)}\b", p):
        return CERTAIN_0
    w = _word(re.escape(word))
    sentence = rf".*{_VALID_WORD}{_NW}+{w}{_NW}*"
    if _direct(p, sentence):
        return CERTAIN_1
    a = "(a|one)"
    return _phrased(p, [sentence] + _shared(sentence),
                    prefixes=(r"the sentence( is)?", rf"{a} sentence that ends with {w}( is)?",
                              rf"{a} sentence ending with {w}( is)?",
                              rf"{a} sentence whose (last|final) word is {w}( is)?"),
                    suffixes=("$",))


def _word_with_letter(p, m, _, first: bool):
    letter = str(m["letter"]).lower()
    words = re.findall(r"\b[a-z]+\b", p)
    if all((wd[0] if first else wd[-1]) != letter for wd in words):
        return CERTAIN_0
    le = re.escape(letter)
    rest = r"\w*" if letter in ("a", "i") else r"\w+"
    w = _word(rf"{le}-?{rest}" if first else rf"{rest}{le}")  # "-": e-mail, x-ray
    if _direct(p, w):
        return CERTAIN_1
    lr = _letter(le)
    a, possible, answer_ = "(a|one)", r"possible( such)?", "(word|answer)"
    common = [rf"{a} {possible} {answer_} is {w}", rf"{w} is {a} {possible} {answer_}",
              rf"how about {w}", rf"may i suggest {w}"]
    if first:
        specific = [rf"{w} (starts|begins) with {lr}", rf"{w} is {a} word that (starts|begins) with {lr}",
                    rf"{w} is {a} word (starting|beginning) with {lr}", rf"a word starting with {lr} is {w}",
                    rf"{w} is {a} word whose first letter is {lr}", rf"{lr} is for {w}"]
    else:
        specific = [rf"{w} ends with {lr}", rf"{w} is {a} word that ends with {lr}",
                    rf"{w} is {a} word ending with {lr}", rf"a word ending with {lr} is {w}",
                    rf"{w} is {a} word whose last letter is {lr}"]
    return _phrased(p, common + specific + _shared(w))


def _starts_with_letter(p, m, i):
    return _word_with_letter(p, m, i, first=True)


def _ends_with_letter(p, m, i):
    return _word_with_letter(p, m, i, first=False)


def _sentence_end_word(p, m, _, first: bool):
    answer, sentence = str(m["answer"]).lower(), str(m["sentence"]).lower()
    if not re.search(rf"\b{re.escape(answer)}\b", p):
        return CERTAIN_0
    a, s = _word(re.escape(answer)), _sentence(re.escape(sentence))
    if _direct(p, a):
        return CERTAIN_1
    pos, verb = ("first", "begins") if first else ("last", "ends")
    return _phrased(p, [rf"the {pos} word is {a}", rf"the {pos} word (of|in) {s} is {a}",
                        rf"{a} is the {pos} word", rf"{s} {verb} with {a}", rf"{pos} word\W+{a}"]
                    + _shared(a), prefixes=("", rf"in {s} "), suffixes=("", rf" (of|in) {s}"))


def _first_word(p, m, i):
    return _sentence_end_word(p, m, i, first=True)


def _last_word(p, m, i):
    return _sentence_end_word(p, m, i, first=False)


def _word_end_letter(p, m, _, first: bool):
    answer = str(m["answer"]).lower()
    if not re.search(rf"\b{re.escape(answer)}\b", p):
        return CERTAIN_0
    a, w = _letter(re.escape(answer)), _word(_esc(m["word"]))
    if _direct(p, a):
        return CERTAIN_1
    of = "(of|in)"
    if first:
        specific = [rf"the first letter is {a}", rf"the first letter {of} {w} is {a}",
                    rf"{a} is the first letter {of} {w}", rf"{w} (starts|begins) with {a}",
                    rf"the letter that {w} (starts|begins) with is {a}", rf"{a} is the starting letter {of} {w}",
                    rf"first letter: {a}"]
    else:
        specific = [rf"the last letter is {a}", rf"the last letter {of} {w} is {a}",
                    rf"{a} is the last letter {of} {w}", rf"{w} ends with {a}",
                    rf"the letter that {w} ends with is {a}", rf"{a} is the final letter {of} {w}",
                    rf"last letter: {a}"]
    return _phrased(p, specific + [rf"{w}: {a}"] + _shared(a))


def _first_letter(p, m, i):
    return _word_end_letter(p, m, i, first=True)


def _last_letter(p, m, i):
    return _word_end_letter(p, m, i, first=False)


SCORERS: dict[str, Callable[[str, Mapping[str, Any], str], tuple[int, bool]]] = {
    "sentence_containing": _sentence_containing, "sentence_not_containing": _sentence_not_containing,
    "word_containing": _word_containing, "word_not_containing": _word_not_containing,
    "most_associated_word": _most_associated_word, "least_associated_word": _least_associated_word,
    "any_words_from_category": _any_words_from_category, "all_words_from_category": _all_words_from_category,
    "first_alphabetically": _first_alphabetically, "more_letters": _more_letters,
    "less_letters": _less_letters, "bigger_number": _bigger_number, "smaller_number": _smaller_number,
    "rhyming_word": _rhyming_word, "homophones": _homophones, "word_after": _word_after,
    "word_before": _word_before, "starts_with_word": _starts_with_word, "ends_with_word": _ends_with_word,
    "starts_with_letter": _starts_with_letter, "ends_with_letter": _ends_with_letter,
    "first_word": _first_word, "last_word": _last_word, "first_letter": _first_letter,
    "last_letter": _last_letter,
}
assert set(SCORERS) == set(CORE_TASKS)


def _base_task(task: str) -> str:
    if task in SCORERS:
        return task
    if task in ANALYSIS_TASKS:
        return ANALYSIS_TASKS[task]
    raise KeyError(f"unknown LMentry task {task!r}; known: {', '.join(ALL_TASKS)}")


def score_prediction(task: str, prediction: str, example: Mapping[str, Any],
                     truncate: bool = False) -> tuple[int, bool]:
    """(score in {0, 1}, certain) of one prediction for one example ``{"input", "metadata"}``.

    ``task`` may be one of the 25 tasks or one of the 16 argument-content variants (scored like
    their base task). A metadata field the scorer needs but the example lacks is a KeyError.
    """
    scorer = SCORERS[_base_task(task)]
    p = normalize_prediction(prediction, truncate)
    if not _has_alnum(p):
        return CERTAIN_0
    score, certain = scorer(p, example["metadata"], example.get("input", ""))
    return int(score), bool(certain)


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class LMentryTask:
    """One ``data/<task>.json``."""

    name: str
    templates: list[str]
    num_examples_per_template: int
    examples: dict[str, dict]
    path: str


@dataclasses.dataclass(frozen=True)
class LMentryInstance:
    """An example to generate on; ``id`` ("task/example_id") is what the predictions file must carry."""

    id: str
    task: str
    example_id: str
    prompt: str
    template_id: int
    metadata: Mapping[str, Any]


def prediction_id(task: str, example_id: str | int) -> str:
    return f"{task}/{example_id}"


def resolve_data_dir(path: str | os.PathLike) -> pathlib.Path:
    p = pathlib.Path(path)
    if not p.exists():
        raise InputError(f"{p}: not found (expected an lmentry checkout or its data folder)")
    if p.is_dir() and (p / "data").is_dir() and any((p / "data").glob("*.json")):
        return p / "data"
    if p.is_dir() and any(p.glob("*.json")):
        return p
    raise InputError(f"{p}: no LMentry task files (data/<task>.json) found")


def _load_task_file(path: pathlib.Path, name: str) -> LMentryTask:
    obj = read_json(path)
    if not isinstance(obj, dict) or not isinstance(obj.get("settings"), dict) \
            or not isinstance(obj.get("examples"), dict):
        raise InputError(f"{path}: expected {{\"settings\": {{...}}, \"examples\": {{id: ...}}}}")
    settings = obj["settings"]
    templates = settings.get("input_templates")
    if not isinstance(templates, list) or not templates:
        raise InputError(f"{path}: settings.input_templates must be a non-empty list")
    n_per = settings.get("num_examples_per_template")
    if not isinstance(n_per, int) or n_per <= 0:
        raise InputError(f"{path}: settings.num_examples_per_template must be a positive integer")
    needs_index = name in ANSWER_INDEX_TASKS  # argument order robustness reads it
    for eid, ex in obj["examples"].items():
        where = f"{path}: example {eid!r}"
        if not isinstance(ex, dict) or not isinstance(ex.get("input"), str) \
                or not isinstance(ex.get("metadata"), dict):
            raise InputError(f"{where}: needs a string 'input' and a 'metadata' object")
        tid = ex["metadata"].get("template_id")
        if not isinstance(tid, int) or not 0 <= tid < len(templates):
            raise InputError(f"{where}: metadata.template_id must be an integer in [0, {len(templates)})")
        if needs_index and ex["metadata"].get("answer_index") not in (0, 1):
            raise InputError(f"{where}: metadata.answer_index must be 0 or 1 for {name}")
    return LMentryTask(name, templates, n_per, obj["examples"], str(path))


def load_data(path: str | os.PathLike, tasks: Sequence[str] | None = None) -> dict[str, LMentryTask]:
    """Reads the LMentry task files from a checkout or its ``data`` folder.

    Without ``tasks``, every known task whose file is there (the 25 + 16); files of other names
    (later additions to the repository) are ignored. With ``tasks``, each must be there. ``path`` may be in
    cloud storage (``gs://...``): it is read from a local copy (``io.paths.local_copy``).
    """
    d = resolve_data_dir(paths.local_copy(path))
    names = list(tasks) if tasks is not None else [t for t in ALL_TASKS if (d / f"{t}.json").is_file()]
    out = {}
    for name in names:
        _base_task(name)  # unknown names are an error
        f = d / f"{name}.json"
        if not f.is_file():
            raise InputError(f"{f}: task file not found")
        out[name] = _load_task_file(f, name)
    if not out:
        raise InputError(f"{d}: none of the LMentry task files ({', '.join(CORE_TASKS[:3])}, ...) found")
    return out


def iter_eval_instances(data: str | os.PathLike | Mapping[str, LMentryTask],
                        tasks: Sequence[str] | None = None) -> Iterator[LMentryInstance]:
    """Every example of every task (the 25 and the 16 variants, as present), in file order."""
    loaded = load_data(data, tasks) if isinstance(data, (str, os.PathLike)) else data
    names = list(tasks) if tasks is not None else list(loaded)
    for name in names:
        task = loaded[name]
        for eid, ex in task.examples.items():
            yield LMentryInstance(prediction_id(name, eid), name, eid, ex["input"],
                                  ex["metadata"]["template_id"], ex["metadata"])


# --------------------------------------------------------------------------------------------------
# Results and aggregates
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TaskResult:
    """Counts for one task: overall, per template, and per answer position (two-argument tasks)."""

    name: str
    n_examples: int
    n_correct: int
    template_counts: list[tuple[int, int]]                 # (correct, examples) per template
    # {0: (correct, predictions), 1: (...)}: over the predictions present, as the repository's analysis
    answer_index_counts: dict[int, tuple[int, int]] | None = None
    n_certain: int = 0
    n_missing: int = 0

    @property
    def accuracy(self) -> float:
        """100 x correct / examples, rounded to 2 decimals as the repository's analysis does."""
        return round(100.0 * self.n_correct / self.n_examples, 2)

    @property
    def template_accuracies(self) -> list[float]:
        return [round(100.0 * c / n, 1) if n else 0.0 for c, n in self.template_counts]

    def answer_index_accuracy(self, index: int) -> float:
        if not self.answer_index_counts or index not in self.answer_index_counts:
            raise ValueError(f"{self.name}: no answer-position counts")
        c, n = self.answer_index_counts[index]
        return 0.0 if c == 0 else round(100.0 * c / n, 2)


def score_task(task: LMentryTask, predictions: Mapping[str, str], truncate: bool = False,
               progress: Callable[[int], Any] | None = None) -> TaskResult:
    """Scores ``{example_id: prediction}`` for one task; examples without a prediction count as 0 in the
    task and template accuracies (the repository divides by the examples of the task), and are left out
    of the answer-position counts (its analysis counts the predictions there,
    ``get_simple_answer_index_bias``). ``truncate``: see :func:`normalize_prediction`. ``progress(n)``
    is told every n examples scored."""
    n_t = len(task.templates)
    tc = [[0, 0] for _ in range(n_t)]
    ai = {0: [0, 0], 1: [0, 0]} if task.name in ANSWER_INDEX_TASKS else None
    n_correct = n_certain = n_missing = 0
    for eid, ex in task.examples.items():
        meta = ex["metadata"]
        pred = predictions.get(eid)
        if pred is None:
            n_missing += 1
            score, certain = 0, False
        else:
            try:
                score, certain = score_prediction(task.name, pred, ex, truncate)
            except KeyError as e:
                raise InputError(f"{task.path}: example {eid!r}: metadata lacks {e}") from None
        n_correct += score
        n_certain += certain
        t = meta["template_id"]
        tc[t][0] += score
        tc[t][1] += 1
        if ai is not None and pred is not None:
            ai[meta["answer_index"]][0] += score
            ai[meta["answer_index"]][1] += 1
        if progress is not None:
            progress(1)
    n = len(task.examples)
    if n != task.num_examples_per_template * n_t:
        warn(f"{task.path}: {n} examples, but settings say {task.num_examples_per_template} x {n_t} "
             f"templates; accuracies use the examples present")
    return TaskResult(task.name, n, n_correct, [tuple(x) for x in tc],
                      {k: tuple(v) for k, v in ai.items()} if ai is not None else None,
                      n_certain, n_missing)


def _gap_robustness(accs: Sequence[float]) -> float:
    """100 minus the largest absolute difference between any two accuracies."""
    return 100.0 - max((abs(x - y) for x, y in itertools.combinations(accs, 2)), default=0.0)


def aggregate(results: Mapping[str, TaskResult], allow_partial: bool = False) -> dict[str, Any]:
    """LMentry accuracy, the four robustness aspects, robustness and the LMentry score.

    ``results`` maps task names to their counts (``score_task``), for the 25 tasks and the 16
    argument-content variants. A missing task is an error unless ``allow_partial``; then every
    aspect averages the items that are complete and ``partial`` is true.
    """
    absent = [t for t in ALL_TASKS if t not in results]
    if absent and not allow_partial:
        raise InputError(f"LMentry needs results for all {len(ALL_TASKS)} tasks; absent: {absent}")
    acc = {t: r.accuracy for t, r in results.items()}
    core = [t for t in CORE_TASKS if t in results]
    if not core:
        raise InputError("none of the 25 LMentry tasks has results")

    order = {t: _gap_robustness([results[t].answer_index_accuracy(0), results[t].answer_index_accuracy(1)])
             for t in ANSWER_INDEX_TASKS if t in results}
    content = {}
    for base, variants in ARGUMENT_CONTENT_GROUPS.items():
        names = [f"{base}_{v}" for v in variants]
        if all(n in results for n in names):
            content[base] = _gap_robustness([acc[n] for n in names])
    template = {t: _gap_robustness(results[t].template_accuracies) for t in core}
    adjacent_by_kind: dict[str, dict[str, float]] = {}
    for kind, pairs in ADJACENT_TASK_PAIRS.items():
        adjacent_by_kind[kind] = {f"{a}/{b}": _gap_robustness([acc[a], acc[b]])
                                  for a, b in pairs if a in results and b in results}
    adjacent = {k: v for kinds in adjacent_by_kind.values() for k, v in kinds.items()}

    def mean(values):
        return float(np.mean(list(values))) if values else None

    components = {"argument_order": mean(order.values()), "argument_content": mean(content.values()),
                  "template": mean(template.values()), "adjacent_tasks": mean(adjacent.values())}
    present = [v for v in components.values() if v is not None]
    robustness = float(np.mean(present).round(1))
    accuracy = float(np.mean([acc[t] for t in core]))
    return {
        "lmentry_score": accuracy * robustness / 100.0,
        "accuracy": accuracy,
        "robustness": robustness,
        "robustness_components": components,
        "robustness_items": {"argument_order": order, "argument_content": content,
                             "template": template, "adjacent_tasks": adjacent},
        "adjacent_tasks_by_kind": {k: mean(v.values()) for k, v in adjacent_by_kind.items()},
        "partial": bool(absent),
        "absent_tasks": absent,
    }


# --------------------------------------------------------------------------------------------------
# Scoring a predictions file
# --------------------------------------------------------------------------------------------------

def _split_prediction_key(record) -> tuple[str, str]:
    task = record.extra.get("task")
    rid = record.id
    if task is not None:
        if not isinstance(task, str):
            raise InputError(f"{record.path}:{record.line}: field 'task' must be a string")
        if rid.startswith(task + "/"):
            rid = rid[len(task) + 1:]
        return task, rid
    if "/" not in rid:
        raise InputError(f"{record.path}:{record.line}: id {rid!r} does not name its task; write "
                         f"\"<task>/<example id>\" (e.g. \"bigger_number/17\") or add a \"task\" field")
    task, _, eid = rid.partition("/")
    return task, eid


def score_predictions(predictions: Mapping[tuple[str, str], str] | Mapping[str, str],
                      data: str | os.PathLike | Mapping[str, LMentryTask], *,
                      truncate: bool = False, allow_partial: bool = False, progress: bool = False) -> dict[str, Any]:
    """Scores predictions keyed by ``(task, example_id)`` or ``"task/example_id"`` (a progress bar on
    stderr with ``progress``).

    Returns ``overall`` (the LMentry score), ``accuracy``, ``robustness`` and its components,
    ``per_task`` (the 25 tasks' accuracies), ``per_analysis_task`` (the 16 variants), per-template and
    per-answer-position accuracies, and the bookkeeping (``num_scored``, ``missing``, ``unknown``).
    """
    loaded = load_data(data) if isinstance(data, (str, os.PathLike)) else dict(data)
    by_task: dict[str, dict[str, str]] = {}
    unknown: list[str] = []
    for key, pred in predictions.items():
        task, eid = key if isinstance(key, tuple) else str(key).partition("/")[::2]
        if task in loaded and eid in loaded[task].examples:
            by_task.setdefault(task, {})[eid] = pred
        else:
            unknown.append(prediction_id(task, eid))
    from tqdm import tqdm

    results: dict[str, TaskResult] = {}
    no_predictions = []
    total = sum(len(t.examples) for name, t in loaded.items() if name in by_task)
    with tqdm(total=total, desc="lmentry", unit="ex", disable=not progress, file=sys.stderr) as bar:
        for name, task in loaded.items():
            if name not in by_task:
                no_predictions.append(name)  # absent: not scored as all-wrong, see docs/evaluation.md#lmentry
                continue
            results[name] = score_task(task, by_task[name], truncate, progress=bar.update)
    if not results:
        hint = f" (e.g. {unknown[0]!r} matches no example)" if unknown else ""
        raise InputError(f"no prediction matches an LMentry example{hint}")
    agg = aggregate(results, allow_partial=allow_partial)
    n_scored = sum(r.n_examples - r.n_missing for r in results.values())
    return {
        "overall": agg["lmentry_score"],
        **agg,
        "per_task": {t: results[t].accuracy for t in CORE_TASKS if t in results},
        "per_analysis_task": {t: results[t].accuracy for t in ANALYSIS_TASKS if t in results},
        "per_template": {t: r.template_accuracies for t, r in results.items()},
        "per_answer_position": {t: [results[t].answer_index_accuracy(0), results[t].answer_index_accuracy(1)]
                                for t in ANSWER_INDEX_TASKS if t in results},
        "per_task_certainty": {t: round(100.0 * r.n_certain / r.n_examples, 2) for t, r in results.items()},
        "num_scored": n_scored,
        "num_examples": sum(r.n_examples for r in results.values()),
        "missing": sum(r.n_missing for r in results.values()),
        "missing_per_task": {t: r.n_missing for t, r in results.items() if r.n_missing},
        "tasks_without_predictions": no_predictions,
        "unknown": len(unknown),
        "unknown_ids": unknown[:20],
        "truncate_predictions": truncate,
    }


# --------------------------------------------------------------------------------------------------
# Predictions files: tuna-jax eval lmentry --predictions PRED.jsonl|DIR
# --------------------------------------------------------------------------------------------------

def read_repository_predictions(root: str | os.PathLike, model: str | None = None
                                ) -> tuple[dict[tuple[str, str], str], str]:
    """Predictions in the repository's own layout, ``predictions/<task>/<model>.json``, each file
    ``{"<example id>": {"prediction": str, ...}, ...}`` (what its ``predict.py`` writes and its analysis
    reads). ``root``: the ``predictions`` folder or a checkout holding one. ``model``: the file stem; None
    when every task folder holds the same single model. Returns ({(task, id): prediction}, model)."""
    base = pathlib.Path(root)
    if (base / "predictions").is_dir() and not any((base / t).is_dir() for t in ALL_TASKS):
        base = base / "predictions"
    tasks = [t for t in ALL_TASKS if (base / t).is_dir()]
    if not tasks:
        raise InputError(f"{base}: no predictions/<task>/ folders of LMentry tasks found")
    if model is None:
        names = {f.stem for t in tasks for f in (base / t).glob("*.json")}
        if len(names) != 1:
            raise InputError(f"{base}: holds predictions of {len(names)} models ({', '.join(sorted(names)[:5])}); "
                             f"choose one with --model")
        model = names.pop()
    preds: dict[tuple[str, str], str] = {}
    for t in tasks:
        f = base / t / f"{model}.json"
        if not f.is_file():
            continue  # this task is absent (an error unless --allow-partial, like any absent task)
        obj = read_json(f)
        if not isinstance(obj, dict):
            raise InputError(f"{f}: expected an object {{example id: {{\"prediction\": ...}}}}")
        for eid, entry in obj.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("prediction"), str):
                raise InputError(f"{f}: example {eid!r}: expected {{\"prediction\": text}}")
            preds[(t, str(eid))] = entry["prediction"]
    if not preds:
        raise InputError(f"{base}: no {model}.json in any task folder")
    return preds, model


def _read_jsonl_predictions(path: str) -> dict[tuple[str, str], str]:
    preds: dict[tuple[str, str], str] = {}
    first: dict[tuple[str, str], int] = {}
    for r in read_predictions_jsonl(path):
        key = _split_prediction_key(r)
        if key in preds:
            raise InputError(f"{r.path}:{r.line}: duplicate prediction for {prediction_id(*key)!r} "
                             f"(first given at line {first[key]})")
        preds[key] = r.prediction
        first[key] = r.line
    return preds


def read_predictions(path: str, model: str | None = None) -> tuple[dict[tuple[str, str], str], str | None]:
    """``(predictions, model)`` of a JSONL file (model None) or of the repository's predictions folder
    (``model``: which of its models, needed only when it holds several)."""
    if os.path.isdir(path):
        return read_repository_predictions(path, model)
    return _read_jsonl_predictions(path), None

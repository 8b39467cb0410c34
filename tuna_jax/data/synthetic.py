"""Synthetic instruction data with a known quality order, for the demo and the tests.

Small, deterministic, and free of licence questions (the Alpaca data is CC BY-NC and stays
outside the package). Each task has a correct answer and graded wrong ones, so a ranking
record's scores are known exactly: 3 correct, 2 near miss, 1 wrong, 0 off-topic.

Grading. :func:`grade` scores any answer to a task by the task's own rules (3 correct, 2 near miss, 1 wrong
but of the task's form, 0 off-topic), from the instruction and input alone, without a reference answer. It
gives the graded candidates above exactly these scores (a test checks), and it is the demo's contextual judge.

Held-out prompts. ``split="train"`` / ``"heldout"`` draws only prompts (instruction + input) on that side
of a fixed hash split (:func:`split_of`: a quarter of all prompts are held out), so an evaluation set
drawn from "heldout" shares no prompt with any training set drawn from "train", whatever the sizes and
seeds. The tasks with few inputs are split too: "Write the word three times." holds out about 5 of its
20 words and "What number comes after this one?" some of its 9 numbers, so evaluating on them tests
unseen inputs, not memory. ``split=None`` keeps the original draws (tests rely on them).
"""
from __future__ import annotations

import hashlib
import random
import re

WORDS = ["cat", "dog", "sun", "tree", "ball", "fish", "bird", "cake", "park", "boat", "star", "moon",
         "book", "rain", "milk", "frog", "hat", "car", "bed", "cup"]
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def _task(rng: random.Random) -> tuple[str, str, list[tuple[str, float]]]:
    """(instruction, input, [(response, score)] best first)."""
    kind = rng.randrange(4)
    w = rng.sample(WORDS, 4)
    if kind == 0:
        good = f"{w[0]} {w[0]} {w[0]}."
        return (INSTRUCTIONS[0], w[0],
                [(good, 3.0), (f"{w[0]} {w[0]}.", 2.0), (f"{w[1]} {w[1]} {w[1]}.", 1.0), ("Once upon a time.", 0.0)])
    if kind == 1:
        i = rng.randrange(len(NUMBERS) - 1)
        return (INSTRUCTIONS[1], NUMBERS[i],
                [(f"{NUMBERS[i + 1]}.", 3.0), (f"{NUMBERS[i]}.", 2.0), (f"{NUMBERS[(i + 5) % 10]}.", 1.0),
                 ("The cat is happy.", 0.0)])
    if kind == 2:
        words = " ".join(w[:3])
        return (INSTRUCTIONS[2], words,
                [(" ".join(reversed(w[:3])) + ".", 3.0), (words + ".", 2.0), (f"{w[3]} {w[3]}.", 1.0),
                 ("I like to play.", 0.0)])
    return (INSTRUCTIONS[3], " ".join(w[:3]),
            [(f"{w[0]}.", 3.0), (f"{w[1]}.", 2.0), (f"{w[3]}.", 1.0), ("The sun is big.", 0.0)])


INSTRUCTIONS = ("Write the word three times.", "What number comes after this one?", "Reverse the order of the words.",
                "Name the first word.")


def grade(instruction: str, input_text: str, answer: str) -> int:
    """The task's own grade of ``answer``: 3 correct, 2 near miss (the right word the wrong number of times;
    the number itself; the input's words in another order; another word of the input), 1 wrong but of the
    task's form (words of the vocabulary, number words), 0 anything else. Case and punctuation are ignored;
    an instruction that is not one of the four tasks raises ValueError."""
    said = re.findall(r"[a-z]+", answer.lower())
    given = input_text.split()
    if instruction == INSTRUCTIONS[1]:
        i = NUMBERS.index(input_text.strip())
        if said == NUMBERS[i + 1: i + 2]:
            return 3
        return 2 if said == [NUMBERS[i]] else 1 if said and all(t in NUMBERS for t in said) else 0
    if instruction not in INSTRUCTIONS:
        raise ValueError(f"not a synthetic task: {instruction!r}")
    if instruction == INSTRUCTIONS[0]:
        correct, near = given * 3, bool(said) and set(said) == set(given)
    elif instruction == INSTRUCTIONS[2]:
        correct, near = given[::-1], sorted(said) == sorted(given)
    else:
        correct, near = given[:1], len(said) == 1 and said[0] in given
    if said == correct:
        return 3
    return 2 if near else 1 if said and all(t in WORDS for t in said) else 0


def prompt_key(instruction: str, input_text: str) -> str:
    """What makes two prompts the same prompt: instruction and input, whitespace-normalised."""
    return " ".join(instruction.split()) + "\n" + " ".join(input_text.split())


def split_of(instruction: str, input_text: str) -> str:
    """"heldout" for a quarter of all prompts (by a hash of the prompt), "train" for the rest."""
    h = hashlib.sha256(prompt_key(instruction, input_text).encode("utf-8")).digest()
    return "heldout" if h[0] % 4 == 0 else "train"


def _tasks(n: int, rng: random.Random, split: str | None, distinct: bool):
    """n tasks, each drawn again until its prompt is on ``split`` (and new, when ``distinct``)."""
    seen: set[str] = set()
    for _ in range(n):
        while True:
            ins, inp, cands = _task(rng)
            key = prompt_key(ins, inp)
            if (split is None or split_of(ins, inp) == split) and not (distinct and key in seen):
                seen.add(key)
                yield ins, inp, cands
                break


def sft_records(n: int, seed: int = 0, split: str | None = None, distinct: bool = False) -> list[dict]:
    """Alpaca-format SFT rows: {instruction, input, output}; ``split`` / ``distinct``: see the module."""
    rng = random.Random(seed)
    rows = []
    for i, (ins, inp, cands) in enumerate(_tasks(n, rng, split, distinct)):
        rows.append({"id": f"syn-sft-{seed}-{i}", "instruction": ins, "input": inp, "output": cands[0][0]})
    return rows


def ranking_records(n: int, seed: int = 0, shuffle_candidates: bool = True, split: str | None = None,
                    distinct: bool = False) -> list[dict]:
    """Native ranking rows: {id, instruction, input, output, candidates [4], scores [4]}."""
    rng = random.Random(seed)
    rows = []
    for i, (ins, inp, cands) in enumerate(_tasks(n, rng, split, distinct)):
        if shuffle_candidates:
            cands = rng.sample(cands, len(cands))
        rows.append({"id": f"syn-rank-{seed}-{i}", "instruction": ins, "input": inp,
                     "output": max(cands, key=lambda c: c[1])[0],
                     "candidates": [c for c, _ in cands], "scores": [s for _, s in cands]})
    return rows

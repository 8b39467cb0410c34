"""Synthetic instruction data with a known quality order, for the demo and the tests.

Small, deterministic, and free of licence questions (the Alpaca data is CC BY-NC and stays
outside the package). Each task has a correct answer and graded wrong ones, so a ranking
record's scores are known exactly: 3 correct, 2 near miss, 1 wrong, 0 off-topic.
"""
from __future__ import annotations

import random

WORDS = ["cat", "dog", "sun", "tree", "ball", "fish", "bird", "cake", "park", "boat", "star", "moon",
         "book", "rain", "milk", "frog", "hat", "car", "bed", "cup"]
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def _task(rng: random.Random) -> tuple[str, str, list[tuple[str, float]]]:
    """(instruction, input, [(response, score)] best first)."""
    kind = rng.randrange(4)
    w = rng.sample(WORDS, 4)
    if kind == 0:
        good = f"{w[0]} {w[0]} {w[0]}."
        return ("Write the word three times.", w[0],
                [(good, 3.0), (f"{w[0]} {w[0]}.", 2.0), (f"{w[1]} {w[1]} {w[1]}.", 1.0), ("Once upon a time.", 0.0)])
    if kind == 1:
        i = rng.randrange(len(NUMBERS) - 1)
        return ("What number comes after this one?", NUMBERS[i],
                [(f"{NUMBERS[i + 1]}.", 3.0), (f"{NUMBERS[i]}.", 2.0), (f"{NUMBERS[(i + 5) % 10]}.", 1.0),
                 ("The cat is happy.", 0.0)])
    if kind == 2:
        words = " ".join(w[:3])
        return ("Reverse the order of the words.", words,
                [(" ".join(reversed(w[:3])) + ".", 3.0), (words + ".", 2.0), (f"{w[3]} {w[3]}.", 1.0),
                 ("I like to play.", 0.0)])
    return ("Name the first word.", " ".join(w[:3]),
            [(f"{w[0]}.", 3.0), (f"{w[1]}.", 2.0), (f"{w[3]}.", 1.0), ("The sun is big.", 0.0)])


def sft_records(n: int, seed: int = 0) -> list[dict]:
    """Alpaca-format SFT rows: {instruction, input, output}."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        ins, inp, cands = _task(rng)
        rows.append({"id": f"syn-sft-{seed}-{i}", "instruction": ins, "input": inp, "output": cands[0][0]})
    return rows


def ranking_records(n: int, seed: int = 0, shuffle_candidates: bool = True) -> list[dict]:
    """Native ranking rows: {id, instruction, input, output, candidates [4], scores [4]}."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        ins, inp, cands = _task(rng)
        if shuffle_candidates:
            cands = rng.sample(cands, len(cands))
        rows.append({"id": f"syn-rank-{seed}-{i}", "instruction": ins, "input": inp,
                     "output": max(cands, key=lambda c: c[1])[0],
                     "candidates": [c for c, _ in cands], "scores": [s for _, s in cands]})
    return rows

"""Tokenisation, truncation, padded [B, N, L] batches, and the resumable per-host iterator.
(Every layout's exactness: tests/unit/data/test_layouts.py.)"""
import itertools
import json

import numpy as np
import pytest

from tuna_jax.data.batching import BatchIterator, tokenize_ranking, tokenize_sft
from tuna_jax.data.layouts import LayoutCollator
from tuna_jax.data.records import DataError, RankingRecord, SFTRecord, record_prompt
from tuna_jax.data.shapes import bucket_sizes
from tuna_jax.data.templates import SpecialTokenPolicy, encode_prompt, load_tokenizer


class CharTok:
    """One id per character (ord + 10); BOS 1, EOS 2, pad 0. No dummy prefix, so
    encode_continuation == encode."""

    name, bos_id, eos_id, pad_id, vocab_size = "chars", 1, 2, 0, 1000

    def encode(self, text):
        return [ord(c) + 10 for c in text]

    encode_continuation = encode

    def decode(self, ids):
        return "".join(chr(i - 10) for i in ids if i >= 10)


TOK, POL = CharTok(), SpecialTokenPolicy()


def rrec(i, cands, scores, output="orig", prompt=None):
    return RankingRecord("ins", "", output, list(cands), list(scores), str(i),
                         prompt=prompt if prompt is not None else f"P{i}:", source=f"f.jsonl:{i}")


def padded(max_len, n, mle_target="original", pad_to_multiple=0, mode="ranking", shape_buckets=1):
    return LayoutCollator("padded", mode, max_len, TOK.pad_id, n, mle_target, pad_to_multiple=pad_to_multiple,
                          shape_buckets=shape_buckets)


def collate(coll, rows):
    return coll(rows, coll.plan([rows]))


def scored(b, unit, slot):
    """The scored tokens of one sequence slot of a padded batch, in order."""
    sel = b["score_slot"][unit] == slot
    return b["score_tgt"][unit][sel].tolist()


def check_row(ids, seg, pos, prompt, resp, pad):
    """One [L] row: prompt then resp (with EOS), right-padded."""
    p, n = len(prompt), len(prompt) + len(resp)
    assert ids[:p].tolist() == prompt and ids[p:n].tolist() == resp and (ids[n:] == pad).all()
    assert seg.tolist() == [1] * n + [0] * (len(ids) - n)
    assert pos.tolist() == list(range(n)) + [0] * (len(ids) - n)


@pytest.mark.parametrize("mle_target", ["original", "best", "all"])
def test_padded_ranking_batch(mle_target):
    recs = [rrec(0, ["ab", "cde", "f"], [0.5, 2.0, 2.0]), rrec(1, ["xyz", "w"], [-1.0, -3.0], output="oo")]
    ex, rep = tokenize_ranking(recs, TOK, POL, max_len=16, num_candidates=4, mle_target=mle_target)
    b = collate(padded(16, 4, mle_target), ex)
    q = 5 if mle_target == "original" else 4
    longest = max(e.seq_len() for e in ex) if mle_target == "original" else max(
        len(e.prompt_ids) + max(map(len, e.responses)) for e in ex)
    assert b["input_ids"].shape == (2, q, longest) and b["input_ids"].dtype == np.int32
    assert b["segment_ids"].dtype == np.int32 and b["positions"].dtype == np.int32
    assert b["candidate_mask"].dtype == bool and b["target"].dtype == np.float32
    assert b["target"].shape == (2, 4) and b["candidate_mask"].shape == (2, 4)
    assert b["candidate_mask"].tolist() == [[True, True, True, False], [True, True, False, False]]
    assert b["target"].tolist() == [[0.5, 2.0, 2.0, 0.0], [-1.0, -3.0, 0.0, 0.0]]
    assert b["unit_example"].tolist() == [[0], [1]]
    for i, r in enumerate(recs):
        prompt = [1] + TOK.encode(r.prompt)
        for k in range(4):
            resp = TOK.encode(r.candidates[k]) + [2] if k < len(r.candidates) else []
            check_row(b["input_ids"][i, k], b["segment_ids"][i, k], b["positions"][i, k], prompt if resp else [],
                      resp, TOK.pad_id)
            assert scored(b, i, k) == resp  # the candidate and its EOS are scored, nothing else
        # each scored token is predicted by the token just before it in the same row
        sel = b["score_slot"][i] == 0
        src = b["score_src"][i][sel]
        assert src.tolist() == list(range(len(prompt) - 1, len(prompt) - 1 + len(r.candidates[0]) + 1))
    mle = {"original": ["orig", "oo"], "best": ["cde", "xyz"], "all": [None, None]}[mle_target]  # tie: the first
    for i, r in enumerate(recs):
        if mle_target == "original":
            check_row(b["input_ids"][i, 4], b["segment_ids"][i, 4], b["positions"][i, 4],
                      [1] + TOK.encode(r.prompt), TOK.encode(mle[i]) + [2], TOK.pad_id)
            assert b["mle_slot"][i] == 4
        elif mle_target == "best":  # the best candidate's own slot: no extra row
            assert r.candidates[b["mle_slot"][i]] == mle[i]
        else:
            assert b["mle_slot"][i] == -1
    assert b["example_mask"].tolist() == [True, True]
    assert b["real_tokens"].tolist() == [sum(len(e.prompt_ids) + len(x) for x in e.responses)
                                         + (len(e.prompt_ids) + len(e.mle) if mle_target == "original" else 0)
                                         for e in ex]


def test_padded_sft_batch():
    recs = [SFTRecord("i", "", "hello", "a", prompt="Q:"), SFTRecord("i", "", "yo", "b", prompt="Long Q:")]
    ex, _ = tokenize_sft(recs, TOK, POL, max_len=12)
    b = collate(padded(12, 0, mode="sft"), ex + [None])
    assert set(b) == {"input_ids", "segment_ids", "positions", "score_src", "score_tgt", "score_pos", "score_slot",
                      "unit_example", "example_mask", "real_tokens"}
    for i, r in enumerate(recs):
        check_row(b["input_ids"][i, 0], b["segment_ids"][i, 0], b["positions"][i, 0],
                  [1] + TOK.encode(r.prompt), TOK.encode(r.output) + [2], TOK.pad_id)
        assert scored(b, i, 0) == TOK.encode(r.output) + [2]
        at = b["score_pos"][i][b["score_slot"][i] == 0]  # where the scored tokens sit: right after the prompt
        assert at.tolist() == list(range(len(TOK.encode(r.prompt)) + 1, b["segment_ids"][i, 0].sum()))
    assert b["example_mask"].tolist() == [True, True, False]
    assert (b["score_slot"][2] < 0).all() and b["segment_ids"][2].sum() == 0


def test_truncation_policy():
    long_prompt = "0123456789abcdef"  # 16 chars: 17 ids with BOS
    recs = [rrec(0, ["ab", "abcdef"], [1, 0], output="x", prompt=long_prompt),  # needs 7 response slots
            rrec(1, ["a" * 12], [1], output="x", prompt=long_prompt),  # response+EOS 13 > 12 - 1
            rrec(2, ["ab"], [1], output="x", prompt="ok")]
    ex, rep = tokenize_ranking(recs, TOK, POL, max_len=12, num_candidates=2, on_error="skip")
    assert [e.id for e in ex] == ["0", "2"]
    assert rep.skipped == {"response_too_long": 1} and rep.changed == {"prompt_truncated_left": 1}
    # BOS kept, then the prompt's last 12 - 7 - 1 = 4 tokens; the longest candidate's EOS survives
    assert ex[0].prompt_ids.tolist() == [1] + TOK.encode("cdef")
    b = collate(padded(12, 2, "all"), ex)
    assert b["input_ids"][0, 1, -1] == 2 and len(scored(b, 0, 1)) == 7
    with pytest.raises(DataError, match=r"f\.jsonl:1: response alone"):
        tokenize_ranking(recs, TOK, POL, max_len=12, num_candidates=2)
    ex, rep = tokenize_ranking(recs, TOK, POL, max_len=12, num_candidates=2, truncate="drop", on_error="skip")
    assert [e.id for e in ex] == ["2"] and rep.skipped == {"too_long": 2} and not rep.changed
    # without BOS the prompt is cut from the left, and one prompt token always remains
    ex, _ = tokenize_sft([SFTRecord("", "", "abcd", "s", prompt="xyz")], TOK,
                         SpecialTokenPolicy(add_bos=False), max_len=6)
    assert ex[0].prompt_ids.tolist() == TOK.encode("z")


def test_candidate_and_original_checks():
    recs = [rrec(0, "abc", [1, 2, 3]), rrec(1, "ab", [1, 2], output="")]
    with pytest.raises(DataError, match="3 candidates > num_candidates 2"):
        tokenize_ranking(recs, TOK, POL, max_len=32, num_candidates=2)
    ex, rep = tokenize_ranking(recs, TOK, POL, max_len=32, num_candidates=2, on_error="skip")
    assert ex == [] and rep.skipped == {"too_many_candidates": 1, "no_original_response": 1}
    ex, rep = tokenize_ranking(recs[1:], TOK, POL, max_len=32, num_candidates=2, mle_target="best")
    assert len(ex) == 1 and rep.num_skipped == 0


def _examples(n, seed=0):
    rng = np.random.default_rng(seed)
    recs = [rrec(i, ["c" * int(rng.integers(1, 9)) for _ in range(int(rng.integers(1, 4)))],
                 rng.normal(size=3).tolist(), prompt=f"P{i}:" + "p" * int(rng.integers(0, 20)))
            for i in range(n)]
    for r in recs:
        r.scores = r.scores[: len(r.candidates)]
    ex, _ = tokenize_ranking(recs, TOK, POL, max_len=40, num_candidates=3)
    return ex


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_resume_gives_exactly_the_remaining_batches():
    ex = _examples(23)
    coll = padded(40, 3, pad_to_multiple=2, shape_buckets=3)  # the planned shapes too
    make = lambda: BatchIterator(ex, coll, 4, seed=5, num_epochs=3)
    full = list(make())
    assert len(full) == 3 * (23 // 4)
    for k in (0, 3, 5, 11, len(full)):
        it = make()
        head = [next(it) for _ in range(k)]
        state = json.loads(json.dumps(it.state()))  # it goes into a checkpoint
        resumed = make()
        resumed.restore(state)
        rest = list(resumed)
        assert len(head) + len(rest) == len(full)
        for x, y in zip(head + rest, full):
            _same(x, y)
    assert make().state() == {"seed": 5, "epoch": 0, "index": 0, "num_examples": 23, "global_batch_size": 4}
    with pytest.raises(ValueError, match="num_examples"):
        BatchIterator(ex[:-1], coll, 4).restore(state)


def test_upcoming_gives_the_first_batch_of_each_shape_still_to_come():
    ex = _examples(23)
    it = BatchIterator(ex, padded(40, 3, pad_to_multiple=2, shape_buckets=3), 2, seed=5, num_epochs=2)
    for _ in range(7):
        next(it)
    state = it.state()
    sig = lambda b: tuple(v.shape for v in b.values())  # noqa: E731
    ahead = [sig(it.batch_at(*p)) for p in it.upcoming()]
    assert it.state() == state  # looking ahead does not move the iterator
    rest = [sig(b) for b in it]
    assert ahead == list(dict.fromkeys(rest)) and 1 < len(ahead) <= 3
    it.restore(state)
    assert [sig(it.batch_at(*p)) for p in it.upcoming(2)] == list(dict.fromkeys(rest[:2]))


def test_shuffle_is_seeded_and_covers_each_epoch():
    ex = _examples(10)
    index_of = {tuple(e.prompt_ids.tolist()): i for i, e in enumerate(ex)}
    coll = padded(40, 3)
    it = BatchIterator(ex, coll, 4, seed=1, num_epochs=2, drop_remainder=False)
    assert it.steps_per_epoch == 3 and len(it) == 6
    seen = [[], []]
    for step, b in enumerate(it):
        for r in np.flatnonzero(b["example_mask"]):
            start = int(b["score_src"][r][0]) + 1  # the first scored token follows the prompt
            seen[step // 3].append(index_of[tuple(b["input_ids"][r, 0, :start].tolist())])
        if step % 3 == 2:  # the last batch of an epoch is padded: 10 = 4 + 4 + 2
            assert b["example_mask"].tolist() == [True, True, False, False]
            assert not b["candidate_mask"][2:].any() and (b["score_slot"][2:] < 0).all()
    assert sorted(seen[0]) == sorted(seen[1]) == list(range(10))  # each epoch: every example once
    assert seen[0] == it.order(0).tolist() and seen[1] == it.order(1).tolist() and seen[0] != seen[1]
    o = [BatchIterator(ex, coll, 2, seed=s).order(e).tolist() for s, e in [(1, 0), (1, 0), (2, 0)]]
    assert o[0] == o[1] == seen[0] and o[0] != o[2]


def test_hosts_slice_the_global_batch():
    ex = _examples(30, seed=3)
    coll = padded(40, 3, pad_to_multiple=8)
    glob = list(BatchIterator(ex, coll, 6, seed=2, num_epochs=2))
    hosts = [list(BatchIterator(ex, coll, 6, seed=2, num_epochs=2, process_index=p, process_count=3))
             for p in range(3)]
    for g, parts in zip(glob, zip(*hosts)):
        assert parts[0]["input_ids"].shape[0] == 2
        _same(g, {k: np.concatenate([p[k] for p in parts]) for k in g})
    with pytest.raises(ValueError, match="does not divide over 4 hosts"):
        BatchIterator(ex, coll, 6, process_index=0, process_count=4)


def test_pad_to_multiple_length():
    ex = _examples(12, seed=4)
    coll = padded(40, 3, pad_to_multiple=8, shape_buckets=4)  # as many shapes as batches: each its own
    for b in BatchIterator(ex, coll, 3, seed=0, num_epochs=1):
        L = b["input_ids"].shape[-1]
        longest = int(b["segment_ids"].sum(-1).max())
        assert L % 8 == 0 and longest <= L < longest + 8 and L <= 40


def test_bucket_sizes_are_the_cheapest_k_sizes():
    """Against a brute force over every choice of sizes among the needs: the least total, and of the
    cheapest choices one with the fewest sizes."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        needs = rng.integers(1, 30, int(rng.integers(1, 20))).tolist()
        k = int(rng.integers(1, 6))
        got = bucket_sizes(needs, k)
        cost = lambda sizes: sum(min(b for b in sizes if b >= u) for u in needs)  # noqa: E731
        values = sorted(set(needs))
        choices = [list(c) + [values[-1]] for r in range(min(k, len(values)))
                   for c in itertools.combinations(values[:-1], r)]
        best = min(map(cost, choices))
        assert len(got) <= k and got[-1] == max(needs) and cost(got) == best
        assert len(got) == min(len(c) for c in choices if cost(c) == best)


def test_drop_remainder_needs_a_full_batch():
    with pytest.raises(ValueError, match="no full global batch"):
        BatchIterator(_examples(3), padded(40, 3), 4)


def test_llama_tokenizer_ranking_batch(shared_dir):
    tok = load_tokenizer(shared_dir / "models/llama2_tokenizer/tokenizer.model")
    rec = RankingRecord("Name a colour.", "", "Red.", ['"Blue"', "Green is nice.", "I like red."],
                        [1.0, 3.0, 2.0], "c")
    pol = SpecialTokenPolicy()
    ex, _ = tokenize_ranking([rec], tok, pol, max_len=64, num_candidates=4)
    b = LayoutCollator("padded", "ranking", 64, tok.pad_id, 4, "original")(ex, LayoutCollator(
        "padded", "ranking", 64, tok.pad_id, 4, "original").plan([ex]))
    prompt = encode_prompt(tok, record_prompt(rec), pol)
    for k, c in enumerate(rec.candidates):
        ids = b["input_ids"][0, k]
        assert ids[: len(prompt)].tolist() == prompt
        resp = scored(b, 0, k)
        assert tok.decode(resp[:-1]) == c and resp[-1] == tok.eos_id
    # left truncation with the real tokenizer keeps BOS and the EOS
    ex, rep = tokenize_ranking([rec], tok, pol, max_len=20, num_candidates=4)
    assert rep.changed["prompt_truncated_left"] == 1 and ex[0].prompt_ids[0] == 1
    coll = LayoutCollator("padded", "ranking", 20, tok.pad_id, 4, "original")
    b = coll(ex, coll.plan([ex]))
    assert (b["segment_ids"].sum(-1)[0, :3] <= 20).all() and b["input_ids"][0, 1, 19] == tok.eos_id

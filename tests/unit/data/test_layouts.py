"""Candidate layouts: every layout shows the model exactly the same sequences, and gives the same
log-likelihoods, losses and gradients as the padded layout (float32, 1e-5)."""
import collections
import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tuna_jax.config import load_config
from tuna_jax.data.batching import BatchIterator, TokenizedExample
from tuna_jax.data.layouts import LAYOUTS, LayoutCollator
from tuna_jax.model.attention import attention_mask
from tuna_jax.model.llama import Llama, LlamaConfig
from tuna_jax.objectives import batch_sums
from tuna_jax.train import ParamBinder

PAD = 0


def make_examples(n, n_cand=3, seed=0, vocab=60, max_len=24, variable=True):
    """Random tokenised examples: prompts 1..10 tokens (BOS first), 1..n_cand candidates of
    1..12 tokens ending in EOS (2), scores with ties, and an original response."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.integers(1, n_cand + 1)) if variable else n_cand
        resp = [np.asarray(list(rng.integers(3, vocab, int(rng.integers(0, 11)))) + [2], np.int32) for _ in range(k)]
        mle = np.asarray(list(rng.integers(3, vocab, int(rng.integers(0, 11)))) + [2], np.int32)
        need = max(len(r) for r in resp + [mle])
        p = [1] + list(rng.integers(3, vocab, int(rng.integers(0, 10))))
        p = p[: max(1, max_len - need)]  # as tokenize_ranking's truncation guarantees: fits max_len
        scores = rng.integers(0, 3, k).astype(np.float32)  # ties
        out.append(TokenizedExample(np.asarray(p, np.int32), resp, scores, mle, f"e{i}"))
    return out


def visible_contexts(batch, n):
    """Layout-independent view of a batch: for every scored token, the (position, token) pairs the
    attention mask lets its predicting query see, in order, and the target; keyed by
    (example index, slot)."""
    ids, seg, pos = (np.asarray(batch[k]) for k in ("input_ids", "segment_ids", "positions"))
    br = np.asarray(batch["branch_ids"]) if "branch_ids" in batch else np.zeros_like(seg)
    u, q, length = ids.shape
    flat = lambda x: x.reshape(u, q * length)  # noqa: E731
    ids_f, seg_f, pos_f, br_f = flat(ids), flat(seg), flat(pos), flat(br)
    idx = np.arange(length)
    out = {}
    for ui in range(u):
        for e in range(batch["unit_example"].shape[1]):
            key = int(batch["unit_example"][ui, e])
            if key < 0 or not batch["example_mask"][key]:
                continue
            for s in range(batch["score_slot"].shape[1]):
                slot = int(batch["score_slot"][ui, s])
                if slot < 0 or slot // (n + 1) != e:
                    continue
                src = int(batch["score_src"][ui, s])
                row, col = divmod(src, length)
                r = slice(row * length, (row + 1) * length)
                m = np.asarray(attention_mask(seg_f[ui:ui + 1, r], seg_f[ui:ui + 1, r], idx, idx,
                                              br_f[ui:ui + 1, r], br_f[ui:ui + 1, r]))[0, 0, col]
                ctx = [(int(p), int(t)) for p, t in zip(pos_f[ui, r][m], ids_f[ui, r][m])]
                out.setdefault((key, slot % (n + 1)), []).append((ctx, int(batch["score_tgt"][ui, s])))
    return out


def expected_contexts(examples, n, mode, mle_target):
    out = {}
    for i, e in enumerate(examples):
        seqs = [(0, e.responses[0])] if mode == "sft" else list(enumerate(e.responses))
        if mode == "ranking" and mle_target in ("original", "every"):
            seqs.append((n, e.mle))
        for slot, r in seqs:
            full = list(e.prompt_ids) + list(r)
            p = len(e.prompt_ids)
            out[(i, slot)] = [([(j, int(t)) for j, t in enumerate(full[: p + k])], int(r[k])) for k in range(len(r))]
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode,mle_target", [("ranking", "original"), ("ranking", "best"), ("ranking", "all"),
                                             ("ranking", "every"), ("sft", "original")])
def test_every_layout_shows_each_scored_token_its_prompt_and_prefix(layout, mode, mle_target):
    n = 3
    ex = make_examples(9, n, seed=1)
    coll = LayoutCollator(layout, mode, 24, PAD, n, mle_target, pad_to_multiple=8, attention_block=8, row_len=32)
    b = coll(ex + [None], coll.plan([ex + [None]]))
    got = visible_contexts(b, coll.n)
    # sorted, because a packed example split into pieces contributes its tokens piece by piece
    assert {k: sorted(v) for k, v in got.items()} == {k: sorted(v) for k, v in expected_contexts(
        ex, coll.n, mode, mle_target).items()}
    assert b["real_tokens"].sum() == sum(LayoutCollator.real_tokens(e, mode, mle_target) for e in ex)
    if mode == "ranking":
        assert b["candidate_mask"].sum() == sum(len(e.responses) for e in ex)
        if mle_target == "best":  # the MLE target is the best candidate's own slot: no extra tokens
            assert all(0 <= s < n for s in b["mle_slot"][b["example_mask"]])
    assert b["example_mask"].tolist() == [True] * len(ex) + [False]
    if layout == "packed":
        assert b["input_ids"].shape[-1] == 32  # rows of row_len
        assert (b["unit_example"] >= 0).sum(1).max() > 1  # several examples share a row
        if mode == "ranking" and mle_target == "original":
            pieces = (np.diff(b["segment_ids"][:, 0], axis=-1, prepend=0) > 0).sum()
            assert pieces > len(ex)  # and groups longer than a row are split


@pytest.mark.parametrize("layout", ["prefix_shared", "packed"])
def test_block_table_lists_every_visible_key(layout):
    ex = make_examples(12, 4, seed=2)
    for block in (4, 8, 16):
        coll = LayoutCollator(layout, "ranking", 24, PAD, 4, "original", pad_to_multiple=8, attention_block=block,
                              row_len=64)
        b = coll(ex, coll.plan([ex]))
        seg, br, table = b["segment_ids"][:, 0], b["branch_ids"][:, 0], b["kv_blocks"][:, 0]
        length = seg.shape[1]
        idx = np.arange(length)
        mask = np.asarray(attention_mask(seg, seg, idx, idx, br, br))[:, 0]
        need = mask.reshape(len(seg), length // block, block, length // block, block).any(axis=(2, 4))
        listed = np.zeros_like(need)
        for u, j, m in zip(*np.nonzero(table >= 0)):
            listed[u, j, table[u, j, m]] = True
        assert (need <= listed).all()  # nothing visible is left out
        if block < 16:
            assert table.shape[-1] < length // block  # and it does skip blocks


def test_packed_shape_is_fixed_for_the_run_and_units_divide():
    ex = make_examples(40, 3, seed=3)
    coll = LayoutCollator("packed", "ranking", 24, PAD, 3, "original", unit_multiple=4, attention_block=8, row_len=32)
    it = BatchIterator(ex, coll, 8, seed=0, num_epochs=2)
    shapes = {tuple(np.shape(b[k]) for k in ("input_ids", "score_src", "target", "kv_blocks")) for b in it}
    assert len(shapes) == 1
    (ids_shape, *_), = shapes
    assert ids_shape[0] % 4 == 0 and ids_shape[2] == 32
    hosts = [BatchIterator(ex, coll, 8, seed=0, num_epochs=2, process_index=p, process_count=2) for p in range(2)]
    for a, b in zip(*hosts):  # every host builds the same shapes from its own rows
        assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


def test_packing_splits_groups_to_fill_rows():
    """Alpaca-like lengths (prompts 40-220 tokens, 4 candidates + the MLE target of 2-660 tokens),
    48 prompts, rows of 1024: whole groups cut in order and packed first-fit-decreasing leave about
    15% of the positions empty; splitting groups into the rows' room leaves under 8%."""
    rng = np.random.default_rng(0)
    quant = np.linspace(0, 1, 6)
    plen, rlen = [40, 45, 50, 62, 91, 224], [2, 30, 120, 210, 333, 664]
    ex = []
    for i in range(48):
        p = [1] + list(rng.integers(3, 60, int(np.interp(rng.random(), quant, plen)) - 1))
        resp = [np.asarray(list(rng.integers(3, 60, int(np.interp(rng.random(), quant, rlen)) - 1)) + [2], np.int32)
                for _ in range(5)]
        ex.append(TokenizedExample(np.asarray(p, np.int32), resp[:4], rng.normal(size=4).astype(np.float32),
                                   resp[4], f"e{i}"))
    coll = LayoutCollator("packed", "ranking", 1024, PAD, 4, "original", attention_block=64)
    b = coll(ex, coll.plan([ex]))
    scored = collections.Counter()  # every sequence scored once, whole (exactness: the tests above)
    for ue, slots in zip(b["unit_example"], b["score_slot"]):
        for s in slots[slots >= 0]:
            scored[int(ue[s // 5]), int(s % 5)] += 1
    assert scored == {(i, k): len(r) for i, e in enumerate(ex) for k, r in enumerate(e.responses + [e.mle])}
    assert (b["segment_ids"] > 0).mean() > 0.92
    for row in b["segment_ids"][:, 0]:  # each piece's prompt is paid again: splits stay few
        assert len(np.unique(row[row > 0])) <= 8


def test_packed_runs_take_at_most_shape_buckets_row_counts():
    """Row counts per batch come from a few sizes (multiples of unit_multiple, the same on every
    host), each batch the smallest that holds it: fewer rows computed than one run-wide shape, and
    the batches hold the same sequences."""
    ex = make_examples(120, 3, seed=5)

    def collator(k):
        return LayoutCollator("packed", "ranking", 24, PAD, 3, "original", unit_multiple=2, attention_block=8,
                              row_len=32, shape_buckets=k)

    one, three = (list(BatchIterator(ex, collator(k), 8, seed=0, num_epochs=2)) for k in (1, 3))
    for k, batches in ((1, one), (3, three)):
        counts = {b["input_ids"].shape[0] for b in batches}
        assert len(counts) <= k and all(c % 2 == 0 for c in counts)
        keys = ("input_ids", "score_src", "kv_blocks")
        assert len({tuple(np.shape(b[key])[1:] for key in keys) for b in batches}) == 1
    assert len({b["input_ids"].shape[0] for b in three}) > 1
    assert sum(b["input_ids"].shape[0] for b in three) < sum(b["input_ids"].shape[0] for b in one)
    for b, b1 in zip(three, one):
        assert (b["segment_ids"] > 0).sum() == (b1["segment_ids"] > 0).sum()
        assert b["real_tokens"].sum() == b1["real_tokens"].sum()
    hosts = [BatchIterator(ex, collator(3), 8, seed=0, num_epochs=2, process_index=p, process_count=2)
             for p in range(2)]
    for a, b in zip(*hosts):
        assert {key: v.shape for key, v in a.items()} == {key: v.shape for key, v in b.items()}


def _signature(batch):
    return tuple(sorted((k, np.shape(v)) for k, v in batch.items()))


def _scored(batch):
    """Per unit, the (slot, token) of every scored entry; trailing empty units (a packed batch's spare
    rows) left out."""
    out = [list(zip(s[s >= 0].tolist(), t[s >= 0].tolist())) for s, t in zip(batch["score_slot"], batch["score_tgt"])]
    while out and not out[-1]:
        out.pop()
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode,mle_target", [("ranking", "original"), ("ranking", "all"), ("sft", "original")])
def test_every_layout_takes_at_most_shape_buckets_shapes(layout, mode, mle_target):
    """Over two epochs of examples of many lengths (``all``: the PRM's batches), a run's batches take at
    most ``shape_buckets`` shapes (every array's shape counted), the planned ones; the batches hold what
    they hold when each takes its own size; and the sizes compute the fewest token positions any
    ``shape_buckets`` sizes could (brute force over the batches' own sizes)."""
    ex = make_examples(48, 3, seed=11)
    batch = 8 if layout == "packed" else 2  # packed row counts vary over larger batches

    def run(k):
        coll = LayoutCollator(layout, mode, 24, PAD, 3, mle_target, pad_to_multiple=1, attention_block=2,
                              row_len=24, shape_buckets=k)
        it = BatchIterator(ex, coll, batch, seed=0, num_epochs=2)
        return it, list(it)

    own_it, own = run(1000)
    keys = [(e, i) for e in range(2) for i in range(own_it.steps_per_epoch)]
    sizes = [own_it.shape_for(*key).positions for key in keys]
    assert len(set(sizes)) >= 4  # the data asks for more shapes than 3
    it, batches = run(3)
    assert len({_signature(b) for b in batches}) == len(it.planned_shapes()) <= 3
    values = sorted(set(sizes))
    cost = lambda chosen: sum(min(c for c in chosen if c >= s) for s in sizes)  # noqa: E731
    best = min(cost(list(c) + [values[-1]]) for r in range(3) for c in itertools.combinations(values[:-1], r))
    assert sum(it.shape_for(*key).positions for key in keys) == best < cost([values[-1]])
    for b, b_own in zip(batches, own):
        assert _scored(b) == _scored(b_own)
        assert (b["segment_ids"] > 0).sum() == (b_own["segment_ids"] > 0).sum()
        assert b["real_tokens"].tolist() == b_own["real_tokens"].tolist()
    j = max(range(len(own)), key=lambda j: batches[j]["input_ids"].size - own[j]["input_ids"].size)
    assert batches[j]["input_ids"].size > own[j]["input_ids"].size
    got, want = visible_contexts(batches[j], it.collator.n), visible_contexts(own[j], it.collator.n)
    assert {k: sorted(v) for k, v in got.items()} == {k: sorted(v) for k, v in want.items()}


@pytest.mark.parametrize("micro,hosts", [(2, 1), (4, 2), (1, 2), (2, 2)])
def test_packed_micro_batches_hold_their_own_examples(micro, hosts):
    """The step splits every array into ``micro`` parts along its first axis: each part's rows must
    hold only that part's examples, indexed within the part."""
    ex = make_examples(32, 3, seed=8)
    coll = LayoutCollator("packed", "ranking", 24, PAD, 3, "original", micro_batches=micro, attention_block=8)
    its = [BatchIterator(ex, coll, 8, seed=0, num_epochs=1, process_index=p, process_count=hosts) for p in range(hosts)]
    for parts in zip(*its):
        b = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}  # the global batch
        per_micro, units = 8 // micro, b["unit_example"].shape[0] // micro
        for m in range(micro):
            ue = b["unit_example"][m * units:(m + 1) * units]
            assert ue.max() < per_micro
            got = visible_contexts({**{k: v[m * units:(m + 1) * units] for k, v in b.items()
                                       if k in ("input_ids", "segment_ids", "positions", "branch_ids", "score_src",
                                                "score_tgt", "score_slot", "unit_example")},
                                    "example_mask": b["example_mask"][m * per_micro:(m + 1) * per_micro]}, 3)
            ids = {k for k, _ in got}
            assert ids == set(range(per_micro))


# ---- model-level exactness -------------------------------------------------------------------

CONFIGS = {
    "gqa2_untied": dict(vocab_size=60, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=8),
    "mqa_tied": dict(vocab_size=60, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                     num_kv_heads=1, head_dim=8, tie_word_embeddings=True),
}


def _cfg(layout, mode="ranking", mle_target="original", n=3, form="paper"):
    return load_config(None, [f"train.mode={mode}", f"data.layout={layout}", f"data.num_candidates={n}",
                              f"loss.mle_target={mle_target}", f"loss.form={form}", "data.max_len=24",
                              "data.pad_to_multiple=8", "data.attention_block=8"])


def _sums_and_grads(model, cfg, examples):
    coll = LayoutCollator(cfg.data.layout, cfg.train.mode, cfg.data.max_len, PAD, cfg.data.num_candidates,
                          cfg.loss.mle_target, pad_to_multiple=8, attention_block=cfg.data.attention_block)
    batch = coll(examples, coll.plan([examples]))
    binder = ParamBinder(model.cfg)
    params = binder.to_pure(model)

    def loss(p):
        s = batch_sums(binder.bind(p), jax.tree.map(jnp.asarray, batch), cfg)
        return s["loss"], s

    (_, sums), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return jax.tree.map(np.asarray, sums), jax.tree.map(np.asarray, grads)


# Each MLE target once, each model shape at least once (the six combinations cost 110 s of CI time).
@pytest.mark.parametrize("name,mle_target", [("gqa2_untied", "original"), ("mqa_tied", "best"),
                                             ("gqa2_untied", "all")])
@pytest.mark.slow
def test_layouts_give_the_padded_losses_and_gradients(name, mle_target):
    model = Llama(LlamaConfig(**CONFIGS[name], attention="xla"), nnx.Rngs(0))
    ex = make_examples(7, 3, seed=4)
    ex[2] = dataclasses.replace(ex[2], responses=ex[2].responses[:1], scores=ex[2].scores[:1])  # one candidate
    ref_sums, ref_grads = _sums_and_grads(model, _cfg("padded", mle_target=mle_target), ex)
    assert ref_sums["pairs"] > 0 and ref_sums["rank_loss"] > 0
    for layout in ("prefix_shared", "packed"):
        sums, grads = _sums_and_grads(model, _cfg(layout, mle_target=mle_target), ex)
        for k in ref_sums:
            np.testing.assert_allclose(sums[k], ref_sums[k], rtol=1e-5, atol=1e-5, err_msg=f"{layout} {k}")
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5, err_msg=layout)


def test_mle_target_every_is_the_mean_over_the_original_and_the_candidates():
    """Alpaca-Mul's MLE (``every``): with 3 candidates per example, (3 x the candidates' mean + the original's) / 4,
    from the padded batches of ``all`` and ``original`` (same model, same examples)."""
    model = Llama(LlamaConfig(**CONFIGS["gqa2_untied"], attention="xla"), nnx.Rngs(2))
    ex = make_examples(5, 3, seed=6, variable=False)
    sums = {}
    for t in ("every", "all", "original"):  # the sums only: no gradient to compile
        cfg = _cfg("padded", mle_target=t)
        coll = LayoutCollator("padded", "ranking", 24, PAD, 3, t, pad_to_multiple=8, attention_block=8)
        batch = jax.tree.map(jnp.asarray, coll(ex, coll.plan([ex])))
        sums[t] = float(jax.jit(lambda b, cfg=cfg: batch_sums(model, b, cfg)["mle_loss"])(batch))
    np.testing.assert_allclose(sums["every"], (3 * sums["all"] + sums["original"]) / 4, rtol=1e-6)
    assert sums["every"] != sums["all"] != sums["original"]


@pytest.mark.slow
def test_sft_layouts_agree():
    model = Llama(LlamaConfig(**CONFIGS["gqa2_untied"], attention="xla"), nnx.Rngs(1))
    ex = [dataclasses.replace(e, responses=e.responses[:1], scores=None, mle=None) for e in make_examples(9, seed=5)]
    ref_sums, ref_grads = _sums_and_grads(model, _cfg("padded", "sft"), ex)
    for layout in ("prefix_shared", "packed"):
        sums, grads = _sums_and_grads(model, _cfg(layout, "sft"), ex)
        np.testing.assert_allclose(sums["loss"], ref_sums["loss"], rtol=1e-5)
        assert sums["count"] == ref_sums["count"] == sum(len(e.responses[0]) for e in ex)
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_per_candidate_logprobs_equal_across_layouts_and_a_numpy_forward():
    """The slot sums of every layout equal log p summed over each response (+EOS) computed from
    the full logits of the plain, unpadded sequence."""
    from tuna_jax.logprobs import example_logprobs

    model = Llama(LlamaConfig(**CONFIGS["gqa2_untied"], attention="xla"), nnx.Rngs(2))
    forward = nnx.jit(lambda m, x: m(x))  # one compile per length instead of an eager dispatch per operation
    ex = make_examples(5, 3, seed=6)
    want = {}
    for i, e in enumerate(ex):
        for k, r in enumerate(list(e.responses) + [e.mle]):
            seq = np.concatenate([e.prompt_ids, r])[None]
            logits = np.asarray(forward(model, jnp.asarray(seq)), np.float64)[0]
            top = logits.max(-1, keepdims=True)
            logp = logits - np.log(np.exp(logits - top).sum(-1, keepdims=True)) - top
            p = len(e.prompt_ids)
            want[(i, k if k < len(e.responses) else 3)] = sum(logp[p + j - 1, r[j]] for j in range(len(r)))
    for layout in LAYOUTS:
        coll = LayoutCollator(layout, "ranking", 24, PAD, 3, "original", pad_to_multiple=8, attention_block=8)
        b = coll(ex, coll.plan([ex]))
        total, count = nnx.jit(example_logprobs, static_argnums=2)(model, jax.tree.map(jnp.asarray, b), 4)
        total = np.asarray(total)
        for (i, k), v in want.items():
            assert abs(total[i, k] - v) <= 1e-4 * max(1.0, abs(v)), (layout, i, k)


def test_auto_layout_per_platform():
    from tuna_jax.data.layouts import resolve_layout

    assert resolve_layout("auto", "cpu") == "prefix_shared"
    assert resolve_layout("auto", "gpu") == resolve_layout("auto", "tpu") == "packed"
    assert resolve_layout("padded", "gpu") == "padded"
    with pytest.raises(ValueError, match="data.layout='rows'"):
        LayoutCollator("rows", "ranking", 24, PAD, 3)


@pytest.mark.slow
def test_truncated_prompts_give_the_padded_losses_in_every_layout():
    """Examples whose prompts tokenize_ranking cut from the left to fit max_len (the BOS kept)."""
    from tuna_jax.data.batching import tokenize_ranking
    from tuna_jax.data.records import RankingRecord
    from tuna_jax.data.templates import SpecialTokenPolicy

    class CharTok:  # one id per character, ids 3..59
        bos_id, eos_id, pad_id, vocab_size, name = 1, 2, 0, 60, "chars"

        def encode(self, text):
            return [3 + ord(c) % 57 for c in text]

        encode_continuation = encode

    rng = np.random.default_rng(9)
    recs = [RankingRecord("", "", "".join(rng.choice(list("abcdef"), 5)),
                          ["".join(rng.choice(list("xyzuvw"), int(rng.integers(1, 9)))) for _ in range(3)],
                          [2.0, 1.0, 0.0], f"r{i}", prompt="p" * int(rng.integers(5, 30))) for i in range(6)]
    ex, report = tokenize_ranking(recs, CharTok(), SpecialTokenPolicy(), max_len=16, num_candidates=3)
    assert report.changed.get("prompt_truncated_left", 0) >= 3
    model = Llama(LlamaConfig(**CONFIGS["gqa2_untied"], attention="xla"), nnx.Rngs(3))
    ref_sums, ref_grads = _sums_and_grads(model, _cfg("padded"), ex)
    for layout in ("prefix_shared", "packed"):
        sums, grads = _sums_and_grads(model, _cfg(layout), ex)
        for k in ref_sums:
            np.testing.assert_allclose(sums[k], ref_sums[k], rtol=1e-5, atol=1e-5, err_msg=f"{layout} {k}")
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5, err_msg=layout)

"""Our Flax LLaMA against transformers' PyTorch LlamaForCausalLM, float32, max |dlogit| <= 1e-4."""
import numpy as np
import pytest

pytest.importorskip("torch")

import jax.numpy as jnp  # noqa: E402

from tests.support.hf_utils import hf_logits, save_hf, tiny_hf_model  # noqa: E402
from tuna_jax.model.convert import load_hf_model  # noqa: E402
from tuna_jax.model.llama import padded_inputs  # noqa: E402

CASES = [
    dict(num_kv_heads=1, tie=False, llama3=False),
    dict(num_kv_heads=2, tie=True, llama3=False),
    dict(num_kv_heads=4, tie=False, llama3=True),
    dict(num_kv_heads=2, tie=True, llama3=True),
]


@pytest.mark.parametrize("case", CASES,
                         ids=lambda c: f"kv{c['num_kv_heads']}-tie{int(c['tie'])}-llama3{int(c['llama3'])}")
@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
def test_logits_match_hf(tmp_path, case, scan):
    hf = tiny_hf_model(**case)
    model = load_hf_model(save_hf(hf, tmp_path / "hf"), scan_layers=scan)
    ids = np.random.RandomState(1).randint(0, 128, (3, 40))  # 40 > original_max_position_embeddings=16
    ours = np.asarray(model(jnp.asarray(ids)))
    ref = hf_logits(hf, ids)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-4


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.slow
def test_padded_batch_equals_unpadded(tmp_path, side):
    hf = tiny_hf_model(num_kv_heads=2)
    model = load_hf_model(save_hf(hf, tmp_path / "hf"))
    rng = np.random.RandomState(2)
    lengths = [12, 7, 3]
    seqs = [rng.randint(3, 128, n) for n in lengths]
    L = max(lengths)
    ids = np.zeros((3, L), np.int64)
    mask = np.zeros((3, L), np.int64)
    for i, s in enumerate(seqs):
        sl = slice(L - len(s), L) if side == "left" else slice(0, len(s))
        ids[i, sl], mask[i, sl] = s, 1
    pos, seg = padded_inputs(jnp.asarray(mask))
    logits = np.asarray(model(jnp.asarray(ids), pos, seg))
    for i, s in enumerate(seqs):
        alone_ours = np.asarray(model(jnp.asarray(s[None])))[0]
        alone_hf = hf_logits(hf, s[None])[0]
        sl = slice(L - len(s), L) if side == "left" else slice(0, len(s))
        assert np.abs(logits[i, sl] - alone_ours).max() <= 1e-5
        assert np.abs(logits[i, sl] - alone_hf).max() <= 1e-4


def test_packed_and_prefix_shared_layouts(tmp_path):
    """Two examples packed in one row, and a prompt shared by two candidates, give the logits
    of the sequences run alone: the mask is built from segment ids, branch ids and positions."""
    hf = tiny_hf_model(num_kv_heads=1)
    model = load_hf_model(save_hf(hf, tmp_path / "hf"))
    rng = np.random.RandomState(3)
    a, b = rng.randint(3, 128, 6), rng.randint(3, 128, 5)
    packed = np.concatenate([a, b])[None]
    seg = np.array([[1] * 6 + [2] * 5])
    pos = np.array([list(range(6)) + list(range(5))])
    out = np.asarray(model(jnp.asarray(packed), jnp.asarray(pos), jnp.asarray(seg)))[0]
    assert np.abs(out[:6] - hf_logits(hf, a[None])[0]).max() <= 1e-4
    assert np.abs(out[6:] - hf_logits(hf, b[None])[0]).max() <= 1e-4

    prompt, c1, c2 = rng.randint(3, 128, 4), rng.randint(3, 128, 3), rng.randint(3, 128, 5)
    row = np.concatenate([prompt, c1, c2])[None]
    branch = np.array([[0] * 4 + [1] * 3 + [2] * 5])
    pos = np.array([list(range(4)) + list(range(4, 7)) + list(range(4, 9))])
    h, _ = model.hidden_states(jnp.asarray(row), jnp.asarray(pos), jnp.ones_like(jnp.asarray(row)), jnp.asarray(branch))
    out = np.asarray(jnp.einsum("bld,dv->blv", h, model.lm_head_weight()))[0]
    ref1 = hf_logits(hf, np.concatenate([prompt, c1])[None])[0]
    ref2 = hf_logits(hf, np.concatenate([prompt, c2])[None])[0]
    assert np.abs(out[:7] - ref1).max() <= 1e-4
    assert np.abs(out[7:] - ref2[4:]).max() <= 1e-4


def test_llama3_config_hashes_by_value():
    """jit takes the config (inside the graphdef) as a static argument: a Llama-3.1 config.json, whose
    rope_scaling is a dict and eos_token_id a list, must hash, and equal configs must hash equal; to_hf gives the
    dict and list back."""
    from tests.support.hf_utils import LLAMA3_SCALING
    from tuna_jax.model.llama import LlamaConfig

    hf = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 500000.0,
          "rope_scaling": dict(LLAMA3_SCALING), "eos_token_id": [2, 3], "tie_word_embeddings": False}
    a, b = LlamaConfig.from_hf(dict(hf)), LlamaConfig.from_hf(dict(hf))
    assert a == b and hash(a) == hash(b)
    assert a.eos_ids == (2, 3)
    out = a.to_hf()
    assert out["eos_token_id"] == [2, 3] and dict(out["rope_scaling"]) == {**LLAMA3_SCALING}
    assert hash(LlamaConfig.from_hf({**hf, "rope_scaling": {**LLAMA3_SCALING, "factor": 32.0}})) != hash(a)

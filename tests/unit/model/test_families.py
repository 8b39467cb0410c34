"""Every supported HF family against transformers' PyTorch model (float32): conversion round trips
bitwise, logits and log-probs within 1e-4, greedy decoding token for token, and one-line refusals of
what the decoder does not run."""
import json

import numpy as np
import pytest

pytest.importorskip("torch")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from tests.support.hf_utils import hf_greedy, tiny_family_model  # noqa: E402
from tuna_jax.model.convert import ConversionError, load_hf_model, save_hf_model  # noqa: E402
from tuna_jax.model.llama import LlamaConfig, abstract_model, padded_inputs  # noqa: E402

# (case id, family, HF config keys): GQA where the family has it, tied and untied, each option on.
CASES = [
    ("llama-bias", "llama", dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True)),
    ("mistral-window", "mistral", dict(num_key_value_heads=2, sliding_window=32)),
    ("qwen2-tied", "qwen2", dict(num_key_value_heads=2, tie=True)),
    ("qwen3-bias", "qwen3", dict(num_key_value_heads=1, head_dim=16, attention_bias=True)),
    ("qwen3-tied", "qwen3", dict(num_key_value_heads=2, tie=True)),
    ("stablelm", "stablelm", dict(hidden=64, num_key_value_heads=2, use_qkv_bias=True, partial_rotary_factor=0.25)),
    ("stablelm-parallel", "stablelm", dict(hidden=64, num_key_value_heads=4, use_parallel_residual=True, tie=True)),
    ("neox", "gpt_neox", dict(hidden=64, rotary_pct=0.25, rotary_emb_base=5000)),
    ("neox-sequential", "gpt_neox", dict(hidden=64, rotary_pct=0.5, use_parallel_residual=False,
                                         attention_bias=False, hidden_act="gelu_new", tie=True)),
]
EOS = 2


# Greedy decoding compiles a prefill and a decode loop per case (~5 s of CPU): two cases that between them
# run every option of the attention and MLP blocks through the KV cache stay in the quick run.
FAST_GREEDY = ("qwen3-bias", "neox")
_BUILT: dict = {}


def build(case_id: str, tmp_path_factory):
    """(family, HF model, its folder, our model loaded from it), built once per case."""
    if case_id not in _BUILT:
        _, family, kw = next(c for c in CASES if c[0] == case_id)
        hf = tiny_family_model(family, **kw)
        src = tmp_path_factory.mktemp(case_id) / "hf"
        hf.save_pretrained(str(src), safe_serialization=True)
        _BUILT[case_id] = family, hf, src, load_hf_model(src)
    return _BUILT[case_id]


@pytest.fixture(scope="module", params=[c[0] for c in CASES])
def case(request, tmp_path_factory):
    return build(request.param, tmp_path_factory)


@nnx.jit
def forward(model, ids, positions, segment_ids):
    return model(ids, positions, segment_ids)


def all_tensors(folder) -> dict:
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def hf_logits(hf, ids, mask):
    import torch

    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        return hf(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)).logits.numpy()


def left_padded(lengths, seed=1):
    rng = np.random.RandomState(seed)
    L = max(lengths)
    ids, mask = np.zeros((len(lengths), L), np.int64), np.zeros((len(lengths), L), np.int64)
    for i, n in enumerate(lengths):
        ids[i, L - n:], mask[i, L - n:] = rng.randint(3, 128, n), 1
    return ids, mask


def test_config_reads_the_family(case):
    import jax

    family, hf, src, model = case
    cfg = model.cfg
    assert cfg.family == family
    again = LlamaConfig.from_hf(json.loads((src / "config.json").read_text()))
    assert cfg == again and hash(cfg) == hash(again)  # by value: jit takes it as a static argument
    assert LlamaConfig.from_hf(cfg.to_hf()) == cfg  # what a params checkpoint stores and reads back
    assert cfg.num_params() == sum(p.numel() for p in hf.parameters())
    assert cfg.num_params() == sum(x.size for x in jax.tree.leaves(nnx.state(abstract_model(cfg))))


def test_logits_and_logprobs_match_hf(case):
    """Left-padded rows, positions from the mask: logits and per-token log-probs at every real token."""
    import jax

    _, hf, _, model = case
    ids, mask = left_padded([12, 7, 3])
    pos, seg = padded_inputs(jnp.asarray(mask))
    ours = np.asarray(forward(model, jnp.asarray(ids), pos, seg))
    ref = hf_logits(hf, ids, mask)
    real = mask.astype(bool)
    assert np.abs(ours[real] - ref[real]).max() <= 1e-4
    ref_lp = np.asarray(jax.nn.log_softmax(jnp.asarray(ref), axis=-1))
    ours_lp = np.asarray(jax.nn.log_softmax(jnp.asarray(ours), axis=-1))
    assert np.abs(ours_lp[real] - ref_lp[real]).max() <= 1e-4


@pytest.mark.parametrize("case_id", [pytest.param(c[0], marks=() if c[0] in FAST_GREEDY else pytest.mark.slow)
                                     for c in CASES])
def test_greedy_decoding_matches_hf_generate(case_id, tmp_path_factory):
    """Our sampler (left-padded batch, KV cache) against HF generate on each prompt alone."""
    from tuna_jax.generate import Sampler, SamplingParams

    _, hf, _, model = build(case_id, tmp_path_factory)
    rng = np.random.RandomState(2)
    prompts = [[int(t) for t in rng.randint(3, 128, n)] for n in (5, 1, 8)]
    out = Sampler(model, batch_size=4).generate(prompts, SamplingParams.greedy(max_new_tokens=6))
    assert len({tuple(s.token_ids) for (s,) in out}) == len(prompts)  # the prompt decides: a real check
    for p, (sample,) in zip(prompts, out):
        assert sample.token_ids == hf_greedy(hf, p, 6, EOS), p


def test_round_trip_is_bitwise_and_hf_loads_the_export(case, tmp_path):
    import torch
    import transformers

    family, hf, src, model = case
    back = save_hf_model(nnx.state(model), model.cfg, tmp_path / "back", like=str(src))
    a, b = all_tensors(src), all_tensors(back)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), f"{k} differs after the round trip"
    written = json.loads((back / "config.json").read_text())
    assert written["model_type"] == family and written["architectures"] == [type(hf).__name__]
    # The export alone (no `like` config to lean on) is a complete config.json: HF rebuilds the same model.
    bare = save_hf_model(nnx.state(model), model.cfg, tmp_path / "bare")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(bare), dtype=torch.float32).eval()
    assert type(reloaded) is type(hf)
    ids, mask = left_padded([9, 4], seed=3)
    assert np.array_equal(hf_logits(reloaded, ids, mask), hf_logits(hf, ids, mask))


# ---- sharding -------------------------------------------------------------------------------

def test_every_parameter_has_logical_axes(case):
    """New parameters (biases, q/k norms, LayerNorm biases) carry logical names the rules table knows."""
    from tuna_jax.parallel import make_mesh, state_shardings

    _, _, _, model = case
    state = nnx.state(abstract_model(model.cfg))
    for path, var in nnx.to_flat_state(state):
        axes = var.get_metadata().get("logical_axes")
        assert axes is not None and len(axes) == len(var.shape), path
    state_shardings(state, make_mesh("1,2,4"))  # raises on a name without a rule


@pytest.mark.slow
@pytest.mark.parametrize("family,kw", [CASES[3][1:], CASES[7][1:]], ids=[CASES[3][0], CASES[7][0]])
def test_sharded_model_matches_hf(tmp_path, family, kw):
    from tuna_jax.parallel import make_mesh

    hf = tiny_family_model(family, **kw)
    hf.save_pretrained(str(tmp_path / "hf"), safe_serialization=True)
    model = load_hf_model(tmp_path / "hf", mesh=make_mesh("1,2,4"))
    ids, mask = left_padded([10, 4])
    pos, seg = padded_inputs(jnp.asarray(mask))
    ours, ref = np.asarray(model(jnp.asarray(ids), pos, seg)), hf_logits(hf, ids, mask)
    assert np.abs(ours[mask > 0] - ref[mask > 0]).max() <= 1e-4


# ---- export details -------------------------------------------------------------------------

def test_bfloat16_fused_qkv_round_trip(tmp_path):
    """NeoX's fused query_key_value split into q/k/v and joined again, in bfloat16: bitwise."""
    import torch

    src = tmp_path / "hf"
    tiny_family_model("gpt_neox", hidden=64).to(torch.bfloat16).save_pretrained(str(src), safe_serialization=True)
    model = load_hf_model(src)
    back = save_hf_model(nnx.state(model), model.cfg, tmp_path / "back", like=str(src))
    a, b = all_tensors(src), all_tensors(back)
    assert sorted(a) == sorted(b)
    assert all(b[k].dtype == a[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a)


def test_export_copies_tokenizer_and_sets_the_alpaca_template(tmp_path):
    """The tokenizer files of ``like`` are copied; its chat template is replaced by the Alpaca one the
    model was trained on (``convert.write_chat_template``), whatever the family."""
    from tuna_jax.data.templates import alpaca_chat_template

    src = tmp_path / "hf"
    tiny_family_model("qwen2", num_key_value_heads=2).save_pretrained(str(src), safe_serialization=True)
    (src / "tokenizer.json").write_text("{}")
    (src / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ qwen }}", "model_max_length": 64}))
    model = load_hf_model(src)
    back = save_hf_model(nnx.state(model), model.cfg, tmp_path / "back", like=str(src))
    assert (back / "tokenizer.json").read_text() == "{}"
    tok_cfg = json.loads((back / "tokenizer_config.json").read_text())
    assert tok_cfg["model_max_length"] == 64 and tok_cfg["chat_template"] == alpaca_chat_template()


# ---- the sliding window ---------------------------------------------------------------------

def test_sliding_window_rows_longer_than_the_window_are_refused(tmp_path):
    """Within the window the plain causal mask is HF's mask (the mistral case above); beyond it HF's
    logits change (keys fall out of the window), and tuna-jax refuses rather than ignore that."""
    import torch

    from tuna_jax.generate import Sampler, SamplingParams

    hf = tiny_family_model("mistral", num_key_value_heads=2, sliding_window=8)
    hf.save_pretrained(str(tmp_path / "hf"), safe_serialization=True)
    model = load_hf_model(tmp_path / "hf")
    assert model.cfg.sliding_window == 8
    ids = np.random.RandomState(4).randint(3, 128, (1, 12))
    with torch.no_grad():
        windowed = hf(torch.tensor(ids)).logits.numpy()
        hf.config.sliding_window = None
        full = hf(torch.tensor(ids)).logits.numpy()
    assert np.abs(windowed[0, :8] - full[0, :8]).max() < 1e-5 < np.abs(windowed[0, 8:] - full[0, 8:]).max()

    with pytest.raises(ValueError, match=r"rows of 12 tokens exceed the model's sliding_window=8"):
        model(jnp.asarray(ids))
    with pytest.raises(ValueError, match=r"sliding_window=8"):  # 3 prompt tokens + 6 new: a 13-slot cache
        Sampler(model, batch_size=1).generate([[5, 6, 7]], SamplingParams.greedy(max_new_tokens=6))


# ---- refusals -------------------------------------------------------------------------------

def hf_config(family, **kw) -> dict:
    from tests.support.hf_utils import tiny_family_config

    return tiny_family_config(family, **kw).to_dict()


REFUSALS = [
    ("qwen2", dict(num_key_value_heads=2, use_sliding_window=True), {}, r"use_sliding_window=True .*qwen2"),
    ("qwen3", dict(num_key_value_heads=2), {"layer_types": ["full_attention", "sliding_attention"]},
     r"layer_types=.*sliding_attention.* is not supported for qwen3"),
    ("mistral", dict(num_key_value_heads=2), {"layer_types": ["sliding_attention", "full_attention"]},
     r"layer_types=.* is not supported for mistral"),
    ("stablelm", dict(num_key_value_heads=2, qk_layernorm=True), {}, r"qk_layernorm=True is not supported"),
    ("gpt_neox", {}, {"rope_parameters": None, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
     r"rope_scaling=.*linear.* is not supported for gpt_neox"),
    ("stablelm", dict(num_key_value_heads=2), {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0,
                                                                   "rope_theta": 1e4}},
     r"rope_scaling=.*dynamic.* is not supported for stablelm"),
    ("qwen2", dict(num_key_value_heads=2), {"partial_rotary_factor": 0.5}, r"partial_rotary_factor=0.5 .*qwen2"),
    ("llama", {}, {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"rope_scaling type 'yarn'"),
    ("gpt_neox", {}, {"hidden_act": "relu"}, r"hidden_act='relu' is not supported"),
    ("llama", {}, {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"]},
     r"unsupported architecture model_type='mixtral'"),
    ("qwen2", {}, {"architectures": ["Qwen2ForSequenceClassification"]}, r"unsupported architecture"),
]


@pytest.mark.parametrize("family,kw,edit,message", REFUSALS, ids=[f"{r[0]}-{r[3][:20]}" for r in REFUSALS])
def test_unsupported_keys_are_refused_in_one_line(family, kw, edit, message):
    cfg = {**hf_config(family, **kw), **edit}
    with pytest.raises(ValueError, match=message) as e:
        LlamaConfig.from_hf(cfg)
    assert "\n" not in str(e.value)


def test_refusal_names_the_config_file(tmp_path):
    src = tmp_path / "hf"
    tiny_family_model("stablelm", num_key_value_heads=2).save_pretrained(str(src), safe_serialization=True)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "qk_layernorm": True}))
    with pytest.raises(ConversionError, match=r"hf/config\.json: qk_layernorm=True is not supported for stablelm"):
        load_hf_model(src)

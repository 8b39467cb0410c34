"""HF -> Orbax -> HF round trips (bitwise), and clear errors for bad checkpoints."""
import json
import pathlib

import numpy as np
import pytest

pytest.importorskip("torch")

from safetensors import safe_open  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from tests.support.hf_utils import hf_logits, save_hf, tiny_hf_model  # noqa: E402
from tuna_jax.cli import main as cli  # noqa: E402
from tuna_jax.model.convert import ConversionError, load_hf_model  # noqa: E402

MODEL_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "head_dim")


def all_tensors(folder: pathlib.Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k)
    return out


def rope_fields(cfg: dict) -> tuple:
    rp = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = rp.pop("rope_theta", cfg.get("rope_theta"))
    rp.pop("type", None)
    return theta, {k: v for k, v in rp.items() if rp.get("rope_type", "default") != "default"}


@pytest.mark.parametrize("case,dtype", [(dict(num_kv_heads=1, tie=False, llama3=True), "float32"),
                                        (dict(num_kv_heads=2, tie=True, llama3=False), "bfloat16")])
def test_round_trip_hf_orbax_hf(tmp_path, case, dtype):
    import torch
    from transformers import LlamaForCausalLM

    hf = tiny_hf_model(**case)
    src = save_hf(hf, tmp_path / "hf", dtype=dtype)
    (src / "tokenizer_config.json").write_text('{"model_max_length": 128}')  # copied through
    assert cli(["convert", "hf-to-orbax", str(src), str(tmp_path / "ckpt")]) == 0
    assert cli(["convert", "orbax-to-hf", str(tmp_path / "ckpt"), str(tmp_path / "back"), "--like", str(src),
                "--max-shard-gb", str(20_000 / 2**30)]) == 0  # tiny shards: exercise the index
    back = tmp_path / "back"
    assert (back / "model.safetensors.index.json").is_file()
    assert len(list(back.glob("model-*-of-*.safetensors"))) > 1
    assert (back / "tokenizer_config.json").read_text() == '{"model_max_length": 128}'

    a, b = all_tensors(src), all_tensors(back)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), f"{k} differs after the round trip"

    ca, cb = json.loads((src / "config.json").read_text()), json.loads((back / "config.json").read_text())
    for f in MODEL_FIELDS:
        assert ca.get(f) == cb.get(f), f
    assert rope_fields(ca) == rope_fields(cb)

    reloaded = LlamaForCausalLM.from_pretrained(str(back), dtype=getattr(torch, dtype)).eval()
    original = LlamaForCausalLM.from_pretrained(str(src), dtype=getattr(torch, dtype)).eval()
    ids = np.random.RandomState(0).randint(0, 128, (2, 20))
    assert np.array_equal(hf_logits(reloaded, ids), hf_logits(original, ids))


def test_orbax_checkpoint_restores_same_model(tmp_path):
    import jax.numpy as jnp

    from tuna_jax.model import load_model

    hf = tiny_hf_model(num_kv_heads=2)
    src = save_hf(hf, tmp_path / "hf")
    assert cli(["convert", "hf-to-orbax", str(src), str(tmp_path / "ckpt")]) == 0
    ids = np.random.RandomState(0).randint(0, 128, (2, 16))
    ours = np.asarray(load_model(tmp_path / "ckpt")(jnp.asarray(ids)))
    assert np.abs(ours - hf_logits(hf, ids)).max() <= 1e-4


# ---- bad input -------------------------------------------------------------------------

@pytest.fixture
def good_hf(tmp_path):
    return save_hf(tiny_hf_model(num_kv_heads=2, layers=1), tmp_path / "good")


def test_folder_without_safetensors_names_pickle(tmp_path, good_hf, monkeypatch):
    import pickle

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((good_hf / "config.json").read_text())

    class Boom:
        def __reduce__(self):  # would run on unpickling
            return (pytest.fail, ("a pickle was loaded",))

    (bad / "pytorch_model.bin").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ConversionError, match=r"no \*\.safetensors.*pytorch_model\.bin.*never loads"):
        load_hf_model(bad)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((good_hf / "config.json").read_text())
    with pytest.raises(ConversionError, match="no \\*\\.safetensors"):
        load_hf_model(empty)


def test_unsupported_architecture(tmp_path, good_hf):
    cfg = json.loads((good_hf / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "mixtral", ["MixtralForCausalLM"]  # MoE: not one of the families
    (good_hf / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match=r"config\.json.*unsupported architecture.*mixtral"):
        load_hf_model(good_hf)


def test_shape_mismatch_names_file_and_tensor(tmp_path, good_hf):
    f = good_hf / "model.safetensors"
    with safe_open(str(f), framework="numpy") as st:
        tensors = {k: st.get_tensor(k) for k in st.keys()}
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((7, 32), np.float32)
    save_file(tensors, str(f), metadata={"format": "pt"})
    where = r"model\.safetensors.*model\.layers\.0\.self_attn\.k_proj\.weight.*\[7, 32\]"
    with pytest.raises(ConversionError, match=where):
        load_hf_model(good_hf)


def test_missing_and_unexpected_tensors(tmp_path, good_hf):
    f = good_hf / "model.safetensors"
    with safe_open(str(f), framework="numpy") as st:
        tensors = {k: st.get_tensor(k) for k in st.keys()}
    missing = dict(tensors)
    del missing["model.norm.weight"]
    save_file(missing, str(f), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"model\.norm\.weight.*missing"):
        load_hf_model(good_hf)
    tensors["model.layers.0.extra.weight"] = np.zeros(3, np.float32)
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="unexpected tensor"):
        load_hf_model(good_hf)


def test_cli_reports_errors_plainly(tmp_path, capsys):
    assert cli(["convert", "hf-to-orbax", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "no config.json" in capsys.readouterr().err

"""`convert hf-to-orbax` streams: the checkpoint it writes equals the in-memory path's bit for bit,
restores onto a mesh, and the conversion holds one piece of one tensor at a time, not the model."""
import json
import os
import subprocess
import sys
import textwrap
import weakref

import numpy as np
import pytest

pytest.importorskip("torch")

from tests.support.hf_utils import save_hf, tiny_family_model, tiny_hf_model  # noqa: E402
from tests.support.train_utils import REPO  # noqa: E402
from tuna_jax.model import convert  # noqa: E402
from tuna_jax.model.checkpoint import convert_hf_to_params, load_params, save_params  # noqa: E402


def _flat_params(model) -> dict:
    from flax import nnx

    return {k: np.asarray(v) for k, v in nnx.traversals.flatten_mapping(
        nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()}


@pytest.mark.parametrize("family,kw,dtype,param_dtype", [
    ("llama", dict(num_kv_heads=1, tie=False), "bfloat16", "float32"),
    ("llama", dict(num_kv_heads=2, tie=True), "float32", "bfloat16"),
    ("gpt_neox", dict(tie=False), "float32", "float32"),  # fused query_key_value, biases, LayerNorm
])
def test_streamed_checkpoint_equals_the_in_memory_one(tmp_path, monkeypatch, family, kw, dtype, param_dtype):
    # pieces of 20 rows: the embedding and the head (128 rows) are written in 7 pieces, the last short
    monkeypatch.setattr(convert, "PIECE_BYTES", 20 * 32 * np.dtype(convert.NP_DTYPES[param_dtype]).itemsize)
    hf = tiny_hf_model(**kw) if family == "llama" else tiny_family_model(family, **kw)
    src = save_hf(hf, tmp_path / "hf", dtype=dtype)
    out, cfg = convert_hf_to_params(src, tmp_path / "streamed", param_dtype=param_dtype)
    save_params(tmp_path / "in_memory", convert.load_hf_model(src, param_dtype=param_dtype), tokenizer_src=src)
    a = _flat_params(load_params(out, param_dtype=param_dtype))
    b = _flat_params(load_params(tmp_path / "in_memory", param_dtype=param_dtype))
    assert sorted(a) == sorted(b)
    for k in a:
        assert (a[k].dtype, a[k].shape) == (b[k].dtype, b[k].shape), k
        assert a[k].tobytes() == b[k].tobytes(), f"{k} differs"
    # against the HF tensors themselves (not our own in-memory path): the embedding, split in pieces
    embed = dict(hf.named_parameters())["gpt_neox.embed_in.weight" if family == "gpt_neox"
                                        else "model.embed_tokens.weight"]
    want = embed.detach().float().numpy().astype(convert.NP_DTYPES[param_dtype])
    assert a[("embed_tokens",)].tobytes() == want.tobytes()
    config = json.loads((tmp_path / "in_memory" / "config.json").read_text())
    assert json.loads((out / "config.json").read_text()) == config


def test_streamed_checkpoint_restores_onto_a_mesh(tmp_path):
    from tuna_jax import parallel

    src = save_hf(tiny_hf_model(num_kv_heads=2), tmp_path / "hf")
    out, _ = convert_hf_to_params(src, tmp_path / "ckpt")
    mesh = parallel.make_mesh((2, 2, 2))
    model = load_params(out, mesh)
    q = model.layers.self_attn.q_proj[...]
    assert q.sharding.mesh.shape == mesh.shape and not q.sharding.is_fully_replicated
    got, want = _flat_params(model), _flat_params(convert.load_hf_model(src))
    assert sorted(got) == sorted(want)
    assert all(got[k].tobytes() == want[k].tobytes() for k in got)


def test_one_piece_alive_at_a_time(tmp_path, monkeypatch):
    """Every piece read from the HF files is dropped before the next is read: Orbax writes all leaves
    at once, the handler one leaf, one piece at a time (an in-flight copy would show here too)."""
    monkeypatch.setattr(convert, "PIECE_BYTES", 20 * 32 * 4)
    src = save_hf(tiny_hf_model(num_kv_heads=2, layers=3), tmp_path / "hf")
    alive, most, pieces = [0], [0], [0]
    read = convert.SafetensorsIndex.get

    def counted_get(self, *args):
        arr = read(self, *args)
        alive[0] += 1
        pieces[0] += 1
        most[0] = max(most[0], alive[0])
        weakref.finalize(arr, lambda: alive.__setitem__(0, alive[0] - 1))
        return arr

    monkeypatch.setattr(convert.SafetensorsIndex, "get", counted_get)
    blocks = convert.hf_param_blocks

    def counted_blocks(*args):  # each yielded block (the tensor converted to param_dtype) counts too
        for path, shape, dt, chunks, fn in blocks(*args):
            def wrapped(fn=fn):
                for where, block in fn():
                    alive[0] += 1
                    most[0] = max(most[0], alive[0])
                    weakref.finalize(block, lambda: alive.__setitem__(0, alive[0] - 1))
                    yield where, block
            yield path, shape, dt, chunks, wrapped

    import tuna_jax.model.checkpoint as ckpt

    monkeypatch.setattr(ckpt, "hf_param_blocks", counted_blocks)
    convert_hf_to_params(src, tmp_path / "ckpt")
    # 3 layers x 9 tensors + embedding and head in 7 pieces each + the final norm
    assert pieces[0] == 3 * 9 + 7 + 7 + 1
    assert most[0] <= 2, f"{most[0]} pieces alive at once"  # the HF piece and its converted copy
    assert alive[0] == 0


MEASURE = textwrap.dedent("""
    import json, sys
    from tuna_jax.model.checkpoint import convert_hf_to_params, save_params
    from tuna_jax.model.convert import load_hf_model

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    def growth(run):
        open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
        before = status("VmRSS")
        run()
        return status("VmHWM") - before

    hf, out = sys.argv[1], sys.argv[2]
    streamed = growth(lambda: convert_hf_to_params(hf, out + "/streamed"))
    in_memory = growth(lambda: save_params(out + "/in_memory", load_hf_model(hf), tokenizer_src=hf))
    print(json.dumps({"streamed": streamed, "in_memory": in_memory}))
""")


@pytest.mark.slow
def test_peak_rss_does_not_grow_with_the_model(tmp_path):
    """A 170 MB bf16 checkpoint (340 MB in float32) in a fresh process: streaming it raises the peak
    RSS by a fraction of the model (80 MB when measured, first-call set-up included); the in-memory
    path, the control, by at least all of it (620 MB)."""
    import ml_dtypes
    from safetensors.numpy import save_file

    from tuna_jax.model.llama import LlamaConfig

    hf_cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 8000, "hidden_size": 512,
              "intermediate_size": 1376, "num_hidden_layers": 24, "num_attention_heads": 8,
              "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
    shapes = convert.hf_tensor_shapes(LlamaConfig.from_hf(hf_cfg))
    rng = np.random.default_rng(0)
    pool = (rng.standard_normal(2**22, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    tensors = {n: np.resize(pool[rng.integers(0, 2**21):], s) for n, s in shapes.items()}
    hf = tmp_path / "hf"
    hf.mkdir()
    save_file(tensors, str(hf / "model.safetensors"), metadata={"format": "pt"})
    (hf / "config.json").write_text(json.dumps(hf_cfg))
    model_f32 = sum(int(np.prod(s)) for s in shapes.values()) * 4
    del tensors
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", MEASURE, str(hf), str(tmp_path)], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["in_memory"] >= model_f32, got  # the measurement sees a model held whole
    assert got["streamed"] < 0.5 * model_f32, got

"""Meshes (1,8,1), (1,4,2), (2,2,2) on 8 emulated CPU devices give one device's results."""
import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from tuna_jax import parallel
from tuna_jax.logprobs import sequence_logprobs
from tuna_jax.model.llama import Llama, LlamaConfig

CFG = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, max_position_embeddings=64)

# What the rules table must give each parameter on a (2,2,2) mesh, written out by hand.
EXPECTED_222 = {
    ("embed_tokens",): P("tensor", "fsdp"),
    ("lm_head",): P("fsdp", "tensor"),
    ("norm", "weight"): P(),
    ("layers", "self_attn", "q_proj"): P(None, "fsdp", "tensor"),
    ("layers", "self_attn", "k_proj"): P(None, "fsdp", "tensor"),
    ("layers", "self_attn", "o_proj"): P(None, "tensor", None, "fsdp"),
    ("layers", "mlp", "gate_proj"): P(None, "fsdp", "tensor"),
    ("layers", "mlp", "down_proj"): P(None, "tensor", "fsdp"),
    ("layers", "input_layernorm", "weight"): P(),
}


def need_8():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax import")


def batch():
    rng = np.random.RandomState(0)
    ids = rng.randint(0, 128, (8, 2, 24)).astype(np.int32)  # [B, N, L]
    mask = np.zeros_like(ids, np.float32)
    mask[..., 10:20] = 1.0
    seg = np.ones_like(ids)
    seg[..., 20:] = 0  # padding tail
    return ids, mask, seg


def run(model, ids, mask, seg, mesh=None):
    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state, ids, mask, seg):
        m = nnx.merge(graphdef, state)
        flat = ids.reshape(-1, ids.shape[-1])
        return m(flat), sequence_logprobs(m, ids, mask, seg, chunk=8)

    if mesh is not None:
        ids, mask, seg = (jax.device_put(x, parallel.batch_sharding(mesh, x.ndim)) for x in (ids, mask, seg))
    logits, (lp, n) = f(state, ids, mask, seg)
    return np.asarray(logits), np.asarray(lp), np.asarray(n)


@pytest.mark.parametrize("shape", [(1, 8, 1), (1, 4, 2), (2, 2, 2)])
@pytest.mark.slow
def test_mesh_matches_single_device(shape):
    need_8()
    ids, mask, seg = batch()
    with jax.default_device(jax.devices()[0]):
        single = Llama(CFG, nnx.Rngs(0))
        ref = run(single, ids, mask, seg)
    mesh = parallel.make_mesh(shape)
    sharded = parallel.init_sharded(lambda: Llama(CFG, nnx.Rngs(0)), mesh)
    emb = sharded.embed_tokens[...]
    assert len(emb.sharding.device_set) == 8
    with jax.set_mesh(mesh):
        out = run(sharded, ids, mask, seg, mesh)
    for a, b in zip(out, ref):
        assert np.abs(a - b).max() <= 1e-5
    assert np.all(out[2] == 10)


@pytest.mark.slow
def test_param_shardings_follow_rules_table():
    need_8()
    mesh = parallel.make_mesh((2, 2, 2))
    model = parallel.init_sharded(lambda: Llama(CFG, nnx.Rngs(0)), mesh)
    state = nnx.state(model, nnx.Param)
    for path, spec in EXPECTED_222.items():
        var = state
        for p in path:
            var = var[p]
        assert var[...].sharding.spec == spec, path
    # placing existing single-device params gives the same layout
    with jax.default_device(jax.devices()[0]):
        host = nnx.state(Llama(CFG, nnx.Rngs(0)), nnx.Param)
    placed = parallel.place_state(host, mesh)
    assert placed["layers"]["self_attn"]["q_proj"][...].sharding.spec == P(None, "fsdp", "tensor")


@pytest.mark.slow
def test_indivisible_dims_are_replicated_not_split():
    need_8()
    cfg = LlamaConfig(**{**CFG.__dict__, "num_kv_heads": 1})
    mesh = parallel.make_mesh((1, 4, 2))
    model = parallel.init_sharded(lambda: Llama(cfg, nnx.Rngs(0)), mesh)
    assert model.layers.self_attn.k_proj[...].sharding.spec == P(None, "fsdp")  # 1 kv head: not on tensor


def test_mesh_parsing_and_batch_divisibility():
    assert parallel.parse_mesh_shape("1,-1,2", 8) == (1, 4, 2)
    assert parallel.parse_mesh_shape(None, 8) == (1, 8, 1)
    with pytest.raises(ValueError, match="slots"):
        parallel.parse_mesh_shape("2,2,1", 8)
    with pytest.raises(ValueError, match="three sizes"):
        parallel.parse_mesh_shape("8", 8)
    need_8()
    mesh = parallel.make_mesh((2, 2, 2))
    with pytest.raises(ValueError, match="not divisible"):
        parallel.shard_batch({"x": np.zeros((6, 3))}, mesh)

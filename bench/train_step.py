"""Step time and tokens/s of the jitted ranking (Tuna) and SFT train steps.

    python bench/train_step.py                  # tiny and ~20M-parameter configs, CPU
    python bench/train_step.py --configs 20m --batch 8 --n 4 --len 256 --json

Builds the real step of ``tuna_jax.train`` (forward over [B, N, L] candidates + the MLE target,
ranking + MLE loss, backward, AdamW) on random data with a realistic response mask, compiles it
once (compile time reported apart), then times ``--repeats`` steps with block_until_ready and
prints the median. Tokens counted are the real (non-padding) tokens of the batch. On an
accelerator the same script reports MFU from 6 * params * tokens per step.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tuna_jax import parallel
from tuna_jax.config import load_config
from tuna_jax.model.llama import Llama, LlamaConfig
from tuna_jax.train import ParamBinder, make_optimizer, make_train_step

CONFIGS = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=5,
                 num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512),
    "20m": dict(vocab_size=32000, hidden_size=256, intermediate_size=704, num_hidden_layers=6,
                num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024),
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048),
}
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5e": 197e12}


def make_batch(rng, mode: str, b: int, n: int, length: int, vocab: int) -> dict:
    prompt = length // 3
    if mode == "sft":
        ids = rng.integers(3, vocab, (b, length)).astype(np.int32)
        mask = np.zeros((b, length), np.float32)
        mask[:, prompt:] = 1
        return {"input_ids": ids, "loss_mask": mask, "segment_ids": np.ones_like(ids),
                "positions": np.broadcast_to(np.arange(length, dtype=np.int32), ids.shape).copy(),
                "example_mask": np.ones(b, bool)}
    ids = rng.integers(3, vocab, (b, n, length)).astype(np.int32)
    seg = np.ones_like(ids)
    mask = np.zeros(ids.shape, np.float32)
    for i in range(b):
        for k in range(n):  # candidates of different lengths, right-padded
            end = rng.integers(prompt + 8, length + 1)
            mask[i, k, prompt:end] = 1
            seg[i, k, end:] = 0
    pos = np.broadcast_to(np.arange(length, dtype=np.int32), ids.shape).copy()
    return {"input_ids": ids, "loss_mask": mask, "segment_ids": seg, "positions": pos,
            "candidate_mask": np.ones((b, n), bool), "target": rng.normal(size=(b, n)).astype(np.float32),
            "example_mask": np.ones(b, bool), "mle_input_ids": ids[:, 0], "mle_loss_mask": mask[:, 0],
            "mle_segment_ids": seg[:, 0], "mle_positions": pos[:, 0]}


def bench_one(name: str, mode: str, args) -> dict:
    hf = CONFIGS[name]
    cfg = load_config(None, [f"train.mode={mode}", f"model.dtype={args.dtype}", f"model.remat_policy={args.remat}",
                             f"train.global_batch={args.batch}", "train.grad_accum=1"])
    lcfg = LlamaConfig.from_hf(hf, dtype=args.dtype, remat_policy=args.remat)
    mesh = parallel.make_mesh(args.mesh)
    with jax.set_mesh(mesh):
        model = parallel.init_sharded(lambda: Llama(lcfg, nnx.Rngs(0)), mesh)
        binder = ParamBinder(lcfg)
        params = binder.to_pure(model)
        tx, schedule = make_optimizer(cfg.optim, 1000)
        state = {"params": params, "opt_state": jax.jit(tx.init)(params), "step": jnp.zeros((), jnp.int32),
                 "rng": jax.random.key_data(jax.random.key(0))}
        step = jax.jit(make_train_step(binder, cfg, tx, schedule), donate_argnums=(0,))
        batch = make_batch(np.random.default_rng(0), mode, args.batch, args.n, args.len, hf["vocab_size"])
        tokens = float(np.sum(batch["segment_ids"] > 0)) + (
            float(np.sum(batch["mle_segment_ids"] > 0)) if "mle_segment_ids" in batch else 0.0)
        sharded = parallel.shard_batch(batch, mesh)
        t0 = time.perf_counter()
        state, m = step(state, sharded)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            state, m = step(state, sharded)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    n_params = lcfg.num_params()
    out = {"config": name, "mode": mode, "params_M": round(n_params / 1e6, 2), "batch": args.batch,
           "n": args.n if mode == "ranking" else 1, "len": args.len, "tokens_per_step": tokens,
           "compile_s": round(compile_s, 2), "step_s": round(t, 4), "tokens_per_s": round(tokens / t, 1),
           "device": jax.devices()[0].device_kind, "devices": jax.device_count()}
    kind = jax.devices()[0].device_kind
    peak = next((v for k, v in PEAK_FLOPS.items() if k.lower() in kind.lower()), None)
    if peak:
        out["mfu"] = round(6 * n_params * tokens / t / (peak * jax.device_count()), 4)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="tiny,20m", help=f"comma list of {sorted(CONFIGS)}")
    p.add_argument("--modes", default="ranking,sft")
    p.add_argument("--batch", type=int, default=4, help="prompts per step")
    p.add_argument("--n", type=int, default=4, help="candidates per prompt (ranking)")
    p.add_argument("--len", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--remat", default="none")
    p.add_argument("--mesh", default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    rows = [bench_one(c, m, args) for c in args.configs.split(",") for m in args.modes.split(",")]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'config':8} {'mode':8} {'params':>8} {'B x N x L':>14} {'compile s':>10} {'step s':>8} {'tokens/s':>10}"
          + ("  MFU" if any("mfu" in r for r in rows) else ""))
    for r in rows:
        shape = f"{r['batch']}x{r['n']}x{r['len']}"
        print(f"{r['config']:8} {r['mode']:8} {r['params_M']:>7}M {shape:>14} {r['compile_s']:>10} {r['step_s']:>8} "
              f"{r['tokens_per_s']:>10}" + (f"  {r['mfu']:.1%}" if "mfu" in r else ""))
    print(f"device: {rows[0]['device']} x {rows[0]['devices']}")


if __name__ == "__main__":
    main()

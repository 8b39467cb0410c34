"""Decode throughput of the tuna-jax sampler against Hugging Face transformers `generate`.

    python bench/generate.py            # CPU: a ~20M-parameter random LLaMA, batch 8, 128 new tokens
    python bench/generate.py --gpu      # a ~1.1B LLaMA (TinyLlama shape), batch 64, bf16, on the GPU

Both sides run the SAME weights (a random HF model saved as safetensors and loaded with
`load_model`) on the same prompts, greedy, with no stop token (every row makes exactly
--new-tokens tokens), so the work is identical. Reported per side:

  * compile (ours only): the first call minus a warm call of the same shape;
  * end-to-end tokens/s: batch x new tokens / wall time of a warm generate call (median of --repeats);
  * decode tokens/s: batch x (new tokens - 1) / (t(new tokens) - t(1 new token)), i.e. with the
    prefill and the first token taken out;
  * the ratio ours / HF (of medians, and of the best runs: on a shared machine the best run is the
    least disturbed), and how many rows produced identical greedy tokens (a sanity check:
    float differences may flip a near-tie on a random model, and every later token then differs).

The GPU path needs a CUDA jax; HF is timed there only when torch sees a GPU too (never required).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a clone without installing, like the other benches
    sys.path.insert(0, str(ROOT))

CPU_CONFIG = dict(vocab_size=32000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024)
# TinyLlama-1.1B's shape.
GPU_CONFIG = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                  num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="the ~1B config at batch 64 on the GPU")
    ap.add_argument("--batch", type=int, default=None, help="default 8 (CPU) / 64 (GPU)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="default float32 (CPU) / bfloat16 (GPU)")
    ap.add_argument("--no-hf", action="store_true", help="time only the tuna-jax sampler")
    args = ap.parse_args(argv)

    if not args.gpu:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import torch
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    from tuna_jax.generate import Sampler, SamplingParams
    from tuna_jax.model import load_model

    if args.gpu and jax.default_backend() != "gpu":
        print("--gpu: jax sees no GPU (backend %r); nothing to do" % jax.default_backend())
        return 0
    batch = args.batch or (64 if args.gpu else 8)
    dtype = args.dtype or ("bfloat16" if args.gpu else "float32")
    shape = GPU_CONFIG if args.gpu else CPU_CONFIG
    t_new, p_len = args.new_tokens, args.prompt_len
    torch_device = "cuda" if args.gpu and torch.cuda.is_available() else "cpu"
    run_hf = not args.no_hf and (not args.gpu or torch_device == "cuda")
    torch.set_num_threads(os.cpu_count() or 1)

    cfg = HFConfig(**shape, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device("cpu"):
        hf = LlamaForCausalLM(cfg).eval()
    n_params = sum(p.numel() for p in hf.parameters())
    tmp = tempfile.TemporaryDirectory()
    hf.save_pretrained(tmp.name, safe_serialization=True)
    model = load_model(tmp.name, dtype=dtype)

    rng = np.random.RandomState(0)
    prompts = rng.randint(3, shape["vocab_size"], (batch, p_len)).tolist()
    print(f"devices: jax {jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()}), "
          f"torch {torch_device} ({torch.get_num_threads()} threads)")
    print(f"model: {n_params / 1e6:.1f}M parameters (hidden {shape['hidden_size']}, "
          f"{shape['num_hidden_layers']} layers, "
          f"vocab {shape['vocab_size']}), {dtype}; batch {batch}, prompt {p_len}, {t_new} new tokens, greedy, no stop")

    # ---- ours ------------------------------------------------------------------------------------
    sampler = Sampler(model, batch_size=batch, stop_ids=())
    full, one = SamplingParams.greedy(t_new), SamplingParams.greedy(1)
    t0 = time.perf_counter()
    ours_out = sampler.generate(prompts, full)
    first_call = time.perf_counter() - t0
    t0 = time.perf_counter()
    sampler.generate(prompts, one)
    first_call_one = time.perf_counter() - t0
    ours_full, ours_times = timed(lambda: sampler.generate(prompts, full), args.repeats)
    ours_one, _ = timed(lambda: sampler.generate(prompts, one), args.repeats)
    assert all(len(s.token_ids) == t_new for (s,) in ours_out)
    ours_e2e = batch * t_new / ours_full
    ours_decode = batch * (t_new - 1) / max(ours_full - ours_one, 1e-9)
    print("\ntuna-jax sampler")
    print(f"  compile (first call - warm call): {first_call - ours_full:.2f} s for {t_new} tokens, "
          f"{first_call_one - ours_one:.2f} s for 1 token")
    runs = ", ".join(f"{t:.3f}" for t in ours_times)
    print(f"  warm call: {ours_full:.3f} s (runs: {runs}); prefill+1 token {ours_one:.3f} s")
    print(f"  end-to-end {ours_e2e:,.0f} tokens/s   decode {ours_decode:,.0f} tokens/s")

    if not run_hf:
        print("\nHF transformers: not timed" + (" (torch sees no GPU)" if args.gpu else ""))
        return 0

    # ---- HF transformers -----------------------------------------------------------------------
    hf = hf.to(device=torch_device, dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    ids = torch.tensor(prompts, device=torch_device)
    mask = torch.ones_like(ids)

    def hf_gen(n):
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                              pad_token_id=0, eos_token_id=None)
        if torch_device == "cuda":
            torch.cuda.synchronize()
        return out

    hf_out = hf_gen(t_new)  # warm-up
    hf_full, hf_times = timed(lambda: hf_gen(t_new), args.repeats)
    hf_one, _ = timed(lambda: hf_gen(1), args.repeats)
    hf_e2e = batch * t_new / hf_full
    hf_decode = batch * (t_new - 1) / max(hf_full - hf_one, 1e-9)
    print("\nHF transformers generate")
    runs = ", ".join(f"{t:.3f}" for t in hf_times)
    print(f"  warm call: {hf_full:.3f} s (runs: {runs}); prefill+1 token {hf_one:.3f} s")
    print(f"  end-to-end {hf_e2e:,.0f} tokens/s   decode {hf_decode:,.0f} tokens/s")

    same = sum(s.token_ids == hf_out[r, p_len:].tolist() for r, (s,) in enumerate(ours_out))
    print(f"\nratio tuna-jax / HF: end-to-end {ours_e2e / hf_e2e:.2f}x, decode {ours_decode / hf_decode:.2f}x "
          f"(medians; best runs: {min(hf_times) / min(ours_times):.2f}x end-to-end)")
    print(f"identical greedy rows: {same}/{batch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

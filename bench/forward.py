"""Forward + candidate log-likelihood throughput against HF PyTorch, and log-likelihood memory.

Two figures, on whatever CPU this runs on (``JAX_PLATFORMS`` is left alone, but the torch
side is CPU only):

1. speed: tokens/s of our jitted ``sequence_logprobs`` (forward + chunked float32 log p, summed
   per candidate) on a [B, N, L] batch, against transformers' ``LlamaForCausalLM`` forward +
   ``log_softmax`` + gather, same config and the very same weights (a random HF model is
   saved with ``save_pretrained`` and loaded back with ``load_hf_model``). Compile time is
   reported apart; timings are the median of ``--repeats`` runs after warm-up. A sanity line
   checks the two log-likelihoods agree.
2. memory: chunked vs naive token log-likelihoods at a large vocabulary, each measured in a
   fresh subprocess so peaks do not mix: XLA's compiled memory analysis and the process peak
   RSS (``getrusage`` ``ru_maxrss``), with the theoretical [M, L, V] float32 logits size.

    python bench/forward.py            # table
    python bench/forward.py --json     # table on stderr, one JSON object on stdout
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MB = 2 ** 20
RATIO_KEYS = ("xla_temp_bytes", "xla_total_bytes", "rss_peak_run_bytes", "rss_run_delta_bytes", "rss_peak_bytes")


# ---- process memory helpers ---------------------------------------------------------------

def _peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux ru_maxrss is in KiB)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def _current_rss_bytes() -> int | None:
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the peak-RSS high-water mark (Linux >= 4.0), so a later ru_maxrss reads the peak
    of what ran after this call only (not the compile before it)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---- memory worker (runs in a fresh subprocess) -------------------------------------------

def mem_worker(kind: str, m: int, l: int, d: int, v: int, chunk: int, grad: bool) -> dict:
    import jax
    import jax.numpy as jnp

    from tuna_jax.logprobs import chunked_token_logprobs, naive_token_logprobs

    if kind == "naive":
        fn = naive_token_logprobs
    else:
        fn = lambda h, w, t: chunked_token_logprobs(h, w, t, chunk or 2048)  # noqa: E731
    if grad:  # the training case: gradients w.r.t. hidden states and head
        f = jax.grad(lambda h, w, t: fn(h, w, t).sum(), argnums=(0, 1))
    else:
        f = fn

    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(k1, (m, l, d), jnp.float32)
    w = 0.02 * jax.random.normal(k2, (d, v), jnp.float32)
    t = jax.random.randint(k3, (m, l), 0, v)
    jax.block_until_ready((h, w, t))
    rss_inputs = _current_rss_bytes()

    t0 = time.perf_counter()
    compiled = jax.jit(f).lower(h, w, t).compile()
    compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    peak_before_run = _peak_rss_bytes()

    reset = _reset_peak_rss()
    rss_before_run = _current_rss_bytes()
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(h, w, t))
    run_s = time.perf_counter() - t0
    peak_run = _peak_rss_bytes()

    out = {
        "kind": kind, "grad": grad, "M": m, "L": l, "D": d, "V": v, "chunk": chunk if kind == "chunked" else None,
        "xla_temp_bytes": int(ma.temp_size_in_bytes),
        "xla_argument_bytes": int(ma.argument_size_in_bytes),
        "xla_output_bytes": int(ma.output_size_in_bytes),
        # argument + output + temp - alias: what the executable needs at once (peak_memory_in_bytes
        # is not filled in by every backend, e.g. CPU, so it is not used)
        "xla_total_bytes": int(ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
                               - ma.alias_size_in_bytes),
        "rss_inputs_bytes": rss_inputs,
        "rss_peak_bytes": max(peak_before_run, peak_run),  # whole process: imports, inputs, compile, run
        "compile_s": compile_s, "run_s": run_s,
    }
    if reset and rss_before_run is not None:
        out["rss_peak_run_bytes"] = peak_run  # peak while running only (high-water reset after compile)
        out["rss_run_delta_bytes"] = peak_run - rss_before_run
    return out


def run_mem_subprocess(kind: str, args) -> dict:
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--_mem-worker", kind,
           "--mem-m", str(args.mem_m), "--mem-len", str(args.mem_len), "--mem-dim", str(args.mem_dim),
           "--mem-vocab", str(args.mem_vocab), "--chunk", str(args.chunk)] + (["--mem-grad"] if args.mem_grad else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker {kind!r} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_memory(args) -> dict:
    # Run the workers while this (parent) process is still small: on Linux a child's ru_maxrss can
    # inherit the parent's high-water mark through fork/exec, so do this before importing jax/torch.
    naive = run_mem_subprocess("naive", args)
    chunked = run_mem_subprocess("chunked", args)
    logits_bytes = args.mem_m * args.mem_len * args.mem_vocab * 4
    chunk_logits_bytes = min(args.chunk or 2048, args.mem_m * args.mem_len) * args.mem_vocab * 4

    def ratio(key):
        a, b = naive.get(key), chunked.get(key)
        return a / b if a and b else None

    return {"naive": naive, "chunked": chunked,
            "logits_MLV_f32_bytes": logits_bytes, "chunk_logits_f32_bytes": chunk_logits_bytes,
            "ratio_naive_over_chunked": {k: ratio(k) for k in RATIO_KEYS}}


# ---- speed: ours vs HF PyTorch ------------------------------------------------------------

def bench_speed(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM

    from tuna_jax.logprobs import sequence_logprobs
    from tuna_jax.model.convert import load_hf_model

    load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    inter = args.intermediate or (((8 * args.hidden // 3) + 63) // 64 * 64)
    hf_cfg = HFLlamaConfig(hidden_size=args.hidden, intermediate_size=inter, num_hidden_layers=args.layers,
                           num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                           vocab_size=args.vocab, max_position_embeddings=max(2048, args.seq),
                           rms_norm_eps=1e-5, tie_word_embeddings=args.tie)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # HF inits norms to 1; randomise them as the parity tests do
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    hf = hf.to(tdtype)
    n_params = sum(p.numel() for p in hf.parameters())

    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp, safe_serialization=True)
        ours = load_hf_model(tmp, dtype=args.dtype, param_dtype=args.dtype)
    graphdef, state = nnx.split(ours)

    b, n, l = args.batch, args.n, args.seq
    rng = np.random.RandomState(0)
    ids = rng.randint(0, args.vocab, (b, n, l)).astype(np.int32)
    mask = np.ones((b, n, l), np.float32)
    mask[..., : l // 4] = 0.0  # a prompt prefix that is not scored; the candidate is the rest
    tokens = b * n * l

    # ours: forward + chunked float32 log p, summed per candidate
    def step(state, ids, mask):
        return sequence_logprobs(nnx.merge(graphdef, state), ids, mask, chunk=args.chunk)

    ids_j, mask_j = jnp.asarray(ids), jnp.asarray(mask)
    t0 = time.perf_counter()
    compiled = jax.jit(step).lower(state, ids_j, mask_j).compile()
    compile_s = time.perf_counter() - t0

    def run_ours():
        return jax.block_until_ready(compiled(state, ids_j, mask_j))

    # HF: forward (full [M, L, V] logits) + log_softmax + gather, summed per candidate
    ids_t = torch.from_numpy(ids.reshape(-1, l).astype(np.int64))
    mask_t = torch.from_numpy(mask.reshape(-1, l))[:, 1:]

    def run_hf():
        with torch.no_grad():
            logits = hf(input_ids=ids_t).logits[:, :-1].float()
            lp = torch.log_softmax(logits, dim=-1).gather(-1, ids_t[:, 1:, None])[..., 0]
            return (lp * mask_t).sum(-1), mask_t.sum(-1)

    # Warm up both, then alternate them each repetition, so that load from other processes on a
    # shared machine falls on both sides alike; the ratio is also given per repetition.
    for _ in range(args.warmup):
        run_ours(), run_hf()
    ours_times, hf_times = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        ours_sum, ours_cnt = run_ours()
        ours_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        hf_sum, hf_cnt = run_hf()
        hf_times.append(time.perf_counter() - t0)
    ours_sum, ours_cnt = np.asarray(ours_sum).reshape(-1), np.asarray(ours_cnt).reshape(-1)
    hf_sum, hf_cnt = hf_sum.numpy().astype(np.float64), hf_cnt.numpy()
    diff_sum = float(np.abs(ours_sum - hf_sum).max())
    diff_tok = float(np.abs(ours_sum / ours_cnt - hf_sum / hf_cnt).max())
    tol = 1e-3 if args.dtype == "float32" else 5e-2
    ours_med, hf_med = statistics.median(ours_times), statistics.median(hf_times)
    return {
        "config": {"hidden": args.hidden, "intermediate": inter, "layers": args.layers, "heads": args.heads,
                   "kv_heads": args.kv_heads, "vocab": args.vocab, "tie": args.tie, "dtype": args.dtype,
                   "batch": b, "n": n, "seq": l, "chunk": args.chunk, "params": n_params,
                   "hf_attn_implementation": getattr(hf.config, "_attn_implementation", None)},
        "tokens_per_call": tokens,
        "ours_compile_s": compile_s,
        "ours_median_s": ours_med, "hf_median_s": hf_med,
        "ours_times_s": ours_times, "hf_times_s": hf_times,
        "ours_tokens_per_s": tokens / ours_med, "hf_tokens_per_s": tokens / hf_med,
        "speedup_ours_over_hf": hf_med / ours_med,
        "speedup_per_repeat_median": statistics.median(h / o for h, o in zip(hf_times, ours_times)),
        "sanity": {"max_abs_diff_logprob_sum": diff_sum, "max_abs_diff_mean_token_logprob": diff_tok,
                   "mean_abs_logprob_sum": float(np.abs(hf_sum).mean()), "tolerance": tol,
                   "num_tokens_equal": bool(np.array_equal(ours_cnt, hf_cnt)),
                   "ok": bool(diff_sum <= tol * max(1.0, float(np.abs(hf_sum).max())) and diff_tok <= tol
                              and np.array_equal(ours_cnt, hf_cnt))},
        "load_average_at_start": load_at_start,
        "versions": {"jax": jax.__version__, "torch": torch.__version__,
                     "jax_backend": jax.default_backend(), "cpu_count": os.cpu_count(),
                     "torch_threads": torch.get_num_threads()},
    }


# ---- report -------------------------------------------------------------------------------

def _mb(x):
    return "-" if x is None else f"{x / MB:,.1f}"


def _x(x):
    return "-" if x is None else f"{x:.2f}x"


def format_report(res: dict) -> str:
    lines = []
    sp = res.get("speed")
    if sp:
        c = sp["config"]
        lines += [
            f"== speed: forward + candidate log-likelihood, {c['dtype']}, CPU "
            f"({sp['versions']['cpu_count']} cores, torch threads {sp['versions']['torch_threads']}, "
            f"1-min load average at start {sp['load_average_at_start'] or 0:.1f}) ==",
            f"config: hidden {c['hidden']}, mlp {c['intermediate']}, layers {c['layers']}, heads {c['heads']}/"
            f"{c['kv_heads']} kv, vocab {c['vocab']}, tied {c['tie']}, {c['params'] / 1e6:.1f}M params; "
            f"batch [B={c['batch']}, N={c['n']}, L={c['seq']}] = {sp['tokens_per_call']} tokens/call; "
            f"chunk {c['chunk']}; HF attention {c['hf_attn_implementation']}",
            f"{'':28}{'median s':>10}{'tokens/s':>12}",
            f"{'tuna-jax (jit, chunked)':28}{sp['ours_median_s']:>10.3f}{sp['ours_tokens_per_s']:>12,.0f}",
            f"{'HF PyTorch (full logits)':28}{sp['hf_median_s']:>10.3f}{sp['hf_tokens_per_s']:>12,.0f}",
            f"ratio tuna-jax / HF tokens/s: {sp['speedup_ours_over_hf']:.2f}x "
            f"(median of per-repetition ratios {sp['speedup_per_repeat_median']:.2f}x)   "
            f"(tuna-jax compile: {sp['ours_compile_s']:.1f} s, not in the timings)",
            f"sanity: max |d logprob_sum| {sp['sanity']['max_abs_diff_logprob_sum']:.2e} "
            f"(|sum| ~ {sp['sanity']['mean_abs_logprob_sum']:.0f}), max |d mean token logprob| "
            f"{sp['sanity']['max_abs_diff_mean_token_logprob']:.2e}, tol {sp['sanity']['tolerance']:g}: "
            f"{'OK' if sp['sanity']['ok'] else 'MISMATCH'}",
        ]
    mem = res.get("memory")
    if mem:
        n, ch = mem["naive"], mem["chunked"]
        what = "value + grad" if n["grad"] else "forward"
        lines += [
            "",
            f"== memory: token log-likelihoods ({what}), M={n['M']} x L={n['L']} x D={n['D']} x V={n['V']}, "
            f"chunk {ch['chunk']}, each in a fresh process ==",
            f"theoretical [M, L, V] float32 logits: {_mb(mem['logits_MLV_f32_bytes'])} MiB; "
            f"one [M, chunk, V] chunk: {_mb(mem['chunk_logits_f32_bytes'])} MiB",
            f"{'MiB':28}{'naive':>12}{'chunked':>12}{'ratio':>9}",
        ]
        r = mem["ratio_naive_over_chunked"]
        rows = [("XLA temp", "xla_temp_bytes"), ("XLA arguments", "xla_argument_bytes"),
                ("XLA outputs", "xla_output_bytes"), ("XLA arg + out + temp", "xla_total_bytes"),
                ("RSS peak, run only", "rss_peak_run_bytes"), ("RSS run - RSS before run", "rss_run_delta_bytes"),
                ("RSS peak, whole process", "rss_peak_bytes")]
        for label, key in rows:
            lines.append(f"{label:28}{_mb(n.get(key)):>12}{_mb(ch.get(key)):>12}{_x(r.get(key)):>9}")
        lines.append(f"compile s / run s: naive {n['compile_s']:.1f} / {n['run_s']:.2f}, "
                     f"chunked {ch['compile_s']:.1f} / {ch['run_s']:.2f}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("speed (ours vs HF PyTorch)")
    g.add_argument("--hidden", type=int, default=256, help="D, model width")
    g.add_argument("--intermediate", type=int, default=None, help="MLP width (default: 8/3 hidden, rounded to 64)")
    g.add_argument("--layers", type=int, default=4, help="decoder layers")
    g.add_argument("--heads", type=int, default=8, help="query heads")
    g.add_argument("--kv-heads", type=int, default=4, help="key/value heads (GQA)")
    g.add_argument("--vocab", type=int, default=32000, help="V, vocabulary")
    g.add_argument("--tie", action="store_true", help="tied input/output embeddings")
    g.add_argument("--seq", type=int, default=256, help="L, tokens per candidate sequence")
    g.add_argument("--batch", type=int, default=4, help="B, examples")
    g.add_argument("--n", type=int, default=4, help="N, candidates per example")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="weights and compute dtype of both sides (log p is float32 either way)")
    g.add_argument("--warmup", type=int, default=1, help="untimed calls of each side first")
    g.add_argument("--repeats", type=int, default=5, help="timed calls of each side, alternated; median")
    g.add_argument("--chunk", type=int, default=0, help="tokens per vocabulary-projection chunk (speed: 0 = "
                   "sized by the memory budget, as training; memory: 0 = 2048)")
    g = p.add_argument_group("memory (chunked vs naive log-likelihood)")
    g.add_argument("--mem-m", type=int, default=16, help="M, sequences")
    g.add_argument("--mem-len", type=int, default=512, help="L")
    g.add_argument("--mem-dim", type=int, default=256, help="D")
    g.add_argument("--mem-vocab", type=int, default=32000, help="V")
    g.add_argument("--mem-grad", action="store_true", help="measure value + gradient instead of forward only")
    p.add_argument("--skip-speed", action="store_true", help="memory figures only")
    p.add_argument("--skip-memory", action="store_true", help="speed figures only")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (the table goes to stderr)")
    p.add_argument("--_mem-worker", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._mem_worker:
        print(json.dumps(mem_worker(args._mem_worker, args.mem_m, args.mem_len, args.mem_dim, args.mem_vocab,
                                    args.chunk, args.mem_grad)))
        return 0

    res: dict = {}
    t0 = time.perf_counter()
    if not args.skip_memory:
        res["memory"] = bench_memory(args)  # first, while this process is small (see bench_memory)
    if not args.skip_speed:
        res["speed"] = bench_speed(args)
    res["wall_s"] = time.perf_counter() - t0
    report = format_report(res) + f"\n\ntotal wall time {res['wall_s']:.0f} s"
    if args.json:
        print(report, file=sys.stderr)
        print(json.dumps(res, indent=1))
    else:
        print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

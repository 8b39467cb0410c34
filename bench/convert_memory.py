"""Peak host memory of ``tuna-jax convert hf-to-orbax`` on a LLaMA-2-7B-shaped checkpoint.

Writes a synthetic HF folder with the real shapes (vocab 32000, hidden 4096, MLP 11008, 32 layers,
32 heads, 32 kv heads, untied head; bfloat16; 13.5 GB), sharded the way ``save_pretrained`` does with
its default ``max_shard_size="5GB"`` (5e9 bytes: three files), with ``model.safetensors.index.json``
and ``config.json``. Tensors are written piece by piece from a 128 MB pool of random bf16 values, so
writing the folder needs no more memory than that. The conversion runs in a subprocess; its peak RSS
is the kernel's high-water mark (``os.wait4``'s ``ru_maxrss``, the same as ``VmHWM``), cross-checked by
sampling ``/proc/PID/status`` every 50 ms. Printed per path: peak RSS, the largest shard, their ratio,
wall time, the checkpoint's size on disk.

Paths: ``streamed`` (what ``convert hf-to-orbax`` runs: ``model.checkpoint.convert_hf_to_params``)
and ``in-memory`` (``load_hf_model`` + ``save_params``: the command before streaming, and still the
pipeline's convert stage). The in-memory path holds the whole model: at 7B in float32 (27 GB) it
cannot run on a 24 GiB host, so it is skipped when it would not fit in the memory available.

    python bench/convert_memory.py                                   # 7B, streamed (~20 min, 2 busy cores)
    python bench/convert_memory.py --layers 4 --path both            # quick: 4 layers, both paths
    python bench/convert_memory.py --shard-gb 10                     # the Llama-2 repo's two files
    python bench/convert_memory.py --json                            # also one JSON object on stdout

The folder and the checkpoints are deleted afterwards (``--keep`` keeps them).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time

import ml_dtypes
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
LLAMA2_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
             "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
             "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 1,
             "eos_token_id": 2, "torch_dtype": "bfloat16"}
POOL = 64 * 2**20  # bf16 values: 128 MB
PIECE = 16 * 2**20  # values written per call


def hf_tensors(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) in the order ``save_pretrained`` writes a LlamaForCausalLM."""
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    dh = d // cfg["num_attention_heads"]
    kd = cfg["num_key_value_heads"] * dh
    out = [("model.embed_tokens.weight", (v, d))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (d, d)), (p + "self_attn.k_proj.weight", (kd, d)),
                (p + "self_attn.v_proj.weight", (kd, d)), (p + "self_attn.o_proj.weight", (d, d)),
                (p + "mlp.gate_proj.weight", (f, d)), (p + "mlp.up_proj.weight", (f, d)),
                (p + "mlp.down_proj.weight", (d, f)), (p + "input_layernorm.weight", (d,)),
                (p + "post_attention_layernorm.weight", (d,))]
    out += [("model.norm.weight", (d,))]
    if not cfg["tie_word_embeddings"]:
        out += [("lm_head.weight", (v, d))]
    return out


def write_safetensors(path: pathlib.Path, tensors: list[tuple[str, tuple[int, ...]]], pool: np.ndarray,
                      rng: np.random.Generator) -> int:
    """One bf16 safetensors file, written piece by piece (the format: 8-byte little-endian header
    length, the JSON header padded to 8 bytes, the tensors' bytes in order). Returns its size."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for _, shape in tensors:
            left = int(np.prod(shape))
            while left:
                k = min(left, PIECE)
                start = int(rng.integers(0, POOL - k + 1))
                f.write(pool[start:start + k].tobytes())
                left -= k
    return path.stat().st_size


def write_hf_folder(out: pathlib.Path, cfg: dict, shard_bytes: int, seed: int = 0) -> list[int]:
    """A sharded HF folder as ``save_pretrained(max_shard_size=shard_bytes)`` lays it out (a new file
    when the next tensor would overflow this one). Returns the shard sizes in bytes."""
    out.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    pool = (rng.standard_normal(POOL, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    shards: list[list] = [[]]
    size = 0
    for name, shape in hf_tensors(cfg):
        n = int(np.prod(shape)) * 2
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    sizes = [write_safetensors(out / fname, tensors, pool, rng) for fname, tensors in zip(names, shards)]
    weight_map = {name: fname for fname, tensors in zip(names, shards) for name, _ in tensors}
    total = sum(int(np.prod(s)) * 2 for _, s in hf_tensors(cfg))
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return sizes


CODE = {
    "streamed": "import sys; from tuna_jax.cli import main; "
                "sys.exit(main(['convert', 'hf-to-orbax', {hf!r}, {out!r}, '--param-dtype', {pd!r}]))",
    "in-memory": "from tuna_jax.model.checkpoint import save_params; from tuna_jax.model.convert import load_hf_model; "
                 "save_params({out!r}, load_hf_model({hf!r}, param_dtype={pd!r}), tokenizer_src={hf!r})",
}


def run_peak(code: str) -> dict:
    """Run ``code`` in a fresh Python; its peak RSS (bytes) two ways, and wall time."""
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    sampled = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            sampled[0] = max(sampled[0], int(line.split()[1]) * 1024)
            except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
                pass
            done.wait(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    output = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    th.join()
    return {"rc": proc.returncode, "peak_rss": usage.ru_maxrss * 1024, "sampled_peak_rss": sampled[0],
            "wall_s": time.perf_counter() - t0, "output_tail": output[-2000:]}


def du(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (default 32, LLaMA-2-7B)")
    ap.add_argument("--shard-gb", type=float, default=5.0,
                    help="max_shard_size in GB of 1e9 bytes (default 5: save_pretrained's default; 10 gives "
                         "the Llama-2-7b-hf repo's two files)")
    ap.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="what the checkpoint stores (default float32, the command's default)")
    ap.add_argument("--path", default="streamed", choices=["streamed", "in-memory", "both"])
    ap.add_argument("--dir", default=None, help="work folder (default: a new one under the system temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the HF folder and the checkpoints")
    ap.add_argument("--json", action="store_true", help="also print one JSON object of every figure")
    a = ap.parse_args(argv)

    cfg = dict(LLAMA2_7B, num_hidden_layers=a.layers)
    work = pathlib.Path(a.dir or tempfile.mkdtemp(prefix="convert_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    hf = work / "hf"
    if hf.exists():
        shutil.rmtree(hf)
    result = {"layers": a.layers, "shard_gb": a.shard_gb, "param_dtype": a.param_dtype, "runs": {}}
    try:
        t0 = time.perf_counter()
        sizes = write_hf_folder(hf, cfg, int(a.shard_gb * 1e9))
        result.update(shards=sizes, largest_shard=max(sizes), hf_bytes=sum(sizes),
                      write_s=time.perf_counter() - t0)
        gb = 1e9
        print(f"HF folder: {a.layers} layers, {len(sizes)} shard(s) of {', '.join(f'{s / gb:.2f}' for s in sizes)} GB "
              f"({sum(sizes) / gb:.2f} GB bf16), written in {result['write_s']:.0f} s", flush=True)
        model_bytes = sum(int(np.prod(s)) for _, s in hf_tensors(cfg)) * (4 if a.param_dtype == "float32" else 2)
        for path in (["streamed", "in-memory"] if a.path == "both" else [a.path]):
            out = work / f"ckpt-{path}"
            if out.exists():
                shutil.rmtree(out)
            if path == "in-memory" and model_bytes > 0.8 * mem_available():
                print(f"{path:>9}: skipped: holds the whole model ({model_bytes / gb:.1f} GB in {a.param_dtype}), "
                      f"more than 80% of the {mem_available() / gb:.1f} GB available", flush=True)
                result["runs"][path] = {"skipped": True, "model_bytes": model_bytes}
                continue
            r = run_peak(CODE[path].format(hf=str(hf), out=str(out), pd=a.param_dtype))
            if r["rc"] != 0:
                print(f"{path}: failed (exit {r['rc']}):\n{r['output_tail']}", file=sys.stderr)
                return 1
            r["ckpt_bytes"] = du(out / "params")
            r["ratio"] = r["peak_rss"] / max(sizes)
            del r["output_tail"]
            result["runs"][path] = r
            print(f"{path:>9}: peak RSS {r['peak_rss'] / gb:.2f} GB (sampled {r['sampled_peak_rss'] / gb:.2f}), "
                  f"largest shard {max(sizes) / gb:.2f} GB, ratio {r['ratio']:.2f} (target < 1.5); "
                  f"{r['wall_s']:.0f} s; checkpoint {r['ckpt_bytes'] / gb:.2f} GB ({a.param_dtype})", flush=True)
            if not a.keep:
                shutil.rmtree(out)
    finally:
        if not a.keep:
            shutil.rmtree(hf, ignore_errors=True)
            if not a.dir:
                shutil.rmtree(work, ignore_errors=True)
    if a.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`tuna-jax teacher` against llama.cpp's OpenAI-compatible server (llama-cpp-python), on stories260K as GGUF.

    pip install "llama-cpp-python[server]"     # a source build: about 14 minutes on 2 cores
    python bench/llama_cpp_teacher.py --convert llama.cpp/convert_hf_to_gguf.py

(`--convert`: llama.cpp's converter, with its conversion/ and gguf-py/ beside it; llama-cpp-python's sdist has
them in vendor/llama.cpp/.) Not
in the test suite: the build is too slow for CI. What it checks, and prints:

  1. the plain `teacher --n 4` against a server that ignores `n` stops after three items (exit 2) with the fix
     (`--n-per-request 1`) in one line, instead of paying for every item;
  2. `teacher --n 4 --n-per-request 1` ranks every item, and the server's token log-probs of each sample equal
     our teacher-forced log-likelihood of the same text under the same weights (`LocalTeacher.score`, the EOS left
     out: llama.cpp does not report it), over the samples whose text our tokenizer segments into as many tokens
     as the server sampled. Printed: how many compared, and the largest differences in nats (per sample, per
     token); it passes under 1e-2 per token (llama.cpp's float32 CPU kernels round differently from XLA's).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

INSTRUCTIONS = ["Tell me a story about a cat.", "What did Lily find in the park?", "Write about a big red ball.",
                "Why was Tom sad?", "Describe a sunny day.", "Tell me about a friendly dog.",
                "What does a bird like to eat?", "Write a story about a boat."]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the llama.cpp server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    sys.exit("the llama.cpp server did not answer in time")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--convert", required=True, help="llama.cpp's convert_hf_to_gguf.py")
    ap.add_argument("--samples", type=int, default=4, help="responses per instruction (the paper's N)")
    args = ap.parse_args()
    from tuna_jax.assets import stories260k_hf_dir

    hf = stories260k_hf_dir()
    work = pathlib.Path(tempfile.mkdtemp(prefix="llama-cpp-teacher-"))
    gguf = work / "stories260K-f32.gguf"
    gguf_py = pathlib.Path(args.convert).resolve().parent / "gguf-py"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(gguf_py), os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, args.convert, str(hf), "--outfile", str(gguf), "--outtype", "f32"], env=env,
                   check=True, stdout=subprocess.DEVNULL)
    data = work / "alpaca.jsonl"
    data.write_text("".join(json.dumps({"instruction": i, "input": "", "output": "x"}) + "\n" for i in INSTRUCTIONS))

    port = _port()
    base = f"http://127.0.0.1:{port}/v1"
    log = open(work / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                               "--port", str(port), "--n_ctx", "512", "--logits_all", "true",
                               # a float32 KV cache (GGML_TYPE_F32 = 0): the default f16 cache costs ~1e-2 nats a token
                               "--type_k", "0", "--type_v", "0"], stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        _wait(f"{base}/models", server)
        teacher = ["tuna-jax", "teacher", str(data), "--base-url", base, "--model", "stories260K", "--max-tokens",
                   "48", "--n", str(args.samples), "--no-progress", "--max-retries", "1"]
        # 1. n ignored: stopped after three items with the fix
        plain = subprocess.run([*teacher, str(work / "plain.jsonl")], capture_output=True, text=True)
        stopped = plain.returncode == 2 and "--n-per-request 1" in plain.stderr
        print(f"1. plain --n {args.samples}: exit {plain.returncode}; "
              f"{'stopped with the fix in one line' if stopped else 'NOT stopped as expected'}")
        print("   " + "\n   ".join(line for line in plain.stderr.splitlines() if line.startswith("teacher:")))
        # 2. one response per request: every item ranked; log-probs against ours
        out = work / "ranked.jsonl"
        fixed = subprocess.run([*teacher, str(out), "--n-per-request", "1"], capture_output=True, text=True)
        records = [json.loads(x) for x in out.read_text().splitlines() if x.strip()]
        print(f"2. --n-per-request 1: exit {fixed.returncode}, {len(records)}/{len(INSTRUCTIONS)} items ranked")
        store = [json.loads(x) for x in open(str(out) + ".store.jsonl") if x.strip()]
        replies = [c for s in store if s["status"] == "ok" for c in s["response"]["choices"]]
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()

    from tuna_jax.data.templates import format_prompt
    from tuna_jax.feedback.local import LocalTeacher

    scorer = LocalTeacher(str(hf), temperature=1.0, max_new_tokens=48)
    by_text = {}
    for rec in records:
        for text in rec["candidates"]:
            by_text[text] = format_prompt(rec["instruction"], "")
    diffs, per_token, skipped = [], [], 0
    for ch in replies:
        text, server_lps = ch["text"], ch["logprobs"]["token_logprobs"]
        if text.strip() not in by_text:
            continue
        # the text as sampled (its leading space included: the teacher strips it only in the record)
        ours = scorer.score(by_text[text.strip()], [text])[0].token_logprobs[:-1]  # the EOS left out
        if len(ours) != len(server_lps):
            skipped += 1  # the sampled tokens are not our segmentation of the text: not comparable
            continue
        diffs.append(abs(sum(ours) - sum(server_lps)))
        per_token += [abs(a - b) for a, b in zip(ours, server_lps)]
    print(f"   log p(response), the server's against ours: {len(diffs)} samples compared ({skipped} whose tokens "
          f"differ from our segmentation skipped); per sample: largest difference {max(diffs, default=0):.2e} "
          f"nats, mean {sum(diffs) / max(1, len(diffs)):.2e}; per token: largest {max(per_token, default=0):.2e}")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if stopped and len(records) == len(INSTRUCTIONS) and diffs and max(per_token) < 1e-2 else 1


if __name__ == "__main__":
    sys.exit(main())

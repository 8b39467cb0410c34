"""The Tuna ranking train step: ours in each candidate layout against a PyTorch reference-style step.

    python bench/rank_step.py                   # CPU, the 19M setting below (about 10 minutes)
    python bench/rank_step.py --gpu             # accelerator: TinyLlama-shaped 1.1B, bf16, max_len 1024
    python bench/rank_step.py --json OUT.json   # also write every figure as JSON
    python bench/rank_step.py --gpu --batch 48 --packing   # rows a packed run computes, by shape_buckets
    python bench/rank_step.py --lora 8 --layouts prefix_shared --torch no   # LoRA against full fine-tuning

Same data, model, loss and optimizer for every variant, in one process:

* data: Alpaca-GPT4 instructions from ``../shared/data/alpaca`` tokenised with the 32k LLaMA
  tokenizer from ``../shared/models`` when both are there; otherwise synthetic ids whose prompt
  and response lengths follow the same distribution (quantiles stored below). Each prompt gets
  N = 4 candidates (the responses of the next N records, cut to ``--max-resp`` tokens with the
  EOS kept) with random quality scores, plus its own response as the MLE target.
* loss: the paper's ranking loss (margin 0.1) + 1.0 x MLE on the original response; AdamW
  (0.9, 0.999) with global-norm clipping at 1.0; float32 on CPU, bfloat16 compute on GPU.
* variants: ``ours:<layout>`` is ``tuna_jax.train``'s jitted step on that layout's batches;
  ``torch`` is a PyTorch + transformers ``LlamaForCausalLM`` step written the way the reference
  code runs it: every candidate and the MLE target a row, padded to the batch's longest, full
  [rows, L, V] logits, log_softmax + gather, the same loss and optimizer, with the same weights.

Throughput counts real tokens: a candidate's prompt + response counted once per candidate (and
once for the MLE target), never padding, identical for every variant. The variants run in turn
over the same ``--batches`` batches, ``--rounds`` times; the table gives the median per round and
the median of the per-round ratios against ``ours:padded`` and ``torch``.

Memory: ours from XLA's compiled memory analysis of the step (arguments + temporaries + outputs -
aliased, for the largest batch shape); on GPU also the device's peak. On CPU the process peak RSS
while the variant runs (high-water mark reset before it; Linux), for torch too.

MFU (GPU): model FLOPs actually computed per step / step time / peak bf16 FLOP/s, with
    FLOPs = 6 * P_body * T + 6 * D * V * T_scored + 12 * n_layers * H * Dh * sum_q K_q
T the non-padding token positions computed, T_scored the tokens projected to the vocabulary,
P_body the parameters outside the embedding and the LM head, K_q the keys query q may see (the
attention work a causal kernel must do). Padding, and the prompt copies a layout avoids, are not
counted: what prefix sharing saves shows in real tokens/s, not in MFU.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
SHARED = pathlib.Path(os.environ.get("TUNA_SHARED", ROOT.parent / "shared"))

TINY_MODEL = dict(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)
CPU_MODEL = dict(vocab_size=32000, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096)
# Most parameters in the layers (LoRA's case; 19m is 85% embedding and LM head): 160M, 94M of them in 8 layers.
BODY_MODEL = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                  num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=4096)
GPU_MODEL = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=8192)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
             "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6": 918e12}
# Token-length quantiles (0, 5, ..., 100 %) of the 999 shared Alpaca-GPT4 records under the 32k
# LLaMA tokenizer: prompts (Alpaca template, BOS) and responses (+EOS), for the synthetic fallback.
PROMPT_Q = [40, 43, 44, 45, 46, 47, 48, 49, 51, 52, 53, 55, 58, 62, 68, 74, 81, 91, 103, 124, 224]
RESPONSE_Q = [2, 4, 8, 13, 19, 30, 44, 63, 82, 101, 120, 145, 175, 210, 247, 291, 333, 378, 405, 459, 664]


# ---- data --------------------------------------------------------------------------------------

def build_examples(n_cand: int, max_resp: int, max_len: int, count: int, vocab: int, seed: int = 0):
    """TokenizedExamples: real Alpaca records when ../shared has them, synthetic ids otherwise.
    Returns (examples, source description)."""
    import numpy as np

    from tuna_jax.data.batching import TokenizedExample

    rng = np.random.default_rng(seed)
    data = SHARED / "data/alpaca/alpaca_gpt4_demo_999.json"
    tok_path = SHARED / "models/llama2_tokenizer/tokenizer.model"
    if data.is_file() and tok_path.is_file() and vocab == 32000:
        from tuna_jax.data.templates import (
            SpecialTokenPolicy,
            encode_prompt,
            encode_response,
            format_prompt,
            load_tokenizer,
        )

        tok, pol = load_tokenizer(tok_path), SpecialTokenPolicy(True, True)
        recs = json.loads(data.read_text())
        prompts = [encode_prompt(tok, format_prompt(r["instruction"], r.get("input", "")), pol) for r in recs]
        resps = [encode_response(tok, r["output"], pol) for r in recs]
        source = f"{len(recs)} Alpaca-GPT4 records ({data.name}), LLaMA tokenizer"
    else:
        n = 999
        q = np.linspace(0, 1, len(PROMPT_Q))
        plen = np.interp(rng.random(n), q, PROMPT_Q).astype(int)
        rlen = np.interp(rng.random(n), q, RESPONSE_Q).astype(int)
        prompts = [[1] + rng.integers(3, vocab, p - 1).tolist() for p in plen]
        resps = [rng.integers(3, vocab, r - 1).tolist() + [2] for r in rlen]
        source = "synthetic ids with the Alpaca-GPT4 length distribution (../shared absent)"
    cut = lambda r: r if len(r) <= max_resp else r[: max_resp - 1] + [r[-1]]  # keep EOS
    resps = [cut(r) for r in resps]
    out = []
    for i in range(count):
        j = i % len(prompts)
        cands = [np.asarray(resps[(j + 1 + k) % len(resps)], np.int32) for k in range(n_cand)]
        mle = np.asarray(resps[j], np.int32)
        need = max(len(r) for r in cands + [mle])
        p = prompts[j]
        if len(p) + need > max_len:  # the prompt is cut from the left after the BOS, as tokenize_ranking does
            p = p[:1] + p[len(p) - (max_len - need - 1):]
        out.append(TokenizedExample(np.asarray(p, np.int32), cands, rng.normal(size=n_cand).astype(np.float32),
                                    mle, str(i)))
    return out, source


# ---- ours ----------------------------------------------------------------------------------------

class Ours:
    """tuna_jax.train's step on one layout's batches of the given global batches."""

    def __init__(self, layout: str, args, hf: dict, examples, state0, mesh):
        import jax

        from tuna_jax.config import load_config
        from tuna_jax.data.batching import BatchIterator
        from tuna_jax.train import ParamBinder, make_collator, make_optimizer, make_train_step

        self.name = f"ours:{layout}"
        self.cfg = load_config(None, [
            "train.mode=ranking", f"data.layout={layout}", f"data.max_len={args.max_len}",
            f"data.num_candidates={args.n}", f"data.pad_to_multiple={args.pad_to_multiple}",
            f"model.dtype={args.dtype}", f"model.attention={args.attention}", f"model.remat_policy={args.remat}",
            f"train.global_batch={args.batch}", "loss.form=paper", "loss.mle_target=original",
            f"loss.logits_budget_mb={args.logits_budget_mb}", f"data.row_len={args.row_len}"])
        from tuna_jax.model.llama import LlamaConfig

        self.lcfg = LlamaConfig.from_hf(hf, dtype=args.dtype, remat_policy=args.remat, attention=args.attention,
                                        scan_layers=not args.unroll)
        n_data = mesh.shape["data"] * mesh.shape["fsdp"]
        it = BatchIterator(examples, make_collator(self.cfg, 0, n_data), args.batch, shuffle=False,
                           num_epochs=1)  # batch i = examples[i*B:(i+1)*B] for every variant
        self.host_batches = [next(it) for _ in range(args.batches)]
        self.mesh = mesh
        binder = ParamBinder(self.lcfg)
        tx, schedule = make_optimizer(self.cfg.optim, 1000)
        self.tx, self.state0 = tx, state0
        self.step = jax.jit(make_train_step(binder, self.cfg, tx, schedule), donate_argnums=(0,))
        self.real_tokens = [float(b["real_tokens"].sum()) for b in self.host_batches]

    def fresh_state(self):
        import jax
        import jax.numpy as jnp

        params = jax.tree.map(jnp.copy, self.state0)
        return {"params": params, "opt_state": jax.jit(self.tx.init)(params), "step": jnp.zeros((), jnp.int32),
                "rng": jax.random.key_data(jax.random.key(0))}

    def prepare(self) -> dict:
        """Compile every batch shape once (ahead of time); first-step metrics; memory of the largest."""
        import jax

        from tuna_jax import parallel

        with jax.set_mesh(self.mesh):
            self.batches = [parallel.shard_batch(b, self.mesh) for b in self.host_batches]
            self.state = self.fresh_state()
            t0 = time.perf_counter()
            compiled = {}
            for b in self.batches:
                key = tuple((k, v.shape) for k, v in sorted(b.items()))
                if key not in compiled:
                    compiled[key] = self.step.lower(self.state, b).compile()
            self.calls = [compiled[tuple((k, v.shape) for k, v in sorted(b.items()))] for b in self.batches]
            compile_s = time.perf_counter() - t0
            first = None
            for call, b in zip(self.calls, self.batches):
                self.state, m = call(self.state, b)
                first = first or jax.device_get(m)
            big = max(range(len(self.batches)), key=lambda i: self.batches[i]["input_ids"].size)
            mem = self.calls[big].memory_analysis()
        peak = None
        if mem is not None:
            peak = (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
                    - mem.alias_size_in_bytes)
        shapes = sorted({tuple(b["input_ids"].shape) for b in self.host_batches})
        return {"first_loss": float(first["loss"]) / float(first["count"]), "compile_s": compile_s,
                "xla_peak_bytes": peak, "xla_temp_bytes": None if mem is None else mem.temp_size_in_bytes,
                "xla_arg_bytes": None if mem is None else mem.argument_size_in_bytes,
                "shapes": [list(s) for s in shapes], "compiles": len(compiled),
                "padding": _padding(self.host_batches)}

    def run(self) -> float:
        """One pass over the batches; seconds. Steps are dispatched back to back (as the trainer
        does) and the device is synced once at the end."""
        import jax

        with jax.set_mesh(self.mesh):
            t0 = time.perf_counter()
            for call, b in zip(self.calls, self.batches):
                self.state, m = call(self.state, b)
            jax.block_until_ready((self.state, m))
            return time.perf_counter() - t0


class OursLora(Ours):
    """``--lora R``: the same step, batches and loss with LoRA (``model/lora.py``): rank-R adapters (alpha 2R)
    on every projection of the frozen base (``--lora-base-dtype``), which each call passes to the step;
    gradients and AdamW state exist for the adapters only. B starts at zero, so the first step's loss is
    the full fine-tuning step's."""

    def __init__(self, layout: str, args, hf: dict, examples, state0, mesh):
        import jax
        import jax.numpy as jnp

        from tuna_jax.model import lora
        from tuna_jax.train import ParamBinder, make_optimizer, make_train_step

        super().__init__(layout, args, hf, examples, state0, mesh)
        self.name = f"ours:{layout}+lora{args.lora}"
        spec = lora.LoraSpec(args.lora, 2.0 * args.lora, tuple(lora.TARGETS))
        base = jax.tree.map(lambda x: x.astype(jnp.dtype(args.lora_base_dtype)), state0)
        with jax.set_mesh(mesh):
            self.frozen, self.trainable = lora.split_for_training(self.lcfg, base, spec, seed=0, mesh=mesh)
        binder, (tx, schedule) = ParamBinder(self.lcfg), make_optimizer(self.cfg.optim, 1000)
        self.tx = tx

        def step(state, batch, frozen):
            return make_train_step(lora.LoraBinder(binder, frozen, spec), self.cfg, tx, schedule)(state, batch)

        self.step = _BoundFrozen(jax.jit(step, donate_argnums=(0,)), self.frozen)

    def fresh_state(self):
        import jax
        import jax.numpy as jnp

        params = jax.tree.map(jnp.copy, self.trainable)
        return {"params": params, "opt_state": jax.jit(self.tx.init)(params), "step": jnp.zeros((), jnp.int32),
                "rng": jax.random.key_data(jax.random.key(0))}


class _BoundFrozen:
    """A jitted ``f(state, batch, frozen)`` lowered, compiled and called as ``f(state, batch)``."""

    def __init__(self, fn, frozen):
        self.fn, self.frozen = fn, frozen

    def lower(self, state, batch):
        lowered, frozen = self.fn.lower(state, batch, self.frozen), self.frozen

        class Lowered:
            def compile(self):
                compiled = lowered.compile()
                call = lambda s, b: compiled(s, b, frozen)  # noqa: E731
                call.memory_analysis, call.as_text = compiled.memory_analysis, compiled.as_text
                return call

        return Lowered()


def _padding(batches) -> float:
    import numpy as np

    real = sum(float(np.sum(b["segment_ids"] > 0)) for b in batches)
    return 1.0 - real / sum(b["segment_ids"].size for b in batches)


def init_state(hf: dict, args, mesh):
    """Random parameters as a pure dict placed on the mesh, the config, and the module."""
    import jax
    from flax import nnx

    from tuna_jax import parallel
    from tuna_jax.model.llama import Llama, LlamaConfig
    from tuna_jax.train import ParamBinder

    lcfg = LlamaConfig.from_hf(hf, dtype=args.dtype)
    with jax.set_mesh(mesh):
        model = parallel.init_sharded(lambda: Llama(lcfg, nnx.Rngs(0)), mesh)
        return ParamBinder.to_pure(model), lcfg, model


# ---- torch reference -------------------------------------------------------------------------------

class TorchReference:
    """PyTorch + transformers, the way microsoft/LMOps tuna runs a ranking step: N candidates and the
    MLE target as rows padded to the batch's longest, full logits, log_softmax + gather."""

    def __init__(self, args, hf_cfg: dict, lcfg, model, examples_per_batch, device: str):
        import numpy as np
        import torch
        from flax import nnx
        from transformers import LlamaConfig as HFConfig
        from transformers import LlamaForCausalLM

        from tuna_jax.model.convert import iter_hf_tensors

        self.name, self.device, self.margin = "torch", device, 0.1
        torch.manual_seed(0)
        cfg = HFConfig(**hf_cfg, rms_norm_eps=lcfg.rms_norm_eps, tie_word_embeddings=False)
        with torch.device("cpu"):
            self.model = LlamaForCausalLM(cfg)
        state = dict(iter_hf_tensors(nnx.state(model), lcfg, "float32"))
        missing, unexpected = self.model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()},
                                                         strict=False)
        assert not missing and not unexpected, (missing, unexpected)
        self.dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
        self.model = self.model.to(device=device)
        if self.dtype == torch.bfloat16:  # bf16 compute, float32 master weights, as ours
            self.autocast = lambda: torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
        else:
            import contextlib
            self.autocast = contextlib.nullcontext
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        self.batches = [self._tensors(ex, args.n) for ex in examples_per_batch]
        self.real_tokens = None

    def _tensors(self, examples, n):
        import numpy as np
        import torch

        rows, target = [], []
        for e in examples:
            for r in list(e.responses) + [e.mle]:
                rows.append((e.prompt_ids, r))
            target.append(e.scores)
        length = max(len(p) + len(r) for p, r in rows)
        ids = np.zeros((len(rows), length), np.int64)
        att = np.zeros((len(rows), length), np.int64)
        lossm = np.zeros((len(rows), length), np.float32)
        for i, (p, r) in enumerate(rows):
            ids[i, : len(p) + len(r)] = np.concatenate([p, r])
            att[i, : len(p) + len(r)] = 1
            lossm[i, len(p): len(p) + len(r)] = 1
        t = lambda x: torch.from_numpy(x).to(self.device)  # noqa: E731
        return t(ids), t(att), t(lossm), t(np.stack(target).astype(np.float32)), n

    def loss(self, ids, att, lossm, target, n):
        import torch

        with self.autocast():
            logits = self.model(input_ids=ids, attention_mask=att).logits
        lp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        m = lossm[:, 1:]
        v = ((lp * m).sum(-1) / m.sum(-1)).view(-1, n + 1)  # per-token mean, [B, N+1]
        cand, mle = v[:, :n], -v[:, n]
        order = torch.argsort(-target, dim=-1, stable=True)
        vs, ts = cand.gather(-1, order), target.gather(-1, order)
        idx = torch.arange(n, device=ids.device)
        gap = (idx[None, :] - idx[:, None]).float()
        hinge = torch.relu(vs[:, None, :] - vs[:, :, None] + self.margin * gap)  # [b, j, k]
        counted = (idx[:, None] < idx[None, :])[None] & (ts[:, :, None] != ts[:, None, :])
        rank = (hinge * counted).sum((-2, -1))
        return (rank + mle).mean()

    def prepare(self) -> dict:
        import torch

        first = None
        t0 = time.perf_counter()
        for b in self.batches:
            loss = self._step(b)
            first = first if first is not None else float(loss)
        info = {"first_loss": first, "compile_s": time.perf_counter() - t0,
                "padding": 1.0 - sum(float(b[1].sum()) for b in self.batches) / sum(b[1].numel() for b in self.batches)}
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            self._step(self.batches[0])
            info["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
        return info

    def _step(self, b):
        import torch

        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(*b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        return loss.detach()

    def run(self) -> float:
        import torch

        t0 = time.perf_counter()
        for b in self.batches:
            loss = self._step(b)
        float(loss)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0


# ---- model FLOPs -----------------------------------------------------------------------------------

def step_flops(batches, lcfg) -> float:
    """Model FLOPs actually computed over ``batches`` (see the module docstring): ``tuna-jax plan``'s count."""
    from tuna_jax.planning.flops import model_flops

    return sum(model_flops(b, lcfg)["total"] for b in batches)


# ---- main ------------------------------------------------------------------------------------------

def peak_rss_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def vm_hwm() -> int | None:
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def packing_report(args, hf: dict) -> int:
    """Rows a packed run computes over one epoch of every record, for 1-4 shape buckets."""
    from tuna_jax.data.batching import BatchIterator
    from tuna_jax.data.layouts import LayoutCollator

    examples, source = build_examples(args.n, args.max_resp, args.max_len, 999, hf["vocab_size"])
    print(f"data: {source}; {args.batch} prompts x N={args.n} (+ the MLE target) per step, rows of "
          f"{args.row_len or args.max_len}; one epoch, {len(examples) // args.batch} batches")
    print(f"{'shape_buckets':>13} {'row counts':>24} {'rows':>7} {'padding':>8} {'vs 1':>6}")
    base = None
    for k in (1, 2, 3, 4):
        coll = LayoutCollator("packed", "ranking", args.max_len, 0, args.n, "original", row_len=args.row_len,
                              shape_buckets=k)
        batches = list(BatchIterator(examples, coll, args.batch, shuffle=False, num_epochs=1))
        rows = sum(b["segment_ids"].shape[0] for b in batches)
        base = base or rows
        counts = sorted({b["segment_ids"].shape[0] for b in batches})
        print(f"{k:>13} {str(counts):>24} {rows:>7} {_padding(batches):8.1%} {rows / base:6.2f}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="the 1.1B config in bfloat16 on the accelerator")
    ap.add_argument("--model", default=None, choices=["tiny", "19m", "160m", "1b"],
                    help="default 19m (CPU, the issue's setting) / 1b (GPU, TinyLlama's shape)")
    ap.add_argument("--layouts", default="padded,prefix_shared,packed")
    ap.add_argument("--torch", default="auto", choices=["auto", "yes", "no"],
                    help="time the PyTorch reference (auto: on CPU, and on GPU when torch sees one)")
    ap.add_argument("--batch", type=int, default=None, help="prompts per step (default 8 CPU / 32 GPU)")
    ap.add_argument("--n", type=int, default=4, help="candidates per prompt")
    ap.add_argument("--max-len", type=int, default=None, help="tokens per sequence (default 512 CPU / 1024 GPU)")
    ap.add_argument("--max-resp", type=int, default=None, help="response tokens kept (default 320 CPU / 1024 GPU)")
    ap.add_argument("--batches", type=int, default=None, help="distinct batches per round (default 3 CPU / 4 GPU)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--remat", default="none")
    ap.add_argument("--unroll", action="store_true", help="model.scan_layers=false: unroll the layer loop")
    ap.add_argument("--pad-to-multiple", type=int, default=64)
    ap.add_argument("--logits-budget-mb", type=int, default=None, help="loss.logits_budget_mb (default: the config's)")
    ap.add_argument("--row-len", type=int, default=0, help="data.row_len for packed (0: max_len)")
    ap.add_argument("--packing", action="store_true", help="only plan the packed batches of the whole data "
                    "(every record, one epoch) for data.shape_buckets 1-4: rows computed and padding; no model")
    ap.add_argument("--lora", type=int, default=0, metavar="R", help="also time each layout with LoRA of rank R on "
                    "every projection (model/lora.py), against full fine-tuning on the same batches")
    ap.add_argument("--lora-base-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the frozen base's dtype in the --lora variants (default float32, as full fine-tuning's)")
    ap.add_argument("--json", default=None, help="write every figure to this file")
    ap.add_argument("--profile", default=None, help="also trace one pass of the first variant (jax.profiler) "
                    "into this folder, with its optimised HLO")
    args = ap.parse_args(argv)
    if not args.gpu:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    args.batch = args.batch or (32 if args.gpu else 8)
    args.max_len = args.max_len or (1024 if args.gpu else 512)
    args.max_resp = args.max_resp or (1024 if args.gpu else 320)
    args.batches = args.batches or (4 if args.gpu else 3)
    args.dtype = args.dtype or ("bfloat16" if args.gpu else "float32")
    if args.logits_budget_mb is None:
        from tuna_jax.config import LossConfig
        args.logits_budget_mb = LossConfig.logits_budget_mb

    import jax

    from tuna_jax import parallel

    models = {"tiny": TINY_MODEL, "19m": CPU_MODEL, "160m": BODY_MODEL, "1b": GPU_MODEL}
    if args.packing:  # planning only: no model, any machine
        return packing_report(args, dict(models[args.model or ("1b" if args.gpu else "19m")]))
    if args.gpu and jax.default_backend() == "cpu":
        print("--gpu: jax sees no accelerator; nothing to do")
        return 0
    hf = dict(models[args.model or ("1b" if args.gpu else "19m")])
    mesh = parallel.make_mesh(None)
    examples, source = build_examples(args.n, args.max_resp, args.max_len, args.batch * args.batches,
                                      hf["vocab_size"])
    state0, lcfg, model = init_state(hf, args, mesh)
    kind = jax.devices()[0].device_kind
    print(f"device: {kind} x{jax.device_count()} ({jax.default_backend()}); jax {jax.__version__}")
    print(f"model: {lcfg.num_params() / 1e6:.1f}M parameters, {args.dtype}, attention={args.attention}, "
          f"remat={args.remat}")
    print(f"data: {source}; {args.batch} prompts x N={args.n} candidates (+ the MLE target) per step, "
          f"max_len {args.max_len}, responses <= {args.max_resp} tokens; {args.batches} batches x {args.rounds} rounds")

    variants = [Ours(layout, args, hf, examples, state0, mesh) for layout in args.layouts.split(",")]
    if args.lora:
        variants += [OursLora(layout, args, hf, examples, state0, mesh) for layout in args.layouts.split(",")]
    use_torch = args.torch == "yes" or (args.torch == "auto" and not args.gpu)
    if args.gpu and args.torch == "auto":
        try:
            import torch
            use_torch = torch.cuda.is_available()
        except ImportError:
            use_torch = False
    if use_torch:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        groups = [examples[i * args.batch: (i + 1) * args.batch] for i in range(args.batches)]
        ref = TorchReference(args, hf, lcfg, model, groups, "cuda" if args.gpu else "cpu")
        ref.real_tokens = variants[0].real_tokens
        variants.append(ref)
    del model

    info = {}
    for i, var in enumerate(variants):
        t0 = time.perf_counter()
        try:
            info[var.name] = var.prepare()
        except Exception as e:  # e.g. a cuDNN that refuses a shape: say so, and measure the xla path instead
            if not isinstance(var, Ours) or args.attention not in ("auto", "cudnn"):
                raise
            print(f"  {var.name}: attention={args.attention} failed ({type(e).__name__}: {str(e)[:300]}); "
                  "retrying with attention=xla", flush=True)
            fallback = argparse.Namespace(**{**vars(args), "attention": "xla"})
            var = variants[i] = Ours(var.name.split(":")[1], fallback, hf, examples, state0, mesh)
            var.name += " (xla attention)"
            info[var.name] = var.prepare()
        print(f"  prepared {var.name} in {time.perf_counter() - t0:.1f} s "
              f"(compile {info[var.name]['compile_s']:.1f} s)", flush=True)
    tokens = sum(variants[0].real_tokens)
    assert all(abs(sum(v.real_tokens) - tokens) < 0.5 for v in variants), "variants must see the same tokens"

    times = {v.name: [] for v in variants}
    rss = {v.name: [] for v in variants}
    for var in variants:  # one untimed pass each: the first executions after compiling run slow on GPUs
        var.run()
    for r in range(args.rounds):
        for var in variants:
            base = vm_hwm() if peak_rss_reset() else None
            times[var.name].append(var.run())
            if base is not None:
                rss[var.name].append(vm_hwm())
        rates = ", ".join(f"{k} {tokens / t[-1]:,.0f} tok/s" for k, t in times.items())
        print(f"  round {r + 1}: {rates}", flush=True)

    if args.profile:
        var = variants[0]
        jax.profiler.start_trace(args.profile)
        var.run()
        jax.profiler.stop_trace()
        if isinstance(var, Ours):
            pathlib.Path(args.profile, "step_hlo.txt").write_text(var.calls[0].as_text())
    peak = next((p for k, p in PEAK_BF16.items() if k.lower() in kind.lower()), None)
    rows = []
    for var in variants:
        t = statistics.median(times[var.name])
        row = {"variant": var.name, "step_s": t / args.batches, "tokens_per_s": tokens / t, **info[var.name]}
        if rss[var.name]:
            row["rss_peak_bytes"] = max(rss[var.name])
        for base in [v.name for v in variants if v.name.startswith("ours:padded")][:1] + ["torch"]:
            if base in times and base != var.name:
                row[f"vs_{base.split(' ')[0]}"] = statistics.median(b / a for a, b in zip(times[var.name], times[base]))
        if var.name.startswith("ours"):
            f = step_flops(var.host_batches, lcfg)
            row["model_tflops_per_step"] = f / args.batches / 1e12
            if peak:
                row["mfu"] = f / t / peak
        if args.gpu:
            row["device_peak_bytes"] = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
        rows.append(row)

    print(f"\nreal tokens per step: {tokens / args.batches:,.0f} (prompt + response per candidate and MLE target)")
    hdr = (f"{'variant':34} {'step s':>8} {'real tok/s':>11} {'vs padded':>10} {'vs torch':>9} {'padding':>8} "
           f"{'peak MiB':>9}")
    hdr += "  TFLOP/step" + ("  MFU" if peak else "")
    print(hdr)
    for row in rows:
        mem = row.get("xla_peak_bytes") or row.get("cuda_peak_bytes") or row.get("rss_peak_bytes")
        print(f"{row['variant']:34} {row['step_s']:8.3f} {row['tokens_per_s']:11,.0f} "
              f"{row.get('vs_ours:padded', 1.0 if row['variant'].startswith('ours:padded') else float('nan')):9.2f}x "
              f"{row.get('vs_torch', float('nan')):8.2f}x {row['padding']:8.1%} "
              f"{(mem or 0) / 2**20:9,.0f}"
              + (f"  {row['model_tflops_per_step']:10.2f}" if 'model_tflops_per_step' in row else " " * 12)
              + (f"  {row['mfu']:.1%}" if 'mfu' in row else ""))
    ours_pad = next((r for r in rows if r["variant"].startswith("ours:padded")), None)
    for row in rows:
        if ours_pad and row is not ours_pad and row.get("xla_peak_bytes") and ours_pad.get("xla_peak_bytes"):
            peak = row['xla_peak_bytes'] / ours_pad['xla_peak_bytes']
            print(f"memory {row['variant']} / ours:padded: XLA peak {peak:.2f}x, "
                  f"temporaries {row['xla_temp_bytes'] / ours_pad['xla_temp_bytes']:.2f}x")
    by_name = {r["variant"]: r for r in rows}
    for row in rows:  # --lora: each LoRA variant against full fine-tuning of the same layout
        full = by_name.get(row["variant"].split("+lora")[0]) if "+lora" in row["variant"] else None
        if full and row.get("xla_peak_bytes") and full.get("xla_peak_bytes"):
            mib = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
            print(f"{row['variant']} / {full['variant']}: step time {row['step_s'] / full['step_s']:.2f}x, XLA peak "
                  f"{row['xla_peak_bytes'] / full['xla_peak_bytes']:.2f}x ({mib(row['xla_peak_bytes'])} vs "
                  f"{mib(full['xla_peak_bytes'])}: arguments {mib(row['xla_arg_bytes'])} vs "
                  f"{mib(full['xla_arg_bytes'])}, "
                  f"temporaries {mib(row['xla_temp_bytes'])} vs {mib(full['xla_temp_bytes'])})")
    print("first-step loss: " + ", ".join(f"{r['variant']} {r['first_loss']:.6f}" for r in rows))
    if peak:
        print(f"MFU = model FLOPs computed / step time / {peak / 1e12:.0f} TFLOP/s ({kind} dense bf16); "
              "FLOPs = 6*P_body*T + 6*D*V*T_scored + 12*layers*H*Dh*sum(visible keys)")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"args": vars(args), "source": source, "device": kind,
                                                        "real_tokens_per_step": tokens / args.batches,
                                                        "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

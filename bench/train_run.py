"""`tuna-jax train` end to end (host work, compiles, the loop) against its jitted step alone.

    python bench/train_run.py                  # CPU: the 19M setting of rank_step.py, 10 steps per run
    python bench/train_run.py --json OUT.json  # also every figure as JSON

`bench/rank_step.py` times the jitted step on batches compiled ahead; a user runs `tuna-jax train`,
which also reads and tokenises the data, plans the batches, initialises the model, compiles (once per
batch shape) and logs. This script runs the command's own code path (``load_config`` then
``tuna_jax.train.train``, as ``cli.cmd_train`` does), each run in a fresh process, and reports:

* time to the first step: from the process' start (before ``import jax``) to the first step's
  metrics on the host;
* XLA compiles per run: every compile request, those the persistent cache answered, and those of the
  train step (JAX's monitoring events);
* the steady-state step: the median ``step_time`` of the steps after the first (the wall time between
  two steps' results, what ``metrics.jsonl`` logs);

and, in this process, the jitted step alone on the same batches (the run's config, each shape compiled
ahead, one step at a time, synced), as ``rank_step.py`` measures it: the run's median over it.

Runs, in order: ``data.shape_buckets=1000`` without the persistent cache (every distinct batch size its
own shape: what a run did before shapes were planned), ``data.shape_buckets=4`` with an empty cache,
then the same again (the cache warm: a rerun or a resume). Data: the Alpaca-GPT4 records of
``../shared`` with the 32k LLaMA tokenizer (each prompt's 4 candidates the next records' responses,
random scores, responses cut to ``--max-resp`` tokens), else ``tuna_jax.data.synthetic`` records with the
stories260K tokenizer.
"""
from __future__ import annotations

import time

T_START = time.perf_counter()  # before the heavy imports: a child's time to first step starts here

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
SHARED = pathlib.Path(os.environ.get("TUNA_SHARED", ROOT.parent / "shared"))
CPU_MODEL = dict(vocab_size=32000, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096)  # rank_step.py's 19M


# ---- data and config ------------------------------------------------------------------------------

def write_data(out: pathlib.Path, n_cand: int, max_resp: int) -> tuple[str, str, dict]:
    """A ranking JSONL under ``out``: (path, tokenizer, model hf_config)."""
    data = SHARED / "data/alpaca/alpaca_gpt4_demo_999.json"
    tok_path = SHARED / "models/llama2_tokenizer/tokenizer.model"
    path = out / "rankings.jsonl"
    if data.is_file() and tok_path.is_file():
        import numpy as np

        from tuna_jax.data.templates import load_tokenizer

        tok, recs = load_tokenizer(tok_path), json.loads(data.read_text())
        rng = np.random.default_rng(0)

        def cut(text: str) -> str:  # about max_resp tokens with the EOS, as rank_step.py cuts them
            ids = tok.encode(text)
            return text if len(ids) < max_resp else tok.decode(ids[: max_resp - 1])

        outs = [cut(r["output"]) for r in recs]
        rows = [{"instruction": r["instruction"], "input": r.get("input", ""), "output": outs[j],
                 "candidates": [outs[(j + 1 + k) % len(recs)] for k in range(n_cand)],
                 "scores": rng.normal(size=n_cand).round(4).tolist(), "id": str(j)} for j, r in enumerate(recs)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path), str(tok_path), dict(CPU_MODEL)
    from tuna_jax.assets import stories260k_hf_dir
    from tuna_jax.data.synthetic import ranking_records

    path.write_text("".join(json.dumps(r) + "\n" for r in ranking_records(999, seed=0)))
    return str(path), str(stories260k_hf_dir(out / "assets")), dict(CPU_MODEL, vocab_size=512)


def overrides(args, data: str, tok: str, hf: dict, run_dir: str, buckets: int, cache: str) -> list[str]:
    return [f"data.train={data}", f"model.tokenizer={tok}", f"model.hf_config={json.dumps(hf)}",
            "train.mode=ranking", f"data.num_candidates={args.n}", f"data.max_len={args.max_len}",
            "data.on_error=skip", f"data.shape_buckets={buckets}", f"train.global_batch={args.batch}",
            f"train.max_steps={args.steps}", "loss.form=paper", "loss.mle_target=original",
            f"train.output_dir={run_dir}", "train.export=false", "train.save_every=100000", "train.progress=false",
            "train.tensorboard=false", f"train.compile_cache={cache}"]


# ---- one `tuna-jax train` run (a child process) ---------------------------------------------------

def child(argv: list[str]) -> int:
    """Run ``train`` as ``tuna-jax train`` does and print one JSON line of figures."""
    import threading

    import jax

    seen, compiles = threading.local(), []

    def event(name, **kw):
        if name == "/jax/compilation_cache/cache_hits":
            seen.hit = True

    def duration(name, secs, **kw):
        if name == "/jax/core/compile/backend_compile_duration":  # one per compile request, hit or not
            compiles.append({"fun": kw.get("fun_name"), "hit": bool(getattr(seen, "hit", False)), "s": secs})
            seen.hit = False

    jax.monitoring.register_event_listener(event)
    jax.monitoring.register_event_duration_secs_listener(duration)
    from tuna_jax.config import load_config
    from tuna_jax.train import train

    steps: list = []
    cfg = load_config(None, argv)
    train(cfg, on_step=lambda step, m: steps.append((time.perf_counter() - T_START, m["step_time"])))
    print(json.dumps({"first_step_s": steps[0][0], "step_times": [t for _, t in steps], "compiles": compiles,
                      "wall_s": time.perf_counter() - T_START}))
    return 0


def run_child(argv: list[str]) -> dict:
    """One run in a fresh process; adds its CPU seconds (user + system) and the load average before it."""
    import resource

    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    before, load = resource.getrusage(resource.RUSAGE_CHILDREN), os.getloadavg()[0]
    out = subprocess.run([sys.executable, __file__, "--child", *argv], env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"train run failed:\n{out.stderr[-4000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return dict(json.loads(out.stdout.strip().splitlines()[-1]), cpu_s=cpu, load=load)


# ---- the jitted step alone ------------------------------------------------------------------------

def step_alone(argv: list[str], steps: int, rounds: int) -> dict:
    """The run's jitted step on its first ``steps`` batches, each shape compiled ahead: seconds per step
    (one step at a time, synced), every step of ``rounds`` passes."""
    import jax
    import jax.numpy as jnp

    from tuna_jax import parallel
    from tuna_jax.config import load_config
    from tuna_jax.model.params import ParamBinder
    from tuna_jax.train import (
        _load_or_init_model,
        init_opt_state,
        load_tokenizer_and_policy,
        make_optimizer,
        make_train_step,
        tokenize_source,
        train_batches,
    )

    cfg = load_config(None, argv)
    tok, policy = load_tokenizer_and_policy(cfg)
    examples, _ = tokenize_source(cfg.data.train, cfg, tok, policy)
    mesh = parallel.make_mesh(cfg.train.mesh)
    it = train_batches(cfg, examples, tok.pad_id, mesh.shape["data"] * mesh.shape["fsdp"])
    with jax.set_mesh(mesh):
        batches = [parallel.shard_batch(next(it), mesh) for _ in range(steps)]
        model = _load_or_init_model(cfg, mesh)
        binder = ParamBinder(model.cfg)
        tx, schedule = make_optimizer(cfg.optim, steps)
        params = binder.to_pure(model)
        del model
        on_mesh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        state = {"params": params, "opt_state": init_opt_state(tx, params, mesh),
                 "step": jax.device_put(jnp.zeros((), jnp.int32), on_mesh),
                 "rng": jax.device_put(jax.random.key_data(jax.random.key(0)), on_mesh)}
        step_fn = jax.jit(make_train_step(binder, cfg, tx, schedule), donate_argnums=(0,))
        t0 = time.perf_counter()
        shapes = {}
        for b in batches:
            key = tuple((k, v.shape) for k, v in sorted(b.items()))
            if key not in shapes:
                shapes[key] = step_fn.lower(state, b).compile()
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(rounds):
            for b in batches:
                t = time.perf_counter()
                state, m = step_fn(state, b)
                jax.block_until_ready((state, m))
                times.append(time.perf_counter() - t)
    return {"median_step_s": statistics.median(times), "compile_s": compile_s, "shapes": len(shapes),
            "step_times": times}


# ---- main -----------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="steps per run (train.max_steps)")
    ap.add_argument("--batch", type=int, default=8, help="prompts per step")
    ap.add_argument("--n", type=int, default=4, help="candidates per prompt")
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--max-resp", type=int, default=320, help="response tokens kept")
    ap.add_argument("--rounds", type=int, default=2, help="passes of the jitted step alone over the run's batches")
    ap.add_argument("--buckets", default="1000,4", help="data.shape_buckets of the cold runs: the first without "
                    "the persistent cache, the last with an empty one, then rerun warm")
    ap.add_argument("--json", default=None, help="write every figure to this file")
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    work = pathlib.Path(tempfile.mkdtemp(prefix="tuna-train-run-"))
    data, tok, hf = write_data(work, args.n, args.max_resp)
    cache = work / "xla"
    buckets = [int(b) for b in args.buckets.split(",")]
    plan = [(f"shape_buckets={buckets[0]}, no cache", buckets[0], "false")]
    plan += [(f"shape_buckets={b}, cache cold", b, str(cache)) for b in buckets[1:]]
    plan.append((f"shape_buckets={buckets[-1]}, cache warm", buckets[-1], str(cache)))
    print(f"data: {data} ({'Alpaca-GPT4, LLaMA tokenizer' if hf['vocab_size'] == 32000 else 'synthetic'}); "
          f"{args.batch} prompts x N={args.n} (+ the MLE target) per step, max_len {args.max_len}, "
          f"{args.steps} steps per run; load average {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    for i, (label, k, c) in enumerate(plan):
        r = run_child(overrides(args, data, tok, hf, str(work / f"run{i}"), k, c))
        misses = [x for x in r["compiles"] if not x["hit"]]
        r.update(label=label, compiles_total=len(r["compiles"]), compiles_missed=len(misses),
                 compile_s=sum(x["s"] for x in misses),
                 step_compiles=sum(x["fun"] == "jit(step)" for x in misses),
                 median_step_s=statistics.median(r["step_times"][1:]))
        rows.append(r)
        print(f"  {label}: first step at {r['first_step_s']:.1f} s, {r['compiles_missed']} compiles "
              f"({r['step_compiles']} of the step), median step {r['median_step_s']:.2f} s", flush=True)
    load = os.getloadavg()[0]
    alone = dict(step_alone(overrides(args, data, tok, hf, str(work / "alone"), buckets[-1], "false"), args.steps,
                            args.rounds), load=load)
    print(f"\n{'run':32} {'first step s':>12} {'compiles':>9} {'of step':>8} {'compile s':>10} {'cache hits':>10} "
          f"{'median step s':>14} {'vs alone':>9} {'wall s':>7} {'CPU s':>6} {'load':>5}")
    for r in rows:
        print(f"{r['label']:32} {r['first_step_s']:12.1f} {r['compiles_missed']:9d} {r['step_compiles']:8d} "
              f"{r['compile_s']:10.1f} {r['compiles_total'] - r['compiles_missed']:10d} {r['median_step_s']:14.2f} "
              f"{r['median_step_s'] / alone['median_step_s']:8.2f}x {r['wall_s']:7.1f} {r['cpu_s']:6.0f} "
              f"{r['load']:5.1f}")
    print(f"{'jitted step alone':32} {'':12} {alone['shapes']:9d} {alone['shapes']:8d} {alone['compile_s']:10.1f} "
          f"{'':10} {alone['median_step_s']:14.2f} {1.0:8.2f}x {'':7} {'':6} {alone['load']:5.1f}")
    print(f"(first step: from process start to its metrics on the host; median step: steps 2-{args.steps}; "
          f"alone: the same {args.steps} batches, shape_buckets={buckets[-1]}, {args.rounds} passes; "
          "load: the 1-minute load average as it started)")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"args": vars(args), "runs": rows, "alone": alone}, indent=2))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        sys.exit(child(sys.argv[2:]))
    sys.exit(main())

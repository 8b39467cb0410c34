"""`tuna-jax` entry point: parses arguments and dispatches. No logic of its own: every
command calls one function of the module that owns the idea. Heavy imports (jax, torch)
happen inside the handlers so that `tuna-jax --help` is instant."""
from __future__ import annotations

import argparse
import sys

EPILOG = """The staged pipeline (see README.md):
  tuna-jax pipeline configs/pipelines/tuna.yaml   every stage below, resumable, one command
  tuna-jax convert hf-to-orbax HF_DIR CKPT        bring a Hugging Face LLaMA in
  tuna-jax train configs/alpaca_sft.yaml          SFT ("Alpaca")
  tuna-jax teacher ... / tuna-jax judge ...       feedback from stronger LLMs
  tuna-jax train configs/tuna_p.yaml              Tuna_p, then configs/tuna.yaml
  tuna-jax eval ...                               Super-NI, LMentry, Vicuna QA
  tuna-jax convert orbax-to-hf CKPT OUT --like HF_DIR   take it home
"""


def _runtime(args) -> dict:
    return {"dtype": args.dtype, "param_dtype": "float32"}


def _mesh(args):
    from tuna_jax import parallel

    parallel.initialize_distributed()
    return parallel.make_mesh(args.mesh)


def cmd_convert_hf_to_orbax(args) -> int:
    from tuna_jax.model.checkpoint import convert_hf_to_params
    from tuna_jax.model.convert import ConversionError

    from tuna_jax.io import paths

    if paths.same_place(args.ckpt_dir, args.hf_dir):
        raise ConversionError(f"{args.ckpt_dir}: the checkpoint folder is the HF folder being read; choose another")
    _mesh(args)  # multi-host start-up and --mesh checked; the export streams from host memory and fits any mesh
    out, cfg = convert_hf_to_params(args.hf_dir, args.ckpt_dir, param_dtype=args.param_dtype)
    print(f"wrote {out} ({cfg.num_params() / 1e6:.2f}M parameters, {cfg.param_dtype})")
    return 0


def cmd_convert_orbax_to_hf(args) -> int:
    from flax import nnx

    from tuna_jax.model import load_model
    from tuna_jax.model.convert import ConversionError, prepare_export_dir, save_hf_model
    from tuna_jax.model.lora import adapter_base, export_peft, is_adapter_dir

    prepare_export_dir(args.out_dir, [args.ckpt_dir, args.like], overwrite=args.overwrite)  # before loading
    adapters = is_adapter_dir(args.ckpt_dir)  # a LoRA run's export: PEFT's folder, or merged with --merge
    if args.merge and not adapters:
        raise ConversionError(f"{args.ckpt_dir}: --merge: not a LoRA adapter folder, there is nothing to merge")
    if adapters and not args.merge:
        print(f"wrote {export_peft(args.ckpt_dir, args.out_dir, base=args.like)} (a PEFT adapter folder; --merge "
              f"writes merged weights)")
        return 0
    mesh = _mesh(args)
    model = load_model(args.ckpt_dir, mesh)
    like = args.like or (adapter_base(args.ckpt_dir) if adapters else None)  # the base: config, dtype, tokenizer
    if like is None:
        print("note: no --like HF_DIR given: config.json is written from the checkpoint alone and tokenizer "
              "files are copied from the checkpoint folder if it has them", file=sys.stderr)
        like = args.ckpt_dir
    out = save_hf_model(nnx.state(model, nnx.Param), model.cfg, args.out_dir, like=like, dtype=args.dtype,
                        max_shard_bytes=int(args.max_shard_gb * 2**30))
    print(f"wrote {out}")
    return 0


def cmd_convert_llama2c_to_hf(args) -> int:
    from tuna_jax.model.llama2c import convert_llama2c_to_hf

    out = convert_llama2c_to_hf(args.model_bin, args.tokenizer_bin, args.out_dir)
    print(f"wrote {out}")
    return 0


def cmd_score(args) -> int:
    from tuna_jax.model import load_model
    from tuna_jax.score import make_candidate_encoder, read_lines, score_file

    lines = read_lines(args.data)  # every line checked before the model loads
    mesh = _mesh(args)
    model = load_model(args.model, mesh, **_runtime(args))
    encoder = None
    try:
        encoder = make_candidate_encoder(args.tokenizer or args.model)
    except (FileNotFoundError, OSError, ValueError) as e:
        print(f"note: no tokenizer ({e}); only pre-tokenised lines can be scored", file=sys.stderr)
    n = score_file(model, args.data, args.out, encoder=encoder, mesh=mesh, batch_rows=args.batch_size,
                   max_len=args.max_len, lines=lines, layout=args.layout)
    print(f"scored {n} lines -> {args.out}")
    return 0


def cmd_reference_scores(args) -> int:
    from tuna_jax.data.reference import attach_reference_scores

    print(attach_reference_scores(args.ranked, args.scores, args.out).summary(args.out))
    return 0


def cmd_train(args) -> int:
    from tuna_jax.config import load_config
    from tuna_jax.train import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg, resume=args.resume)  # a stop (signal, divergence) is one line and its status: run_command
    summary = {k: round(v, 5) if isinstance(v, float) else v for k, v in result.metrics.items()}
    print(f"finished at step {result.step}: {summary}")
    if result.eval_metrics:
        print(f"held-out: {result.eval_metrics}")
    if result.export_dir:
        print(f"params export: {result.export_dir}")
    return 0


def cmd_demo(args) -> int:
    from tuna_jax.pipeline.commands import demo

    return demo(args.out, fast=args.fast, objectives=args.objectives)


def cmd_plan(args) -> int:
    from tuna_jax.commands import config_from_args, plan

    return plan.run(config_from_args(plan.Config, args))


# Commands whose module owns its arguments: (name, module, one-line help). The module is
# imported only when its command runs, so `tuna-jax --help` stays instant.
MODULE_COMMANDS = [
    ("generate", "tuna_jax.generate", "sample responses (greedy, temperature, top-p/top-k) with token log-probs"),
    ("teacher", "tuna_jax.feedback.teacher", "probabilistic ranking: N teacher responses + log-likelihoods, "
     "s = logp / |r|^beta"),
    ("sample-diverse", "tuna_jax.feedback.diverse", "N diverse samples per instruction (pairwise ROUGE-L < tau)"),
    ("judge", "tuna_jax.feedback.judge", "contextual ranking by a judge LLM (or an offline metric judge)"),
    ("prm", "tuna_jax.feedback.prm", "proxy ranking model: train on judge rankings, re-rank more data"),
    ("pipeline", "tuna_jax.pipeline.commands", "run a pipeline YAML: every stage in order, finished stages skipped, "
     "interrupted ones resumed, changed ones run again"),
    ("eval", "tuna_jax.eval.run", "evaluate: `eval CONFIG.yaml` (Super-NI, LMentry, Vicuna QA, AlpacaEval -> table "
     "+ chart), or score files: `eval superni|lmentry|vicuna|alpaca-eval ...`"),
]


def _module_command(module_name: str):
    def handler(args) -> int:
        import importlib

        return importlib.import_module(module_name).run(args)

    return handler


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tuna-jax", description="Tuna: instruction tuning with feedback from LLMs, "
                                "in JAX/Flax.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    d = sub.add_parser("demo", help="the whole Tuna pipeline on the shipped stories260K model (CPU, offline)",
                       description="The pipeline tuna_jax/pipeline/demo.yaml: SFT a teacher and an 'Alpaca', gather "
                       "probabilistic (teacher) and contextual (diverse samples + metric judge) rankings, train "
                       "Tuna_p and Tuna next to MLE-only controls, evaluate every stage on held-out prompts and "
                       "export Hugging Face weights. No download, no GPU, no API key; under 10 minutes on 2 CPU "
                       "cores. Rerunning continues where it stopped.")
    d.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    d.add_argument("--fast", action="store_true", help="a smaller run (used by the tests)")
    d.add_argument("--objectives", action="store_true", help="train the demo's Tuna_p stage with every ranking "
                   "objective (loss.form) next to its MLE-only control (tuna_jax/pipeline/objectives.yaml)")
    d.set_defaults(func=cmd_demo)

    def mesh_arg(q):
        q.add_argument("--mesh", default=None, metavar="DATA,FSDP,TENSOR",
                       help="device mesh sizes, one may be -1 (default: all devices on fsdp)")

    conv = sub.add_parser("convert", help="convert checkpoints (HF safetensors, Orbax, llama2.c)")
    csub = conv.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    c = csub.add_parser("hf-to-orbax", help="HF LlamaForCausalLM folder (safetensors) -> tuna-jax params checkpoint")
    c.add_argument("hf_dir")
    c.add_argument("ckpt_dir")
    c.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"])
    mesh_arg(c)
    c.set_defaults(func=cmd_convert_hf_to_orbax)
    c = csub.add_parser("orbax-to-hf", help="tuna-jax checkpoint -> HF folder (sharded safetensors + index)")
    c.add_argument("ckpt_dir")
    c.add_argument("out_dir")
    c.add_argument("--like", metavar="HF_DIR", help="the HF folder it came from: its config.json fields, "
                   "dtype and tokenizer files are carried over")
    c.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="storage dtype (default: that of --like, so bf16 stays bf16)")
    c.add_argument("--max-shard-gb", type=float, default=5.0)
    c.add_argument("--overwrite", action="store_true",
                   help="write into a folder that is not empty (the old shards there are removed)")
    c.add_argument("--merge", action="store_true", help="CKPT_DIR is a LoRA adapter folder: write the base with "
                   "the adapters merged (default for an adapter folder: a PEFT adapter folder, --like its base)")
    mesh_arg(c)
    c.set_defaults(func=cmd_convert_orbax_to_hf)
    c = csub.add_parser("llama2c-to-hf", help="llama2.c legacy model.bin + tokenizer.bin -> HF folder")
    c.add_argument("model_bin")
    c.add_argument("tokenizer_bin")
    c.add_argument("out_dir")
    c.set_defaults(func=cmd_convert_llama2c_to_hf)

    s = sub.add_parser("score", help="exact log-likelihoods of candidates (response tokens + EOS)",
                       description="Each input line: {instruction, input?, candidates: [str]} or pre-tokenised "
                       "{prompt_ids, candidate_ids}. Each output line: {index, id?, candidates: "
                       "[{logprob_sum, num_tokens}], logprob_sum: [...], num_tokens: [...]}.")
    s.add_argument("model", help="HF folder or tuna-jax params checkpoint")
    s.add_argument("data", help="input JSONL")
    s.add_argument("out", help="output JSONL")
    s.add_argument("--tokenizer", help="tokenizer folder or tokenizer.model (default: the model's)")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    s.add_argument("--batch-size", type=int, default=8, help="input lines (prompts) per forward pass")
    s.add_argument("--max-len", type=int, default=None, help="longest prompt+candidate (default: model maximum)")
    s.add_argument("--layout", default="auto", choices=["auto", "padded", "prefix_shared", "packed"],
                   help="how candidates are laid out (the training layouts; same numbers, different speed; "
                   "auto: the platform's fastest)")
    mesh_arg(s)
    s.set_defaults(func=cmd_score)
    r = sub.add_parser("reference-scores", help="store a frozen reference model's `tuna-jax score` output with "
                       "ranking data (ref_logprob_sum, ref_num_tokens), for loss.reference=data",
                       description="Join a native ranking file with the `tuna-jax score` output for it (made with "
                       "the starting model) line by line, checking index, id and candidate counts, and write the "
                       "ranking rows with ref_logprob_sum / ref_num_tokens added.")
    r.add_argument("ranked", help="native ranking JSONL (the file that was scored)")
    r.add_argument("scores", help="`tuna-jax score` output for it")
    r.add_argument("out", help="output ranking JSONL (may be RANKED itself)")
    r.set_defaults(func=cmd_reference_scores)
    t = sub.add_parser("train", help="train a stage (SFT or ranking) from a YAML config",
                       description="Train one stage. CONFIG is a YAML file (see configs/); overrides are "
                       "section.key=value, e.g. optim.lr=1e-5 train.global_batch=64 data.train=ranked.jsonl, or a "
                       "YAML file merged where it stands (a topology preset: configs/topologies/v5e-16.yaml). "
                       "Unknown keys are errors.")
    t.add_argument("config", help="YAML config (configs/tuna_p.yaml, ...)")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in "
                   "train.output_dir (params, optimizer, step, RNG and data position)")
    t.set_defaults(func=cmd_train)
    pl = sub.add_parser("plan", help="will a training config fit a TPU slice or GPUs: per-chip memory, FLOPs and "
                        "step time from an ahead-of-time compile, no hardware needed",
                        description="Compile the train step of CONFIG for a topology (no weights, no data, no "
                        "accelerator) and report per-chip memory against HBM, FLOPs and the step time at 40% / "
                        "55% MFU. Exit status 0: fits, 1: does not fit. See launch/README.md.")
    if command == "plan":  # only the command being run pays for building its arguments
        from tuna_jax.commands import add_arguments, plan

        add_arguments(pl, plan.Config)
    pl.set_defaults(func=cmd_plan)

    for name, module_name, help_text in MODULE_COMMANDS:
        m = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:  # only the command being run pays for its imports
            import importlib

            importlib.import_module(module_name).add_arguments(m)
        m.set_defaults(func=_module_command(module_name))
    return p


def main(argv: list[str] | None = None) -> int:
    from tuna_jax.io.cli import quiet_libraries, run_command, setup_logging

    quiet_libraries()  # before any library is imported, even by a command's argument parser
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    setup_logging(args.verbose)  # INFO for tuna-jax, WARNING for the libraries (jax, Orbax, transformers)
    return run_command(f"tuna-jax {args.command}", args.func, args, args.verbose)


if __name__ == "__main__":
    sys.exit(main())

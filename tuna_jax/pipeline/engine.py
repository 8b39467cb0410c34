"""Running a plan: each stage is skipped when finished, resumed when interrupted, run again when changed.

For each stage instance, in plan order, its key is the hash of its kind, its resolved config (but for
cosmetic keys such as progress bars and logging intervals) and the hashes of the files it reads; a file
another stage writes is hashed like any other (see ``manifest.py``). Then:

* its manifest says ``finished`` with the same key and its outputs are there: skipped;
* its manifest says ``running`` (killed, stopped, failed) with the same key: run again in the same folder,
  where the kind resumes (``stages.py``: training from its last checkpoint, feedback from its store);
* otherwise (new, or an input or its config changed): the old folder is set aside as ``STAGE.previous``
  (the one before that is deleted) and the stage runs from scratch. A stage whose inputs changed makes
  new outputs, which change the keys of exactly the stages that read them.

``until`` (the file's ``until:`` unless given): only these stages (a stage name is all its instances) and
what they need. ``start``
(``--from``): these stages and everything downstream of them run again even if finished. Rows a stage
reads from its ``input`` are chosen by its ``select`` and written to ``STAGE/input.jsonl`` (each row
keeping its original row number as ``id`` when it has none), so the stage's folder shows what it read.
``OUTPUT_DIR/pipeline.json`` sums every stage's seconds over all the runs that made it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from typing import Sequence

from tuna_jax.config import ConfigError
from tuna_jax.io import paths
from tuna_jax.pipeline.manifest import FORMAT, VERSION, Attempt, Hasher, digest, read_manifest
from tuna_jax.pipeline.spec import Plan, load_plan, suggest
from tuna_jax.pipeline.stage import StageRun, input_paths


@dataclasses.dataclass
class Step:
    """What happened to one instance: ``action`` skipped | resumed | ran, and why."""

    id: str
    action: str
    reason: str
    seconds: float = 0.0


def _pick(plan: Plan, names: Sequence[str], option: str) -> list[str]:
    """The instance ids named by stage names or instance ids."""
    stages = {i.stage for i in plan.instances.values()}
    out = []
    for name in names:
        found = [i for i, inst in plan.instances.items() if name in (i, inst.stage)]
        if not found:
            raise ConfigError(f"{option} {name}: no such stage in {plan.source}{suggest(name, sorted(stages))}")
        out += found
    return out


class Runner:
    """Runs a :class:`Plan` (module docstring)."""

    def __init__(self, plan: Plan, progress: bool = True):
        self.plan, self.progress = plan, progress
        self.hasher = Hasher(paths.join(plan.output_dir, "hashes.json"))

    def say(self, message: str) -> None:
        print(f"[pipeline] {message}", file=sys.stderr, flush=True)

    def input_hash(self, path: str) -> str:
        """A stage folder output is named by how it was made (manifest.py); anything else by its content."""
        made = self.plan.produced.get(path)
        if made is not None and paths.is_dir(path):
            m = read_manifest(self.plan.stage_dir(made[0])) or {}
            return ((m.get("outputs") or {}).get(made[1]) or {}).get("sha256") or digest(["missing", path])
        return self.hasher.path(path)

    def identity(self, iid: str) -> tuple[dict, dict, str]:
        """(config, inputs, key) of an instance, its inputs hashed as they are now."""
        inst = self.plan.instances[iid]
        config = {**inst.kind.describe(inst.params), "select": inst.select}
        inputs = {field: {"path": p, "sha256": self.input_hash(p)} for field, p in input_paths(inst.kind, config)}
        keyed = _without(config, inst.kind.cosmetic)
        for field, p in input_paths(inst.kind, keyed):  # the key holds what a path holds, not where it is
            keyed = json.loads(json.dumps(keyed).replace(json.dumps(p), json.dumps("input:" + inputs[field]["sha256"])))
        return config, inputs, digest({"kind": inst.kind.name, "config": keyed,
                                       "inputs": sorted(v["sha256"] for v in inputs.values())})

    def check_inputs(self, ids: Sequence[str]) -> None:
        """Every file a stage reads that no stage writes must exist before anything runs."""
        for iid in ids:
            inst = self.plan.instances[iid]
            config = inst.kind.describe(inst.params)
            for field, p in input_paths(inst.kind, config):
                if p not in self.plan.produced and not p.startswith(("hf:", "tfds:")) and not paths.exists(p):
                    raise ConfigError(f"{inst.where}: stages.{inst.stage}: {field}={p}: no such file or folder")

    def run(self, until: Sequence[str] = (), start: Sequence[str] = ()) -> list[Step]:
        plan = self.plan
        ids = list(plan.instances)
        until = list(until) or plan.until
        if until:
            wanted = set(_pick(plan, until, "--until"))
            wanted |= {u for i in wanted for u in plan.upstream(i)}
            ids = [i for i in ids if i in wanted]
        forced = set(_pick(plan, start, "--from"))
        forced |= {d for i in forced for d in plan.downstream(i)}
        self.check_inputs(ids)
        paths.makedirs(plan.output_dir)
        if plan.compilation_cache:
            import jax

            jax.config.update("jax_compilation_cache_dir", plan.compilation_cache)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # small ones add up, stage by stage
        lock = contextlib.nullcontext()
        if not paths.is_remote(plan.output_dir):
            from tuna_jax.io.lock import OutputLock

            lock = OutputLock(os.path.join(plan.output_dir, "pipeline"))
        steps = []
        with lock:
            for iid in ids:
                steps.append(self.step(iid, iid in forced))
                self.hasher.save()
            self.write_summary()
        return steps

    def step(self, iid: str, forced: bool) -> Step:
        inst = self.plan.instances[iid]
        stage_dir = self.plan.stage_dir(iid)
        config, inputs, key = self.identity(iid)
        old = read_manifest(stage_dir)
        outputs = {name: paths.join(stage_dir, rel) for name, rel in inst.kind.outputs.items()}
        same = old is not None and old.get("key") == key and not forced
        if same and old.get("status") == "finished" and all(paths.exists(p) for p in outputs.values()):
            self.say(f"{iid}: done already")
            return Step(iid, "skipped", "finished, inputs and config unchanged")
        resume = same and old.get("status") != "finished"
        reason = "interrupted earlier: resuming" if resume else _why(old, config, inputs, forced)
        if not resume and paths.exists(stage_dir):
            _set_aside(stage_dir)
        paths.makedirs(stage_dir)
        self.say(f"{iid} ({inst.kind.name}): {reason}")
        manifest = {"format": FORMAT, "version": VERSION, "stage": iid, "kind": inst.kind.name, "status": "running",
                    "key": key, "config": config, "inputs": inputs, "outputs": {}, "metrics": {}, "error": None,
                    "attempts": (old or {}).get("attempts", 0) + 1 if resume else 1,
                    "seconds_before": round((old or {}).get("seconds_before", 0.0) + (old or {}).get("attempt_s", 0.0),
                                            2) if resume else 0.0}
        run = StageRun(stage_dir, inst, self.plan, self.progress, store=paths.join(self.plan.output_dir, "stores",
                                                                                   f"{iid}.jsonl"))
        try:
            with Attempt(stage_dir, manifest) as attempt:
                if inst.kind.selectable:
                    run.input = _selected_input(inst.params.input, inst.select, stage_dir)
                metrics = inst.kind.run(inst.params, run) or {}
                made = {name: {"path": inst.kind.outputs[name],
                               "sha256": digest([key, name]) if paths.is_dir(p) else self.hasher.path(p)}
                        for name, p in outputs.items()}
                attempt.finish(made, metrics)
        except BaseException as e:
            self.say(f"{iid}: stopped ({type(e).__name__}); the same command resumes it")
            raise
        self.say(f"{iid}: finished in {manifest['wall_s']:.1f}s ({manifest['total_s']:.1f}s over "
                 f"{manifest['attempts']} attempt(s))")
        return Step(iid, "resumed" if resume else "ran", reason, manifest["total_s"])

    def write_summary(self) -> dict:
        stages = {}
        for iid in self.plan.instances:
            m = read_manifest(self.plan.stage_dir(iid)) or {}
            stages[iid] = {"status": m.get("status", "not run"), "total_s": m.get("total_s", 0.0),
                           "metrics": m.get("metrics", {})}
        summary = {"pipeline": self.plan.name, "source": self.plan.source, "stages": stages,
                   "total_s": round(sum(s["total_s"] for s in stages.values()), 1)}
        paths.write_atomic(paths.join(self.plan.output_dir, "pipeline.json"), json.dumps(summary, indent=1) + "\n")
        return summary


def _without(config: dict, dotted: Sequence[str]) -> dict:
    out = json.loads(json.dumps(config, default=str))
    for key in dotted:
        *parents, last = key.split(".")
        node = out
        for k in parents:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return out


def _why(old: dict | None, config: dict, inputs: dict, forced: bool) -> str:
    if forced:
        return "running again (--from)"
    if old is None:
        return "running"
    changed = [k for k, v in inputs.items() if (old.get("inputs") or {}).get(k, {}).get("sha256") != v["sha256"]]
    if changed:
        return f"inputs changed ({', '.join(changed)}): running again"
    return "config changed: running again"


def _set_aside(stage_dir: str) -> None:
    """``STAGE`` -> ``STAGE.previous`` (locally; in object storage, where a rename is a copy, it is deleted)."""
    previous = stage_dir.rstrip("/") + ".previous"
    paths.rmtree(previous)
    if paths.is_remote(stage_dir):
        paths.rmtree(stage_dir)
    else:
        os.replace(stage_dir, previous)


def _selected_input(path: str, select: str | None, stage_dir: str) -> str:
    """The stage's input, or its selected rows written to ``STAGE/input.jsonl`` (original row numbers kept
    as ``id`` where a row has none)."""
    if select in (None, "all"):
        return path
    from tuna_jax.data.records import iter_rows
    from tuna_jax.data.select import Selection
    from tuna_jax.io.jsonl import dumps

    rows = Selection.parse(select).apply(list(enumerate(iter_rows(path))), path)
    out = paths.join(stage_dir, "input.jsonl")
    lines = []
    for n, (where, row) in rows:
        if isinstance(row, Exception):
            raise row
        lines.append(dumps({"id": n, **row} if isinstance(row, dict) and "id" not in row else row) + "\n")
    paths.write_atomic(out, "".join(lines))
    return out


def run_pipeline(path: str, overrides: Sequence[str] = (), *, until: Sequence[str] = (), start: Sequence[str] = (),
                 progress: bool = True) -> tuple[Plan, list[Step], dict]:
    """Load pipeline file ``path`` (+ ``KEY=VALUE`` overrides) and run it; returns (plan, steps, summary)."""
    plan = load_plan(path, overrides)
    runner = Runner(plan, progress)
    steps = runner.run(until, start)
    return plan, steps, runner.write_summary()

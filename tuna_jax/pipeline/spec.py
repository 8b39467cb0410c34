"""A pipeline file, read and checked into a plan: stage instances in the order they must run.

The file (YAML, read by ``config.read_yaml``: ``base:`` includes, and ``KEY=VALUE`` overrides)::

    name: tuna
    output_dir: runs/tuna-7b          # every stage writes into output_dir/STAGE/ (relative: to the cwd)
    inputs:                           # files from outside: named once, hashed by content
      alpaca: data/alpaca_data.json
    vars: {seeds: [0]}                # values the stages use as ${vars.NAME}; overridable
    until: [tuna_p]                   # optional: run only these stages and what they need (as --until)
    compilation_cache: xla-cache      # optional: XLA's persistent cache (in output_dir), so stages that
                                      # compile the same step (seeds, a method and its control) compile once
    stages:
      alpaca: {kind: train, config: ../alpaca_sft.yaml, set: {data.train: "${inputs.alpaca}"}}
      tuna_p:
        kind: train
        foreach: {seed: "${vars.seeds}"}     # one instance per value: tuna_p@seed=0, ...
        config: ../tuna_p.yaml
        set: {model.path: "${alpaca.model}", data.train: "${teacher.data}", train.seed: "${seed}"}

References, in any string of a stage: ``${inputs.NAME}``, ``${vars.NAME}``, ``${VAR}`` (this stage's
``foreach`` value), ``${assets}`` (the package's shipped files) and ``${STAGE.OUTPUT}``: the path of an
output of another stage (each kind names its outputs), which makes this stage depend on it. A reference to
a ``foreach`` stage picks the instance with the same values of the variables both stages share; the others
may be fixed as ``${STAGE[seed=1].OUTPUT}``; any left free give a list of paths (one per instance).

Keys every stage takes: ``kind``, ``foreach`` (variable -> list of values), ``select`` (kinds with an
``input`` file: which rows, ``data/select.py``) and ``allow_failures`` (teacher, judge and rerank stages:
finish even when some items failed). Everything else belongs to the kind (``stages.py``). Every mistake is
one line naming FILE:LINE and the key: an unknown kind or key, a reference to a stage or output that does
not exist, stages that depend on each other in a cycle.
"""
from __future__ import annotations

import dataclasses
import difflib
import itertools
import os
import re
from typing import Any, Sequence

from tuna_jax.config import ConfigError, Node, apply_overrides, build, read_yaml
from tuna_jax.io import paths

COMMON = ("kind", "foreach", "select", "allow_failures")  # keys of every stage, not of its kind
_REF = re.compile(r"\$\{([^}]*)\}")
_STAGE_REF = re.compile(r"([A-Za-z][\w-]*)(?:\[([^\]]*)\])?\.(\w+)")
_NAME = re.compile(r"[A-Za-z][\w-]*")
_VALUE = re.compile(r"[\w.+-]+")
RESERVED = ("inputs", "vars", "assets")


@dataclasses.dataclass
class PipelineFile:
    """The top level of a pipeline file (the stages are checked one by one, by their kind)."""

    stages: dict
    name: str = ""
    description: str = ""
    output_dir: str = "runs/pipeline"
    inputs: dict = dataclasses.field(default_factory=dict)
    vars: dict = dataclasses.field(default_factory=dict)
    compilation_cache: str | None = None  # XLA's persistent compilation cache, relative to output_dir
    until: list[str] = dataclasses.field(default_factory=list)  # run only these stages and what they need


@dataclasses.dataclass
class Instance:
    """One stage to run: ``id`` is the stage name, with ``@VAR=VALUE,...`` for a ``foreach`` stage."""

    id: str
    stage: str
    kind: Any  # stages.Kind
    vars: dict
    params: Any  # what kind.build made of the stage's keys
    select: str | None
    allow_failures: bool
    deps: list  # instance ids this one reads outputs of
    where: str  # FILE:LINE of the stage


@dataclasses.dataclass
class Plan:
    """A checked pipeline. ``instances`` in an order where every instance comes after the ones it reads
    from; ``produced`` maps each output path to ``(instance id, output name)``."""

    source: str
    name: str
    description: str
    output_dir: str
    instances: dict
    produced: dict
    compilation_cache: str | None = None
    until: list = dataclasses.field(default_factory=list)

    def stage_dir(self, instance_id: str) -> str:
        return paths.join(self.output_dir, instance_id)

    def upstream(self, instance_id: str) -> list[str]:
        """Every instance ``instance_id`` depends on, directly or not, in plan order."""
        seen: set[str] = set()
        todo = list(self.instances[instance_id].deps)
        while todo:
            d = todo.pop()
            if d not in seen:
                seen.add(d)
                todo.extend(self.instances[d].deps)
        return [i for i in self.instances if i in seen]

    def downstream(self, instance_id: str) -> list[str]:
        return [i for i in self.instances if instance_id in self.upstream(i)]


def suggest(name: str, options: Sequence[str]) -> str:
    """' (did you mean X?)' for the option closest to ``name``, or ''."""
    match = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {match[0]}?)" if match else ""


def _instances(name: str, foreach: dict) -> list[tuple[str, dict]]:
    """``(id, {var: value})`` of every combination of the foreach values, in order."""
    if not foreach:
        return [(name, {})]
    keys = list(foreach)
    out = []
    for combo in itertools.product(*(foreach[k] for k in keys)):
        values = dict(zip(keys, combo))
        out.append((f"{name}@" + ",".join(f"{k}={v}" for k, v in values.items()), values))
    return out


class _Resolver:
    """Replaces the ``${...}`` references in one instance's keys, collecting the instances it reads."""

    def __init__(self, plan_ids: dict, kinds: dict, output_dir: str, top: PipelineFile, values: dict, stage: str):
        self.plan_ids, self.kinds, self.output_dir = plan_ids, kinds, output_dir
        self.top, self.values, self.stage = top, values, stage
        self.deps: list[str] = []

    def lookup(self, text: str, where: str, key: str):
        if text in self.values:
            return self.values[text]
        if text == "assets":
            from tuna_jax.assets import ASSETS

            return str(ASSETS)
        head, _, rest = text.partition(".")
        if head in ("inputs", "vars"):
            table = getattr(self.top, head)
            if rest not in table:
                raise ConfigError(f"{where}: {key}: ${{{text}}}: no {head} entry {rest!r}{suggest(rest, table)}")
            return table[rest]
        m = _STAGE_REF.fullmatch(text)
        if m is None:
            raise ConfigError(f"{where}: {key}: ${{{text}}} is not a reference: write ${{inputs.NAME}}, "
                              f"${{vars.NAME}}, ${{STAGE.OUTPUT}} or a foreach variable of this stage")
        target, chosen, output = m.groups()
        if target not in self.plan_ids:
            raise ConfigError(f"{where}: {key}: ${{{text}}}: no stage {target!r}{suggest(target, self.plan_ids)}")
        kind = self.kinds[target]
        if output not in kind.outputs:
            raise ConfigError(f"{where}: {key}: ${{{text}}}: a {kind.name} stage has no output {output!r}; it has "
                              f"{', '.join(kind.outputs)}")
        fixed = {}
        for part in filter(None, (chosen or "").split(",")):
            var, _, value = part.partition("=")
            fixed[var.strip()] = value.strip()
        target_vars = set(self.plan_ids[target][0][1])
        if set(fixed) - target_vars:
            raise ConfigError(f"{where}: {key}: ${{{text}}}: stage {target!r} has no foreach variable "
                              f"{sorted(set(fixed) - target_vars)[0]!r}")
        shared = (target_vars & set(self.values)) - set(fixed)
        found = [iid for iid, ivars in self.plan_ids[target]
                 if all(str(ivars[k]) == v for k, v in fixed.items())
                 and all(str(ivars[k]) == str(self.values[k]) for k in shared)]
        if not found:
            raise ConfigError(f"{where}: {key}: ${{{text}}}: no instance of stage {target!r} matches")
        self.deps += [i for i in found if i not in self.deps]
        out = [paths.join(self.output_dir, i, kind.outputs[output]) for i in found]
        free = target_vars - set(fixed) - shared
        return out if free else out[0]

    def resolve(self, value, where: str, key: str):
        if isinstance(value, dict):
            node = Node(where=getattr(value, "where", where))
            for k, v in value.items():
                w = value.where_of(k) if isinstance(value, Node) else where
                node[k] = self.resolve(v, w, f"{key}.{k}" if key else str(k))
                node.origins[k] = w
            return node
        if isinstance(value, list):
            return [self.resolve(v, where, f"{key}[{i}]") for i, v in enumerate(value)]
        if not isinstance(value, str) or "${" not in value:
            return value
        whole = _REF.fullmatch(value)
        if whole:
            return self.lookup(whole.group(1).strip(), where, key)

        def one(m):
            v = self.lookup(m.group(1).strip(), where, key)
            if isinstance(v, (list, dict)):
                raise ConfigError(f"{where}: {key}: ${{{m.group(1)}}} is a list; it cannot be part of a string")
            return str(v)

        return _REF.sub(one, value)


def load_plan(path: str, overrides: Sequence[str] = (), kinds: dict | None = None) -> Plan:
    """Read, check and expand pipeline file ``path`` (+ ``KEY=VALUE`` overrides) into a :class:`Plan`."""
    if kinds is None:
        from tuna_jax.pipeline.stages import KINDS as kinds
    raw = read_yaml(path)
    apply_overrides(raw, overrides)
    top = build(PipelineFile, raw)
    stages = raw["stages"]
    if not isinstance(stages, Node) or not stages:
        raise ConfigError(f"{raw.where_of('stages')}: stages must be a mapping of stage names to stages")
    output_dir = os.path.abspath(top.output_dir) if not paths.is_remote(top.output_dir) else top.output_dir
    base_dir = paths.parent(path)

    stage_kinds, plan_ids = {}, {}
    for name, body in stages.items():
        where = stages.where_of(name)
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name in RESERVED:
            raise ConfigError(f"{where}: stage name {name!r}: use letters, digits, '_' and '-', starting with a "
                              f"letter (not {', '.join(RESERVED)})")
        if not isinstance(body, Node):
            raise ConfigError(f"{where}: stages.{name} must be a mapping with a kind")
        kind_name = body.get("kind")
        if kind_name not in kinds:
            raise ConfigError(f"{body.where_of('kind')}: stages.{name}.kind={kind_name!r}: unknown stage kind"
                              f"{suggest(str(kind_name), kinds)}; kinds: {', '.join(kinds)}")
        stage_kinds[name] = kinds[kind_name]
        foreach = _Resolver({}, {}, output_dir, top, {}, name).resolve(body.get("foreach") or {}, where, "foreach")
        if not isinstance(foreach, dict) or any(not isinstance(v, list) or not v or len(set(map(str, v))) != len(v)
                                                or not all(_VALUE.fullmatch(str(x)) for x in v)
                                                for v in foreach.values()):
            raise ConfigError(f"{body.where_of('foreach')}: stages.{name}.foreach: write a mapping of variable "
                              f"names to lists of distinct values made of letters, digits, '.', '_', '+' or '-' "
                              f"(they name folders), e.g. {{seed: [0, 1, 2]}}")
        plan_ids[name] = _instances(name, dict(foreach))

    instances = {}
    for name, body in stages.items():
        kind = stage_kinds[name]
        for iid, values in plan_ids[name]:
            r = _Resolver(plan_ids, stage_kinds, output_dir, top, values, name)
            own = Node({k: v for k, v in body.items() if k not in COMMON}, where=body.where)
            own.origins = {k: body.where_of(k) for k in own}
            resolved = r.resolve(own, body.where, f"stages.{name}")
            select = r.resolve(body.get("select"), body.where_of("select"), f"stages.{name}.select")
            if select is not None and not kind.selectable:
                raise ConfigError(f"{body.where_of('select')}: stages.{name}.select: a {kind.name} stage has no "
                                  f"input file to select from")
            if select is not None:
                from tuna_jax.data.select import Selection

                select = str(Selection.parse(select, body.where_of("select"), f"stages.{name}.select"))
            allow = body.get("allow_failures", False)
            if not isinstance(allow, bool):
                raise ConfigError(f"{body.where_of('allow_failures')}: stages.{name}.allow_failures: true or false")
            params = kind.build(resolved, f"stages.{name}", base_dir, paths.join(output_dir, iid))
            instances[iid] = Instance(iid, name, kind, values, params, select, allow, r.deps, body.where)
    order = _topological(instances, path)
    produced = {paths.join(output_dir, i.id, rel): (i.id, out) for i in order for out, rel in i.kind.outputs.items()}
    cache = paths.join(output_dir, top.compilation_cache) if top.compilation_cache else None
    return Plan(path, top.name, top.description, output_dir, {i.id: i for i in order}, produced, cache, top.until)


def _topological(instances: dict, path: str) -> list[Instance]:
    """Instances in file order, but each after those it reads; a cycle is an error."""
    done: list[Instance] = []
    placed: set[str] = set()
    pending = list(instances.values())
    while pending:
        ready = next((i for i in pending if all(d in placed for d in i.deps)), None)
        if ready is None:
            cycle = _find_cycle({i.id: i.deps for i in pending})
            raise ConfigError(f"{instances[cycle[0]].where}: stages {' -> '.join(cycle)} depend on each other in "
                              f"a cycle (each reads an output of the next)")
        done.append(ready)
        placed.add(ready.id)
        pending.remove(ready)
    return done


def _find_cycle(deps: dict) -> list[str]:
    """One cycle of the graph ``deps`` (id -> ids it reads), as ``[a, b, ..., a]``."""
    for start in deps:
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for d in deps.get(node, ()):
                if d == start:
                    return trail + [start]
                if d in deps and d not in seen:
                    seen.add(d)
                    stack.append((d, trail + [d]))
    return list(deps)[:1]

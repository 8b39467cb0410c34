"""Orbax checkpoints: params-only exports (this module's first half) and the train state
(second half, used by ``train.py``).

A params-only export is a folder::

    CKPT_DIR/
      config.json        the HF architecture config (what ``convert orbax-to-hf`` writes back)
      params/            Orbax StandardCheckpointer tree of the parameters (a pure dict)
      tokenizer.model ... tokenizer files, when the source had them

It is what ``convert hf-to-orbax`` writes, what a finished stage hands to the next, and what
``convert orbax-to-hf`` reads. It restores onto any mesh: the target shardings come from the
rules table, not from the mesh it was saved on.
"""
from __future__ import annotations

import json
import os
import pathlib

import jax
import orbax.checkpoint as ocp
from flax import nnx

from tuna_jax.model.convert import ConversionError, copy_tokenizer_files
from tuna_jax.model.llama import Llama, LlamaConfig, abstract_model
from tuna_jax.parallel import RULES, state_shardings


def is_params_dir(path: str | os.PathLike) -> bool:
    p = pathlib.Path(path)
    return (p / "params").is_dir() and (p / "config.json").is_file()


def save_params(path: str | os.PathLike, model: Llama, tokenizer_src: str | os.PathLike | None = None) -> pathlib.Path:
    """Write a params-only export of ``model`` (sharded arrays are written shard by shard)."""
    out = pathlib.Path(path).absolute()
    out.mkdir(parents=True, exist_ok=True)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(out / "params", params, force=True)
    ckptr.wait_until_finished()
    if jax.process_index() == 0:
        (out / "config.json").write_text(json.dumps(model.cfg.to_hf(), indent=2, sort_keys=True) + "\n")
        if tokenizer_src is not None:
            copy_tokenizer_files(tokenizer_src, out)
    return out


def load_params(path: str | os.PathLike, mesh: jax.sharding.Mesh | None = None, rules=RULES, **runtime) -> Llama:
    """Restore a params-only export as a ``Llama`` module, directly onto ``mesh`` (any shape)."""
    p = pathlib.Path(path).absolute()
    if not is_params_dir(p):
        raise ConversionError(f"{path}: not a tuna-jax params checkpoint (expected config.json and params/)")
    cfg = LlamaConfig.from_hf(json.loads((p / "config.json").read_text()), **runtime)
    graphdef, abs_state = nnx.split(abstract_model(cfg))
    if mesh is not None:
        abs_state = state_shardings_as_structs(abs_state, mesh, rules)
    target = nnx.to_pure_dict(abs_state)
    restored = ocp.StandardCheckpointer().restore(p / "params", target)
    nnx.replace_by_pure_dict(abs_state, restored)
    return nnx.merge(graphdef, abs_state)


def state_shardings_as_structs(abs_state: nnx.State, mesh, rules=RULES) -> nnx.State:
    """ShapeDtypeStructs carrying the rules-table sharding: an Orbax restore target."""
    shardings = state_shardings(abs_state, mesh, rules)
    return jax.tree.map(
        lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s.get_value())),
        abs_state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))


# ---- train state ------------------------------------------------------------------------

class TrainCheckpointer:
    """Orbax CheckpointManager for the train state.

    Each step folder holds ``state`` (params, optimizer state, step, RNG key data: one pytree,
    each array written shard by shard) and ``meta`` (JSON: the data iterator position and the
    run's bookkeeping). Saves are asynchronous (the step loop goes on while the previous save
    is written); the last ``keep`` are kept. A restore targets the *current* mesh's shardings,
    so a run saved on (1,8,1) resumes on (2,2,2) or one device.
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 2, async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict, force: bool = False) -> bool:
        return self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                               meta=ocp.args.JsonSave(meta)), force=force)

    def restore(self, abstract_state, step: int | None = None):
        """(state, meta) of ``step`` (default the latest) onto ``abstract_state``'s shardings."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to resume from")
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                 meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

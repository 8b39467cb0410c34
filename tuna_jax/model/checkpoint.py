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

``convert hf-to-orbax`` (:func:`convert_hf_to_params`) streams: each parameter is written to its
TensorStore array one piece at a time (one layer's HF tensor; a 64 MB row range of the embedding or
the head), so the host holds one piece, never the model -- on a CPU host a model on the "device"
would be in host memory too (LLaMA-2-7B in float32 is 27 GB; ``bench/convert_memory.py``). Its
leaves are stored as numpy arrays rather than ``jax.Array``s (no ``_sharding`` file); every restore
here passes target shardings, so both read the same.

Every folder here may be local or in cloud storage (``gs://...``): paths go through
:mod:`tuna_jax.io.paths` and reach Orbax as ``etils.epath`` paths, never through ``pathlib``.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from typing import Callable, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import nnx

from tuna_jax.io import paths
from tuna_jax.io.diskfull import disk_full_as_one_line
from tuna_jax.io.errors import InputError
from tuna_jax.io.jsonl import read_json
from tuna_jax.model.convert import ConversionError, copy_tokenizer_files, hf_param_blocks, open_hf_checkpoint
from tuna_jax.model.llama import Llama, LlamaConfig, abstract_model
from tuna_jax.parallel import RULES, state_shardings


def is_params_dir(path: str | os.PathLike) -> bool:
    return paths.is_dir(paths.join(path, "params")) and paths.is_file(paths.join(path, "config.json"))


def save_params(path: str | os.PathLike, model: Llama, tokenizer_src: str | os.PathLike | None = None):
    """Write a params-only export of ``model`` (sharded arrays are written shard by shard); returns its
    absolute ``etils.epath.Path``."""
    out = paths.resolve(path)
    paths.makedirs(out)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    ckptr = ocp.StandardCheckpointer()
    with disk_full_as_one_line(out, "the params export", sum(int(x.nbytes) for x in jax.tree.leaves(params))):
        ckptr.save(out / "params", params, force=True)
        ckptr.wait_until_finished()
    _write_config_and_tokenizer(out, model.cfg, tokenizer_src)
    return out


def _write_config_and_tokenizer(out, cfg: LlamaConfig, tokenizer_src) -> None:
    if jax.process_index() == 0:
        paths.write_atomic(out / "config.json", json.dumps(cfg.to_hf(), indent=2, sort_keys=True) + "\n")
        if tokenizer_src is not None:
            copy_tokenizer_files(tokenizer_src, out)


# ---- streaming a HF folder into a params-only export ------------------------------------

class StreamedArray:
    """A leaf that is never whole in memory: its shape, dtype, chunk shape and ``blocks()``, an
    iterator of (where, np.ndarray) pieces (``where`` a numpy index) that tile it on the chunk grid,
    each read when it is written. Deliberately no ``__array__``: nothing materialises it."""

    def __init__(self, shape: tuple[int, ...], dtype, chunks: tuple[int, ...], blocks: Callable[[], Iterator[tuple]]):
        self.shape, self.dtype, self.chunks, self.blocks = tuple(shape), np.dtype(dtype), tuple(chunks), blocks

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize


class _StreamedArrayHandler(ocp.type_handlers.NumpyHandler):
    """Orbax's numpy handler (its TensorStore specs, file layout, metadata; process 0 writes), but
    the arrays are written one at a time, block by block: Orbax writes every leaf of a tree at once
    and would need all of them in memory. Each block is whole chunks (the array's own chunk shape
    replaces Orbax's choice), so no chunk is written twice: OCDBT appends, a rewritten chunk would
    leave its old bytes in the files. One handler per save: its lock binds to that save's loop.

    It overrides Orbax's private ``_open_and_write``: should Orbax stop calling it, TensorStore gets a
    :class:`StreamedArray` (no ``__array__``) and the save fails; the tests would show it."""

    def __init__(self):
        super().__init__(deepcopy_host_arrays=False)
        self._lock: asyncio.Lock | None = None

    async def _open_and_write(self, value: StreamedArray, tspec, ts_context):
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if tspec.get("driver") != "zarr" or "chunks" not in tspec.get("metadata", {}):
                raise NotImplementedError(f"streamed save into a {tspec.get('driver')!r} array")  # zarr3: not used here
            tspec = {**tspec, "metadata": {**tspec["metadata"], "chunks": list(value.chunks)}}
            t = await ts.open(ts.Spec(tspec), create=True, open=True, context=ts_context)
            for where, block in value.blocks():
                # our block is never changed later: TensorStore may encode it without a copy
                await t[where].write(block, can_reference_source_data_indefinitely=True)
                del block


def save_params_streamed(path: str | os.PathLike, cfg: LlamaConfig, params: dict,
                         tokenizer_src: str | os.PathLike | None = None):
    """Write a params-only export whose leaves are :class:`StreamedArray` (the tree of
    ``nnx.to_pure_dict`` of the model's params), holding one block at a time."""
    out = paths.resolve(path)
    paths.makedirs(out)
    registry = ocp.type_handlers.create_type_handler_registry(
        (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)), (StreamedArray, _StreamedArrayHandler()))
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry))
    ckptr.save(out / "params", args=ocp.args.PyTreeSave(params), force=True)
    _write_config_and_tokenizer(out, cfg, tokenizer_src)
    return out


def convert_hf_to_params(hf_dir: str | os.PathLike, path: str | os.PathLike, **runtime) -> tuple:
    """``convert hf-to-orbax``: a HF folder -> a params-only export at ``path``, streamed (module
    docstring); the same export as ``save_params(path, load_hf_model(hf_dir, **runtime))``. Returns
    (its absolute ``etils.epath.Path``, the ``LlamaConfig``). ``runtime``: param_dtype (stored)."""
    cfg, index = open_hf_checkpoint(hf_dir, **runtime)
    params = nnx.to_pure_dict(nnx.state(abstract_model(cfg), nnx.Param))  # the tree save_params writes
    for key_path, shape, dtype, chunks, blocks in hf_param_blocks(index, cfg):
        parent = params
        for key in key_path[:-1]:
            parent = parent[key]
        want = parent[key_path[-1]]
        if (tuple(want.shape), np.dtype(want.dtype)) != (shape, dtype):  # a table bug, not bad input
            raise AssertionError(f"{key_path}: conversion gives {shape} {dtype}, the model has {want.shape} "
                                 f"{want.dtype}")
        parent[key_path[-1]] = StreamedArray(shape, dtype, chunks, blocks)
    missing = [p for p, v in nnx.traversals.flatten_mapping(params).items() if not isinstance(v, StreamedArray)]
    if missing:
        raise AssertionError(f"no conversion for parameter(s) {missing}")
    return save_params_streamed(path, cfg, params, tokenizer_src=hf_dir), cfg


def load_params(path: str | os.PathLike, mesh: jax.sharding.Mesh | None = None, rules=RULES, **runtime) -> Llama:
    """Restore a params-only export as a ``Llama`` module, directly onto ``mesh`` (any shape)."""
    p = paths.resolve(path)
    if not is_params_dir(p):
        raise ConversionError(f"{path}: not a tuna-jax params checkpoint (expected config.json and params/)")
    cfg = LlamaConfig.from_hf(read_json(p / "config.json"), **runtime)
    graphdef, abs_state = nnx.split(abstract_model(cfg))
    if mesh is not None:
        abs_state = state_shardings_as_structs(abs_state, mesh, rules)
    else:  # this process's first device: never the devices the export was saved from (another topology)
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abs_state = jax.tree.map(lambda v: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=one)), abs_state,
                                 is_leaf=lambda x: isinstance(x, nnx.Variable))
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

logger = logging.getLogger("tuna_jax.checkpoint")


def _reason(e: BaseException) -> str:
    """One short line for an Orbax / TensorStore error (they run to dozens of lines of spec)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}"


class TrainCheckpointer:
    """Orbax CheckpointManager for the train state.

    Each step folder holds ``state`` (params, optimizer state, step, RNG key data: one pytree,
    each array written shard by shard) and ``meta`` (JSON: the data iterator position and the
    run's bookkeeping). Saves are asynchronous (the step loop goes on while the previous save
    is written); the last ``keep`` are kept. A restore targets the *current* mesh's shardings,
    so a run saved on (1,8,1) resumes on (2,2,2) or one device.

    A damaged step never strands a run. A step folder can be left unreadable by a disk that filled
    up, a copy that was cut short, or a file deleted by hand (a missing ``_METADATA`` or ``meta/``, a
    truncated or deleted array file). :meth:`restore` then falls back to the newest step that restores,
    with a warning naming each bad folder, and renames the bad folders to ``<step>.unrestorable`` --
    kept for inspection, but out of Orbax's way: Orbax skips saving a step whose folder exists, so the
    resumed run would otherwise never write that step again and every later resume would trip on it.
    When no step restores, the error is one line naming the folder and what to do.
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 2, async_save: bool = True):
        self.directory = paths.resolve(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict, force: bool = False) -> bool:
        # A full disk surfaces here (the previous async save's error), in wait() or in close(): one line.
        self._saving = (step, sum(int(x.nbytes) for x in jax.tree.leaves(state) if hasattr(x, "nbytes")))
        with self._disk_full(f"checkpoint step {step}"):
            return self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                                   meta=ocp.args.JsonSave(meta)), force=force)

    def _disk_full(self, what: str):
        """ENOSPC/EDQUOT as one line naming the folder, the checkpoint being written, its size and the
        newest complete step, which ``--resume`` restores."""
        nbytes = getattr(self, "_saving", (None, None))[1]

        def hint(e: BaseException) -> str:
            done = sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())
            return f" with --resume (restores step {done[-1]})" if done else " (no checkpoint was completed)"

        def writing(e: BaseException) -> str:  # the step whose files failed, named in TensorStore's message
            failed = re.search(r"/(\d+)\.orbax-checkpoint-tmp", str(e))
            return what if failed is None else f"checkpoint step {failed[1]}"

        return disk_full_as_one_line(self.directory, writing, nbytes, hint)

    def _restore_step(self, step: int, abstract_state):
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                 meta=ocp.args.JsonRestore()))
        meta = out["meta"]
        if not isinstance(meta, dict) or "data" not in meta:
            raise ValueError("meta/ holds no data-iterator position")
        return out["state"], meta

    def restore(self, abstract_state, step: int | None = None):
        """(state, meta) onto ``abstract_state``'s shardings: of ``step`` if given, else of the newest step
        that restores (see the class docstring). Raises InputError naming the folder when none does."""
        if step is not None:
            try:
                return self._restore_step(step, abstract_state)
            except Exception as e:  # noqa: BLE001 - Orbax and TensorStore raise many types for one damaged folder
                raise InputError(str(self.directory / str(step)), None,
                                 f"checkpoint step {step} cannot be restored ({_reason(e)})") from e
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to resume from")
        bad: list[tuple[int, str]] = []
        for s in steps:
            try:
                state, meta = self._restore_step(s, abstract_state)
            except Exception as e:  # noqa: BLE001 - see above
                bad.append((s, _reason(e)))
                logger.warning("checkpoint %s cannot be restored (%s); trying the step before it",
                               self.directory / str(s), bad[-1][1])
                continue
            if bad:
                moved = self._set_aside([b for b, _ in bad])
                logger.warning("resuming from step %d, the newest step that restores; the damaged step folder(s) "
                               "were renamed: %s", s, ", ".join(moved))
            return state, meta
        first, why = bad[0]
        raise InputError(str(self.directory / str(first)), None,
                         f"no checkpoint step in {self.directory} can be restored (steps {[b for b, _ in bad]}; "
                         f"step {first}: {why}); move the damaged step folders out of {self.directory}, or start "
                         f"again without --resume in a new output directory")

    def _set_aside(self, steps: list[int]) -> list[str]:
        """Rename the folders of ``steps`` to ``<step>.unrestorable`` (process 0 of a multi-host run; the
        others wait for it) and make the manager forget them."""
        moved = []
        if jax.process_index() == 0:
            for s in steps:
                src = self.directory / str(s)
                dst = self.directory / f"{s}.unrestorable"
                k = 1
                while dst.exists():
                    k += 1
                    dst = self.directory / f"{s}.unrestorable{k}"
                src.rename(dst)  # in object storage: a copy of each object, then a delete
                moved.append(f"{src} -> {dst.name}")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("tuna_jax_checkpoint_set_aside")
        self.manager.reload()
        return moved

    def wait(self) -> None:
        with self._disk_full("a checkpoint"):
            self.manager.wait_until_finished()

    def close(self) -> None:
        with self._disk_full("a checkpoint"):
            self.manager.wait_until_finished()
        self.manager.close()

"""The proxy ranking model (PRM): a LLaMA backbone with a scalar reward head, and its folder format.

r(i, c) = w . h_last + b, where h_last [D] is the backbone's final-norm hidden state at the LAST
real token of ``[BOS] + prompt + response + [EOS]`` -- the EOS, i.e. after the model has read the
whole response -- and (w [D], b []) is the head. The backbone's LM head is unused.

Parameters are one pure dict ``{"backbone": Llama params, "head": {"w": [D], "b": [1]}}``: the
trainer (``train.mode=prm``) trains them like any other, and :class:`ProxyRankingModel` holds a
trained one for re-ranking. Saved folder::

    prm.json            {"format": "tuna-jax-prm", "version": 1, "base_model", "max_len", "add_bos",
                         "add_eos", "hidden_size", "train": {settings}, "metrics": {...}}
    head.safetensors    w float32 [D], b float32 [1]
    backbone/           a params-only export (``model.checkpoint.save_params``) with the tokenizer files

``backbone/`` is an ordinary tuna-jax checkpoint: ``convert orbax-to-hf`` and every other command read it.
"""
from __future__ import annotations

import json
import math
import os
from typing import Sequence

from tuna_jax.io import paths
from tuna_jax.model.params import ParamBinder

PRM_FORMAT, PRM_VERSION = "tuna-jax-prm", 1


def eval_summary(metrics: dict | None) -> dict | None:
    """The held-out figures a PRM keeps: {"loss", "pair_accuracy", "pairs"} of a trainer eval record."""
    if metrics is None:
        return None
    return {"loss": metrics["loss"], "pair_accuracy": metrics["pair_accuracy"], "pairs": int(metrics["pairs"])}


def layout_rewards(model, head: dict, batch: dict, slots: int):
    """Rewards of every sequence of a layout batch (:mod:`tuna_jax.data.layouts`): the head on the
    hidden state of each sequence's last token (its EOS), whatever the layout.

    model: the bound backbone ``Llama``; head {"w" [D], "b" [1]}. Returns rewards [B, slots] float32
    (0 where an example has no such sequence)."""
    import jax.numpy as jnp

    u, q, length = batch["input_ids"].shape
    flat = lambda x: x.reshape(u * q, length)  # noqa: E731
    branch = batch.get("branch_ids")
    blocks = batch.get("kv_blocks")
    hidden, _ = model.hidden_states(flat(batch["input_ids"]), flat(batch["positions"]), flat(batch["segment_ids"]),
                                    None if branch is None else flat(branch),
                                    kv_blocks=None if blocks is None else blocks.reshape((u * q,) + blocks.shape[2:]))
    e = batch["unit_example"].shape[1]
    onehot = batch["score_slot"][..., None] == jnp.arange(e * slots)  # [U, S, E*slots]
    # A sequence's tokens sit at increasing positions: its last token is the largest position.
    last = jnp.max(jnp.where(onehot, batch["score_pos"][..., None], -1), axis=1)  # [U, E*slots]
    h = jnp.take_along_axis(hidden.reshape(u, q * length, -1), jnp.maximum(last, 0)[..., None], axis=1)
    r = jnp.where(last >= 0, h.astype(jnp.float32) @ head["w"] + head["b"][0], 0.0)  # [U, E*slots]
    b = batch["example_mask"].shape[0]
    to_example = (batch["unit_example"][..., None] == jnp.arange(b)).astype(jnp.float32)  # [U, E, B]
    return jnp.einsum("uek,ueb->bk", r.reshape(u, e, slots), to_example)


def reward_fn(binder):
    """``f(params, input_ids, positions, segment_ids) -> rewards [M] float32`` for right-padded rows [M, L];
    params = {"backbone": Llama params (pure dict), "head": {"w": [D], "b": [1]}}."""
    import jax.numpy as jnp

    def f(params, input_ids, positions, segment_ids):
        model = binder.bind(params["backbone"])
        hidden, _ = model.hidden_states(input_ids, positions, segment_ids)  # [M, L, D]
        # Right padding: the last real token (the EOS) is at (number of real tokens - 1). An all-padding
        # row (a missing candidate) reads position 0; its reward is masked out by the caller.
        last = jnp.maximum(jnp.sum(segment_ids > 0, axis=-1) - 1, 0)
        h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)  # [M, D]
        return h @ params["head"]["w"] + params["head"]["b"][0]

    return f


_REWARD_JITS: dict = {}


def _reward_jit(binder):
    """The jitted ``reward_fn`` per architecture, shared by every PRM object of it (a saved and a reloaded
    PRM compile once: compiles dominate on CPU)."""
    import jax

    key = repr(binder.cfg)
    if key not in _REWARD_JITS:
        _REWARD_JITS[key] = jax.jit(reward_fn(binder))
    return _REWARD_JITS[key]


def init_head(hidden_size: int, seed: int = 0) -> dict:
    """w ~ N(0, 1/D) (rewards start at unit scale, ranked at random), b = 0; numpy, so no PRNG compile."""
    import numpy as np

    rng = np.random.default_rng([seed, 7919])
    return {"w": rng.normal(0.0, 1.0 / math.sqrt(hidden_size), (hidden_size,)).astype(np.float32),
            "b": np.zeros((1,), np.float32)}


class ProxyRankingModel:
    """A PRM: ``params`` ({"backbone": pure dict, "head": {"w" [D], "b" [1]}}), the backbone's ``LlamaConfig``,
    ``meta`` (prm.json without its format fields), the mesh it lives on and the folder it was loaded from
    (``path``, None when built in memory). ``rewards(rows)`` scores token rows; ``save``/``load``."""

    def __init__(self, params: dict, cfg, meta: dict, mesh=None, path: str | None = None):
        self.params, self.cfg, self.meta, self.mesh, self.path = params, cfg, meta, mesh, path
        self.binder = ParamBinder(cfg)

    @classmethod
    def from_backbone(cls, model, head: dict, meta: dict, mesh=None, path: str | None = None) -> "ProxyRankingModel":
        """From a loaded ``Llama`` and head arrays (replicated over ``mesh``: D floats)."""
        import jax
        from flax import nnx

        where = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()) if mesh is not None else None
        head = {k: jax.device_put(v, where) for k, v in head.items()}
        return cls({"backbone": nnx.to_pure_dict(nnx.state(model, nnx.Param)), "head": head}, model.cfg, meta, mesh,
                   path)

    def rewards(self, rows: Sequence[Sequence[int]], batch_rows: int = 8, max_len: int | None = None) -> list[float]:
        """rows: full token sequences ([BOS] + prompt + response + [EOS]) -> one reward each. Rows are
        sorted by length and right-padded to a bucketed length (few compiled shapes). Multi-host: every
        host calls it with the same rows and gets every reward."""
        from tuna_jax import parallel
        from tuna_jax.data.shapes import bucket_length

        fn = _reward_jit(self.binder)
        limit = max_len or self.cfg.max_position_embeddings
        n_data = 1 if self.mesh is None else self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        batch_rows = -(-batch_rows // n_data) * n_data
        out: list[float | None] = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        for s in range(0, len(order), batch_rows):
            idx = order[s:s + batch_rows]
            longest = max(len(rows[i]) for i in idx)
            if longest > limit:
                raise ValueError(f"a sequence of {longest} tokens exceeds max_len={limit}")
            batch = _right_padded([rows[i] for i in idx], batch_rows, min(bucket_length(longest), limit))
            # Every host holds the whole batch (as tuna_jax.scoring does): each places its own shards.
            arrays = parallel.put_global_batch(batch, self.mesh) if self.mesh is not None else batch
            r = parallel.to_host(fn(self.params, arrays["input_ids"], arrays["positions"], arrays["segment_ids"]))
            for j, i in enumerate(idx):
                out[i] = float(r[j])
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ folder format
    def save(self, path: str | os.PathLike, tokenizer_src: str | os.PathLike | None = None):
        """Write ``path/`` (module docstring; local or gs://): backbone export, head.safetensors, prm.json."""
        import jax
        import numpy as np
        from safetensors.numpy import save

        from tuna_jax.model.checkpoint import save_params

        out = paths.resolve(path)
        paths.makedirs(out)
        save_params(out / "backbone", self.binder.bind(self.params["backbone"]), tokenizer_src=tokenizer_src)
        if jax.process_index() == 0:
            head = {k: np.asarray(jax.device_get(v), np.float32) for k, v in self.params["head"].items()}
            paths.write_atomic(out / "head.safetensors", save(head))
            meta = {"format": PRM_FORMAT, "version": PRM_VERSION, "hidden_size": self.cfg.hidden_size, **self.meta}
            paths.write_atomic(out / "prm.json", json.dumps(meta, indent=1, sort_keys=True) + "\n")
        return out

    @classmethod
    def load(cls, path: str | os.PathLike, mesh=None, dtype: str = "float32") -> "ProxyRankingModel":
        """Restore a saved PRM folder onto ``mesh`` (any shape; the head is replicated)."""
        import numpy as np
        from safetensors.numpy import load

        from tuna_jax.model.checkpoint import load_params

        p = paths.resolve(path)
        if not paths.is_file(p / "prm.json") and paths.is_file(p / "final" / "prm.json"):
            p = p / "final"  # a PRM run's train.output_dir: its export
        meta_path = p / "prm.json"
        if not paths.is_file(meta_path):
            raise FileNotFoundError(f"{path}: not a tuna-jax PRM folder (no prm.json; a train.mode=prm run writes one "
                                    f"to train.output_dir/final)")
        meta = json.loads(paths.read_text(meta_path))
        if meta.get("format") != PRM_FORMAT or meta.get("version") != PRM_VERSION:
            raise ValueError(f"{meta_path}: format {meta.get('format')!r} version {meta.get('version')!r}; expected "
                             f"{PRM_FORMAT!r} version {PRM_VERSION}")
        head = load(paths.read_bytes(p / "head.safetensors"))
        backbone = load_params(p / "backbone", mesh, dtype=dtype, param_dtype="float32")
        d = backbone.cfg.hidden_size
        if set(head) != {"w", "b"} or head["w"].shape != (d,) or head["b"].shape != (1,):
            raise ValueError(f"{p / 'head.safetensors'}: expected w [{d}] and b [1], got "
                             f"{ {k: v.shape for k, v in head.items()} }")
        meta = {k: v for k, v in meta.items() if k not in ("format", "version", "hidden_size")}
        return cls.from_backbone(backbone, {k: np.asarray(v, np.float32) for k, v in head.items()}, meta, mesh,
                                 str(p))


def _right_padded(rows: Sequence[Sequence[int]], batch_rows: int, length: int) -> dict:
    """Token rows -> right-padded ``input_ids, positions, segment_ids`` [batch_rows, length] (missing rows
    are all padding)."""
    import numpy as np

    ids = np.zeros((batch_rows, length), np.int32)
    seg, pos = np.zeros_like(ids), np.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, :len(row)], seg[r, :len(row)], pos[r, :len(row)] = row, 1, np.arange(len(row))
    return {"input_ids": ids, "positions": pos, "segment_ids": seg}

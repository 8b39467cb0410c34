"""Pure parameter dicts <-> the ``Llama`` module.

The train step, Orbax and optax work on a pure nested dict of arrays; inside a traced function
``ParamBinder.bind(params)`` rebuilds the module around those arrays (no copies)."""
from __future__ import annotations

import jax
from flax import nnx

from tuna_jax.model.llama import Llama, LlamaConfig, abstract_model


class ParamBinder:
    """``bind(params) -> Llama`` for one architecture; ``to_pure(model) -> params``."""

    def __init__(self, cfg: LlamaConfig):
        self.cfg = cfg
        self.graphdef, abs_state = nnx.split(abstract_model(cfg))
        self.treedef = jax.tree.structure(abs_state)

    def bind(self, params: dict) -> Llama:
        leaves = jax.tree.leaves(params)
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, leaves))

    @staticmethod
    def to_pure(model: Llama) -> dict:
        return nnx.to_pure_dict(nnx.state(model, nnx.Param))

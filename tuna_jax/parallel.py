"""Device mesh, the one logical-axis rules table, sharded init and placement, multi-host start-up.

Sharding is declared once, by name (MaxText style): every parameter carries ``logical_axes``
metadata (see ``model/llama.py``) and activations are constrained with logical names through
:func:`constrain`; :data:`RULES` maps each logical name to mesh axes. Nothing else in the
project writes a PartitionSpec by hand.

Mesh axes: ``data`` (pure data parallel: parameters replicated), ``fsdp`` (data parallel with
parameters, gradients and optimizer state sharded, ZeRO-3 style) and ``tensor`` (Megatron
tensor parallel over heads and MLP width). The batch is split over ``data`` x ``fsdp``.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Iterable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated). The only table.
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("length", None),
    ("act_embed", None),
)


def parse_mesh_shape(spec: str | Sequence[int] | None, num_devices: int | None = None) -> tuple[int, int, int]:
    """"DATA,FSDP,TENSOR" (one entry may be -1 = the rest) -> a shape whose product is the
    device count. None means every device on fsdp."""
    n = num_devices or jax.device_count()
    if spec is None:
        return (1, n, 1)
    sizes = [int(s) for s in spec.split(",")] if isinstance(spec, str) else [int(s) for s in spec]
    if len(sizes) != 3:
        raise ValueError(f"mesh {spec!r}: give three sizes DATA,FSDP,TENSOR (e.g. 1,-1,1)")
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh {spec!r}: sizes must be positive, with at most one -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known:
            raise ValueError(f"mesh {spec!r}: {n} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ValueError(f"mesh {spec!r} has {math.prod(sizes)} slots but there are {n} devices")
    return tuple(sizes)


def make_mesh(spec: str | Sequence[int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh with Auto axes (classic GSPMD propagation)."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = parse_mesh_shape(spec, len(devices))
    if devices == jax.devices():
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def logical_to_spec(logical: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None, rules: Iterable = RULES) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec through the rules table.

    A mesh axis is used at most once per array (the first logical axis that claims it wins).
    When ``shape`` and ``mesh`` are given, a dimension that the mesh axes do not divide is
    replicated instead (e.g. 1 kv head on tensor=2): correct, just not split.
    """
    table = dict(rules)
    used: set[str] = set()
    out = []
    for i, name in enumerate(logical):
        if name is not None and name not in table:
            raise KeyError(f"logical axis {name!r} has no rule in parallel.RULES")
        target = table.get(name) if name is not None else None
        axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        axes = tuple(a for a in axes if a not in used)
        if mesh is not None:
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
            if shape is not None and axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
                axes = ()
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Iterable = RULES):
    """NamedSharding for every variable of an (abstract or concrete) nnx.State, same tree."""
    rules = tuple(rules)

    def one(var):
        axes = var.get_metadata().get("logical_axes")
        shape = var.shape if hasattr(var, "shape") else np.shape(var[...])
        spec = PartitionSpec() if axes is None else logical_to_spec(axes, shape, mesh, rules)
        return var.replace(NamedSharding(mesh, spec))

    return jax.tree.map(one, state, is_leaf=_is_var)


def init_sharded(make_module, mesh: Mesh, rules: Iterable = RULES):
    """Build ``make_module()`` (e.g. ``lambda: Llama(cfg, nnx.Rngs(seed))``) directly sharded:
    the parameters are created under jit with out_shardings, so no device ever holds the
    whole model. Returns the module."""
    abstract = nnx.eval_shape(make_module)
    graphdef, abs_state = nnx.split(abstract)
    shardings = state_shardings(abs_state, mesh, rules)
    state = jax.jit(lambda: nnx.state(make_module()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def place_state(state: nnx.State, mesh: Mesh, rules: Iterable = RULES) -> nnx.State:
    """Put existing (host or device) values of a state onto the mesh by the rules table."""
    shardings = state_shardings(state, mesh, rules)
    return jax.tree.map(lambda v, s: v.replace(jax.device_put(v.get_value(), s.get_value())), state, shardings,
                        is_leaf=_is_var)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Sharding of a batch array [B, ...]: B over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), mesh=mesh))


def check_batch_divisible(global_batch: int, mesh: Mesh) -> None:
    """A batch the data axes do not divide is an error, never silently replicated."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch % n:
        raise ValueError(f"global batch {global_batch} is not divisible by data x fsdp = {n} devices "
                         f"(mesh {dict(mesh.shape)}); change the batch size or the mesh")


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host batch -> global device arrays split on the batch axis.

    Single-host: ``batch`` is the global batch. Multi-host: ``batch`` is this host's slice
    (hosts load only their own rows) and the global array is assembled from the slices."""
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        sharding = batch_sharding(mesh, value.ndim)
        if jax.process_count() == 1:
            check_batch_divisible(value.shape[0], mesh)
            out[key] = jax.device_put(value, sharding)
        else:
            global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
            check_batch_divisible(global_shape[0], mesh)
            out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out


def put_global_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host batch -> device arrays split on the batch axis, when every host holds the WHOLE batch
    (inference: ``score``, ``generate``): each host places only the shards its devices own, so the
    rows are computed data-parallel across hosts on the global mesh. Training instead loads only
    each host's rows (:func:`shard_batch`)."""
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        check_batch_divisible(value.shape[0], mesh)
        sharding = batch_sharding(mesh, value.ndim)
        out[key] = jax.make_array_from_callback(value.shape, sharding, lambda idx, v=value: v[idx])
    return out


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of ``x`` as a NumPy array on every host (all hosts must call it together
    when ``x`` spans other hosts' devices: it is then an all-gather)."""
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def sync_hosts(name: str) -> None:
    """A barrier across hosts (every host must reach it with the same ``name``); nothing on one host."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def host_value(value: int, mesh: Mesh) -> jax.Array:
    """An int32 array with one entry per mesh device, each host filling its own devices' entries with its
    ``value``; a reduction over it inside a jitted step (``jnp.max``) tells every host what any host had,
    riding on the step's own collectives: no extra host round trip. See ``train.py``'s stop agreement."""
    flat = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
    n = mesh.devices.size
    return jax.make_array_from_callback(
        (n,), flat, lambda idx: np.full(len(range(*idx[0].indices(n))), value, np.int32))


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical names under the mesh set with ``jax.set_mesh``;
    a no-op when no mesh is set (single device, tests)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical, x.shape, mesh))


def initialize_distributed() -> None:
    """Multi-host start-up. On Cloud TPU VMs and SLURM/Open MPI clusters jax finds the
    coordinator itself; elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
    JAX_PROCESS_ID (see launch/README.md). A single process does nothing."""
    explicit = os.environ.get("JAX_COORDINATOR_ADDRESS")
    auto = any(k in os.environ for k in ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE"))
    if not explicit and not auto:
        return
    if explicit:
        jax.distributed.initialize(coordinator_address=explicit,
                                   num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                                   process_id=int(os.environ["JAX_PROCESS_ID"]))
    else:
        jax.distributed.initialize()
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())

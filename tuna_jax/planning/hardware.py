"""The machines `tuna-jax plan` knows: chips (memory, peak bf16 FLOP/s) and the slices users rent.

A target is one of:

* a Cloud TPU slice by its rental name, ``v4-32``, ``v5e-16``, ``v5p-8``, ``v6e-8`` ...: compiled
  ahead of time for its topology (``jax.experimental.topologies.get_topology_desc``, needs libtpu:
  ``pip install -e ".[plan]"``). v4 and v5p names count TensorCores (two per chip: v4-32 is 16
  chips), v5e and v6e names count chips, as Google's do. The topology table is MaxText's
  (``accelerator_to_spec_map.py``).
* ``gpu``: the GPUs of this machine, compiled for them.
* ``h100:8``, ``h200:8``, ``a100-80g:8``, ``a100-40g:8``: GPUs this machine does not have: an
  analytic estimate only (``planning/estimate.py``), never a compile.
* ``cpu:N``: N CPU devices of this process (the tests' 8 fake devices), compiled.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator: its memory (bytes, what the compiler may use) and peak dense bf16 FLOP/s."""

    name: str
    hbm_bytes: int
    peak_flops: float | None  # None: unknown (CPU); no step time is estimated


# HBM per chip: TPU figures are Google's per-chip HBM; GPU figures are what nvidia-smi reports as the
# card's memory (H100 SXM 81,559 MiB, H200 143,771 MiB, A100 40,960 / 81,920 MiB). Peaks: dense bf16.
CHIPS = {
    "v4": Chip("TPU v4", 32 * GiB, 275e12),
    "v5e": Chip("TPU v5e", 16 * GiB, 197e12),
    "v5p": Chip("TPU v5p", 95 * GiB, 459e12),
    "v6e": Chip("TPU v6e", 32 * GiB, 918e12),
    "h100": Chip("NVIDIA H100", 81559 * 2**20, 989e12),
    "h200": Chip("NVIDIA H200", 143771 * 2**20, 989e12),
    "a100-80g": Chip("NVIDIA A100 80GB", 81920 * 2**20, 312e12),
    "a100-40g": Chip("NVIDIA A100 40GB", 40960 * 2**20, 312e12),
}

# What launch/gpu_local.sh and gpu_slurm.sbatch let jax take of a GPU (XLA_PYTHON_CLIENT_MEM_FRACTION).
GPU_MEM_FRACTION = 0.92

# Rental name -> (topology name for get_topology_desc, chip_config_name, wrap). Chips per host are
# (2, 2, 1) on every generation here. From MaxText's accelerator_to_spec_map.py.
_NOWRAP, _WRAP3 = (False, False, False), (True, True, True)
TPU_SLICES = {
    **{f"v4-{n}": (f"v4:{t}", "megacore", w) for n, t, w in [
        (8, "2x2x1", _NOWRAP), (16, "2x2x2", _NOWRAP), (32, "2x2x4", _NOWRAP), (64, "2x4x4", _NOWRAP),
        (128, "4x4x4", _WRAP3)]},
    **{f"v5p-{n}": (f"v5:{t}", "megacore", w) for n, t, w in [
        (8, "2x2x1", _NOWRAP), (16, "2x2x2", _NOWRAP), (32, "2x2x4", _NOWRAP), (64, "2x4x4", _NOWRAP),
        (128, "4x4x4", _WRAP3)]},
    **{f"{g}-{n}": (f"{g}:{t}", "default", w) for g in ("v5e", "v6e") for n, t, w in [
        (4, "2x2", _NOWRAP), (8, "2x4", _NOWRAP), (16, "4x4", _NOWRAP), (32, "4x8", _NOWRAP),
        (64, "8x8", _NOWRAP), (128, "8x16", (False, True, False)), (256, "16x16", (True, True, False))]},
}


class TargetError(ValueError):
    """A --topology the planner cannot use (unknown name, libtpu missing, no such devices)."""


@dataclasses.dataclass
class Target:
    """What a plan is for: ``kind`` "tpu" | "gpu" | "cpu" (compiled) or "estimate" (analytic only);
    ``devices``: the jax devices to compile for (None for an estimate); ``chips``: how many."""

    name: str
    kind: str
    chip: Chip
    chips: int
    devices: list | None = None
    hosts: int = 1  # processes the devices belong to (each host loads and packs its own rows)

    @property
    def platform(self) -> str:
        """The platform whose defaults `tuna-jax train` would take there (layout, attention)."""
        return "gpu" if self.kind == "estimate" else self.kind

    @property
    def compiled(self) -> bool:
        return self.kind != "estimate"


def names() -> list[str]:
    return [*TPU_SLICES, "gpu", *(f"{g}:N" for g in CHIPS if not g.startswith("v")), "cpu:N"]


def resolve(name: str, hbm_gib: float | None = None) -> Target:
    """The Target of a --topology value; ``hbm_gib`` replaces the chip's memory (what-if, tests)."""
    name = name.strip().lower()
    target = _tpu(name) if name in TPU_SLICES else _gpu_local() if name == "gpu" else _counted(name)
    if hbm_gib is not None:
        target.chip = dataclasses.replace(target.chip, hbm_bytes=int(hbm_gib * GiB))
    return target


def _tpu(name: str) -> Target:
    import importlib.util

    topology, chip_config, wrap = TPU_SLICES[name]
    if importlib.util.find_spec("libtpu") is None:
        raise TargetError(f"--topology {name}: compiling for a TPU needs libtpu: pip install -e \".[plan]\" "
                          "(jax[tpu] of this jax version); without it: --topology cpu:N or an estimate such as h100:8")
    # libtpu takes /tmp/libtpu_lockfile for the process that owns the TPU chips; a plan owns none (it only
    # compiles), so two plans, or a plan beside a training run on a TPU VM, may load it side by side.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental.topologies import get_topology_desc

    try:
        with _stderr_silenced():  # libtpu warns about the TPU hosts this machine does not have
            devices = get_topology_desc(platform="tpu", topology_name=topology, chip_config_name=chip_config,
                                        chips_per_host_bounds=(2, 2, 1), wrap=wrap).devices
    except Exception as e:  # jax's runtime errors are not ValueErrors: say it in one line
        raise TargetError(f"--topology {name}: libtpu could not describe {topology}: "
                          f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    hosts = len({d.process_index for d in devices})
    return Target(name, "tpu", CHIPS[name.split("-")[0]], len(devices), list(devices), hosts)


@contextlib.contextmanager
def _stderr_silenced():
    """File descriptor 2 to /dev/null for the block: libtpu's C++ start-up logging bypasses Python."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _gpu_local() -> Target:
    import jax

    try:
        devices = jax.devices("gpu")
    except RuntimeError:
        devices = []
    if not devices:
        raise TargetError("--topology gpu: this machine has no GPU visible to jax; for an analytic estimate "
                          "name the GPUs, e.g. --topology h100:8")
    kind = devices[0].device_kind.lower()
    key = next((k for k in ("h200", "h100", "a100") if k in kind), None)
    stats = devices[0].memory_stats() or {}
    hbm = int(stats.get("bytes_limit") or 0)
    if key == "a100":
        key = "a100-80g" if hbm > 48 * GiB else "a100-40g"
    chip = CHIPS.get(key) or Chip(devices[0].device_kind, hbm, None)
    if hbm:  # what this process may really allocate (XLA's preallocation fraction included)
        chip = dataclasses.replace(chip, hbm_bytes=hbm)
    return Target("gpu", "gpu", chip, len(devices), list(devices))


def _counted(name: str) -> Target:
    m = re.fullmatch(r"([a-z0-9-]+):(\d+)", name)
    if not m or int(m.group(2)) < 1:
        raise TargetError(f"--topology {name!r}: choose one of {', '.join(names())}")
    kind, n = m.group(1), int(m.group(2))
    if kind == "cpu":
        return Target(name, "cpu", _cpu_chip(n), n, cpu_devices(n))
    if kind in CHIPS and not kind.startswith("v"):
        chip = CHIPS[kind]  # jax on a GPU takes XLA_PYTHON_CLIENT_MEM_FRACTION of it (launch/gpu_*.sh: 0.92)
        fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_MEM_FRACTION))
        chip = dataclasses.replace(chip, name=f"{chip.name} ({fraction:.0%} for jax)",
                                   hbm_bytes=int(chip.hbm_bytes * fraction))
        return Target(name, "estimate", chip, n)
    raise TargetError(f"--topology {name!r}: choose one of {', '.join(names())}")


def _cpu_chip(n: int) -> Chip:
    """A CPU 'device' of ``cpu:N``: the host's memory shared by N devices; no peak FLOP/s."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        total = 16 * GiB
    return Chip("CPU", total // n, None)


def cpu_devices(n: int) -> list:
    """N CPU devices of this process. jax makes CPU devices once, when its backend starts: before that
    ``jax_num_cpu_devices`` can still ask for N; after it, N must be at most what exists
    (``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before jax starts)."""
    import jax
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        forced = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
        if n > max(jax.config.jax_num_cpu_devices, int(forced.group(1)) if forced else 1):
            jax.config.update("jax_num_cpu_devices", n)
    devices = jax.devices("cpu")
    if len(devices) < n:
        raise TargetError(f"--topology cpu:{n}: this process has {len(devices)} CPU device(s); set "
                          f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before jax starts")
    return list(devices[:n])

"""The XLA flags of every test process (this one and the commands tests start).

``--xla_backend_optimization_level=0``: LLVM compiles XLA's CPU kernels without optimising them. Compiles are
most of the suite's time, and this makes those of the tiny test models 2-5x faster (a model's init: 4.0 -> 1.2 s
on one device, 7.2 -> 1.7 s on eight). Results change only in float rounding (about 1e-7 relative), below every
tolerance the tests use, and each bit-for-bit comparison is between two runs under the same flags. Users' runs
are not affected: only the tests set it.
"""
FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int | None = None) -> str:
    """XLA_FLAGS for a test process: fast compiles, and ``devices`` emulated CPU devices (None: the one real)."""
    return FAST_COMPILE + (f" --xla_force_host_platform_device_count={devices}" if devices else "")

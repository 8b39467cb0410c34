"""A training run compiles its step once per planned batch shape, ahead of the steps, and a rerun of the
same config loads every compile from JAX's persistent cache (``train.compile_cache``) instead.

Each run is its own process: the persistent cache is process-wide state, and a rerun in a fresh process
is what a user's rerun or ``--resume`` is. The cache folder is the test's own, never the user's."""
import json
import os
import subprocess
import sys

import pytest

from tests.support.train_utils import REPO, tiny_overrides
from tests.support.xla import xla_flags

# Runs `train` as `tuna-jax train` does and prints, for every XLA compile request, the function and
# whether the persistent cache answered it (JAX's monitoring events: the cache-hit event comes inside
# the compile's timed span, on the same thread; compile-ahead compiles on its own thread).
CHILD = r"""
import json, sys, threading
import jax
seen, compiles = threading.local(), []
def event(name, **kw):
    if name == "/jax/compilation_cache/cache_hits":
        seen.hit = True
def duration(name, secs, **kw):
    if name == "/jax/core/compile/backend_compile_duration":
        compiles.append([kw.get("fun_name"), bool(getattr(seen, "hit", False))])
        seen.hit = False
jax.monitoring.register_event_listener(event)
jax.monitoring.register_event_duration_secs_listener(duration)
from tuna_jax.config import load_config
from tuna_jax.train import planned_shapes, tokenize_source, load_tokenizer_and_policy, train
cfg = load_config(sys.argv[1], sys.argv[2:])
tok, policy = load_tokenizer_and_policy(cfg)
examples, _ = tokenize_source(cfg.data.train, cfg, tok, policy)
n = len(jax.devices())  # every device on fsdp: this host's data devices
shapes = planned_shapes(cfg, examples, local_devices=n)
result = train(cfg)
print(json.dumps({"compiles": compiles, "shapes": len(shapes), "steps": result.step}))
"""


def _run(tmp_path, name, cache):
    # 8 batches of 2 prompts over 2 devices, 4 different lengths, 2 shapes
    overrides = tiny_overrides(tmp_path, n_train=16, train__global_batch=2, data__pad_to_multiple=8,
                               data__attention_block=8, data__shape_buckets=2, train__export="false",
                               train__save_every=100) + [f"train.output_dir={tmp_path / name}",
                                                         f"train.compile_cache={cache}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": xla_flags(2),
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(REPO / "configs/tiny_ranking.yaml"), *overrides],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # two fresh JAX processes; the first compiles the tiny step twice (~50 s of CPU)
def test_step_compiles_once_per_planned_shape_and_a_rerun_compiles_nothing(tmp_path):
    cache = tmp_path / "xla"
    first = _run(tmp_path, "first", cache)
    step = [hit for fun, hit in first["compiles"] if fun == "jit(step)"]
    assert first["steps"] == 8 and first["shapes"] == 2
    assert step == [False, False]  # one compile per planned shape, none again when the step runs
    assert any(cache.iterdir())
    again = _run(tmp_path, "again", cache)
    assert [hit for fun, hit in again["compiles"] if fun == "jit(step)"] == [True, True]
    assert again["compiles"] and all(hit for _, hit in again["compiles"])  # nothing compiled at all

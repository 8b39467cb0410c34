"""Multi-host, for real: two processes on 127.0.0.1 joined by ``jax.distributed`` (JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID), one CPU device each, against one process with two CPU devices: the
same global batch on the same (1, 2, 1) mesh, so the two must agree.

* training gives the same per-step metrics and final parameters (packed, prefix_shared);
* ``tuna-jax score`` writes the same file (every host scores on the global mesh, process 0 writes);
* SIGTERM sent to ONE host stops both at the same step with a checkpoint (exit 143 and the single-host
  message on both), and ``--resume`` on two hosts ends where an uninterrupted two-host run ends.

Every process runs in its own process group with a deadline; on a failure, a timeout or the end of
the test, whatever still runs is killed, so a hung collective fails the test instead of hanging it.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.support.train_utils import REPO, final_params, max_param_diff, read_metrics, tiny_overrides
from tests.support.xla import xla_flags
from tuna_jax.assets import stories260k_hf_dir
from tuna_jax.data.synthetic import ranking_records

# Each test starts three to six JAX processes. One xdist worker runs them all (`--dist loadgroup`, the README's
# test command), so the two-process runs trained once are shared (the SIGTERM test compares with the packed one).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multihost")]

TINY_RANKING = str(REPO / "configs" / "tiny_ranking.yaml")
DEADLINE = 240  # seconds for one set of processes; a run here takes 10-90 s on two busy cores
STEPS = 16  # 64 examples, batch 8, 2 epochs


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """One persistent compilation cache for the module's processes: the runs compile the same few
    programs (compiling is most of a tiny run's time on CPU)."""
    return tmp_path_factory.mktemp("jax-cache")


@pytest.fixture
def hosts(compile_cache):
    """``start(cmds, log_dir, name, devices)``: launch processes (one per command; several -> a
    jax.distributed job on a free port); every process still running when the test ends is killed
    with its group."""
    started = []

    def start(cmds, log_dir, name, devices=1):
        port = _free_port()
        procs = []
        for i, cmd in enumerate(cmds):
            env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "TPU_", "SLURM_", "OMPI_"))}
            env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", JAX_COMPILATION_CACHE_DIR=str(compile_cache),
                       XLA_FLAGS=xla_flags(devices))
            if len(cmds) > 1:
                env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(len(cmds)),
                           JAX_PROCESS_ID=str(i))
            log = open(log_dir / f"{name}.{i}.log", "w+")  # a file: a pipe nobody reads blocks the child
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
            proc.log, proc.name = log, f"{name}.{i}"
            procs.append(proc)
            started.append(proc)
        return procs

    yield start
    for proc in started:
        _kill(proc)
        proc.log.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill(proc) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _output(proc) -> str:
    proc.log.flush()
    proc.log.seek(0)
    return proc.log.read()


def _logs(procs) -> str:
    return "\n".join(f"--- {p.name} (rc {p.poll()}):\n{_output(p)[-4000:]}" for p in procs)


def wait_all(procs, ok=(0,), deadline=DEADLINE) -> list[str]:
    """Wait for every process; the first exit code outside ``ok``, or the deadline, kills them all and
    fails with their logs. Returns their outputs."""
    t0 = time.time()
    while any(p.poll() is None for p in procs):
        bad = [p for p in procs if p.poll() is not None and p.returncode not in ok]
        late = time.time() - t0 > deadline
        if bad or late:
            for p in procs:
                _kill(p)
            pytest.fail(("timed out (a hung collective?)" if late and not bad else "a process failed")
                        + f" after {time.time() - t0:.0f} s:\n{_logs(procs)}")
        time.sleep(0.05)
    assert all(p.returncode in ok for p in procs), _logs(procs)
    return [_output(p) for p in procs]


def _train_cmd(overrides, *extra):
    return [sys.executable, "-m", "tuna_jax.cli", "train", TINY_RANKING, *overrides, "train.mesh=1,2,1", *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The training data and tokenizer, written once for the module."""
    d = tmp_path_factory.mktemp("multihost")
    base = [o for o in tiny_overrides(d, n_train=64) if not o.startswith("train.output_dir=")]
    return d, base + ["train.epochs=2", "train.save_every=100"]


def _train_pair(hosts, data, layout, name):
    """One process with two devices and two processes with one device each, run side by side."""
    d, base = data
    ov = base + [f"data.layout={layout}"]
    one = hosts([_train_cmd(ov + [f"train.output_dir={d / (name + '-one')}"])], d, f"{name}-one", devices=2)
    two = hosts([_train_cmd(ov + [f"train.output_dir={d / (name + '-two')}"])] * 2, d, f"{name}-two")
    wait_all(one + two)
    return d / f"{name}-one", d / f"{name}-two"


_UNINTERRUPTED: dict = {}


def uninterrupted(hosts, data, layout):
    """(one-process run, two-process run) of ``layout``, trained once per module and test worker."""
    if layout not in _UNINTERRUPTED:
        _UNINTERRUPTED[layout] = _train_pair(hosts, data, layout, f"full-{layout}")
    return _UNINTERRUPTED[layout]


# packed is data.layout=auto's choice on GPU and TPU, prefix_shared its choice on CPU. (padded, the reference, is
# held to both in one process by test_layouts.py; its two-process run added 86 s of CI time.)
@pytest.mark.parametrize("layout", ["packed", "prefix_shared"])
def test_two_processes_train_like_one_process_with_two_devices(hosts, data, layout):
    one, two = uninterrupted(hosts, data, layout)
    m1 = [m for m in read_metrics(one) if m["split"] == "train"]
    m2 = [m for m in read_metrics(two) if m["split"] == "train"]
    assert [m["step"] for m in m1] == [m["step"] for m in m2] == list(range(1, STEPS + 1))
    # prefix_shared: every example is its own rows, so each device computes exactly what it
    # computes in one process, and a sum of two gradients is the same in either order: bit for bit.
    # packed: each host packs its own examples into rows, so rows hold other neighbours than on one
    # host (the same sums in another order): float32 rounding, ~2e-6 here.
    tol = 1e-5 if layout == "packed" else 0.0
    for a, b in zip(m1, m2):
        assert a["tokens"] == b["tokens"], (a, b)  # the global batch, not one host's rows (or both hosts' twice)
        for k in ("loss", "rank_loss", "mle_loss", "pair_accuracy", "grad_norm", "lr"):
            assert abs(b[k] - a[k]) <= tol * abs(a[k]), (k, a, b)
    assert max_param_diff(final_params(one), final_params(two)) <= tol
    assert m1[-1]["loss"] < m1[0]["loss"] - 0.5  # it trained: the comparison is not of two untouched inits


def test_two_processes_score_like_one_process(hosts, tmp_path):
    model = stories260k_hf_dir(tmp_path.parent / "tuna-cache")
    data = tmp_path / "in.jsonl"
    # 13 lines x 4 candidates at 8 rows a batch: several batches, the last one partly padding
    data.write_text("".join(json.dumps(r) + "\n" for r in ranking_records(13, seed=3)))

    def cmd(out):
        return [sys.executable, "-m", "tuna_jax.cli", "score", str(model), str(data), str(out), "--batch-size", "8"]

    one = hosts([cmd(tmp_path / "one.jsonl")], tmp_path, "score-one", devices=2)
    two = hosts([cmd(tmp_path / "two.jsonl")] * 2, tmp_path, "score-two")
    outs = wait_all(one + two)
    assert all("scored 13 lines" in o for o in outs), outs
    expected = (tmp_path / "one.jsonl").read_text()
    assert len(expected.splitlines()) == 13
    assert (tmp_path / "two.jsonl").read_text() == expected  # the same rows on the same mesh: bit for bit
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("two.")) == ["two.jsonl"]  # no leftovers


def test_sigterm_to_one_host_stops_both_at_one_step_and_resume_matches(hosts, data):
    d, base = data
    _, full = uninterrupted(hosts, data, "packed")
    run = d / "term"
    ov = base + ["data.layout=packed", f"train.output_dir={run}"]  # as the run it is compared with
    procs = hosts([_train_cmd(ov)] * 2, d, "term")
    t0 = time.time()
    while not ((run / "metrics.jsonl").exists()
               and any(m["split"] == "train" and m["step"] >= 2 for m in read_metrics(run))):
        if any(p.poll() is not None for p in procs) or time.time() - t0 > DEADLINE:
            pytest.fail(f"the run did not reach step 2:\n{_logs(procs)}")
        time.sleep(0.005)
    procs[1].send_signal(signal.SIGTERM)  # process 1 only: process 0 never sees a signal
    outs = wait_all(procs, ok=(128 + signal.SIGTERM,))
    said = [re.findall(r"tuna-jax train: stopped by SIGTERM after step (\d+); checkpoint saved; "
                       r"rerun the same command \(train: with --resume\) to continue", o) for o in outs]
    assert all(len(s) == 1 for s in said), outs
    step = int(said[0][0])
    assert int(said[1][0]) == step and 2 <= step < STEPS, said
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [step]
    assert [m["step"] for m in read_metrics(run) if m["split"] == "train"] == list(range(1, step + 1))

    resumed = hosts([_train_cmd(ov, "--resume")] * 2, d, "term-resume")
    outs = wait_all(resumed)
    assert all(f"at step {step}" in o and "resumed from" in o for o in outs), outs
    assert [m["step"] for m in read_metrics(run) if m["split"] == "train"] == list(range(1, STEPS + 1))
    # the same program on the same batches from the restored state: bit for bit
    assert max_param_diff(final_params(full), final_params(run)) == 0.0

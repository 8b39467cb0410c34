"""launch/tpu_vm.sh with a fake `gcloud` on PATH that records its arguments: the commands it would issue to
create, set up, run on, copy from and delete a Cloud TPU VM slice. The command it sends to the workers is run
here too, by bash, against a fake `tuna-jax`, so its quoting is checked by a shell and not by eye."""
from __future__ import annotations

import os
import pathlib
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO / "launch" / "tpu_vm.sh"
SEP = "\x1f"


@pytest.fixture
def fake(tmp_path):
    """Runs the script with a recording gcloud first on PATH; returns run(args, **env) -> (rc, calls, err)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "gcloud.log"
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(f'#!/usr/bin/env bash\nfor a in "$@"; do printf "%s{SEP}" "$a"; done >> "{log}"\n'
                      f'echo >> "{log}"\n')
    gcloud.chmod(0o755)

    def run(args, **env):
        log.write_text("")
        base = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path)}
        p = subprocess.run(["bash", str(SCRIPT), *args], env={**base, **env}, cwd=tmp_path, capture_output=True,
                           text=True, timeout=30)
        calls = [line.split(SEP)[:-1] for line in log.read_text().splitlines() if line]
        return p.returncode, calls, p.stderr

    return run


TPU = {"TPU_NAME": "tuna-v4", "ZONE": "us-central2-b"}


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_create_v4_32_spot_and_v5e_16(fake):
    rc, calls, _ = fake(["create"], **TPU, ACCELERATOR_TYPE="v4-32", SPOT="1", PROJECT="my-proj")
    assert rc == 0 and calls == [["compute", "tpus", "tpu-vm", "create", "tuna-v4", "--zone=us-central2-b",
                                  "--project=my-proj", "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base",
                                  "--spot"]]
    rc, calls, _ = fake(["create"], TPU_NAME="tuna-v5e", ZONE="us-west4-a", ACCELERATOR_TYPE="v5litepod-16",
                        PREEMPTIBLE="1", CREATE_FLAGS="--network=tpu-net --internal-ips")
    assert rc == 0 and calls == [["compute", "tpus", "tpu-vm", "create", "tuna-v5e", "--zone=us-west4-a",
                                  "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite", "--preemptible",
                                  "--network=tpu-net", "--internal-ips"]]
    rc, calls, _ = fake(["create"], **TPU, ACCELERATOR_TYPE="v4-8", RUNTIME_VERSION="tpu-vm-base")
    assert rc == 0 and "--version=tpu-vm-base" in calls[0] and "--spot" not in calls[0]


@pytest.mark.parametrize("env,message", [
    ({**TPU}, "set ACCELERATOR_TYPE"),
    ({**TPU, "ACCELERATOR_TYPE": "v9-8"}, "no default runtime version for ACCELERATOR_TYPE=v9-8: set RUNTIME_VERSION"),
    ({"ZONE": "z", "ACCELERATOR_TYPE": "v4-32"}, "set TPU_NAME"),
])
def test_create_refuses_what_it_cannot_guess(fake, env, message):
    rc, calls, err = fake(["create"], **env)
    assert rc != 0 and calls == [] and message in err


def test_setup_installs_the_tpu_jax_and_the_gcs_extra_on_every_worker(fake):
    rc, calls, _ = fake(["setup"], **TPU, REF="v0.2")
    assert rc == 0 and len(calls) == 1
    call = calls[0]
    assert call[:5] == ["compute", "tpus", "tpu-vm", "ssh", "tuna-v4"] and "--worker=all" in call
    command = next(a for a in call if a.startswith("--command="))
    assert "git clone https://github.com/your-org/tuna-jax.git $HOME/tuna-jax" in command
    assert "git checkout --quiet v0.2" in command and "'jax[tpu]'" in command and "pip install -e '.[gcs]'" in command


def test_run_sends_the_same_quoted_command_to_every_worker(fake, tmp_path):
    args = ["train", "configs/tuna_p.yaml", "train.output_dir=gs://b/tuna p", "data.train=it's.jsonl"]
    rc, calls, _ = fake(args, **TPU)
    rc2, calls2, _ = fake(["run", *args], **TPU)
    assert rc == rc2 == 0 and calls == calls2 and len(calls) == 1
    assert calls[0][:8] == ["compute", "tpus", "tpu-vm", "ssh", "tuna-v4", "--zone=us-central2-b", "--worker=all",
                            calls[0][7]]
    command = calls[0][7].removeprefix("--command=")
    assert "TUNA_JAX_LOG_HOST" not in command  # nothing reads it
    # What a worker's shell does with it: run tuna-jax with exactly these arguments, log, keep the status.
    worker_bin = tmp_path / "worker-bin"
    worker_bin.mkdir()
    got = tmp_path / "argv"
    (worker_bin / "tuna-jax").write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "{got}"\necho trained\n'
                                         f'exit 3\n')
    (worker_bin / "tuna-jax").chmod(0o755)
    (tmp_path / "tuna-jax").mkdir()
    p = subprocess.run(["bash", "-c", command], env={"PATH": f"{worker_bin}:/usr/bin:/bin", "HOME": str(tmp_path)},
                       capture_output=True, text=True, timeout=30)
    assert got.read_text().splitlines() == args
    assert p.returncode == 3  # tuna-jax's status, not tee's
    logs = list((tmp_path / "tuna-jax-logs").iterdir())
    assert len(logs) == 1 and logs[0].read_text() == "trained\n"


def test_copy_from_a_bucket_from_every_worker_or_from_worker_0(fake):
    rc, calls, _ = fake(["copy", "gs://b/tuna-p/final", "final"])  # no TPU needed for a bucket
    assert rc == 0 and calls == [["storage", "cp", "-r", "gs://b/tuna-p/final", "final"]]
    rc, calls, _ = fake(["copy", "logs", "logs"], **TPU)
    assert rc == 0 and calls == [["compute", "tpus", "tpu-vm", "scp", "tuna-v4:tuna-jax-logs", "logs",
                                  "--zone=us-central2-b", "--worker=all", "--recurse"]]
    rc, calls, _ = fake(["copy", "tuna-jax/runs/eval"], **TPU)
    assert rc == 0 and calls == [["compute", "tpus", "tpu-vm", "scp", "tuna-v4:tuna-jax/runs/eval", ".",
                                  "--zone=us-central2-b", "--worker=0", "--recurse"]]


def test_delete_and_usage(fake):
    rc, calls, _ = fake(["delete"], **TPU, PROJECT="p")
    assert rc == 0 and calls == [["compute", "tpus", "tpu-vm", "delete", "tuna-v4", "--zone=us-central2-b",
                                  "--project=p", "--quiet"]]
    rc, calls, err = fake([])
    assert rc == 2 and calls == [] and "usage:" in err

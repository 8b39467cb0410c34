"""A disk that fills during a checkpoint save: one line naming the folder, the size and what to do (no Orbax
thread tracebacks), exit status 2, and after space is freed ``--resume`` ends where an uninterrupted run ends.
The full disk is real: a small tmpfs (needs root and mount; skipped where the machine does not allow it)."""
import errno
import pathlib
import subprocess
import uuid

import pytest

from tests.support.train_utils import REPO, final_params, max_param_diff, tiny_overrides
from tuna_jax.cli import main as cli
from tuna_jax.io.diskfull import DiskFull, disk_full_as_one_line


@pytest.fixture
def small_disk():
    mnt = pathlib.Path(f"/tmp/tuna-disk-{uuid.uuid4().hex[:6]}")  # a short path: the error line names it
    mnt.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1500k", "tmpfs", str(mnt)], capture_output=True)
    if ok.returncode:
        pytest.skip(f"cannot mount a small tmpfs here ({ok.stderr.decode().strip() or 'mount failed'}): the full-disk "
                    "test needs root and a machine that allows mounting")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        mnt.rmdir()


@pytest.mark.slow
def test_disk_full_during_a_save_is_one_line_and_resumes(tmp_path, small_disk, capsys):
    cfg = str(REPO / "configs" / "tiny_sft.yaml")
    base = [o for o in tiny_overrides(tmp_path, mode="sft", n_train=64) if not o.startswith("train.output_dir")]
    base += ["train.save_every=1", "train.max_steps=6", "train.keep_checkpoints=2"]
    full = small_disk / "run"
    assert cli(["train", cfg, *base, f"train.output_dir={full}"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    line = err[-1]
    assert line.startswith(f"tuna-jax train: error: {full / 'checkpoints'}: the disk is full writing checkpoint "
                           "step "), line
    assert "MiB); free space or use another folder, then rerun with --resume (restores step " in line
    assert len(line) <= 300 and not any(ln.startswith("ERROR absl") for ln in err), err
    # Free space (the tmpfs grows), resume, and end with the parameters of a run that never stopped.
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    assert cli(["train", cfg, *base, f"train.output_dir={full}", "--resume"]) == 0
    assert cli(["train", cfg, *base, f"train.output_dir={tmp_path / 'whole'}"]) == 0
    assert max_param_diff(final_params(full), final_params(tmp_path / "whole")) == 0.0


@pytest.mark.parametrize("error,code", [
    (ValueError("RESOURCE_EXHAUSTED: Error writing \"x\": Failed to write 9 bytes to file 5: No space left on device "
                "[os_error_code='28']"), errno.ENOSPC),
    (OSError(errno.EDQUOT, "Disk quota exceeded", "/bucket/x"), errno.EDQUOT),
])
def test_disk_full_errors_become_one_line(error, code):
    with pytest.raises(DiskFull) as got:
        with disk_full_as_one_line("/runs/a", "the params export", 3 * 2**20):
            raise error
    assert got.value.errno == code
    assert str(got.value).startswith(f"[Errno {code}] the disk")
    assert "the params export (3.0 MiB); free space or use another folder, then rerun" in str(got.value)
    with pytest.raises(KeyError):  # anything else passes through
        with disk_full_as_one_line("/runs/a", "x"):
            raise KeyError("other")

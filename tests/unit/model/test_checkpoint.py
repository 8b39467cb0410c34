"""A damaged checkpoint step never strands a run: real Orbax checkpoints, damaged the ways disks and
people damage them, restored by TrainCheckpointer and resumed by `tuna-jax train --resume`."""
import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.support.train_utils import REPO, read_metrics, tiny_overrides
from tuna_jax.io.errors import InputError
from tuna_jax.model.checkpoint import TrainCheckpointer

N = 40000  # floats: big enough that Orbax writes the array to its own data file
ABSTRACT = {"w": jax.ShapeDtypeStruct((N,), jnp.float32), "step": jax.ShapeDtypeStruct((), jnp.int32)}


def _state(step):
    return {"w": jnp.arange(float(N)) + step, "step": jnp.asarray(step, jnp.int32)}


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck") / "checkpoints"
    c = TrainCheckpointer(d, keep=3, async_save=False)
    for s in (1, 2, 3):
        c.save(s, _state(s), {"data": {"pos": s}, "step": s})
    c.close()
    return d


def _data_files(step_dir):
    return [f for f in (step_dir / "state").rglob("*") if f.is_file() and f.stat().st_size > 10000]


DAMAGE = {
    "missing _METADATA": lambda s: (s / "state" / "_METADATA").unlink(),
    "missing meta/": lambda s: shutil.rmtree(s / "meta"),
    "meta not JSON": lambda s: (s / "meta" / "metadata").write_text("{not json"),
    "missing state/": lambda s: shutil.rmtree(s / "state"),
    "truncated data file": lambda s: [f.write_bytes(f.read_bytes()[:f.stat().st_size // 2]) for f in _data_files(s)],
    "deleted data file": lambda s: [f.unlink() for f in _data_files(s)],
    "empty manifest": lambda s: (s / "state" / "manifest.ocdbt").write_bytes(b""),
    "empty step folder": lambda s: (shutil.rmtree(s), s.mkdir()),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_falls_back_to_the_previous_good_step(three_steps, tmp_path, caplog, damage):
    d = tmp_path / "checkpoints"
    shutil.copytree(three_steps, d)
    assert _data_files(d / "3")  # the damage below hits a real data file
    DAMAGE[damage](d / "3")
    c = TrainCheckpointer(d, keep=3, async_save=False)
    with caplog.at_level(logging.WARNING, logger="tuna_jax"):
        state, meta = c.restore(ABSTRACT)
    assert meta["data"] == {"pos": 2} and int(state["step"]) == 2
    assert np.array_equal(np.asarray(state["w"]), np.arange(float(N)) + 2)
    assert f"{d / '3'} cannot be restored" in caplog.text and "resuming from step 2" in caplog.text
    # the bad folder is kept for inspection but out of the way: step 3 can be written again and restores
    assert (d / "3.unrestorable").is_dir() and c.latest_step() == 2
    assert c.save(3, _state(30), {"data": {"pos": 30}, "step": 3})
    c.close()
    state, meta = TrainCheckpointer(d).restore(ABSTRACT)
    assert meta["data"] == {"pos": 30}


def test_no_good_step_is_one_line_naming_the_folder(three_steps, tmp_path):
    d = tmp_path / "checkpoints"
    shutil.copytree(three_steps, d)
    for s in (1, 2, 3):
        (d / str(s) / "state" / "_METADATA").unlink()
    with pytest.raises(InputError) as e:
        TrainCheckpointer(d).restore(ABSTRACT)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{d / '3'}: no checkpoint step in {d} can be restored")
    assert "_METADATA" in msg and "without --resume" in msg
    assert all((d / str(s)).is_dir() for s in (1, 2, 3))  # nothing renamed when nothing restores


@pytest.mark.slow
def test_train_resume_over_a_damaged_latest_step_is_exact(tmp_path, capsys, caplog):
    """A finished run whose last two checkpoints are damaged resumes from the one before, retrains the
    steps after it on the same data, and ends with the same parameters as the undamaged run."""
    from tuna_jax.cli import main as cli
    from tuna_jax.model.checkpoint import load_params

    cfg = str(REPO / "configs" / "tiny_ranking.yaml")
    args = ["train", cfg, *tiny_overrides(tmp_path, n_train=48, train__save_every=2, train__keep_checkpoints=4)]
    assert cli(args) == 0
    run = tmp_path / "run"
    first = load_params(run / "final")
    losses = {m["step"]: m["loss"] for m in read_metrics(run) if m["split"] == "train"}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    (run / "checkpoints" / "6" / "state" / "_METADATA").unlink()
    shutil.rmtree(run / "checkpoints" / "4" / "meta")
    capsys.readouterr()
    with caplog.at_level(logging.WARNING, logger="tuna_jax"):
        assert cli([*args, "--resume"]) == 0
    assert f"{run / 'checkpoints' / '6'} cannot be restored" in caplog.text
    assert "resuming from step 2, the newest step that restores" in caplog.text
    assert "at step 2" in capsys.readouterr().err
    again = {m["step"]: m["loss"] for m in read_metrics(run) if m["split"] == "train"}
    assert again == losses  # steps 3-6 ran again, the same
    second = load_params(run / "final")
    a, b = jax.tree.leaves(jax.tree.map(lambda x: np.asarray(x), first)), jax.tree.leaves(
        jax.tree.map(lambda x: np.asarray(x), second))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name[0].isdigit()) == \
        ["2", "4", "4.unrestorable", "6", "6.unrestorable"]

"""gs:// everywhere a path goes, through a Cloud Storage stand-in that needs no network (tests/fake_gcs.py):
training data, tokenizer, output folder, checkpoints and resume; a params export and a Hugging Face export;
an evaluation report that a new machine resumes from the bucket. Every URI stays a URI: nothing may land in a
local folder named ``gs:``."""
from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest
import yaml
from flax import nnx

from fake_gcs import use_fake_gcs
from test_eval_cli import lmentry_task
from train_utils import REPO, read_metrics, write_jsonl
from tuna_jax.assets import stories260k_hf_dir
from tuna_jax.cli import main as cli
from tuna_jax.config import load_config
from tuna_jax.io import paths
from tuna_jax.io.errors import InputError
from tuna_jax.synthetic import ranking_records
from tuna_jax.train import train

TINY_RANKING = str(REPO / "configs" / "tiny_ranking.yaml")


@pytest.fixture
def gcs(tmp_path, monkeypatch):
    """The bucket folder; the test runs in tmp_path/work, which must stay free of a 'gs:' folder."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("TUNA_JAX_CACHE", str(tmp_path / "cache"))
    with use_fake_gcs(tmp_path / "buckets", monkeypatch) as root:
        yield root
    assert not (work / "gs:").exists() and not (tmp_path / "gs:").exists()


def _put_dir(local, uri):
    for name in os.listdir(local):
        if os.path.isfile(os.path.join(local, name)):
            paths.copy_file(os.path.join(local, name), f"{uri}/{name}")


def _params(path):
    from tuna_jax.model import load_model
    from tuna_jax.parallel import make_mesh

    model = load_model(path, make_mesh((1, 1, 1), jax.devices()[:1]))
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def test_training_reads_and_writes_the_bucket_and_resumes_from_it(gcs, tmp_path):
    bucket = os.path.join(gcs, "bkt")
    stories = stories260k_hf_dir(tmp_path / "tuna-cache")
    _put_dir(stories, "gs://bkt/tokenizer")
    write_jsonl(tmp_path / "train.jsonl", ranking_records(32, seed=0))
    paths.copy_file(str(tmp_path / "train.jsonl"), "gs://bkt/data/train.jsonl")
    remote = ["train.progress=false", "train.tensorboard=false", "train.save_every=2", "train.async_checkpoints=false",
              "data.train=gs://bkt/data/train.jsonl", "model.tokenizer=gs://bkt/tokenizer", "train.output_dir=gs://bkt/run"]

    class Kill(Exception):
        pass

    losses = {}

    def record(step, metrics):
        losses.setdefault(step, []).append(metrics["loss"])
        if step == 3 and len(losses[3]) == 1:
            raise Kill()  # after step 3: the newest checkpoint is step 2's

    with pytest.raises(Kill):
        train(load_config(TINY_RANKING, remote), on_step=record)
    run = os.path.join(bucket, "run")
    assert os.path.isfile(os.path.join(run, "checkpoints", "2", "commit_success.txt"))  # Orbax's GCS commit
    result = train(load_config(TINY_RANKING, remote), resume=True, on_step=record)
    assert result.step == 4 and result.output_dir == "gs://bkt/run" and result.export_dir == "gs://bkt/run/final"
    # Resumed from step 2 in the bucket: step 3 again, on the same batch from the same state, to the same loss.
    assert sorted(losses) == [1, 2, 3, 4] and len(losses[3]) == 2 and losses[3][0] == losses[3][1]
    assert [m["step"] for m in read_metrics(run) if m["split"] == "train"] == [1, 2, 3, 4]
    assert yaml.safe_load(open(os.path.join(run, "config.yaml")))["train"]["output_dir"] == "gs://bkt/run"
    assert {"config.json", "tokenizer.model"} <= set(os.listdir(os.path.join(run, "final")))
    assert _params("gs://bkt/run/final")["embed_tokens"].shape[0] == 512  # the export restores from the bucket


def test_hf_export_to_the_bucket_round_trips(gcs, tmp_path, capsys):
    stories = str(stories260k_hf_dir(tmp_path / "tuna-cache"))
    _put_dir(stories, "gs://bkt/hf-in")  # a HF folder in the bucket: read from a local copy
    assert cli(["convert", "hf-to-orbax", "gs://bkt/hf-in", "gs://bkt/ckpt"]) == 0
    assert os.path.isfile(os.path.join(gcs, "bkt", "ckpt", "params", "commit_success.txt"))
    assert cli(["convert", "orbax-to-hf", "gs://bkt/ckpt", "gs://bkt/hf-out", "--like", "gs://bkt/hf-in"]) == 0
    out = os.path.join(gcs, "bkt", "hf-out")
    assert {"model.safetensors", "config.json", "tokenizer.model", "tokenizer_config.json"} <= set(os.listdir(out))
    assert "chat_template" in json.load(open(os.path.join(out, "tokenizer_config.json")))
    # Two local copies of gs://bkt/hf-in: the whole folder for hf-to-orbax (safetensors opens files by name),
    # and for --like only its config and tokenizer, never its weights.
    copies = sorted(sorted(os.listdir(d)) for d, _, files in os.walk(tmp_path / "cache") if d.endswith("hf-in"))
    assert [c for c in copies if "model.safetensors" in c] and [c for c in copies if "model.safetensors" not in c]
    assert len(copies) == 2
    a, b = _params(stories), _params("gs://bkt/hf-out")
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    # A non-empty export target in the bucket is refused like a local one.
    assert cli(["convert", "orbax-to-hf", "gs://bkt/ckpt", "gs://bkt/hf-out"]) == 2
    assert "gs://bkt/hf-out: not empty" in capsys.readouterr().err


def test_eval_report_goes_to_the_bucket_and_a_new_machine_resumes_from_it(gcs, tmp_path, monkeypatch):
    from tuna_jax.eval import run as R

    lm = tmp_path / "lmentry" / "data"
    lm.mkdir(parents=True)
    lmentry_task(lm, "bigger_number", True)
    _put_dir(lm, "gs://bkt/lmentry/data")
    cfg = {"name": "cloud", "output_dir": "gs://bkt/eval",
           "models": [{"name": "m", "path": str(stories260k_hf_dir(tmp_path / "tuna-cache"))}],
           "generation": {"max_new_tokens": 4, "batch_size": 4},
           "lmentry": {"data": "gs://bkt/lmentry", "allow_partial": True}}
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(cfg))
    assert cli(["eval", str(tmp_path / "e.yaml"), "--no-progress"]) == 0
    out = os.path.join(gcs, "bkt", "eval")
    assert {"cloud.md", "cloud.json", "cloud.png"} <= set(os.listdir(out))
    table = json.load(open(os.path.join(out, "cloud.json")))
    assert table["settings"]["output_dir"] == "gs://bkt/eval"
    assert table["rows"][0]["details"]["lmentry"]["predictions"].startswith("gs://bkt/eval/predictions/m/")
    assert os.path.isfile(os.path.join(out, "predictions", "m", "lmentry.jsonl"))

    # A new machine (an empty cache): the predictions come back from the bucket, no model is loaded.
    shutil.rmtree(tmp_path / "cache")
    monkeypatch.setattr(R._Generator, "_load", lambda self: pytest.fail("a rerun must not load a model"))
    assert cli(["eval", str(tmp_path / "e.yaml"), "--no-progress"]) == 0
    assert json.load(open(os.path.join(out, "cloud.json")))["rows"] == table["rows"]


def test_what_needs_a_local_file_says_so_in_one_line(gcs, tmp_path):
    from tuna_jax.feedback.store import Store
    from tuna_jax.io.lock import OutputLock

    with pytest.raises(InputError, match=r"^store gs://bkt/s\.jsonl: the request store is appended to .*, which "
                                         r"object storage cannot do; give a local path"):
        Store("gs://bkt/s.jsonl")
    with pytest.raises(InputError, match=r"^output gs://bkt/o\.jsonl: it is written line by line .*copy it to the "
                                         r"bucket when the run ends"):
        OutputLock("gs://bkt/o.jsonl").acquire()

"""gs:// everywhere a path goes, against a real Cloud Storage API on 127.0.0.1 (fake-gcs-server:
tests/support/fake_gcs.py), reached by gcsfs, google-cloud-storage and TensorStore as they reach Google's: training
data, tokenizer, output folder, checkpoints and a resume from them; a params export and a Hugging Face export that
transformers loads; an evaluation report that a new machine resumes from the bucket. Every URI stays a URI: nothing
may land in a local folder named ``gs:``. What the bucket holds is read back from the server, not through the
clients under test."""
from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest
import yaml
from flax import nnx

from tests.support.fake_gcs import bucket, children, gcs_server, object_names, read_object  # noqa: F401  (fixtures)
from tests.support.train_utils import REPO, write_jsonl
from tests.unit.eval.test_run import lmentry_task
from tuna_jax.assets import stories260k_hf_dir
from tuna_jax.cli import main as cli
from tuna_jax.config import load_config
from tuna_jax.data.synthetic import ranking_records
from tuna_jax.io import paths
from tuna_jax.io.errors import InputError
from tuna_jax.train import train

TINY_RANKING = str(REPO / "configs" / "tiny_ranking.yaml")


@pytest.fixture
def gcs(bucket, tmp_path, monkeypatch):  # noqa: F811
    """``gs://`` + a new bucket; the test runs in tmp_path/work, which must stay free of a 'gs:' folder."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("TUNA_JAX_CACHE", str(tmp_path / "cache"))
    yield f"gs://{bucket}"
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


def _jsonl(data: bytes):
    return [json.loads(x) for x in data.decode("utf-8").splitlines() if x.strip()]


@pytest.mark.slow
def test_training_reads_and_writes_the_bucket_and_resumes_from_it_bit_for_bit(gcs, bucket, gcs_server, tmp_path):  # noqa: F811
    stories = stories260k_hf_dir(tmp_path / "tuna-cache")
    _put_dir(stories, f"{gcs}/tokenizer")
    write_jsonl(tmp_path / "train.jsonl", ranking_records(32, seed=0))
    paths.copy_file(str(tmp_path / "train.jsonl"), f"{gcs}/data/train.jsonl")
    common = ["train.progress=false", "train.tensorboard=false", "train.save_every=2", "train.async_checkpoints=false"]
    remote = common + [f"data.train={gcs}/data/train.jsonl", f"model.tokenizer={gcs}/tokenizer",
                       f"train.output_dir={gcs}/run"]

    class Kill(Exception):
        pass

    losses = {}

    def record(step, metrics):
        losses.setdefault(step, []).append(metrics["loss"])
        if step == 3 and len(losses[3]) == 1:
            raise Kill()  # after step 3: the newest checkpoint is step 2's

    with pytest.raises(Kill):
        train(load_config(TINY_RANKING, remote), on_step=record)
    assert "3" not in children(gcs_server, bucket, "run/checkpoints")
    read_object(gcs_server, bucket, "run/checkpoints/2/commit_success.txt")  # Orbax's commit on GCS (no rename)
    result = train(load_config(TINY_RANKING, remote), resume=True, on_step=record)
    assert result.step == 4 and result.output_dir == f"{gcs}/run" and result.export_dir == f"{gcs}/run/final"
    # Resumed from step 2 in the bucket: step 3 again, on the same batch from the same state, to the same loss.
    assert sorted(losses) == [1, 2, 3, 4] and len(losses[3]) == 2 and losses[3][0] == losses[3][1]
    metrics = _jsonl(read_object(gcs_server, bucket, "run/metrics.jsonl"))
    assert [m["step"] for m in metrics if m["split"] == "train"] == [1, 2, 3, 4]
    assert yaml.safe_load(read_object(gcs_server, bucket, "run/config.yaml"))["train"]["output_dir"] == f"{gcs}/run"
    assert {"config.json", "tokenizer.model"} <= children(gcs_server, bucket, "run/final")

    # The same run, uninterrupted, in a local folder: the stopped-and-resumed one in the bucket ends on the same
    # bits (every step's loss, every exported parameter, read back from the bucket through TensorStore).
    local = common + [f"data.train={tmp_path / 'train.jsonl'}", f"model.tokenizer={stories}",
                      f"train.output_dir={tmp_path / 'run'}"]
    straight = {}
    train(load_config(TINY_RANKING, local), on_step=lambda step, m: straight.setdefault(step, m["loss"]))
    assert straight == {step: v[-1] for step, v in losses.items()}
    a, b = _params(str(tmp_path / "run" / "final")), _params(f"{gcs}/run/final")
    assert a["embed_tokens"].shape[0] == 512
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _download(server, bucket_name, prefix, local):
    """The objects under ``prefix`` into folder ``local``, fetched from the server's JSON API (a user's
    ``gcloud storage cp -r``)."""
    for name in object_names(server, bucket_name, prefix.rstrip("/") + "/"):
        dst = os.path.join(local, os.path.relpath(name, prefix))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with open(dst, "wb") as f:
            f.write(read_object(server, bucket_name, name))
    return local


def test_hf_export_to_the_bucket_round_trips(gcs, bucket, gcs_server, tmp_path, capsys):  # noqa: F811
    import torch
    import transformers

    stories = str(stories260k_hf_dir(tmp_path / "tuna-cache"))
    _put_dir(stories, f"{gcs}/hf-in")  # a HF folder in the bucket: read from a local copy
    assert cli(["convert", "hf-to-orbax", f"{gcs}/hf-in", f"{gcs}/ckpt"]) == 0
    read_object(gcs_server, bucket, "ckpt/params/commit_success.txt")
    assert cli(["convert", "orbax-to-hf", f"{gcs}/ckpt", f"{gcs}/hf-out", "--like", f"{gcs}/hf-in"]) == 0
    assert {"model.safetensors", "config.json", "tokenizer.model", "tokenizer_config.json"} <= children(
        gcs_server, bucket, "hf-out")
    assert "chat_template" in json.loads(read_object(gcs_server, bucket, "hf-out/tokenizer_config.json"))
    # Two local copies of hf-in: the whole folder for hf-to-orbax (safetensors opens files by name),
    # and for --like only its config and tokenizer, never its weights.
    copies = sorted(sorted(os.listdir(d)) for d, _, files in os.walk(tmp_path / "cache") if d.endswith("hf-in"))
    assert [c for c in copies if "model.safetensors" in c] and [c for c in copies if "model.safetensors" not in c]
    assert len(copies) == 2
    a, b = _params(stories), _params(f"{gcs}/hf-out")
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    # What a user downloads from the bucket is a Hugging Face model: transformers loads it, with the same weights
    # as the folder that went in.
    out = _download(gcs_server, bucket, "hf-out", str(tmp_path / "downloaded"))
    want = transformers.AutoModelForCausalLM.from_pretrained(stories).state_dict()
    got = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert transformers.AutoTokenizer.from_pretrained(out)("Once upon a time")["input_ids"]
    # A non-empty export target in the bucket is refused like a local one.
    assert cli(["convert", "orbax-to-hf", f"{gcs}/ckpt", f"{gcs}/hf-out"]) == 2
    assert f"{gcs}/hf-out: not empty" in capsys.readouterr().err


def test_eval_report_goes_to_the_bucket_and_a_new_machine_resumes_from_it(gcs, bucket, gcs_server, tmp_path,  # noqa: F811
                                                                          monkeypatch):
    from tuna_jax.eval import run as R

    lm = tmp_path / "lmentry" / "data"
    lm.mkdir(parents=True)
    lmentry_task(lm, "bigger_number", True)
    _put_dir(lm, f"{gcs}/lmentry/data")
    cfg = {"name": "cloud", "output_dir": f"{gcs}/eval",
           "models": [{"name": "m", "path": str(stories260k_hf_dir(tmp_path / "tuna-cache"))}],
           "generation": {"max_new_tokens": 4, "batch_size": 4},
           "lmentry": {"data": f"{gcs}/lmentry", "allow_partial": True}}
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(cfg))
    assert cli(["eval", str(tmp_path / "e.yaml"), "--no-progress"]) == 0
    assert {"cloud.md", "cloud.json", "cloud.png", "predictions"} <= children(gcs_server, bucket, "eval")
    table = json.loads(read_object(gcs_server, bucket, "eval/cloud.json"))
    assert table["settings"]["output_dir"] == f"{gcs}/eval"
    assert table["rows"][0]["details"]["lmentry"]["predictions"].startswith(f"{gcs}/eval/predictions/m/")
    assert _jsonl(read_object(gcs_server, bucket, "eval/predictions/m/lmentry.jsonl"))

    # A new machine (an empty cache): the predictions come back from the bucket, no model is loaded.
    shutil.rmtree(tmp_path / "cache")
    monkeypatch.setattr(R._Generator, "_load", lambda self: pytest.fail("a rerun must not load a model"))
    assert cli(["eval", str(tmp_path / "e.yaml"), "--no-progress"]) == 0
    assert json.loads(read_object(gcs_server, bucket, "eval/cloud.json"))["rows"] == table["rows"]


def test_what_needs_a_local_file_says_so_in_one_line():  # refused before any request: no bucket needed
    from tuna_jax.io.lock import OutputLock
    from tuna_jax.llm_api.store import Store

    with pytest.raises(InputError, match=r"^store gs://bkt/s\.jsonl: the request store is appended to .*, which "
                                         r"object storage cannot do; give a local path"):
        Store("gs://bkt/s.jsonl")
    with pytest.raises(InputError, match=r"^output gs://bkt/o\.jsonl: it is written line by line .*copy it to the "
                                         r"bucket when the run ends"):
        OutputLock("gs://bkt/o.jsonl").acquire()

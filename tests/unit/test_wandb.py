"""``train.wandb``: a run logs to Weights & Biases (offline mode, on disk) the records of metrics.jsonl, number for
number at their steps, with the run's config and its output folder's name. The offline run file is read back with a
reader of its own format (leveldb-log blocks of protobuf ``Record``s), not through the SDK under test."""
from __future__ import annotations

import glob
import json

import pytest

from tests.support.train_utils import REPO, read_metrics, tiny_overrides
from tuna_jax.config import load_config
from tuna_jax.train import train

wandb_pb2 = pytest.importorskip("wandb.proto.wandb_internal_pb2", reason="train.wandb's test needs wandb: "
                                "pip install -e '.[test]'")


def read_records(path: str) -> list:
    """The protobuf records of a W&B run file: a 7-byte header (":W&B", magic, version), then the leveldb log
    format: 32 KiB blocks of chunks, each a 7-byte header (CRC32 4, length 2 LE, type 1: full, first, middle,
    last) and its bytes; a block's last < 7 bytes are padding."""
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, buf, out, block = 7, b"", [], 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = wandb_pb2.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


@pytest.mark.slow
def test_wandb_logs_the_metrics_config_and_name_of_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wb").mkdir()
    cfg = load_config(str(REPO / "configs" / "tiny_ranking.yaml"),
                      tiny_overrides(tmp_path, n_train=32, n_eval=16, train__max_steps=3, train__wandb="true",
                                     train__output_dir=tmp_path / "my-run"))
    result = train(cfg)
    (path,) = glob.glob(str(tmp_path / "wb" / "wandb" / "offline-run-*" / "run-*.wandb"))
    records = read_records(path)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.display_name == "my-run" and run.project == "tuna-jax"
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["train"]["wandb"] is True and config["optim"] == cfg.to_dict()["optim"]
    history: dict[int, dict] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            history.setdefault(row["_step"], {}).update(row)
    metrics = read_metrics(result.output_dir)
    assert sorted(history) == sorted({m["step"] for m in metrics}) == [0, 1, 2, 3]
    for m in metrics:
        for k, v in m.items():
            if k not in ("step", "split"):
                assert history[m["step"]][f"{m['split']}/{k}"] == pytest.approx(v, rel=1e-12), (m["step"], k)


def test_wandb_without_the_package_is_one_line_before_any_work(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = load_config(str(REPO / "configs" / "tiny_ranking.yaml"),
                      tiny_overrides(tmp_path, n_train=8, train__wandb="true"))
    with pytest.raises(ValueError, match="train.wandb=true needs Weights & Biases: pip install wandb"):
        train(cfg)
    assert not (tmp_path / "run").exists()

"""Training against a frozen reference model's scores stored with the data (loss.reference=data):
`tuna-jax score` on the starting model, `tuna-jax reference-scores`, then `tuna-jax train`. At the
first step the model IS the reference, so s = v - v_ref = 0 for every candidate and each loss takes
its value at zero scores: an end-to-end check that v_ref lines up with v token for token."""
import json
import math

import pytest

from tests.support.train_utils import REPO, read_metrics, write_jsonl
from tuna_jax.assets import stories260k_hf_dir
from tuna_jax.cli import main as cli
from tuna_jax.config import load_config
from tuna_jax.data.synthetic import ranking_records
from tuna_jax.train import train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    model = stories260k_hf_dir(tmp.parent / "tuna-cache")
    ranked = write_jsonl(tmp / "ranked.jsonl", ranking_records(8, seed=3))
    assert cli(["score", str(model), str(ranked), str(tmp / "scores.jsonl")]) == 0
    assert cli(["reference-scores", str(ranked), str(tmp / "scores.jsonl"), str(tmp / "with_ref.jsonl")]) == 0
    return tmp, model


def _first_step(tmp, model, name, *overrides):
    cfg = load_config(str(REPO / "configs" / "tiny_ranking.yaml"), [
        f"model.path={model}", "model.hf_config=null", f"data.train={tmp / 'with_ref.jsonl'}",
        "data.max_len=256", "train.global_batch=8", "train.max_steps=1", "optim.lr=0.0",
        f"train.output_dir={tmp / name}", "train.progress=false", "train.tensorboard=false", "train.export=false",
        "loss.reference=data", *overrides])
    train(cfg)
    return [m for m in read_metrics(tmp / name) if m["split"] == "train"][0]


@pytest.mark.parametrize("score", ["mean", "sum"])
@pytest.mark.slow
def test_at_the_reference_every_pair_costs_log2(data, score):
    tmp, model = data
    m = _first_step(tmp, model, f"dpo-{score}", "loss.form=dpo_pairs", f"loss.score={score}", "loss.beta=0.5")
    assert m["rank_loss"] == pytest.approx(math.log(2), abs=2e-5)  # -log sigmoid(0) for every pair


@pytest.mark.slow
def test_listmle_at_the_reference_is_log_n_factorial(data):
    tmp, model = data
    m = _first_step(tmp, model, "listmle", "loss.form=listmle")
    # 4 distinct-scored candidates, all s = 0: sum_{i=0}^{2} log(4 - i) = log 24
    assert m["rank_loss"] == pytest.approx(math.log(24), abs=5e-5)


def test_records_without_reference_scores_are_one_clear_error(data, tmp_path):
    tmp, model = data
    plain = write_jsonl(tmp_path / "plain.jsonl", ranking_records(8, seed=3))
    code = cli(["train", str(REPO / "configs" / "tiny_ranking.yaml"), f"model.path={model}", "model.hf_config=null",
                f"data.train={plain}", "loss.reference=data", f"train.output_dir={tmp_path / 'run'}"])
    assert code != 0
    assert not (tmp_path / "run").exists()


def test_reference_scores_over_other_tokens_are_refused(data, tmp_path):
    tmp, model = data
    rows = [json.loads(x) for x in (tmp / "with_ref.jsonl").read_text().splitlines()]
    rows[2]["ref_num_tokens"][1] += 1
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(Exception, match=r"bad\.jsonl:3.*ref_num_tokens\[1\]"):
        train(load_config(str(REPO / "configs" / "tiny_ranking.yaml"), [
            f"model.path={model}", "model.hf_config=null", f"data.train={bad}", "data.max_len=256",
            "loss.reference=data", f"train.output_dir={tmp_path / 'run'}"]))

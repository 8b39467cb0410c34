"""Data selection (data/select.py): first:N, last:N, range:A:B of a file, in training sources and in the
shipped configs (Tuna_cp-13K and Tuna_cp-39K share no instruction)."""
import pytest

from tests.support.train_utils import REPO, write_jsonl
from tuna_jax.config import load_config
from tuna_jax.data.records import read_records
from tuna_jax.data.select import Selection, split_source
from tuna_jax.io.errors import InputError
from tuna_jax.pipeline.spec import load_plan

PIPELINES = REPO / "configs" / "pipelines"


def rows(n, prefix="i"):
    return [{"instruction": f"{prefix}{k}", "input": "", "output": f"o{k}", "candidates": [f"a{k}", f"b{k}"],
             "scores": [1.0, 0.0]} for k in range(n)]


def test_selection_forms_and_bounds():
    ten = list(range(10))
    assert Selection.parse("first:3").apply(ten) == [0, 1, 2]
    assert Selection.parse("last:3").apply(ten) == [7, 8, 9]
    assert Selection.parse("range:2:5").apply(ten) == [2, 3, 4]
    assert Selection.parse("all").apply(ten) == ten
    assert str(Selection.parse(" range:2:5 ")) == "range:2:5"
    for bad in ("first:0", "range:5:5", "top:3", "first:-1", "last", 3):
        with pytest.raises(InputError, match="select"):
            Selection.parse(bad, "cfg.yaml:4")
    with pytest.raises(InputError, match="needs 11 rows but there are 10"):
        Selection.parse("range:0:11").apply(ten, "data.jsonl")
    with pytest.raises(InputError, match="keys"):
        split_source({"path": "x.jsonl", "selct": "first:1"})


def test_a_file_that_lost_rows_refuses_a_positional_selection(tmp_path):
    """A stage run with allow_failures leaves FILE.failed.jsonl: its rows no longer stand where its input's did, so
    first/last/range would take other instructions (last:39000 of 51,990 rows reaches into the first 13K)."""
    data = str(write_jsonl(tmp_path / "ranked.jsonl", rows(5)))
    (tmp_path / "ranked.jsonl.failed.jsonl").write_text('{"id": "i2", "error": "timed out", "cause": "timeout"}\n')
    for spec in ("first:2", "last:2", "range:1:3"):
        with pytest.raises(InputError, match=r"left items out .*ranked.jsonl.failed.jsonl.*rerun that stage"):
            read_records({"path": data, "select": spec}, kind="ranking")
    assert len(read_records({"path": data, "select": "all"}, kind="ranking")[0]) == 5  # all rows: nothing shifts
    (tmp_path / "ranked.jsonl.failed.jsonl").unlink()  # the stage rerun finished every item
    assert [r.instruction for r in read_records({"path": data, "select": "last:2"}, kind="ranking")[0]] == ["i3", "i4"]


def test_training_reads_only_the_selected_rows(tmp_path):
    path = str(write_jsonl(tmp_path / "r.jsonl", rows(10)))
    got, _ = read_records({"path": path, "select": "last:4"}, kind="ranking")
    assert [r.instruction for r in got] == ["i6", "i7", "i8", "i9"]
    assert got[0].source.startswith(f"{path}:7")  # errors and reports still name the file's own line


def _train_sources(cfg):
    return cfg.data.train if isinstance(cfg.data.train, list) else [cfg.data.train]


@pytest.mark.slow
def test_tuna_cp_13k_and_39k_share_no_instruction(tmp_path):
    """The shipped configs, per-stage and pipeline, on a 52K-row file: first 13K and last 39K, disjoint."""
    data = str(write_jsonl(tmp_path / "ranked.jsonl", rows(52000)))
    plan = load_plan(str(PIPELINES / "paper.yaml"), [f"output_dir={tmp_path / 'run'}"])
    teacher_out = str(tmp_path / "run" / "teacher" / "ranked.jsonl")
    seen = {}
    for name in ("tuna_cp_13k", "tuna_cp_39k"):
        for cfg in (load_config(str(REPO / "configs" / f"{name}.yaml")), plan.instances[name].params):
            (source,) = _train_sources(cfg)
            assert source["path"] in ("data/tuna_p_ranked.jsonl", teacher_out)  # the teacher's rankings of all 52K
            got, _ = read_records({**source, "path": data}, kind="ranking")
            seen.setdefault(name, {r.instruction for r in got})
            assert {r.instruction for r in got} == seen[name]
    assert len(seen["tuna_cp_13k"]) == 13000 and len(seen["tuna_cp_39k"]) == 39000
    assert not seen["tuna_cp_13k"] & seen["tuna_cp_39k"]


def test_stage_configs_have_their_own_outputs_and_chain():
    configs = {p.stem: load_config(str(p)) for p in sorted((REPO / "configs").glob("*.yaml"))
               if p.stem not in ("eval_example",) and not p.stem.startswith("tiny")}
    outputs = [c.train.output_dir for c in configs.values()]
    assert len(outputs) == len(set(outputs))
    start = {name: c.model.path for name, c in configs.items()}
    assert start["tuna"] == configs["tuna_p"].train.output_dir + "/final"
    assert start["tuna_cp_39k"] == configs["tuna_c"].train.output_dir + "/final"
    assert configs["tuna"].data.train != configs["tuna_c"].data.train  # Tuna_p's samples, not Alpaca's
    assert all(c.data.max_examples is None for c in configs.values())  # no seeded random subsets

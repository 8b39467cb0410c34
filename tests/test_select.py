"""Data selection (data/select.py): first:N, last:N, range:A:B of a file, in training sources."""
import pytest

from tuna_jax.data.records import read_records
from tuna_jax.data.select import Selection, split_source
from tuna_jax.io.errors import InputError

from train_utils import write_jsonl


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


def test_training_reads_only_the_selected_rows(tmp_path):
    path = str(write_jsonl(tmp_path / "r.jsonl", rows(10)))
    got, _ = read_records({"path": path, "select": "last:4"}, kind="ranking")
    assert [r.instruction for r in got] == ["i6", "i7", "i8", "i9"]
    assert got[0].source.startswith(f"{path}:7")  # errors and reports still name the file's own line

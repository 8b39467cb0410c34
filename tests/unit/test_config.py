"""The one config system (tuna_jax/config.py): typed, range-checked values; errors name the place and key."""
import dataclasses
import typing

import pytest

from tests.support.train_utils import REPO
from tuna_jax.cli import main as cli
from tuna_jax.config import CHOICES, LIMITS, Config, ConfigError, Limit, load_config
from tuna_jax.eval import run as eval_run

TINY_RANKING = str(REPO / "configs" / "tiny_ranking.yaml")


@pytest.mark.parametrize("override,message", [
    ("train.global_batch=eight", "train.global_batch='eight': expected an integer"),
    ("train.save_every=0", "train.save_every=0: must be >= 1"),
    ("train.epochs=0", "train.epochs=0: must be >= 1"),
    ("train.max_steps=0", "train.max_steps=0: must be >= 1"),
    ("optim.lr=nan", "optim.lr=nan: must be a finite number"),
    ("optim.lr=inf", "optim.lr=inf: must be a finite number"),
    ("optim.lr=-1e-5", "optim.lr=-1e-05: must be >= 0"),
    ("loss.margin=-0.1", "loss.margin=-0.1: must be >= 0"),
    ("data.max_len=1", "data.max_len=1: must be >= 2"),
    ("data.num_candidates=0", "data.num_candidates=0: must be >= 1"),
    ("train.grad_accum=0", "train.grad_accum=0: must be >= 1"),
    ("optim.b2=1", "optim.b2=1.0: must be in [0, 1)"),
    ("data.eval_fraction=1", "data.eval_fraction=1.0: must be in [0, 1)"),
    ("train.progress=yes please", "train.progress='yes please': expected true or false"),
    ("train.mesh=8", "train.mesh=8: expected a string (quote it)"),
    ("data.train=5", "data.train=5: expected a string or a list"),
    ("optim=3", "optim must be a mapping of keys (a section), got 3"),
])
def test_bad_values_are_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(TINY_RANKING, [override])
    assert str(e.value) == f"command line: {message}"


def test_good_values_are_typed():
    cfg = load_config(TINY_RANKING, ["optim.lr=1e-5", "train.max_steps=1e3", "data.train=[a.jsonl, b.jsonl]",
                                     "train.max_steps=null", "loss.margin=0", "optim.lr=0"])
    assert cfg.optim.lr == 0.0 and cfg.train.max_steps is None and cfg.data.train == ["a.jsonl", "b.jsonl"]
    assert load_config(TINY_RANKING, ["train.max_steps=1e3"]).train.max_steps == 1000
    assert type(cfg.model.hf_config) is dict  # plain dicts: the config is dumped to YAML as it is


def test_a_file_value_is_named_by_file_and_line_even_in_a_base_file(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("optim:\n  lr: 1e-5\n  warmup_steps: 2\n")
    top = tmp_path / "stage.yaml"
    top.write_text("base: base.yaml\ntrain:\n  mode: ranking\n  save_every: 0\n")
    with pytest.raises(ConfigError) as e:
        load_config(top)
    assert str(e.value) == f"{top}:4: train.save_every=0: must be >= 1"
    base.write_text("optim:\n  lr: 1e-5\n  warmup_steps: -2\n")
    top.write_text("base: base.yaml\n")
    with pytest.raises(ConfigError) as e:
        load_config(top)
    assert str(e.value) == f"{base}:3: optim.warmup_steps=-2: must be >= 0"
    top.write_text("base: base.yaml\noptim:\n  warmup_steps: 3\n")  # the stage's own value wins
    assert load_config(top).optim.warmup_steps == 3 and load_config(top).optim.lr == 1e-5
    top.write_text("train:\n  epochs: 1\ntrain:\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=r"stage\.yaml:3: key 'train' given twice \(first at line 1\)"):
        load_config(top)
    top.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match=r"stage\.yaml:\d+: not valid YAML"):
        load_config(top)


def _numbers(cls, section=""):
    """(section, key) of every int / float field of a dataclass schema, nested sections included."""
    out = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out += _numbers(tp, f.name)
        elif {int, float} & ({tp} | set(typing.get_args(tp))):
            out.append((section, f.name))
    return out


def test_every_number_of_the_training_config_has_a_range():
    missing = [f"{s}.{k}" for s, k in _numbers(Config) if (s, k) not in LIMITS]
    assert not missing, f"add a row for each to LIMITS in tuna_jax/config.py: {missing}"
    fields = {(s, k) for s, k in _numbers(Config)}
    assert set(LIMITS) <= fields, set(LIMITS) - fields
    sections = {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}
    for s, k in CHOICES:
        assert k in {f.name for f in dataclasses.fields(sections[s])}, (s, k)


def test_limit_wording():
    assert [str(x) for x in (Limit(1), Limit(0, lo_open=True), Limit(0, 1, hi_open=True), Limit(0, 1, True))] == \
        [">= 1", "> 0", "in [0, 1)", "in (0, 1]"]
    assert Limit(0, 1, True).allows(1) and not Limit(0, 1, True).allows(0)


def test_the_train_command_stops_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli(["train", TINY_RANKING, f"train.output_dir={out}", "train.epochs=0"])
    err = capsys.readouterr().err
    assert rc == 2 and err == "tuna-jax train: error: command line: train.epochs=0: must be >= 1\n"
    assert not out.exists()


def test_the_eval_config_uses_the_same_checks(tmp_path):
    p = tmp_path / "e.yaml"
    p.write_text(f"output_dir: {tmp_path / 'o'}\nmodels:\n  - {{name: m, path: {tmp_path}}}\n"
                 f"lmentry: {{data: {tmp_path}}}\ngeneration:\n  top_p: 0\n")
    with pytest.raises(ConfigError, match=r"e\.yaml:6: generation\.top_p=0\.0: must be in \(0, 1\]"):
        eval_run.load_eval_config(p)
    with pytest.raises(ConfigError, match=r"^command line: generation\.batch_size='many': expected an integer$"):
        eval_run.load_eval_config(p, ["generation.top_p=1", "generation.batch_size=many"])
    with pytest.raises(ConfigError, match=r"e\.yaml:3: models\[0\]\.template='chat': choose one of alpaca, raw"):
        p.write_text(p.read_text().replace("path: ", "template: chat, path: "))
        eval_run.load_eval_config(p)

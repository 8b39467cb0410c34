"""`tuna-jax convert orbax-to-hf` as a user runs it on the shipped stories260K model: the export loads in
transformers with a chat template that gives the exact training prompt, files have normal permissions,
the target folder is protected, and damaged safetensors files are one line."""
import json
import os
import stat

import pytest

from tuna_jax.assets import stories260k_hf_dir
from tuna_jax.cli import main as cli
from tuna_jax.data.templates import SpecialTokenPolicy, encode_prompt, format_prompt, load_tokenizer


@pytest.fixture(scope="module")
def hf_and_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    hf = stories260k_hf_dir(root / "cache")
    assert cli(["convert", "hf-to-orbax", str(hf), str(root / "ckpt")]) == 0
    return hf, root / "ckpt"


def test_export_has_the_alpaca_chat_template_and_normal_permissions(hf_and_ckpt, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    hf, ckpt = hf_and_ckpt
    out = tmp_path / "hf-out"
    assert cli(["convert", "orbax-to-hf", str(ckpt), str(out), "--like", str(hf)]) == 0
    umask = os.umask(0)
    os.umask(umask)
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f  # safetensors alone writes 0600
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    ours = load_tokenizer(str(out))
    for instruction, inp in [("Tell me a story about a cat.", ""), ("Translate.", "Good morning")]:
        msg = {"role": "user", "content": instruction, **({"input": inp} if inp else {})}
        text = tok.apply_chat_template([msg], tokenize=False, add_generation_prompt=True)
        assert text == tok.bos_token + format_prompt(instruction, inp)
        ids = tok.apply_chat_template([msg], tokenize=True, add_generation_prompt=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        assert list(ids) == encode_prompt(ours, format_prompt(instruction, inp), SpecialTokenPolicy())
    with pytest.raises(Exception, match="roles user"):
        tok.apply_chat_template([{"role": "system", "content": "x"}], tokenize=False)


def test_readme_generation_from_an_export_runs(hf_and_ckpt, tmp_path):
    """The transformers snippet of docs/workflow.md ("Take it home"), as written there, on an export."""
    pytest.importorskip("torch")
    hf, ckpt = hf_and_ckpt
    out = tmp_path / "tuna-hf"
    assert cli(["convert", "orbax-to-hf", str(ckpt), str(out), "--like", str(hf)]) == 0
    readme = open(os.path.join(os.path.dirname(__file__), "..", "..", "..", "docs", "workflow.md")).read()
    snippet = readme.split("<!-- export-generate -->")[1].split("```python")[1].split("```")[0]
    snippet = snippet.replace('"out/tuna-7b-hf"', repr(str(out)))
    scope: dict = {}
    exec(compile(snippet, "docs/workflow.md", "exec"), scope)  # noqa: S102 - our own docs
    assert isinstance(scope["answer"], str)


def test_export_target_is_protected(hf_and_ckpt, tmp_path, capsys):
    hf, ckpt = hf_and_ckpt
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert cli(["convert", "orbax-to-hf", str(ckpt), str(out), "--like", str(hf)]) == 2
    err = capsys.readouterr().err
    assert "not empty (1 entries); pass --overwrite" in err and err.count("\n") == 1
    assert os.listdir(out) == ["notes.txt"]
    for target in (ckpt, hf):  # the folder being read
        assert cli(["convert", "orbax-to-hf", str(ckpt), str(target), "--like", str(hf), "--overwrite"]) == 2
        assert "the export folder is the folder being read" in capsys.readouterr().err
    # --overwrite replaces an earlier export and removes its stale shards
    (out / "model-00001-of-00003.safetensors").write_bytes(b"old")
    assert cli(["convert", "orbax-to-hf", str(ckpt), str(out), "--like", str(hf), "--overwrite"]) == 0
    assert "model-00001-of-00003.safetensors" not in os.listdir(out) and "model.safetensors" in os.listdir(out)
    assert cli(["convert", "hf-to-orbax", str(hf), str(hf)]) == 2
    assert "the checkpoint folder is the HF folder being read" in capsys.readouterr().err


@pytest.mark.parametrize("cut", [5, 0.5])
def test_truncated_safetensors_is_one_line(hf_and_ckpt, tmp_path, capsys, cut):
    import shutil

    hf, _ = hf_and_ckpt
    bad = tmp_path / "bad-hf"
    shutil.copytree(hf, bad)
    f = bad / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:cut if isinstance(cut, int) else int(len(data) * cut)])
    assert cli(["convert", "hf-to-orbax", str(bad), str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{f}: not a readable safetensors file" in err and "truncated" in err
    assert not (tmp_path / "ck").exists()


def test_bad_config_json_names_file_and_line(hf_and_ckpt, tmp_path, capsys):
    import shutil

    hf, _ = hf_and_ckpt
    bad = tmp_path / "bad-hf"
    shutil.copytree(hf, bad)
    (bad / "config.json").write_bytes(b'{\n  "hidden_size": 64,\n  "name": "caf\xe9"\n}')
    assert cli(["convert", "hf-to-orbax", str(bad), str(tmp_path / "ck")]) == 2
    assert f"{bad / 'config.json'}:3: not UTF-8 text" in capsys.readouterr().err
    (bad / "config.json").write_text('{\n  "hidden_size": 64,\n}')
    assert cli(["convert", "hf-to-orbax", str(bad), str(tmp_path / "ck")]) == 2
    assert f"{bad / 'config.json'}:3: not valid JSON" in capsys.readouterr().err
    json.loads((hf / "config.json").read_text())  # the original is untouched

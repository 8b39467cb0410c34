"""tuna_jax.io.paths: the same operations on a local folder and on gs:// (fake-gcs-server, a real Cloud Storage API on
127.0.0.1: tests/support/fake_gcs.py)."""
import os

import pytest

from tests.support.fake_gcs import bucket, gcs_server, read_object  # noqa: F401  (fixtures)
from tuna_jax.io import paths
from tuna_jax.io.errors import InputError


@pytest.fixture(params=["local", "gs"])
def where(request, tmp_path):
    """A folder of each kind: (the path users give, a function reading the bytes stored under a name in it, raising
    FileNotFoundError when there are none; for gs://, read from the server, not through gcsfs)."""
    if request.param == "local":
        def read(rel):
            with open(tmp_path / "out" / rel, "rb") as f:
                return f.read()
        yield str(tmp_path / "out"), read
    else:
        name, server = request.getfixturevalue("bucket"), request.getfixturevalue("gcs_server")
        yield f"gs://{name}/out", lambda rel: read_object(server, name, f"out/{rel}")


def test_the_same_operations_on_both_kinds(where, tmp_path):
    p, read = where
    paths.makedirs(paths.join(p, "sub"))
    paths.write_text(paths.join(p, "a.txt"), "alpha\n")
    paths.write_atomic(paths.join(p, "sub", "b.json"), '{"b": 1}\n')
    assert read("a.txt") == b"alpha\n"  # the bytes are where the URI says
    assert read("sub/b.json") == b'{"b": 1}\n'
    with pytest.raises(FileNotFoundError):
        read("sub/b.json.tmp")
    assert paths.read_text(paths.join(p, "a.txt")) == "alpha\n" and paths.size(paths.join(p, "a.txt")) == 6
    assert paths.is_file(paths.join(p, "a.txt")) and not paths.is_file(paths.join(p, "sub"))
    assert paths.is_dir(paths.join(p, "sub")) and not paths.exists(paths.join(p, "nope"))
    assert paths.listdir(p) == ["a.txt", "sub"] and paths.glob(p, "*.txt") == [paths.join(p, "a.txt")]
    paths.replace(paths.join(p, "a.txt"), paths.join(p, "c.txt"))
    assert paths.listdir(p) == ["c.txt", "sub"]
    paths.copy_file(paths.join(p, "c.txt"), str(tmp_path / "copied.txt"))
    assert (tmp_path / "copied.txt").read_text() == "alpha\n"
    paths.remove(paths.join(p, "c.txt"))
    paths.remove(paths.join(p, "c.txt"))  # missing_ok
    assert paths.listdir(p) == ["sub"]
    assert paths.parent(paths.join(p, "sub", "b.json")) == paths.join(p, "sub")
    assert paths.basename(paths.join(p, "sub", "b.json")) == "b.json"
    with paths.staged_dir(paths.join(p, "staged")) as local:
        open(os.path.join(local, "x.bin"), "wb").write(b"\x00\x01")
        os.makedirs(os.path.join(local, "inner"))
        open(os.path.join(local, "inner", "y.txt"), "w").write("y")
    assert read("staged/x.bin") == b"\x00\x01" and read("staged/inner/y.txt") == b"y"
    paths.rmtree(paths.join(p, "staged"))
    assert not paths.exists(paths.join(p, "staged"))
    with pytest.raises(FileNotFoundError):
        read("staged/x.bin")


def test_a_uri_is_never_a_local_folder(bucket, gcs_server, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    assert str(paths.resolve(f"gs://{bucket}/run/x")) == f"gs://{bucket}/run/x"
    assert str(paths.resolve("rel/x")) == str(tmp_path / "rel" / "x")
    paths.write_text(f"gs://{bucket}/run/x", "1")
    assert read_object(gcs_server, bucket, "run/x") == b"1" and not os.path.exists(tmp_path / "gs:")
    assert paths.parent("gs://bkt") == "gs://bkt" and paths.is_remote("gs://bkt") and not paths.is_remote("/gs:/b")


def test_local_copy_fetches_a_remote_file_or_folder_once(bucket, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("TUNA_JAX_CACHE", str(tmp_path / "cache"))
    g = f"gs://{bucket}"
    paths.write_text(f"{g}/tok/tokenizer.json", "{}")
    paths.write_text(f"{g}/tok/sub/extra.txt", "e")
    local = paths.local_copy(f"{g}/tok")
    assert local.startswith(str(tmp_path / "cache")) and sorted(os.listdir(local)) == ["sub", "tokenizer.json"]
    assert open(os.path.join(local, "sub", "extra.txt")).read() == "e"
    assert paths.local_copy(str(tmp_path)) == str(tmp_path)  # local: itself
    f = paths.local_copy(f"{g}/tok/tokenizer.json")
    assert open(f).read() == "{}"
    with pytest.raises(FileNotFoundError):
        paths.local_copy(f"{g}/missing.json")


def test_what_object_storage_cannot_do_is_one_line():  # refused before any request: no bucket needed
    with pytest.raises(InputError, match=r"gs://bkt/x\.jsonl: cannot be appended to in object storage"):
        paths.open("gs://bkt/x.jsonl", "a")
    with pytest.raises(InputError, match=r"^--store gs://bkt/s\.jsonl: the store grows .*; give a local path$"):
        paths.require_local("gs://bkt/s.jsonl", "--store", "the store grows as replies arrive", "give a local path")
    paths.require_local("local.jsonl", "--store", "x", "y")
    with pytest.raises(InputError, match=r"ftp://h/x: ftp:// is not a storage scheme"):
        paths.exists("ftp://h/x")


def test_a_missing_storage_package_is_one_line(monkeypatch):
    import fsspec

    def missing(protocol):
        raise ImportError(f"Install {protocol}fs")

    monkeypatch.setattr(fsspec, "get_filesystem_class", missing)
    monkeypatch.setattr(paths, "_checked", set())
    monkeypatch.setattr(paths.importlib.util, "find_spec", lambda name: None)  # no TensorFlow either
    with pytest.raises(InputError, match=r"^gs://bkt/x: gs:// paths need the gcsfs package: pip install gcsfs "
                                         r"google-cloud-storage \(or pip install 'tuna-jax\[gcs\]'\)$"):
        paths.exists("gs://bkt/x")

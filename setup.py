"""tuna-jax: Tuna (instruction tuning with feedback from LLMs) in JAX/Flax."""
from setuptools import find_packages, setup

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
    install_requires=[
        "jax>=0.6",
        "flax>=0.11",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "numpy",
        "safetensors>=0.4",
        "transformers>=4.45",
        "sentencepiece",
        "protobuf",
        "rouge-score",
        "pyyaml",
        "tqdm",
        "matplotlib",  # the evaluation report's PNG chart
    ],
    extras_require={
        # HF parity tests need PyTorch; 2.13.0 has a CPU wheel (unpinned torch pulls CUDA).
        "test": ["pytest>=8", "pytest-xdist", "torch==2.13.0", "peft"],  # peft: the LoRA adapter format's reference
        # The OpenAI-compatible client uses only the standard library (urllib); the extra stays
        # so `pip install tuna-jax[api]` keeps working if a dependency is ever needed.
        "api": [],
        "tfds": ["tensorflow-datasets", "tensorflow-cpu"],
        "datasets": ["datasets"],
        "tensorboard": ["tensorboardX"],
        # gs:// paths: gcsfs for etils.epath (tuna-jax's own files, Orbax's metadata) and the Cloud Storage
        # client Orbax asks about the bucket's layout; Orbax writes the arrays through TensorStore itself.
        "gcs": ["gcsfs", "google-cloud-storage"],
        # `tuna-jax plan --topology v5e-16` compiles for TPU topologies on any host: libtpu, pinned to the jax
        # it compiles with (jax[tpu] of another version would bring a libtpu that jax does not load).
        "plan": ["jax[tpu]==0.10.2"],
    },
    entry_points={"console_scripts": ["tuna-jax=tuna_jax.cli:main"]},
)

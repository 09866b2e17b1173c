"""tfusion: Transfusion pretraining in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="tfusion",
    version="0.1.0",
    description="Transfusion (text + image diffusion in one transformer) pretraining in JAX/Flax",
    packages=find_packages(include=["tfusion", "tfusion.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "grain>=0.2.18,<0.3",
        "tensorflow-datasets>=4.9.10,<5",
        "sentencepiece>=0.2.3,<0.3",
        "ml-collections>=1.1,<2",
        "absl-py>=2.5,<3",
        "chex>=0.1.92,<0.2",
        "numpy>=2.4,<3",
        "pillow>=13,<14",          # PNG encoding for TFDS image features and sample grids
        "tensorboardX>=2.6.5,<3",  # TensorBoard event files without TensorFlow
        "tqdm>=4.70,<5",           # progress bar with ETA
        "safetensors>=0.8,<0.9",   # VAE / LPIPS weights in the format diffusers and torch users exchange
        "scipy>=1.17,<2",          # connected components (ndimage) of the shapes checker; already a jax dependency
        "tokenizers>=0.23,<0.24",  # CLIP's BPE from a Hugging Face tokenizer.json (CLIP score), no torch
        "matplotlib>=3.11,<4",     # the scaling plot of an ablation with methods (log-log trendlines per metric)
    ],
    extras_require={
        "test": ["pytest>=9.2,<10", "pytest-xdist>=3.8,<4", "scipy>=1.17,<2"],
        # TPU runtime; on a machine without TPUs it still compiles for TPU topologies (tfusion.aot).
        "tpu": ["jax[tpu]>=0.10,<0.11"],
    },
)

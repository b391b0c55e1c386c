"""Build and install lowrank.

Runtime needs only torch, numpy, safetensors, huggingface_hub and (on Linux) triton. The
peers used as test oracles and benchmark baselines live in the `test` and `bench` extras.
The C++/CUDA extension lowrank._C arrives with csrc/ (see docs/architecture.md); until
then this is a pure-Python package.
"""

from setuptools import find_packages, setup

setup(
    name="lowrank",
    version="0.1.0.dev0",
    description="Parameter-efficient fine-tuning layers (LoRA, adapters, prefix/prompt tuning) and NF4 kernels for PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["lowrank", "lowrank.*"]),
    install_requires=[
        "torch>=2.4",
        "numpy",
        "safetensors",
        "huggingface_hub",
        'triton; platform_system == "Linux"',
    ],
    extras_require={
        # oracles: the peer libraries our results must equal or beat
        "test": ["pytest>=8", "hypothesis>=6.100", "bitsandbytes>=0.50,<0.51", "torchao>=0.10"],
        "bench": ["bitsandbytes>=0.50,<0.51", "torchao>=0.10", "matplotlib"],
    },
)

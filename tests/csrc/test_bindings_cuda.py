"""csrc/bindings_cuda.cpp is built only against a CUDA torch, so a GPU-less CI never compiled it:
a change there was first compiled on the rented GPU. This compiles it here, syntax only, against
this torch's headers (a CPU wheel ships ATen's CUDA headers too), nvcc's CUDA runtime headers, and
stand-ins for the five CUDA library headers ATen/cuda/CUDAContext.h includes (cuda_stubs/:
handle and status types only, which is all the file needs)."""

import pathlib
import shutil
import subprocess
import sysconfig

import pytest
import torch.utils.cpp_extension as ext

ROOT = pathlib.Path(__file__).resolve().parents[2]


def cuda_include() -> pathlib.Path | None:
    nvcc = shutil.which("nvcc")
    for home in ([pathlib.Path(nvcc).resolve().parents[1]] if nvcc else []) + sorted(pathlib.Path("/usr/local").glob("cuda*")):
        if (home / "include" / "cuda_runtime_api.h").is_file():
            return home / "include"
    return None


def compile_syntax(source: pathlib.Path) -> subprocess.CompletedProcess:
    includes = [*ext.include_paths(), str(ROOT / "tests" / "csrc" / "cuda_stubs"), str(cuda_include()),
                sysconfig.get_paths()["include"], str(ROOT / "csrc")]
    return subprocess.run([shutil.which("g++") or "g++", "-std=c++17", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=_C",
                           "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",  # a header the CPU wheel does not ship (build macros)
                           *(f"-I{i}" for i in includes), str(source)], capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++")
@pytest.mark.skipif(cuda_include() is None, reason="no CUDA runtime headers (nvcc is not installed)")
def test_bindings_cuda_compiles(tmp_path):
    assert (pathlib.Path(ext.include_paths()[0]) / "ATen" / "cuda" / "CUDAContext.h").is_file()
    done = compile_syntax(ROOT / "csrc" / "bindings_cuda.cpp")
    assert done.returncode == 0, done.stderr[-4000:]
    broken = tmp_path / "bindings_cuda.cpp"  # the check can fail: a name the headers do not declare
    broken.write_text((ROOT / "csrc" / "bindings_cuda.cpp").read_text().replace("kGemvMmaStaged2", "kGemvMmaStaged9"))
    assert compile_syntax(broken).returncode != 0

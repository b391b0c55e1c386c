"""The C++ CPU kernels build with other compilers than this machine's GCC: Clang on x86-64 (as on
an Intel Mac or with CC=clang; Clang ignores `#pragma GCC target`, csrc/nf4_cpu_target.h) and any
compiler for aarch64 (Linux on ARM, a Grace Hopper node, an Apple Silicon Mac), where the x86
files compile to nothing and the portable kernels of nf4_cpu.cpp take every call. Object code,
not syntax only: Clang reports an intrinsic used outside its target only when it generates code.
Each compiler that is not installed is a skip (`.ci/run` installs them when it can)."""

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SOURCES = ["nf4_cpu.cpp", "nf4_cpu_avx2.cpp", "nf4_cpu_avx512.cpp"]  # the kernels include no torch header
COMPILERS = {
    "clang-x86_64": ["clang++"],
    "gcc-aarch64": ["aarch64-linux-gnu-g++"],
    "clang-aarch64": ["clang++", "--target=aarch64-linux-gnu", "-I/usr/aarch64-linux-gnu/include"],
}


def compile_object(command: list[str], source: pathlib.Path, out: pathlib.Path) -> subprocess.CompletedProcess:
    # The flags of setup.py that matter to the code (-O3 would only take longer here).
    return subprocess.run([*command, "-std=c++20", "-O1", "-ffp-contract=off", f"-I{ROOT / 'csrc'}", "-c", str(source),
                           "-o", str(out)], check=False, capture_output=True, text=True, timeout=600)


def available(name: str) -> bool:
    if shutil.which(COMPILERS[name][0]) is None:
        return False
    if name == "clang-aarch64":  # Clang targets aarch64 only with that target's C++ headers installed
        return pathlib.Path("/usr/aarch64-linux-gnu/include").is_dir()
    return True


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("compiler", list(COMPILERS))
def test_cpu_kernels_compile(compiler, source, tmp_path):
    if not available(compiler):
        pytest.skip(f"{COMPILERS[compiler][0]} (or its aarch64 headers) is not installed")
    done = compile_object(COMPILERS[compiler], ROOT / "csrc" / source, tmp_path / "k.o")
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "k.o").stat().st_size > 0


@pytest.mark.skipif(not available("clang-x86_64"), reason="clang++ is not installed")
def test_the_clang_check_can_fail(tmp_path):
    """Without the Clang target region, the AVX2 file must not compile: the check sees the problem."""
    text = (ROOT / "csrc" / "nf4_cpu_avx2.cpp").read_text()
    assert 'LOWRANK_TARGET_PUSH("avx2,fma,f16c")' in text
    broken = tmp_path / "nf4_cpu_avx2.cpp"
    broken.write_text(text.replace('LOWRANK_TARGET_PUSH("avx2,fma,f16c")', "").replace("LOWRANK_TARGET_POP()", ""))
    done = compile_object(COMPILERS["clang-x86_64"], broken, tmp_path / "k.o")
    assert done.returncode != 0 and "requires target feature" in done.stderr

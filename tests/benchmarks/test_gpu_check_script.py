"""benchmarks/gpu_check.sh, read as a program and run dry on the CPU (python3 and nvidia-smi
stubbed): the gpu tests it selects cover every test marked gpu, the paths it names exist, each
PART leaves at most 8 files under $OUT (what the device tool brings back)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
GPU_MARK = re.compile(r"pytest\.mark" + r"\.gpu\b")  # split: this file has no gpu tests of its own
pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None
                                or not Path("/proc/self/cmdline").exists(),
                                reason="needs bash, coreutils' timeout and /proc")


def commands() -> list[str]:
    """The script's lines with backslash continuations joined."""
    return SCRIPT.read_text().replace("\\\n", " ").splitlines()


def selected_test_paths() -> list[str]:
    """Every tests/... argument of a $PYTEST command (not of --deselect)."""
    paths = []
    for line in commands():
        if "$PYTEST" in line:
            words = line.split("$PYTEST", 1)[1].split()
            paths += [w for i, w in enumerate(words) if w.startswith("tests/") and words[i - 1] != "--deselect"]
    return paths


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_every_file_with_gpu_tests_is_run_and_every_named_path_exists():
    paths = selected_test_paths()
    missing = [p for p in paths if not (ROOT / p.split("::")[0]).exists()]
    assert not missing, f"gpu_check.sh names test paths that do not exist: {missing}"
    marked = sorted(str(f.relative_to(ROOT)) for f in (ROOT / "tests").rglob("test_*.py")
                    if GPU_MARK.search(f.read_text()))
    uncovered = [f for f in marked if not any(f == p or f.startswith(p.rstrip("/") + "/") for p in paths)]
    assert not uncovered, f"tests marked gpu that gpu_check.sh never runs: {uncovered}"
    for node in re.findall(r"--deselect (\S+)", "\n".join(commands())):  # a deselected test exists
        file, name = node.split("::")
        assert f"def {name}(" in (ROOT / file).read_text(), node


STUB = r"""#!/bin/bash
# python3 / nvidia-smi of the dry run. Notes in $STUB_LOG its name, the command that started it (the
# `timeout` with its limit, where there is one) and its arguments; writes --out (and the .md / .png a
# benchmark writes beside it) where it is under $OUT; the steps whose results go to bench.log only name
# a file in /tmp, left alone here. STUB_NO_C=1: lowrank._C does not import (a failed build);
# STUB_PYTHON: `python3 -c` runs there, with STUB_PYTHONPATH (fake packages) as its path.
parent=$(tr '\0' '\n' < /proc/$PPID/cmdline | head -2 | tr '\n' ' ')
printf '%s|%s|%s\n' "${0##*/}" "$parent" "$(echo "$*" | tr '\n' ' ')" >> "$STUB_LOG"
case "$*" in *"from lowrank import _C"*)
  [ -n "${STUB_NO_C:-}" ] && { echo "ModuleNotFoundError: No module named 'lowrank._C'"; exit 1; } ;;
esac
[ -n "${STUB_PYTHON:-}" ] && [ "${1:-}" = -c ] && PYTHONPATH=$STUB_PYTHONPATH exec "$STUB_PYTHON" "$@"
out=""; prev=""
for a in "$@"; do [ "$prev" = --out ] && out=$a; prev=$a; done
case "$out" in "$OUT"/*) echo '{}' > "$out"; echo x > "${out%.json}.md"; echo x > "${out%.json}.png" ;; esac
exit 0
"""


def dry_run(tmp_path, **env) -> tuple[subprocess.CompletedProcess, list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("python3", "nvidia-smi"):
        (bin_dir / name).write_text(STUB)
        (bin_dir / name).chmod(0o755)
    out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(out), "STUB_LOG": str(out) + ".calls",
           **env}
    run = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    return run, sorted(p.name for p in out.iterdir()) if out.exists() else []


@pytest.mark.parametrize("part", ["quick", "1", "2", "all", "extras"])
def test_each_part_leaves_at_most_8_files(tmp_path, part):
    # every optional step on too, but PROFILE and CUDAGRAPHS (the script says each costs a file)
    extras = dict.fromkeys(["PYOPS", "MMA", "OPCALLS", "DROPOUT", "ADAPTERS", "MOE", "OPTIM", "DECODE", "KTIME"], "1")
    run, files = dry_run(tmp_path, PART=part, **extras)
    assert run.returncode == 0, run.stdout + run.stderr
    assert len(files) <= 8 and "env.txt" in files, files
    assert not [f for f in files if f.endswith((".md", ".png", ".tmp"))], files
    assert ("build.log" in files) == (part != "2") and ("nf4_linear.json" in files) == (part in ("2", "all"))
    # extras: the build, then the optional steps alone (no core step's JSON), so that they fit one call
    assert ("nf4_cuda.json" in files) == (part in ("quick", "1", "all"))
    assert "bench_qlora_moe" in run.stdout and "bench_optim" in run.stdout and "bench_decode --device cuda" in run.stdout
    assert "bench_nf4_linear --kernel-time" in run.stdout


def test_a_wrong_part_is_refused(tmp_path):
    run, _ = dry_run(tmp_path, PART="3")
    assert run.returncode == 2 and "PART must be all, 1, 2, quick or extras, got 3" in run.stdout


def calls(tmp_path, **env) -> tuple[subprocess.CompletedProcess, list[tuple[str, str, str]], Path]:
    """A dry run and each python3 / nvidia-smi call it made: (name, its parent's first two words, args)."""
    run, _ = dry_run(tmp_path, **env)
    out = sorted(p for p in tmp_path.iterdir() if p.name.startswith("out-") and p.is_dir())[-1]
    log = Path(str(out) + ".calls").read_text().splitlines()
    return run, [tuple(line.split("|", 2)) for line in log], out


@pytest.mark.parametrize("part", ["quick", "1", "2", "all"])
def test_every_call_has_a_limit_and_the_header_sums_them(tmp_path, part):
    """The device tool stops a call at 600 s: PART=1 and PART=2 must fit it at every limit, PART=quick
    the docs' timeout_s=480. The pip install and the _C check ran without a limit, and the header said
    600 s for PART=1 where its limits made 620 s and more."""
    run, made, _ = calls(tmp_path, PART=part)
    assert run.returncode == 0, run.stdout + run.stderr
    unlimited = [(name, args) for name, parent, args in made if parent.split()[0].rsplit("/", 1)[-1] != "timeout"]
    assert not unlimited, unlimited
    total = sum(int(parent.split()[1]) for _, parent, _ in made)
    header = SCRIPT.read_text().split("# Budget at every limit", 1)[1].split("# PART=1 / PART=2", 1)[0]
    said = {"1": r"PART=1:.*?= (\d+) s in all", "quick": r"PART=quick:.*?(\d+) s in all",
            "2": r"PART=2:.*?= (\d+) s in all", "all": r"PART=all: both, (\d+) s"}[part]
    assert int(re.search(said, header, re.S).group(1)) == total, (part, total)
    assert total <= {"1": 590, "2": 590, "quick": 470, "all": 10**4}[part], total


def test_without_cuda_in_lowrank_C_its_tests_are_left_out_once(tmp_path):
    """A failed build: tests/csrc/test_cuda_kernels.py gave an ImportError for each of its 401 tests."""
    run, made, out = calls(tmp_path, PART="quick", STUB_NO_C="1")
    assert run.returncode == 1, run.stdout + run.stderr  # the kernels the run is for are missing
    tests_log = (out / "tests.log").read_text()
    assert tests_log.count("lowrank._C has no CUDA kernels") == 1, tests_log
    pytests = [args for _, _, args in made if args.startswith("-m pytest")]
    assert len(pytests) == 1 and "--ignore=tests/csrc/test_cuda_kernels.py" in pytests[0], pytests
    assert " tests/csrc " in pytests[0] + " "  # the other csrc gpu tests still run (they skip without _C)
    run, made, out = calls(tmp_path, PART="quick")  # with it, everything runs
    pytests = [args for _, _, args in made if args.startswith("-m pytest")]
    assert len(pytests) == 2 and "--ignore" not in " ".join(pytests)
    assert "lowrank._C has no CUDA" not in (out / "tests.log").read_text()


def test_env_txt_has_each_version_without_bitsandbytes(tmp_path):
    """No wheel carried: `import bitsandbytes, peft, transformers` in one command lost peft's and
    transformers' versions too."""
    fake = tmp_path / "site"
    for name, body in [("torch", "__version__ = '9.1'\nclass version:\n    cuda = '13.0'\n"),
                       ("triton", "__version__ = '4.0'\n"), ("bitsandbytes", "raise ImportError('no wheel')\n"),
                       ("peft", "__version__ = '0.99'\n"), ("transformers", "__version__ = '6.1'\n")]:
        (fake / name).mkdir(parents=True)
        (fake / name / "__init__.py").write_text(body)
    run, _, out = calls(tmp_path, PART="2", STUB_PYTHON=sys.executable, STUB_PYTHONPATH=str(fake))
    env_txt = (out / "env.txt").read_text().splitlines()
    for line in ["torch 9.1 cuda 13.0", "triton 4.0", "peft 0.99", "transformers 6.1"]:
        assert line in env_txt, env_txt
    assert "bitsandbytes does not import: ImportError no wheel" in env_txt, env_txt

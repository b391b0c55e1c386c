"""benchmarks/bench_nf4_cpu.py where lowrank._C is not built (a failed build, LOWRANK_NO_EXT=1 at
install): it says so and exits 0, like bench_nf4_cuda.py without CUDA. It stopped with an
ImportError traceback from `from lowrank import _C`."""

import sys
from pathlib import Path

import lowrank

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_nf4_cpu  # noqa: E402


def test_without_the_extension_it_says_so_and_measures_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.delattr(lowrank, "_C", raising=False)  # `from lowrank import _C` takes the attribute first
    monkeypatch.setitem(sys.modules, "lowrank._C", None)  # ... then the import raises ImportError
    out = tmp_path / "nf4_cpu.json"
    assert bench_nf4_cpu.main(["--quick", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "bench_nf4_cpu: lowrank._C is not built" in said and "build_ext --inplace" in said, said
    assert not out.exists()

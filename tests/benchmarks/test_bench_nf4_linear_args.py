"""bench_nf4_linear's --shapes and --ms: a malformed or non-positive value is refused up front
with the value seen and the form allowed (it was a bare ValueError traceback, or, for 0, a run
that wrote rows of empty products)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_nf4_linear  # noqa: E402


@pytest.mark.parametrize("flag, value, allowed", [
    ("--shapes", "128*128", "N x K pairs of positive sizes"), ("--shapes", "0x128", "N x K pairs of positive sizes"),
    ("--shapes", "128x128x4", "N x K pairs of positive sizes"), ("--ms", "0", "positive row counts"),
    ("--ms", "1,,2", "positive row counts")])
def test_bad_values_are_refused(tmp_path, capsys, flag, value, allowed):
    out = tmp_path / "l.json"
    with pytest.raises(SystemExit) as info:
        bench_nf4_linear.main(["--quick", flag, value, "--out", str(out)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert allowed in err and repr(value) in err and not out.exists()


def test_good_values_parse():
    assert bench_nf4_linear.shapes_arg("4096x4096,4096x14336") == [(4096, 4096), (4096, 14336)]
    assert bench_nf4_linear.ms_arg("1,16") == [1, 16]

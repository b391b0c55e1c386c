"""bench_load checks that both providers loaded the same 4-bit model before comparing their peak
memory (_common, Note: check before timing): a path that loads other values (here: another
blocksize, the same number of entries) stops the run, saying how many entries differ and which."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import _common  # noqa: E402
import bench_load  # noqa: E402

linux = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS is read from /proc (Linux)")


@linux
def test_another_model_stops_the_run(tmp_path, monkeypatch):
    other = bench_load.CHILD.replace("lowrank.load_and_quantize(model, path, lowrank.NF4Config())",
                                     "lowrank.load_and_quantize(model, path, lowrank.NF4Config(blocksize=128))")
    assert other != bench_load.CHILD
    monkeypatch.setattr(bench_load, "CHILD", other)
    with pytest.raises(_common.WrongResult, match=r"skeleton\+load_and_quantize loaded another model than "
                                                  r"from_pretrained\+quantize: \d+ of \d+ state-dict entries differ"):
        bench_load.main(["--quick", "--out", str(tmp_path / "l.json")])
    assert not (tmp_path / "l.json").exists()


def test_check_same_state():
    bench_load.check_same_state({"a": {"w": "1", "b": "2"}, "b": {"w": "1", "b": "2"}})
    with pytest.raises(_common.WrongResult, match=r"b loaded another model than a: 2 of 3 .* \['c', 'w'\]"):
        bench_load.check_same_state({"a": {"w": "1", "b": "2"}, "b": {"w": "9", "b": "2", "c": "3"}})

"""bench_qlora_moe refuses an impossible routing before building anything: top-k of E experts
needs 1 <= k <= E (it failed after the models were built, in torch.topk: "selected index k out
of range")."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_qlora_moe  # noqa: E402


@pytest.mark.parametrize("experts, top_k", [(2, 4), (0, 1), (8, 0)])
def test_impossible_routing_is_refused_with_the_values(tmp_path, capsys, experts, top_k):
    with pytest.raises(SystemExit) as info:
        bench_qlora_moe.main(["--quick", "--experts", str(experts), "--top-k", str(top_k),
                              "--out", str(tmp_path / "moe.json")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--top-k in [1, --experts]" in err and f"got --experts {experts}, --top-k {top_k}" in err
    assert not (tmp_path / "moe.json").exists()

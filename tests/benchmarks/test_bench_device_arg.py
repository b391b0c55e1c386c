"""--device of bench_nf4_codec, bench_op_calls and bench_decode: cpu or cuda, refused with the value and the
choices otherwise (a RuntimeError from torch.device's parser before), and cuda refused with a
usage message where PyTorch sees no CUDA device (bench_op_calls ended in an AssertionError
deep in its first .to())."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_decode  # noqa: E402
import bench_nf4_codec  # noqa: E402
import bench_op_calls  # noqa: E402


@pytest.mark.parametrize("bench", [bench_nf4_codec, bench_op_calls, bench_decode], ids=["nf4_codec", "op_calls", "decode"])
def test_an_unknown_device_is_refused(tmp_path, capsys, bench):
    with pytest.raises(SystemExit) as info:
        bench.main(["--quick", "--device", "gpu", "--out", str(tmp_path / "x.json")])
    assert info.value.code == 2 and "invalid choice: 'gpu'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a CUDA device")
@pytest.mark.parametrize("bench", [bench_nf4_codec, bench_op_calls, bench_decode], ids=["nf4_codec", "op_calls", "decode"])
def test_cuda_without_a_cuda_device_is_refused(tmp_path, capsys, bench):
    with pytest.raises(SystemExit) as info:
        bench.main(["--quick", "--device", "cuda", "--out", str(tmp_path / "x.json")])
    assert info.value.code == 2 and "this PyTorch sees no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()

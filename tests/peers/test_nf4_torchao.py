"""The codec is no worse than torchao's NF4 (`to_nf4`) on the same weights.

torchao keeps NF4 codes with the same block absmax but stores its scales differently
(int8, linear, per 256 scales). So: with exact scales our error is at most torchao's, and
double quantization adds to it no more than the error of the scales themselves.
"""

import pytest
import torch

from lowrank import nf4

to_nf4 = pytest.importorskip("torchao.quantization.quantize_.workflows.nf4.nf4_tensor").to_nf4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1024, 1024), (512, 2816)])
def test_no_worse_than_torchao(shape, dtype):
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
    x = w.double()
    err_ao = (to_nf4(w, 64, 256).get_original_weight().double() - x).abs()
    exact = nf4.quantize(w, 64, double_quant=False)
    err_exact = (nf4.dequantize(exact, torch.float32).double() - x).abs()
    # On average, not per element: torchao's rounded scale lands some values nearer a code.
    assert err_exact.mean() <= err_ao.mean()

    dq = nf4.quantize(w, 64, double_quant=True)
    err_dq = (nf4.dequantize(dq, torch.float32).double() - x).abs()
    scale_err = (nf4.dequantize_scales(dq.absmax, dq.nested_absmax, dq.offset) - exact.absmax).abs().double()
    # |x - c a'| <= |x - c a| + |a - a'| since |c| <= 1 (docs/nf4.md), on average over blocks too
    assert err_dq.mean() <= err_exact.mean() + scale_err.mean()

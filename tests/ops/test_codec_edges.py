"""The codec at its edges: the bf16 CPU GEMV near the subnormal range (the smallest positive code), and
NF4Weight.to given a dtype."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lowrank
from lowrank.quant import nf4


def test_bf16_gemv_keeps_products_of_the_smallest_positive_code_near_the_subnormal_range():
    # The smallest nonzero |NF4| value is code 8's 0.0796, not code 6's 0.0911: with a scale just
    # above 2^-126 / (0.09 xmin) the AVX512_BF16 GEMV (csrc/nf4_cpu.cpp nf4_gemv_pack_x_bf16) took
    # the vdpbf16ps path, whose flushed subnormal weights 0.0796 * s gave 0 instead of 6.8e-7.
    s = 1.35e-37  # 2^-126 / 0.09 = 1.306e-37 < s < 2^-126 / 0.0796 = 1.476e-37
    w = torch.full((1, 64), 0.0796 * s)
    w[0, 0] = s  # the block's absmax: code 15; the rest code 8
    q = nf4.quantize(w, 64, double_quant=False)
    x = torch.full((1, 64), 1e30, dtype=torch.bfloat16)
    x[0, 0] = 0  # so the product with code 15 does not hide the others
    ref = F.linear(x, nf4.dequantize(q, torch.bfloat16))
    y = lowrank.ops.nf4_linear(x, q)
    assert ref.item() > 6e-7
    torch.testing.assert_close(y, ref, rtol=2**-7, atol=0)


def test_nf4weight_to_a_dtype_says_it_takes_a_device():
    # q.to(torch.float16) cast the uint8 codes to float16 and then failed in __post_init__ with
    # "NF4Weight.packed must hold ... torch.uint8 values ...; got (n,) torch.float16"
    q = nf4.quantize(torch.randn(4, 64))
    with pytest.raises(TypeError, match=r"takes a device, got the dtype torch.float16"):
        q.to(torch.float16)
    assert q.to("cpu").packed is q.packed

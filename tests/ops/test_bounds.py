"""The derived matmul bound of tests/ops/bounds.py holds where it must: results in the subnormal
range, which round with an absolute error (Note: underflow), and fails a result one rounding off."""

import pytest
import torch

from tests.ops.bounds import assert_matmul_close, assert_within_bound


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_the_bound_holds_for_torch_on_subnormal_results(dtype):
    # 0.5 (1 + 2^-10) times k eta_d: exact values between subnormals, which torch must round; without
    # the underflow term the float16 bound allowed 3e-11 where the rounding errs by up to 3e-8
    tiny = {torch.float16: 2.0**-24, torch.bfloat16: 2.0**-133, torch.float32: 2.0**-149}[dtype]  # the least subnormal of dtype
    a = torch.tensor([[0.5 * (1 + 2.0**-10), 0.0]]).to(dtype)
    for k in range(1, 200):
        b = torch.tensor([[k * tiny], [0.0]], dtype=torch.float64).to(dtype)
        assert_within_bound(a @ b, a, b)
        assert_matmul_close(a @ b, a @ b, a, b)


def test_the_bound_still_fails_a_result_off_by_more_than_it_allows():
    a, b = torch.randn(3, 64, dtype=torch.float16), torch.randn(64, 5, dtype=torch.float16)
    y = (a.double() @ b.double()).to(torch.float16)
    with pytest.raises(AssertionError, match="see Note: the matmul error bound"):
        assert_within_bound(y * (1 + 2.0**-6), a, b)  # eight float16 roundings off, where at most a few are allowed

"""The one tolerance every matmul test in tests/ops uses, derived rather than guessed.

# Note: the matmul error bound. Both our kernels and the reference compute y = a @ b (+ bias)
# from the SAME rounded operands (the dequantized W is bit-exact, tests/ops checks it), as
# exact products summed in float32 in some order, with the bias added, and one or two
# roundings to the output dtype (the reference may round before adding the bias). With
# y64 the float64 product of those same operands and S = |a| @ |b| + |bias|:
#
#   1. float32 sum, any order (Higham, "Accuracy and Stability", Thm 3.1, with one more
#      term for the bias and for fp32 products, which are not exact):
#          |t - y64| <= gamma * S,   gamma = n u / (1 - n u),  n = K + 2,
#      with u = 2^-23, not 2^-24: tensor cores accumulate with truncation rather than
#      round-to-nearest (Fasi et al., "Numerical behavior of NVIDIA tensor cores", 2021),
#      which doubles the unit roundoff of each addition.
#   2. a rounding to the dtype before the bias: |t' - t| <= u_d |t| <= u_d (1 + gamma) S,
#      so E = (gamma + u_d (1 + gamma)) S bounds the distance of the pre-rounding value.
#   3. the final rounding: |y - t| <= u_d |t| <= u_d (|y64| + E).
#
# Every correct implementation therefore has   err := |y - y64| <= E + u_d (|y64| + E)
# (checked for the reference too, which tests the derivation), and two of them differ by at
# most twice that, so   err_ours <= err_ref + 2 E + 2 u_d (|y64| + E),   elementwise.
# u_d is the unit roundoff of the output dtype: 2^-24 float32, 2^-11 float16, 2^-8 bfloat16.
#
# Note: underflow. Gradual (IEEE): a rounding into the subnormal range errs by up to eta, half the
# smallest subnormal, in absolute terms (fl(x) = x (1 + d) + e, |e| <= eta; an addition whose
# result is subnormal is exact). So step 1 gains n eta_32 (a float32 product of two tiny
# operands, eta_32 = 2^-150) and steps 2 and 3 eta_d each (2^-25 float16, 2^-134 bfloat16,
# 2^-150 float32): E above includes n eta_32 + eta_d, the final bound adds eta_d. Without them
# a float16 result below 2^-14 broke the bound even for torch's own a @ b (test_bounds.py).
#
# A kernel that scales partial sums instead of operands (csrc/nf4_cuda_gemv_lut.cu: each block's
# float32 sum times the block's scale, one FMA into the total) computes a @ b for ITS operand b
# (there: T(NF4[code]) * scale, exact in float64) with one more rounding on the path of every
# product per block: step 1 with n = K + 2 + blocks. assert_within_bound checks such a kernel
# against the a-priori bound E + u_d (|y64| + E) of its own operand directly.
"""

from __future__ import annotations

import torch

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
UNDERFLOW = {torch.float32: 2.0**-150, torch.float16: 2.0**-25, torch.bfloat16: 2.0**-134}  # eta: half the least subnormal
U_ACCUMULATE = 2.0**-23  # float32 accumulation that may truncate (step 1 of the Note)


def matmul_bound(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, extra_roundings: int = 0):
    """(y64, E, u_d) for y = a @ b + bias: a (M, K), b (K, N), bias (N,) or None; extra_roundings
    more float32 roundings on each product's path than a plain sum has. See Note: the matmul error bound."""
    a64, b64 = a.double(), b.double()
    y64 = a64 @ b64  # (M, K) @ (K, N) -> (M, N)
    s = a64.abs() @ b64.abs()  # (M, N)
    if bias is not None:
        y64, s = y64 + bias.double(), s + bias.double().abs()
    n = a.shape[-1] + 2 + extra_roundings
    gamma = n * U_ACCUMULATE / (1 - n * U_ACCUMULATE)
    u_d = UNIT_ROUNDOFF[a.dtype]
    underflow = n * UNDERFLOW[torch.float32] + UNDERFLOW[a.dtype]  # See Note: underflow
    return y64, (gamma + u_d * (1 + gamma)) * s + underflow, u_d


def _a_priori(y64: torch.Tensor, e: torch.Tensor, u_d: float, dtype: torch.dtype) -> torch.Tensor:
    """E + u_d (|y64| + E) + eta_d: what any correct implementation errs by at most (the Note)."""
    return e + u_d * (y64.abs() + e) + UNDERFLOW[dtype]


def assert_matmul_close(ours: torch.Tensor, ref: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias=None) -> None:
    """ours and ref both approximate a @ b + bias (a (M, K), b (K, N)): assert the reference
    meets the a-priori bound and ours is within it of the reference's own error."""
    y64, e, u_d = matmul_bound(a, b, bias)
    ours, ref = ours.reshape(y64.shape).double(), ref.reshape(y64.shape).double()
    err_ours, err_ref = (ours - y64).abs(), (ref - y64).abs()
    a_priori = _a_priori(y64, e, u_d, a.dtype)
    assert (err_ref <= a_priori).all(), f"the reference breaks the derived bound by {(err_ref - a_priori).max():.3g}"
    slack = err_ref + 2 * a_priori
    worst = (err_ours - slack).argmax()
    assert (err_ours <= slack).all(), (
        f"max |ours - exact| = {err_ours.max():.4g} vs the reference's {err_ref.max():.4g}; at flat index {int(worst)} "
        f"ours errs by {err_ours.view(-1)[worst]:.4g}, allowed {slack.view(-1)[worst]:.4g} (see Note: the matmul error bound)"
    )


def assert_within_bound(ours: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias=None, extra_roundings: int = 0) -> None:
    """ours approximates a @ b + bias for these exact operands (b may be float64): assert it is within
    the a-priori bound E + u_d (|y64| + E), u_d that of a's dtype. See Note: the matmul error bound."""
    y64, e, u_d = matmul_bound(a, b, bias, extra_roundings)
    err = (ours.reshape(y64.shape).double() - y64).abs()
    a_priori = _a_priori(y64, e, u_d, a.dtype)
    worst = (err - a_priori).argmax()
    assert (err <= a_priori).all(), (
        f"max |ours - exact| = {err.max():.4g}; at flat index {int(worst)} ours errs by {err.view(-1)[worst]:.4g}, "
        f"allowed {a_priori.view(-1)[worst]:.4g} (see Note: the matmul error bound)"
    )

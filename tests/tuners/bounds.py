"""Float32 rounding bounds (Higham, Accuracy and Stability of Numerical Algorithms, ch. 3):
with unit roundoff u = 2^-24, a computed dot product of n terms satisfies
|fl(x . y) - x . y| <= gamma(n) |x| . |y|, gamma(n) = n u / (1 - n u); each further rounded
operation on a path adds one to n."""

import torch

U32 = 2.0**-24  # float32 unit roundoff (round to nearest)


def gamma(n: int, u: float = U32) -> float:
    assert n * u < 1
    return n * u / (1 - n * u)


def lora_linear_bound(x, W, A, B, s: float, bias, extra_ops: int = 0) -> torch.Tensor:
    """Elementwise bound on |y - y_exact| for y = x W^T + b + s (x A^T) B^T computed either
    unmerged (K terms, then r terms, one scale, two adds) or merged (r terms, a scale, one add
    into W, K terms, one bias add): each path is a sum of products with at most K + r + 3
    rounded steps, so |error| <= gamma(K + r + 3 + extra_ops) * M, with
    M = |x| (|W| + |s| |B| |A|)^T + |b| the sum of the absolute values of all products."""
    K, r = W.shape[1], A.shape[0]
    M = x.abs() @ (W.abs() + abs(s) * B.abs() @ A.abs()).T  # (N, K) @ (K, out) -> (N, out)
    if bias is not None:
        M = M + bias.abs()
    return gamma(K + r + 3 + extra_ops) * M

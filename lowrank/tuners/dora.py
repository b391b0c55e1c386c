"""DoRA (Liu et al. 2024, arXiv:2402.09353): weight-decomposed low-rank adaptation.

    W' = m * (W0 + s B A) / ||W0 + s B A||_c          (eq. 5; ||.||_c: norm of each output row)

m (out,) is a trainable magnitude initialised to ||W0||_c, so a fresh adapter is the identity.
As the output of a linear layer, with n = ||W0 + s B A||_c treated as a constant (section 4.3:
no gradient flows through the norm):

    y' = (m / n) * (W0 x + s B A x) + b = y + (m / n - 1) * (W0 x) + (m / n) * s B A x

We follow PEFT 0.21's formulation op for op (the base output minus its bias stands in for
W0 x; B A is formed as B(A(I)).T) so that outputs and gradients equal PEFT's bit for bit;
see tests/peers/test_peft_lora.py.
"""

from __future__ import annotations

import torch
from torch import nn


def lora_weight(lora_A: nn.Linear, lora_B: nn.Linear) -> torch.Tensor:
    """B A as (out, in), computed through the modules as PEFT does."""
    eye = torch.eye(lora_A.weight.shape[1], device=lora_A.weight.device, dtype=lora_A.weight.dtype)  # (in, in)
    return lora_B(lora_A(eye)).T  # (in, r) -> (in, out) -> (out, in)


def weight_norm(weight: torch.Tensor, delta: torch.Tensor, scaling: float) -> torch.Tensor:
    """||W + scaling * delta||_c: the L2 norm of each output row; weight, delta (out, in) -> (out,)."""
    return torch.linalg.norm(weight + scaling * delta, dim=1).to(weight.dtype)


def delta(
    x: torch.Tensor,
    base_out: torch.Tensor | None,
    *,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: nn.Linear,
    lora_B: nn.Linear,
    scaling: float,
    magnitude: torch.Tensor,
) -> torch.Tensor:
    """What DoRA adds to the base output y: (m / n - 1) * (W0 x) + (m / n) * s B A x.

    x (..., in); weight (out, in) dense; base_out (..., out) = W0 x + b, or None when x went
    through dropout (then W0 x is recomputed from the dropped-out x, as in PEFT)."""
    lw = lora_weight(lora_A, lora_B).to(x.dtype)  # (out, in)
    n = weight_norm(weight.to(x.dtype), lw.detach(), scaling).detach()  # (out,); a constant, section 4.3
    ratio = magnitude / n  # (out,): PEFT's view(1, -1) made an unbatched x's (out,) output (1, out); same values
    lora_out = lora_B(lora_A(x))  # (..., in) -> (..., r) -> (..., out)
    if base_out is None:
        w0x = nn.functional.linear(x, weight.to(x.dtype))  # (..., out)
    else:
        w0x = base_out - bias if bias is not None else base_out  # (..., out)
    return (ratio - 1) * w0x + ratio * lora_out * scaling

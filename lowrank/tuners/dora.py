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


# DoRA on nn.Conv1d/2d/3d (groups = 1), as PEFT 0.21's _DoraConvNdLayer: W0 and B A are kernels
# (out, in, *k), ||.||_c the norm of each output channel's kernel, and m has PEFT's shape
# (1, out, 1...) (so files go both ways as they are); m / n broadcasts over the output channels
# (N, out, *L). PEFT's (1, out, 1...) ratio turns an unbatched (out, *L) output into (1, out, *L):
# ours is viewed (out, 1...), the same values in the output's own shape.

def conv_lora_weight(A: torch.Tensor, B: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """B A as a kernel of `shape` (out, in, *k) from the factors' kernels A (r, in, *k) and B (out, r, 1...),
    computed as PEFT does (B (out, r) @ A (r, in * prod(k)))."""
    r = A.shape[0]
    # reshape, not PEFT's view: a channels_last model's A (r, in, *k) is not contiguous, and view raised
    # there (PEFT 0.21 too); on a contiguous A reshape is that view, so the product is PEFT's bit for bit
    return torch.mm(B.reshape(-1, r), A.reshape(r, -1)).reshape(shape)


def conv_weight_norm(weight: torch.Tensor, delta: torch.Tensor, scaling: float) -> torch.Tensor:
    """||W + scaling * delta||_c of kernels (out, in, *k): each output channel's L2 norm, (1, out, 1...)."""
    w = weight + scaling * delta
    return w.norm(p=2, dim=tuple(range(1, w.dim())), keepdim=True).transpose(1, 0)


def conv_delta(x: torch.Tensor, base_out: torch.Tensor | None, *, base: nn.Module, lora_A: nn.Module,
               lora_B: nn.Module, scaling: float, magnitude: torch.Tensor) -> torch.Tensor:
    """What DoRA adds to a convolution's output y: (m / n - 1) * (W0 * x) + (m / n) * s B A x.

    x (N, in, *L) or unbatched (in, *L); base_out the base's output (its bias taken off here), or
    None when x went through dropout (then W0 * x is recomputed from the dropped-out x, as in PEFT)."""
    weight = base.weight  # (out, in, *k); PEFT does not cast it to x's dtype for the norm
    lw = conv_lora_weight(lora_A.weight, lora_B.weight, weight.shape)
    n = conv_weight_norm(weight, lw.detach(), scaling).detach()  # (1, out, 1...); a constant, section 4.3
    spatial = weight.dim() - 2
    ratio = (magnitude / n).view(-1, *[1] * spatial)  # (out, 1...): broadcasts over batched and unbatched outputs
    if base_out is None and type(base).forward in (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward):
        # the base's own padding (mode) and geometry; PEFT calls F.convNd, the same for zeros padding
        w0x = base._conv_forward(x, weight.to(x.dtype), None)
    else:  # base_out None: a subclass that pads in its forward (a causal conv), whose output F.convNd's would not fit
        out = base_out if base_out is not None else base(x.to(weight.dtype)).to(x.dtype)
        w0x = out - base.bias.view(-1, *[1] * spatial) if base.bias is not None else out
    return (ratio - 1) * w0x + ratio * lora_B(lora_A(x)) * scaling

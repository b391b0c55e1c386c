"""LoRA around nn.Conv1d/2d/3d, grouped (depthwise included) or not (docs/lora.md)."""

from __future__ import annotations

import contextlib

from torch import nn
from torch.nn import functional as F

from . import dora
from .lora_base import LoraLayer

# Note: LoRA on a grouped convolution. As PEFT 0.21 (lora.layer._ConvNd): A stays a dense
# convolution (in -> r channels, the base's kernel), and B, the 1x1 convolution (r -> out), takes
# the base's groups: output channel o, in group g = o // (out / groups), reads the g-th block of
# r / groups of A's channels. So r must be a multiple of groups (B's input channels are split
# in groups), and the file's B is (out, r / groups, 1...), PEFT's shapes. The update s B A is
# then a dense (out, in, *k) kernel: every output channel reads A's channels, and each of those
# reads every input channel, across the base's groups. A grouped weight (out, in / groups, *k)
# holds only the diagonal blocks, so the update cannot be merged into it (short of making the
# layer a dense convolution, which changes the model's shapes and files): merge and
# merge_and_export refuse, as PEFT's merge does; the unmerged forward is exact. DoRA is
# refused on a grouped convolution (check_groups); PEFT's DoRA there reshapes
# B.view(-1, r) @ A.view(r, -1), of another shape than the update, into the weight's shape, so
# its norms are not those of W0 + s B A. On groups = 1, DoRA is PEFT's (dora.py: conv_delta).


class LoraConv(LoraLayer):
    """LoRA around nn.Conv1d/2d/3d: A is a conv with the base's kernel, stride, padding and
    dilation (in -> r channels), B a 1x1 conv (r -> out) with the base's groups, as PEFT;
    merged (groups = 1 only), B A is one kernel. See Note: LoRA on a grouped convolution.
    DoRA (groups = 1 only) as PEFT's: m (1, out, 1...), the norms of each output channel's kernel."""


    def __init__(self, base: nn.modules.conv._ConvNd) -> None:
        super().__init__(base)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def _create(self, name, r, dtype, device):
        b = self.base
        self.lora_A[name] = _factor(b, b.in_channels, r, b.kernel_size, b.stride, b.padding).to(device, dtype)  # (r, in, *k)
        self.lora_B[name] = _factor(b, r, b.out_channels, 1, 1, 0, b.groups).to(device, dtype)  # (out, r / groups, 1...)

    def _factor_stores(self):
        return (self.lora_A, self.lora_B)

    def _factors(self, name):
        return self.lora_A[name].weight, self.lora_B[name].weight

    def _lora(self, name, x):
        return self.lora_B[name](self.lora_A[name](x))  # (N, in, *L) -> (N, r, *L') -> (N, out, *L')

    def dense_weight(self):
        return self.base.weight  # (out, in, *k)

    def _lora_matrix(self, name):
        return dora.conv_lora_weight(*self._factors(name), self.base.weight.shape)  # (out, in, *k)

    def _dora_norm(self, weight, delta, scaling):
        return dora.conv_weight_norm(weight, delta, scaling)  # (1, out, 1...)

    def _dora_delta(self, name, x, base_out):
        return dora.conv_delta(x, base_out, base=self.base, lora_A=self.lora_A[name], lora_B=self.lora_B[name],
                               scaling=self.scaling[name], magnitude=self.lora_magnitude_vector[name])

    def check_mergeable(self, name):
        b = self.base
        if b.groups != 1:  # See Note: LoRA on a grouped convolution.
            k = list(b.kernel_size)
            raise ValueError(
                f"cannot merge LoRA adapter {name!r} into a {type(b).__name__} with groups={b.groups}: its update s B A "
                f"reads every input channel for every output channel (A is dense; only B is grouped, as in PEFT), a "
                f"{[b.out_channels, b.in_channels, *k]} kernel that the grouped weight {list(b.weight.shape)} cannot "
                "hold; only convolutions with groups=1 merge. Keep the adapter unmerged (PEFT 0.21 refuses this merge too)")

    def _delta_weight(self, name, dtype=None):
        self.check_mergeable(name)  # merge and merge_and_export both form the update here
        A, B = self._factors_in(name, dtype)
        shape = self.base.weight.shape  # (out, in, *k)
        if len(shape) == 3 or tuple(shape[2:4]) != (1, 1):  # PEFT's test; a (1, 1, k) conv3d's 1x1 path fails there
            # PEFT's kernel: B convolved over A's kernel positions (A^T (in, r, *k) * B (out, r, 1...)),
            # the same sums as B A in the order PEFT rounds them, so a merge is PEFT's bit for bit
            conv = (F.conv1d, F.conv2d, F.conv3d)[len(shape) - 3]
            return conv(A.transpose(0, 1), B).transpose(0, 1) * self.scaling[name]  # (out, in, *k)
        return dora.conv_lora_weight(A, B, shape) * self.scaling[name]


def check_groups(conv: nn.modules.conv._ConvNd, r: int, where: str, use_dora: bool = False) -> None:
    """Raise unless rank r fits a grouped convolution's B, and no DoRA there (See Note: LoRA on a grouped convolution)."""
    if conv.groups != 1 and use_dora:
        raise ValueError(f"DoRA on a grouped convolution is not supported: {where!r} is a {type(conv).__name__} with "
                         f"groups={conv.groups}, and DoRA needs the norms of W0 + s B A, whose update B A is a dense "
                         f"kernel the grouped weight cannot hold (PEFT 0.21's DoRA there computes other norms); "
                         "DoRA works on convolutions with groups=1. Exclude it, or use plain LoRA (dora=False)")
    if conv.groups != 1 and r % conv.groups:
        raise ValueError(f"LoRA on a grouped convolution needs r to be a multiple of its groups (B, 1x1, splits its r "
                         f"input channels in the base's groups, as in PEFT): {where!r} has groups={conv.groups} and "
                         f"r={r}; set r (or rank_pattern for this module) to a multiple of {conv.groups}, or exclude it")


def _factor(base: nn.modules.conv._ConvNd, cin: int, cout: int, kernel, stride, padding, groups: int = 1) -> nn.Module:
    """A LoRA factor of a convolution: of the base's class with PEFT's arguments (a causal conv's factor pads as it
    does), A with the base's dilation and padding mode (by keyword, else set after), B with the base's groups; or a
    plain convolution."""
    dilation = {"dilation": base.dilation} if kernel != 1 else {}  # B is 1 x 1
    geometry = {**dilation, "padding_mode": base.padding_mode} if dilation else {}
    grouped = {"groups": groups} if groups != 1 else {}  # never dropped: B's shape depends on it
    plain = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[len(base.kernel_size) - 1]
    for cls, kwargs in ((type(base), geometry), (type(base), dilation), (type(base), {}), (plain, geometry)):
        with contextlib.suppress(TypeError):
            conv = cls(cin, cout, kernel, stride, padding, bias=False, **kwargs, **grouped)
            if conv.groups == groups:  # a subclass that takes `groups` and ignores it: the next one
                break
    if geometry and (conv.dilation, conv.padding_mode) != (base.dilation, base.padding_mode):  # and a padding mode's
        conv.dilation, conv.padding_mode, conv._reversed_padding_repeated_twice = (  # pad, made for dilation 1
            base.dilation, base.padding_mode, list(base._reversed_padding_repeated_twice))
    return conv

"""LoRA on grouped convolutions (depthwise included), with PEFT 0.21 as the oracle: inject refused
them, where PEFT adapts them (A dense, B a 1x1 convolution with the base's groups, r a multiple
of groups). Now the forward is PEFT's bit for bit, files go both ways with PEFT's keys and
shapes, and merge / merge_and_export refuse (as PEFT's merge does) with the reason, since the
update is a dense kernel that a grouped weight cannot hold (lowrank/tuners/lora_conv.py)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

peft = pytest.importorskip("peft")

import lowrank  # noqa: E402
from tests.peers.both_ways import files_go_both_ways  # noqa: E402
from tests.tuners import models  # noqa: E402

G = torch.Generator().manual_seed(0)


class Causal(nn.Conv1d):
    """A depthwise causal convolution as Mamba's (transformers' constructor style, pads in its forward)."""

    def __init__(self, cin, cout, kernel, stride=1, padding=0, dilation=1, groups=1, bias=True):
        super().__init__(cin, cout, kernel, stride, padding, dilation, groups, bias)

    def forward(self, x):
        return super().forward(F.pad(x, (self.kernel_size[0] - 1, 0)))


CASES = {  # name: (model builder, input shape, r)
    "conv2d-groups4": (lambda: nn.Conv2d(8, 12, 3, padding=1, groups=4), (2, 8, 6, 6), 8),
    "conv2d-depthwise": (lambda: nn.Conv2d(6, 6, 3, stride=2, groups=6), (2, 6, 7, 7), 6),
    "conv2d-1x1-groups2": (lambda: nn.Conv2d(4, 6, 1, groups=2), (2, 4, 5, 5), 4),
    "conv1d-depthwise-multiplier": (lambda: nn.Conv1d(4, 8, 3, padding=1, groups=4), (2, 4, 9), 4),
    "conv1d-causal-depthwise": (lambda: Causal(8, 8, 4, groups=8), (2, 8, 9), 8),
    "conv3d-groups2": (lambda: nn.Conv3d(4, 4, 2, groups=2), (1, 4, 3, 4, 4), 2),
}


def built(case):
    torch.manual_seed(0)
    make, shape, r = CASES[case]
    return nn.Sequential(make()).eval(), torch.randn(shape, generator=G), r


def theirs_and_ours(case):
    base, x, r = built(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: "Merging is not supported"
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=r, lora_alpha=3, target_modules=["0"]))
    models.randomize_adapters(theirs)
    ours = copy.deepcopy(base)
    lowrank.inject(ours, lowrank.LoraConfig(r=r, alpha=3, targets=["0"]))
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for k, p in theirs.named_parameters():
            if "lora_" in k:
                mine[k.removeprefix("base_model.model.")].copy_(p)  # same names, same shapes, or KeyError / error
    return base, x, theirs.eval(), ours


@pytest.mark.parametrize("case", list(CASES))
def test_forward_is_peft_bit_for_bit(case):
    base, x, theirs, ours = theirs_and_ours(case)
    layer = ours[0]
    assert layer.lora_B["default"].groups == base[0].groups  # PEFT's shapes: B (out, r / groups, 1...)
    assert layer.lora_B["default"].weight.shape == theirs.base_model.model[0].lora_B["default"].weight.shape
    with torch.no_grad():
        want = theirs(x)
        got = ours(x)
    assert torch.equal(got, want)  # the same convolutions in the same order
    assert not torch.equal(got, base(x))  # and the adapter does add something


@pytest.mark.parametrize("case", ["conv2d-groups4", "conv1d-depthwise-multiplier"])
def test_the_update_is_a_dense_kernel_across_groups(case):
    """Why merge is refused: B A, written out as one kernel (B expanded to its block-diagonal
    (out, r) matrix), computes the adapter's addition and has non-zero weights between channels
    of different groups, which the grouped weight (out, in / groups, *k) has no room for."""
    _, x, _, ours = theirs_and_ours(case)
    layer = ours[0].double()
    conv = layer.base
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # (r, in, *k), (out, r / g, 1...)
    r, g, out = A.shape[0], conv.groups, conv.out_channels
    full = torch.zeros(out, r, dtype=torch.float64)
    for o in range(out):  # output channel o reads A's channels of its group only
        grp = o // (out // g)
        full[o, grp * (r // g):(grp + 1) * (r // g)] = B[o].flatten()
    kernel = (full @ A.flatten(1)).view(out, *A.shape[1:]) * layer.scaling["default"]  # (out, in, *k)
    convnd = (F.conv1d, F.conv2d, F.conv3d)[A.dim() - 3]
    with torch.no_grad():
        dense = convnd(x.double(), kernel, None, conv.stride, conv.padding, conv.dilation)
        added = layer(x.double()) - conv(x.double())
    # float64: sums of at most in * prod(k) = 72 products of size ~0.3, both ways: far below 1e-12
    torch.testing.assert_close(added, dense, rtol=0, atol=1e-12)
    per_in = conv.in_channels // g
    off = torch.ones(out, conv.in_channels, dtype=torch.bool)
    for o in range(out):
        grp = o // (out // g)
        off[o, grp * per_in:(grp + 1) * per_in] = False
    assert kernel.flatten(2).abs().amax(-1)[off].min() > 0


def test_files_go_both_ways_with_peft(tmp_path):
    base, x, theirs, ours = theirs_and_ours("conv2d-groups4")
    files_go_both_ways(base, x, theirs, ours, tmp_path)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))  # so PEFT's load of our file computes what PEFT's adapter does


def test_merge_and_export_refuse_and_change_nothing(tmp_path):
    _, x, _, ours = theirs_and_ours("conv2d-depthwise")
    weight = ours[0].base.weight.detach().clone()
    with torch.no_grad():
        before = ours(x)
    with pytest.raises(ValueError, match=r"lowrank.merge refused, nothing was merged: at '0', cannot merge LoRA adapter "
                                         r"'default' into a Conv2d with groups=6: .* a \[6, 6, 3, 3\] kernel that the "
                                         r"grouped weight \[6, 1, 3, 3\] cannot hold; only convolutions with groups=1"):
        lowrank.merge(ours)
    with pytest.raises(ValueError, match=r"merge_and_export refused, nothing was written: at '0', .*groups=6"):
        lowrank.merge_and_export(ours, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert torch.equal(ours[0].base.weight, weight) and ours[0].merged == ()
    with torch.no_grad():
        assert torch.equal(ours(x), before)


def test_r_not_a_multiple_of_groups_and_dora_are_refused_before_anything_changes():
    base, _, _ = built("conv2d-groups4")
    with pytest.raises(ValueError, match=r"needs r to be a multiple of its groups .*'0' has groups=4 and r=6; set r "
                                         r"\(or rank_pattern for this module\) to a multiple of 4"):
        lowrank.inject(base, lowrank.LoraConfig(r=6, targets=["0"]))
    with pytest.raises(ValueError, match=r"'0' has groups=4 and r=2"):
        lowrank.inject(base, lowrank.LoraConfig(r=8, targets=["0"], rank_pattern={"0": 2}))
    with pytest.raises(ValueError, match=r"DoRA on a grouped convolution is not supported: '0' is a Conv2d with groups=4"):
        lowrank.inject(base, lowrank.LoraConfig(r=8, targets=["0"], dora=True))
    assert type(base[0]) is nn.Conv2d
    assert lowrank.inject(base, lowrank.LoraConfig(r=8, targets=["0"], rank_pattern={"0": 4})) == ["0"]
    assert base[0].lora_B["default"].weight.shape == (12, 1, 1, 1)

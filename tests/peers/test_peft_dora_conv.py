"""DoRA on nn.Conv1d/2d/3d (groups = 1), with PEFT 0.21 as the oracle: inject refused it ("DoRA is
implemented for linear-like layers only"), so PEFT's DoRA files of convolutions (diffusion
UNets) could not be loaded. Now m has PEFT's shape (1, out, 1...), the forward and its gradients
are PEFT's bit for bit after copying the same factors and magnitude, merge / merge_and_export
write PEFT's merged weight, and files go both ways (lowrank/tuners/dora.py: conv_delta)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

import lowrank  # noqa: E402
from lowrank.export import merged_weight  # noqa: E402
from tests.peers.both_ways import files_go_both_ways  # noqa: E402
from tests.tuners import models  # noqa: E402

CASES = {  # name: (model builder, input shape)
    "conv2d-3x3": (lambda: nn.Conv2d(4, 6, 3, padding=1), (2, 4, 7, 7)),
    "conv2d-strided-nobias": (lambda: nn.Conv2d(3, 5, (3, 2), stride=2, bias=False), (2, 3, 9, 8)),
    "conv2d-1x1": (lambda: nn.Conv2d(6, 6, 1), (2, 6, 5, 5)),
    "conv1d": (lambda: nn.Conv1d(4, 8, 3, padding=1), (2, 4, 11)),
    "conv3d": (lambda: nn.Conv3d(3, 4, 2), (1, 3, 4, 5, 5)),
}


def theirs_and_ours(case, dropout=0.0):
    torch.manual_seed(0)
    make, shape = CASES[case]
    base = nn.Sequential(make(), nn.ReLU(), make() if case == "conv2d-1x1" else nn.Identity())
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    targets = ["0", "2"] if case == "conv2d-1x1" else ["0"]
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=2, lora_alpha=3, target_modules=targets, use_dora=True, lora_dropout=dropout))
    models.randomize_adapters(theirs)  # B, A and m all away from their initial values
    ours = copy.deepcopy(base)
    lowrank.inject(ours, lowrank.LoraConfig(r=2, alpha=3, targets=targets, dora=True, dropout=dropout))
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for k, p in theirs.named_parameters():
            if "lora_" in k:  # PEFT's m is a module's weight: "...lora_magnitude_vector.default.weight"
                key = k.removeprefix("base_model.model.").removesuffix(".weight" if "magnitude" in k else "")
                mine[key].copy_(p)  # same names, same shapes, or KeyError / error
    return base, x, theirs, ours


@pytest.mark.parametrize("case", list(CASES))
def test_a_fresh_magnitude_is_peft_s_in_peft_s_shape(case):
    torch.manual_seed(0)
    make, _ = CASES[case]
    base = nn.Sequential(make())
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["0"], use_dora=True))
    ours = copy.deepcopy(base)
    lowrank.inject(ours, lowrank.LoraConfig(r=2, targets=["0"], dora=True))
    want = theirs.base_model.model[0].lora_magnitude_vector["default"].weight
    got = ours[0].lora_magnitude_vector["default"]
    assert got.shape == want.shape == (1, base[0].out_channels) + (1,) * (base[0].weight.dim() - 2)
    assert torch.equal(got, want)  # B = 0: ||W0||_c, the same norm call


@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_gradients_are_peft_s_bit_for_bit(case):
    base, x, theirs, ours = theirs_and_ours(case)
    theirs.eval(), ours.eval()
    want, got = theirs(x), ours(x)
    assert torch.equal(got, want)  # the same ops in the same order
    assert not torch.equal(got, base(x))
    want.square().sum().backward()
    got.square().sum().backward()
    grads = {k.removeprefix("base_model.model.").removesuffix(".weight" if "magnitude" in k else ""): p.grad
             for k, p in theirs.named_parameters() if "lora_" in k}
    for k, p in ours.named_parameters():
        if "lora_" in k:
            assert torch.equal(p.grad, grads[k]), k


def test_a_training_dropout_recomputes_w0_x_as_peft():
    _, x, theirs, ours = theirs_and_ours("conv2d-3x3", dropout=0.3)
    theirs.train(), ours.train()
    torch.manual_seed(5)
    want = theirs(x)
    torch.manual_seed(5)
    got = ours(x)
    assert torch.equal(got, want)


def test_an_unbatched_input_keeps_its_shape():
    # PEFT's (1, out, 1, 1) ratio does not broadcast with an unbatched (out, H, W) output (PEFT 0.21
    # raises there); ours is viewed (out, 1, 1): the batch of one's values in the unbatched shape
    _, x, theirs, ours = theirs_and_ours("conv2d-3x3")
    with torch.no_grad():
        got, want = ours.eval()(x[0]), theirs.eval()(x[:1])
    assert got.shape == ours[0].base(x[0]).shape == (6, 7, 7)
    assert torch.equal(got, want[0])


@pytest.mark.parametrize("case", list(CASES))
def test_merge_and_unmerge_as_peft(case):
    base, x, theirs, ours = theirs_and_ours(case)
    with torch.no_grad():
        exported = {i: merged_weight(ours[i]) for i in (0, 2) if hasattr(ours[i], "base")}  # merge_and_export's
        unmerged = ours.eval()(x)
        merged_theirs = theirs.merge_and_unload()
        lowrank.merge(ours)
        for i, layer in exported.items():
            # merged in float32 both, PEFT's delta and norm calls: W' = (m / ||W0 + s B A||_c) (W0 + s B A)
            assert torch.equal(ours[i].base.weight, merged_theirs[i].weight)
            assert torch.equal(exported[i], merged_theirs[i].weight)
        # the merged layer computes the unmerged one's output within float32 roundings
        out = ours(x)
        assert torch.allclose(out, unmerged, rtol=1e-5, atol=1e-5 * float(unmerged.abs().max()))
        lowrank.unmerge(ours)
        for i in exported:  # W0 back within a few roundings (W' / f - s B A)
            assert torch.allclose(ours[i].base.weight, base[i].weight, rtol=1e-5, atol=1e-6)


def test_files_go_both_ways(tmp_path):
    base, x, theirs, ours = theirs_and_ours("conv2d-1x1")
    fresh = files_go_both_ways(base, x, theirs, ours, tmp_path)
    assert fresh[0].lora_magnitude_vector["default"].shape == (1, 6, 1, 1)


def test_grouped_convolutions_stay_refused():
    base = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2))
    with pytest.raises(ValueError, match=r"DoRA on a grouped convolution is not supported: '0' is a Conv2d with "
                                         r"groups=2.*DoRA works on convolutions with groups=1"):
        lowrank.inject(base, lowrank.LoraConfig(r=2, targets=["0"], dora=True))
    assert type(base[0]) is nn.Conv2d


@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16])
def test_a_bf16_model_is_peft_s_bit_for_bit(adapter_dtype):
    # float32 adapters on a bf16 conv (PEFT's autocast_adapter_dtype): the norm and the sum in float32, cast back once
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1)).to(torch.bfloat16)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["0"], use_dora=True),
                                 autocast_adapter_dtype=adapter_dtype == torch.float32)
    models.randomize_adapters(theirs)
    ours = copy.deepcopy(base)
    lowrank.inject(ours, lowrank.LoraConfig(r=2, targets=["0"], dora=True), dtype=adapter_dtype)
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for k, p in theirs.named_parameters():
            if "lora_" in k:
                mine[k.removeprefix("base_model.model.").removesuffix(".weight" if "magnitude" in k else "")].copy_(p)
        x = torch.randn(2, 4, 5, 5).to(torch.bfloat16)
        want, got = theirs.eval()(x), ours.eval()(x)
    assert got.dtype == want.dtype == torch.bfloat16 and torch.equal(got, want)

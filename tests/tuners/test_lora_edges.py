"""LoRA and DoRA where layers are unusual: dilated, padded and causal convolutions, zero rows of W0,
unbatched inputs, float16 merges that overflow, merged DoRA moved to another device, keep_merged."""

import warnings

import pytest
import torch
from torch import nn

from lowrank.config import LoraConfig
from lowrank.inject import eject, inject, merge, unmerge

from . import models


@pytest.mark.parametrize("conv, shape", [(nn.Conv1d, (2, 3, 11)), (nn.Conv2d, (2, 3, 9, 10))])
def test_a_dilated_same_padded_reflect_conv_takes_lora(conv, shape):
    # padding="same" with dilation > 1 and a non-zeros padding mode: torch computes the explicit pad
    # from the dilation in the constructor; A was built with dilation 1 and then given the base's
    torch.manual_seed(0)
    model = nn.Sequential(conv(3, 4, 3, padding="same", dilation=2, padding_mode="reflect"))
    x = torch.randn(*shape)
    inject(model, LoraConfig(r=2, targets=["0"]))
    models.randomize_adapters(model)
    with torch.no_grad():
        y = model(x)
        merge(model)
        merged = model(x)
    assert y.shape == merged.shape == (*shape[:1], 4, *shape[2:])
    torch.testing.assert_close(y, merged, rtol=1e-5, atol=1e-5)


def test_a_merged_dora_model_moved_to_another_device_unmerges():
    # the norms kept at merge time for unmerge are no buffers: model.to(device) left them behind
    # (here the meta device stands in for CUDA, so the test runs without a GPU)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6))
    inject(model, LoraConfig(r=2, targets=["0"], dora=True))
    models.randomize_adapters(model)
    merge(model)
    model.to("meta")
    unmerge(model)
    assert model[0].merged == () and model[0].base.weight.device.type == "meta"


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_dora_keeps_the_shape_of_an_unbatched_output(dropout):
    # nn.Linear takes x of shape (in,) and returns (out,); DoRA's ratio was a (1, out) row, so the
    # layer returned (1, out) (PEFT 0.21 does the same)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6))
    x = torch.randn(8)
    inject(model, LoraConfig(r=2, targets=["0"], dora=True, dropout=dropout))
    models.randomize_adapters(model)
    for train in (False, True):
        model.train(train)
        assert model(x).shape == (6,)
    model.eval()
    torch.testing.assert_close(model(x), model(x[None])[0], rtol=0, atol=0)


def test_dora_on_a_zero_row_is_refused_not_nan():
    # a zero-initialized layer (or a pruned row): m = ||W0||_c = 0 and n = 0, so m / n was NaN in the
    # first forward (as in PEFT 0.21); inject now refuses, names the module and rows, and changes nothing
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 4))
    with torch.no_grad():
        model[1].weight[2] = 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'1'.*1 of its 4 output rows.*\[2\]"):
        inject(model, LoraConfig(r=2, targets=["0", "1"], dora=True))
    assert type(model[0]) is nn.Linear and type(model[1]) is nn.Linear
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    inject(model, LoraConfig(r=2, targets=["0", "1"]))  # plain LoRA is fine there
    assert torch.isfinite(model(torch.randn(3, 8))).all()


def test_a_merge_that_overflows_float16_is_refused():
    # the sum W0 + s B A is formed in float32 and was checked finite there, then rounded into the
    # float16 weight as inf: the model was broken and unmerge could not bring W0 back
    model = nn.Sequential(nn.Linear(4, 3)).half()
    with torch.no_grad():
        model[0].weight.fill_(65000.0)
    inject(model, LoraConfig(r=1, alpha=1, targets=["0"]))
    with torch.no_grad():
        model[0].lora_A["default"].weight.fill_(1.0)
        model[0].lora_B["default"].weight.fill_(1000.0)
    with pytest.raises(ValueError, match="non-finite.*float16"):
        merge(model)
    assert model[0].merged == () and bool((model[0].base.weight == 65000.0).all())


class CausalConv1d(nn.Conv1d):
    """A dilated causal convolution as WaveNet and TCNs write it: the left pad follows the dilation."""

    def __init__(self, cin, cout, kernel_size, stride=1, padding=0, dilation=1, bias=True):
        super().__init__(cin, cout, kernel_size, stride=stride, padding=0, dilation=dilation, bias=bias)
        self.left = (self.kernel_size[0] - 1) * self.dilation[0]

    def forward(self, x):
        return super().forward(nn.functional.pad(x, (self.left, 0)))


def test_lora_on_a_dilated_causal_conv_subclass():
    # A (the base's class, as PEFT makes it) was built with dilation 1, so it padded for dilation 1 and
    # then convolved with the base's dilation: a shorter output, and the forward failed
    torch.manual_seed(0)
    model = nn.Sequential(CausalConv1d(3, 4, 3, dilation=4))
    x = torch.randn(2, 3, 16)
    inject(model, LoraConfig(r=2, targets=["0"]))
    models.randomize_adapters(model)
    assert type(model[0].lora_A["default"]) is CausalConv1d and model[0].lora_A["default"].left == 8
    with torch.no_grad():
        y = model(x)
        merge(model)
        merged = model(x)
    torch.testing.assert_close(y, merged, rtol=1e-5, atol=1e-5)


def test_eject_keep_merged_warns_of_an_unmerged_adapter_it_drops():
    # eject(keep_merged=True) reads as "merge and unload", but keeps only what merge folded in: an
    # active adapter never merged was dropped without a word, its training lost
    model = nn.Sequential(nn.Linear(4, 3))
    inject(model, LoraConfig(r=2, targets=["0"]))
    models.randomize_adapters(model)
    with pytest.warns(UserWarning, match=r"\['default'\], which are not merged"):
        eject(model, keep_merged=True)
    inject(model, LoraConfig(r=2, targets=["0"]))
    models.randomize_adapters(model)
    merge(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eject(model, keep_merged=True)  # merged: kept, nothing to say


def test_ejecting_one_of_two_merged_adapters_writes_no_inf_into_a_float16_weight():
    # W0 + a + b is finite in float16, W0 + a is not: taking b alone out wrote inf into the weight without a
    # word (the check merge has since bbaf30d was missing on this path); now both come out, a stays active
    import torch
    from torch import nn

    from lowrank import LoraConfig, eject, inject, merge, set_active

    model = nn.Sequential(nn.Linear(4, 3)).half()
    with torch.no_grad():
        model[0].weight.fill_(65000.0)
    w0 = model[0].weight.clone()
    for name, b in (("a", 1000.0), ("b", -1000.0)):
        inject(model, LoraConfig(r=1, alpha=1, targets=["0"]), name=name)
        with torch.no_grad():
            model[0].lora_A[name].weight.fill_(1.0)
            model[0].lora_B[name].weight.fill_(b)
    set_active(model, ["a", "b"])
    merge(model)
    assert model[0].merged == ("a", "b")
    with pytest.warns(UserWarning, match=r"\['a'\] merged beyond torch.float16's range"):
        eject(model, "b")
    assert model[0].names == ("a",) and model[0].merged == () and model[0].active == ("a",)
    assert torch.equal(model[0].base.weight, w0)

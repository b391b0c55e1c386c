"""LoRA on parameters (LoraConfig.parameters) on plain modules: the update it makes, what it
refuses, and how it sits with the rest of lowrank. PEFT parity on transformers' MoE models:
tests/peers/test_peft_experts.py."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowrank
from lowrank.tuners.lora_param import LoraParameter


class Experts(nn.Module):
    """A toy MoE layer: token t goes through expert route[t]'s (out, in) slice of one 3-D weight."""

    def __init__(self, e: int = 3, d_in: int = 6, d_out: int = 5) -> None:
        super().__init__()
        self.up = nn.Parameter(torch.randn(e, d_out, d_in))
        self.bias = nn.Parameter(torch.randn(e, d_out))

    def forward(self, x: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        return torch.einsum("toi,ti->to", self.up[route], x) + self.bias[route]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.experts = Experts()

    def forward(self, x, route):
        return self.experts(self.lin(x), route)


def randomized(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(generator=torch.Generator().manual_seed(len(n)))
    return model


def test_experts_update_is_w_plus_s_b_a_per_expert():
    torch.manual_seed(0)
    net = Net().double()
    ours = copy.deepcopy(net)
    assert lowrank.inject(ours, lowrank.LoraConfig(r=2, alpha=3.0, targets=None, parameters="experts.up")) == \
        ["experts.up"]
    randomized(ours)
    layer = ours.experts
    assert isinstance(layer, LoraParameter)
    A = layer.lora_A["default"].weight.view(3, 2, 6)  # (E, r, in), See Note: PEFT's factor layout
    B = layer.lora_B["default"].weight.view(5, 2, 3).permute(2, 0, 1)  # (E, out, r)
    want = copy.deepcopy(net)
    with torch.no_grad():
        want.experts.up += 1.5 * torch.bmm(B, A)
    x, route = torch.randn(7, 6, dtype=torch.float64), torch.tensor([0, 2, 1, 1, 0, 2, 2])
    got, ref = ours(x, route), want(x, route)
    # float64: the two differ by the order of r + in products per entry
    assert (got - ref).abs().max() <= 16 * torch.finfo(torch.float64).eps * ref.abs().max()
    got.sum().backward()
    assert layer.lora_A["default"].weight.grad.abs().sum() > 0 and layer.lora_B["default"].weight.grad.abs().sum() > 0
    assert net.experts.up.grad is None and not ours.experts.base.up.requires_grad


class TransposedExperts(Experts):
    """Experts stored (E, in, out), saying so as transformers' GPT-OSS experts do."""

    is_transposed = True

    def __init__(self, e: int = 3) -> None:
        super().__init__(e)
        self.up = nn.Parameter(self.up.detach().transpose(1, 2).contiguous())

    def forward(self, x: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        return torch.einsum("tio,ti->to", self.up[route], x) + self.bias[route]


@pytest.mark.parametrize("cls", [Experts, TransposedExperts])
def test_a_single_expert_is_still_experts(cls):
    """A 3-D parameter of one expert takes W'_0 = W_0 + s B A in its own layout ((in, out) where
    the module is_transposed), not a 2-D weight's update (PEFT 0.21 fails there)."""
    torch.manual_seed(0)
    net = cls(e=1).double()
    ours = nn.ModuleDict({"experts": copy.deepcopy(net)})
    lowrank.inject(ours, lowrank.LoraConfig(r=2, alpha=4.0, targets=None, parameters="experts.up"))
    layer = randomized(ours)["experts"]
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # (r, in), (out, r)
    with torch.no_grad():
        net.up[0] += 2.0 * (B @ A if cls is Experts else (B @ A).T)
    x, route = torch.randn(4, 6, dtype=torch.float64), torch.zeros(4, dtype=torch.long)
    got, ref = layer(x, route), net(x, route)
    assert (got - ref).abs().max() <= 16 * torch.finfo(torch.float64).eps * ref.abs().max()
    lowrank.merge(ours)  # the merged update too (formed by the other route through the layer)
    with torch.no_grad():
        merged = ours["experts"](x, route)
    assert (merged - ref).abs().max() <= 16 * torch.finfo(torch.float64).eps * ref.abs().max()


def test_weight_of_a_linear_as_a_parameter_equals_lora_on_the_module():
    torch.manual_seed(0)
    net = Net().double()
    on_param, on_module = copy.deepcopy(net), copy.deepcopy(net)
    lowrank.inject(on_param, lowrank.LoraConfig(r=2, targets=None, parameters="lin.weight"))
    lowrank.inject(on_module, lowrank.LoraConfig(r=2, targets="lin"))
    randomized(on_param)
    with torch.no_grad():
        on_module.lin.lora_A["default"].weight.copy_(on_param.lin.lora_A["default"].weight)
        on_module.lin.lora_B["default"].weight.copy_(on_param.lin.lora_B["default"].weight)
    x, route = torch.randn(4, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    a, b = on_param(x, route), on_module(x, route)
    assert (a - b).abs().max() <= 64 * torch.finfo(torch.float64).eps * b.abs().max()


def test_disabled_summary_and_rank_pattern():
    net = Net()
    ours = copy.deepcopy(net)
    lowrank.inject(ours, lowrank.LoraConfig(r=2, targets=None, parameters=["experts.*"], rank_pattern={"bias": 1}))
    randomized(ours)
    inner, outer = ours.experts.base, ours.experts  # up registered first: innermost
    assert (inner.parameter_name, outer.parameter_name) == ("up", "bias")
    assert inner.lora_A["default"].weight.shape == (2 * 3, 6)  # (r * E, in)
    assert outer.lora_A["default"].weight.shape == (1, 5)  # a 2-D parameter is one (out, in) weight, as in PEFT
    x, route = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    assert not torch.equal(ours(x, route), net(x, route))
    with lowrank.disabled(ours):
        assert torch.equal(ours(x, route), net(x, route))
    assert lowrank.summary(ours).per_adapter["default"] == (6 * 6 + 5 * 6) + (1 * 5 + 3 * 1)
    with pytest.raises(ValueError, match="per-sample"), lowrank.per_sample(ours, ["default"] * 4):
        ours(x, route)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"dropout": 0.1}, ValueError, "dropout must be 0"),
    ({"dora": True}, ValueError, "DoRA is not supported"),
    ({"parameters": "all-linear"}, ValueError, "'all-linear' names modules"),
    ({"targets": None, "parameters": None}, ValueError, "targets is None and parameters names nothing"),
])
def test_config_refuses(kwargs, error, match):
    with pytest.raises(error, match=match):
        lowrank.LoraConfig(**({"parameters": "experts.up"} | kwargs))


@pytest.mark.parametrize("config, error, match", [
    (dict(targets=None, parameters="nope"), ValueError, "no parameter of Net matched"),
    (dict(parameters="experts.upp"), ValueError, "no parameter of Net matched"),  # a typo beside matching targets
    (dict(targets="lni", parameters="experts.up"), ValueError, "no module of Net matched"),  # and the other way
    (dict(targets="lin", parameters="lin.weight"), ValueError, "LoRA goes on one or the other"),
    (dict(targets=None, parameters="lin.bias"), TypeError, "a 1-D torch.float32 tensor"),
])
def test_inject_refuses_and_changes_nothing(config, error, match):
    net = Net()
    with pytest.raises(error, match=match):
        lowrank.inject(net, lowrank.LoraConfig(**config))
    assert not lowrank.adapter_names(net) and type(net.lin) is nn.Linear


def test_module_and_parameter_lora_do_not_stack():
    net = Net()
    lowrank.inject(net, lowrank.LoraConfig(targets=None, parameters="lin.weight"), name="a")
    with pytest.raises(ValueError, match="LoRA on the module too is not supported"):
        lowrank.inject(net, lowrank.LoraConfig(targets="lin"), name="b")
    other = Net()
    lowrank.inject(other, lowrank.LoraConfig(targets="lin"), name="a")
    with pytest.raises(ValueError, match="already has LoRA as a module"):
        lowrank.inject(other, lowrank.LoraConfig(targets=None, parameters="lin.weight"), name="b")


def test_second_adapter_reuses_the_layer_and_ejects_alone():
    net = Net()
    ours = copy.deepcopy(net)
    lowrank.inject(ours, lowrank.LoraConfig(r=2, targets=None, parameters="experts.up"), name="a")
    lowrank.inject(ours, lowrank.LoraConfig(r=3, targets=None, parameters=["experts.up", "experts.bias"]), name="b")
    chain = [ours.experts, ours.experts.base]
    assert [(m.parameter_name, m.names) for m in chain] == [("bias", ("b",)), ("up", ("a", "b"))]
    lowrank.eject(ours, "a")
    assert [(m.parameter_name, m.names) for m in (ours.experts, ours.experts.base)] == [("bias", ("b",)), ("up", ("b",))]
    lowrank.eject(ours, "b")
    assert type(ours.experts) is Experts


def test_a_parameter_of_the_model_itself_is_refused_by_name():
    with pytest.raises(ValueError, match=r"parameters matches \['up'\], parameters of Experts itself"):
        lowrank.inject(Experts(), lowrank.LoraConfig(targets=None, parameters="up"))


def test_a_module_at_two_places_takes_lora_where_parameters_names_it():
    """See Note: one module, one place (lowrank/inject.py): a later name, named, is the place."""
    net = Net()
    net.again = nn.ModuleList([net.experts])  # the same module under a second name
    assert lowrank.inject(net, lowrank.LoraConfig(targets=None, parameters="again.0.up")) == ["again.0.up"]
    assert isinstance(net.again[0], LoraParameter) and type(net.experts) is Experts


def test_parameters_alone_in_a_module_without_linear_layers_under_the_default_targets():
    """targets="all-linear" is the default: matching nothing beside parameters that matched is no error."""
    holder = nn.ModuleDict({"experts": Experts()})
    assert lowrank.inject(holder, lowrank.LoraConfig(r=2, parameters="experts.up")) == ["experts.up"]

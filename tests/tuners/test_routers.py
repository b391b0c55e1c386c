"""Routers that subclass nn.Linear (PhiMoE's, Llama 4's) and "all-linear" (lowrank/targets.py,
Note: routers)."""

import copy

import pytest
import torch
from torch import nn

import lowrank


@pytest.mark.parametrize("arch", ["phimoe", "llama4"])
def test_all_linear_leaves_out_routers(arch):
    """PhiMoE's and Llama 4's routers subclass nn.Linear and return routing, a tuple: "all-linear"
    leaves them out, for LoRA and for quantize (lowrank/targets.py, Note: routers; PEFT 0.21 takes
    them and fails in the forward), so both run; LoRA on a router's weight still goes on by name."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    if arch == "phimoe":
        model = transformers.PhimoeForCausalLM(transformers.PhimoeConfig(intermediate_size=48, num_local_experts=4,
                                                                         **common))
    else:
        cfg = transformers.Llama4TextConfig(intermediate_size=48, intermediate_size_mlp=64, num_local_experts=4,
                                            head_dim=8, **common)
        model = transformers.Llama4ForCausalLM(cfg)
    model.eval()
    routers = [n for n, m in model.named_modules() if n.endswith(".router")]
    assert routers and all(isinstance(model.get_submodule(n), nn.Linear) for n in routers)
    ids = torch.randint(0, 64, (1, 5))
    wrapped = lowrank.inject(copy.deepcopy(model), lowrank.LoraConfig(r=4, targets="all-linear"))
    assert wrapped and not set(routers) & set(wrapped)
    adapted = copy.deepcopy(model)
    lowrank.inject(adapted, lowrank.LoraConfig(r=4, targets="all-linear"))
    adapted(input_ids=ids)
    quantized = copy.deepcopy(model)
    names = lowrank.quantize(quantized, lowrank.NF4Config(compute_dtype=torch.float32))
    assert names and not set(routers) & set(names)
    quantized(input_ids=ids)
    on_weight = lowrank.inject(copy.deepcopy(model), lowrank.LoraConfig(r=4, targets=None, parameters=["router.weight"]))
    assert sorted(on_weight) == sorted(f"{n}.weight" for n in routers)


class Scaled(nn.Linear):
    """A linear layer of its own forward that still returns a tensor (as Falcon's FalconLinear)."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_a_linear_subclass_that_returns_a_tensor_stays_in_and_the_probe_draws_nothing():
    """Only a forward that returns no tensor is a router; the probe runs under fork_rng, so a
    router drawing noise in training mode (PhiMoE's jitter) leaves the caller's random stream as
    it was."""
    from lowrank.targets import returns_routing

    transformers = pytest.importorskip("transformers")
    assert lowrank.inject(nn.Sequential(Scaled(8, 8), nn.Linear(8, 8)), lowrank.LoraConfig(r=2)) == ["0", "1"]
    torch.manual_seed(0)
    cfg = transformers.PhimoeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)
    router = transformers.PhimoeForCausalLM(cfg).train().model.layers[0].mlp.router
    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    assert returns_routing(router) and torch.equal(torch.rand(3), want)

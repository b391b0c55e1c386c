"""What quantize refuses, and that it refuses before any layer changes: no match, a match that
is not a linear layer, a weight NF4 cannot hold (NaN/Inf, float64, meta), a weight tied to
another module's; and a layer registered at several places."""

import copy

import pytest
import torch
from torch import nn

from lowrank.config import LoraConfig
from lowrank.inject import inject
from lowrank.quant import Linear4bit, NF4Config, nf4, quantize

from ..tuners import models


@pytest.fixture
def reference(monkeypatch):
    monkeypatch.setenv("LOWRANK_BACKEND", "reference")  # nf4_linear is F.linear on the dequantized W


def test_nothing_matched_or_not_quantizable_changes_nothing():
    model = models.mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"no module of Sequential matched targets=\('q_proj',\).*'0', '2', '4'"):
        quantize(model, NF4Config(targets="q_proj"))
    with pytest.raises(TypeError, match="'1' is a GELU; quantize replaces nn.Linear.*add it to skip$"):
        quantize(model, NF4Config(targets=["0", "1"]))
    assert type(model[0]) is nn.Linear and model.state_dict().keys() == before.keys()
    adapted = models.mlp()
    inject(adapted, LoraConfig(r=2, targets="0"))  # the order QLoRA reverses: a LoRA layer is not a linear layer
    with pytest.raises(TypeError, match="'0' is a LoraLinear; .* for QLoRA, quantize first and inject after"):
        quantize(adapted)
    assert type(adapted[2]) is nn.Linear  # nothing replaced
    # skipping the adapted layer quantizes the rest; the adapter's own layers are never quantized (they
    # were, and froze: nothing was trainable after)
    assert quantize(adapted, NF4Config(skip="0")) == ["2", "4"]
    assert type(adapted[0].base) is nn.Linear and type(adapted[0].lora_A["default"]) is nn.Linear
    assert [n for n, p in adapted.named_parameters() if p.requires_grad] == ["0.lora_A.default.weight",
                                                                            "0.lora_B.default.weight"]
    assert quantize(model) == ["0", "2", "4"]
    with pytest.raises(ValueError, match=r"\(0 nn.Linear / Conv1D layers not yet in 4 bits\)"):
        quantize(model)  # everything is 4-bit already


@pytest.mark.parametrize("spoil", ["nan", "inf", "float64", "meta", "huge", "lazy"])
def test_a_weight_nf4_cannot_hold_is_refused_before_any_layer_changes(spoil):
    # the bad layer is the last: found only when replaced, the first two were 4-bit by then
    model = models.mlp()
    before = copy.deepcopy(model.state_dict())
    if spoil in ("nan", "inf"):
        with torch.no_grad():
            model[4].weight[3, 5] = float(spoil)
        before = copy.deepcopy(model.state_dict())
        error, match = ValueError, r"'4' has 1 non-finite weight value\(s\) \(NaN or Inf\) of 128; .* add the layer to skip"
    elif spoil == "float64":
        model[4].double()
        before = copy.deepcopy(model.state_dict())
        error, match = TypeError, r"'4' has a torch.float64 weight; NF4 quantizes torch.float32, .*model.float\(\)"
    elif spoil == "huge":  # finite, but the mean of the block maxima overflows float32 in double quantization
        with torch.no_grad():
            model[4].weight.fill_(3e38)
        before = copy.deepcopy(model.state_dict())
        error, match = ValueError, r"'4' has weights up to 3e\+38: the mean of its 2 block maxima, .* double_quant=False"
    elif spoil == "lazy":
        model[4] = nn.LazyLinear(4)
        error, match = ValueError, r"'4' is a lazy layer not yet materialized; run one forward pass"
    else:
        model[4] = nn.Linear(32, 4, device="meta")
        error, match = ValueError, r"'4' has its weight on the meta device, .* lowrank.load_and_quantize.* lowrank.load_quantized"
    with pytest.raises(error, match=match):
        quantize(model)
    last = nn.LazyLinear if spoil == "lazy" else nn.Linear
    assert [type(m) for m in model] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, last]
    if spoil not in ("meta", "lazy"):
        for k, t in model.state_dict().items():
            torch.testing.assert_close(t, before[k], rtol=0, atol=0, equal_nan=True)
    assert quantize(model, NF4Config(skip="4")) == ["0", "2"]  # the way out the message names


def test_a_tied_weight_stays_dense(reference):
    # GPT-2's head is its embedding: a 4-bit copy would untie them and load nowhere
    model = models.gpt2()
    with pytest.raises(ValueError, match=r"cannot quantize 'lm_head': its weight is tied to \['transformer.wte'\] "
                                         r".* leave 'lm_head' out of targets or add it to skip"):
        quantize(model, NF4Config(targets=["all-linear", "lm_head"]))
    assert not any(isinstance(m, Linear4bit) for m in model.modules())
    assert "lm_head" not in quantize(model)  # all-linear leaves the head alone
    assert model.lm_head.weight is model.transformer.wte.weight
    # a module registered at two places is one module, not a tie: one Linear4bit at both
    shared = nn.Linear(8, 8)
    twice = nn.Sequential(shared, nn.ReLU(), shared, nn.Sequential(shared))
    x = torch.randn(3, 8)
    dense = copy.deepcopy(twice)  # the same module at three places: its weight rounded to NF4 once
    with torch.no_grad():
        dense[0].weight.copy_(nf4.dequantize(nf4.quantize(dense[0].weight)))
    want = dense(x)
    assert quantize(twice) == ["0", "2", "3.0"]
    assert isinstance(twice[0], Linear4bit) and twice[2] is twice[0] and twice[3][0] is twice[0]
    assert torch.equal(twice(x), want)


class AffineInOtherWords(nn.Linear):
    """transformers' FalconLinear: x W^T, then + b."""

    def forward(self, x):
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias


class Scaled(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class Router(nn.Linear):
    """Llama 4's router: a tuple out."""

    def forward(self, x):
        logits = super().forward(x)
        return logits.softmax(-1), logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_linear_with_a_forward_of_its_own_is_quantized_only_if_it_is_affine(dtype, reference):
    """See Note: a forward of its own (quant/quantize.py): a Linear4bit computes x W^T + b."""
    torch.manual_seed(0)
    model = nn.Sequential(AffineInOtherWords(64, 32), nn.GELU(), nn.Linear(32, 8)).to(dtype)
    assert quantize(copy.deepcopy(model)) == ["0", "2"]
    for cls, name in [(Scaled, "Scaled"), (Router, "Router")]:
        bad = copy.deepcopy(model)
        bad[2] = cls(32, 8).to(dtype)
        # a router is no linear layer for the default "all-linear" (targets.py, Note: routers): left out
        targets = NF4Config().targets if cls is Scaled else ["0", "2"]
        with pytest.raises(TypeError, match=f"'2' is a {name}, an nn.Linear with a forward of its own, which does "
                                            "not compute x W\\^T \\+ b .* add it to skip"):
            quantize(bad, NF4Config(targets=targets))
        assert type(bad[0]) is AffineInOtherWords  # nothing replaced
        assert quantize(bad, NF4Config(targets=targets, skip="2")) == ["0"]
    routed = copy.deepcopy(model)
    routed[2] = Router(32, 8).to(dtype)
    assert quantize(routed) == ["0"] and type(routed[2]) is Router


class Grouped(nn.Linear):
    """A forward that takes another input shape (DeepSeek V4's grouped linear)."""

    def forward(self, x):
        return x.view(-1, 2, self.in_features // 2) @ self.weight.view(2, -1, self.in_features // 2).transpose(1, 2)


def test_a_forward_that_takes_another_shape_is_named():
    model = nn.Sequential(Grouped(6, 4))
    with pytest.raises(TypeError, match=r"'0' is a Grouped, .* does not take a \(rows, 6\) input as a linear layer"):
        quantize(model)

"""Linear4bit: forward is F.linear on the dequantized weight (exactly, with the reference
backend; within the derived matmul bound with the default one), gradients reach x and only
x, casts leave the codec alone, and the state dict is bitsandbytes' 4-bit format."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lowrank.quant import Linear4bit, NF4Weight, nf4

from ..ops.bounds import assert_matmul_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def layer(out_features=37, in_features=91, bias=True, dtype=torch.float32, double_quant=True, seed=0, **kw):
    """Odd sizes: 37 * 91 elements is not a multiple of the blocksize, so the last block is short."""
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    return linear, Linear4bit.from_linear(linear, 64, double_quant, **kw)


@pytest.fixture
def reference(monkeypatch):
    monkeypatch.setenv("LOWRANK_BACKEND", "reference")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("double_quant", [True, False])
def test_forward_is_linear_on_the_dequantized_weight_exactly(reference, dtype, bias, double_quant):
    # The reference backend computes F.linear(x, dequantize(q, x.dtype), bias): the same ops.
    linear, q = layer(bias=bias, dtype=dtype, double_quant=double_quant)
    x = torch.randn(3, 5, 91, dtype=dtype)
    w = nf4.dequantize(nf4.quantize(linear.weight, 64, double_quant), dtype)  # (37, 91)
    y = q(x)
    assert y.dtype == dtype and y.shape == (3, 5, 37)
    assert torch.equal(y, F.linear(x, w, linear.bias))
    assert torch.equal(q.dequantize(), w)


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_with_the_default_backend_is_within_the_matmul_bound(dtype):
    # See Note: the matmul error bound (tests/ops/bounds.py): whichever kernel runs here
    # (csrc on CPU) is within the reference's own error of the exact product, twice over.
    linear, q = layer(dtype=dtype)
    x = torch.randn(7, 91, dtype=dtype)
    w = q.dequantize(dtype)
    assert_matmul_close(q(x), F.linear(x, w, linear.bias), x, w.T, linear.bias)


def test_gradient_reaches_x_and_no_weight(reference):
    linear, q = layer()
    x = torch.randn(4, 91, requires_grad=True)
    gy = torch.randn(4, 37)
    q(x).backward(gy)
    assert torch.equal(x.grad, gy @ q.dequantize())  # (4, 37) @ (37, 91): the reference's own op
    assert [n for n, p in q.named_parameters() if p.requires_grad] == []
    assert all(p.grad is None for p in q.parameters())
    assert all(not b.requires_grad and b.grad is None for b in q.buffers())


def test_gradient_with_the_default_backend_is_within_the_matmul_bound():
    # grad_x = grad_y @ W: one matmul, the same derived bound as the forward
    _, q = layer()
    x = torch.randn(4, 91, requires_grad=True)
    gy = torch.randn(4, 37)
    q(x).backward(gy)
    w = q.dequantize()  # (37, 91)
    assert_matmul_close(x.grad, gy @ w, gy, w)


def test_compute_dtype_casts_in_and_back(reference):
    # x float32 through a bf16 compute: F.linear in bf16, returned in x's dtype (as bitsandbytes)
    linear, q = layer(compute_dtype=torch.bfloat16)
    x = torch.randn(2, 91)
    y = q(x)
    assert y.dtype == torch.float32
    expect = F.linear(x.bfloat16(), q.dequantize(torch.bfloat16), linear.bias.bfloat16()).float()
    assert torch.equal(y, expect)


@pytest.mark.parametrize("double_quant", [True, False])
def test_half_and_device_moves_keep_the_codec_bits(double_quant):
    # See Note: the scales stay float32.
    _, q = layer(double_quant=double_quant)
    before = {k: v.clone() for k, v in q.state_dict().items() if k != "bias"}
    q.to(torch.bfloat16).to("cpu")
    assert q.bias.dtype == torch.bfloat16
    after = q.state_dict()
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k


@pytest.mark.parametrize("double_quant", [True, False])
def test_state_dict_is_what_bitsandbytes_writes(double_quant):
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    linear, q = layer(double_quant=double_quant, dtype=torch.float16)
    with torch._dynamo.config.patch(disable=True):  # bitsandbytes' CPU path for odd sizes compiles per shape
        packed, state = bnb_f.quantize_4bit(linear.weight.detach(), blocksize=64, compress_statistics=double_quant,
                                            quant_type="nf4")
    theirs = {"weight": packed, "bias": linear.bias.detach()}
    theirs |= {f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}
    ours = nn.Sequential(q).state_dict()
    assert sorted(ours) == sorted(f"0.{k}" for k in theirs)
    for k, v in theirs.items():
        if k.endswith("bitsandbytes__nf4"):  # bitsandbytes' JSON, padded with spaces with double quantization
            v = torch.cat([v, torch.full((len(ours[f"0.{k}"]) - len(v),), ord(" "), dtype=torch.uint8)])  # (Note:
            # the quant state's length, lowrank/quant/nf4_weight.py)
        assert ours[f"0.{k}"].dtype == v.dtype and torch.equal(ours[f"0.{k}"], v), k


def test_load_state_dict_round_trip_even_across_blocksizes():
    _, source = layer(seed=1)
    target = Linear4bit.from_linear(nn.Linear(91, 37), 128, double_quant=False)
    assert not torch.equal(target.dequantize(), source.dequantize())
    assert not target.load_state_dict(source.state_dict()).missing_keys
    assert target.weight.blocksize == 64 and target.weight.double_quant
    assert torch.equal(target.dequantize(), source.dequantize())
    assert torch.equal(target.bias, source.bias)
    x = torch.randn(3, 91)
    assert torch.equal(target(x), source(x))


def test_load_state_dict_reports_what_is_wrong():
    _, q = layer()
    sd = q.state_dict()
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        Linear4bit.from_linear(nn.Linear(90, 37)).load_state_dict(sd)
    with pytest.raises(RuntimeError, match="Missing key.*bias"):
        q.load_state_dict({k: v for k, v in sd.items() if k != "bias"})
    with pytest.raises(RuntimeError, match="Unexpected key.*weight.extra"):
        q.load_state_dict(sd | {"weight.extra": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="no entry 'weight.absmax'"):
        q.load_state_dict({k: v for k, v in sd.items() if k != "weight.absmax"})


def test_constructor_and_from_linear_say_what_is_wrong():
    with pytest.raises(ValueError, match="shape \\(out_features, in_features\\)"):
        Linear4bit(nf4.quantize(torch.randn(64)))
    with pytest.raises(ValueError, match="bias must have shape \\(4,\\)"):
        Linear4bit(nf4.quantize(torch.randn(4, 64)), torch.zeros(5))
    with pytest.raises(ValueError, match="compute_dtype must be"):
        Linear4bit(nf4.quantize(torch.randn(4, 64)), compute_dtype=torch.int8)
    with pytest.raises(TypeError, match="nn.Linear or a GPT-2 Conv1D; got Embedding"):
        Linear4bit.from_linear(nn.Embedding(4, 4))


def test_gpt2_conv1d_is_quantized_transposed(reference):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    conv = transformers.pytorch_utils.Conv1D(nf=24, nx=40)  # weight (in, out) = (40, 24)
    nn.init.normal_(conv.bias)
    q = Linear4bit.from_linear(conv)
    assert (q.in_features, q.out_features) == (40, 24)
    x = torch.randn(3, 40)
    w = nf4.dequantize(nf4.quantize(conv.weight.detach().T.contiguous()))  # (24, 40)
    assert torch.equal(q(x), F.linear(x, w, conv.bias))


def test_repr_and_weight():
    _, q = layer()
    assert isinstance(q.weight, NF4Weight) and q.weight.shape == (37, 91)
    assert "in_features=91, out_features=37, bias=True, nf4 blocksize=64, double_quant=True" in repr(q)

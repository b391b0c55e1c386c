"""The codec at its edges: the bf16 CPU GEMV near the subnormal range (the smallest positive code),
NF4Weight.to given a dtype, NF4Weight equality, quantizing on the meta device, negative sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lowrank
from lowrank.ops import backends
from lowrank.quant import nf4
from lowrank.quant.linear4bit import Linear4bit


def test_bf16_gemv_keeps_products_of_the_smallest_positive_code_near_the_subnormal_range():
    # The smallest nonzero |NF4| value is code 8's 0.0796, not code 6's 0.0911: with a scale just
    # above 2^-126 / (0.09 xmin) the AVX512_BF16 GEMV (csrc/nf4_cpu.cpp nf4_gemv_pack_x_bf16) took
    # the vdpbf16ps path, whose flushed subnormal weights 0.0796 * s gave 0 instead of 6.8e-7.
    s = 1.35e-37  # 2^-126 / 0.09 = 1.306e-37 < s < 2^-126 / 0.0796 = 1.476e-37
    w = torch.full((1, 64), 0.0796 * s)
    w[0, 0] = s  # the block's absmax: code 15; the rest code 8
    q = nf4.quantize(w, 64, double_quant=False)
    x = torch.full((1, 64), 1e30, dtype=torch.bfloat16)
    x[0, 0] = 0  # so the product with code 15 does not hide the others
    ref = F.linear(x, nf4.dequantize(q, torch.bfloat16))
    y = lowrank.ops.nf4_linear(x, q)
    assert ref.item() > 6e-7
    torch.testing.assert_close(y, ref, rtol=2**-7, atol=0)


def test_nf4weight_to_a_dtype_says_it_takes_a_device():
    # q.to(torch.float16) cast the uint8 codes to float16 and then failed in __post_init__ with
    # "NF4Weight.packed must hold ... torch.uint8 values ...; got (n,) torch.float16"
    q = nf4.quantize(torch.randn(4, 64))
    with pytest.raises(TypeError, match=r"takes a device, got the dtype torch.float16"):
        q.to(torch.float16)
    assert q.to("cpu").packed is q.packed


def test_nf4weights_are_equal_when_their_stored_bits_are():
    # a dataclass's == compared the fields as a tuple, and for two weights from separate calls that meant
    # bool() of an elementwise tensor comparison: "Boolean value of Tensor with more than one value is ambiguous"
    w = torch.randn(8, 64)
    a, b = nf4.quantize(w), nf4.quantize(w)
    assert a is not b and a == b and not (a != b) and hash(a) == hash(b)
    assert len({a, b}) == 1
    flipped = a.packed.clone()
    flipped[3] ^= 1  # one code of one weight
    assert a != nf4.NF4Weight(flipped, a.absmax, a.shape, a.dtype, a.blocksize, a.nested_absmax, a.offset)
    assert a != nf4.quantize(w, double_quant=False)  # same codes, scales stored another way
    assert a != nf4.quantize(w.to(torch.bfloat16))  # dequantizes to another dtype by default
    assert a != nf4.quantize(w.reshape(4, 128))  # same bytes, another shape
    assert a != a.to("meta") and a.to("meta") != a.to("meta")  # no values to compare
    assert (a == "weight") is False


def test_quantize_on_the_meta_device_gives_the_layout_without_values():
    # nf4.quantize and Linear4bit.from_linear of a meta weight stopped at Tensor.item() (the check for
    # NaN / Inf); a meta NF4Weight has the fields a real one has, and a meta layer takes a real
    # layer's 4-bit state dict with load_state_dict(assign=True)
    for shape, double_quant in (((64, 64), True), ((3, 100), True), ((7,), False)):
        w = torch.randn(shape)
        real, meta = nf4.quantize(w, double_quant=double_quant), nf4.quantize(w.to("meta"), double_quant=double_quant)
        for field in ("packed", "absmax", "nested_absmax", "offset"):
            r, m = getattr(real, field), getattr(meta, field)
            assert (r is None) == (m is None)
            if r is not None:
                assert (m.device.type, m.shape, m.dtype) == ("meta", r.shape, r.dtype), field
    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 32)
    real = Linear4bit.from_linear(dense)
    layer = Linear4bit.from_linear(torch.nn.Linear(64, 32, device="meta"))
    sd = real.state_dict()
    meta_sd = layer.state_dict()
    assert set(meta_sd) == set(sd) and all(t.device.type == "meta" for t in meta_sd.values())
    layer.load_state_dict(sd, assign=True)
    x = torch.randn(3, 64)
    assert torch.equal(layer(x), real(x))


@pytest.mark.parametrize("backend", ["reference", "csrc"])
def test_negative_sizes_are_refused_even_when_their_product_fits(backend, monkeypatch):
    # [-64, -64] multiplies to the 4096 elements the codes hold: the checks passed it, and the kernels
    # failed in torch.empty ("Trying to create tensor with negative dimension -64")
    if backend not in backends.available("nf4_dequantize"):
        pytest.skip("lowrank._C is not built")
    monkeypatch.setenv("LOWRANK_BACKEND", backend)
    q = nf4.quantize(torch.randn(64, 64))
    fields = (q.packed, q.absmax, q.nested_absmax, q.offset)
    with pytest.raises(RuntimeError, match=r"shape must be sizes >= 0, got \[-64, -64\]"):
        torch.ops.lowrank.nf4_dequantize(*fields, [-64, -64], 64, torch.float32)
    with pytest.raises(RuntimeError, match=r"shape must be sizes >= 0, got \[-64, -64\]"):
        torch.ops.lowrank.nf4_linear(torch.randn(2, 64), *fields, [-64, -64], 64, None)


def test_load_state_dict_into_a_4bit_layer_copies_unless_assign():
    # the layer took the state dict's own tensors on a load without assign=True (torch copies): two
    # models loaded from one state dict shared their codes, and a later change to the dict reached them
    torch.manual_seed(0)
    source = Linear4bit.from_linear(torch.nn.Linear(64, 32))
    sd = {k: t.clone() for k, t in source.state_dict().items()}
    a, b = Linear4bit.from_linear(torch.nn.Linear(64, 32)), Linear4bit.from_linear(torch.nn.Linear(64, 32))
    a.load_state_dict(sd)
    b.load_state_dict(sd)
    assert a.weight == source.weight and b.weight == source.weight
    assert a.packed.data_ptr() not in (b.packed.data_ptr(), sd["weight"].data_ptr())
    x = torch.randn(3, 64)
    before = a(x)
    sd["weight"].zero_()
    assert torch.equal(a(x), before) and a.weight == source.weight
    c = Linear4bit.from_linear(torch.nn.Linear(64, 32, device="meta"))
    c.load_state_dict(sd, assign=True)  # assign: the checkpoint's tensors, as torch assigns
    assert c.packed.data_ptr() == sd["weight"].data_ptr()

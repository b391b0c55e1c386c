"""The NF4 codec: format facts, the container, and bad input."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from lowrank import NF4Weight, nf4


def test_codebook_facts():
    code = nf4.NF4_CODE
    assert code.dtype == torch.float32 and code.numel() == 16
    assert torch.all(code[1:] > code[:-1]), "sorted, no duplicates"
    assert code[0] == -1.0 and code[15] == 1.0 and code[nf4.ZERO_CODE] == 0.0


def test_dynamic_map_facts():
    code = nf4.DYNAMIC_CODE
    assert code.numel() == 256 and torch.all(code[1:] > code[:-1])
    assert code[-1] == 1.0 and (code == 0).sum() == 1
    assert -1.0 < code[0] < -0.99  # the signed map stops short of -1 (bitsandbytes' too)


def test_reachable_as_lowrank_nf4():
    import lowrank

    assert lowrank.nf4.quantize is nf4.quantize and lowrank.nf4.dequantize is nf4.dequantize


def test_pack_puts_first_element_in_high_nibble():
    codes = torch.tensor([0x1, 0x2, 0xF, 0x0, 0x9], dtype=torch.uint8)
    assert nf4.pack(codes).tolist() == [0x12, 0xF0, 0x97]  # odd count: padded with the zero code 7
    assert torch.equal(nf4.unpack(nf4.pack(codes), 5), codes)


@pytest.mark.parametrize("blocksize,double_quant", [(64, True), (64, False), (128, True), (4096, True)])
def test_bits_per_param(blocksize, double_quant):
    q = nf4.quantize(torch.randn(4096, 4096), blocksize=blocksize, double_quant=double_quant)
    n, blocks = 4096 * 4096, 4096 * 4096 // blocksize
    if double_quant:  # 4-bit codes + one byte per block + a float32 per 256 blocks + the offset
        expect = (4 * n + 8 * blocks + 32 * math.ceil(blocks / 256) + 32) / n
    else:
        expect = (4 * n + 32 * blocks) / n
    assert q.bits_per_param == pytest.approx(expect, rel=1e-12)
    if (blocksize, double_quant) == (64, True):
        assert round(q.bits_per_param, 3) == 4.127  # the QLoRA figure: 4 + 8/64 + 32/(64*256)


def test_zero_block_dequantizes_to_exact_zeros():
    w = torch.randn(4, 64)
    w[1:3] = 0
    q = nf4.quantize(w, blocksize=64, double_quant=False)
    assert q.absmax[1] == 0 and q.absmax[2] == 0
    assert torch.all(nf4.dequantize(q)[1:3] == 0)
    assert torch.all(nf4.unpack(q.packed, w.numel()).view(4, 64)[1:3] == nf4.ZERO_CODE)


def test_empty_weight_is_a_defined_empty_result():
    for dq in (True, False):
        q = nf4.quantize(torch.zeros(0, 8, dtype=torch.bfloat16), double_quant=dq)
        assert q.numel == 0 and q.packed.numel() == 0 and q.absmax.numel() == 0
        out = nf4.dequantize(q)
        assert out.shape == (0, 8) and out.dtype == torch.bfloat16


def test_scalar_and_one_element():
    for w in (torch.tensor(-2.5), torch.tensor([3.0])):
        q = nf4.quantize(w)
        assert nf4.dequantize(q).shape == w.shape
        assert torch.equal(nf4.dequantize(q, torch.float32), w)  # absmax = |w|, code 0 or 15: exact


def test_input_is_not_modified_and_layout_does_not_matter():
    w = torch.randn(96, 80, dtype=torch.float16)
    before = w.clone()
    wt = w.t()  # non-contiguous view of the same storage
    q_t = nf4.quantize(wt)
    q_c = nf4.quantize(wt.contiguous())
    assert torch.equal(w, before)
    assert torch.equal(q_t.packed, q_c.packed) and torch.equal(q_t.absmax, q_c.absmax)
    assert q_t.shape == (80, 96)


def test_to_device_returns_a_copy_and_keeps_the_original():
    q = nf4.quantize(torch.randn(10, 70))
    m = q.to("meta")
    assert m.packed.device.type == "meta" and m.nested_absmax.device.type == "meta"
    assert q.packed.device.type == "cpu" and m.shape == q.shape and m.dtype == q.dtype


def test_dequantize_to_another_dtype_rounds_once_from_float32():
    q = nf4.quantize(torch.randn(33, 65))
    f32 = nf4.dequantize(q, torch.float32)
    for dtype in (torch.float16, torch.bfloat16):
        assert torch.equal(nf4.dequantize(q, dtype), f32.to(dtype))


def test_repr_is_short():
    r = repr(nf4.quantize(torch.randn(512, 512)))
    assert "shape=(512, 512)" in r and "bits_per_param=4.127" in r and len(r) < 200


# -- the bitsandbytes/transformers state-dict form -----------------------------------


@pytest.mark.parametrize("double_quant", [True, False])
def test_state_dict_round_trip(double_quant):
    q = nf4.quantize(torch.randn(17, 129, dtype=torch.bfloat16), blocksize=128, double_quant=double_quant)
    sd = q.to_state_dict("model.layers.0.mlp.down_proj.weight")
    r = NF4Weight.from_state_dict(sd, "model.layers.0.mlp.down_proj.weight")
    assert r.shape == q.shape and r.dtype == q.dtype and r.blocksize == q.blocksize
    assert torch.equal(r.dequantize(), q.dequantize())
    meta = json.loads(bytes(sd["model.layers.0.mlp.down_proj.weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert meta["dtype"] == "bfloat16" and meta["shape"] == [17, 129] and meta["quant_type"] == "nf4"
    assert ("nested_offset" in meta) == double_quant


def test_state_dict_with_a_missing_entry_says_which():
    sd = nf4.quantize(torch.randn(8, 64)).to_state_dict("w")
    del sd["w.nested_absmax"]
    with pytest.raises(KeyError, match=r"w\.nested_absmax"):
        NF4Weight.from_state_dict(sd, "w")


def test_state_dict_of_another_4bit_type_is_refused():
    sd = nf4.quantize(torch.randn(8, 64)).to_state_dict("w")
    sd["w.quant_map"] = -sd["w.quant_map"]
    with pytest.raises(ValueError, match="not the NF4 codebook"):
        NF4Weight.from_state_dict(sd, "w")


def test_container_checks_its_fields():
    q = nf4.quantize(torch.randn(8, 64))
    with pytest.raises(ValueError, match=r"packed must hold 256 torch.uint8 values.*got \(255,\)"):
        NF4Weight(q.packed[:-1], q.absmax, q.shape, q.dtype, q.blocksize, q.nested_absmax, q.offset)
    with pytest.raises(ValueError, match="absmax must hold 8 torch.uint8"):
        NF4Weight(q.packed, q.absmax.float(), q.shape, q.dtype, q.blocksize, q.nested_absmax, q.offset)


# -- bad input: what was wrong, the value seen, what is allowed ------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weight_names_count_and_first_index(bad):
    w = torch.randn(4, 100)
    w[2, 7] = bad
    w[3, 1] = bad
    before = w.clone()
    with pytest.raises(ValueError, match=r"2 non-finite value\(s\).* at index \(2, 7\)"):
        nf4.quantize(w)
    assert torch.equal(w.view(torch.int32), before.view(torch.int32))  # untouched, bit for bit (NaN != NaN)


def test_block_maxima_whose_mean_overflows_say_so():
    # finite weights near float32's max: their mean (double quantization's offset) overflowed to inf
    # and quantize_8bit indexed its code table with -2**31
    w = torch.zeros(64, 32)
    w[0, 0] = w[1, 0] = torch.finfo(torch.float32).max
    with pytest.raises(ValueError, match=r"mean of the block maxima .* overflows .* use double_quant=False"):
        nf4.quantize(w, 32)
    assert torch.equal(nf4.dequantize(nf4.quantize(w, 32, double_quant=False)), w)  # max and 0 are both codes


@pytest.mark.parametrize("blocksize", [0, 48, 64.0, True])
def test_an_nf4weight_of_a_blocksize_the_codec_does_not_make_is_refused(blocksize):
    q = nf4.quantize(torch.randn(8, 64), 64)
    with pytest.raises(ValueError, match=rf"NF4Weight.blocksize must be one of \(32, 64, .*\); got {blocksize!r}"):
        nf4.NF4Weight(q.packed, q.absmax, q.shape, q.dtype, blocksize, q.nested_absmax, q.offset)


@pytest.mark.parametrize("field, value, error, match", [
    ("dtype", torch.int32, TypeError, r"NF4Weight.dtype must be one of torch.float32, .*; got torch.int32"),
    ("dtype", torch.float64, TypeError, r"NF4Weight.dtype must be one of .*; got torch.float64"),
    ("shape", (-8, -64), ValueError, r"NF4Weight.shape must be integer sizes >= 0; got \(-8, -64\)"),
    ("shape", (8.0, 64), ValueError, r"NF4Weight.shape must be integer sizes >= 0; got \(8.0, 64\)"),
    ("shape", 512, ValueError, r"NF4Weight.shape must be integer sizes >= 0; got 512"),
])
def test_an_nf4weight_that_dequantize_cannot_read_is_refused_at_construction(field, value, error, match):
    # (-8, -64) has the element count of (8, 64): before, it was accepted, and refused later by torch
    q = nf4.quantize(torch.randn(8, 64), 64)
    with pytest.raises(error, match=match):
        dataclasses.replace(q, **{field: value})
    numpy_sizes = dataclasses.replace(q, shape=(np.int64(8), np.int32(64)))  # integers of other types are sizes
    assert type(numpy_sizes.shape[0]) is int and torch.equal(numpy_sizes.dequantize(), q.dequantize())


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.bool, torch.complex64, torch.float64])
def test_unsupported_dtype(dtype):
    with pytest.raises(TypeError, match=rf"got {dtype}"):
        nf4.quantize(torch.zeros(4, 4, dtype=dtype))


@pytest.mark.parametrize("blocksize", [0, 16, 48, 8192, 64.0])
def test_unsupported_blocksize(blocksize):
    with pytest.raises(ValueError, match=rf"blocksize must be one of .*got {blocksize!r}"):
        nf4.quantize(torch.zeros(4, 64), blocksize=blocksize)


def test_not_a_tensor():
    with pytest.raises(TypeError, match="must be a torch.Tensor, got list"):
        nf4.quantize([1.0, 2.0])


def test_dequantize_to_unsupported_dtype():
    with pytest.raises(TypeError, match="dtype must be one of"):
        nf4.dequantize(nf4.quantize(torch.randn(64)), torch.int8)


@pytest.mark.parametrize("chunk", [4096, 2**30])  # See Note: chunks: many chunks, or one (as on a GPU)
def test_chunking_does_not_change_results(monkeypatch, chunk):
    w = torch.randn(3, 2**18 // 3 + 1001, dtype=torch.bfloat16)  # more than one CPU chunk, odd numel
    q = nf4.quantize(w, 64)
    dense = nf4.dequantize(q)
    monkeypatch.setattr(nf4, "_CPU_CHUNK", chunk)
    q2 = nf4.quantize(w, 64)
    assert torch.equal(q2.packed, q.packed) and torch.equal(q2.absmax, q.absmax)
    assert torch.equal(nf4.dequantize(q2), dense)


def test_nf4weight_takes_any_layout_of_its_fields_and_keeps_them_flat():
    """bitsandbytes keeps packed as (bytes, 1); a (B, 1) absmax or a (1, 1) offset holds the same
    values. The ops read them by numel, but the codec and to_state_dict failed on anything not
    flat (index_select of a 2-D index, a view of a non-contiguous tensor)."""
    q = nf4.quantize(torch.randn(48, 64), 64, True)
    odd = NF4Weight(q.packed.view(-1, 1), q.absmax.view(-1, 1), q.shape, q.dtype, q.blocksize,
                    q.nested_absmax.view(1, -1), q.offset.view(1, 1))
    assert [t.dim() for t in (odd.packed, odd.absmax, odd.nested_absmax, odd.offset)] == [1, 1, 1, 0]
    assert odd.packed.data_ptr() == q.packed.data_ptr()  # a view, not a copy
    strided = NF4Weight(q.packed.view(-1, 3).T, q.absmax, q.shape, q.dtype, q.blocksize, q.nested_absmax, q.offset)
    assert torch.equal(strided.packed, q.packed.view(-1, 3).T.reshape(-1))
    assert torch.equal(nf4.dequantize(odd), nf4.dequantize(q))
    assert odd.to_state_dict().keys() == q.to_state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(odd.to_state_dict().values(), q.to_state_dict().values()))

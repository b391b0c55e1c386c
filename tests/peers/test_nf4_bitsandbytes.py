"""The codec equals bitsandbytes 0.50 (CPU) bit for bit: codes, scales, state dicts, dequantize."""

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowrank import NF4Weight, nf4

bnb_f = pytest.importorskip("bitsandbytes.functional")

from ..quant.test_nf4_properties import weights  # noqa: E402


# bitsandbytes' CPU fallback for odd last dimensions runs through torch.compile, which
# recompiles for every new shape; eager gives the same numbers and keeps the suite fast.
@pytest.fixture(autouse=True)
def _eager_bitsandbytes():
    with torch._dynamo.config.patch(disable=True):
        yield


def bnb_quantize(w, blocksize, double_quant):
    return bnb_f.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")


def bnb_native_cpu_dequantize_is_per_row(shape, blocksize):
    """bitsandbytes 0.50's AVX-512 CPU dequantize_4bit kernel reads one scale per
    `blocksize` elements of each ROW, not of the flattened tensor, so its output is wrong
    when a row length is not a multiple of the blocksize (its quantize, CUDA kernels and
    portable path use the flattened blocks, as we do). For those shapes we compare with
    its portable path. It takes the native path on AVX-512 CPUs for blocksize < 2048 and
    an even last dimension."""
    rows = 1 if len(shape) < 2 else int(torch.tensor(shape[:-1]).prod())
    return (
        torch.backends.cpu.get_cpu_capability() == "AVX512"
        and blocksize < 2048
        and rows > 1
        and shape[-1] % 2 == 0
        and shape[-1] % blocksize != 0
    )


def bnb_dequantize(packed, state):
    # A one-byte weight also takes the portable path: dequantize_4bit reads packed of shape
    # (1, 1) as the old transposed layout and transposes its output (failing beyond 2-D).
    portable = packed.numel() == 1 or bnb_native_cpu_dequantize_is_per_row(state.shape, state.blocksize)
    if not portable:
        return bnb_f.dequantize_4bit(packed, state, quant_type="nf4")
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = state.absmax
    if state.nested:
        absmax = bnb_f.dequantize_blockwise(state.absmax, state.state2) + state.offset
    code = bnb_f.get_4bit_type("nf4", device="cpu")
    return _dequantize_4bit_compute(packed.view(-1), absmax, code, state.blocksize, state.shape, state.dtype)


def assert_same(w, blocksize, double_quant):
    packed, state = bnb_quantize(w, blocksize, double_quant)
    q = nf4.quantize(w, blocksize, double_quant)
    assert torch.equal(q.packed, packed.view(-1)), "packed codes"
    assert torch.equal(q.absmax, state.absmax), "absmax (8-bit codes with double quantization)"
    if double_quant:
        assert torch.equal(q.nested_absmax, state.state2.absmax), "nested absmax"
        assert torch.equal(q.offset, state.offset), "offset"
    theirs = bnb_dequantize(packed, state)
    ours = nf4.dequantize(q)
    assert ours.dtype == theirs.dtype
    assert torch.equal(ours.reshape(-1), theirs.reshape(-1)), "dequantized weight"  # 1-D: bnb returns (1, n)


def test_codebooks_equal():
    assert torch.equal(nf4.NF4_CODE, bnb_f.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(nf4.DYNAMIC_CODE, bnb_f.create_dynamic_map(signed=True))
    assert torch.equal(nf4.UNSIGNED_DYNAMIC_CODE, bnb_f.create_dynamic_map(signed=False))


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("blocksize", nf4.BLOCKSIZES)
def test_every_blocksize_and_dtype(blocksize, dtype, double_quant):
    g = torch.Generator().manual_seed(blocksize)
    # 11008 x 37 rows: numel not a multiple of any blocksize, > 256 blocks for the nested
    # scales at small blocksizes, with a few zero blocks and outliers.
    w = torch.randn(37, 11008, generator=g) * torch.rand(37, 1, generator=g)
    w[3] = 0
    w[5, :: 97] *= 40
    assert_same(w.to(dtype), blocksize, double_quant)


@pytest.mark.parametrize("shape", [(1,), (2,), (3,), (63,), (65,), (1, 4097), (7, 9, 11), (4096, 1)])
def test_small_and_odd_shapes(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape)))
    for blocksize in (32, 64, 4096):
        for double_quant in (True, False):
            assert_same(w, blocksize, double_quant)


def test_non_contiguous_input():
    w = torch.randn(300, 200, dtype=torch.bfloat16)
    assert_same(w.t(), 64, True)
    assert_same(w[::2, 1::3], 128, True)


@given(weights(max_numel=3000), st.sampled_from(nf4.BLOCKSIZES), st.booleans())
def test_random_weights(w, blocksize, double_quant):
    assert_same(w, blocksize, double_quant)


@pytest.mark.parametrize("signed", [True, False])
def test_8bit_codes_on_every_grid_boundary(signed):
    """See Note: how a scale finds its 8-bit code. Values on and within 6 ulps of every
    boundary of the 65536-point grid code the same as bitsandbytes' quantize_blockwise, with the
    signed dynamic map (double quantization, AdamW8bit's first moment) and the unsigned one
    (its second moment; negative values take code 0 on both sides)."""
    k = torch.arange(1, 65535, dtype=torch.float64)
    boundary = (2 * (k - 0.5) / 65535 - 1).float()  # where trunc((s+1)/2*65535 + 0.5) steps
    values, up, down = [boundary], boundary, boundary
    for _ in range(6):
        up, down = torch.nextafter(up, torch.tensor(2.0)), torch.nextafter(down, torch.tensor(-2.0))
        values += [up, down]
    s = torch.cat(values).clamp(-1, 1)
    s = s[: s.numel() // 255 * 255].view(-1, 255)  # (blocks, 255)
    x = torch.cat([torch.ones(s.shape[0], 1), s], dim=1).reshape(-1)  # absmax 1 in every block of 256
    ours, ours_absmax = nf4.quantize_8bit(x, signed=signed)
    code = nf4.DYNAMIC_CODE if signed else nf4.UNSIGNED_DYNAMIC_CODE
    theirs, state = bnb_f.quantize_blockwise(x, code=code, blocksize=256)
    assert torch.equal(ours_absmax, state.absmax)
    assert torch.equal(ours, theirs)
    assert torch.equal(nf4.dequantize_8bit(ours, ours_absmax, signed=signed), bnb_f.dequantize_blockwise(theirs, state))


@pytest.mark.parametrize("double_quant", [True, False])
def test_state_dict_both_ways(double_quant):
    w = torch.randn(48, 130, dtype=torch.float16)
    packed, state = bnb_quantize(w, 64, double_quant)
    theirs = {"weight": packed} | {f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}
    q = nf4.quantize(w, 64, double_quant)
    ours = q.to_state_dict("weight")

    assert sorted(ours) == sorted(theirs)
    qs = "weight.quant_state.bitsandbytes__nf4"
    for key in set(ours) - {qs}:  # the same tensors
        assert torch.equal(ours[key], theirs[key]), key
    # the JSON of the quant state byte for byte, padded with spaces with double quantization (Note: the
    # quant state's length, lowrank/quant/nf4_weight.py)
    ours_json, theirs_json = bytes(ours[qs].tolist()), bytes(theirs[qs].tolist())
    assert ours_json.rstrip(b" ") == theirs_json and (ours_json == theirs_json) != double_quant
    assert json.loads(bytes(ours["weight.quant_state.bitsandbytes__nf4"].tolist()))["dtype"] == "float16"

    # bitsandbytes rebuilds a QuantState from what we write and dequantizes it to our tensor
    rebuilt = bnb_f.QuantState.from_dict({k[len("weight.") :]: v for k, v in ours.items() if k != "weight"}, "cpu")
    assert torch.equal(bnb_dequantize(ours["weight"], rebuilt), nf4.dequantize(q))
    # and we read what bitsandbytes writes
    assert torch.equal(NF4Weight.from_state_dict(theirs, "weight").dequantize(), nf4.dequantize(q))

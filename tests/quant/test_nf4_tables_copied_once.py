"""nf4.dequantize takes the table of each byte's two NF4 values from a per-device cache: copying
it from the host on every call cannot be captured in a CUDA graph (the reference backend runs
inside captures: the experts op falls back to it there), and costs a host-to-device copy a call.
Checked on the CPU by refusing a second copy; the capture itself is tests/ops/test_experts_ops.py's
gpu test."""

import torch

from lowrank.quant import nf4


def test_the_pairs_table_is_copied_to_a_device_once(monkeypatch):
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    q = nf4.quantize(w)
    first = nf4.dequantize(q)

    def refuse(*args, **kwargs):
        raise AssertionError("the NF4 pairs table was copied again")

    monkeypatch.setattr(nf4._NF4_PAIRS, "to", refuse, raising=False)
    assert torch.equal(nf4.dequantize(q), first)

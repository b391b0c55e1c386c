"""torch.distributed.checkpoint (DCP) of a QLoRA model, in one process: dcp.save(model.state_dict())
then dcp.load into a fresh model's state_dict() and load_state_dict gives the same model, bit for
bit. It raised: the quant state's JSON holds the double-quantization offset, whose text varies in
length with its value, and DCP loads in place, into tensors of the fresh model's shapes ("Size
mismatch between saved torch.Size([168]) and current: torch.Size([167])"). See Note: the quant
state's length, lowrank/quant/nf4_weight.py; bitsandbytes still reads the padded JSON."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from lowrank.quant import nf4
from lowrank.quant.nf4_weight import BNB_QUANT_STATE_KEY
from tests.distributed.dcp_4bit_worker import qlora  # the tiny QLoRA Llama the distributed tests use

dcp = pytest.importorskip("torch.distributed.checkpoint")


def test_a_qlora_model_round_trips_through_dcp(tmp_path):
    saved, fresh = qlora(0), qlora(1)  # other weights, other offsets: JSON of other lengths before the fix
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process: no group
        dcp.save(saved.state_dict(), checkpoint_id=tmp_path)
        sd = fresh.state_dict()
        dcp.load(sd, checkpoint_id=tmp_path)
    result = fresh.load_state_dict(sd)
    assert not result.missing_keys and not result.unexpected_keys
    expect = saved.state_dict()
    assert sd.keys() == expect.keys() and all(torch.equal(sd[k], expect[k]) for k in sd)
    ids = torch.arange(12).view(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, saved(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_quant_state_length_depends_on_the_layout_alone(dtype):
    key = "weight." + BNB_QUANT_STATE_KEY
    ones = nf4.quantize(torch.ones(64, 512, dtype=dtype), 64, True)  # every scale 1: offset 1.0, the shortest text
    tiny = nf4.quantize(torch.full((64, 512), -2.1561867752369213e-38, dtype=torch.float32).to(dtype), 64, True)
    short, long_ = ones.to_state_dict()[key], tiny.to_state_dict()[key]
    assert short.shape == long_.shape
    metas = [json.loads(bytes(t.tolist())) for t in (short, long_)]
    assert metas[0]["nested_offset"] == 1.0 and metas[1]["nested_offset"] == tiny.offset.item()

    # bitsandbytes, the format's reference (transformers reads 4-bit checkpoints through it), reads it
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    for q in (ones, tiny):
        sd = q.to_state_dict("weight")
        state = bnb_f.QuantState.from_dict({k[len("weight."):]: v for k, v in sd.items() if k != "weight"}, "cpu")
        assert state.offset.item() == q.offset.item() and list(state.shape) == list(q.shape)
        assert torch.equal(bnb_f.dequantize_4bit(sd["weight"], state), q.dequantize())

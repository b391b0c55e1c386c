"""Houlsby adapters on torch's own decoder: the self-attention and the feed-forward of each layer,
not the cross-attention (as on T5, whose EncDecAttention is left out)."""

import torch
from torch import nn

import lowrank


def test_houlsby_on_a_torch_decoder_leaves_the_cross_attention_alone():
    # every nn.MultiheadAttention matched by type, so the cross-attention multihead_attn got an adapter too
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(32, 4, dim_feedforward=64, batch_first=True, dropout=0.0)
    model = nn.TransformerDecoder(layer, num_layers=2).eval()
    tgt, memory = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    wrapped = lowrank.inject(model, lowrank.AdapterConfig(placement="houlsby"))
    assert sorted(wrapped) == [f"layers.{i}.{m}" for i in range(2) for m in ("linear2", "self_attn")]
    with torch.no_grad():  # torch's attention takes its fast kernel only where no input or weight needs a gradient
        before = model(tgt, memory)
    lowrank.inject(model, lowrank.AdapterConfig(placement="houlsby"), "second")  # a no-op addition (up = 0) ...
    with torch.no_grad():
        assert torch.equal(model(tgt, memory), before)  # ... exactly
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), num_layers=1)
    assert sorted(lowrank.inject(encoder, lowrank.AdapterConfig(placement="houlsby"))) == ["layers.0.linear2",
                                                                                         "layers.0.self_attn"]

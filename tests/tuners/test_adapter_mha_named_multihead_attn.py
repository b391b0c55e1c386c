"""Houlsby's default attention column leaves out torch's TransformerDecoderLayer cross-attention,
`multihead_attn`. It did so by the name alone, so a model's own self-attention named so (as torch's
MultiheadAttention docs name it) lost its adapter: a block holding only such an attention was
refused as having no attention output. Only a TransformerDecoderLayer's `multihead_attn` is left
out now."""

import torch
from torch import nn

import lowrank


class Block(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.linear1, self.linear2 = nn.Linear(d, 32), nn.Linear(32, d)

    def forward(self, x):
        x = x + self.multihead_attn(x, x, x, need_weights=False)[0]
        return x + self.linear2(torch.relu(self.linear1(x)))


def test_a_self_attention_named_multihead_attn_gets_houlsby_s_adapter():
    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block()).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        before = model(x)
    wrapped = lowrank.inject(model, lowrank.AdapterConfig(placement="houlsby"))
    assert sorted(wrapped) == [f"{i}.{m}" for i in range(2) for m in ("linear2", "multihead_attn")]
    with torch.no_grad():
        assert torch.equal(model(x), before)  # up = 0: the adapters add nothing yet, exactly


def test_a_torch_decoder_layer_s_cross_attention_is_still_left_out():
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(16, 2, dim_feedforward=32, batch_first=True)
    assert sorted(lowrank.inject(layer, lowrank.AdapterConfig(placement="houlsby"))) == ["linear2", "self_attn"]
    decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(16, 2, 32, batch_first=True), num_layers=2)
    assert sorted(lowrank.inject(decoder, lowrank.AdapterConfig(placement="houlsby"))) == \
        [f"layers.{i}.{m}" for i in range(2) for m in ("linear2", "self_attn")]

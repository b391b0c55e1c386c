"""The default placements on T5 (encoder and decoder): the feed-forward block DenseReluDense and,
for Houlsby, the self-attention output SelfAttention.o, each before its residual sum; the
decoder's cross-attention is left out. T5 matched none of the default names, so
AdapterConfig() was refused on it."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lowrank.config import AdapterConfig  # noqa: E402
from lowrank.inject import eject, inject  # noqa: E402

from . import models  # noqa: E402


def t5(gated: bool):
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=models.VOCAB, d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8,
                                dropout_rate=0.0, feed_forward_proj="gated-gelu" if gated else "relu")
    return transformers.T5ForConditionalGeneration(cfg).eval()


def logits(model):
    ids = models.ids()
    with torch.no_grad():  # (T5's float ops differ by ~1e-6 with and without autograd)
        return model(input_ids=ids, decoder_input_ids=ids).logits


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby"])
@pytest.mark.parametrize("parallel", [False, True])
def test_t5_gets_the_default_places_and_starts_as_identity(gated, placement, parallel):
    model = t5(gated)
    base = logits(model)
    wrapped = inject(model, AdapterConfig(placement=placement, parallel=parallel))
    ffn = [f"{side}.block.{i}.layer.{1 if side == 'encoder' else 2}.DenseReluDense"
           for side in ("encoder", "decoder") for i in range(2)]
    attention = [f"{side}.block.{i}.layer.0.SelfAttention.o" for side in ("encoder", "decoder") for i in range(2)]
    assert sorted(wrapped) == sorted(ffn + (attention if placement == "houlsby" else []))
    assert not [n for n in wrapped if "EncDecAttention" in n]
    assert torch.equal(logits(model), base)  # up = 0: a fresh adapter adds nothing
    models.randomize_adapters(model)
    assert not torch.equal(logits(model), base)
    eject(model)
    assert torch.equal(logits(model), base)


def test_the_ffn_adapter_sits_before_the_residual_sum():
    # h = x + (f + s * g(f)), f = DenseReluDense(LN(x)): the adapter reads the block's output alone
    model = t5(gated=False)
    inject(model, AdapterConfig(targets=["encoder.block.0.layer.1.DenseReluDense"], scaling=2.0))
    models.randomize_adapters(model)
    ff = model.encoder.block[0].layer[1]
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        f = ff.DenseReluDense.base(ff.layer_norm(x))
        adapter = ff.DenseReluDense.adapters["default"]
        want = x + (f + 2.0 * adapter.up(adapter.act(adapter.down(f))))
        assert torch.equal(ff(x), want)


@pytest.mark.parametrize("attention", ["local", "transient-global"])
def test_longt5s_encoder_attention_gets_houlsbys_adapter(attention):
    # its encoder's self-attention is LocalSelfAttention / TransientGlobalSelfAttention, not SelfAttention: Houlsby
    # adapted the decoder's attention and every feed-forward, and the encoder's attention silently not
    torch.manual_seed(0)
    cfg = transformers.LongT5Config(vocab_size=models.VOCAB, d_model=32, d_ff=64, num_layers=1, num_heads=4, d_kv=8,
                                    encoder_attention_type=attention, local_radius=4)
    model = transformers.LongT5ForConditionalGeneration(cfg).eval()
    kind = "LocalSelfAttention" if attention == "local" else "TransientGlobalSelfAttention"
    assert sorted(inject(model, AdapterConfig(placement="houlsby"))) == sorted([
        f"encoder.block.0.layer.0.{kind}.o", "encoder.block.0.layer.1.DenseReluDense",
        "decoder.block.0.layer.0.SelfAttention.o", "decoder.block.0.layer.2.DenseReluDense"])

"""Bloom's mlp adds the residual itself (BloomMLP.forward(hidden_states, residual)), so a
sequential adapter on it read and added to the residual stream, h = (r + f) + g(r + f), not the
feed-forward's output before the residual sum, h = r + (f + g(f)), as docs/adapters.md says of
every default place. The sequential adapter now goes on its last linear layer (dense_4h_to_h); a
parallel one stays on the mlp, whose input it reads: h = (r + f) + g(x), the same sum."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lowrank.config import AdapterConfig  # noqa: E402
from lowrank.inject import inject  # noqa: E402

from . import models  # noqa: E402


def bloom():
    torch.manual_seed(0)
    return transformers.BloomForCausalLM(transformers.BloomConfig(
        vocab_size=models.VOCAB, hidden_size=32, n_layer=2, n_head=4, hidden_dropout=0.0, attention_dropout=0.0)).eval()


@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby"])
@pytest.mark.parametrize("parallel", [False, True])
def test_bloom_default_places(placement, parallel):
    model = bloom()
    wrapped = inject(model, AdapterConfig(placement=placement, parallel=parallel))
    ffn = [f"transformer.h.{i}.mlp" + ("" if parallel else ".dense_4h_to_h") for i in range(2)]
    attention = [f"transformer.h.{i}.self_attention.dense" for i in range(2)]
    assert sorted(wrapped) == sorted(ffn + (attention if placement == "houlsby" else []))


def _parts(model):
    """The first block's mlp, its input and residual, and its feed-forward's output f without adapters."""
    mlp = model.transformer.h[0].mlp
    torch.manual_seed(1)
    x, r = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    f = mlp.dense_4h_to_h.base(mlp.gelu_impl(mlp.dense_h_to_4h(x))) if hasattr(mlp.dense_4h_to_h, "adapters") \
        else mlp.base.dense_4h_to_h(mlp.base.gelu_impl(mlp.base.dense_h_to_4h(x)))
    return mlp, x, r, f


@torch.no_grad()
def test_the_sequential_adapter_reads_the_feed_forward_output_before_the_residual_sum():
    model = bloom()
    inject(model, AdapterConfig(scaling=2.0))
    models.randomize_adapters(model)
    mlp, x, r, f = _parts(model)
    g = mlp.dense_4h_to_h.adapters["default"]
    assert torch.equal(mlp(x, r), r + (f + 2.0 * g(f)))


@torch.no_grad()
def test_the_parallel_adapter_reads_the_mlp_input():
    model = bloom()
    inject(model, AdapterConfig(parallel=True, scaling=2.0))
    models.randomize_adapters(model)
    mlp, x, r, f = _parts(model)
    g = mlp.adapters["default"]
    assert torch.equal(mlp(x, r), (r + f) + 2.0 * g(x))


def test_other_mlps_keep_their_place():
    """Falcon's mlp returns the feed-forward's output alone: the adapter stays on it."""
    torch.manual_seed(0)
    model = transformers.FalconForCausalLM(transformers.FalconConfig(
        vocab_size=models.VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4))
    assert inject(model, AdapterConfig()) == ["transformer.h.0.mlp", "transformer.h.1.mlp"]

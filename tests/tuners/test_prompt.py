"""Prompt tuning: the invariants (only P trains, the base never moves, eject restores,
disabled is the base), what must work (loss, left padding, gradient checkpointing, torch
encoders, two prompts), real learning, and the clear errors. Parity with PEFT:
tests/peers/test_peft_prompt.py."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowrank
from lowrank.tuners.prompt import PromptLayer

from . import models

transformers = pytest.importorskip("transformers")

N = 4


def injected(build, n=N, seed=3, **kw):
    model = build()
    lowrank.inject(model, lowrank.PromptConfig(num_virtual_tokens=n, **kw))
    models.randomize_adapters(model, seed=seed, std=1.0)
    return model


@pytest.mark.parametrize("kwargs, error", [
    (dict(num_virtual_tokens=0), "num_virtual_tokens must be an integer >= 1; got 0"),
    (dict(num_virtual_tokens=True), "num_virtual_tokens"),
    (dict(init="zeros"), "init must be one of"),
    (dict(init="text"), "needs init_text"),
    (dict(init="text", init_text="hi"), "needs tokenizer="),
    (dict(init_text="hi"), "used by init='text' only"),
])
def test_config_refuses(kwargs, error):
    with pytest.raises(ValueError, match=error):
        lowrank.PromptConfig(**kwargs)


@pytest.mark.parametrize("build, where", [(models.llama, "model.embed_tokens"), (models.gpt2, "transformer.wte"),
                                          (models.bert, "embeddings.word_embeddings")])
def test_targets_input_embedding_and_counts_n_times_d(build, where):
    model = build()
    assert lowrank.inject(model, lowrank.PromptConfig(num_virtual_tokens=N)) == [where]
    s = lowrank.summary(model)
    assert s.trainable == N * 32 and s.per_adapter == {"default": N * 32}  # n * hidden
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [f"{where}.prompts.default"]


@pytest.mark.parametrize("build", [models.llama, models.gpt2])
def test_only_the_prompt_trains_and_the_base_is_bit_identical(build):
    model = injected(build)
    before = {k: v.clone() for k, v in model.state_dict().items() if "prompts" not in k}
    prompt = model.get_input_embeddings().prompts["default"]
    p0 = prompt.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids = models.ids(2, 6)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert not torch.equal(prompt, p0)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_eject_restores_the_model_and_removes_the_hook():
    base = models.llama()
    model = copy.deepcopy(base)
    ids = models.ids()
    lowrank.inject(model, lowrank.PromptConfig(num_virtual_tokens=N))
    assert len(model._forward_pre_hooks) == 1
    with lowrank.disabled(model):  # adapters kept, not applied: the base's output
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)
    lowrank.eject(model)
    assert not model._forward_pre_hooks and type(model.model.embed_tokens) is nn.Embedding
    assert model.state_dict().keys() == base.state_dict().keys()
    assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)
    assert all(p.requires_grad for p in model.parameters())


def test_a_deepcopy_ejects_its_own_hooks():
    model = models.llama()
    lowrank.inject(model, lowrank.PromptConfig(num_virtual_tokens=N))
    twin = copy.deepcopy(model)  # hooks copied with the modules
    for _ in range(2):
        lowrank.eject(twin)
        assert not any(m._forward_pre_hooks for m in twin.modules())
        lowrank.inject(twin, lowrank.PromptConfig(num_virtual_tokens=N))
        assert sum(len(m._forward_pre_hooks) for m in twin.modules()) == 2  # LlamaForCausalLM and its LlamaModel
    lowrank.eject(model)
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_inputs_embeds_once_used_in_a_decode_step_still_get_the_prompt():
    model = models.llama().eval()
    lowrank.inject(model, lowrank.PromptConfig(num_virtual_tokens=N))
    embed, ids = model.get_input_embeddings(), models.ids(1, 5)
    x = embed(ids).detach()
    want = model(inputs_embeds=x.clone()).logits  # (1, N + 5, vocab)
    cache = model(inputs_embeds=embed(ids[:, :2]).detach(), use_cache=True).past_key_values
    model(inputs_embeds=x, cache=cache)  # x as a decode step's input: the hook must not mark x itself as done
    assert torch.equal(model(inputs_embeds=x).logits, want)


def test_two_prompts_are_joined_in_activation_order():
    model = injected(models.llama)
    lowrank.inject(model, lowrank.PromptConfig(num_virtual_tokens=2), name="b")
    layer = model.get_input_embeddings()
    lowrank.set_active(model, ["default", "b"])
    ids = models.ids()
    got = model(input_ids=ids).logits
    assert got.shape[1] == N + 2 + ids.shape[1]
    embeds = torch.cat([layer.prompts["default"], layer.prompts["b"]])[None].expand(2, -1, -1)  # (B, n_a + n_b, d)
    with lowrank.disabled(model):
        want = model(inputs_embeds=torch.cat([embeds, layer.base(ids)], 1)).logits
    assert torch.equal(got, want)
    lowrank.eject(model, "b")
    assert lowrank.adapter_names(model) == ["default"] and len(model._forward_pre_hooks) == 1


@pytest.mark.parametrize("build", [models.llama, models.gpt2])
def test_left_padded_batch_equals_each_row_alone(build):
    """Float64, so that a wrong position or mask (an O(1e-2) change) cannot hide in rounding:
    the padded and the lone computations differ only by reassociation across batch shapes,
    a few ulps of 2^-53 (~1e-16 relative) times the O(10) logits; 1e-10 sits between the two."""
    model = injected(build).double()
    ids = models.ids(2, 7, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as transformers' generate computes them
    padded = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    alone = model(input_ids=ids[1:, 3:]).logits
    assert padded.shape[1] == N + 7
    torch.testing.assert_close(padded[1, N + 3:], alone[0, N:], atol=1e-10, rtol=0)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(out[1, 7:], model.generate(ids[1:, 3:], max_new_tokens=5, do_sample=False)[0, 4:])


def test_gradient_checkpointing_gives_the_same_gradient():
    grads = []
    for checkpointing in (False, True):
        model = injected(models.llama)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        ids = models.ids()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(model.get_input_embeddings().prompts["default"].grad)
    assert grads[0].abs().sum() > 0
    assert torch.equal(grads[0], grads[1])  # checkpointing recomputes the same ops on the same tensors
    model.eval()  # generate with checkpointing still switched on: the same tokens
    ids = models.ids(3, 6, seed=8)
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    model.gradient_checkpointing_disable()
    assert torch.equal(out, model.generate(ids, max_new_tokens=4, do_sample=False))


def test_half_precision_model_keeps_a_float32_prompt():
    """See Note: prompt dtype: P stays float32 and joins the bf16 embeddings cast to bf16."""
    model = models.llama().to(torch.bfloat16)
    lowrank.inject(model, lowrank.PromptConfig(num_virtual_tokens=N))
    layer = model.get_input_embeddings()
    assert layer.prompts["default"].dtype == torch.float32
    ids = models.ids()
    out = model(input_ids=ids, labels=ids)
    with lowrank.disabled(model):
        p = layer.prompts["default"].to(torch.bfloat16)[None].expand(2, -1, -1)  # (B, n, d)
        want = model(inputs_embeds=torch.cat([p, layer.base(ids)], 1)).logits
    assert out.logits.dtype == torch.bfloat16 and torch.equal(out.logits, want)
    out.loss.backward()
    assert layer.prompts["default"].grad.dtype == torch.float32 and layer.prompts["default"].grad.abs().sum() > 0


def test_prompt_tuning_fits_a_small_task():
    """A frozen random Llama learns, through 8 virtual tokens only, to answer every sequence
    with 7 after its first token: the loss falls well below its start. The base is drawn
    with weights of std 0.2, not transformers' 0.02: with 0.02 its logits stay within about
    +-0.6 whatever the input, so no input (prompt or not) could lower the loss much."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=models.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    model = transformers.LlamaForCausalLM(cfg)
    lowrank.inject(model, lowrank.PromptConfig(num_virtual_tokens=8))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(50):
        ids = torch.randint(0, models.VOCAB, (16, 6), generator=g)
        ids[:, 1:] = 7
        labels = ids.masked_fill(torch.arange(6) == 0, -100)  # no loss on the free first token
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses[::10]


def test_init_vocab_and_text_take_embedding_rows():
    class Tokenizer:  # the one method PromptConfig(init="text") needs
        def __call__(self, text):
            return {"input_ids": [int(w) for w in text.split()]}

    model = models.llama()
    rows = model.model.embed_tokens.weight
    config = lowrank.PromptConfig(num_virtual_tokens=5, init="text", init_text="3 9", tokenizer=Tokenizer())
    lowrank.inject(model, config)
    assert torch.equal(model.get_input_embeddings().prompts["default"], rows[[3, 9, 3, 9, 3]])  # repeated to n
    lowrank.inject(model, lowrank.PromptConfig(num_virtual_tokens=6, init="vocab"), name="v")
    p = model.get_input_embeddings().prompts["v"]
    assert all((rows == r).all(-1).any() for r in p)


# -- torch research code: the prompt goes before the targeted module's input ---------------------
def test_bare_transformer_encoder_with_padding_and_causal_masks():
    model = injected(models.encoder)
    layer = model.layers[0]
    assert isinstance(layer, PromptLayer) and not layer.embedding
    x = torch.randn(2, 5, 32)
    pad = torch.tensor([[False] * 5, [True, True, False, False, False]])
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    got = model(x, mask=causal, src_key_padding_mask=pad)
    assert got.shape == (2, N + 5, 32)  # n tokens longer
    p = layer.prompts["default"][None].expand(2, -1, -1)  # (B, n, d)
    with lowrank.disabled(model):
        want = model(torch.cat([p, x], 1), mask=nn.Transformer.generate_square_subsequent_mask(N + 5),
                     src_key_padding_mask=torch.cat([torch.zeros(2, N, dtype=torch.bool), pad], 1))
    assert torch.equal(got, want)
    with pytest.raises(NotImplementedError, match="not causal"):
        model(x, mask=torch.zeros(5, 5).masked_fill(torch.eye(5, dtype=torch.bool), float("-inf")))
    assert len(model._forward_pre_hooks) == 1  # the encoder's: every layer gets masks for n + T
    lowrank.eject(model)
    assert not model._forward_pre_hooks and model(x).shape == (2, 5, 32)


def test_encoder_inside_a_model_sequence_first():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0)
            self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
            self.head = nn.Linear(32, 2)

        def forward(self, x, pad=None):
            return self.head(self.encoder(x, src_key_padding_mask=pad))

    torch.manual_seed(0)
    model = Net()
    assert lowrank.inject(model, lowrank.PromptConfig(num_virtual_tokens=N)) == ["encoder"]
    x = torch.randn(5, 2, 32)  # (T, B, d): batch_first=False
    pad = torch.zeros(2, 5, dtype=torch.bool)
    got = model(x, pad)
    assert got.shape == (N + 5, 2, 2)
    with lowrank.disabled(model):
        p = model.encoder.prompts["default"][:, None].expand(-1, 2, -1)  # (n, B, d)
        want = model.head(model.encoder(torch.cat([p, x]), src_key_padding_mask=torch.zeros(2, N + 5, dtype=torch.bool)))
    assert torch.equal(got, want)


# -- clear errors, never a wrong result -----------------------------------------------------------
def test_an_embedding_nothing_can_prepend_to_is_refused_and_the_model_unchanged():
    class Custom(nn.Module):  # no get_input_embeddings(), no inputs_embeds
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.out = nn.Linear(8, 10)

        def forward(self, ids):
            return self.out(self.emb(ids))

    model = Custom()
    with pytest.raises(ValueError, match="no get_input_embeddings"):
        lowrank.inject(model, lowrank.PromptConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="nothing can prepend the prompt"):
        lowrank.inject(model, lowrank.PromptConfig(num_virtual_tokens=2, targets="emb"))
    assert type(model.emb) is nn.Embedding and not lowrank.adapter_names(model)
    assert all(p.requires_grad for p in model.parameters())


def test_unsupported_calls_raise():
    model = injected(models.llama)
    ids = models.ids()
    with pytest.raises(NotImplementedError, match="attention_mask must be"):
        model(input_ids=ids, attention_mask=torch.ones(2, 1, 8, 8))
    with pytest.raises(NotImplementedError, match=r"must be \(B, past \+ T\) = \(2, 8\) without the prompt"):
        model(input_ids=ids, attention_mask=torch.ones(2, N + 8))  # a mask that already covers the prompt
    with pytest.raises(NotImplementedError, match="does not know how to lengthen argument.*logits_to_keep"):
        model(input_ids=ids, logits_to_keep=torch.tensor([0, 7]))
    with pytest.raises(NotImplementedError, match="per_sample"), lowrank.per_sample(model, ["default", "default"]):
        model(input_ids=ids)
    with pytest.raises(ValueError, match="reads token embeddings"):
        lowrank.inject(models.encoder(), lowrank.PromptConfig(num_virtual_tokens=2, init="vocab"))


def test_a_custom_model_offering_the_two_methods_works():
    class Tiny(nn.Module):  # the contract of docs/prompt.md: get_input_embeddings() + inputs_embeds
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.out = nn.Linear(8, 3)

        def get_input_embeddings(self):
            return self.emb

        def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None):
            h = self.emb(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, d)
            m = torch.ones(h.shape[:2]) if attention_mask is None else attention_mask.float()  # (B, T)
            return self.out((h * m[..., None]).sum(1) / m.sum(1, keepdim=True))  # masked mean -> (B, 3)

    torch.manual_seed(0)
    model = Tiny()
    assert lowrank.inject(model, lowrank.PromptConfig(num_virtual_tokens=3)) == ["emb"]
    ids, mask = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[0, 1, 1, 1]])
    got = model(ids, attention_mask=mask)
    p = model.emb.prompts["default"][None]  # (1, n, d)
    with lowrank.disabled(model):
        want = model(inputs_embeds=torch.cat([p, model.emb(ids)], 1), attention_mask=torch.tensor([[1, 1, 1] + mask[0].tolist()]))
    assert torch.equal(got, want)


def test_bert_token_types_put_the_prompt_in_segment_zero():
    model = injected(models.bert)
    ids = models.ids()
    types = (torch.arange(8) >= 4).long().expand(2, -1)  # (B, T): two segments
    got = model(input_ids=ids, token_type_ids=types).last_hidden_state
    layer = model.get_input_embeddings()
    with lowrank.disabled(model):
        want = model(inputs_embeds=torch.cat([layer.prompt(2, torch.float32), layer.base(ids)], 1),
                     token_type_ids=torch.cat([torch.zeros(2, N, dtype=torch.long), types], 1)).last_hidden_state
    assert got.shape == (2, N + 8, 32) and torch.equal(got, want)


@pytest.mark.parametrize("build, inner", [(models.llama, "model"), (models.gpt2, "transformer")])
def test_calling_the_inner_model_gets_the_prompt_once(build, inner):
    """Both the LM and the model inside it are hosts (See Note: nested hosts): either call
    gets the prompt exactly once."""
    model = injected(build)
    body = getattr(model, inner)
    ids = models.ids()
    layer = model.get_input_embeddings()
    got = body(input_ids=ids).last_hidden_state
    with lowrank.disabled(model):
        want = body(inputs_embeds=torch.cat([layer.prompt(2, torch.float32), layer.base(ids)], 1)).last_hidden_state
    assert got.shape == (2, N + 8, 32) and torch.equal(got, want)
    outer = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    assert torch.equal(outer, got)

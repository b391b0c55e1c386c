"""Where prefix tokens sit: positions as transformers' own cache path gives them (the prefix as
P past tokens, PEFT's view), for models numbering positions from the padding (RoBERTa), for a
call of the inner model, under per-sample routing, with a StaticCache, with a prompt too; and a
clear error where the positions outgrow a table of position embeddings."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowrank
from lowrank.tuners.prefix import layers

from . import models

transformers = pytest.importorskip("transformers")


def cache_path(base, ours, name="default", **kwargs):
    """transformers' own path for a KV prefix: a DynamicCache holding the prefix of `ours`
    (adapter `name`), the mask widened by P ones; the model counts P past tokens."""
    cache = transformers.DynamicCache(config=base.config)
    B = next(v for v in kwargs.values() if isinstance(v, torch.Tensor)).shape[0]
    for i, layer in enumerate(layers(ours, name)):
        k, v = layer.prefixes(B, torch.float32)
        cache.update(k, v, i)
    mask = kwargs.pop("attention_mask")
    return base(attention_mask=torch.cat([mask.new_ones(B, k.shape[2]), mask], 1), cache=cache, **kwargs)


def roberta():
    torch.manual_seed(0)
    cfg = transformers.RobertaConfig(vocab_size=models.VOCAB, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=40,
                                     num_labels=3, pad_token_id=1, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    return transformers.RobertaForSequenceClassification(cfg).eval()


def test_roberta_numbers_positions_from_the_padding_plus_the_prefix():
    # RoBERTa's position of a token: padding_idx + its count of real tokens + past; padding: padding_idx
    base = roberta()
    ours = copy.deepcopy(base)
    lowrank.inject(ours, lowrank.PrefixConfig(num_virtual_tokens=3))
    models.randomize_adapters(ours, std=1.0)
    ids = torch.randint(2, models.VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 4:], ids[0, 4:] = 0, 1  # right padding with the pad id
    assert torch.equal(ours(input_ids=ids, attention_mask=mask).logits,
                       cache_path(base, ours, input_ids=ids, attention_mask=mask).logits)
    # from inputs_embeds RoBERTa numbers 2.. whatever the past: the cache path does not shift them either
    embeds = base.get_input_embeddings()(ids)
    assert torch.equal(ours(inputs_embeds=embeds, attention_mask=mask).logits,
                       cache_path(base, ours, inputs_embeds=embeds, attention_mask=mask).logits)


def test_the_inner_model_called_alone_shifts_too():
    base = models.llama().eval()
    ours = copy.deepcopy(base)
    lowrank.inject(ours, lowrank.PrefixConfig(num_virtual_tokens=3))
    models.randomize_adapters(ours, std=1.0)
    ids = models.ids()
    mask = torch.ones_like(ids)
    want = cache_path(base.model, ours, input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(ours.model(input_ids=ids).last_hidden_state, want)
    assert torch.equal(ours(input_ids=ids, output_hidden_states=True).hidden_states[-1], want)  # once, not twice
    lowrank.eject(ours)
    assert not any(m._forward_pre_hooks for m in ours.modules())


def test_a_route_past_the_prefix_does_not_shift_positions():
    # per_sample to LoRA (or the base) skips the prefix's attention; its positions must not move either
    base = models.gpt2().eval()
    model = copy.deepcopy(base)
    lowrank.inject(model, lowrank.LoraConfig(r=2, targets=["c_fc"]), "lora")
    models.randomize_adapters(model)
    lowrank.inject(model, lowrank.PrefixConfig(num_virtual_tokens=5), "prefix")
    lowrank.set_active(model, ["lora", "prefix"])
    ids = models.ids()
    with lowrank.per_sample(model, ["__base__", "__base__"]):
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)
    with lowrank.per_sample(model, ["lora", "__base__"]):
        routed = model(input_ids=ids).logits
    lowrank.set_active(model, "lora")
    assert torch.equal(routed[0], model(input_ids=ids).logits[0])
    assert torch.equal(routed[1], base(input_ids=ids).logits[1])


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_static_cache_generates_as_the_dynamic_one(attention):
    # sdpa without padding gets no mask: the prefix's causal mask must span the static cache's slots
    model = models.llama().eval()
    model.set_attn_implementation(attention)
    lowrank.inject(model, lowrank.PrefixConfig(num_virtual_tokens=3))
    models.randomize_adapters(model, std=1.0)
    ids = models.ids(1, 6)
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0,
              output_scores=True, return_dict_in_generate=True)
    dynamic = model.generate(**kw)
    static = model.generate(cache_implementation="static", **kw)
    assert torch.equal(static.sequences, dynamic.sequences)
    # the static cache's masked slots add exact zeros to the softmax sums: equal up to the summation's order
    for a, b in zip(static.scores, dynamic.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prefix_first", [True, False])
def test_a_prompt_and_a_prefix_sit_prefix_then_prompt_whichever_came_first(prefix_first):
    # [prefix (P) ; prompt (n) ; text]: the prompt at positions P..P+n-1
    base = models.llama().eval()
    ours = copy.deepcopy(base)
    configs = [(lowrank.PrefixConfig(num_virtual_tokens=3), "prefix"), (lowrank.PromptConfig(num_virtual_tokens=2), "prompt")]
    for config, name in configs if prefix_first else configs[::-1]:
        lowrank.inject(ours, config, name)
    lowrank.set_active(ours, ["prefix", "prompt"])
    models.randomize_adapters(ours, std=1.0)
    ids = models.ids()
    prompt = ours.get_input_embeddings().prompts["prompt"]  # (n, d)
    embeds = torch.cat([prompt.expand(ids.shape[0], -1, -1), base.get_input_embeddings()(ids)], dim=1)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    want = cache_path(base, ours, "prefix", inputs_embeds=embeds, attention_mask=mask).logits
    assert torch.equal(ours(input_ids=ids).logits, want)


@pytest.mark.parametrize("config", [lowrank.PrefixConfig(num_virtual_tokens=6), lowrank.PromptConfig(num_virtual_tokens=6)],
                         ids=["prefix", "prompt"])
def test_positions_past_the_table_are_named(config):
    # GPT-2's learned position table (n_positions); an IndexError in the embedding before
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=models.VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=10)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    lowrank.inject(model, config)
    kind = "prefix" if isinstance(config, lowrank.PrefixConfig) else "prompt"
    assert model(input_ids=models.ids(1, 4)).logits.shape[1] == (4 if kind == "prefix" else 10)  # 6 + 4 fit
    with pytest.raises(ValueError, match=rf"^{kind} tuning \(6 virtual tokens, 0 past, 5 new\) needs 11 positions, "
                                         r"but GPT2LMHeadModel's position embeddings hold 10 \(max_position_embeddings=10\)"):
        model(input_ids=models.ids(1, 5))
    # a rotary model has no table: Llama runs past max_position_embeddings as it does without a prefix
    llama = models.llama().eval()
    lowrank.inject(llama, config)
    llama(input_ids=models.ids(1, llama.config.max_position_embeddings))


def test_per_sample_routing_is_refused():
    model = models.llama().eval()
    lowrank.inject(model, lowrank.PrefixConfig(num_virtual_tokens=2))
    with lowrank.per_sample(model, ["default", "__base__"]), pytest.raises(NotImplementedError, match="per sample"):
        models.run(model, models.ids())


def test_nested_injected_models_shift_positions_once():
    """inject into the LM and (another adapter) into its inner model: two hooks, one shift."""
    nested = models.llama().eval()
    lowrank.inject(nested, lowrank.PrefixConfig(num_virtual_tokens=3))
    lowrank.inject(nested.model, lowrank.PrefixConfig(num_virtual_tokens=2), "inner")
    lowrank.set_active(nested, "default")
    single = models.llama().eval()
    lowrank.inject(single, lowrank.PrefixConfig(num_virtual_tokens=3))
    with torch.no_grad():
        for mine, theirs in zip(layers(nested, "default"), layers(single, "default")):
            mine.kv["default"].copy_(theirs.kv["default"])
    x = models.ids()
    expected = models.run(single, x)
    assert torch.equal(models.run(nested, x), expected)
    with pytest.raises(TypeError):
        nested(x, input_ids=x)  # a call failing in the hook itself must not leave the shift switched off
    assert torch.equal(models.run(nested, x), expected)
    with lowrank.disabled(single):
        assert not torch.equal(models.run(single, x), expected)


def test_a_call_stopped_by_a_keyboard_interrupt_leaves_the_shift_on():
    """torch skips always_call hooks on a KeyboardInterrupt (Ctrl-C mid-generate): the calls it stopped
    must not make later ones look nested (Note: one shift per call)."""
    nested = models.llama().eval()
    lowrank.inject(nested, lowrank.PrefixConfig(num_virtual_tokens=3))
    lowrank.inject(nested.model, lowrank.PrefixConfig(num_virtual_tokens=2), "inner")
    lowrank.set_active(nested, "default")
    x = models.ids()
    expected = models.run(nested, x)

    def interrupt(module, args):
        raise KeyboardInterrupt

    handle = nested.model.layers[-1].register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        models.run(nested, x)
    handle.remove()
    assert torch.equal(models.run(nested, x), expected)
    assert torch.equal(models.run(nested, x), expected)


def test_a_compiled_call_stopped_by_a_keyboard_interrupt_leaves_the_shift_on():
    """Compiled calls keep no frame on the stack: a model found there already is a call that ended."""
    model = models.llama().eval()
    lowrank.inject(model, lowrank.PrefixConfig(num_virtual_tokens=3))
    x = models.ids()
    expected = models.run(model, x)
    stop = [False]

    def interrupt(module, args):
        if stop[0]:
            raise KeyboardInterrupt

    model.model.layers[-1].register_forward_pre_hook(interrupt)
    compiled = torch.compile(model, backend="eager")
    assert torch.equal(models.run(compiled, x), expected)
    stop[0] = True
    with pytest.raises(KeyboardInterrupt):
        models.run(compiled, x)
    stop[0] = False
    assert torch.equal(models.run(compiled, x), expected)
    assert torch.equal(models.run(model, x), expected)
    torch._dynamo.reset()


def test_only_a_table_of_positions_limits_them():
    """GPT-2's wpe holds n_positions, CTRL's and CodeGen's fixed buffers (sinusoids; CodeGen's rotary
    table) too; XGLM's sinusoids grow with the input, though its config says max_position_embeddings."""
    from lowrank.tuners.prefix_attention import position_limit

    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4,
                                                                n_positions=24))
    xglm = transformers.XGLMForCausalLM(transformers.XGLMConfig(vocab_size=64, d_model=32, num_layers=1,
                                                                attention_heads=4, ffn_dim=64, max_position_embeddings=16))
    codegen = transformers.CodeGenForCausalLM(transformers.CodeGenConfig(vocab_size=64, n_embd=32, n_layer=1, n_head=4,
                                                                         n_positions=16, rotary_dim=4))
    ctrl = transformers.CTRLLMHeadModel(transformers.CTRLConfig(vocab_size=64, n_embd=32, n_layer=1, n_head=4,
                                                                dff=64, n_positions=16))  # a fixed buffer of sinusoids
    assert (position_limit(gpt2), position_limit(xglm), position_limit(codegen), position_limit(ctrl)) == (
        24, None, 16, 16)
    with pytest.raises(IndexError):  # CodeGen's rotary table is a limit indeed
        codegen(input_ids=torch.zeros(1, 17, dtype=torch.long))
    assert xglm(input_ids=torch.zeros(1, 40, dtype=torch.long)).logits.shape[1] == 40  # no limit there indeed


def test_another_models_stopped_call_leaves_a_compiled_models_shift_on():
    """Two prefixed models called in turn (a policy and a reference model), compiled, the second
    stopped by a KeyboardInterrupt: its stale entries must not make the first look nested."""
    first, second = models.llama().eval(), models.llama().eval()
    lowrank.inject(first, lowrank.PrefixConfig(num_virtual_tokens=3))
    lowrank.inject(second, lowrank.PrefixConfig(num_virtual_tokens=2))
    stop = [False]

    def interrupt(module, args):
        if stop[0]:
            raise KeyboardInterrupt

    second.model.layers[-1].register_forward_pre_hook(interrupt)
    both = nn.ModuleList([first, second])
    x = models.ids()
    with torch.no_grad():
        want = [models.run(m, x) for m in both]
        compiled = torch.compile(lambda ids: [models.run(m, ids) for m in both], backend="eager")
        assert all(torch.equal(a, b) for a, b in zip(compiled(x), want))
        stop[0] = True
        with pytest.raises(KeyboardInterrupt):
            compiled(x)
        stop[0] = False
        assert all(torch.equal(a, b) for a, b in zip(compiled(x), want))
    torch._dynamo.reset()

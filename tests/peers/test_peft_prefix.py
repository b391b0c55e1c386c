"""Parity with PEFT 0.21's PrefixTuning (the oracle) on tiny Llama, GPT-2 and Qwen2 causal LMs
built from config: the same prefix parameters give the same logits, in forward (with and
without left padding and position ids) and at every step of generate (greedy and sampling).

# Note: why forward equality is exact. PEFT puts the prefix into the KV cache, transformers
# concatenates [P_k ; K] in cache.update and attends; we hand the same keys to the same
# cache.update call (lowrank.tuners.prefix_attention) and widen the mask with the same
# always-visible columns, and positions are shifted by P in both. The attention then runs
# the same kernels on the same tensors, so float32 logits must be bit-for-bit equal at every
# real (non-padding) position. Padding query rows are excluded: transformers may rewrite
# fully-masked rows, and those rows differ in whether the prefix makes them non-empty.

# Note: generate's oracle is PEFT's forward, not PEFT's generate. With transformers 5.24 the
# model's cache argument is named `cache`; PEFT 0.21's prepare_inputs_for_generation puts its
# prefix under `past_key_values` beside generate's own empty `cache`, and the model reads the
# empty one: PEFT's generate runs without the prefix (test_peft_generate_drops_the_prefix
# records this). So each step of our generate is checked against PEFT's forward on the
# sequence so far. Generation runs in float64: the cached, step-by-step logits differ from a
# full recompute only by rounding, below 64 * eps64 * |logit| ~ 1e-13 for these sizes; a
# real mistake (a missing prefix, a position off by one) moves logits by ~1e-2. generate
# returns its logits cast to float32, which adds one rounding (2^-24 relative).
"""

from __future__ import annotations

import copy

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import lowrank  # noqa: E402
from lowrank.tuners.prefix import layers  # noqa: E402

VOCAB, P = 64, 3
GEN_TOL = 1e-12  # See Note: generate's oracle (float64 rounding ~1e-13; real errors ~1e-2)


def tiny(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        return transformers.LlamaForCausalLM(cfg).eval()
    if kind == "qwen2":
        cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        return transformers.Qwen2ForCausalLM(cfg).eval()
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg).eval()
    if kind == "opt":  # positions from the attention mask (prefix_attention.py, Note: positions from the mask)
        cfg = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                     word_embed_proj_dim=32, max_position_embeddings=64, dropout=0.0)
        return transformers.OPTForCausalLM(cfg).eval()
    if kind == "biogpt":  # a position embedding like OPT's, but numbered by arange: the mask rule must not apply
        cfg = transformers.BioGptConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                        attention_probs_dropout_prob=0.0)
        return transformers.BioGptForCausalLM(cfg).eval()
    # the cache as `layer_past`
    if kind == "gpt_neox":
        cfg = transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=64)
        return transformers.GPTNeoXForCausalLM(cfg).eval()
    if kind == "falcon":
        cfg = transformers.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        new_decoder_architecture=True, num_kv_heads=2, max_position_embeddings=64)
        return transformers.FalconForCausalLM(cfg).eval()
    if kind == "gpt_bigcode":
        cfg = transformers.GPTBigCodeConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return transformers.GPTBigCodeForCausalLM(cfg).eval()
    raise ValueError(kind)


def pair(kind: str, hidden: int | None = None, dtype=torch.float32, attention: str = "sdpa"):
    """(ours, PEFT's) for the same base, with the same prefix parameters in both."""
    base = tiny(kind).to(dtype)
    base.set_attn_implementation(attention)
    ours = copy.deepcopy(base)
    lowrank.inject(ours, lowrank.PrefixConfig(num_virtual_tokens=P, projection_hidden=hidden))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=hidden is not None,
        encoder_hidden_size=hidden or 32)).to(dtype)
    found = layers(ours, "default")
    encoder = theirs.prompt_encoder["default"]
    with torch.no_grad():
        if hidden is None:
            encoder.embedding.weight.copy_(torch.cat([layer.kv["default"] for layer in found], dim=1))
        else:
            shared = found[0].shared["default"]
            for p in found[0].adapter_parameters("default") + found[1].adapter_parameters("default"):
                p.normal_(0, 0.5)  # make every MLP weight matter
            encoder.embedding.weight.copy_(shared[0].weight)
            encoder.transform[0].load_state_dict(shared[1].state_dict())
            # PEFT's last linear, rows layer by layer = our per-layer `up` blocks stacked
            encoder.transform[2].weight.copy_(torch.cat([layer.up["default"].weight for layer in found], dim=0))
            encoder.transform[2].bias.copy_(torch.cat([layer.up["default"].bias for layer in found], dim=0))
    return ours, theirs


def batch(left_pad: bool):
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if left_pad:
        mask[0, :3] = 0
        ids[0, :3] = 0
    return ids, mask


@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # boolean masks / additive float masks
@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2", "opt", "biogpt", "gpt_neox", "falcon", "gpt_bigcode"])
@pytest.mark.parametrize("left_pad", [False, True])
def test_forward_logits_equal_peft(kind, left_pad, attention):
    ours, theirs = pair(kind, attention=attention)
    ids, mask = batch(left_pad)
    real = mask.bool()
    a = ours(input_ids=ids, attention_mask=mask).logits
    b = theirs(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(a[real], b[real])  # See Note: why forward equality is exact.
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # what generate passes
    a = ours(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    b = theirs(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert torch.equal(a[real], b[real])
    base = tiny(kind)
    assert not torch.equal(a[real], base(input_ids=ids, attention_mask=mask, position_ids=positions).logits[real])


def assert_loss_and_gradients_equal(ours, theirs):
    """The same loss on one batch, bit for bit, and the same gradient of the prefix."""
    ids, _ = batch(False)
    a, b = ours(input_ids=ids, labels=ids).loss, theirs(input_ids=ids, labels=ids).loss
    assert torch.equal(a, b)
    a.backward()
    b.backward()
    ours_grad = torch.cat([layer.kv["default"].grad for layer in layers(ours, "default")], dim=1)
    assert torch.equal(ours_grad, theirs.prompt_encoder["default"].embedding.weight.grad)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_loss_and_gradients_equal_peft(kind):
    ours, theirs = pair(kind)
    assert_loss_and_gradients_equal(ours, theirs)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_float32_prefix_on_a_bf16_model_gets_peft_gradients(kind):
    # PEFT keeps its prefix in float32 on a bf16 model; lowrank with inject(..., dtype=float32).
    # The batch's gradients are summed in float32 in both (they were summed in bf16 here, once
    # the prefix was cast before being expanded over the batch: the gradient came out bf16-rounded)
    base = tiny(kind).to(torch.bfloat16)
    ours = copy.deepcopy(base)
    lowrank.inject(ours, lowrank.PrefixConfig(num_virtual_tokens=P), dtype=torch.float32)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                             num_virtual_tokens=P))
    assert theirs.prompt_encoder["default"].embedding.weight.dtype == torch.float32
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.copy_(
            torch.cat([layer.kv["default"] for layer in layers(ours, "default")], dim=1))
    assert_loss_and_gradients_equal(ours, theirs)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_reparameterised_prefix_equals_peft_projection(kind):
    """prefix_projection=True in PEFT: one MLP for all layers; ours splits its last linear by
    layer rows. The prefixes agree to float32 dot-product rounding: each is a sum of h = 32
    products plus a bias, so |ours - PEFT| <= 2 * h * eps32 * (|W2| |tanh(.)| + |b2|) (Higham's
    bound for two differently-blocked evaluations); the logits then agree as closely."""
    ours, theirs = pair(kind, hidden=32)
    found = layers(ours, "default")
    mine = torch.cat([layer.prefix("default") for layer in found], dim=1)  # (P, L * 2 d_kv)
    encoder = theirs.prompt_encoder["default"]
    peft_prefix = encoder(torch.arange(P)[None])[0]  # (P, L * 2 d_kv)
    hidden = found[0].shared["default"](torch.arange(P))  # tanh(E W1^T + b1), (P, h)
    w2, b2 = encoder.transform[2].weight, encoder.transform[2].bias
    bound = 2 * 32 * torch.finfo(torch.float32).eps * (hidden.abs() @ w2.abs().T + b2.abs())
    assert ((mine - peft_prefix).abs() <= bound).all()
    ids, mask = batch(True)
    a = ours(input_ids=ids, attention_mask=mask).logits[mask.bool()]
    b = theirs(input_ids=ids, attention_mask=mask).logits[mask.bool()]
    # a prefix error d moves a logit by at most ~|d| * (product of layer gains); measured gains are < 100 here
    assert (a - b).abs().max() <= 100 * bound.max()


def _check_steps(ours, theirs, ids, mask, **generate_kwargs):
    out = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, pad_token_id=0, output_logits=True,
                        return_dict_in_generate=True, **generate_kwargs)
    seq, T = out.sequences, ids.shape[1]
    for step, logits in enumerate(out.logits):
        prefix_ids = seq[:, :T + step]
        m = torch.cat([mask, torch.ones(2, step, dtype=mask.dtype)], dim=1)
        positions = (m.cumsum(1) - 1).masked_fill(m == 0, 1)  # generate's position ids for left padding
        oracle = theirs(input_ids=prefix_ids, attention_mask=m, position_ids=positions).logits[:, -1]
        # generate hands back float32 logits: one rounding, at most 2^-24 relative, on top of float64 noise
        assert ((logits.double() - oracle).abs() <= oracle.abs() * 2.0**-24 + GEN_TOL).all()  # Note: generate's oracle
    return seq


# GPT-2 is left out with checkpointing: transformers' GPT2Model hands its blocks no cache when
# gradient checkpointing is on in train mode (modeling_gpt2.py), so even the base GPT-2's
# generate goes wrong there (its greedy output changes), prefix or not.
@pytest.mark.parametrize("kind, checkpointing", [("llama", False), ("gpt2", False), ("qwen2", False),
                                                 ("llama", True), ("qwen2", True), ("gpt_neox", False),
                                                 ("falcon", False), ("gpt_bigcode", False), ("opt", False)])
def test_generate_greedy_and_sampling_follow_peft_forward(kind, checkpointing):
    """checkpointing: generating mid-training, gradient checkpointing on and the model in train
    mode (dropout is 0 in these configs, so train mode computes the same function)."""
    ours, theirs = pair(kind, dtype=torch.float64)
    if checkpointing:
        ours.gradient_checkpointing_enable()
        ours.train()
    ids, mask = batch(True)
    greedy = _check_steps(ours, theirs, ids, mask, do_sample=False)
    torch.manual_seed(5)
    sampled = _check_steps(ours, theirs, ids, mask, do_sample=True, top_k=0, temperature=1.5)
    assert not torch.equal(greedy, sampled)  # sampling really sampled


def test_peft_generate_drops_the_prefix():
    """Records the PEFT 0.21 + transformers 5.24 behaviour that makes PEFT's forward the oracle
    (Note: generate's oracle): PEFT's greedy generate equals the base model's."""
    ours, theirs = pair("llama")
    ids, mask = batch(False)
    theirs_out = theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    base_out = tiny("llama").generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    ours_out = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    if not torch.equal(theirs_out, base_out):
        pytest.skip("PEFT's generate applies the prefix now: compare generate to generate directly")
    assert not torch.equal(ours_out, base_out)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_gradient_checkpointing_gives_peft_gradients(kind):
    """PEFT refuses gradient checkpointing with prefix tuning; ours runs it and gets PEFT's
    (checkpoint-free) gradients: recomputation repeats the same float ops, so exactly."""
    ours, theirs = pair(kind)
    ours.gradient_checkpointing_enable()
    ours.train()
    theirs.train()
    assert_loss_and_gradients_equal(ours, theirs)


def test_alibi_attention_is_refused_by_name():
    """Bloom's ALiBi bias is built for the real tokens' keys only: refused, not silently wrong."""
    cfg = transformers.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=1, n_head=4)
    with pytest.raises(NotImplementedError, match="its ALiBi position bias"):
        lowrank.inject(transformers.BloomForCausalLM(cfg), lowrank.PrefixConfig(num_virtual_tokens=P))
    cfg = transformers.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                    alibi=True)  # Falcon takes the same argument, used only with alibi=True
    with pytest.raises(NotImplementedError, match="its ALiBi position bias"):
        lowrank.inject(transformers.FalconForCausalLM(cfg), lowrank.PrefixConfig(num_virtual_tokens=P))


def test_falcon_multi_query_equals_the_cache_path():
    """Falcon's first layout with multi_query (Falcon-7B's, FalconConfig's default) caches one
    key/value head: the prefix has one too (it had num_heads and the first forward raised). PEFT
    fails here, so the oracle is transformers' own cache holding the prefix, the mask widened by P."""
    torch.manual_seed(0)
    cfg = transformers.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    new_decoder_architecture=False, multi_query=True)
    base = transformers.FalconForCausalLM(cfg).eval()
    ours = copy.deepcopy(base)
    lowrank.inject(ours, lowrank.PrefixConfig(num_virtual_tokens=P))
    found = layers(ours, "default")
    assert all(layer.heads == 1 for layer in found)
    ids, mask = batch(left_pad=True)
    cache = transformers.DynamicCache(config=base.config)
    with torch.no_grad():
        for i, layer in enumerate(found):
            layer.kv["default"].normal_()
            cache.update(*layer.prefixes(2, torch.float32), i)
        want = base(input_ids=ids, attention_mask=torch.cat([torch.ones(2, P, dtype=mask.dtype), mask], 1),
                    past_key_values=cache).logits
        got = ours(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got[mask.bool()], want[mask.bool()])


def test_opt_padding_takes_no_positions():
    """OPT numbers positions from the mask, so a left-padded batch as wide as the table fits when
    its rows do: the check counted columns and refused it (PEFT runs it)."""
    ours, theirs = pair("opt")
    width = 64  # max_position_embeddings
    ids = torch.randint(1, VOCAB, (2, width), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[:, :P + 1] = 0  # every row leaves room for the prefix
    real = mask.bool()
    assert torch.equal(ours(input_ids=ids, attention_mask=mask).logits[real],
                       theirs(input_ids=ids, attention_mask=mask).logits[real])
    with pytest.raises(ValueError, match="needs 67 positions"):
        ours(input_ids=ids)  # no padding: P + 64 positions do not fit

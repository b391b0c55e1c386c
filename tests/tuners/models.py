"""Tiny models for the tuner tests, built from config (no download), dropout off."""

import torch
from torch import nn

VOCAB = 64


def llama():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg)


def mixtral():
    """A mixture of experts: 4 experts a layer, held (as transformers 5 holds them) in 3-D parameters."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                     num_local_experts=4, num_experts_per_tok=2)
    return transformers.MixtralForCausalLM(cfg)



def phimoe():
    """PhiMoE: its router subclasses nn.Linear and returns routing (a module LoRA cannot wrap); eval mode."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.PhimoeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                    num_experts_per_tok=2)
    return transformers.PhimoeForCausalLM(cfg).eval()


def gpt_oss():
    """Experts stored (E, in, out) (`is_transposed`) with biases: 4 experts a layer."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GptOssConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                    num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                                    layer_types=["full_attention"] * 2)
    model = transformers.GptOssForCausalLM(cfg)
    with torch.no_grad():  # nonzero expert biases (they start at zero)
        for k, p in model.named_parameters():
            if k.endswith("_proj_bias"):
                p.normal_(std=0.1)
    return model


def gpt2():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def bert():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=32,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertModel(cfg)


def encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4))


def ids(batch=2, seq=8, seed=1):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def run(model, x):
    """The model's main output tensor for input x (token ids or features)."""
    out = model(x) if not x.dtype == torch.long else model(input_ids=x)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def randomize_adapters(model, seed=3, std=0.1):
    """Make every adapter weight non-zero (B = 0 / up = 0 would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p.device) * std)


def bf16_4bit_llama_and_dense_twin():
    """A bfloat16 Llama quantized to NF4 (lm_head kept) and its dense twin, whose linear weights
    are the 4-bit ones dequantized: a tuner must compute the same on both, bit for bit, where
    the 4-bit op is F.linear on the dequantized weight (more than 16 rows of x)."""
    import copy

    from lowrank import quantize
    from lowrank.quant import nf4

    model = llama().to(torch.bfloat16)
    dense = copy.deepcopy(model)
    quantize(model)
    with torch.no_grad():
        for name, m in dense.named_modules():
            if isinstance(m, nn.Linear) and name != "lm_head":
                m.weight.copy_(nf4.dequantize(nf4.quantize(m.weight)))
    return model, dense


def copy_trainable(source, target):
    """Give `target` the trainable parameters of `source` (same names), e.g. an adapter's init."""
    with torch.no_grad():
        for name, p in target.named_parameters():
            if p.requires_grad:
                p.copy_(source.get_parameter(name))


def outputs_and_grads(model, x):
    """The model's output on x and the gradients of its trainable parameters for sum(out^2)."""
    out = run(model, x)
    out.float().square().sum().backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

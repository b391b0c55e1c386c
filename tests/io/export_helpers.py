"""Shared by the export / CLI tests: tiny transformers models saved to disk, a float64
reference of an adapted model, and the tolerance rule.

# Note: the export tolerance. The exported model computes x W'^T with W' = W0 + s B A
# rounded once to the export dtype; the adapted model computes x W0^T + s (x A^T) B^T in the
# same dtype. Against a float64 reference of the adapted model (the same weights: dequantized
# 4-bit ones, the same adapter), both are rounding errors of the same network at the same
# precision, and the export adds one rounding of each merged weight (relative u, as each
# product of the adapted model has). So the exported model's error is at most about twice the
# adapted model's own; we assert <= 2x (measured: 0.8x to 1.1x in fp32 and bf16). A wrong
# merge (a missing scale, the wrong W0, a transposed factor) moves the logits by the size of
# the adapter's effect, 10^3 (bf16) to 10^6 (fp32) times more.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lowrank.io import load_adapter, save_adapter
from lowrank.quant.linear4bit import Linear4bit
from tests.tuners import models


def llama64():
    """Tiny Llama with every linear layer's input width a multiple of 64. Note: bitsandbytes
    0.50's CPU dequantize_4bit (and Linear4bit forward) is wrong when a row is shorter than
    the blocksize (a 32-wide weight at blocksize 64 comes back with the wrong scales), so the
    tests that use bitsandbytes as the oracle use widths of 64 and more."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=models.VOCAB, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg)


def saved_base(kind: str, directory, dtype=torch.float32):
    """A tiny transformers model saved with save_pretrained and loaded back from `directory`
    (so config._name_or_path is that directory, as for a real checkpoint)."""
    import transformers

    make = llama64 if kind == "llama64" else getattr(models, kind)
    make().to(dtype).save_pretrained(directory)
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()


def dense64(model: nn.Module) -> nn.Module:
    """`model` in float64, every Linear4bit replaced by an nn.Linear holding its dequantized
    weight in its compute dtype (the weight its forward multiplies by)."""
    for module in list(model.modules()):
        for attr, child in list(module.named_children()):
            if isinstance(child, Linear4bit):
                lin = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                with torch.no_grad():
                    lin.weight.copy_(child.dequantize(child.compute_dtype).float())
                    if child.bias is not None:
                        lin.bias.copy_(child.bias)
                setattr(module, attr, lin)
    return model.double()


def reference64(plain: nn.Module, adapted: nn.Module, tmp) -> nn.Module:
    """The adapted model in float64: `plain` (a copy of the model before inject) made dense
    float64, with the adapter moved over through save_adapter / load_adapter."""
    save_adapter(adapted, tmp / "reference-adapter")
    ref = dense64(copy.deepcopy(plain))
    load_adapter(ref, tmp / "reference-adapter")
    return ref


def tokenizer():
    """A word-level tokenizer over the tiny vocabulary ("w0" .. "w62"), built here (no download)."""
    import tokenizers
    import transformers

    vocab = {f"w{i}": i for i in range(models.VOCAB - 1)} | {"[UNK]": models.VOCAB - 1}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits.double()


def assert_export_close(exported, adapted, reference, x) -> float:
    """See Note: the export tolerance. Returns the bound used."""
    truth = logits(reference, x)
    own = (logits(adapted, x) - truth).abs().max().item()
    err = (logits(exported, x) - truth).abs().max().item()
    bound = 2 * own
    assert err <= bound, f"exported model is off by {err:.3g}; the adapted model itself by {own:.3g}"
    return bound

"""DoRA on bitsandbytes' own Linear4bit (a transformers BitsAndBytesConfig model), against PEFT
0.21 (the oracle): inject refused it ("use plain LoRA there") where PEFT trains it (QDoRA) and
loads its files. lowrank now reads W0 as PEFT does, bnb.functional.dequantize_4bit
(lowrank/tuners/lora_base.py, Note: DoRA on bitsandbytes' 4-bit layers); the same weights give
the same magnitudes at init and the same outputs and gradients, bit for bit (tests/peers/
test_peft_lora.py, Note: why equality is exact: the same ops on the same tensors in the same
order), in training mode with dropout too (both draw the same random numbers)."""

from __future__ import annotations

import copy
import pathlib
import sys

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")

import lowrank  # noqa: E402
from lowrank import LoraConfig, inject  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))
from _qlora_build import bnb_quantize  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]


def peft_name(ours: str) -> str:
    name = ours.replace(".base.", ".base_layer.")
    return name + ".weight" if ".lora_magnitude_vector." in name else name


def bnb_llama(model_dtype: torch.dtype, compute_dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.LlamaModel(cfg).to(model_dtype)
    bnb_quantize(model, compute_dtype, torch.device("cpu"))
    model.is_loaded_in_4bit = True  # as transformers marks it: PEFT then makes its bitsandbytes layers
    assert isinstance(model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    return model


@pytest.mark.parametrize("model_dtype, compute_dtype, adapter_dtype, dropout", [
    (torch.float32, torch.float32, None, 0.0), (torch.float32, torch.float32, None, 0.1),
    (torch.bfloat16, torch.bfloat16, None, 0.1), (torch.bfloat16, torch.bfloat16, torch.float32, 0.1),
    (torch.float32, torch.bfloat16, None, 0.0)])
def test_dora_on_bitsandbytes_4bit_equals_peft(model_dtype, compute_dtype, adapter_dtype, dropout):
    model = bnb_llama(model_dtype, compute_dtype)
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    inject(ours, LoraConfig(r=4, alpha=8, targets=TARGETS, dora=True, dropout=dropout), dtype=adapter_dtype)
    peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True,
                                                 lora_dropout=dropout), theirs)
    theirs_params = dict(theirs.named_parameters())
    magnitudes = [(p, theirs_params[peft_name(n)]) for n, p in ours.named_parameters() if "magnitude" in n]
    assert len(magnitudes) == 6 and all(torch.equal(a.float(), b.float()) for a, b in magnitudes)  # m = ||W0||_c
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if p.requires_grad:  # random, so that B A != 0 and m / n != 1
                p.add_(torch.randn_like(p) * 0.1)
                theirs_params[peft_name(n)].data = p.detach().clone()
    ours.train(), theirs.train()
    ids = torch.randint(0, 64, (2, 7))
    outs = []
    for m in (ours, theirs):
        torch.manual_seed(5)  # the dropout's random numbers
        outs.append(m(input_ids=ids).last_hidden_state)
    assert torch.equal(*outs)
    g = torch.randn(outs[0].shape).to(outs[0].dtype)
    for out in outs:
        (out * g).sum().backward()
    grads = [(n, p.grad) for n, p in ours.named_parameters() if p.requires_grad]
    assert len(grads) == 18 and all(torch.equal(g, theirs_params[peft_name(n)].grad) for n, g in grads)


def test_a_peft_qdora_file_loads_and_merge_still_refuses_the_4bit_weight(tmp_path):
    model = bnb_llama(torch.float32, torch.float32)
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                      use_dora=True))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    theirs.save_pretrained(tmp_path)
    ours = copy.deepcopy(model)
    lowrank.load_adapter(ours, tmp_path)
    ids = torch.randint(0, 64, (2, 7))
    # without gradients, as bitsandbytes decides its CPU kernel per call (in eval mode, on an x that needs no
    # gradient, it repacks the weight for another kernel, for good): both sides then take the same one
    with torch.no_grad():
        assert torch.equal(ours.eval()(input_ids=ids).last_hidden_state, theirs.eval()(input_ids=ids).last_hidden_state)
    with pytest.raises(TypeError, match="nothing was merged.*4-bit base cannot take a merged update"):
        lowrank.merge(ours)

"""`lowrank merge --as-trained` of a qlora adapter trained with a resized vocabulary, where the nf4
options quantize the output head: the adapted model was resized dense and then quantized, as chat
(load_with_adapter) rebuilds it. merge quantized first and resized after, and transformers cannot
resize a 4-bit head ("'NF4Weight' object has no attribute 'size'"): every such merge failed. It
resizes the dense base before quantize now, and the merged model computes what chat's does."""

import json

import torch

from lowrank import cli, inject, quantize, save_adapter
from lowrank.config import LoraConfig
from lowrank.quant.linear4bit import Linear4bit
from lowrank.workflow.methods import nf4_config
from lowrank.workflow.model import WORKFLOW_FILE, load_with_adapter
from tests.tuners.models import randomize_adapters

from . import tiny

# the head in 4 bits; no double quantization, so each row's codes and scale are its own (hidden 64 =
# one block a row) and the old rows do not depend on the new rows, which each load draws at random
NF4 = {"double_quant": False,
       "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]}


def test_merge_as_trained_quantizes_the_resized_head_as_chat_does(tmp_path):
    import transformers

    base = tiny.build(tmp_path / "base")
    trained = transformers.AutoModelForCausalLM.from_pretrained(base)
    before = trained.get_input_embeddings().weight.shape[0]
    torch.manual_seed(1)
    trained.resize_token_embeddings(before + 4, mean_resizing=False)  # then quantize and inject, as qlora does
    quantize(trained, nf4_config(NF4))
    assert isinstance(trained.lm_head, Linear4bit)
    inject(trained, LoraConfig(r=2, targets=["q_proj", "v_proj"]))
    randomize_adapters(trained)
    adapter = tmp_path / "adapter"
    save_adapter(trained, adapter)  # the resized input embeddings with it (the 4-bit head is left out)
    (adapter / WORKFLOW_FILE).write_text(json.dumps({"epoch": 1, "config": {"method": "qlora", "dtype": "float32",
                                                                            "nf4": NF4}}))

    assert cli.main(["merge", str(base), str(adapter), str(tmp_path / "merged"), "--as-trained"]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    chat, _, _ = load_with_adapter(str(base), str(adapter))
    assert merged.lm_head.weight.shape[0] == chat.lm_head.out_features == before + 4
    ids = torch.tensor([[1, 2, before, before + 3]])  # two added tokens: their embeddings from the adapter file
    with torch.no_grad():
        # the old tokens' logits (the new tokens' head rows are untrained, drawn anew by each load)
        got, want = merged(ids).logits[..., :before], chat(ids).logits[..., :before]
        assert torch.equal(want, trained.eval()(ids).logits[..., :before])  # chat rebuilds the trained model exactly
    # merged: W' = dequant(W_nf4) + s B A rounded once to float32 (relative 2^-24 a weight) where chat adds the
    # two products; through two layers that stays within 1e-5 of the largest logit (seen: 1e-6 of it)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())

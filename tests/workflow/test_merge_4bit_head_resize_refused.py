"""`lowrank merge` of an adapter trained with a resized vocabulary into a 4-bit base whose output head
is quantized too: transformers' resize_token_embeddings reads a dense weight, and the merge ended in
a traceback ("'NF4Weight' object has no attribute 'size'"). It is a one-line error now, naming the
4-bit module, the two vocabulary sizes, and the way that works (the dense base, --as-trained)."""

import torch

from lowrank import cli, inject, quantize, save_adapter, save_quantized
from lowrank.config import LoraConfig
from lowrank.workflow.methods import nf4_config
from tests.tuners.models import randomize_adapters

from . import tiny


def test_a_4bit_head_is_refused_with_what_to_do(tmp_path, capsys):
    import transformers

    base = tiny.build(tmp_path / "base")
    four_bit = transformers.AutoModelForCausalLM.from_pretrained(base)
    quantize(four_bit, nf4_config({"targets": ["q_proj", "v_proj", "lm_head"]}))
    save_quantized(four_bit, tmp_path / "base4")
    trained = transformers.AutoModelForCausalLM.from_pretrained(base)
    before = trained.get_input_embeddings().weight.shape[0]
    torch.manual_seed(1)
    trained.resize_token_embeddings(before + 4, mean_resizing=False)
    inject(trained, LoraConfig(r=2, targets=["q_proj", "v_proj"]))
    randomize_adapters(trained)
    save_adapter(trained, tmp_path / "adapter")

    code = cli.main(["merge", str(tmp_path / "base4"), str(tmp_path / "adapter"), str(tmp_path / "merged"),
                     "--allow-other-base"])
    err = capsys.readouterr().err
    assert code == 2 and not (tmp_path / "merged").exists()
    assert f"vocabulary of {before + 4} tokens and the base has {before}" in err
    assert "holds lm_head in 4 bits" in err and "--as-trained" in err

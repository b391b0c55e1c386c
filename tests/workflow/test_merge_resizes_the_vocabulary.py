"""`lowrank merge` of an adapter trained after resize_token_embeddings: its file holds the resized
embeddings (lowrank/io_embeddings.py), and the base from disk has the old vocabulary, which the
CLI had no way to resize, so every such merge failed on the shape mismatch. merge now resizes the
base to the file's rows first, and the merged model computes what the trained one did, new tokens
included."""

import torch

from lowrank import cli, inject, save_adapter
from lowrank.config import LoraConfig
from tests.tuners.models import randomize_adapters

from . import tiny


def test_a_merge_takes_the_vocabulary_the_adapter_was_trained_with(tmp_path, capsys):
    import transformers

    base = tiny.build(tmp_path / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    before = model.get_input_embeddings().weight.shape[0]
    torch.manual_seed(1)
    model.resize_token_embeddings(before + 4, mean_resizing=False)
    inject(model, LoraConfig(r=2, targets=["q_proj", "v_proj"]))
    randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter")

    assert cli.main(["merge", str(base), str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    assert f"resized the base's vocabulary from {before} to {before + 4} tokens" in capsys.readouterr().out
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.tensor([[1, 2, before, before + 3]])  # two new tokens
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model.eval()(ids).logits, rtol=1e-5, atol=1e-5)

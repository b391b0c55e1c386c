"""An adapter trained after resize_token_embeddings and saved only as a pickled adapter_model.bin
(older PEFT; PEFT's save_pretrained(safe_serialization=False)): its file holds the resized
embeddings too, but chat / web / merge read the rows to resize the base to from a safetensors
header only, so with --allow-pickle they still refused it on the shape mismatch, advising a
model.resize_token_embeddings call that a command-line user cannot make. The pickle is now read
for its shapes (with --allow-pickle only), and the adapted model computes PEFT's numbers."""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")

from lowrank import cli  # noqa: E402
from lowrank.workflow.model import load_with_adapter  # noqa: E402

from . import tiny  # noqa: E402


@pytest.fixture(scope="module")
def pickled(tmp_path_factory):
    import transformers

    tmp = tmp_path_factory.mktemp("pickled_resized")
    base = tiny.build(tmp / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(model.get_input_embeddings().weight.shape[0] + 3, mean_resizing=False)
    theirs = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                        init_lora_weights=False))
    theirs.save_pretrained(str(tmp / "adapter"), safe_serialization=False)  # "auto": the embeddings are in it
    assert not (tmp / "adapter" / "adapter_model.safetensors").exists()
    return base, tmp / "adapter", theirs.eval()


def test_chat_resizes_from_a_pickled_file(pickled, capsys):
    base, adapter, theirs = pickled
    model, _, _ = load_with_adapter(str(base), str(adapter), allow_pickle=True)
    assert "resized the base's vocabulary from 400 to 403 tokens" in capsys.readouterr().err
    ids = torch.tensor([[1, 2, 400, 402]])  # two new tokens
    with torch.no_grad():
        want = theirs(ids).logits  # float32 both, x W + s B A x summed in their own orders
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_merge_resizes_from_a_pickled_file(pickled, tmp_path, capsys):
    base, adapter, _ = pickled
    assert cli.main(["merge", str(base), str(adapter), str(tmp_path / "merged"), "--allow-pickle"]) == 0
    assert "resized the base's vocabulary from 400 to 403 tokens" in capsys.readouterr().out

"""An adapter trained with added tokens whose LoRA adapts the input embedding by its PEFT name
(target_modules ["q_proj", "embed_tokens"]) on an untied model: PEFT's file then holds that
embedding's base weight only, not the output head's, so the head's new rows are in no file.
chat / web / merge resized the base to the file's rows with mean_resizing=False, which left those
rows at the model's random init (std 0.3 here: new-token logits ~4 where PEFT's are ~0.3) and said
nothing; PEFT's AutoPeftModelForCausalLM resizes with transformers' mean_resizing, the new rows at
the mean of the others (a normal of covariance 1e-9 times theirs). They now do as PEFT does for
the rows the file lacks, and say which rows are untrained."""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")

from lowrank import cli  # noqa: E402

from . import tiny  # noqa: E402

NEW = ["<|ship|>", "<|deck|>"]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    import transformers

    tmp = tmp_path_factory.mktemp("embed_tokens_only")
    base = tiny.build(tmp / "base")  # untied
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    tokenizer.add_tokens(NEW)
    model.resize_token_embeddings(len(tokenizer))
    theirs = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"],
                                                        init_lora_weights=False))
    theirs.save_pretrained(str(tmp / "adapter"))
    tokenizer.save_pretrained(tmp / "adapter")
    return base, tmp / "adapter", tokenizer


def near_the_mean(head: torch.Tensor, old: int):
    """The new rows of `head` are the old rows' mean, within 6 standard deviations of
    transformers' draw (covariance 1e-9 times the old rows')."""
    mean, std = head[:old].mean(0), head[:old].std(0)
    torch.testing.assert_close(head[old:], mean.expand_as(head[old:]), rtol=0,
                               atol=6 * (1e-9 ** 0.5) * std.max().item() + 1e-6)


def test_chat_draws_the_heads_new_rows_as_peft_does(adapter, capsys):
    from lowrank.workflow.model import load_with_adapter

    base, path, tokenizer = adapter
    old = len(tokenizer) - len(NEW)
    model, _, _ = load_with_adapter(str(base), str(path))
    err = capsys.readouterr().err
    assert f"resized the base's vocabulary from {old} to {len(tokenizer)} tokens" in err
    assert "holds no rows for lm_head.weight" in err and "untrained" in err
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(str(path)).eval()
    near_the_mean(theirs.get_output_embeddings().weight.detach(), old)  # the oracle's rows: at the mean
    near_the_mean(model.get_output_embeddings().weight.detach(), old)
    ids = tokenizer("<|user|>Where is <|ship|>?", return_tensors="pt")["input_ids"]
    with torch.no_grad():  # every weight of the old tokens the same, and the new input rows the file's: the same
        torch.testing.assert_close(model(ids).logits[..., :old], theirs(ids).logits[..., :old], rtol=0, atol=0)


def test_merge_draws_them_too(adapter, tmp_path, capsys):
    import transformers

    base, path, tokenizer = adapter
    assert cli.main(["merge", str(base), str(path), str(tmp_path / "merged")]) == 0
    assert "holds no rows for lm_head.weight" in capsys.readouterr().out
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    near_the_mean(merged.get_output_embeddings().weight.detach(), len(tokenizer) - len(NEW))

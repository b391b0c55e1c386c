"""An adapter directory holding a tokenizer with added tokens but a file without the embeddings
(PEFT's save_pretrained(save_embedding_layers=False), or a save of a model whose base lowrank
could not read): `lowrank chat --adapter` took that tokenizer and kept the base's rows, so any
new token typed indexed past the embedding table, an IndexError traceback that ended the chat.
The base is now resized to the tokenizer first, as PEFT's AutoPeftModelForCausalLM does (its new
rows drawn around the mean: untrained, which stderr says), so the adapted model has PEFT's shape
and, for every other token, PEFT's numbers. `lowrank merge` does the same."""

from __future__ import annotations

import io

import pytest
import torch

peft = pytest.importorskip("peft")

from lowrank import cli  # noqa: E402

from . import tiny  # noqa: E402

NEW = ["<|ship|>", "<|deck|>"]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    import transformers

    tmp = tmp_path_factory.mktemp("no_embeddings")
    base = tiny.build(tmp / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    tokenizer.add_tokens(NEW)
    model.resize_token_embeddings(len(tokenizer))
    theirs = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                        init_lora_weights=False))  # B != 0: the adapter counts
    theirs.save_pretrained(str(tmp / "adapter"), save_embedding_layers=False)
    tokenizer.save_pretrained(tmp / "adapter")
    return base, tmp / "adapter", tokenizer


def _peft_model(adapter):
    return peft.AutoPeftModelForCausalLM.from_pretrained(str(adapter)).eval()  # resizes to its tokenizer


def test_chat_answers_a_message_with_a_new_token(adapter, monkeypatch, capsys):
    from lowrank.workflow import chat

    base, path, tokenizer = adapter
    seen, out = [], io.StringIO()  # loop's default out is the sys.stdout of its import: another test's capture
    loop = chat.loop

    def read_one(messages=iter(["Where is the <|ship|>?"])):
        def read(prompt):
            try:
                return next(messages)
            except StopIteration:
                raise EOFError from None
        return read

    monkeypatch.setattr(chat, "loop", lambda model, tok, template, settings, system=None:
                        seen.append(model) or loop(model, tok, template, settings, system, read=read_one(), out=out))
    assert cli.main(["chat", str(base), "--adapter", str(path), "--device", "cpu", "--max-new-tokens", "3"]) == 0
    err = capsys.readouterr().err
    n = len(tokenizer)
    assert f"resized the base's vocabulary from {n - len(NEW)} to {n} tokens, as the adapter's tokenizer has" in err
    assert "untrained" in err
    assert out.getvalue().count("\n") >= 2  # the banner and an answer, not a traceback
    model, theirs = seen[0], _peft_model(path)
    assert model.get_input_embeddings().weight.shape == theirs.get_input_embeddings().weight.shape
    assert model.get_output_embeddings().weight.shape == theirs.get_output_embeddings().weight.shape
    ids = tokenizer("<|user|>Where are we?", return_tensors="pt")["input_ids"]  # old tokens only
    with torch.no_grad():  # over the old tokens' logits (the new rows are each one's own draw): x W + s B A x in
        want = theirs(ids).logits[..., :n - len(NEW)]  # float32 both, summed in their own orders: roundings at the
        got = model(ids).logits[..., :n - len(NEW)]  # scale of the largest logit
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_merge_sizes_the_merged_model_to_the_tokenizer(adapter, tmp_path, capsys):
    import transformers

    base, path, tokenizer = adapter
    assert cli.main(["merge", str(base), str(path), str(tmp_path / "merged")]) == 0
    assert "untrained" in capsys.readouterr().out
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert len(transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")) == len(tokenizer)

"""An adapter directory whose tokenizer has more tokens than the embeddings its file holds (tokens
added to the tokenizer after training, or another tokenizer saved beside it): `lowrank chat`
resized the base to the file's rows and took that tokenizer, so typing one of the extra tokens
indexed past the embedding table, an IndexError that ended the chat; `lowrank merge` wrote a
model whose tokenizer has ids its embeddings lack. PEFT's AutoPeftModelForCausalLM refuses the
directory (it resizes to the tokenizer, then the file's embeddings do not fit). Both commands now
refuse it before chatting or writing, saying both sizes."""

from __future__ import annotations

import pytest

from lowrank import cli, inject, save_adapter
from lowrank.config import LoraConfig

from . import tiny

peft = pytest.importorskip("peft")


@pytest.fixture
def adapter(tmp_path):
    import transformers

    base = tiny.build(tmp_path / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    tokenizer.add_tokens(["<|ship|>"])
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    inject(model, LoraConfig(r=2, targets=["q_proj"]))
    save_adapter(model, tmp_path / "adapter")
    tokenizer.add_tokens(["<|deck|>"])  # after training: the file has no row for it
    tokenizer.save_pretrained(tmp_path / "adapter")
    return base, tmp_path / "adapter", len(tokenizer)


def test_peft_refuses_it(adapter):
    _, path, _ = adapter
    with pytest.raises(RuntimeError, match="size mismatch"):
        peft.AutoPeftModelForCausalLM.from_pretrained(str(path))


@pytest.mark.parametrize("command", ["chat", "merge"])
def test_chat_and_merge_refuse_it_saying_both_sizes(adapter, command, tmp_path, capsys, monkeypatch):
    from lowrank.workflow import chat

    base, path, n = adapter
    monkeypatch.setattr(chat, "loop", lambda *a, **k: pytest.fail("chat started"))
    args = ["chat", str(base), "--adapter", str(path), "--device", "cpu"] if command == "chat" \
        else ["merge", str(base), str(path), str(tmp_path / "merged")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert f"has {n} tokens, but the embeddings in its adapter file have {n - 1} rows" in err
    assert not (tmp_path / "merged").exists()

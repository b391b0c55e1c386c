"""`lowrank chat` / `lowrank web` with `--adapter` of an adapter trained with added tokens
(tokenizer.add_tokens, model.resize_token_embeddings): its file holds the resized embeddings and
its directory, by PEFT's convention, the tokenizer that knows the new tokens. Both commands
refused it on the shape mismatch (the base from disk has the old vocabulary, and the command
line has no way to resize it), and would have used the base's tokenizer, which splits the new
tokens into pieces. They now resize the base to the file's rows first, as `lowrank merge` does,
say so on stderr, and use the adapter directory's tokenizer, as PEFT's AutoPeftModel does."""

import importlib.util
import pathlib
import sys

import pytest
import torch

from lowrank import cli, inject, save_adapter
from lowrank.config import LoraConfig
from tests.tuners.models import randomize_adapters

from . import tiny

NEW = ["<|ship|>", "<|deck|>", "<|cargo|>"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(base dir, adapter dir, the trained model, its tokenizer): LoRA trained after adding NEW."""
    import transformers

    tmp = tmp_path_factory.mktemp("added_tokens")
    base = tiny.build(tmp / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    tokenizer.add_tokens(NEW)
    torch.manual_seed(1)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    inject(model, LoraConfig(r=2, targets=["q_proj", "v_proj"]))
    randomize_adapters(model)
    save_adapter(model, tmp / "adapter")
    tokenizer.save_pretrained(tmp / "adapter")  # PEFT's convention: the tokenizer beside the adapter
    return base, tmp / "adapter", model.eval(), tokenizer


def test_chat_resizes_the_base_and_takes_the_adapters_tokenizer(trained, monkeypatch, capsys):
    from lowrank.workflow import chat

    base, adapter, theirs, their_tokenizer = trained
    seen = []
    monkeypatch.setattr(chat, "loop", lambda model, tokenizer, *rest: seen.append((model, tokenizer)))
    assert cli.main(["chat", str(base), "--adapter", str(adapter), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    n = len(their_tokenizer)
    assert f"resized the base's vocabulary from {n - len(NEW)} to {n} tokens" in captured.err
    assert "resized" not in captured.out  # stdout is the chat's
    model, tokenizer = seen[0]
    text = "<|user|>Where is <|cargo|> on <|deck|>?"
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert ids.tolist() == their_tokenizer(text, return_tensors="pt")["input_ids"].tolist()
    assert {n - 1, n - 2} <= set(ids[0].tolist())  # the new tokens, one id each
    with torch.no_grad():  # the same weights, new rows included, and the same LoRA: the same numbers
        torch.testing.assert_close(model(ids).logits, theirs(ids).logits, rtol=0, atol=0)


def test_an_adapter_without_a_tokenizer_keeps_the_bases(trained, tmp_path, monkeypatch):
    import shutil

    from lowrank.workflow.model import load_with_adapter

    base, adapter, theirs, their_tokenizer = trained
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copyfile(adapter / name, bare / name)
    model, tokenizer, _ = load_with_adapter(str(base), str(bare))
    assert len(tokenizer) == len(their_tokenizer) - len(NEW)  # the base's: nothing else to take
    ids = torch.tensor([[1, 2, len(tokenizer), len(tokenizer) + 2]])  # ids of new tokens all the same
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, theirs(ids).logits, rtol=0, atol=0)


@pytest.mark.skipif(importlib.util.find_spec("streamlit") is None, reason="streamlit is not installed")
def test_the_web_page_loads_and_answers_with_it(trained, monkeypatch, capfd):
    from streamlit.testing.v1 import AppTest

    import lowrank

    base, adapter, _, their_tokenizer = trained
    page = pathlib.Path(lowrank.__file__).parent / "workflow" / "web_app.py"
    # the page reads its options from the command line `lowrank web` gives `streamlit run`
    monkeypatch.setattr(sys, "argv", [str(page), str(base), "--adapter", str(adapter), "--device", "cpu"])
    app = AppTest.from_file(str(page), default_timeout=120).run()
    assert not app.exception, [e.message for e in app.exception]  # was: the shape mismatch
    n = len(their_tokenizer)
    assert f"resized the base's vocabulary from {n - len(NEW)} to {n} tokens" in capfd.readouterr().err
    app.sidebar.slider[0].set_value(4)  # max new tokens: a few do
    app.chat_input[0].set_value("Where is <|cargo|>?").run()
    assert not app.exception, [e.message for e in app.exception]
    assert [m.name for m in app.chat_message] == ["user", "assistant"]

"""`lowrank merge` of an adapter trained with added tokens, whose directory holds the tokenizer
that knows them (PEFT's convention; tests/workflow/test_chat_web_resize_the_vocabulary.py): the
merged directory got the base's tokenizer files, so `lowrank chat` on it (or from_pretrained)
split every added token into pieces, though the merged model had their rows. The merged
directory now holds the adapter directory's tokenizer; an adapter without one still gets the
base's files."""

import json

import torch

from lowrank import cli, inject, save_adapter
from lowrank.config import LoraConfig
from tests.tuners.models import randomize_adapters

from . import tiny

NEW = ["<|ship|>", "<|deck|>"]


def _adapter(tmp_path, with_tokenizer: bool):
    import transformers

    base = tiny.build(tmp_path / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    tokenizer.add_tokens(NEW)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    inject(model, LoraConfig(r=2, targets=["q_proj", "v_proj"]))
    randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter")
    if with_tokenizer:
        tokenizer.save_pretrained(tmp_path / "adapter")
    return base, model.eval(), tokenizer


def test_the_merged_directory_holds_the_adapters_tokenizer(tmp_path):
    import transformers

    base, theirs, their_tokenizer = _adapter(tmp_path, with_tokenizer=True)
    assert cli.main(["merge", str(base), str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")
    text = "<|user|>Go to <|deck|> with the <|ship|>"
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert ids.tolist() == their_tokenizer(text, return_tensors="pt")["input_ids"].tolist()
    assert len(tokenizer) == len(their_tokenizer)
    assert tokenizer.chat_template == their_tokenizer.chat_template
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():  # W + s B A rounded once to float32 against x W + s (x A) B: float32 roundings, at the
        want = theirs(ids).logits  # scale of the largest logit (the tiny base's are large: std 0.3 init)
        torch.testing.assert_close(merged(ids).logits, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_an_adapter_without_a_tokenizer_gets_the_bases_files(tmp_path):
    base, _, _ = _adapter(tmp_path, with_tokenizer=False)
    assert cli.main(["merge", str(base), str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert json.loads((tmp_path / "merged" / name).read_text()) == json.loads((base / name).read_text())


def test_an_unreadable_tokenizer_is_refused_before_the_base_loads(tmp_path, capsys):
    base, _, _ = _adapter(tmp_path, with_tokenizer=True)
    (tmp_path / "adapter" / "tokenizer.json").write_text("{not json")
    assert cli.main(["merge", str(base), str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert "holds a tokenizer (tokenizer_config.json)" in err and str(tmp_path / "adapter") in err
    assert not (tmp_path / "merged").exists()

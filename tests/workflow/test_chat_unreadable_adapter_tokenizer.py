"""`lowrank chat` / `web` with `--adapter` of a directory whose tokenizer (tokenizer_config.json:
the adapter's own, used instead of the base's) cannot be read: the error blamed the base ("could
not load BASE as a causal LM"), a directory that loads fine, and never named the adapter's. It now
names the adapter directory and what is wrong with its tokenizer, as `lowrank merge` does."""

from lowrank import cli, inject, save_adapter
from lowrank.config import LoraConfig

from . import tiny


def test_the_error_names_the_adapters_tokenizer_not_the_base(tmp_path, capsys):
    import transformers

    base = tiny.build(tmp_path / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    inject(model, LoraConfig(r=2, targets=["q_proj"]))
    save_adapter(model, tmp_path / "adapter")
    transformers.AutoTokenizer.from_pretrained(base).save_pretrained(tmp_path / "adapter")
    (tmp_path / "adapter" / "tokenizer.json").write_text("{not json")

    assert cli.main(["chat", str(base), "--adapter", str(tmp_path / "adapter"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"{str(tmp_path / 'adapter')!r} holds a tokenizer (tokenizer_config.json)" in err
    assert "could not be read" in err and "Expecting property name" in err  # json's own words: what is wrong
    assert "as a causal LM" not in err  # the base is fine

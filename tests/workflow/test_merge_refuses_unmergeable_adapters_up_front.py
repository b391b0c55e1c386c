"""`lowrank merge` of a prompt-tuning, prefix-tuning or bottleneck adapter: such an adapter
changes no weight, so it cannot be merged. The refusal came only after the whole base had
loaded (minutes for a 7B) and advised the Python API ("eject it before exporting, or save it
with lowrank.save_adapter"); it now comes first, says what the adapter is and how to use it."""

import pytest

from lowrank import cli, inject, save_adapter
from lowrank.commands import merge
from lowrank.config import AdapterConfig, LoraConfig, PrefixConfig, PromptConfig

from . import tiny


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny.build(tmp_path_factory.mktemp("tiny") / "model")


@pytest.mark.parametrize("config, kind", [(PromptConfig(num_virtual_tokens=4), "prompt-tuning"),
                                          (PrefixConfig(num_virtual_tokens=4), "prefix-tuning"),
                                          (AdapterConfig(), "bottleneck")])
def test_an_adapter_that_changes_no_weight_is_refused_before_the_base_loads(base, tmp_path, capsys, monkeypatch,
                                                                            config, kind):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    inject(model, config)
    save_adapter(model, tmp_path / "adapter")
    loads = []
    capsys.readouterr()  # transformers' loading bar
    monkeypatch.setattr(merge, "_load_base", lambda *a, **k: loads.append(a) or pytest.fail("the base was loaded"))
    assert cli.main(["merge", str(base), str(tmp_path / "adapter"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lowrank merge: error: {tmp_path / 'adapter'} is a {kind} adapter (peft_type ")
    assert f"lowrank chat BASE --adapter {tmp_path / 'adapter'}" in err and err.count("\n") == 1
    assert not loads and not (tmp_path / "out").exists()


def test_a_lora_adapter_still_merges(base, tmp_path):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    inject(model, LoraConfig(r=2))
    save_adapter(model, tmp_path / "adapter")
    assert cli.main(["merge", str(base), str(tmp_path / "adapter"), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "config.json").is_file()

"""A PEFT adapter saved from a model's inner model (get_peft_model(LlamaModel)) and loaded into
LlamaForCausalLM, which holds it as `model`, or the other way: every key differs by that leading
module path. The error must say so and where to load it (it listed the keys only; PEFT itself
loads nothing there and warns), and loading into the module it names equals PEFT, bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from lowrank import io as lio  # noqa: E402
from lowrank.inject import adapter_names  # noqa: E402
from tests.tuners import models  # noqa: E402


def saved(model, path):
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    models.randomize_adapters(theirs)
    theirs.save_pretrained(str(path))
    return theirs


def test_an_inner_models_file_names_the_module_to_load_it_into(tmp_path):
    full = models.llama().eval()
    theirs = saved(full.model, tmp_path / "inner")
    ours = copy.deepcopy(full)
    with pytest.raises(ValueError, match=r"without 'model\.': the file was saved from the module at 'model' alone; "
                                         r"load it into that module, model\.get_submodule\('model'\)\)$"):
        lio.load_adapter(ours, tmp_path / "inner")
    assert adapter_names(ours) == []

    lio.load_adapter(ours.get_submodule("model"), tmp_path / "inner")
    with torch.no_grad():
        want = theirs.eval()(input_ids=models.ids()).last_hidden_state
        assert torch.equal(ours.model(input_ids=models.ids()).last_hidden_state, want)


def test_a_whole_models_file_loaded_into_its_inner_model_says_so(tmp_path):
    full = models.llama().eval()
    saved(full, tmp_path / "full")
    with pytest.raises(ValueError, match=r"under 'model\.': the file was saved from a model that holds this one as "
                                         r"'model'; load it into such a model\)$"):
        lio.load_adapter(copy.deepcopy(full.model), tmp_path / "full")


def test_keys_that_differ_otherwise_get_no_hint():
    keys = ["base_model.model.a.lora_A.weight"]
    assert lio.renamed(keys, ["base_model.model.b.lora_A.weight"], lio.PREFIX) == ""
    assert lio.renamed(keys, [], lio.PREFIX) == ""
    assert lio.renamed(keys, ["base_model.model.xa.lora_A.weight"], lio.PREFIX) == ""  # not at a '.'

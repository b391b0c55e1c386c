"""Saving from a model inside torch's wrappers: checkpoint_wrapper around each decoder layer
(activation checkpointing the FSDP2 way, applied before or after inject) and torch.compile
around the whole model. The files are those of the bare model, key for key: the wrappers'
attribute names (`_checkpoint_wrapped_module`, `_orig_mod`) are not the model's, and PEFT
would load such keys into nothing."""

import pytest
import torch
from safetensors.torch import load_file

import lowrank
from tests.tuners import models

transformers = pytest.importorskip("transformers")


def checkpointed(model):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (apply_activation_checkpointing,
                                                                            checkpoint_wrapper)

    apply_activation_checkpointing(model, checkpoint_wrapper_fn=checkpoint_wrapper,
                                   check_fn=lambda m: isinstance(m, transformers.models.llama.modeling_llama.LlamaDecoderLayer))
    return model


def adapted(wrap_first: bool):
    model = models.llama()
    if wrap_first:
        checkpointed(model)
    torch.manual_seed(1)
    names = lowrank.inject(model, lowrank.LoraConfig(r=4, targets=["q_proj", "down_proj"]))
    models.randomize_adapters(model)
    return (model if wrap_first else checkpointed(model)), names


@pytest.mark.parametrize("wrap_first", [True, False], ids=["wrapped-then-inject", "inject-then-wrapped"])
def test_checkpoint_wrapped_layers_save_and_export_as_the_bare_model(tmp_path, wrap_first):
    plain = models.llama()
    torch.manual_seed(1)
    names = lowrank.inject(plain, lowrank.LoraConfig(r=4, targets=["q_proj", "down_proj"]))
    models.randomize_adapters(plain)
    wrapped, wrapped_names = adapted(wrap_first)
    assert wrapped_names == names and "_checkpoint_wrapped_module" not in repr(names)
    for save in ("adapter", "export"):
        for which, model in (("plain", plain), ("wrapped", wrapped)):
            if save == "adapter":
                lowrank.save_adapter(model, tmp_path / f"{which}-{save}")
            else:
                lowrank.merge_and_export(model, tmp_path / f"{which}-{save}")
        file = "adapter_model.safetensors" if save == "adapter" else "model.safetensors"
        got, want = load_file(tmp_path / f"wrapped-{save}" / file), load_file(tmp_path / f"plain-{save}" / file)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    again = checkpointed(models.llama())
    lowrank.load_adapter(again, tmp_path / "plain-adapter")  # into a wrapped model, by the bare names
    x = models.ids()
    torch.testing.assert_close(again(input_ids=x).logits, plain(input_ids=x).logits, rtol=0, atol=0)


def test_a_compiled_model_saves_as_the_model_inside(tmp_path):
    model = models.llama()
    lowrank.inject(model, lowrank.LoraConfig(r=4, targets=["q_proj"]))
    lowrank.save_adapter(torch.compile(model), tmp_path / "compiled")  # nothing runs: no compilation
    lowrank.save_adapter(model, tmp_path / "bare")
    assert load_file(tmp_path / "compiled" / "adapter_model.safetensors").keys() == \
        load_file(tmp_path / "bare" / "adapter_model.safetensors").keys()


def test_a_checkpoint_wrapper_around_a_linear_is_not_a_second_target(tmp_path):
    """The wrapper answers in_features and weight for the linear it holds, and shares its name:
    a name target took both, two adapters under one name and colliding saved keys."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    wrapped = torch.nn.Sequential(plain[0], checkpoint_wrapper(plain[1]))
    assert lowrank.inject(wrapped, lowrank.LoraConfig(r=2, targets=["0", "1"])) == ["0", "1"]
    assert [n for n, m in wrapped.named_modules() if type(m).__name__ == "LoraLinear"] == \
        ["0", "1._checkpoint_wrapped_module"]
    models.randomize_adapters(wrapped)
    lowrank.save_adapter(wrapped, tmp_path)
    fresh = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    fresh.load_state_dict({"0.weight": plain[0].weight, "0.bias": plain[0].bias,
                           "1.weight": plain[1].weight, "1.bias": plain[1].bias})
    lowrank.load_adapter(fresh, tmp_path)
    x = torch.randn(3, 8)
    torch.testing.assert_close(fresh(x), wrapped(x), rtol=0, atol=0)
    quantized = torch.nn.Sequential(torch.nn.Linear(8, 64), checkpoint_wrapper(torch.nn.Linear(64, 8)))
    assert lowrank.quantize(quantized, lowrank.NF4Config(targets=torch.nn.Linear)) == ["0", "1"]


def test_save_and_load_quantized_on_checkpoint_wrapped_layers(tmp_path):
    """save_quantized named the 4-bit layers (llm_int8_skip_modules, too) as named_modules() does,
    with _checkpoint_wrapped_module in them, and load_quantized found no such module."""
    import json

    plain = models.llama()
    lowrank.quantize(plain)
    lowrank.save_quantized(plain, tmp_path / "plain")
    wrapped = checkpointed(models.llama())
    lowrank.quantize(wrapped)
    lowrank.save_quantized(wrapped, tmp_path / "wrapped")
    configs = [json.loads((tmp_path / d / "config.json").read_text())["quantization_config"] for d in ("plain", "wrapped")]
    assert configs[0] == configs[1]
    got, want = (load_file(tmp_path / d / "model.safetensors") for d in ("wrapped", "plain"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    again = checkpointed(models.llama())
    assert lowrank.load_quantized(again, tmp_path / "plain") == sorted(n for n, m in plain.named_modules()
                                                                       if isinstance(m, lowrank.Linear4bit))
    x = models.ids()
    torch.testing.assert_close(again(input_ids=x).logits, plain(input_ids=x).logits, rtol=0, atol=0)

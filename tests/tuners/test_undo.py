"""What inject changes around the adapter layers and eject gives back, and names seen through
wrappers (checkpoint_wrapper, adapter layers): each test is a problem a review found, checked
to fail before its fix."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (apply_activation_checkpointing,
                                                                         checkpoint_wrapper)

import lowrank

from . import models

transformers = pytest.importorskip("transformers")


def two_part():
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), nn.Linear(8, 2))


@pytest.mark.parametrize("how", ["copy", "part first", "whole first", "compiled wrapper", "injected compiled",
                                 "part ejected through itself", "whole's adapter ejected first"])
def test_eject_gives_back_requires_grad_wherever_the_record_went(how):
    model, config = two_part(), lowrank.LoraConfig(r=2, targets=nn.Linear)
    model[1].weight.requires_grad_(False)  # a flag of the user's own, to come back as it was
    want = {n: p.requires_grad for n, p in model.named_parameters()}
    if how == "copy":  # a copy of an injected model: its record goes with it
        lowrank.inject(model, config)
        model = copy.deepcopy(model)
        lowrank.eject(model)
    elif how == "part first":  # a part injected on its own first, then the whole
        lowrank.inject(model[0], config, name="a")
        lowrank.inject(model, lowrank.LoraConfig(r=2, targets="re:1"), name="b")
        lowrank.eject(model)
    elif how == "whole first":  # the part's own record, made second, holds flags the whole's inject froze
        lowrank.inject(model, lowrank.LoraConfig(r=2, targets="re:1"), name="b")
        lowrank.inject(model[0], config, name="a")
        lowrank.eject(model)
    elif how == "part ejected through itself":  # the whole still has an adapter: the part's weights stay frozen
        lowrank.inject(model[0], config, name="a")
        lowrank.inject(model, lowrank.LoraConfig(r=2, targets="re:1"), name="b")
        lowrank.eject(model[0], "a")
        assert not any(p.requires_grad for p in model[0].parameters())
        lowrank.eject(model)
    elif how == "whole's adapter ejected first":  # the part's eject leaves the whole with none: every record back
        lowrank.inject(model[0], config, name="a")
        lowrank.inject(model, lowrank.LoraConfig(r=2, targets="re:1"), name="b")
        lowrank.eject(model, "b")
        lowrank.eject(model[0], "a")
        assert {n: p.requires_grad for n, p in model.named_parameters()} == want
        lowrank.inject(model, config)  # a later inject records afresh
        lowrank.eject(model)
    elif how == "injected compiled":
        lowrank.inject(torch.compile(model), config)
        lowrank.eject(model)
    else:
        lowrank.inject(model, config)
        lowrank.eject(torch.compile(model))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == want
    assert not any("_lowrank" in k for m in model.modules() for k in vars(m))


def test_ejecting_the_active_adapter_activates_another_as_peft_does():
    model = two_part()
    lowrank.inject(model, lowrank.LoraConfig(r=2, targets="re:1"), name="a")
    lowrank.inject(model, lowrank.LoraConfig(r=2, targets="re:1"), name="b")
    with pytest.warns(UserWarning, match="'a' is active now"):
        lowrank.eject(model, "b")
    assert lowrank.active_adapters(model) == ["a"]
    assert lowrank.summary(model).trainable == lowrank.summary(model).per_adapter["a"]
    model[0][0].weight.requires_grad_(True)  # unfrozen by the user: an eject leaves it so, as PEFT's delete_adapter
    lowrank.inject(model, lowrank.LoraConfig(r=2, targets="re:1"), name="d")
    model[0][0].weight.requires_grad_(True)
    with pytest.warns(UserWarning, match="'a' is active now"):
        lowrank.eject(model, "d")
    assert model[0][0].weight.requires_grad
    lowrank.set_active(model, [])  # chosen by the user: nothing active, and nothing changes that
    lowrank.inject(model, lowrank.LoraConfig(r=2, targets="re:1"), name="c")
    lowrank.set_active(model, [])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lowrank.eject(model, "c")
    assert lowrank.active_adapters(model) == []


def test_ejecting_a_merged_adapter_it_keeps_activates_nothing():
    """eject(keep_merged=True) leaves a fine-tuned model: another adapter switched on would add to it."""
    model = two_part()
    lowrank.inject(model, lowrank.LoraConfig(r=2, targets="re:1"), name="a")
    lowrank.inject(model, lowrank.LoraConfig(r=2, targets="re:1"), name="b")
    lowrank.mark_trainable(model, ["a", "b"])
    models.randomize_adapters(model)
    lowrank.merge(model)
    x = torch.randn(3, 8)
    merged = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lowrank.eject(model, "b", keep_merged=True)
    assert lowrank.active_adapters(model) == [] and torch.equal(model(x), merged)


@pytest.mark.parametrize("how", ["as made", "compiled part"])
def test_an_eject_through_a_part_finds_the_whole(how):
    """The whole still has an adapter: the part's weights stay frozen until the whole's last eject."""
    model = two_part()
    lowrank.inject(model[0], lowrank.LoraConfig(r=2, targets=nn.Linear), name="p")
    lowrank.inject(model, lowrank.LoraConfig(r=2, targets="re:1"), name="w")
    lowrank.eject(torch.compile(model[0]) if how == "compiled part" else model[0], "p")
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["1.lora_A.w.weight", "1.lora_B.w.weight"]
    lowrank.eject(model)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("through", ["part", "whole"])
def test_ejecting_a_parts_active_adapter_activates_what_the_model_has_active_there(through):
    """A part's set_active made its layers differ from the model's: once its adapter goes, they take
    the model's active adapter, trainable, as PEFT's delete_adapter sets each layer."""
    model = two_part()
    lowrank.inject(model, lowrank.LoraConfig(r=2, targets="all-linear"), name="a")
    lowrank.inject(model[0], lowrank.LoraConfig(r=2, targets="all-linear"), name="b")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowrank.eject(model[0] if through == "part" else model, "b")
    assert [layer.active for layer in lowrank.inject.__globals__["_layers"](model)] == [("a",)] * 3
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(
        f"{m}.lora_{f}.a.weight" for m in ("0.0", "0.2", "1") for f in "AB")


def test_eject_returns_the_modules_that_held_the_adapter_only():
    model = two_part()
    lowrank.inject(model, lowrank.LoraConfig(r=2, targets="re:1"), name="a")
    lowrank.inject(model, lowrank.LoraConfig(r=2, targets="re:0.0"), name="b")
    lowrank.inject(model, lowrank.AdapterConfig(targets="re:1"), name="c")  # wraps a's layer
    assert lowrank.eject(model, "b") == ["0.0"]
    assert lowrank.eject(model, "a") == ["1"]
    assert lowrank.eject(model) == ["1"]


def test_ejecting_one_of_several_merged_adapters_leaves_the_others_merged():
    """eject(name) takes that adapter's update out alone: the others stay merged, and keep_merged keeps them."""
    model = two_part().double()
    lowrank.inject(model, lowrank.LoraConfig(r=2, targets="re:1"), name="a")
    lowrank.inject(model, lowrank.LoraConfig(r=2, targets="re:1"), name="b")
    models.randomize_adapters(model)
    x = torch.randn(3, 8, dtype=torch.float64)
    lowrank.set_active(model, "b")
    only_b = model(x)
    lowrank.set_active(model, ["a", "b"])
    lowrank.merge(model)
    lowrank.eject(model, "a")
    assert model[1].merged == ("b",)
    lowrank.eject(model, "b", keep_merged=True)
    assert type(model[1]) is nn.Linear
    torch.testing.assert_close(model(x), only_b, rtol=1e-12, atol=1e-12)  # float64: W0 + s_a B_a A_a + s_b B_b A_b - s_a B_a A_a


def test_a_failed_load_warns_of_nothing(tmp_path):
    model = two_part()
    lowrank.inject(model, lowrank.LoraConfig(r=2, targets="re:1"), name="x")
    lowrank.save_adapter(model, tmp_path)
    other = nn.Sequential(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), nn.Linear(8, 3))  # another head
    lowrank.inject(other, lowrank.LoraConfig(r=2, targets="re:1"), name="x")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="shape mismatches"):
            lowrank.load_adapter(other, tmp_path, name="y")
    assert lowrank.active_adapters(other) == ["x"]


def test_all_linear_leaves_a_head_that_holds_an_adapter():
    """get_output_embeddings() returns the adapter layer around the head: still the head."""
    def bert():
        torch.manual_seed(0)
        return transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                                    num_attention_heads=4, intermediate_size=64))

    model = bert()
    lowrank.inject(model, lowrank.LoraConfig(r=2, targets="decoder"), name="head")
    assert "cls.predictions.decoder" not in lowrank.inject(model, lowrank.LoraConfig(r=2), name="all")
    model = bert()
    lowrank.inject(model, lowrank.AdapterConfig(targets="decoder", bottleneck_size=4), name="head")
    assert "cls.predictions.decoder" not in lowrank.quantize(model)


@pytest.mark.parametrize("context", ["disabled", "per_sample"])
def test_merge_inside_disabled_or_per_sample_is_refused(context):
    model = two_part()
    lowrank.inject(model, lowrank.LoraConfig(r=2, targets="re:1"))
    scope = lowrank.disabled(model) if context == "disabled" else lowrank.per_sample(model, ["__base__"] * 3)
    with scope, pytest.raises(RuntimeError, match="cannot merge inside"):
        lowrank.merge(model)
    assert not any(layer.merged for layer in lowrank.inject.__globals__["_layers"](model))


def test_eject_arguments_are_checked():
    model = two_part()
    lowrank.inject(model, lowrank.LoraConfig(r=2, targets="re:1"), name="a")
    with pytest.raises(TypeError, match="one adapter name"):
        lowrank.eject(model, ["a"])
    with pytest.raises(TypeError, match="keep_merged must be a bool"):
        lowrank.eject(model, keep_merged="no")
    assert lowrank.adapter_names(model) == ["a"]


@pytest.mark.parametrize("config", [lowrank.LoraConfig(r=2, targets=["linear1", "linear2"]),
                                    lowrank.AdapterConfig(bottleneck_size=4)], ids=["lora", "adapter"])
def test_encoder_with_nested_tensors_runs_with_adapters(config):
    """torch's defaults (enable_nested_tensor, eval, a padding mask) sent NestedTensors into the
    adapter layers; with the nested path off the unpadded positions are the same computation."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), num_layers=2).eval()
    x, mask = torch.randn(2, 5, 32), torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 3:] = True
    with torch.no_grad():
        plain = enc(x, src_key_padding_mask=mask)
        lowrank.inject(enc, config)  # a fresh adapter adds nothing
        adapted = enc(x, src_key_padding_mask=mask)
    keep = ~mask
    torch.testing.assert_close(adapted[keep], plain[keep], rtol=0, atol=1e-5)  # fused vs. module path: rounding apart
    lowrank.eject(enc)
    assert enc.use_nested_tensor and not any("_lowrank" in k for k in vars(enc))
    with torch.no_grad():
        assert torch.equal(enc(x, src_key_padding_mask=mask), plain)


def checkpointed(model, layer_type):
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=checkpoint_wrapper,
                                   check_fn=lambda m: isinstance(m, layer_type))
    return model


def test_prefix_default_targets_see_through_checkpoint_wrapper():
    model = checkpointed(models.llama(), transformers.models.llama.modeling_llama.LlamaDecoderLayer)
    assert lowrank.inject(model, lowrank.PrefixConfig(num_virtual_tokens=2)) == \
        ["model.layers.0.self_attn", "model.layers.1.self_attn"]


def mamba():
    torch.manual_seed(0)
    return transformers.MambaForCausalLM(transformers.MambaConfig(vocab_size=64, hidden_size=32, state_size=4,
                                                                  num_hidden_layers=1, expand=2, conv_kernel=2,
                                                                  time_step_rank=4))


@pytest.mark.parametrize("wrap", ["checkpoint_wrapper", "adapter on the block"])
@pytest.mark.parametrize("verb", ["inject", "quantize"])
def test_all_linear_leaves_the_mixers_weights_read_by_weight_inside_wrappers(wrap, verb):
    model = mamba()
    if wrap == "checkpoint_wrapper":
        checkpointed(model, transformers.models.mamba.modeling_mamba.MambaBlock)
    else:
        lowrank.inject(model, lowrank.AdapterConfig(targets="backbone.layers.0", bottleneck_size=4), name="ad")
    done = (lowrank.inject(model, lowrank.LoraConfig(r=2), name="l") if verb == "inject"
            else lowrank.quantize(model))
    assert done == ["backbone.layers.0.mixer.in_proj"]


def test_parallel_adapter_around_a_prefix_reads_the_hidden_states():
    model = models.llama()
    ids = models.ids()
    lowrank.inject(model, lowrank.PrefixConfig(num_virtual_tokens=2), name="pfx")
    with torch.no_grad():
        prefixed = model(input_ids=ids).logits
    lowrank.inject(model, lowrank.AdapterConfig(parallel=True, targets="self_attn", bottleneck_size=4), name="par")
    lowrank.set_active(model, ["pfx", "par"])
    models.randomize_adapters(model)
    with torch.no_grad():
        both = model(input_ids=ids).logits
    assert both.shape == prefixed.shape and not torch.allclose(both, prefixed)


def test_ejecting_an_unmerged_adapter_with_keep_merged_activates_another():
    """keep_merged keeps a merged update; one never merged leaves nothing in the weights."""
    model = two_part()
    lowrank.inject(model, lowrank.LoraConfig(r=2, targets="re:0.0"), name="a")
    lowrank.inject(model, lowrank.LoraConfig(r=2, targets="re:1"), name="b")
    with pytest.warns(UserWarning, match="'a' is active now"):
        lowrank.eject(model, "b", keep_merged=True)
    assert lowrank.active_adapters(model) == ["a"]


def test_a_flags_record_of_the_earlier_form_is_read():
    model = two_part()
    lowrank.inject(model, lowrank.LoraConfig(r=2, targets="re:1"))
    flags = vars(model)["_lowrank_requires_grad"][1]
    vars(model)["_lowrank_requires_grad"] = flags  # a plain dict, as records were first made
    lowrank.eject(model)
    assert all(p.requires_grad for p in model.parameters())


def test_a_flags_record_of_a_counted_form_is_read():
    model = two_part()
    lowrank.inject(model, lowrank.LoraConfig(r=2, targets="re:1"))
    vars(model)["_lowrank_requires_grad"] = (3, vars(model)["_lowrank_requires_grad"][1])  # (count, flags)
    lowrank.inject(model[0], lowrank.LoraConfig(r=2, targets=nn.Linear), name="part")
    lowrank.eject(model)
    assert all(p.requires_grad for p in model.parameters())

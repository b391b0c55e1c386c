"""A call that refuses changes nothing: inject whose wrap fails after earlier targets were
wrapped, merge whose tenth layer cannot merge, set_active on a model with a merged layer, a
load_adapter whose file does not fit. "Nothing" is checked whole: the same module objects at
every place, a bit-identical state dict, the same requires_grad flags, no hooks left, the same
active adapters, and the name free for a retry."""

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import lowrank
from lowrank.config import AdapterConfig, LoraConfig, PromptConfig
from lowrank.inject import (active_adapters, adapter_names, inject, mark_trainable, merge, per_sample, set_active,
                            unmerge)


def snapshot(model: nn.Module) -> dict:
    """Everything a refused call must leave as it was."""
    return {
        "modules": [(n, id(m)) for n, m in model.named_modules()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "flags": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "hooks": [(n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()],
        "adapters": adapter_names(model),
        "active": active_adapters(model),
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    for key in ("modules", "flags", "hooks", "adapters", "active"):
        assert after[key] == before[key], key
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))


class BrokenDequantize(nn.Module):
    """A linear-like module (in/out features, a dequantize method) whose dense weight cannot be read."""

    def __init__(self) -> None:
        super().__init__()
        self.in_features, self.out_features = 16, 8

    def dequantize(self):
        raise RuntimeError("cannot dequantize")

    def forward(self, x):
        return x[..., :8]


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "with-an-adapter"])
def test_inject_that_fails_in_wrap_changes_nothing(existing):
    """DoRA reads the dense weight only when it makes the magnitude: the first target is wrapped
    before the second's wrap raises. Everything goes back, and the name is free again."""
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), BrokenDequantize())
    if existing:
        inject(model, LoraConfig(targets="0"), name="a")
        model[2].register_parameter("head", nn.Parameter(torch.ones(2)))  # trained beside the adapter
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="cannot dequantize"):
        inject(model, LoraConfig(dora=True), name="b")
    assert_unchanged(model, before)
    assert inject(model, LoraConfig(targets="0"), name="b") == ["0"]  # the name is free


def test_prompt_inject_that_fails_in_wrap_changes_nothing():
    """A prompt's init text is checked against each embedding as it is wrapped; the model-level hooks go too."""
    class Tokenizer:
        def __call__(self, text):
            return {"input_ids": [40, 41]}

    model = nn.Sequential(nn.Embedding(64, 8), nn.Embedding(32, 8))
    before = snapshot(model)
    config = PromptConfig(num_virtual_tokens=2, init="text", init_text="hi", tokenizer=Tokenizer(), targets=nn.Embedding)
    with pytest.raises(ValueError, match="outside the embedding's vocabulary of 32"):
        inject(model, config)
    assert_unchanged(model, before)


def test_lazy_parameters_are_refused_before_anything_changes():
    model = nn.Sequential(nn.Linear(8, 16), nn.LazyLinear(4))
    with pytest.raises(ValueError, match=r"uninitialized \(lazy\) parameters \['1.weight', '1.bias'\].*forward"):
        inject(model, LoraConfig(targets="0"))
    assert adapter_names(model) == [] and isinstance(model[0], nn.Linear)
    model(torch.randn(2, 8))  # materialized: now it takes an adapter
    assert inject(model, LoraConfig(targets="all-linear")) == ["0", "1"]


def lora_model(*targets) -> nn.Sequential:
    model = mlp()
    inject(model, LoraConfig(targets=list(targets)))
    with torch.no_grad():
        for t in targets:
            model[int(t)].lora_B["default"].weight.normal_()
    return model


def assert_merge_refused(model: nn.Module, adapted: int, error: type, match: str) -> None:
    """Give layer `adapted` a non-zero update, then merge must raise and leave everything as it was."""
    with torch.no_grad():
        model[adapted].lora_B["default"].weight.normal_()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        merge(model)
    assert_unchanged(model, before)


def test_merge_checks_every_layer_before_writing_any():
    model = lora_model("0", "2")
    with torch.no_grad():  # layer 2's sum overflows float32
        model[2].lora_A["default"].weight.fill_(1e38)
        model[2].lora_B["default"].weight.fill_(1e38)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"nothing was merged: at '2', merging adapter 'default' .* non-finite"):
        merge(model)
    assert_unchanged(model, before)
    assert model[0].merged == ()


def test_merge_refuses_a_4bit_layer_before_writing_the_dense_one():
    model = mlp()
    lowrank.quantize(model, lowrank.NF4Config(targets="2"))
    inject(model, LoraConfig(targets=["0", "2"]))
    assert_merge_refused(model, 0, TypeError, r"nothing was merged: at '2', cannot merge into Linear4bit")


def test_merge_two_adapters_of_one_layer_checks_the_second_on_the_first():
    """The check adds the adapters in order, as the write does: the second's sum is checked on the
    weight the first leaves (each alone is finite, the two together overflow)."""
    model = mlp()
    for name in ("a", "b"):
        inject(model, LoraConfig(targets="0", r=1, alpha=1), name=name)
        with torch.no_grad():
            model[0].lora_A[name].weight.fill_(1.0)
            model[0].lora_B[name].weight.fill_(2e38)  # s B A: each element 2e38 (< 3.4e38), the two 4e38
    set_active(model, ["a", "b"])
    before = snapshot(model)
    with pytest.raises(ValueError, match="merging adapter 'b'"):
        merge(model)
    assert_unchanged(model, before)


@pytest.mark.parametrize("computed", ["parametrize", "weight_norm", "hook_weight_norm"])
def test_merge_refuses_a_weight_computed_at_every_read(computed):
    """Writing into a parametrized weight wrote into a throwaway tensor: merge reported the layer
    merged while the model computed its base alone."""
    from torch.nn.utils import parametrizations, parametrize

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    model = mlp()
    if computed == "parametrize":
        parametrize.register_parametrization(model[0], "weight", Double())
    elif computed == "weight_norm":
        parametrizations.weight_norm(model[0])
    else:
        with pytest.warns(FutureWarning):
            torch.nn.utils.weight_norm(model[0])
    inject(model, LoraConfig(targets=nn.Linear))  # ("0" would also name 0.parametrizations.weight.0)
    assert_merge_refused(model, 0, TypeError, "at '0', cannot merge into .*computed from other parameters")


def test_merge_refuses_two_parameters_on_one_tensor():
    """`head.weight = nn.Parameter(emb.weight)` ties without one Parameter object: merging into the
    head would change the embedding too."""
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10, bias=False))
    model[1].weight = nn.Parameter(model[0].weight)
    inject(model, LoraConfig(targets="1"))
    assert_merge_refused(model, 1, ValueError, r"one tensor with \['0.weight', '1.weight'\] \(tied\)")


def test_merge_reaches_lora_inside_a_bottleneck_adapter():
    """LoRA sits innermost, under a bottleneck adapter on the same module: merge and unmerge find it."""
    model = lora_model("0")
    inject(model, AdapterConfig(targets="0"), name="adapter")
    set_active(model, ["default", "adapter"])
    x = torch.randn(3, 8)
    expected = model(x)
    assert merge(model) == ["0"] and model[0].base.merged == ("default",)
    torch.testing.assert_close(model(x), expected)
    assert unmerge(model) == ["0"] and model[0].base.merged == ()
    torch.testing.assert_close(model(x), expected)


def test_set_active_on_a_model_with_a_merged_layer_changes_no_layer():
    model = mlp()
    inject(model, LoraConfig(targets="2"), name="x")
    inject(model, LoraConfig(targets="0"), name="y")
    set_active(model, ["x"])
    merge(model)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="unmerged adapters; call lowrank.unmerge"):
        set_active(model, ["y"])
    assert_unchanged(model, before)
    assert model[0].active == ()


@pytest.mark.parametrize("names, error, match", [
    (["default", "default"], ValueError, r"repeat \['default'\]"),
    (None, TypeError, "an adapter name or a sequence"),
    ([0], TypeError, "an adapter name or a sequence"),
    (["nope"], ValueError, r"no adapter named \['nope'\]"),
])
def test_set_active_refuses_bad_names(names, error, match):
    model = lora_model("0")
    with pytest.raises(error, match=match):
        set_active(model, names)
    assert model[0].active == ("default",)


def test_mark_trainable_takes_one_name_and_refuses_unknown_ones():
    model = lora_model("0")
    inject(model, LoraConfig(targets="2"), name="other")
    mark_trainable(model, "default")  # one name, not its letters
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["0.lora_A.default.weight",
                                                                          "0.lora_B.default.weight"]
    with pytest.raises(ValueError, match=r"no adapter named \['defualt'\]"):
        mark_trainable(model, ["defualt"])
    assert [n for n, p in model.named_parameters() if p.requires_grad][0] == "0.lora_A.default.weight"


@pytest.mark.parametrize("names", ["default", None])
def test_per_sample_wants_a_sequence_of_names(names):
    model = lora_model("0")
    with pytest.raises(TypeError, match="one a sample"), per_sample(model, names):
        pass
    assert model[0].route is None


def test_a_failed_load_adapter_restores_every_training_flag(tmp_path):
    """The load's inject froze the other adapter and a head the user trains beside it; the file
    then does not fit, and all of it comes back."""
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                              "target_modules": ["2"]}))
    save_file({"base_model.model.2.lora_A.weight": torch.zeros(4, 16),
               "base_model.model.2.lora_B.weight": torch.zeros(3, 3)}, tmp_path / "adapter_model.safetensors")
    model = mlp()
    inject(model, LoraConfig(targets="0", r=2), name="a")
    model[2].weight.requires_grad_(True)
    before = snapshot(model)
    with pytest.raises(ValueError, match="shape mismatches"):
        lowrank.load_adapter(model, tmp_path, name="b")
    assert_unchanged(model, before)


@pytest.mark.parametrize("call, error, match", [
    (lambda: lowrank.nf4.quantize(torch.randn(64), double_quant="no"), TypeError, "double_quant must be a bool"),
    (lambda: lowrank.nf4.dequantize(torch.randn(3)), TypeError, "q must be an NF4Weight .* got Tensor"),
    (lambda: lowrank.PagedAdamW([nn.Parameter(torch.randn(3))], state_bits=8.0), ValueError, "state_bits .* got 8.0"),
    (lambda: LoraConfig(targets={"q_proj": 1}), TypeError, "not a mapping"),
    (lambda: lowrank.save_adapter(mlp(), "unused"), ValueError, "Sequential has no adapters to save"),
    (lambda: lowrank.quantize("model"), TypeError, "quantize takes an nn.Module .* got str"),
    (lambda: lowrank.summary(None), TypeError, "summary takes an nn.Module"),
    (lambda: merge(3), TypeError, "merge takes an nn.Module"),
    (lambda: lowrank.load_adapter(mlp(), "unused", strict="no"), TypeError, "strict must be a bool .* got 'no'"),
])
def test_arguments_of_the_wrong_kind_are_named(call, error, match):
    """Each had been taken (a string as True, a mapping's keys as targets) or failed deep inside."""
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("kind", ["lora", "bottleneck"])
def test_a_load_under_a_name_the_model_has_leaves_that_adapter(tmp_path, kind):
    """inject refuses the name; the undo that followed ejected the user's own adapter of that name
    (and every other one, under another name) and hid the refusal."""
    source = mlp()
    inject(source, LoraConfig(targets="2") if kind == "lora" else AdapterConfig(targets="2"))
    lowrank.save_adapter(source, tmp_path)
    model = lora_model("0")
    inject(model, AdapterConfig(targets="2"), name="mine")
    before = snapshot(model)
    for name in ("default", "mine"):
        with pytest.raises(ValueError, match=f"already has an adapter named '{name}'"):
            lowrank.load_adapter(model, tmp_path, name=name)
        assert_unchanged(model, before)

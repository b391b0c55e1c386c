"""inject: target syntax, errors that speak to the user, several named adapters, disabled(),
per-sample selection, torch.nn.TransformerEncoder in eval mode, torch.compile, and learning."""

import copy
import re

import pytest
import torch
from torch import nn

import lowrank
from lowrank.config import AdapterConfig, LoraConfig, PrefixConfig
from lowrank.inject import (active_adapters, adapter_names, disabled, eject, inject, mark_trainable, merge,
                            per_sample, set_active, summary, unmerge)

from . import models

LLAMA_Q = [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]


@pytest.mark.parametrize("targets, expected", [
    ("q_proj", LLAMA_Q),  # dotted suffix
    ("model.layers.0.self_attn.q_proj", LLAMA_Q[:1]),  # exact name
    ("*.1.self_attn.[qk]_proj", ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]),  # glob
    ("re:.*layers\\.0\\..*(gate|up)_proj", ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]),
    (re.compile(r".*\.q_proj"), LLAMA_Q),  # compiled regex, full match
    (lambda name, m: name.endswith("q_proj") and "1" in name, LLAMA_Q[1:]),  # callable
    (nn.Embedding, ["model.embed_tokens"]),  # module type
])
def test_target_syntax(targets, expected):
    assert sorted(inject(models.llama(), LoraConfig(targets=targets))) == sorted(expected)


def test_all_linear_skips_the_output_head_and_exclude_removes():
    model = models.llama()
    wrapped = inject(model, LoraConfig(targets="all-linear", exclude=["re:.*mlp.*"]))
    assert len(wrapped) == 2 * 4 and "lm_head" not in wrapped and not any("mlp" in n for n in wrapped)


def test_rank_and_alpha_patterns_per_target():
    model = models.llama()
    cfg = LoraConfig(r=4, alpha=4, targets=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}, alpha_pattern={"*.1.*": 16})
    inject(model, cfg)
    q0, v1 = model.model.layers[0].self_attn.q_proj, model.model.layers[1].self_attn.v_proj
    assert (q0.r["default"], q0.scaling["default"]) == (4, 1.0) and (v1.r["default"], v1.scaling["default"]) == (2, 8.0)
    assert LoraConfig(r=16, alpha=8, rslora=True).scale(16, 8) == 2.0  # alpha / sqrt(r)


def test_nothing_matched_lists_candidates_of_the_right_type():
    with pytest.raises(ValueError, match=r"no module .* matched targets=\('qproj',\).*'model.layers.0.self_attn.q_proj'"):
        inject(models.llama(), LoraConfig(targets="qproj"))


@pytest.mark.parametrize("second", [LoraConfig(targets=["v_proj", "q_proj"]), LoraConfig(targets="v_proj"),
                                    AdapterConfig(), PrefixConfig(num_virtual_tokens=2)],
                         ids=["overlapping", "other-targets", "bottleneck", "prefix"])
def test_same_name_twice_raises_and_changes_nothing(second):
    """One name, one adapter: a second adapter under the name, on other modules or of another
    kind, would share save_adapter's, eject's and set_active's name (save_adapter wrote only one
    of them, silently)."""
    model = models.llama()
    inject(model, LoraConfig(targets="q_proj"))
    before = dict(model.named_modules())
    with pytest.raises(ValueError, match=r"the model already has an adapter named 'default' \(LoraLinear\)"):
        inject(model, second)
    assert dict(model.named_modules()).keys() == before.keys()


@pytest.mark.parametrize("name", ["training", "forward", "keys", "update", "items"])
@pytest.mark.parametrize("config", [LoraConfig(r=2), AdapterConfig(), PrefixConfig(num_virtual_tokens=2)],
                         ids=["lora", "bottleneck", "prefix"])
def test_a_name_the_adapter_dicts_hold_as_an_attribute_is_refused_and_changes_nothing(config, name):
    """The layers key their parts by name in nn.ModuleDict / nn.ParameterDict, where these names are taken."""
    model = models.llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"adapter name '{name}' is an attribute of torch's module and parameter dicts"):
        inject(model, config, name=name)
    assert adapter_names(model) == [] and model.state_dict().keys() == before.keys()


@pytest.mark.parametrize("config", [LoraConfig(r=2, dropout=0.1), AdapterConfig(), PrefixConfig(num_virtual_tokens=2,
                                    projection_hidden=4)], ids=["lora", "bottleneck", "prefix-mlp"])
def test_new_modules_take_the_mode_of_what_they_wrap(config):
    """An adapter added to a model in eval mode is in eval mode (its dropout off: two calls give
    the same output), in training mode on a training model, and a wrapper takes its module's
    own mode where the model mixes them (lowrank/inject.py, Note: train or eval mode)."""
    for training in (False, True):
        model = models.llama().train(training)
        inject(model, config)
        assert {m.training for m in model.modules()} == {training}
        if not training:
            with torch.no_grad():
                assert torch.equal(models.run(model, models.ids()), models.run(model, models.ids()))
    model = models.llama().train()
    model.model.layers[1].eval()
    inject(model, config)
    for name, m in model.named_modules():
        assert m.training == (not name.startswith("model.layers.1")), name


def test_a_second_adapter_and_its_dropout_take_the_layers_mode():
    model = models.llama().eval()
    inject(model, LoraConfig(r=2, targets="q_proj"), "a")
    inject(model, LoraConfig(r=2, targets="q_proj", dropout=0.5), "b")
    assert not any(m.training for m in model.modules())


def test_inject_on_a_merged_model_raises_and_changes_nothing():
    model = models.llama()
    inject(model, LoraConfig(r=2, targets="q_proj"), "a")
    models.randomize_adapters(model)
    merge(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"inject \(and load_adapter\) of adapter 'b' needs unmerged adapters; "
                                           r"call lowrank.unmerge\(model\) first"):
        inject(model, LoraConfig(r=2, targets="k_proj"), "b")
    after = model.state_dict()
    assert adapter_names(model) == ["a"] and after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("targets", [["transformer.wte"], ["lm_head"], ["transformer.wte", "lm_head"]])
def test_merge_refuses_a_tied_weight_and_changes_nothing(targets):
    """GPT-2's wte and lm_head are one tensor: merging into one would change the other module
    (its logits moved by ~3 on this model); merge_and_export refuses the same (export.py)."""
    model = models.gpt2()
    inject(model, LoraConfig(r=2, targets=targets + ["c_attn"]))
    models.randomize_adapters(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"cannot merge into '(transformer.wte|lm_head)': its weight is one tensor "
                                         r"with \[.*'lm_head.weight'\] \(tied\)"):
        merge(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert not any(layer.merged for layer in model.modules() if hasattr(layer, "merged") and layer.merged)


@pytest.mark.parametrize("config, message", [
    (dict(r=0), "r .* >= 1; got 0"), (dict(alpha=-1), "alpha"), (dict(dropout=1.0), "dropout"),
    (dict(init="xavier"), "init must be one of"), (dict(targets=[]), "targets is empty"),
    (dict(targets="re:("), "not a valid regular expression"), (dict(rank_pattern={"q": 0}), "rank_pattern"),
    (dict(targets=3), "targets"), (dict(alpha=float("inf")), "alpha must be a finite number > 0; got inf"),
    (dict(alpha_pattern={"q": float("inf")}), r"alpha_pattern\['q'\] must be finite and > 0"),
    (dict(dora="False"), "dora must be a bool"), (dict(rslora=1), "rslora must be a bool"),
    (dict(dropout=True), "dropout must be in"),
])
def test_bad_lora_configs_say_what_and_what_is_allowed(config, message):
    with pytest.raises((ValueError, TypeError), match=message):
        LoraConfig(**config)


@pytest.mark.parametrize("config, message", [
    (dict(placement="middle"), "placement"), (dict(reduction_factor=0.5), "reduction_factor"),
    (dict(reduction_factor=float("inf")), "reduction_factor must be a finite number"),
    (dict(bottleneck_size=0), "bottleneck_size"), (dict(activation="swish"), "activation"),
])
def test_bad_adapter_configs_say_what_and_what_is_allowed(config, message):
    with pytest.raises((ValueError, TypeError), match=message):
        AdapterConfig(**config)


def test_configs_are_frozen_and_the_users_dict_is_copied():
    pattern = {"v_proj": 2}
    cfg = LoraConfig(rank_pattern=pattern)
    pattern["q_proj"] = 3
    assert dict(cfg.rank_pattern) == {"v_proj": 2}
    with pytest.raises(Exception):
        cfg.r = 4


def test_a_set_of_targets_has_one_order():
    # PEFT's target_modules may be a set; its iteration order follows the hash seed
    names = {"v_proj", "q_proj", "o_proj", "re:.*up_proj"}
    assert LoraConfig(targets=names).targets == ("o_proj", "q_proj", "re:.*up_proj", "v_proj")
    assert LoraConfig(targets=frozenset({nn.Linear, "k_proj"})).targets == ("k_proj", nn.Linear)


def test_unsupported_targets_raise_clearly():
    with pytest.raises(ValueError, match="DoRA on a grouped convolution is not supported: '0' is a Conv1d with groups=2"):
        inject(nn.Sequential(nn.Conv1d(4, 4, 3, groups=2)), LoraConfig(r=2, targets="0", dora=True))
    with pytest.raises(TypeError, match="cannot put LoRA on 'model.norm'"):
        inject(models.llama(), LoraConfig(targets="model.norm"))
    with pytest.raises(ValueError, match="cannot put LoRA on .*MultiheadAttention reads its projection weights"):
        inject(models.encoder(), LoraConfig(targets="out_proj"))
    # a bottleneck adapter there was accepted, trained, saved, and never ran
    with pytest.raises(ValueError, match="cannot put a bottleneck adapter on 'layers.0.self_attn.out_proj'"):
        inject(models.encoder(), AdapterConfig(targets=nn.Linear))
    with pytest.raises(ValueError, match="adapter name"):
        inject(models.mlp(), LoraConfig(), name="a.b")


def test_several_named_adapters_add_activate_delete():
    model, x = models.mlp(), torch.randn(3, 16)
    inject(model, LoraConfig(r=2), name="a")
    inject(model, LoraConfig(r=4, targets="0"), name="b")
    models.randomize_adapters(model)  # b is active and trainable now: only its weights move
    assert adapter_names(model) == ["a", "b"] and active_adapters(model) == ["b"]
    s = summary(model)
    assert s.per_adapter == {"a": 2 * (16 + 32) + 2 * (32 + 32) + 2 * (32 + 4), "b": 4 * (16 + 32)}
    assert s.trainable == s.per_adapter["b"]
    y_b = model(x)
    set_active(model, ["a", "b"])
    mark_trainable(model)
    models.randomize_adapters(model, seed=4)  # now a moves too
    y_ab = model(x)
    set_active(model, "b")
    assert not torch.equal(model(x), y_ab)
    eject(model, "b")
    assert adapter_names(model) == ["a"] and model[0].names == ("a",)
    with pytest.raises(ValueError, match="no adapter named"):
        set_active(model, "b")
    assert not torch.equal(model(x), y_b)  # a alone now


def test_active_adapters_keep_every_layers_order():
    # layer 0 holds a only, layer 2 holds both: the first layer seen must not decide the order
    model = models.mlp()
    inject(model, LoraConfig(r=2, targets=["0", "2"]), name="a")
    inject(model, LoraConfig(r=2, targets="2"), name="b")
    inject(model, LoraConfig(r=2, targets="4"), name="c")
    set_active(model, ["b", "c", "a"])
    assert (model[0].active, model[2].active, model[4].active) == (("a",), ("b", "a"), ("c",))
    assert active_adapters(model) == ["b", "a", "c"]  # b before a (layer 2); c first seen after a
    set_active(model, active_adapters(model))  # what load_adapter does to put the active set back
    assert (model[0].active, model[2].active, model[4].active) == (("a",), ("b", "a"), ("c",))
    both = models.mlp()  # layers set one by one, disagreeing: no order fits both, first seen it is
    inject(both, LoraConfig(r=2, targets=["0", "2"]), name="a")
    inject(both, LoraConfig(r=2, targets=["0", "2"]), name="b")
    both[0].set_active(["a", "b"])
    both[2].set_active(["b", "a"])
    assert active_adapters(both) == ["a", "b"]


def test_disabled_gives_the_base_model_and_refuses_while_merged():
    model, x = models.mlp(), torch.randn(3, 16)
    base = model(x)
    inject(model, LoraConfig(r=2))
    models.randomize_adapters(model)
    adapted = model(x)
    with disabled(model):
        assert torch.equal(model(x), base)
    assert torch.equal(model(x), adapted)
    merge(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        with disabled(model):
            pass
    unmerge(model)


@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "4bit-bf16-compute"])
@pytest.mark.parametrize("config", [LoraConfig(r=2), LoraConfig(r=2, dora=True), AdapterConfig(targets=["0", "2"])])
def test_per_sample_selection_equals_running_each_adapter_alone(config, quantized):
    """Also on a float32 model whose 4-bit layers compute in bfloat16, fed bfloat16 x: DoRA's
    magnitude stays float32, so its sum is wider than the layer's output and is cast back (it
    raised in the indexed assignment before; lowrank/tuners/lora_base.py, Note: x in the adapter's dtype)."""
    model = models.mlp()
    x = torch.randn(4, 16)
    if quantized:
        from lowrank.quant import NF4Config, quantize

        quantize(model, NF4Config(compute_dtype=torch.bfloat16))
        x = x.bfloat16()
    inject(model, config, name="a")
    inject(model, config, name="b")
    set_active(model, ["a", "b"])
    mark_trainable(model)
    models.randomize_adapters(model)
    route = ["a", "__base__", "b", "a"]
    with torch.no_grad():
        alone = {}
        for name in ("a", "b"):
            set_active(model, name)
            alone[name] = model(x)
        with disabled(model):
            alone["__base__"] = model(x)
        with per_sample(model, route):
            mixed = model(x)
    assert mixed.dtype == x.dtype and all(a.dtype == x.dtype for a in alone.values())
    for i, name in enumerate(route):
        # sample i goes through the same ops on a sub-batch; row-wise ops of a different batch
        # size may round differently, so compare to the float32 rounding of the values
        torch.testing.assert_close(mixed[i], alone[name][i])


@pytest.mark.parametrize("second", [LoraConfig(r=2, targets=["2"]), AdapterConfig(targets=["2"])],
                         ids=["lora", "bottleneck"])
def test_per_sample_routes_adapters_that_are_not_active(second):
    """A route picks its adapters whatever is active (PEFT's adapter_names): adapter "b" alone on
    layer 2, "a" (layer 0) active; each routed sample equals the model with its adapter active.
    Before, a layer with no active adapter returned its base output under a route."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)).eval()
    inject(model, LoraConfig(r=2, targets=["0"]), "a")
    inject(model, second, "b")
    models.randomize_adapters(model)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    alone = {}
    with torch.no_grad():
        for name in ("a", "b"):
            set_active(model, name)
            alone[name] = model(x)
        with disabled(model):
            alone["__base__"] = model(x)
        set_active(model, "a")
        with per_sample(model, ["b", "__base__", "a"]):
            mixed = model(x)
    assert not torch.equal(alone["b"], alone["__base__"])
    for i, name in enumerate(["b", "__base__", "a"]):
        torch.testing.assert_close(mixed[i], alone[name][i])  # a sub-batch: other matmul blockings


def test_transformer_encoder_eval_mode_keeps_the_adapters():
    model, x = models.encoder(), torch.randn(2, 5, 32)
    inject(model, LoraConfig(r=4, targets=["linear1", "linear2"]))
    inject(model, AdapterConfig(placement="houlsby"), name="bn")
    set_active(model, ["default", "bn"])
    models.randomize_adapters(model)
    train_out = model(x)
    model.eval()
    with torch.no_grad():  # the fused fast path would skip the submodules: see Note: fused fast paths
        eval_out = model(x)
        with disabled(model):
            base_out = model(x)
    torch.testing.assert_close(eval_out, train_out)
    assert not torch.allclose(eval_out, base_out)


def test_torch_compile_matches_eager():
    model = models.llama()
    inject(model, LoraConfig(r=4, targets=["q_proj", "v_proj"], dora=True))
    inject(model, AdapterConfig(), name="bn")
    set_active(model, ["default", "bn"])
    models.randomize_adapters(model)
    ids = models.ids()
    eager = model(input_ids=ids).logits
    compiled = torch.compile(model)(input_ids=ids).logits
    # inductor fuses and reorders float32 reductions: equal up to float32 rounding of the values
    torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("config", [LoraConfig(r=4, alpha=8, targets="all-linear"),
                                    AdapterConfig(targets=["0", "2"], bottleneck_size=8)])
def test_a_small_task_is_learned(config):
    # y = a fixed random MLP of x; the base is a different random MLP: only the adapters train
    torch.manual_seed(0)
    teacher, model = models.mlp(), nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4))
    x = torch.randn(256, 16)
    y = teacher(x).detach()
    inject(model, config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    start = nn.functional.mse_loss(model(x), y).item()
    for _ in range(300):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * start


def test_an_injected_model_deep_copies_and_pickles():
    # Configs are frozen but must not stop copy.deepcopy(model) / torch.save(model).
    import copy
    import io

    config = LoraConfig(r=2, targets=["0", "2"], rank_pattern={"2": 3}, alpha_pattern={"0": 4.0})
    model = models.mlp()
    inject(model, config)
    models.randomize_adapters(model)
    x = torch.randn(3, 16)
    twin = copy.deepcopy(model)
    assert torch.equal(twin(x), model(x)) and twin[2].r == {"default": 3}
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=False)(x), model(x))
    with pytest.raises(TypeError):
        config.rank_pattern["0"] = 5  # still read-only


def test_all_linear_leaves_out_what_a_mamba_mixer_reads_by_weight():
    """MambaMixer multiplies by dt_proj.weight itself, and its fused CUDA training path reads
    x_proj's and out_proj's weights: adapters there never ran (lowrank/targets.py, Note: layers read
    by weight). "all-linear" keeps in_proj, for LoRA and for quantize; the model still runs."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.MambaConfig(vocab_size=64, hidden_size=32, state_size=4, num_hidden_layers=2, expand=2,
                                   conv_kernel=4)
    model = transformers.MambaForCausalLM(cfg).eval()
    wrapped = lowrank.inject(copy.deepcopy(model), lowrank.LoraConfig(r=4, targets="all-linear"))
    assert sorted(wrapped) == ["backbone.layers.0.mixer.in_proj", "backbone.layers.1.mixer.in_proj"]
    quantized = copy.deepcopy(model)
    assert sorted(lowrank.quantize(quantized, lowrank.NF4Config())) == sorted(wrapped)
    quantized(input_ids=torch.randint(0, 64, (1, 5)))
    named = lowrank.inject(copy.deepcopy(model), lowrank.LoraConfig(r=4, targets=["x_proj"]))  # named: still yours
    assert len(named) == 2

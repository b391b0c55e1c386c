"""load_and_quantize: a dense checkpoint read straight into 4 bits equals quantize(from_pretrained)."""

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowrank.quant import Linear4bit, NF4Config, quantize
from lowrank.quant.load import checkpoint_files, load_and_quantize, skeleton
from tests.tuners import models

transformers = pytest.importorskip("transformers")


def _saved(tmp_path, build, shard="20KB"):
    model = build()
    model.save_pretrained(tmp_path, max_shard_size=shard)  # several shards: tensors of a layer may be split
    return model


def _state(model):
    return {k: v for k, v in model.state_dict().items()}


def phimoe():
    torch.manual_seed(0)
    return transformers.PhimoeForCausalLM(transformers.PhimoeConfig(
        vocab_size=models.VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2))


def qwen2_moe():
    torch.manual_seed(0)
    return transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        vocab_size=models.VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=48,
        shared_expert_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[]))


# transformers 5 writes a mixture of experts' checkpoint in transformers 4's layout, one key per
# expert projection (Note: transformers 4 expert keys, lowrank/quant/load.py), and fuses it again
# as it loads: from_pretrained is the oracle for the fused experts too
@pytest.mark.parametrize("build", [models.llama, models.gpt2, models.mixtral, phimoe, qwen2_moe],
                         ids=["llama", "gpt2", "mixtral", "phimoe", "qwen2_moe"])
@pytest.mark.parametrize("config", [NF4Config(), NF4Config(blocksize=128, double_quant=False, compute_dtype=torch.float32)],
                         ids=["dq64", "plain128"])
def test_equals_quantize_of_the_loaded_model(tmp_path, build, config):
    if build is phimoe:  # its router subclasses nn.Linear but returns routing: quantize refuses it (check_forward)
        config = dataclasses.replace(config, skip=["router"])
    _saved(tmp_path, build)
    assert len(checkpoint_files(tmp_path)) > 1  # the sharded path is the one under test

    expected = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    names = quantize(expected, config)
    with skeleton():
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(tmp_path))
    assert all(p.is_meta for p in model.parameters())
    assert load_and_quantize(model, tmp_path, config) == names

    got, want = _state(model), _state(expected)
    assert got.keys() == want.keys()
    for k in want:  # the codec is deterministic: every packed byte, scale and dense tensor is equal
        assert torch.equal(got[k], want[k]), k
    if build is models.gpt2 or expected.config.tie_word_embeddings:
        assert model.lm_head.weight is model.get_input_embeddings().weight
    ids = models.ids()
    model.eval()  # as from_pretrained leaves `expected` (PhiMoE's router jitters its logits in training)
    assert torch.equal(model(input_ids=ids).logits, expected(input_ids=ids).logits)


def test_bias_before_weight_and_cast(tmp_path):
    # One file, keys sorted: every layer's bias is read before its weight.
    base = models.mlp()
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, tmp_path / "model.safetensors")
    with skeleton():
        model = models.mlp()
    got = load_and_quantize(model, tmp_path, NF4Config(skip="4"), dtype=torch.bfloat16)
    assert got == ["0", "2"] and isinstance(model[0], Linear4bit) and model[0].dtype == torch.bfloat16
    assert torch.equal(model[0].bias, base[0].bias.to(torch.bfloat16))
    assert model[4].weight.dtype == torch.bfloat16 and torch.equal(model[4].weight, base[4].weight.to(torch.bfloat16))
    q = quantize(models.mlp().to(torch.bfloat16), NF4Config(skip="4"))
    assert q == got


def test_errors_name_the_keys(tmp_path):
    base = models.mlp()
    state = {k: v.contiguous() for k, v in base.state_dict().items()}
    save_file({k: v for k, v in state.items() if k != "2.bias"} | {"9.weight": torch.zeros(1)}, tmp_path / "model.safetensors")
    with skeleton():
        model = models.mlp()
    with pytest.raises(ValueError) as e:
        load_and_quantize(model, tmp_path)
    assert "'2.bias'" in str(e.value) and "'9.weight'" in str(e.value)

    save_file(state | {"2.weight": torch.zeros(32, 31)}, tmp_path / "model.safetensors")
    with skeleton():
        model = models.mlp()
    with pytest.raises(ValueError, match=r"2.weight: checkpoint \(32, 31\), model \(32, 32\)"):
        load_and_quantize(model, tmp_path)


def test_checkpoint_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint_files(tmp_path / "nope")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        checkpoint_files(tmp_path)
    with pytest.raises(ValueError, match="safetensors only"):
        checkpoint_files(tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "shard-1.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="shard-1.safetensors"):
        checkpoint_files(tmp_path)


def test_skeleton_allocates_no_parameters_and_restores_itself():
    with skeleton():
        model = models.llama()
    assert all(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())  # rotary tables are computed, not loaded
    assert not models.mlp()[0].weight.is_meta


def test_a_truncated_shard_is_named(tmp_path):
    _saved(tmp_path, models.llama)
    shard = checkpoint_files(tmp_path)[1]
    shard.write_bytes(shard.read_bytes()[:100])
    with skeleton():
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(tmp_path))
    with pytest.raises(ValueError, match=shard.name + ": not a readable safetensors file"):
        load_and_quantize(model, tmp_path)


def test_a_tied_head_or_a_weight_nf4_cannot_hold_is_named(tmp_path):
    _saved(tmp_path, models.gpt2, shard="10GB")
    with skeleton():
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(tmp_path))
    with pytest.raises(ValueError, match=r"cannot quantize 'lm_head': its weight is tied to \['transformer.wte'\]"):
        load_and_quantize(model, tmp_path, NF4Config(targets=["all-linear", "lm_head"]))  # as quantize() does

    state = {k: v.contiguous() for k, v in models.mlp().state_dict().items()}
    for spoil, error, match in [(torch.float64, TypeError, "got torch.float64.* dtype=torch.bfloat16"),
                                (float("nan"), ValueError, "1024 non-finite value")]:
        bad = dict(state)
        bad["2.weight"] = bad["2.weight"].double() if spoil is torch.float64 else bad["2.weight"].clone().fill_(spoil)
        save_file(bad, tmp_path / "model.safetensors")
        with skeleton():
            model = models.mlp()
        with pytest.raises(error, match=rf"model.safetensors: cannot quantize '2.weight': .*{match}"):
            load_and_quantize(model, tmp_path)


class _Shared(torch.nn.Module):
    """One nn.Linear registered at two places (and one LayerNorm, which stays dense)."""

    def __init__(self):
        super().__init__()
        self.a, self.c, self.norm = torch.nn.Linear(64, 64), torch.nn.Linear(64, 8), torch.nn.LayerNorm(64)
        self.b, self.norm2 = self.a, self.norm

    def forward(self, x):
        return self.c(self.norm2(self.b(self.norm(self.a(x)))))


@pytest.mark.parametrize("both_names", [False, True], ids=["one-name", "both-names"])
def test_a_module_registered_twice_loads_as_one_4bit_layer(tmp_path, both_names):
    # safetensors' save_model keeps one name of a shared tensor, save_file of a state dict both: either
    # loads as quantize makes it (one Linear4bit at both places); before, b stayed a meta nn.Linear
    torch.manual_seed(0)
    dense = _Shared()
    sd = {k: v.clone() for k, v in dense.state_dict().items()}
    save_file(sd if both_names else {k: v for k, v in sd.items() if not k.startswith(("b.", "norm2."))}, tmp_path / "model.safetensors")
    expected = _Shared()
    expected.load_state_dict(dense.state_dict())
    names = quantize(expected, NF4Config(skip=[]))
    with skeleton():
        model = _Shared()
    assert load_and_quantize(model, tmp_path, NF4Config(skip=[])) == names == ["a", "c", "b"]
    assert isinstance(model.a, Linear4bit) and model.a is model.b and model.norm is model.norm2
    x = torch.randn(3, 64)
    assert torch.equal(model(x), expected(x))


def test_a_module_registered_twice_with_two_weights_is_refused(tmp_path):
    torch.manual_seed(0)
    sd = {k: v.clone() for k, v in _Shared().state_dict().items()}
    sd["b.weight"] = sd["b.weight"] + 1
    save_file(sd, tmp_path / "model.safetensors")
    with skeleton():
        model = _Shared()
    with pytest.raises(ValueError, match=r"a module registered at several places has different weights under its "
                                         r"names: \['b.weight differs from a.weight'\]"):
        load_and_quantize(model, tmp_path, NF4Config(skip=[]))


@pytest.mark.parametrize("spoil", ["bias", "unexpected"])
def test_a_failed_load_quantized_changes_nothing(tmp_path, spoil):
    """It replaced layers as it went: a bias of the wrong shape or an unexpected key raised with
    the model half 4-bit. Now every module gets its submodules and tensors back."""
    import lowrank
    from safetensors.torch import load_file

    quantized = models.mlp()
    quantize(quantized)
    lowrank.save_quantized(quantized, tmp_path / "q")
    state = load_file(tmp_path / "q" / "model.safetensors")
    shutil.copytree(tmp_path / "q", tmp_path / "bad")
    save_file(state | ({"4.bias": torch.zeros(3)} if spoil == "bias" else {"extra.weight": torch.zeros(3)}),
              tmp_path / "bad" / "model.safetensors")
    model = models.mlp()
    before = [(n, id(m)) for n, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}
    match = r"'4': bias must have shape \(4,\); got \(3,\)" if spoil == "bias" else r"unexpected keys: \['extra.weight'\]"
    with pytest.raises(ValueError, match=match):
        lowrank.load_quantized(model, tmp_path / "bad")
    assert [(n, id(m)) for n, m in model.named_modules()] == before[0]
    assert all(torch.equal(v, before[1][k]) for k, v in model.state_dict().items())
    assert lowrank.load_quantized(model, tmp_path / "q") == ["0", "2", "4"]


def test_load_and_quantize_checks_dtype_first_and_names_a_bias_of_the_wrong_shape(tmp_path):
    base = models.mlp()
    state = {k: v.contiguous() for k, v in base.state_dict().items()}
    save_file(state | {"2.bias": torch.zeros(3)}, tmp_path / "model.safetensors")
    with skeleton():
        model = models.mlp()
    with pytest.raises(TypeError, match="dtype must be None or a floating torch.dtype .* got 'bf16'"):
        load_and_quantize(model, tmp_path, dtype="bf16")
    with pytest.raises(ValueError, match=r"2.bias: checkpoint \(3,\), model \(32,\)"):
        load_and_quantize(model, tmp_path)


def test_a_skeleton_with_affine_linear_subclasses_loads(tmp_path):
    """Falcon's layers are all FalconLinear (x W^T, then + b): on the meta device their forward is
    checked on a copy given memory, once a class, and the model loads as quantize makes it."""
    cfg = transformers.FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                    new_decoder_architecture=False)
    torch.manual_seed(0)
    dense = transformers.FalconForCausalLM(cfg)
    dense.save_pretrained(tmp_path)
    expected = quantize(dense)
    with skeleton():
        model = transformers.FalconForCausalLM(cfg)
    assert load_and_quantize(model, tmp_path) == expected and len(expected) == 4
    got, want = _state(model), _state(dense)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


class _ScaledLinear(torch.nn.Linear):
    def __init__(self, cin, cout, scale):
        super().__init__(cin, cout)
        self.scale = scale

    def forward(self, x):
        return super().forward(x) * self.scale


def test_every_skeleton_layer_of_a_subclass_is_checked_not_one_a_class(tmp_path):
    """Two instances of one class may compute differently (a scale each): only the affine one
    may be quantized, as quantize of the loaded model decides."""
    def build():
        return torch.nn.Sequential(_ScaledLinear(16, 16, 1.0), torch.nn.GELU(), _ScaledLinear(16, 8, 5.0))

    save_file({k: v.contiguous() for k, v in build().state_dict().items()}, tmp_path / "model.safetensors")
    with pytest.raises(TypeError, match="'2' is a _ScaledLinear, .* does not compute x W"):
        quantize(build())
    with skeleton():
        model = build()
    with pytest.raises(TypeError, match="'2' is a _ScaledLinear, .* does not compute x W"):
        load_and_quantize(model, tmp_path)


def test_an_expert_the_checkpoint_lacks_is_named(tmp_path):
    _saved(tmp_path, models.mixtral, shard="10GB")
    sd = load_file(tmp_path / "model.safetensors")
    del sd["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with skeleton():
        model = models.mixtral()
    with pytest.raises(ValueError, match=r"fused experts the checkpoint does not fill: \[.model.layers.1.mlp.experts.gate_up_proj"):
        load_and_quantize(model, tmp_path)


def test_experts_of_a_real_model_take_the_dtype_and_device_asked(tmp_path):
    """Loaded into a model not built under skeleton(): the fused experts are made anew, as every
    other tensor is cast as it is read."""
    _saved(tmp_path, models.mixtral, shard="10GB")
    model = models.mixtral()
    load_and_quantize(model, tmp_path, dtype=torch.bfloat16)
    assert model.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    assert model.model.layers[0].mlp.gate.weight.dtype == torch.bfloat16

"""4-bit models as researchers use them: eval mode kept, assign loads into meta models, encoders' fast
paths, integer inputs, safetensors state dicts, modules at two places, quantizing twice, dense checkpoints."""

import warnings

import pytest
import torch
from torch import nn

import lowrank
from lowrank.quant import Linear4bit, NF4Config, quantize
from lowrank.quant.params4bit import Weight4bit

transformers = pytest.importorskip("transformers")


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg)


def _mixtral_config():
    """A one-layer Mixtral of 4 experts: its experts are 3-D parameters (NF4Config.parameters)."""
    return transformers.MixtralConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)


def modes(model: nn.Module) -> set[bool]:
    return {m.training for m in model.modules()}


@pytest.mark.parametrize("how", ["quantize", "load_and_quantize", "load_quantized"])
def test_a_4bit_layer_takes_the_mode_of_an_eval_model_so_lora_dropout_stays_off(how, tmp_path):
    # from_pretrained returns a model in eval mode; quantize's new layers started in training mode,
    # and inject gives the LoRA layer (and its dropout) the mode of the layer it wraps: inference
    # with a dropout adapter (load_adapter, PEFT's lora_dropout=0.05) was random
    dense = tiny_llama().eval()
    if how == "quantize":
        model = dense
        quantize(model)
    elif how == "load_and_quantize":
        dense.save_pretrained(tmp_path)
        with lowrank.skeleton():
            model = type(dense)(dense.config)
        lowrank.load_and_quantize(model.eval(), tmp_path)
    else:
        quantize(dense)
        lowrank.save_quantized(dense, tmp_path)
        model = type(dense)(dense.config).eval()
        lowrank.load_quantized(model, tmp_path)
    assert any(isinstance(m, Linear4bit) for m in model.modules())
    assert modes(model) == {False}
    lowrank.inject(model, lowrank.LoraConfig(r=4, targets="all-linear", dropout=0.5))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.1)
        ids = torch.randint(0, 64, (1, 8))
        assert torch.equal(model(ids).logits, model(ids).logits)
    assert modes(model) == {False}


def test_4bit_experts_take_their_owners_mode():
    torch.manual_seed(0)
    cfg = _mixtral_config()
    model = transformers.MixtralForCausalLM(cfg).eval()
    quantize(model, NF4Config(parameters=["experts.gate_up_proj", "experts.down_proj"]))
    assert any(isinstance(m, Weight4bit) for m in model.modules())
    assert modes(model) == {False}
    model.train()
    assert modes(model) == {True}


@pytest.mark.parametrize("experts", [False, True])
def test_load_state_dict_assign_into_a_meta_model_takes_the_4bit_tensors(experts):
    # load_state_dict(assign=True) into a model on the meta device (build on meta, then load) took
    # every dense tensor but left each 4-bit weight (moved to the module's device) and bias
    # (copied into, a no-op) on meta, reporting all keys matched
    import copy

    torch.manual_seed(0)
    if experts:
        cfg = _mixtral_config()
        model = transformers.MixtralForCausalLM(cfg).eval()
        quantize(model, NF4Config(parameters=["experts.gate_up_proj", "experts.down_proj"]))
    else:
        model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8))
        quantize(model, NF4Config(targets=["0", "2"]))
    x = torch.randint(0, 64, (1, 5)) if experts else torch.randn(2, 64)

    def run(m):
        return m(x).logits if experts else m(x)

    meta = copy.deepcopy(model).to("meta")
    assert not meta.load_state_dict(model.state_dict(), assign=True).missing_keys
    assert not [n for n, t in meta.named_parameters() if t.is_meta]
    if not experts:
        assert torch.equal(run(meta), run(model))
    else:  # a buffer computed at init (rotary inv_freq) is no state dict entry: as torch, it stays on meta
        assert not [n for n, t in meta.named_buffers() if t.is_meta and "rotary" not in n]


@pytest.mark.parametrize("how", ["quantize", "load_quantized", "load_and_quantize"])
def test_a_quantized_transformer_encoder_runs_in_eval_mode(how, tmp_path):
    # in eval mode under no_grad torch's TransformerEncoderLayer fast path read linear1.weight (an
    # NF4Weight): "_transformer_encoder_layer_fwd(): argument 'ffn_weight_1' must be Tensor, not NF4Weight"
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 128, batch_first=True, dropout=0.0), 2)
    if how == "load_and_quantize":
        from safetensors.torch import save_file

        save_file(enc.state_dict(), tmp_path / "model.safetensors")
        assert lowrank.load_and_quantize(enc, tmp_path) == [f"layers.{i}.linear{j}" for i in (0, 1) for j in (1, 2)]
    else:
        assert quantize(enc) == [f"layers.{i}.linear{j}" for i in (0, 1) for j in (1, 2)]  # out_proj: MHA's, left
    if how == "load_quantized":
        lowrank.save_quantized(enc, tmp_path)
        torch.manual_seed(1)
        enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 128, batch_first=True, dropout=0.0), 2)
        lowrank.load_quantized(enc, tmp_path)
    x = torch.randn(2, 5, 64)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[1, 3:] = True  # a padded batch: the encoder's nested-tensor path
    want = enc.train()(x, src_key_padding_mask=mask)  # dropout 0: the module-by-module path
    enc.eval()
    with torch.no_grad():
        assert torch.allclose(enc(x, src_key_padding_mask=mask), want, atol=1e-5)
        assert torch.allclose(enc(x), enc.train()(x), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.long, torch.bool, torch.complex64])
def test_a_4bit_layer_refuses_x_that_is_not_floating_point(dtype):
    # cast to the compute dtype and back, token ids gave an int64 "output" (the products rounded
    # to integers), a mask a bool one, complex x lost its imaginary part: nn.Linear raises
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(nn.Linear(64, 32))
    x = torch.ones(2, 64, dtype=dtype)
    with pytest.raises(TypeError, match=f"Linear4bit takes floating-point x; got a {dtype} tensor of shape \\(2, 64\\)"):
        layer(x)
    with pytest.raises(RuntimeError):
        nn.Linear(64, 32)(x)  # the dense layer it replaced refuses it too


def test_state_dict_entries_share_no_memory_so_safetensors_saves_them(tmp_path):
    # every layer's quant_map and nested_quant_map were the codec's one global table (NF4_CODE.to(cpu)
    # is NF4_CODE): safetensors' save_file(model.state_dict()) and transformers' save_pretrained refused
    # "Some tensors share memory" (bitsandbytes' state dict saves), and writing into a state dict in place
    # wrote into the codec
    from safetensors.torch import load_file, save_file

    from lowrank.quant import nf4

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64))
    quantize(model, NF4Config(targets=["0", "2"]))
    sd = model.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "m.safetensors")
    other = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64))
    quantize(other, NF4Config(targets=["0", "2"]))
    other.load_state_dict(load_file(tmp_path / "m.safetensors"))
    x = torch.randn(3, 64)
    assert torch.equal(other(x), model(x))
    code = nf4.NF4_CODE.clone()
    sd["0.weight.quant_map"].zero_()
    try:
        assert torch.equal(nf4.NF4_CODE, code)
    finally:
        nf4.NF4_CODE.copy_(code)  # the codec's table as it was, for the tests after this one


def test_one_module_at_two_places_is_quantized_at_both_or_refused():
    # targets or skip naming one place of a module registered at two quietly split it: a 4-bit layer
    # at one place, the full-precision one (its memory kept) at the other, no longer shared
    torch.manual_seed(0)
    shared = nn.Linear(64, 64)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    for config in (NF4Config(targets=["0"]), NF4Config(skip=["2"])):
        with pytest.raises(ValueError, match=r"cannot quantize '0' alone: the same module is also at \['2'\]"):
            quantize(model, config)
        assert model[0] is model[2] is shared  # nothing changed
    assert quantize(model, NF4Config(targets=["0", "2"])) == ["0", "2"] and model[0] is model[2]
    other = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    assert quantize(other, NF4Config(skip=["2"])) == ["0"]  # two modules: one may stay dense


def test_quantizing_twice_says_the_layers_are_4bit_already():
    # the second call said "no module matched targets=('all-linear',)" and offered lm_head, the one
    # layer all-linear leaves out, with no word that the model was quantized already
    model = tiny_llama()
    names = quantize(model)
    with pytest.raises(ValueError, match=rf"the {len(names)} layers they match are in 4 bits already .*'{names[0]}'"):
        quantize(model)


def test_quantizing_a_bare_linear_layer_says_how():
    # "no module of Linear matched targets=('all-linear',) ... e.g. [] (0 nn.Linear / Conv1D layers ...)"
    # for a model that is an nn.Linear
    layer = nn.Linear(64, 64)
    with pytest.raises(ValueError, match=r"the model is itself a Linear, .* use Linear4bit.from_linear\(layer\)"):
        quantize(layer)
    assert type(layer.weight) is nn.Parameter  # unchanged


@pytest.mark.parametrize("experts", [False, True])
def test_a_dense_checkpoint_into_a_4bit_model_says_so(experts):
    # model.load_state_dict(a full-precision state dict) after quantize said "4-bit state dict has no
    # entry '0.weight.quant_state.bitsandbytes__nf4'", not that the checkpoint is dense
    torch.manual_seed(0)
    if experts:
        cfg = _mixtral_config()
        dense = transformers.MixtralForCausalLM(cfg)
        key, config = "model.layers.0.mlp.experts.gate_up_proj", NF4Config(targets=None, parameters="experts.gate_up_proj")
    else:
        dense = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8))
        key, config = "0.weight", NF4Config(targets="0")
    import copy

    model = copy.deepcopy(dense)
    quantize(model, config)
    with pytest.raises(RuntimeError, match=rf"'{key}' is a dense torch.float32 weight of shape .* load a dense "
                                           r"checkpoint before quantize"):
        model.load_state_dict(dense.state_dict())


def test_quantize_says_which_layers_lose_their_hooks():
    # a hook on an nn.Linear (activation capture, a probe) stayed on the dense layer quantize threw away
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    seen = []
    model[2].register_forward_hook(lambda m, args, out: seen.append(out.shape))
    with pytest.warns(UserWarning, match=r"quantize: \['2'\] \(1 layers\) have forward or backward hooks of their own"):
        quantize(model)
    model(torch.randn(3, 64))
    assert seen == []  # not carried, as the warning says
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no hooks, no warning
        quantize(nn.Sequential(nn.Linear(64, 64)))


def test_quantizing_a_4bit_layer_says_it_is_4bit_already():
    layer = Linear4bit.from_linear(nn.Linear(64, 64))
    with pytest.raises(ValueError, match="the model is itself a Linear4bit: it is in 4 bits already"):
        quantize(layer)

"""Bottleneck adapters: identity at start; the default Houlsby / Pfeiffer targets on Llama,
GPT-2, BERT and nn.TransformerEncoder; the parallel variant's equation; tuple outputs."""

import pytest
import torch
from torch import nn

from lowrank.config import AdapterConfig
from lowrank.inject import eject, inject, merge
from lowrank.tuners.adapter import AdapterLayer

from . import models

EXPECTED = {  # (placement) -> wrapped names in layer 0
    ("llama", "pfeiffer"): ["model.layers.0.mlp"],
    ("llama", "houlsby"): ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp"],
    ("gpt2", "pfeiffer"): ["transformer.h.0.mlp"],
    ("gpt2", "houlsby"): ["transformer.h.0.attn.c_proj", "transformer.h.0.mlp"],
    ("bert", "pfeiffer"): ["encoder.layer.0.output.dense"],
    ("bert", "houlsby"): ["encoder.layer.0.attention.output.dense", "encoder.layer.0.output.dense"],
    ("encoder", "pfeiffer"): ["layers.0.linear2"],
    ("encoder", "houlsby"): ["layers.0.self_attn", "layers.0.linear2"],
}


def _input(kind):
    return torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1)) if kind == "encoder" else models.ids()


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("kind, placement", list(EXPECTED))
def test_default_placements_wrap_the_right_modules_and_start_as_identity(kind, placement, parallel):
    model = getattr(models, kind)()
    x = _input(kind)
    model.requires_grad_(False)  # as inject leaves it: torch picks attention kernels by requires_grad
    before = models.run(model, x)
    wrapped = inject(model, AdapterConfig(placement=placement, parallel=parallel))
    assert sorted(n for n in wrapped if ".0." in n) == sorted(EXPECTED[kind, placement])
    assert len(wrapped) == 2 * len(EXPECTED[kind, placement])  # both layers, nothing else
    # up = 0 makes every addition exactly 0.0: bit-for-bit the base output
    assert torch.equal(models.run(model, x), before)
    models.randomize_adapters(model)
    assert not torch.equal(models.run(model, x), before)  # and the adapters are really in the path


@pytest.mark.parametrize("parallel", [False, True])
def test_forward_is_the_equation(parallel):
    torch.manual_seed(0)
    base = nn.Linear(12, 20)
    holder = nn.Sequential(base)
    inject(holder, AdapterConfig(targets="0", parallel=parallel, bottleneck_size=3, activation="gelu", scaling=2.0))
    models.randomize_adapters(holder)
    ad = holder[0].adapters["default"]
    assert (ad.down.in_features, ad.down.out_features, ad.up.out_features) == ((12 if parallel else 20), 3, 20)
    x = torch.randn(4, 12)
    fx = base(x)
    src = x if parallel else fx
    expected = fx + 2.0 * ad.up(nn.functional.gelu(ad.down(src)))  # the same ops: exact
    assert torch.equal(holder(x), expected)


def test_reduction_factor_sets_the_width():
    model = models.llama()
    inject(model, AdapterConfig(reduction_factor=8))
    assert model.model.layers[0].mlp.adapters["default"].down.out_features == 32 // 8


def test_tuple_outputs_adapt_the_first_item_and_keep_the_rest():
    mha = nn.MultiheadAttention(16, 2, batch_first=True)
    holder = nn.ModuleDict({"attn": mha})
    inject(holder, AdapterConfig(targets=nn.MultiheadAttention))
    models.randomize_adapters(holder)
    x = torch.randn(2, 3, 16)
    out, weights = holder["attn"](x, x, x)
    base_out, base_weights = mha(x, x, x)
    assert torch.equal(weights, base_weights) and not torch.equal(out, base_out)


def test_merge_leaves_bottleneck_adapters_in_the_forward_and_eject_restores():
    model = models.mlp()
    before = model.state_dict(keep_vars=True)
    inject(model, AdapterConfig(targets=["0", "2"]))
    assert merge(model) == []
    assert all(isinstance(model[i], AdapterLayer) for i in (0, 2))
    eject(model)
    assert all(model.state_dict(keep_vars=True)[k] is v for k, v in before.items())


# -- on a 4-bit model (lowrank.quantize) ----------------------------------------------------

@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby"])
def test_on_a_bf16_4bit_llama_adapters_compute_as_on_its_dense_twin(placement, parallel):
    """Adapters on a 4-bit bfloat16 Llama are made in bfloat16, also around a block of 4-bit layers
    (a quantized LlamaMLP has no floating parameter to go by: lora_base.float_dtype_and_device's
    `inner`; it made float32 adapters, which F.linear refused), and compute what they compute on
    the dense model whose weights are the 4-bit ones: the same outputs and adapter gradients, bit
    for bit (with 18 rows of x the 4-bit op is F.linear on the dequantized weight)."""
    model, dense = models.bf16_4bit_llama_and_dense_twin()
    for m in (model, dense):
        inject(m, AdapterConfig(placement=placement, parallel=parallel))
    models.randomize_adapters(model)
    models.copy_trainable(model, dense)  # the same adapters on the twin (nn.Linear's init drew other numbers there)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}
    ids = models.ids(seq=9)
    results = [models.outputs_and_grads(m, ids) for m in (model, dense)]
    (out_q, grads_q), (out_d, grads_d) = results
    assert torch.equal(out_q, out_d)
    assert grads_q.keys() == grads_d.keys() and len(grads_q) == 4 * len(EXPECTED["llama", placement]) * 2
    for name, grad in grads_q.items():
        assert grad.abs().sum() > 0 and torch.equal(grad, grads_d[name]), name


@pytest.mark.parametrize("parallel", [False, True])
def test_an_adapter_whose_input_has_another_dtype_casts_in_and_back(parallel):
    """A float32 model whose 4-bit layers compute in bfloat16: the adapter around one is made in
    bfloat16 and reads float32 activations; its input is cast to bfloat16 and its addition back
    to float32 (lowrank/tuners/base.py, Note: inputs in the adapter's dtype). Before, F.linear refused the mix."""
    from lowrank import NF4Config, quantize

    torch.manual_seed(0)
    holder = nn.Sequential(nn.Linear(64, 64))
    quantize(holder, NF4Config(compute_dtype=torch.bfloat16, skip=[]))
    inject(holder, AdapterConfig(targets="0", parallel=parallel, bottleneck_size=8, scaling=2.0))
    models.randomize_adapters(holder)
    ad = holder[0].adapters["default"]
    assert ad.down.weight.dtype == ad.up.weight.dtype == torch.bfloat16
    x = torch.randn(5, 64)
    fx = holder[0].base(x)
    assert fx.dtype == torch.float32
    src = (x if parallel else fx).to(torch.bfloat16)
    expected = fx + (2.0 * ad.up(nn.functional.relu(ad.down(src)))).float()  # the same ops: exact
    out = holder(x)
    assert out.dtype == torch.float32 and torch.equal(out, expected)


def test_a_parallel_adapter_reads_the_first_argument_by_name_too():
    # called with keywords, the adapter read the first tensor among them (here key, not query)
    mha = nn.MultiheadAttention(16, 2, batch_first=True)
    holder = nn.ModuleDict({"attn": mha})
    inject(holder, AdapterConfig(targets=nn.MultiheadAttention, parallel=True))
    models.randomize_adapters(holder)
    ad = holder["attn"].adapters["default"]
    q, k = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    out, _ = holder["attn"](key=k, query=q, value=k)
    assert torch.equal(out, holder["attn"](q, k, k)[0]) and torch.equal(out, mha(q, k, k)[0] + ad(q))


class _ListBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, *, xs):
        return self.lin(xs[0])


def test_a_sequential_adapter_does_not_need_the_input():
    # it looked for a tensor among the arguments anyway: StopIteration for a list keyword
    holder = nn.ModuleDict({"blk": _ListBlock()})
    x = torch.randn(2, 8)
    base = holder["blk"](xs=[x])
    inject(holder, AdapterConfig(targets="blk"))
    assert torch.equal(holder["blk"](xs=[x]), base)
    eject(holder)
    inject(holder, AdapterConfig(targets="blk", parallel=True))
    with pytest.raises(TypeError, match="a parallel bottleneck adapter reads its module's first argument, a floating "
                                        "tensor; _ListBlock got list"):
        holder["blk"](xs=[x])


def test_targets_that_do_not_give_hidden_states_are_refused():
    # a whole model (ModelOutput) at inject; a module found to return something else, at its call
    with pytest.raises(TypeError, match="cannot put a bottleneck adapter on 'model': a LlamaModel returns a ModelOutput"):
        inject(models.llama(), AdapterConfig(targets="model"))
    model = models.bert()
    inject(model, AdapterConfig(targets="encoder"))
    with pytest.raises(TypeError, match="a bottleneck adapter adds to its module's output tensor .* BertEncoder "
                                        "returned a BaseModelOutput"):
        model(models.ids())


def test_a_block_on_the_residual_stream_is_sized_by_it():
    # Qwen2-MoE's block ends with a 1-wide gate (Linear(32, 1)): the adapter was sized 1 -> the
    # parallel one added one number to every feature, the sequential one failed
    import transformers

    cfg = transformers.Qwen2MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                      shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    for parallel in (False, True):
        torch.manual_seed(0)
        model = transformers.Qwen2MoeForCausalLM(cfg)
        assert inject(model, AdapterConfig(parallel=parallel)) == ["model.layers.0.mlp"]
        ad = model.model.layers[0].mlp.adapters["default"]
        assert (ad.down.in_features, ad.up.out_features) == (32, 32)
        models.randomize_adapters(model)
        model(models.ids())
    layer = AdapterLayer(nn.Sequential(nn.Linear(32, 4), nn.Linear(4, 1)))  # sizes it cannot tell right
    layer.add("default", AdapterConfig(), (32, 8))
    layer.active = ("default",)
    with pytest.raises(ValueError, match="maps 8 -> 8 features .* but reads 1 and adds to 1"):
        layer(torch.randn(2, 32))


@pytest.mark.parametrize("before", [None, "lora-gate_up", "nf4-experts"])
def test_a_mixture_of_experts_block_is_sized_by_its_experts(before):
    """Mixtral's block holds a router and 3-D experts, no linear layer: the adapter maps the
    experts' hidden size to itself, with or without LoRA on an experts parameter first (whose
    factors, linear layers of other sizes, are not the block's) or the experts in 4 bits."""
    import lowrank

    model = models.mixtral()
    with pytest.raises(TypeError, match="cannot size a bottleneck adapter for 'model.layers.0.mlp.gate'"):
        inject(model, AdapterConfig(targets="model.layers.0.mlp.gate"))  # the router alone: a weight, no sizes
    if before == "lora-gate_up":
        inject(model, lowrank.LoraConfig(r=4, targets=None, parameters="experts.gate_up_proj"), "lora")
    if before == "nf4-experts":
        lowrank.quantize(model, lowrank.NF4Config(targets=None, parameters=["experts.gate_up_proj",
                                                                            "experts.down_proj"]))
    block = model.model.layers[0].mlp
    h = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = block(h)
    assert inject(model, AdapterConfig(targets="mlp")) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    ad = model.model.layers[0].mlp.adapters["default"]
    assert (ad.down.in_features, ad.up.out_features) == (32, 32)
    models.randomize_adapters(model)
    lowrank.set_active(model, ["default", "lora"] if before == "lora-gate_up" else "default")
    with torch.no_grad():
        got = model.model.layers[0].mlp(h)
    want = y + ad.up(ad.act(ad.down(y)))  # sequential, scaling 1
    assert (got - want).abs().max() <= 64 * torch.finfo(torch.float32).eps * want.abs().max()
    model(models.ids()).logits.sum().backward()
    assert ad.down.weight.grad is not None and ad.down.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ["phimoe", "gpt_oss"])
def test_other_mixture_of_experts_blocks_are_sized_by_their_experts(arch):
    """PhiMoE's router subclasses nn.Linear (32 -> 4 experts) but is no linear layer
    (targets.py, Note: routers): the block is sized 32 -> 32, not 32 -> 4; GPT-OSS keeps its experts
    (E, in, out) and a router: 32 -> 32, not the intermediate size."""
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                  num_local_experts=4, num_experts_per_tok=2)
    if arch == "phimoe":
        model = transformers.PhimoeForCausalLM(transformers.PhimoeConfig(intermediate_size=48, **common))
    else:
        model = transformers.GptOssForCausalLM(transformers.GptOssConfig(intermediate_size=64, head_dim=8,
                                                                         layer_types=["full_attention"], **common))
    with torch.no_grad():  # GPT-OSS starts some weights at zero, which would hide the adapter's gradient
        for p in model.parameters():
            p.normal_(std=0.1)
    assert inject(model, AdapterConfig(targets="mlp")) == ["model.layers.0.mlp"]
    ad = model.model.layers[0].mlp.adapters["default"]
    assert (ad.down.in_features, ad.up.out_features) == (32, 32)
    models.randomize_adapters(model)
    model(models.ids()).logits.sum().backward()  # runs: the adapter reads and adds 32 features
    assert ad.down.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("config_class, attention", [
    ("GPTNeoXConfig", "gpt_neox.layers.0.attention.dense"),
    ("FalconConfig", "transformer.h.0.self_attention.dense"),
    ("PhiConfig", "model.layers.0.self_attn.dense"),
    ("GPTJConfig", "transformer.h.0.attn.out_proj"),
])
def test_houlsby_finds_the_attention_output_of_more_architectures(config_class, attention):
    transformers = pytest.importorskip("transformers")
    sizes = {"GPTJConfig": dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4)}.get(
        config_class, dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4))
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_class)(vocab_size=64, **sizes))
    wrapped = inject(model, AdapterConfig(placement="houlsby"))
    assert attention in wrapped and len(wrapped) == 4  # attention output and feed-forward of both layers


def test_houlsby_on_a_model_without_its_attention_names_is_refused():
    """It would otherwise get Pfeiffer's feed-forward adapters alone, silently."""
    model = nn.Sequential()
    model.add_module("mlp", nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)))
    with pytest.raises(ValueError, match=r"placement='houlsby' adapts each block's attention output and feed-forward, "
                                         r"and none of its default names for the attention output "):
        inject(model, AdapterConfig(placement="houlsby"))
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert inject(model, AdapterConfig(placement="houlsby", targets=["mlp"])) == ["mlp"]
    half = nn.Sequential()  # the attention output's name and no feed-forward's (MPT's `ffn`, ALBERT's)
    half.add_module("attention", nn.Sequential())
    half.attention.add_module("dense", nn.Linear(8, 8))
    with pytest.raises(ValueError, match=r"none of its default names for the feed-forward \['mlp'"):
        inject(half, AdapterConfig(placement="houlsby"))


def test_houlsby_takes_a_multihead_attention_named_attn_not_its_out_proj():
    """open_clip's blocks: `attn` is an nn.MultiheadAttention, whose out_proj it reads by weight
    (an adapter there would never run); GPT-J's attn.out_proj is a linear layer it calls."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))

        def forward(self, x):
            x = x + self.attn(x, x, x, need_weights=False)[0]
            return x + self.mlp(x)

    model = nn.Sequential(Block(), Block())
    assert inject(model, AdapterConfig(placement="houlsby")) == ["0.attn", "0.mlp", "1.attn", "1.mlp"]

"""4-bit parameters (NF4Config.parameters): a transformers 5 MoE model's experts in NF4.

The oracle is the model's "dense twin": the same model with every 4-bit parameter replaced by
its dequantized tensor (in the compute dtype). The quantized model's forward dequantizes to
exactly that tensor and then runs the same code on it, so outputs, gradients and exports are
compared bit for bit. The codes themselves are bitsandbytes' (checked against it below).

These tests take the dense path (LOWRANK_EXPERTS=dense); the routed path, which computes each
routed expert from its codes, is checked against this one in test_experts4bit.py.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from torch import nn

import lowrank
from lowrank.quant.params4bit import Weight4bit

transformers = pytest.importorskip("transformers")

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
F32 = torch.float32


def mixtral(experts: str | None = None) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2)
    if experts is not None:
        cfg._experts_implementation = experts
    return transformers.MixtralForCausalLM(cfg).eval()


def gpt_oss() -> nn.Module:
    """Experts stored (E, in, out) (`is_transposed`), with biases that stay dense."""
    torch.manual_seed(0)
    cfg = transformers.GptOssConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                    num_experts_per_tok=2, head_dim=16, layer_types=["full_attention"] * 2)
    return transformers.GptOssForCausalLM(cfg).eval()


BUILDS = {"mixtral-eager": lambda: mixtral("eager"), "mixtral-grouped": lambda: mixtral(), "gpt_oss": gpt_oss}
CONFIG = lowrank.NF4Config(targets=["q_proj", "o_proj"], parameters=EXPERTS, compute_dtype=F32)


def quantized_and_twin(build, config=CONFIG):
    """(the model with 4-bit experts, its dense twin): the twin's linear layers quantized alike."""
    model, twin = build(), build()
    lowrank.quantize(model, config)
    if config.targets:  # (targets=None: the experts alone, the twin's linear layers stay as they are)
        lowrank.quantize(twin, lowrank.NF4Config(targets=config.targets, compute_dtype=config.compute_dtype))
    for name, m in model.named_modules():
        if isinstance(m, Weight4bit):
            owner, p = name.rsplit(".", 1)
            setattr(twin.get_submodule(owner), p, nn.Parameter(m.dense(m.dtype), requires_grad=False))  # its own dtype
    return model, twin


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(seed))


def randomized(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for k, p in model.named_parameters():
            if "lora_" in k:  # B = 0 at init would hide a wrong W'
                g = torch.Generator().manual_seed(zlib.crc32(k.encode()))  # on the CPU: the same draws on any device
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.fixture(autouse=True)
def dense_experts(monkeypatch):
    """The dense path: the one the twin is bit for bit (See Note: routed experts)."""
    monkeypatch.setenv("LOWRANK_EXPERTS", "dense")


@pytest.mark.parametrize("kind", list(BUILDS))
def test_experts_compute_as_their_dequantized_twin(kind):
    model, twin = quantized_and_twin(BUILDS[kind])
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts._modules["gate_up_proj"], Weight4bit)
    assert "gate_up_proj" not in experts._parameters and "down_proj" not in experts._parameters
    with torch.no_grad():
        got, want = model(ids()).logits, twin(ids()).logits
    assert torch.equal(got, want)
    assert "gate_up_proj" not in experts.__dict__ and "down_proj" not in experts.__dict__  # dense only during a call
    # and NF4 is NF4: the 4-bit model is near, not equal, to the full-precision one
    with torch.no_grad():
        dense = BUILDS[kind]()
        lowrank.quantize(dense, lowrank.NF4Config(targets=CONFIG.targets, compute_dtype=F32))
        full = dense(ids()).logits
    assert not torch.equal(got, full)
    assert torch.nn.functional.cosine_similarity(got.flatten(), full.flatten(), dim=0) > 0.95


def test_quantize_returns_and_leaves_what_is_already_4bit():
    model = mixtral()
    names = lowrank.quantize(model, CONFIG)
    assert names[-4:] == [f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj")]
    assert lowrank.quantize(model, lowrank.NF4Config(targets=["k_proj"], parameters=EXPERTS)) == \
        ["model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.k_proj"]  # the experts: already 4-bit
    with pytest.raises(ValueError, match="matched no parameter"):  # a typo still says so
        lowrank.quantize(model, lowrank.NF4Config(targets=["v_proj"], parameters="experts.gate_proj"))
    only = mixtral()  # parameters alone: the default targets may match nothing (a model of experts)
    assert lowrank.quantize(only.model.layers[0].mlp.experts, lowrank.NF4Config(parameters="gate_up_proj")) == \
        ["gate_up_proj"]


def test_codes_are_bitsandbytes():
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    model = mixtral()
    w = model.model.layers[1].mlp.experts.down_proj.detach().clone()  # (E, hidden, intermediate)
    lowrank.quantize(model, CONFIG)
    ours = {k.removeprefix("model.layers.1.mlp.experts.down_proj"): t for k, t in model.state_dict().items()
            if k.startswith("model.layers.1.mlp.experts.down_proj")}
    with torch._dynamo.config.patch(disable=True):  # bitsandbytes' CPU path may compile; eager is the same
        packed, state = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    theirs = state.as_dict(packed=True)
    assert torch.equal(ours[""].view(-1), packed.view(-1))
    for k in ("absmax", "nested_absmax", "quant_map", "nested_quant_map"):
        assert torch.equal(ours["." + k], theirs[k]), k


@pytest.mark.parametrize("kind", ["mixtral-eager", "gpt_oss"])
def test_lora_on_4bit_experts_equals_lora_on_the_twin(kind, tmp_path):
    model, twin = quantized_and_twin(BUILDS[kind])
    config = lowrank.LoraConfig(r=4, alpha=8, targets=["q_proj"], parameters=EXPERTS)
    for m in (model, twin):
        lowrank.inject(m, config)
        randomized(m).train()
    loss, want = model(ids(), labels=ids()).loss, twin(ids(), labels=ids()).loss
    assert torch.equal(loss, want)
    loss.backward()
    want.backward()
    ours = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
    theirs = {k: p.grad for k, p in twin.named_parameters() if p.requires_grad}
    assert ours.keys() == theirs.keys() and len(ours) == 2 * 2 * 2 + 2 * 2  # experts: 2 params x (A, B) a layer
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    # the adapter file is the twin's: PEFT's nested names for two parameters of one module
    lowrank.save_adapter(model, tmp_path / "q")
    lowrank.save_adapter(twin, tmp_path / "d")
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "q" / "adapter_model.safetensors"), load_file(tmp_path / "d" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight" in a


def test_activation_checkpointing_and_compile(one_thread, monkeypatch):
    monkeypatch.setenv("LOWRANK_EXPERTS", "routed")  # eager routes the experts; compiled, the dense path traces
    model, twin = quantized_and_twin(BUILDS["mixtral-eager"])
    for m in (model, twin):
        lowrank.inject(m, lowrank.LoraConfig(r=4, targets=None, parameters=EXPERTS))
        randomized(m).train()
    loss = model(ids(), labels=ids()).loss
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    again = model(ids(), labels=ids()).loss
    again.backward()  # the recomputed forward dequantizes again and puts W' in again
    assert torch.equal(again, loss)
    assert all(torch.equal(p.grad, grads[k]) for k, p in model.named_parameters() if p.grad is not None)
    model.gradient_checkpointing_disable()
    model.eval()
    from lowrank.quant import experts4bit

    routed, real = [], experts4bit.forward
    monkeypatch.setattr(experts4bit, "forward", lambda *a: routed.append(1) or real(*a))
    with torch.no_grad():
        eager = model(ids()).logits
        assert routed  # eager: routed
        routed.clear()
        compiled = torch.compile(model)(ids()).logits
        assert not routed  # traced: the dense path, one graph (the routed loop reads counts on the host)
        ref = twin.eval().double()(ids()).logits  # the same weights, float64 wherever they are dense
    # Inductor fuses and reorders float32 sums: as close to float64 as eager float32 is, within a few times
    tol = max(4 * (eager - ref).abs().max().item(), 64 * torch.finfo(F32).eps * ref.abs().max().item())
    assert (compiled - ref).abs().max().item() <= tol


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(2, 64, 64))
        self.scale = nn.Parameter(torch.ones(64))

    def forward(self, x):
        return x @ self.w[0] * self.scale


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 64)
        self.block = Block()

    def forward(self, x):
        return self.block(self.lin(x))


@pytest.mark.parametrize("params, change, match", [
    ("all-linear", None, "'all-linear' names modules"),
    ("nothing", None, r"matched no parameter.*'block.w'"),
    ("block.scale", None, "1-D parameter"),
    ("lin.weight", None, "of the linear layer 'lin'.*targets"),
    ("block.w", lambda m: setattr(m, "other", Block()) or setattr(m.other, "w", m.block.w), "tied"),
    ("block.w", lambda m: m.block.w.data.__setitem__((0, 0, 0), float("nan")), "non-finite"),
    ("block.w", lambda m: m.block.w.data.__setitem__((0, 0, 0), 1e37), "double_quant=False"),
    ("block.w", lambda m: m.block.__dict__.__setitem__("forward", lambda x: x), "forward set on the instance"),
    ("block.w", lambda m: m.block.double(), "float64"),
    ("block.w", lambda m: lowrank.inject(m, lowrank.LoraConfig(r=2, targets=None, parameters="block.w")),
     "quantize first"),
], ids=["all-linear", "nothing", "1-D", "linear", "tied", "nan", "overflow", "hooked", "float64", "adapters"])
def test_refusals_change_nothing(params, change, match):
    torch.manual_seed(0)
    model = Net()
    if change is not None:
        change(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((ValueError, TypeError), match=match):
        lowrank.quantize(model, lowrank.NF4Config(targets=["lin"], parameters=params))
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.allclose(before[k], after[k], rtol=0, atol=0, equal_nan=True) for k in before)
    assert not isinstance(model.lin, lowrank.Linear4bit)  # the layers were checked too, none replaced


def test_module_targets_never_take_a_4bit_parameter_for_a_module():
    """Qwen2-MoE's shared expert has a linear `down_proj`; its experts a 4-bit parameter of that
    name, which is a submodule only as storage: targets naming `down_proj` mean the linear layers."""
    torch.manual_seed(0)
    model = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        vocab_size=64, hidden_size=64, intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
        decoder_sparse_step=1, mlp_only_layers=[]))
    lowrank.quantize(model, lowrank.NF4Config(targets=["q_proj"], parameters=EXPERTS))
    assert lowrank.quantize(model, lowrank.NF4Config(targets=["down_proj"])) == ["model.layers.0.mlp.shared_expert.down_proj"]
    assert lowrank.inject(model, lowrank.LoraConfig(r=2, targets=["down_proj"])) == \
        ["model.layers.0.mlp.shared_expert.down_proj"]


@pytest.mark.parametrize("experts", ["eager", "batched_mm", "grouped_mm"])
@pytest.mark.parametrize("case", ["compute-bf16", "cast-after"])
def test_the_dense_tensor_takes_its_inputs_dtype(experts, case):
    """Note: the dtype of a 4-bit parameter. A float32 model whose linear layers compute in bf16,
    or a model cast to bf16 after quantize: transformers' eager and batched_mm experts take one
    dtype, so the experts are dequantized in their input's, and compute as the dense twin does."""
    build = lambda: mixtral(experts)  # noqa: E731
    compute = torch.bfloat16 if case == "compute-bf16" else F32
    model, twin = quantized_and_twin(build, lowrank.NF4Config(targets=CONFIG.targets, parameters=EXPERTS,
                                                              compute_dtype=compute))
    for m in (model, twin):  # LoRA factors in the compute dtype, as on a 4-bit linear layer: the twin's asked so
        lowrank.inject(m, lowrank.LoraConfig(r=4, targets=None, parameters=EXPERTS), dtype=compute)
        assert m.model.layers[0].mlp.experts.lora_A["default"].weight.dtype == compute
        randomized(m)
        if case == "cast-after":
            m.to(torch.bfloat16)
    with torch.no_grad():
        got, want = model(ids()).logits, twin(ids()).logits
    assert got.dtype == (F32 if case == "compute-bf16" else torch.bfloat16)
    assert torch.equal(got, want)


def test_experts_alone_and_what_names_them():
    """targets=None: the experts in 4 bits, the linear layers dense; the names a typo is shown are
    parameters, 4-bit ones by their own names, never their codes; PEFT's target_parameters in a
    saved file name the experts as for the dense model."""
    model = mixtral()
    names = lowrank.quantize(model, lowrank.NF4Config(targets=None, parameters=EXPERTS))
    assert all(".experts." in n for n in names) and isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)
    with pytest.raises(ValueError, match="targets is None and parameters names nothing"):
        lowrank.NF4Config(targets=None)
    with pytest.raises(ValueError, match=r"no parameter .* e\.g\. \[.*'model.layers.0.mlp.experts.gate_up_proj'") as e:
        lowrank.inject(model, lowrank.LoraConfig(r=2, targets=None, parameters="experts.gate_proj"))
    assert ".packed" not in str(e.value)
    lowrank.inject(model, lowrank.LoraConfig(r=2, targets=None, parameters=["layers.0.mlp.experts.down_proj"]))
    from lowrank.io_names import to_peft_parameters

    assert to_peft_parameters(model, ["model.layers.0.mlp.experts.down_proj"]) == ["model.layers.0.mlp.experts.down_proj"]
    counted = lowrank.summary(model)  # a 4-bit parameter counts by its elements, as a dense one
    assert counted.trainable == 2 * 4 * (96 + 64)  # r 2, 4 experts, A (r E, in 96) and B (out 64, r E)
    assert counted.total == lowrank.summary(mixtral()).total + counted.trainable


def test_dense_experts_are_freed_as_it_goes(monkeypatch):
    """When parameter k is quantized, parameters 0..k-1 have lost their last reference (as
    quantize frees linear layers: tests/quant/test_quantize.py)."""
    import weakref

    from lowrank.quant import nf4

    model = mixtral()
    refs = [weakref.ref(p) for n, p in model.named_parameters() if n.endswith(tuple(EXPERTS))]
    seen, real = [], nf4.quantize

    def spy(w, *args):
        seen.append([r() is not None for r in refs])
        return real(w, *args)

    monkeypatch.setattr(nf4, "quantize", spy)
    lowrank.quantize(model, lowrank.NF4Config(targets=None, parameters=EXPERTS))
    assert len(refs) == 4 and seen == [[k <= i for i in range(4)] for k in range(4)]
    assert all(r() is None for r in refs)


@pytest.mark.gpu
def test_on_the_gpu_in_bf16():
    """Quantized on the GPU where the experts are; bf16 activations, transformers' default
    (grouped_mm) experts: the dense twin's outputs and LoRA gradients, bit for bit."""
    build = lambda: mixtral().to("cuda", torch.bfloat16)  # noqa: E731
    model, twin = quantized_and_twin(build, lowrank.NF4Config(targets=CONFIG.targets, parameters=EXPERTS))
    assert model.model.layers[0].mlp.experts.gate_up_proj.packed.device.type == "cuda"
    for m in (model, twin):
        lowrank.inject(m, lowrank.LoraConfig(r=4, targets=None, parameters=EXPERTS))
        randomized(m).train()
    x = ids().cuda()
    loss, want = model(x, labels=x).loss, twin(x, labels=x).loss
    assert torch.equal(loss, want)
    loss.backward()
    want.backward()
    theirs = dict(twin.named_parameters())
    assert all(torch.equal(p.grad, theirs[k].grad) for k, p in model.named_parameters() if p.requires_grad)


def test_a_float64_copy_computes_as_its_twin():
    """`.double()` after quantize (a reference copy): NF4 decodes to float32 and the experts get
    float64 from it, as the twin's float32 experts cast to float64 do."""
    model, twin = quantized_and_twin(BUILDS["mixtral-eager"])
    model.double(), twin.double()
    with torch.no_grad():
        got = model(ids()).logits
        assert got.dtype == torch.float64 and torch.equal(got, twin(ids()).logits)


def test_quantizing_the_experts_alone_twice_is_a_no_op():
    model = mixtral()
    config = lowrank.NF4Config(targets=None, parameters=EXPERTS)
    assert len(lowrank.quantize(model, config)) == 4
    assert lowrank.quantize(model, config) == []  # already 4-bit: left as they are

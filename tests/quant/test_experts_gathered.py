"""Gathered 4-bit experts (lowrank/quant/experts4bit.py, Note: gathered experts): each (token,
slot) pair with its own gathered expert, no read on the host, so torch.compile traces it; and
what torch.compile traces where it does not take it (the dense path).

The oracles are those of test_experts4bit.py: the dense twin in float64, and the dense path's
own error against it; the gathered weights themselves are exact.
"""

from __future__ import annotations

import copy

import pytest
import torch

import lowrank
from lowrank.quant import experts4bit
from lowrank.quant.params4bit import Weight4bit

from .test_experts4bit import ROUTED, Spy, biased, within
from .test_params4bit import BUILDS, EXPERTS, F32, ids, quantized_and_twin, randomized

transformers = pytest.importorskip("transformers")


@pytest.fixture
def gathered(monkeypatch):
    monkeypatch.setenv("LOWRANK_EXPERTS", "gathered")


@pytest.mark.parametrize("kind", list(ROUTED))
def test_gathered_experts_compute_as_the_dense_ones_do(kind, gathered, monkeypatch):
    """Outputs within float32's error of the float64 twin, no whole dense experts tensor formed."""
    model, twin = quantized_and_twin(ROUTED[kind])
    biased(model, twin)
    dense_calls = Spy(monkeypatch, Weight4bit, "dense")
    forwards = Spy(monkeypatch, experts4bit, "gathered_forward")
    with torch.no_grad():
        got = model(ids()).logits
        assert forwards.calls and not dense_calls.calls
        ref = copy.deepcopy(twin).double()
        if hasattr(ref.config, "_experts_implementation"):
            ref.config._experts_implementation = "eager"
        want, dense = ref(ids()).logits, twin(ids()).logits
    assert within(got, dense, want)


def test_indices_that_name_no_expert_add_nothing(gathered, monkeypatch):
    forwards = Spy(monkeypatch, experts4bit, "gathered_forward")
    model, twin = quantized_and_twin(BUILDS["mixtral-eager"])
    experts, dense_experts = model.model.layers[0].mlp.experts, twin.model.layers[0].mlp.experts
    x, w = torch.randn(5, 64), torch.rand(5, 2)
    dropped = torch.tensor([[0, 4], [4, 4], [3, 4], [1, 2], [4, 0]])
    with torch.no_grad():
        got, want = experts(x, dropped, w), dense_experts(x, dropped, w)
        ref = copy.deepcopy(dense_experts).double()(x.double(), dropped, w.double())
    assert torch.equal(got[1], torch.zeros(64)) and within(got, want, ref)
    # a dropped pair's row never reaches the sum, nor a gradient, even where it overflows (a dropped
    # pair reads zeros: computed from the row, 0 * inf would make NaN gradients through the mask)
    lowrank.inject(model, lowrank.LoraConfig(r=4, targets=None, parameters=EXPERTS))
    randomized(model)
    experts = model.model.layers[0].mlp.experts  # with its LoRA layers
    x[1] = float("inf")
    x.requires_grad_()
    y = experts(x, dropped, w)
    assert torch.equal(y[1].detach(), torch.zeros(64))
    y[[0, 2, 3, 4]].sum().backward()
    grads = [x.grad] + [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert len(grads) > 1 and all(torch.isfinite(g).all() for g in grads) and len(forwards.calls) == 2


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_any_integer_index(dtype, gathered):
    """The router's indices in any integer dtype: the same as int64 (a uint8 index used as is
    would be a boolean mask)."""
    model, _ = quantized_and_twin(BUILDS["gpt_oss"])
    biased(model)
    lowrank.inject(model, lowrank.LoraConfig(r=4, targets=None, parameters=EXPERTS))
    randomized(model)
    experts = model.model.layers[0].mlp.experts
    x, index, w = torch.randn(4, 64), torch.tensor([[0, 1], [1, 2], [3, 0], [2, 3]]), torch.rand(4, 2)
    with torch.no_grad():
        assert torch.equal(experts(x, index.to(dtype), w), experts(x, index, w))


def test_backward_keeps_nothing_of_an_experts_size():
    """Under autograd lowrank::nf4_experts_linear keeps the stored codes themselves (its backward
    is the op again), so nothing new of one expert's size is saved; the dense path keeps the whole
    dense tensor (its experts' slices are views of it)."""
    model, _ = quantized_and_twin(BUILDS["mixtral-eager"])
    lowrank.inject(model, lowrank.LoraConfig(r=4, targets=None, parameters=EXPERTS))
    experts = model.model.layers[0].mlp.experts
    one = experts.base.base.gate_up_proj.shape[1:].numel() * 4  # bytes of one float32 expert
    x, index, w = torch.randn(1, 64, requires_grad=True), torch.tensor([[2, 0]]), torch.rand(1, 2)

    model_own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saw_codes = []

    def largest_saved(path: str) -> int:
        storages = {0: 0}  # the storages autograd keeps, other than the model's own, by address: their bytes

        def keep(t):
            at = t.untyped_storage().data_ptr()
            saw_codes.append(at in model_own and t.dtype == torch.uint8)
            if at not in model_own:
                storages[at] = t.untyped_storage().nbytes()
            return t

        with pytest.MonkeyPatch.context() as mp, torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            mp.setenv("LOWRANK_EXPERTS", path)
            experts(x, index, w).sum().backward()
        return max(storages.values())

    assert largest_saved("gathered") < one and any(saw_codes)  # the op's saved codes are seen, and are the model's
    assert largest_saved("dense") == 4 * one


def _decoding_block(adapters: bool):
    model, _ = quantized_and_twin(BUILDS["mixtral-grouped"])
    if adapters:
        lowrank.inject(model, lowrank.LoraConfig(r=4, targets=None, parameters=EXPERTS))
        randomized(model)
    return model.model.layers[0].mlp


@pytest.mark.parametrize("adapters", [False, True], ids=["plain", "lora"])
def test_compiled_decoding_gathers_the_routed_experts(adapters, monkeypatch):
    """Compiled (fullgraph, through the ops' fake kernels: aot_eager), a decoding step (1 token,
    top-2 of 4 experts) takes the gathered path and equals it eager, LoRA included; a step of 2
    tokens (4 pairs, as many as experts) traces the dense path, as before."""
    block = _decoding_block(adapters)
    forwards = Spy(monkeypatch, experts4bit, "gathered_forward")
    dense_calls = Spy(monkeypatch, Weight4bit, "dense")
    one, two = (torch.randn(1, n, 64, generator=torch.Generator().manual_seed(n)) for n in (1, 2))
    with torch.no_grad():
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("LOWRANK_EXPERTS", "gathered")
            want = block(one)
        traced = len(forwards.calls)
        torch._dynamo.reset()
        compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
        got = compiled(one)
        assert len(forwards.calls) > traced and not dense_calls.calls
        assert torch.allclose(got, want, rtol=0, atol=8 * torch.finfo(F32).eps * want.abs().max().item())
        compiled(two)
        assert dense_calls.calls
    torch._dynamo.reset()


def test_routed_under_compile_keeps_the_dense_path(monkeypatch):
    """LOWRANK_EXPERTS=routed: eager routes, compiled traces the dense path (the choice before
    the gathered path)."""
    block = _decoding_block(False)
    monkeypatch.setenv("LOWRANK_EXPERTS", "routed")
    forwards = Spy(monkeypatch, experts4bit, "gathered_forward")
    dense_calls = Spy(monkeypatch, Weight4bit, "dense")
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(block, backend="eager", fullgraph=True)(torch.randn(1, 1, 64))
    assert dense_calls.calls and not forwards.calls
    torch._dynamo.reset()


def test_export_and_unbacked_sizes_keep_the_dense_path(monkeypatch):
    """torch.export with a dynamic token count whose range reaches E pairs traces the dense path
    (a guard on T k < E would narrow the range it was asked to keep), as a size torch.compile
    leaves unbacked does; a static one-token export the gathered path, with the same output. Eight experts, top 2: T k < E holds for some of the
    exported range (2-64 tokens) and not others."""
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_local_experts=8,
                                     num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2,
                                     num_hidden_layers=1)
    torch.manual_seed(0)
    experts = transformers.MixtralForCausalLM(cfg).model.layers[0].mlp.experts
    lowrank.quantize(experts, lowrank.NF4Config(targets=None, parameters=["gate_up_proj", "down_proj"]))

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = experts

        def forward(self, x, index, w):
            return self.experts(x, index, w)

    x, index, w = torch.randn(3, 64), torch.tensor([[0, 7], [2, 3], [6, 2]]), torch.rand(3, 2)
    with torch.no_grad():
        want = experts(x, index, w)
    def ops_of(exported) -> set:
        return {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}

    tokens = torch.export.Dim("tokens", min=2, max=64)
    exported = torch.export.export(Wrap(), (x, index, w), dynamic_shapes=({0: tokens}, {0: tokens}, {0: tokens}))
    assert "lowrank.nf4_dequantize.default" in ops_of(exported) and "lowrank.nf4_experts_linear.default" not in ops_of(exported)
    with torch.no_grad():
        assert torch.allclose(exported.module()(x, index, w), want, atol=1e-5)
    one = (x[:1], index[:1], w[:1])  # a static one-token export: 2 pairs < 8 experts, gathered
    static = torch.export.export(Wrap(), one)
    assert "lowrank.nf4_experts_linear.default" in ops_of(static)
    with torch.no_grad():
        assert torch.allclose(static.module()(*one), want[:1], atol=1e-5)
    torch._dynamo.reset()
    xs, ixs, ws = x.clone(), index.clone(), w.clone()
    for t in (xs, ixs, ws):
        torch._dynamo.decorators.mark_unbacked(t, 0)
    forwards = Spy(monkeypatch, experts4bit, "gathered_forward")
    with torch.no_grad():
        got = torch.compile(Wrap(), backend="aot_eager", fullgraph=True)(xs, ixs, ws)
    assert torch.allclose(got, want, atol=1e-5) and not forwards.calls
    torch._dynamo.reset()


def test_compiled_in_one_graph_with_or_without_lora(monkeypatch):
    """Traced, the experts take the dense path in one graph (fullgraph), LoRA's updates included
    (they wait in the instance dict while compiling: Note: where LoRA's updates wait); an owner
    compiled alone under eager LoRA layers still adds their updates."""
    model, _ = quantized_and_twin(BUILDS["mixtral-grouped"])
    block = model.model.layers[0].mlp
    h = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(0))

    def dense_eager():
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("LOWRANK_EXPERTS", "dense")
            return block(h)

    torch._dynamo.reset()
    with torch.no_grad():
        assert torch.equal(torch.compile(block, backend="eager", fullgraph=True)(h), dense_eager())
    lowrank.inject(model, lowrank.LoraConfig(r=4, targets=None, parameters=EXPERTS))
    randomized(model)
    torch._dynamo.reset()
    with torch.no_grad():
        want = dense_eager()
        assert torch.equal(torch.compile(block, backend="eager", fullgraph=True)(h), want)
        block.experts.base.base.compile(backend="eager")  # in place, inside the two LoRA layers, which stay eager
        assert torch.equal(block(h), want)

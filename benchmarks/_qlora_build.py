"""Build the 4-bit Llama of bench_qlora's --llama7b mode one decoder layer at a time, so a 7B
model never exists densely anywhere:

    model = build(llama_config(), device, torch.bfloat16, quantize_layer)

The model is made on the meta device (no memory), then the embeddings, final norm and head are
materialised in bf16 on `device`, then each decoder layer in turn: its dense weights are made on
`device` and `quantize_layer(layer)` turns its linears into 4-bit ones right away. The peak while
building is therefore the 4-bit model plus one dense layer (about 0.4 GB for Llama-2-7B).

Weights are deterministic: each tensor is drawn from a generator seeded by its qualified name, so
two builds on the same device (lowrank's and PEFT + bitsandbytes') start from the same dense
weights, and the adapters can be given the same initial values (init_adapters).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from itertools import chain

import torch
from torch import nn

STD = 0.02  # Llama-2's initializer_range: every linear and embedding weight ~ N(0, 0.02^2)


def llama_config(layers: int = 32, hidden: int = 4096, intermediate: int = 11008, vocab: int = 32000):
    """Llama-2-7B's LlamaConfig (meta-llama/Llama-2-7b-hf's config.json), with the sizes overridable
    so the same code runs tiny on a CPU. Heads keep Llama-2's head dimension of 128."""
    import transformers

    heads = max(hidden // 128, 1)
    if hidden % heads:
        raise ValueError(f"hidden must be a multiple of 128 or below it; got {hidden}")
    return transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                    num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                                    rms_norm_eps=1e-5, max_position_embeddings=4096, tie_word_embeddings=False,
                                    use_cache=False)  # training: no KV cache


def seed(name: str) -> int:
    """A stable seed for a tensor name (crc32: the same in every process, unlike hash())."""
    return zlib.crc32(name.encode())


def init_tensor(name: str, shape: torch.Size, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # Note: norm gains are ones. RMSNorm weights start at 1 in every Llama; drawing them from
    # N(0, 0.02^2) too would shrink every normalised activation about 50-fold.
    if name.endswith("norm.weight"):
        return torch.ones(shape, device=device, dtype=dtype)
    g = torch.Generator(device=device).manual_seed(seed(name))
    return torch.empty(shape, device=device, dtype=dtype).normal_(0.0, STD, generator=g)


def materialise(root: nn.Module, prefix: str, device: torch.device, dtype: torch.dtype, skip: tuple = ()) -> None:
    """Replace every meta parameter of `root` (qualified name prefix + name, unless it starts
    with one of `skip`) with a real one on `device` in `dtype`, drawn by init_tensor."""
    for name, p in list(root.named_parameters()):
        full = prefix + name
        if p.device.type != "meta" or full.startswith(skip):
            continue
        owner, _, attr = name.rpartition(".")
        real = nn.Parameter(init_tensor(full, p.shape, device, dtype), requires_grad=p.requires_grad)
        setattr(root.get_submodule(owner), attr, real)


def build(config, device: torch.device, dtype: torch.dtype, quantize_layer: Callable[[nn.Module], object]) -> nn.Module:
    """A LlamaForCausalLM with deterministic weights on `device`, every decoder layer passed to
    quantize_layer as soon as it exists (see the module docstring); in training mode."""
    import transformers

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    materialise(model, "", device, dtype, skip=("model.layers.",))  # embeddings, final norm, head: stay dense
    for i, layer in enumerate(model.model.layers):
        materialise(layer, f"model.layers.{i}.", device, dtype)
        quantize_layer(layer)  # this layer's dense linears are dropped here
    # The rotary tables are buffers computed by the constructor, on meta above: compute them again.
    # (Built on the CPU and moved: transformers 5.17's constructor takes a device, 5.24's does not.)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config).to(device)
    left = [n for n, t in chain(model.named_parameters(), model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"build left tensors on the meta device: {left[:5]}")
    return model.train()


def peft_bnb_missing() -> str | None:
    """Why the peft+bitsandbytes provider cannot run here (the import error), or None. Without it
    the benchmarks still measure lowrank, with no ratio, rather than losing every row (a GPU
    machine whose bitsandbytes wheel was not carried: benchmarks/gpu_check.sh goes on without it)."""
    try:
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
    except ImportError as e:
        return f"{type(e).__name__}: {e}"
    return None


def bnb_quantize(model: nn.Module, compute_dtype: torch.dtype, device: torch.device) -> None:
    """Every linear layer but the head -> bitsandbytes Linear4bit (NF4, double quantization),
    quantized on `device`, the usual QLoRA base."""
    import bitsandbytes as bnb

    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear) and name != "lm_head":
            # made on meta: its own float32 weight and init would cost time and memory, and is replaced at once
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None, device="meta",
                                  compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, compress_statistics=True,
                                         quant_type="nf4")._quantize(device.type)
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
            setattr(model, name, q)
        else:
            bnb_quantize(child, compute_dtype, device)


@torch.no_grad()
def init_adapters(model: nn.Module, prefix: str = "") -> int:
    """The same starting adapter in lowrank and PEFT: B = 0 (the adapted model starts as the
    base, as LoRA's init does) and A ~ N(0, 1/in_features) from a generator seeded by the
    parameter's name in lowrank's spelling. Drawn in float32 and rounded to each side's adapter
    dtype. `prefix` is stripped from names first (PEFT's "base_model.model."). Returns how many
    tensors were set."""
    count = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = name.removeprefix(prefix).replace(".base_layer.", ".base.")  # PEFT's wrapped layer -> ours
        if ".lora_B." in key:
            p.zero_()
        elif ".lora_A." in key:
            g = torch.Generator(device=p.device).manual_seed(seed(key))
            a = torch.empty(p.shape, device=p.device, dtype=torch.float32)  # (r, in)
            p.copy_(a.normal_(0.0, p.shape[-1] ** -0.5, generator=g))
        else:
            raise ValueError(f"unexpected trainable parameter {name!r}: only LoRA's A and B should train")
        count += 1
    return count

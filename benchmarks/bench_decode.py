"""Decoding: a Llama's greedy decoding, one token at a time with its KV cache, with the decoder's
linear layers in 4 bits, lowrank (lowrank.quantize: nf4_linear's C++ or CUDA GEMV) against
bitsandbytes (Linear4bit in eval mode: on the CPU its CPU layout) and against the model in bf16,
in one run.

    python benchmarks/bench_decode.py                 # the CPU; hidden 2048, 8 layers: 0.4 B parameters
    python benchmarks/bench_decode.py --quick         # tiny shapes, a smoke run
    python benchmarks/bench_decode.py --device cuda --hidden 4096 --intermediate 14336 --layers 8   # a GPU run

What the kernel benchmark (bench_nf4_cpu.py) times one layer at a time, here the model does: W
comes from memory at every token (the decoder's 4-bit weights, ~200 MB, do not fit the CPU's caches),
and attention, norms and the output head (bf16 on every side, as QLoRA leaves it) take their
share. All three models hold the same weights, the two 4-bit ones the same codes. Before timing,
each 4-bit model's next-token logits after the prompt are compared with those of the bf16 model
whose weights are lowrank's dequantized ones (See Note: checked baselines in bench_nf4_cpu.py).
logits_err: that largest difference relative to the largest logit (for the bf16 row,
the effect of quantizing at all). Rows: ms a token (median and 20/80% quantiles over the repeats; a repeat decodes --tokens
tokens after a prefill, the providers taking turns), tokens/s, and the speed-up over bf16 and
over bitsandbytes (on CUDA each token synchronized, so host time counts as it does when decoding).
Writes --out (default benchmarks/results/decode.json) and a .md table.
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import _common  # noqa: E402

COLUMNS = ["provider", "ms", "p20", "p80", "tokens_per_s", "vs_bf16", "vs_bnb", "logits_err", "weights_mb"]


def build(args, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.hidden // 128 or 1, num_key_value_heads=args.hidden // 128 or 1,
                         vocab_size=args.vocab, max_position_embeddings=4096)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16).eval()


def to_bitsandbytes(model, device):
    """model's decoder linear layers as bitsandbytes' Linear4bit (NF4, blocksize 64, double
    quantization, bf16 compute): the QLoRA stack's inference model."""
    import bitsandbytes as bnb

    for parent in list(model.model.layers.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
                layer.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4", blocksize=64,
                                                 compress_statistics=True)
                setattr(parent, name, layer.to(device).eval())  # .to quantizes (from the CPU on CUDA)
    return model


def weights_mb(model) -> float:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 2**20


@torch.inference_mode()
def decode(model, prompt, tokens):
    """ms a token of greedy decoding `tokens` tokens after the prompt, and the prompt's logits."""
    import inspect

    from transformers import DynamicCache

    cache = DynamicCache()  # filled in place by each forward
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # transformers >= 5.2x
    first = model(input_ids=prompt, use_cache=True, **{key: cache}).logits[:, -1].float()
    token = first.argmax(-1, keepdim=True)
    sync = torch.cuda.synchronize if prompt.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(tokens):
        token = model(input_ids=token, use_cache=True, **{key: cache}).logits[:, -1].argmax(-1, keepdim=True)
        token.tolist()  # the next step needs the token: as generate does, each step waits for the last
    sync()
    return 1e3 * (time.perf_counter() - start) / tokens, first


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cpu (default) or cuda")
    parser.add_argument("--out", type=pathlib.Path, default=_common.RESULTS / "decode.json")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this PyTorch sees no CUDA device")
    device = torch.device(args.device)
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.vocab, args.tokens, args.repeats = 256, 512, 2, 512, 4, 2
    import lowrank
    from lowrank.quant import Linear4bit

    bf16 = build(args, device)
    ours = copy.deepcopy(bf16)
    lowrank.quantize(ours, lowrank.NF4Config())  # every linear layer but the output head
    # the bf16 model of the dequantized weights: what both 4-bit models should compute
    dense = copy.deepcopy(bf16)
    for name, m in ours.named_modules():
        if isinstance(m, Linear4bit):
            dense.get_submodule(name).weight.data.copy_(m.dequantize(torch.bfloat16))
    models = {"bf16": bf16, "lowrank": ours}
    try:
        models["bitsandbytes"] = to_bitsandbytes(copy.deepcopy(bf16), device)
    except ImportError:
        print("bench_decode: bitsandbytes is not installed: its row is left out")
    prompt = torch.randint(0, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1)).to(device)
    _, exact = decode(dense, prompt, 1)
    errors = {}
    for name, model in models.items():
        _, logits = decode(model, prompt, 1)  # also the warm-up
        errors[name] = ((logits - exact).abs().max() / exact.abs().max()).item()
        if name != "bf16" and not errors[name] < 2**-4:
            raise SystemExit(f"bench_decode: {name}'s logits differ from the dequantized model's by "
                             f"{errors[name]:.3g} of their largest: another model, not timed")
    times = {name: [] for name in models}
    for _ in range(args.repeats):  # the providers take turns, so a shared machine's drift hits each
        for name, model in models.items():
            times[name].append(decode(model, prompt, args.tokens)[0])
    stats = {name: _common.summarize(t) for name, t in times.items()}
    rows = [dict(provider=name, ms=s[0], p20=s[1], p80=s[2], tokens_per_s=1e3 / s[0], vs_bf16=stats["bf16"][0] / s[0],
                 vs_bnb=stats["bitsandbytes"][0] / s[0] if "bitsandbytes" in stats else None,
                 logits_err=errors[name], weights_mb=weights_mb(models[name])) for name, s in stats.items()]
    env = {**_common.environment(device), "threads": torch.get_num_threads(),
           "shape": dict(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers, vocab=args.vocab,
                         prompt=args.prompt, tokens=args.tokens)}
    table = _common.markdown(rows, COLUMNS)
    print(table)
    _common.write(args.out, rows, env, table)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])

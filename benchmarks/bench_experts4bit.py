"""One mixture-of-experts layer's 4-bit experts, routed and gathered against the dense path, in one run.

    python benchmarks/bench_experts4bit.py           # five shapes, from decoding to a long prompt
    python benchmarks/bench_experts4bit.py --quick   # two tiny shapes, a smoke run

A transformers Mixtral experts module (E experts, top k, hidden H, intermediate I) with its two
3-D parameters in NF4 (blocksize 64, double quantization), called on T tokens with random
routing. routed: each expert that got tokens computed from its own codes
(lowrank/quant/experts4bit.py, Note: routed experts); dense: LOWRANK_EXPERTS=dense, every
expert dequantized and transformers' grouped_mm experts forward run on the dense tensors;
gathered (where T k < E, the path torch.compile traces there: Note: gathered experts): the
T k (token, slot) pairs through lowrank::nf4_experts_linear, one call a parameter. --compile adds
the forward compiled (inductor), gathered against dense: what compiled decoding gets.
Cases: forward with no grad, and forward + backward with LoRA r=8 on both parameters. Rows: ms
(median, 20/80% quantiles), ratio = the path's / dense. The routed path makes a few op calls per
expert that got tokens; the dense path dequantizes all E experts: which costs more depends on
how many experts there are, how big, and how many tokens each gets.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common  # noqa: E402

from lowrank import LoraConfig, NF4Config, inject, quantize  # noqa: E402

SHAPES = [(8, 2, 1024, 3584, 1), (8, 2, 1024, 3584, 512), (128, 8, 512, 192, 1), (128, 8, 512, 192, 4),
          (128, 8, 512, 192, 1024), (128, 8, 128, 64, 1024)]  # (E, k, H, I, T): Mixtral- and Qwen3-MoE-like proportions, scaled down
QUICK = [(4, 2, 64, 128, 1), (4, 2, 64, 128, 16)]
COLUMNS = ["case", "shape", "path", "ms", "p20_ms", "p80_ms", "ratio"]
RTOL = {torch.float32: 1e-3, torch.bfloat16: 2**-4}  # _common.RTOL_STEP: float32 summation order, bf16 roundings


def check_paths(case: str, fn, paths, rtol: float) -> None:
    """Each path's fn() (a tuple of tensors) against the dense path's, before any is timed
    (_common, Note: check before timing): the paths must compute the same layer."""
    results = {p: _common.on_path(fn, p)() for p in paths}
    for p in paths:
        for i, (got, ref) in enumerate(zip(results[p], results["dense"], strict=True)):
            _common.check_close(f"{case}: the {p} path's result {i} against the dense path's", got, ref, rtol)


def fwd_bwd_results(experts, x, index, weights) -> tuple:
    """(output, x's gradient, each adapter gradient) of one forward + backward of output.sum(); the
    adapters' gradients are cleared after."""
    xg = x.detach().clone().requires_grad_()
    y = experts(xg, index, weights)
    y.sum().backward()
    grads = [p.grad.clone() for p in experts.parameters() if p.requires_grad]
    experts.zero_grad(set_to_none=True)
    return (y.detach(), xg.grad, *grads)


def experts_module(e: int, k: int, h: int, i: int) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=h, intermediate_size=i, num_local_experts=e,
                                     num_experts_per_tok=k,
                                     num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=1)
    block = transformers.MixtralForCausalLM(cfg).model.layers[0].mlp  # the experts module and its router
    quantize(block, NF4Config(targets=None, parameters=["experts.gate_up_proj", "experts.down_proj"]))
    return block


def compiled(experts, x, index, weights, device, quick: bool) -> tuple:
    """The no-grad forward compiled anew (inductor) under the LOWRANK_EXPERTS of the call: where
    T k < E the default traces the gathered path, LOWRANK_EXPERTS=dense the dense one."""
    torch._dynamo.reset()
    fn = torch.compile(experts, fullgraph=True)

    def forward():
        with torch.no_grad():
            fn(x, index, weights)

    forward()  # compiles
    return _common.bench(forward, device, quick)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke run)")
    parser.add_argument("--compile", action="store_true",
                        help="also the no-grad forward compiled (inductor) where T k < E: gathered against dense")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "experts4bit.json")
    args = parser.parse_args(argv)
    if "LOWRANK_EXPERTS" in os.environ:
        parser.error("unset LOWRANK_EXPERTS: the benchmark sets it for each path")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for e, k, h, i, t in QUICK if args.quick else SHAPES:
        block = experts_module(e, k, h, i).to(device)
        experts = block.experts
        g = torch.Generator().manual_seed(t)
        x = torch.randn(t, h, generator=g).to(device, dtype)
        weights, index = torch.topk(torch.randn(t, e, generator=g).softmax(-1), k)
        weights, index = weights.to(device, dtype), index.to(device)

        def forward_result():
            with torch.no_grad():
                return experts(x, index, weights)

        def forward():
            forward_result()

        shape = f"E{e} top{k} H{h} I{i} T{t} {str(dtype)[6:]}"
        paths = ("routed", "gathered", "dense") if t * k < e else ("routed", "dense")  # gathered: T k experts dense
        check_paths(f"forward {shape}", lambda: (forward_result(),), paths, RTOL[dtype])
        timed = {p: _common.on_path(lambda: _common.bench(forward, device, args.quick), p)() for p in paths}
        cases = [("forward", timed)]
        if args.compile and t * k < e:
            cases.append(("compiled_forward", {p: _common.on_path(lambda: compiled(experts, x, index, weights, device,
                                                                                   args.quick), p)()
                                               for p in ("gathered", "dense")}))
        inject(block, LoraConfig(r=8, targets=None, parameters=["experts.gate_up_proj", "experts.down_proj"]))
        experts, xg = block.experts, x.clone().requires_grad_()
        check_paths(f"lora_fwd_bwd {shape}", lambda: fwd_bwd_results(experts, x, index, weights), paths, RTOL[dtype])

        def train():
            experts(xg, index, weights).sum().backward()

        cases.append(("lora_fwd_bwd", {p: _common.on_path(lambda: _common.bench(train, device, args.quick), p)()
                                       for p in paths}))
        for case, times in cases:
            rows += [{"case": case, "shape": shape, "path": p, "ms": ms, "p20_ms": p20, "p80_ms": p80,
                      "ratio": ms / times["dense"][0]} for p, (ms, p20, p80) in times.items()]
    _common.report(args.out, rows, COLUMNS, device)
    return rows


if __name__ == "__main__":
    main()

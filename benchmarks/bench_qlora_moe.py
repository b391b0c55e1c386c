"""QLoRA on a mixture-of-experts model: lowrank with the experts in 4 bits too
(NF4Config.parameters), against PEFT + bitsandbytes, whose 4-bit layers are linear layers only
(a transformers 5 MoE model's experts are 3-D parameters, so they stay in the compute dtype),
and lowrank on that same base (experts dense), in one run.

    python benchmarks/bench_qlora_moe.py           # a Mixtral of hidden 256, 4 layers, 8 experts top 2, 4 x 128
    python benchmarks/bench_qlora_moe.py --quick   # tiny shapes, a smoke run
    python benchmarks/bench_qlora_moe.py --experts 32 --top-k 4   # more, smaller shares of the experts

Every provider: the attention projections in NF4 (double quantization, blocksize 64), LoRA r=16
on them and on the experts' two 3-D parameters (LoraConfig.parameters, PEFT's
target_parameters), the same adapter weights, activation checkpointing, AdamW. Device: CUDA when
present (bf16 compute, peak memory of a step), else the CPU (float32; no peak). Rows: the
model's bytes as stored (parameters and buffers, shared ones once), one step's median and 20/80
quantiles in ms, ratio = provider / peft+bitsandbytes (None where peft or bitsandbytes does not import:
that provider is left out), the first step's loss. lowrank-dense-experts
and peft+bitsandbytes hold the same model (their losses agree up to float rounding);
lowrank-4bit-experts differs from them by the experts' NF4 rounding. lowrank-4bit-experts computes
each routed expert from its codes (lowrank/quant/experts4bit.py, Note: routed experts);
lowrank-4bit-dense-path is the same model with LOWRANK_EXPERTS=dense, every expert dequantized
each call. A second case times decoding: one token through the model, no grad (the experts a
token is routed to are top-k of E); --compile-decode adds it compiled for the 4-bit experts model,
which traces the gathered path there (Note: gathered experts), and for its dense path. Steps
alternate, so a shared machine's drift hits every provider.
"""

from __future__ import annotations

import argparse
import copy
import sys
import zlib
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common  # noqa: E402
from _qlora_build import bnb_quantize, peft_bnb_missing  # noqa: E402
from bench_qlora import peak_memory, step_fn  # noqa: E402
from bench_tuners import alternate, mixtral  # noqa: E402

from lowrank import LoraConfig, NF4Config, inject, quantize  # noqa: E402

FULL = dict(hidden=256, layers=4, batch=4, seq=128, reps=8)
QUICK = dict(hidden=64, layers=1, batch=1, seq=16, reps=2)  # attention rows of 64: whole blocks (bench_qlora Note)
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
COLUMNS = ["case", "shape", "provider", "model_mib", "ms", "p20_ms", "p80_ms", "ratio", "first_loss", "peak_mib"]


def stored_mib(model: nn.Module) -> float:
    """Bytes of the model's parameters and buffers as stored (4-bit codes as bytes), each tensor once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total / 2**20


def decode_fn(model: nn.Module, token: torch.Tensor):
    """One token through the model, no grad: a decoding step without its cache."""
    def call():
        with torch.no_grad():
            model(input_ids=token)
    return call


def ours(base: nn.Module, dtype: torch.dtype, four_bit_experts: bool) -> nn.Module:
    model = copy.deepcopy(base)
    quantize(model, NF4Config(compute_dtype=dtype, parameters=EXPERTS if four_bit_experts else None))
    inject(model, LoraConfig(r=16, alpha=32, targets=ATTENTION, parameters=EXPERTS))
    return model


def theirs(base: nn.Module, dtype: torch.dtype, device: torch.device) -> nn.Module:
    import peft

    model = copy.deepcopy(base)
    bnb_quantize(model, dtype, device)
    model.to(device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=ATTENTION,
                                                      target_parameters=EXPERTS), autocast_adapter_dtype=False)


@torch.no_grad()
def same_adapters(models: dict[str, nn.Module]) -> None:
    """Every LoRA tensor drawn from a generator seeded by its name in PEFT's spelling (B too, so
    the experts' update is not zero), rounded to each side's dtype."""
    for model in models.values():
        for name, p in model.named_parameters():
            if "lora_" in name:
                key = name.removeprefix("base_model.model.").replace(".default", "").replace(".base.", ".base_layer.")
                g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repetitions (a smoke run)")
    parser.add_argument("--experts", type=int, default=8, help="experts a layer (default 8)")
    parser.add_argument("--top-k", type=int, default=2, help="experts a token is routed to (default 2)")
    parser.add_argument("--compile-decode", action="store_true",
                        help="also decode with the 4-bit experts model compiled (torch.compile, inductor): its gathered "
                             "path, and the dense path (LOWRANK_EXPERTS=dense) compiled")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "qlora_moe.json")
    args = parser.parse_args(argv)
    if args.experts < 1 or not 1 <= args.top_k <= args.experts:  # else torch.topk's "selected index k out of range"
        parser.error(f"--experts must be >= 1 and --top-k in [1, --experts]; got --experts {args.experts}, "
                     f"--top-k {args.top_k}")
    shape = QUICK if args.quick else FULL
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = mixtral(shape["hidden"], shape["layers"], args.experts, args.top_k).to(dtype).train()
    ids = torch.randint(0, 1024, (shape["batch"], shape["seq"]), generator=torch.Generator().manual_seed(0)).to(device)
    models = {"lowrank-4bit-experts": ours(base.to(device), dtype, True),
              "lowrank-4bit-dense-path": ours(base.to(device), dtype, True),
              "lowrank-dense-experts": ours(base.to(device), dtype, False)}
    missing = peft_bnb_missing()  # then lowrank's providers alone, no ratio
    if missing:
        print(f"bench_qlora_moe: peft+bitsandbytes left out ({missing}); no ratio", flush=True)
    else:
        models["peft+bitsandbytes"] = theirs(base.cpu(), dtype, device)
    del base
    for name, model in models.items():
        if name.startswith("lowrank"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    same_adapters(models)
    # before timing: each pair holds the same model (_common, Note: a model's output and its adapters' gradients)
    pairs = [("lowrank-4bit-experts", "lowrank-4bit-dense-path")] + ([] if missing else [("lowrank-dense-experts",
                                                                                       "peft+bitsandbytes")])
    _common.check_same_model("qlora_moe_train_step", models, ids, pairs, _common.RTOL_STEP[dtype],
                             call=lambda name, fn: _common.on_path(fn, "dense")() if name.endswith("dense-path") else fn())
    sizes = {name: stored_mib(m) for name, m in models.items()}
    losses = {name: [] for name in models}
    fns = {name: step_fn(m, ids, losses[name]) for name, m in models.items()}
    decode = {name: decode_fn(m, ids[:1, :1]) for name, m in models.items()}
    if args.compile_decode:  # compiled by the first (warm-up) call, under the LOWRANK_EXPERTS of that call
        for name in ("lowrank-4bit-experts", "lowrank-4bit-dense-path"):
            decode[f"{name} compiled"] = decode_fn(torch.compile(models[name]), ids[:1, :1])
        decode["lowrank-4bit-dense-path compiled"] = _common.on_path(decode["lowrank-4bit-dense-path compiled"], "dense")
    for group in (fns, decode):
        group["lowrank-4bit-dense-path"] = _common.on_path(group["lowrank-4bit-dense-path"], "dense")
    del models  # the steps hold them
    peaks = {name: peak_memory(device, fn) for name, fn in fns.items()}  # also each one's warm-up step
    times = alternate(fns, shape["reps"])
    decode_peaks = {name: peak_memory(device, fn) for name, fn in decode.items()}
    decode_times = alternate(decode, 4 * shape["reps"])
    moe = f"mixtral h{shape['hidden']} L{shape['layers']} E{args.experts} top{args.top_k}"
    rows = []
    for case, shape_name, timed, peak in (
            ("qlora_moe_train_step", f"{moe} b{shape['batch']}x{shape['seq']} {str(dtype)[6:]}, checkpointing", times,
             peaks),
            ("qlora_moe_decode_token", f"{moe} b1x1 {str(dtype)[6:]}, no grad", decode_times, decode_peaks)):
        rows += [{"case": case, "shape": shape_name, "provider": name, "ms": ms, "p20_ms": p20, "p80_ms": p80,
                  "model_mib": sizes[name.removesuffix(" compiled")], "ratio": ms / timed["peft+bitsandbytes"][0] if not missing else None,
                  "first_loss": losses[name][0] if case.endswith("step") else None, "peak_mib": peak[name]}
                 for name, (ms, p20, p80) in timed.items()]
    table = _common.markdown(rows, COLUMNS)
    env = _common.environment(device)
    _common.write(args.out, rows, env, table)
    print(f"{env}\n\n{table}\n\nwrote {args.out} (+ .md)")
    return rows


if __name__ == "__main__":
    main()

"""A QLoRA training step: lowrank (quantize + inject, the lowrank::nf4_linear op) against PEFT
on bitsandbytes' Linear4bit (the usual QLoRA stack), on the same model with the same 4-bit
codes and the same adapter weights, in one run.

    python benchmarks/bench_qlora.py            # a Llama of hidden 512, 4 layers, batch 4 x 128
    python benchmarks/bench_qlora.py --quick    # tiny shapes, a smoke run

Device: CUDA when present (bf16 compute, peak memory per provider from
torch.cuda.max_memory_allocated), else the CPU (float32 compute). Rows: median and 20/80
quantiles of one step (forward + backward + AdamW) in ms, ratio = lowrank / peft+bitsandbytes
(goal < 1), and the step's loss (equal codes and weights: the two losses agree up to float
rounding, a check that both sides compute the same model). Measurements alternate step by
step, so a shared machine's drift hits both.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common  # noqa: E402
from bench_tuners import TARGETS, alternate, llama  # noqa: E402

from lowrank import LoraConfig, NF4Config, inject, quantize  # noqa: E402

FULL = dict(hidden=512, layers=4, batch=4, seq=128, reps=10)
QUICK = dict(hidden=256, layers=1, batch=1, seq=16, reps=3)  # rows of 256 and 704: whole 64-blocks (see Note)


# Note: whole blocks per row. bitsandbytes 0.50's CPU dequantize reads the scales per row,
# which is wrong when a row's length is not a multiple of the blocksize (docs/nf4.md); both
# shapes here keep every row (hidden, 11/4 hidden) a multiple of 64, so both sides compute
# the same model.
def bnb_quantize(model: nn.Module, compute_dtype: torch.dtype, device: torch.device) -> None:
    """Every linear layer but the head -> bitsandbytes Linear4bit (NF4, double quantization)."""
    import bitsandbytes as bnb

    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear) and name != "lm_head":
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, compress_statistics=True,
                                         quant_type="nf4")._quantize(device.type)
            setattr(model, name, q)
        else:
            bnb_quantize(child, compute_dtype, device)


def step_fn(model, ids, losses: list):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())

    return step


def peak_memory(device: torch.device, fn) -> float | None:
    """Peak CUDA memory (MiB) of one call of fn; None on the CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repetitions (a smoke run)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "qlora.json")
    args = parser.parse_args(argv)
    import peft

    shape = QUICK if args.quick else FULL
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = llama(shape["hidden"], shape["layers"]).train()
    ids = torch.randint(0, 1024, (shape["batch"], shape["seq"]), generator=torch.Generator().manual_seed(0)).to(device)

    ours = copy.deepcopy(base).to(device)
    quantize(ours, NF4Config(compute_dtype=dtype))
    inject(ours, LoraConfig(r=16, alpha=32, targets=TARGETS))
    theirs = copy.deepcopy(base)
    bnb_quantize(theirs, dtype, device)
    theirs = theirs.to(device)
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    theirs_params = dict(theirs.base_model.model.named_parameters())
    with torch.no_grad():  # the same adapter weights in both
        for name, p in ours.named_parameters():
            if p.requires_grad:
                theirs_params[name.replace(".base.", ".base_layer.")].copy_(p)

    losses = {"lowrank": [], "peft+bitsandbytes": []}
    fns = {"lowrank": step_fn(ours, ids, losses["lowrank"]),
           "peft+bitsandbytes": step_fn(theirs, ids, losses["peft+bitsandbytes"])}
    peaks = {name: peak_memory(device, fn) for name, fn in fns.items()}  # also the warm-up step
    times = alternate(fns, shape["reps"])
    shape_name = f"llama h{shape['hidden']} L{shape['layers']} b{shape['batch']}x{shape['seq']} {str(dtype)[6:]}"
    rows = []
    for provider, (ms, p20, p80) in times.items():
        rows.append({"case": "qlora_train_step", "shape": shape_name, "provider": provider, "ms": ms, "p20_ms": p20,
                     "p80_ms": p80, "ratio": ms / times["peft+bitsandbytes"][0], "first_loss": losses[provider][0],
                     "peak_mib": peaks[provider]})
    table = _common.markdown(rows, ["case", "shape", "provider", "ms", "p20_ms", "p80_ms", "ratio", "first_loss",
                                    "peak_mib"])
    env = _common.environment(device)
    _common.write(args.out, rows, env, table)
    print(f"{env}\n\n{table}\n\nwrote {args.out} (+ .md)")
    return rows


if __name__ == "__main__":
    main()

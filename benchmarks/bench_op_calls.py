"""What one call of a 4-bit linear layer costs the CPU: a layer so small (128 x 128, one row of
bf16 x) that its kernels take a few microseconds, so the times are the Python, dispatcher and
autograd work around them, which a training step of a large model pays for every linear on
every forward and backward while the GPU waits (docs/benchmarks.md, "a QLoRA step of the
Llama-2-7B shape").

    python benchmarks/bench_op_calls.py            # 7 rounds of 2000 calls a provider and case
    python benchmarks/bench_op_calls.py --quick    # 3 rounds of 200
    python benchmarks/bench_op_calls.py --device cuda   # the same layers on the GPU (a GPU run)
    python benchmarks/bench_op_calls.py --dropout 0.1   # the LoRA layers with dropout, training

On CUDA the kernels of a call take a few microseconds of GPU time while launching them takes
longer, so back-to-back calls are bound by the CPU: each round ends with a synchronize, and the
time a call is what a training step pays a linear for its Python, dispatch and launches.

Providers: a bf16 nn.Linear, its weight frozen like the 4-bit ones (the baseline: ratio = its
time / the provider's, > 1 is faster), lowrank's Linear4bit (the lowrank::nf4_linear op) and
bitsandbytes' Linear4bit when importable; with LoRA (r 16) around each: lowrank's LoraLinear, and
PEFT's when importable. Cases: forward without grad, forward with x requiring grad, forward +
backward, all in training mode (QLoRA's); and inference: the layers without LoRA in eval mode,
forward under no_grad, as a decoding step calls them (bitsandbytes' eval path). us a call: median (20th-80th percentile) over rounds, each round the mean of
back-to-back calls; providers alternate round by round, so a drift of the machine hits all.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common  # noqa: E402

from lowrank import LoraConfig, NF4Config, inject, quantize  # noqa: E402

COLUMNS = ["case", "provider", "us", "p20_us", "p80_us", "ratio"]
FEATURES, RANK = 128, 16


def providers(lora: bool, device: torch.device, dropout: float = 0.0) -> dict[str, nn.Module]:
    """name -> a one-layer nn.Sequential on `device`, every one from the same bf16 weight, frozen
    (with LoRA: in training mode, for the adapters' dropout)."""
    torch.manual_seed(0)
    # Note: a frozen baseline. The 4-bit layers' weights are frozen (QLoRA's base); an nn.Linear's
    # weight trains by default, and its backward would also form and accumulate a weight gradient
    # (on this CPU 76 against 53 us a forward + backward): frozen, every provider does the same work.
    dense = nn.Sequential(nn.Linear(FEATURES, FEATURES, bias=False)).to(device, torch.bfloat16).requires_grad_(False)
    ours = copy.deepcopy(dense)
    quantize(ours, NF4Config(compute_dtype=torch.bfloat16))
    out = {"bf16 nn.Linear": dense, "lowrank Linear4bit": ours}
    try:
        import bitsandbytes as bnb

        theirs = nn.Sequential(bnb.nn.Linear4bit(FEATURES, FEATURES, bias=False, compute_dtype=torch.bfloat16,
                                                 compress_statistics=True, quant_type="nf4"))
        theirs[0].weight = bnb.nn.Params4bit(dense[0].weight.data.float().clone(), requires_grad=False,
                                             compress_statistics=True, quant_type="nf4")._quantize(device.type)
        out["bitsandbytes Linear4bit"] = theirs.to(device)
    except ImportError:
        pass
    if not lora:
        return out
    wrapped = {}
    for name, model in out.items():
        if not name.startswith("bitsandbytes"):
            inject(model, LoraConfig(r=RANK, alpha=2 * RANK, dropout=dropout, targets=["0"]))
            wrapped["lowrank LoRA on " + name.removeprefix("lowrank ")] = model.to(device).train()
            continue
        try:
            import peft
        except ImportError:
            continue
        # PEFT's adapters stay float32, its default (and bench_qlora's)
        config = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=dropout, target_modules=["0"])
        wrapped["PEFT LoRA on " + name] = peft.get_peft_model(model, config).to(device).train()
    return wrapped


def check_outputs(models: dict[str, nn.Module], x: torch.Tensor) -> None:
    """Every provider's output against lowrank's 4-bit one's before timing (_common, Note: check
    before timing): the 4-bit providers hold the same codes (bf16 roundings: 2^-4 allowed), the
    bf16 layers the weight before NF4's rounding (~0.08 here: 0.2 allowed). LoRA starts with B = 0,
    so the adapted layers compute their base's product too."""
    with torch.no_grad():
        outs = {name: model(x) for name, model in models.items()}
    ref_name = next(name for name in outs if name.startswith("lowrank") and name.endswith("Linear4bit"))
    for name, out in outs.items():
        rtol = 0.2 if name.endswith("bf16 nn.Linear") else 2**-4
        _common.check_close(f"{name}'s output against {ref_name}'s", out, outs[ref_name], rtol)


def call(model: nn.Module, case: str, x: torch.Tensor):
    """One call of `case` (main runs the no-grad case under torch.no_grad)."""
    if case == "forward, no grad":
        return lambda: model(x)
    xg = x.clone().requires_grad_()
    if case == "forward, x requires grad":
        return lambda: model(xg)

    def step():
        model(xg).sum().backward()

    return step


def measure(fns: dict, calls: int, rounds: int, device: torch.device) -> dict[str, tuple[float, float, float]]:
    """name -> (median, p20, p80) us a call; providers alternate round by round."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in fns.values():
        for _ in range(calls // 10 + 1):  # warm-up
            fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            times[name].append(1e6 * (time.perf_counter() - start) / calls)
    return {name: _common.summarize(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of 200 calls")
    parser.add_argument("--out", type=Path, default=_common.RESULTS / "op_calls.json")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cpu (default) or cuda")
    parser.add_argument("--dropout", type=float, default=0.0, help="the LoRA layers' dropout (default 0)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.device == "cuda" and not torch.cuda.is_available():  # else an AssertionError deep in the first .to()
        parser.error("--device cuda: this PyTorch sees no CUDA device")
    device = torch.device(args.device)
    calls, rounds = (200, 3) if args.quick else (2000, 7)
    x = torch.randn(1, 1, FEATURES, generator=torch.Generator().manual_seed(1)).to(device, torch.bfloat16)
    rows = []
    for lora in (False, True):
        models = providers(lora, device, args.dropout)
        check_outputs(models, x)
        for case in ("forward, no grad", "forward, x requires grad", "forward + backward"):
            fns = {name: call(m, case, x) for name, m in models.items()}
            with torch.set_grad_enabled(case != "forward, no grad"):
                result = measure(fns, calls, rounds, device)
            label = (f" (LoRA, dropout {args.dropout:g})" if args.dropout else " (LoRA)") if lora else ""
            rows += table_rows(case + label, result)
    # Note: inference rows. The rows above time the layers as QLoRA trains them (training mode);
    # decoding calls them in eval mode under no_grad, where bitsandbytes takes another path (on
    # a CPU with AVX512-BF16 its first such forward repacks the weight for its inference kernel,
    # and the weight stays so): fresh layers, checked in that mode before timing.
    models = {name: model.eval() for name, model in providers(False, device).items()}
    check_outputs(models, x)
    with torch.no_grad():
        result = measure({name: call(m, "forward, no grad", x) for name, m in models.items()}, calls, rounds, device)
    rows += table_rows(INFERENCE, result)
    _common.report(args.out, rows, COLUMNS, device)
    return rows


INFERENCE = "inference: forward, no grad, eval mode"  # the decoding rows' case (Note: inference rows)


def table_rows(case: str, result: dict[str, tuple[float, float, float]]) -> list[dict]:
    """One row a provider; ratio: the first provider's (the baseline's) time / the provider's."""
    base = next(iter(result.values()))[0]
    return [{"case": case, "provider": name, "us": us, "p20_us": p20, "p80_us": p80, "ratio": base / us}
            for name, (us, p20, p80) in result.items()]


if __name__ == "__main__":
    main()

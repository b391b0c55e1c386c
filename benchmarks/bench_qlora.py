"""A QLoRA training step: lowrank (quantize + inject, the lowrank::nf4_linear op) against PEFT
on bitsandbytes' Linear4bit (the usual QLoRA stack), on the same model with the same 4-bit
codes and the same adapter weights, in one run.

    python benchmarks/bench_qlora.py            # a Llama of hidden 512, 4 layers, batch 4 x 128
    python benchmarks/bench_qlora.py --quick    # tiny shapes, a smoke run
    python benchmarks/bench_qlora.py --llama7b  # Llama-2-7B, batch 1 x 2048, checkpointing (a GPU run)
    python benchmarks/bench_qlora.py --llama7b --layers 2 --hidden 128 --intermediate 384 --vocab 512 --seq 64
    python benchmarks/bench_qlora.py --llama7b --compile   # each decoder layer torch.compiled, both sides
    python benchmarks/bench_qlora.py --llama7b --dropout 0.1   # LoRA dropout on both sides (the QLoRA recipes')
    python benchmarks/bench_qlora.py --llama7b --adapter-dtype compute   # both sides' adapters bf16 (like for like)

Device: CUDA when present (bf16 compute, peak memory per provider from
torch.cuda.max_memory_allocated), else the CPU (float32 compute). Rows: median and 20/80
quantiles of one step (forward + backward + AdamW) in ms, ratio = lowrank / peft+bitsandbytes
(goal < 1), and the step's loss (equal codes and weights: the two losses agree up to float
rounding, a check that both sides compute the same model). Measurements alternate step by
step, so a shared machine's drift hits both.

--compile: torch.compile each decoder layer of both models (lowrank.workflow.model.compile_blocks,
the `lowrank train` option `compile: true`) before the warm-up step, which then includes the
compilation; rows say "compiled". See Note: compile the blocks, not the model.

--llama7b (issue 8): Llama-2-7B's shape, sequence 2048, batch 1, LoRA r=16 on all seven
projections, activation checkpointing, bf16 compute on any device. Each provider is built
(_qlora_build: meta device, then one decoder layer at a time, quantized at once), measured and
freed before the other, so two models never share the GPU. Rows add the model's memory after
quantize + inject, the peak of a training step (max over the warm-up step and the timed steps),
tokens/s and its ratio, host_ms (the time to queue a step up to reading its loss: on a GPU the
CPU's share; close to ms means the step waits on the CPU), the build time; the JSON is rewritten
after each provider, and every step prints a line, so a run cut short still leaves output.

--adapter-dtype (with --llama7b): "defaults" (each library's own: lowrank's adapters in the
compute dtype, bf16; PEFT's float32, its autocast_adapter_dtype=True), "compute" (both bf16:
PEFT with autocast_adapter_dtype=False) or "float32" (both float32: lowrank's
inject(..., dtype=torch.float32)). The rows' shape says which, past "defaults".
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import sys
import time
import traceback
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common  # noqa: E402
from _qlora_build import bnb_quantize, build, init_adapters, llama_config, peft_bnb_missing  # noqa: E402
from bench_tuners import TARGETS, alternate, llama  # noqa: E402

from lowrank import LoraConfig, NF4Config, inject, quantize  # noqa: E402
from lowrank.workflow.model import compile_blocks  # noqa: E402

FULL = dict(hidden=512, layers=4, batch=4, seq=128, reps=10)
QUICK = dict(hidden=256, layers=1, batch=1, seq=16, reps=3)  # rows of 256 and 704: whole 64-blocks (see Note)
LLAMA7B = dict(layers=32, hidden=4096, intermediate=11008, vocab=32000, batch=1, seq=2048, reps=5)
ADAPTER_DTYPES = ("defaults", "compute", "float32")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COLUMNS = ["case", "shape", "provider", "ms", "p20_ms", "p80_ms", "ratio", "first_loss", "peak_mib"]
COLUMNS_7B = ["case", "shape", "provider", "ms", "p20_ms", "p80_ms", "host_ms", "ratio", "tokens_per_s", "tokens_ratio",
              "first_loss", "last_loss", "model_mib", "peak_mib", "build_s"]

# Note: whole blocks per row. bitsandbytes 0.50's CPU dequantize reads the scales per row,
# which is wrong when a row's length is not a multiple of the blocksize (docs/nf4.md); the
# shapes here keep every row (hidden, intermediate) a multiple of 64 (Llama-2-7B's 4096 and
# 11008 are), so both sides compute the same model. A tiny --llama7b run on the CPU should too.


def compiled_suffix(args) -> str:
    """What the shape column adds for --compile (and its mode)."""
    if args.compile is None:
        return ""
    return " compiled" + (f" ({args.compile['mode']})" if "mode" in args.compile else "")


def dropout_suffix(args) -> str:
    """What the shape column adds for --dropout."""
    return f" dropout {args.dropout:g}" if args.dropout else ""


def step_fn(model, ids, losses: list, host: list | None = None):
    """One training step; `host` gets the seconds it took to queue it, up to reading the loss (on a
    GPU: the CPU's share of the step; when it is close to the step's time, the step waits on the
    CPU, not on the kernels)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if host is not None:
            host.append(time.perf_counter() - start)
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


def small(args, device: torch.device) -> tuple[list[dict], str]:
    """Both providers on one small model at once, steps alternating; float32 on the CPU. Without
    peft or bitsandbytes, lowrank alone (ratio None)."""
    missing = peft_bnb_missing()
    shape = QUICK if args.quick else FULL
    reps = args.reps or shape["reps"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = llama(shape["hidden"], shape["layers"]).train()
    ids = torch.randint(0, 1024, (shape["batch"], shape["seq"]), generator=torch.Generator().manual_seed(0)).to(device)

    ours = copy.deepcopy(base).to(device)
    quantize(ours, NF4Config(compute_dtype=dtype))
    inject(ours, LoraConfig(r=16, alpha=32, dropout=args.dropout, targets=TARGETS))
    models = {"lowrank": ours}
    if missing:
        print(f"bench_qlora: peft+bitsandbytes left out ({missing}); lowrank alone, no ratio", flush=True)
    else:
        import peft

        theirs = copy.deepcopy(base)
        bnb_quantize(theirs, dtype, device)
        theirs = theirs.to(device)
        theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=args.dropout,
                                                             target_modules=TARGETS))
        theirs_params = dict(theirs.base_model.model.named_parameters())
        with torch.no_grad():  # the same adapter weights in both
            for name, p in ours.named_parameters():
                if p.requires_grad:
                    theirs_params[name.replace(".base.", ".base_layer.")].copy_(p)
        models["peft+bitsandbytes"] = theirs
        # before compiling and timing: the same model on both sides (_common, Note: a model's output
        # and its adapters' gradients); the first losses alone would not show a wrong layer
        _common.check_same_model("qlora_train_step", models, ids, [("lowrank", "peft+bitsandbytes")],
                                 _common.RTOL_STEP[dtype])

    for model in models.values():
        if args.compile is not None:
            compile_blocks(model, **args.compile)  # a PeftModel too: its blocks are the Llama's
    losses = {name: [] for name in models}
    fns = {name: step_fn(model, ids, losses[name]) for name, model in models.items()}
    peaks = {name: peak_memory(device, fn) for name, fn in fns.items()}  # also the warm-up step
    times = alternate(fns, reps)
    shape_name = f"llama h{shape['hidden']} L{shape['layers']} b{shape['batch']}x{shape['seq']} {str(dtype)[6:]}"
    shape_name += compiled_suffix(args) + dropout_suffix(args)
    rows = []
    for provider, (ms, p20, p80) in times.items():
        rows.append({"case": "qlora_train_step", "shape": shape_name, "provider": provider, "ms": ms, "p20_ms": p20,
                     "p80_ms": p80, "ratio": ms / times["peft+bitsandbytes"][0] if not missing else None, "first_loss": losses[provider][0],
                     "peak_mib": peaks[provider]})
    return rows, _common.markdown(rows, COLUMNS)


# -- --llama7b: one provider at a time ----------------------------------------------------------
def build_lowrank(config, device: torch.device, dtype: torch.dtype, dropout: float = 0.0,
                  adapter_dtype: str = "defaults") -> nn.Module:
    model = build(config, device, dtype, lambda layer: quantize(layer, NF4Config(compute_dtype=dtype)))
    inject(model, LoraConfig(r=16, alpha=32, dropout=dropout, targets=TARGETS),
           dtype=torch.float32 if adapter_dtype == "float32" else None)
    init_adapters(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def build_peft(config, device: torch.device, dtype: torch.dtype, dropout: float = 0.0,
               adapter_dtype: str = "defaults") -> nn.Module:
    import peft

    model = build(config, device, dtype, lambda layer: bnb_quantize(layer, dtype, device))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # Note: no prepare_model_for_kbit_training. It would cast the norms, embeddings and head to
    # float32 (more memory, other speed); both sides keep them bf16 instead. PEFT keeps its own
    # default for the adapters (float32 weights, autocast_adapter_dtype=True) unless
    # adapter_dtype is "compute"; lowrank's take the base's compute dtype (bf16) unless it is
    # "float32". Same start values either way (init_adapters).
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout,
                                                       target_modules=TARGETS),
                                autocast_adapter_dtype=adapter_dtype != "compute")
    init_adapters(model, prefix="base_model.model.")
    return model


def timed(device: torch.device, fn) -> float:
    """Wall-clock seconds of fn(), the GPU's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def mib(device: torch.device, counter) -> float | None:
    return counter() / 2**20 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def profile_step(provider: str, step, device: torch.device) -> None:
    """One more step under torch.profiler: how long the GPU was busy (the kernels' own time, added
    up) against the step's wall time, and the ops that kept it busy. A step whose kernels add up
    to much less than its wall time waits on the CPU (Python, launches), not on the GPU."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        seconds = timed(device, step)
    events = prof.key_averages()
    # the kernels' own events only: an op's row repeats the device time of the kernels it launched
    busy_ms = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / 1e3
    print(f"{provider}: profiled step {1e3 * seconds:.1f} ms wall (under the profiler), kernels {busy_ms:.1f} ms", flush=True)
    print(events.table(sort_by="self_device_time_total" if device.type == "cuda" else "self_cpu_time_total",
                       row_limit=14, max_name_column_width=60), flush=True)


def measure(provider: str, make, config, ids: torch.Tensor, reps: int, device: torch.device,
            profiled: bool = False, compile_options: dict | None = None) -> dict:
    """Build one provider's model, run 1 warm-up + `reps` timed steps. Peak memory: the max of
    torch.cuda.max_memory_allocated over the warm-up step and over the timed steps. The model is
    freed when this returns (or raises): nothing outside holds it."""
    before = mib(device, torch.cuda.memory_allocated)
    reset_peak(device)
    start = time.perf_counter()
    model = make(config, device, torch.bfloat16)
    if compile_options is not None:
        compile_blocks(model, **compile_options)  # lowrank's model or a PeftModel: the same blocks
    if device.type == "cuda":
        torch.cuda.synchronize()
    build_s = time.perf_counter() - start
    model_mib = mib(device, torch.cuda.memory_allocated)
    memory = "" if model_mib is None else (f", model {model_mib:.0f} MiB (before the build {before:.0f}, build peak "
                                           f"{mib(device, torch.cuda.max_memory_allocated):.0f})")
    print(f"{provider}: built in {build_s:.1f} s{memory}", flush=True)
    losses: list[float] = []
    host: list[float] = []
    step = step_fn(model, ids, losses, host)
    del model  # the step's closure holds the model and its optimizer from here

    def run(label: str) -> float:
        seconds = timed(device, step)
        print(f"{provider}: {label} {1e3 * seconds:.1f} ms, loss {losses[-1]:.4f}", flush=True)
        return seconds

    reset_peak(device)
    torch.manual_seed(0)  # --dropout's random numbers: the same each run (and the same count on both sides)
    run("warm-up")
    peaks = [mib(device, torch.cuda.max_memory_allocated)]
    reset_peak(device)
    times = [run(f"step {i + 1}/{reps}") for i in range(reps)]
    peaks.append(mib(device, torch.cuda.max_memory_allocated))
    if profiled:
        profile_step(provider, step, device)
    ms, p20, p80 = _common.summarize([1e3 * t for t in times])
    host_ms = _common.summarize([1e3 * t for t in host[1:1 + reps]])[0]  # the timed steps' (not warm-up, profile)
    return {"ms": ms, "p20_ms": p20, "p80_ms": p80, "host_ms": host_ms, "tokens_per_s": ids.numel() / (ms / 1e3),
            "first_loss": losses[0], "last_loss": losses[-1], "model_mib": model_mib,
            "peak_mib": None if None in peaks else max(peaks), "build_s": build_s}


def llama7b(args, device: torch.device, env: dict) -> tuple[list[dict], str]:
    sizes = {k: getattr(args, k, None) or v for k, v in LLAMA7B.items()}  # batch is always 1
    config = llama_config(sizes["layers"], sizes["hidden"], sizes["intermediate"], sizes["vocab"])
    ids = torch.randint(0, sizes["vocab"], (sizes["batch"], sizes["seq"]), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)  # the same tokens for both providers
    shape_name = (f"llama-2-7b h{sizes['hidden']} i{sizes['intermediate']} L{sizes['layers']} v{sizes['vocab']} "
                  f"b{sizes['batch']}x{sizes['seq']} bf16 r16 ckpt") + compiled_suffix(args) + dropout_suffix(args)
    if args.adapter_dtype != "defaults":
        shape_name += f" adapters {'bf16' if args.adapter_dtype == 'compute' else 'float32'}"
    results: dict[str, dict] = {}
    for provider, make in (("lowrank", build_lowrank), ("peft+bitsandbytes", build_peft)):
        # Note: one failure does not end the run. The GPU run is made once; if one provider
        # fails (out of memory, a kernel error), the other is still measured, and the row says why.
        try:
            make = functools.partial(make, dropout=args.dropout, adapter_dtype=args.adapter_dtype)
            results[provider] = measure(provider, make, config, ids, args.reps or sizes["reps"], device, args.profile,
                                        args.compile)
        except Exception as e:  # noqa: BLE001 - reported in the row and on stderr, never swallowed
            traceback.print_exc()
            results[provider] = {"error": f"{type(e).__name__}: {e}"[:300]}
        gc.collect()  # the model went with measure's frame (or the exception, now cleared)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        ref = results.get("peft+bitsandbytes", {})
        rows = [{"case": "qlora_train_step", "shape": shape_name, "provider": name, **r,
                 "ratio": r["ms"] / ref["ms"] if "ms" in r and "ms" in ref else None,
                 "tokens_ratio": r["tokens_per_s"] / ref["tokens_per_s"] if "ms" in r and "ms" in ref else None}
                for name, r in results.items()]
        columns = COLUMNS_7B + (["error"] if any("error" in r for r in rows) else [])
        table = _common.markdown(rows, columns)
        _common.write(args.out, rows, env, table)  # after each provider: a run cut short keeps what finished
    return rows, table


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repetitions (a smoke run)")
    parser.add_argument("--llama7b", action="store_true", help="Llama-2-7B, batch 1 x 2048, one provider at a time")
    for size in ("layers", "hidden", "intermediate", "vocab", "seq"):
        parser.add_argument(f"--{size}", type=int, help=f"with --llama7b: override {size} (default {LLAMA7B[size]})")
    parser.add_argument("--reps", type=int, help="timed steps per provider (default: 5 with --llama7b)")
    parser.add_argument("--profile", action="store_true",
                        help="with --llama7b: one more step per provider under torch.profiler (GPU busy time, top ops)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each decoder layer of both models (the warm-up step compiles)")
    parser.add_argument("--compile-mode", choices=COMPILE_MODES,
                        help="with --compile: torch.compile's mode (default: its default)")
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="LoRA dropout on both sides (default 0; the QLoRA recipes use 0.05-0.1)")
    parser.add_argument("--adapter-dtype", choices=ADAPTER_DTYPES, default="defaults",
                        help="with --llama7b: the adapters' dtype, each library's default (lowrank bf16, PEFT float32), "
                        "both the compute dtype, or both float32")
    parser.add_argument("--out", type=Path, help="JSON rows (+ .md); default results/qlora.json, "
                        "results/qlora_llama7b.json with --llama7b")
    args = parser.parse_args(argv)
    if args.compile_mode and not args.compile:
        parser.error("--compile-mode applies with --compile")
    args.compile = None if not args.compile else {"mode": args.compile_mode} if args.compile_mode else {}
    overrides = [s for s in ("layers", "hidden", "intermediate", "vocab", "seq") if getattr(args, s) is not None]
    if overrides and not args.llama7b:
        parser.error(f"--{', --'.join(overrides)} only apply with --llama7b")
    if any(v is not None and v < 1 for v in [args.reps] + [getattr(args, s) for s in overrides]):
        parser.error("sizes and --reps must be positive integers")
    if args.adapter_dtype != "defaults" and not args.llama7b:
        parser.error("--adapter-dtype applies with --llama7b")
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.out is None:
        name = ("qlora_llama7b" if args.llama7b else "qlora") + ("" if args.compile is None else "_compiled")
        args.out = Path(__file__).parent / "results" / f"{name}.json"

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = _common.environment(device)
    rows, table = llama7b(args, device, env) if args.llama7b else small(args, device)
    _common.write(args.out, rows, env, table)
    print(f"{env}\n\n{table}\n\nwrote {args.out} (+ .md)")
    return rows


if __name__ == "__main__":
    sys.exit(1 if any("error" in row for row in main()) else 0)

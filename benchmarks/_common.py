"""Shared benchmark helpers: timing with quantiles, the environment row, and output
(JSON rows, a markdown table, a PNG plot) under one results folder."""

from __future__ import annotations

import datetime
import json
import logging
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable

import torch

log = logging.getLogger("benchmarks")
RESULTS = pathlib.Path(__file__).parent / "results"
QUANTILES = (0.5, 0.2, 0.8)  # median, then the 20% and 80% quantiles


def bench(fn: Callable[[], object], device: torch.device, quick: bool = False) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of fn(). On CUDA: triton.testing.do_bench (CUDA
    events, the L2 cache flushed before every call, so a weight is read from HBM as in a
    real forward). On CPU: wall-clock time over a few calls."""
    if device.type == "cuda":
        import triton.testing

        return tuple(triton.testing.do_bench(fn, warmup=25, rep=60, quantiles=list(QUANTILES)))
    fn()  # warm-up (and compilation)
    times = []
    for _ in range(3 if quick else 10):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return summarize(times)


# Note: kernel time. bench times a CUDA call between two CUDA events, so a call whose host side
# (Python, a launcher, the dispatcher) takes longer than its kernels is timed at the host's pace:
# the GPU waits between the events. kernel_ms adds up the durations the profiler records for the
# call's kernels instead, the L2 cache flushed before each call as bench does. The two side by side
# say which side sets a provider's pace (the Triton ops at 4096x4096 took 0.06-0.35 ms under
# bench on the H200, 3-20x bf16's 0.018, at shapes where their kernels should take ~0.02).
FLUSH_BYTES = 256 * 1024 * 1024  # what triton.testing.do_bench clears before each call


def kernel_ms(fn: Callable[[], object], device: torch.device, calls: int = 20) -> float | None:
    """Milliseconds a call that fn's own CUDA kernels run, from torch.profiler (See Note: kernel
    time); None off CUDA. The flush's kernels are told apart by their names, taken from a flush
    profiled alone, so a kernel of fn's with the same name (an int32 fill) is not counted."""
    if device.type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cache = torch.empty(FLUSH_BYTES // 4, dtype=torch.int, device=device)

    def kernels(work: Callable[[], object]) -> dict[str, float]:
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:  # as profile_step (bench_qlora)
            work()
            torch.cuda.synchronize()
        return {e.key: e.self_device_time_total for e in prof.key_averages() if e.device_type == DeviceType.CUDA}

    def calls_flushed() -> None:
        for _ in range(calls):
            cache.zero_()
            fn()

    fn()  # warm-up: compilation, autotuning
    flush = set(kernels(cache.zero_))
    return sum(us for name, us in kernels(calls_flushed).items() if name not in flush) / calls / 1e3


def on_path(fn: Callable[[], object], path: str) -> Callable[[], object]:
    """fn with LOWRANK_EXPERTS=path while it runs, the variable as it was after (lowrank/quant/
    experts4bit.py, Note: routed experts)."""
    def call():
        before = os.environ.get("LOWRANK_EXPERTS")
        os.environ["LOWRANK_EXPERTS"] = path
        try:
            return fn()
        finally:
            os.environ.pop("LOWRANK_EXPERTS") if before is None else os.environ.__setitem__("LOWRANK_EXPERTS", before)
    return call


def summarize(times_ms: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80) of a list of times."""
    if len(times_ms) == 1:
        return times_ms[0], times_ms[0], times_ms[0]
    q = statistics.quantiles(times_ms, n=10, method="inclusive")  # deciles: q[1] = 20%, q[7] = 80%
    return statistics.median(times_ms), q[1], q[7]


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def environment(device: torch.device) -> dict:
    """What produced the numbers: device, versions, date."""

    def version(module: str) -> str | None:
        try:
            return __import__(module).__version__
        except ImportError:
            return None

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    env = {"device": name, "python": platform.python_version(), "torch": torch.__version__}
    env |= {m: version(m) for m in ("triton", "bitsandbytes", "torchao", "peft", "transformers")}
    return env | {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def markdown(rows: list[dict], columns: list[str]) -> str:
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write(path: pathlib.Path, rows: list[dict], env: dict, table: str) -> None:
    """path (JSON: env + rows) and the same name with .md (the table under a header)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = ", ".join(f"{k} {v}" for k, v in env.items() if v is not None)
    for target, text in ((path, json.dumps({"env": env, "rows": rows}, indent=1)),
                         (path.with_suffix(".md"), f"# {path.stem}\n\n{header}\n\n{table}\n")):  # fmt: skip
        tmp = target.with_suffix(target.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(target)  # atomic: a reader never sees half a file


def report(path: pathlib.Path, rows: list[dict], columns: list[str], device: torch.device) -> None:
    """Print the environment and the table, and write both (write)."""
    env = environment(device)
    table = markdown(rows, columns)
    print(env, table, sep="\n\n")
    write(path, rows, env, table)
    print(f"wrote {path} (+ .md)")


def matplotlib_pyplot():
    """pyplot with a file backend, or None (the plot is skipped) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no PNG plot")
        return None
    return plt


# Note: check before timing. A peer called with the wrong layout or arguments still returns a
# tensor of the right shape, fast (bitsandbytes 0.50's CPU gemv_4bit on a weight not converted for
# it: relative error ~1.5), and a table would publish its time. Each benchmark compares a
# provider's result with a reference once, before timing it, and a provider that computes
# something else is not timed.
class WrongResult(AssertionError):
    """A provider's result differs from its reference: its time would not measure the same work."""


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| in float64, on got's device (inf where ref is zero and got is not)."""
    got, ref = got.detach().double(), ref.detach().to(got.device).double()
    diff, size = (got - ref).norm().item(), ref.norm().item()
    return diff / size if size else (0.0 if diff == 0 else float("inf"))


def check_close(what: str, got: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
    """WrongResult, saying what differed and by how much, unless got has ref's shape and is within
    a relative error of rtol of it (NaN fails)."""
    if tuple(got.shape) != tuple(ref.shape):
        raise WrongResult(f"{what}: result of shape {tuple(got.shape)}, the reference's is {tuple(ref.shape)}; not timed")
    err = relative_error(got, ref)
    if not err <= rtol:
        raise WrongResult(f"{what} differs from its reference: relative error {err:.3g} (allowed {rtol:.3g}); not timed")


# Note: a model's output and its adapters' gradients. Whole-model steps (bench_tuners, bench_qlora,
# bench_qlora_moe) compare their providers' logits and adapter gradients before timing: a model of
# random weights gives a loss near log(vocab) whatever its layers compute (a 1-layer Llama with
# one projection's output permuted: loss 6.934 against 6.939, logits off by 1.3 relative), and
# with LoRA's B = 0 the loss says nothing of the adapters, whose gradient it still has.
RTOL_STEP = {torch.float32: 1e-3, torch.bfloat16: 2**-4}  # float32: summation order; bf16: a few 2^-8 roundings


def adapter_key(name: str) -> str:
    """A trainable parameter's name in lowrank's spelling (PEFT's model prefix and base_layer)."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".base.")


def outputs(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(logits, the trainable parameters' gradients in adapter_key order, concatenated, and those
    keys) of one forward + backward of the language-model loss on ids, dropout off; the gradients
    are cleared after, nothing else changes."""
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.training]
    for m in dropouts:
        m.eval()
    try:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    finally:
        for m in dropouts:
            m.train()
    grads = sorted((adapter_key(n), p.grad) for n, p in model.named_parameters() if p.requires_grad)
    model.zero_grad(set_to_none=True)
    if not grads or any(g is None for _, g in grads):
        raise WrongResult(f"no gradient for {[n for n, g in grads if g is None] or 'any parameter'}")
    return (out.logits.detach().float().cpu(), torch.cat([g.detach().float().flatten().cpu() for _, g in grads]),
            [n for n, _ in grads])


def check_same_model(case: str, models: dict, ids: torch.Tensor, pairs: list[tuple[str, str]], rtol: float,
                     call=lambda name, fn: fn()) -> None:
    """WrongResult unless each pair of models gives the same logits and adapter gradients on ids
    (Note: a model's output and its adapters' gradients); call(name, fn) runs a model's pass (for a
    provider that needs a setting around it)."""
    results = {name: call(name, lambda m=models[name]: outputs(m, ids)) for name in {n for p in pairs for n in p}}
    for a, b in pairs:
        if results[a][2] != results[b][2]:
            raise WrongResult(f"{case}: {a} and {b} train other parameters: "
                              f"{sorted(set(results[a][2]) ^ set(results[b][2]))[:4]}")
        for i, what in enumerate(("logits", "adapter gradients")):
            check_close(f"{case}: {a}'s {what} against {b}'s", results[a][i], results[b][i], rtol)

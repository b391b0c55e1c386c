"""Benchmark nf4_linear (forward and grad_x) and nf4_dequantize: providers side by side in one run.

    python benchmarks/bench_nf4_linear.py            # CUDA: Llama-3-8B shapes x M in {1, 16, 64, 256, 4096}
    python benchmarks/bench_nf4_linear.py --quick    # tiny shapes; runs on CPU (Triton in its interpreter)
    python benchmarks/bench_nf4_linear.py --shapes 4096x4096 --ms 1,16 --kernel-time   # + kernels alone (profiler)

Providers: bf16 F.linear (the baseline), lowrank with each backend that runs here, and the
peers when importable: bitsandbytes (matmul_4bit: on CUDA gemv_4bit at M = 1; on the CPU
without grad its gemm_4bit op, bitsandbytes 0.50; dequantize_4bit) and torchao's NF4Tensor (linear_nf4, get_original_weight); for dequantize
also a device-to-device copy, the bandwidth ceiling. Every row: median and 20/80% quantile
times, TFLOP/s, GB/s (packed weight + scales + activations in and out), and the time ratio
to the baseline measured in the same run. Writes --out (default benchmarks/results/
nf4_linear.json) and the same name with .md and .png.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from anywhere without installing lowrank

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import _common  # noqa: E402

log = logging.getLogger("benchmarks")
LLAMA = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]  # (N, K): q/o, k/v, gate/up, down
MS = [1, 16, 64, 256, 4096]
QUICK = dict(shapes=[(128, 128), (48, 512)], ms=[1, 16, 64], grad_m=64)
FULL = dict(shapes=LLAMA, ms=MS, grad_m=4096)
DTYPE = torch.bfloat16
COLUMNS = ["op", "N", "K", "M", "provider", "ms", "p20", "p80", "tflops", "gbps", "speedup"]
KERNEL_TIME = False  # --kernel-time: each row also gets kernel_ms (_common.kernel_ms, Note: kernel time)
MAX_M = 64  # lowrank/ops/triton_gemv.py MAX_M: up to here the Triton backend runs its GEMV with SKINNY, whatever FUSED says
# Checked before timing (_common, Note: check before timing), relative error allowed: a product
# against x @ W^T in float32 of the provider's own dequantized W (its bf16 output: a few roundings
# of 2^-8, ~2e-3 measured); a dequantized W against the dense w (NF4's rounding of normal weights:
# ~0.09). A wrong layout or scale gives ~1.
RTOL = {"linear": 2**-6, "grad_x": 2**-6, "dequantize": 0.2}


@contextlib.contextmanager
def forced_backend(name: str):
    old = os.environ.get("LOWRANK_BACKEND")
    os.environ["LOWRANK_BACKEND"] = name
    try:
        yield
    finally:
        os.environ.pop("LOWRANK_BACKEND") if old is None else os.environ.__setitem__("LOWRANK_BACKEND", old)


@contextlib.contextmanager
def triton_settings(lookup: str = "gather", fused: bool = False, skinny: bool = False):
    """The Triton backend with one NF4 lookup, one large-M route and one small-M route
    (lowrank/ops/triton_nf4_tile.py Note: two ways to look up an NF4 value; triton_matmul.py Note:
    fused or dequantize + cuBLAS, and SKINNY)."""
    from lowrank.ops import triton_matmul, triton_nf4_tile

    old = triton_nf4_tile.LOOKUP, triton_matmul.FUSED, triton_matmul.SKINNY
    triton_nf4_tile.LOOKUP, triton_matmul.FUSED, triton_matmul.SKINNY = lookup, fused, skinny
    try:
        yield
    finally:
        triton_nf4_tile.LOOKUP, triton_matmul.FUSED, triton_matmul.SKINNY = old


# provider suffix -> Triton settings; "-fused" only where it differs from the default route (M > MAX_M),
# "-gemv" and "-gemv-select" (the split-K GEMV) only at M <= MAX_M
TRITON_VARIANTS = {"": {}, "-select": {"lookup": "select"}, "-fused": {"fused": True}, "-gemv": {"skinny": True},
                   "-gemv-select": {"skinny": True, "lookup": "select"}}


def lowrank_backends(device: torch.device, variants: bool = True) -> list[tuple[str, str, dict]]:
    """(provider, backend, Triton settings) for each backend of nf4_linear registered in this
    process that can run on `device`; the Triton backend once per variant (TRITON_VARIANTS)."""
    from lowrank.ops import backends, triton_nf4_tile

    out = []
    for b in backends.available("nf4_linear"):
        if b == "triton" and device.type != "cuda" and not triton_nf4_tile.interpreting():
            continue  # compiled Triton needs a GPU; on CPU only the interpreter runs it
        for suffix, settings in (TRITON_VARIANTS.items() if b == "triton" and variants else [("", {})]):
            out.append((f"lowrank-{b}{suffix}", b, settings))
    return out


def peers(w: torch.Tensor) -> dict:
    """{name: (linear(x), dequantize())} for the peer libraries that import and quantize w."""
    found = {}
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf

        packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        found["bitsandbytes"] = (lambda x: bnb.matmul_4bit(x, packed.t(), quant_state=state), lambda: bnbf.dequantize_4bit(packed, state))
    except Exception as e:  # a peer that is missing or fails here is left out, with the reason
        log.warning("bitsandbytes left out: %s: %s", type(e).__name__, e)
    try:
        try:
            from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4, to_nf4
        except ImportError:
            from torchao.dtypes.nf4tensor import linear_nf4, to_nf4  # torchao < 0.17
        nf4w = to_nf4(w, 64, 256)
        found["torchao"] = (lambda x: linear_nf4(x, nf4w), nf4w.get_original_weight)
    except Exception as e:
        log.warning("torchao left out: %s: %s", type(e).__name__, e)
    return found


def row(op, n, k, m, provider, times, flops, nbytes) -> dict:
    ms, p20, p80 = times
    return dict(op=op, N=n, K=k, M=m, provider=provider, ms=ms, p20=p20, p80=p80,
                tflops=flops / ms / 1e9 if flops else None, gbps=nbytes / ms / 1e6)  # fmt: skip


def measure(rows, op, n, k, m, provider, fn, flops, nbytes, device, quick, backend=None, settings=None, ref=None):
    """Time fn and append a row; a provider that fails, or whose result differs from `ref` (a
    tensor, or a callable giving it; checked first), is logged and left out of the table."""
    try:
        with forced_backend(backend) if backend else contextlib.nullcontext(), triton_settings(**(settings or {})):
            if ref is not None:
                _common.check_close(f"{op} {provider} N={n} K={k} M={m}", fn(), ref() if callable(ref) else ref, RTOL[op])
            times = _common.bench(fn, device, quick)
            kernel = _common.kernel_ms(fn, device) if KERNEL_TIME else None
    except Exception as e:
        log.warning("%s %s N=%d K=%d M=%s failed: %s: %s", op, provider, n, k, m, type(e).__name__, str(e)[:200])
        return
    rows.append(row(op, n, k, m, provider, times, flops, nbytes) | ({"kernel_ms": kernel} if KERNEL_TIME else {}))


def run_shape(n, k, cfg, device, quick) -> list[dict]:
    from lowrank import nf4, ops

    rows = []
    w = (torch.randn(n, k, device=device) * 0.02).to(DTYPE)  # (N, K)
    q = nf4.quantize(w, 64)
    wbytes = {"bf16": 2 * n * k, "nf4": q.nbytes}  # the packed weight + all its scales
    others = peers(w)
    lowrank = lowrank_backends(device)
    wq = nf4.dequantize(q).float()  # the weight lowrank's products compute with (each peer: its own)
    for m in cfg["ms"]:
        x = torch.randn(m, k, device=device, dtype=DTYPE)  # (M, K)
        flops, act = 2 * m * n * k, 2 * (m * k + m * n)
        measure(rows, "linear", n, k, m, "bf16", lambda: F.linear(x, w), flops, wbytes["bf16"] + act, device, quick)
        ref = x.float() @ wq.t()
        for name, b, settings in lowrank:
            if (name.endswith("-fused") and m <= MAX_M) or ("-gemv" in name and m > MAX_M):
                continue  # the fused kernels are for large M; above MAX_M "-gemv" is the default route
            measure(rows, "linear", n, k, m, name, lambda: ops.nf4_linear(x, q), flops, wbytes["nf4"] + act, device, quick, b, settings,
                    ref=ref)
        for name, (linear, dequantize) in others.items():
            measure(rows, "linear", n, k, m, name, lambda: linear(x), flops, wbytes["nf4"] + act, device, quick,
                    ref=lambda: x.float() @ dequantize().float().t())
    # dequantize: read the packed weight and its scales, write N*K bf16; the copy moves 2 x 2NK bytes
    out_bytes = 2 * n * k
    dst = torch.empty_like(w)
    measure(rows, "dequantize", n, k, None, "copy", lambda: dst.copy_(w), None, 2 * out_bytes, device, quick)
    for name, b, settings in lowrank:
        if not name.endswith("-fused") and "-gemv" not in name:  # the same dequantize as "" / "-select"
            measure(rows, "dequantize", n, k, None, name, lambda: ops.nf4_dequantize(q, DTYPE), None, wbytes["nf4"] + out_bytes, device, quick, b, settings,
                    ref=w)
    for name, (_, dequantize) in others.items():
        measure(rows, "dequantize", n, k, None, name, dequantize, None, wbytes["nf4"] + out_bytes, device, quick, ref=w)
    # backward: grad_x = grad_y @ W, (M, N) @ (N, K)
    m = cfg["grad_m"]
    gy = torch.randn(m, n, device=device, dtype=DTYPE)
    flops, act = 2 * m * n * k, 2 * (m * k + m * n)
    measure(rows, "grad_x", n, k, m, "bf16", lambda: gy @ w, flops, wbytes["bf16"] + act, device, quick)
    args = (q.packed, q.absmax, q.nested_absmax, q.offset, list(q.shape), q.blocksize)
    for name, b, settings in (p for p in lowrank if "-gemv" not in p[0]):  # grad_x has no GEMV
        measure(rows, "grad_x", n, k, m, name, lambda: torch.ops.lowrank.nf4_linear_grad_input(gy, *args), flops, wbytes["nf4"] + act, device, quick, b, settings,
                ref=gy.float() @ wq)
    return rows


def add_speedups(rows: list[dict]) -> None:
    """speedup = baseline time / time, the baseline measured in the same run: bf16 for
    linear and grad_x, the device-to-device copy for dequantize (there: a bandwidth ratio
    is gbps / the copy's gbps)."""
    base = {(r["op"], r["N"], r["K"], r["M"]): r["ms"] for r in rows if r["provider"] in ("bf16", "copy")}
    for r in rows:
        t = base.get((r["op"], r["N"], r["K"], r["M"]))
        r["speedup"] = t / r["ms"] if t else None


def plot(rows: list[dict], path: pathlib.Path) -> None:
    plt = _common.matplotlib_pyplot()
    lin = [r for r in rows if r["op"] == "linear"]
    shapes = sorted({(r["N"], r["K"]) for r in lin})
    if plt is None or not shapes:
        return
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.5 * len(shapes), 3.8), squeeze=False)
    providers = sorted({r["provider"] for r in lin})  # one colour per provider in every panel
    for ax, (n, k) in zip(axes[0], shapes):
        for i, p in enumerate(providers):
            pts = sorted((r["M"], r["speedup"]) for r in lin if (r["N"], r["K"], r["provider"]) == (n, k, p) and r["speedup"])
            if pts:
                ax.plot(*zip(*pts), marker="o", label=p, color=f"C{i}")
        ax.set(xscale="log", title=f"N x K = {n} x {k}", xlabel="M (rows of x)", ylabel="speedup over bf16 F.linear")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def positive_ints(text: str, sep: str) -> list[int]:
    """The positive integers of `text` split at `sep`; ValueError for anything else."""
    values = [int(v) for v in text.split(sep)]
    if min(values) < 1:
        raise ValueError(text)
    return values


def shapes_arg(text: str) -> list[tuple[int, int]]:
    """--shapes: "NxK,NxK,..." of positive sizes (argparse turns the error into a usage message)."""
    try:
        shapes = [tuple(positive_ints(nk, "x")) for nk in text.split(",")]
        if any(len(nk) != 2 for nk in shapes):
            raise ValueError(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"N x K pairs of positive sizes, e.g. 4096x4096,1024x4096; got {text!r}")
    return shapes


def ms_arg(text: str) -> list[int]:
    """--ms: "M,M,..." of positive row counts."""
    try:
        return positive_ints(text, ",")
    except ValueError:
        raise argparse.ArgumentTypeError(f"positive row counts, e.g. 1,16,4096; got {text!r}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes; the only mode that runs without CUDA")
    parser.add_argument("--out", type=pathlib.Path, default=_common.RESULTS / "nf4_linear.json", help="JSON rows; .md and .png beside it")
    parser.add_argument("--shapes", type=shapes_arg, help="N x K list instead of the Llama shapes, e.g. 4096x4096,1024x4096")
    parser.add_argument("--ms", type=ms_arg, help="M list instead of 1,16,64,256,4096, e.g. 1,16,4096")
    parser.add_argument("--kernel-time", action="store_true",
                        help="also each call's kernel time from torch.profiler (CUDA): host-bound providers show")
    args = parser.parse_args(argv)
    global KERNEL_TIME, COLUMNS
    if args.kernel_time:
        KERNEL_TIME, COLUMNS = True, [*COLUMNS, "kernel_ms"]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cuda = torch.cuda.is_available()
    if not cuda and not args.quick:
        print("bench_nf4_linear: no CUDA device; the Llama-shape run needs one and is skipped. Use --quick for a CPU smoke test.")
        return 0
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before lowrank imports triton: the Triton kernels run in the interpreter
    device = torch.device("cuda" if cuda else "cpu")
    cfg = dict(QUICK if args.quick else FULL)
    if args.shapes:
        cfg["shapes"] = args.shapes
    if args.ms:
        cfg["ms"] = args.ms
        cfg["grad_m"] = max(cfg["ms"])
    env = _common.environment(device)
    if not cuda:
        env["device"] += " (CPU; Triton kernels in the interpreter: timings only smoke-test the path)"
    rows = []
    for n, k in cfg["shapes"]:
        rows += run_shape(n, k, cfg, device, args.quick)
        add_speedups(rows)
        table = _common.markdown(rows, COLUMNS)
        _common.write(args.out, rows, env, table)  # after every shape: a timeout keeps what ran
        log.info("done N=%d K=%d", n, k)
    plot(rows, args.out.with_suffix(".png"))
    print(f"\n{env}\n\n{table}\n\nwrote {args.out} (+ .md, .png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""lowrank's C++ CPU kernels (csrc) against bitsandbytes' CPU path and bf16 on this CPU.

    python benchmarks/bench_nf4_cpu.py            # 4096 x 4096 bf16 weight, double quant, M in {1, 4, 16}
    python benchmarks/bench_nf4_cpu.py --quick    # 512 x 512, few repeats (smoke test)

Rows, all measured in this one run: dequantize (lowrank csrc, bitsandbytes.functional.
dequantize_4bit; and lowrank's kernel alone, into a tensor already written once, which shows
what the page faults of a fresh output cost) and linear, for bf16 and float32 x (lowrank csrc
nf4_linear with the best instruction set, and for bf16 with AVX-512 FMA where the best one is
avx512bf16; bitsandbytes' Linear4bit in eval mode, and its matmul_4bit at M = 1, See Note: checked
baselines; F.linear on the dense weight in x's dtype, the baseline; err: each output's largest
difference from the float64 product, relative to that product's largest value). Each: median and 20/80% quantiles
of 15 samples (a sample: the mean of as many calls as take about 2 ms), GB/s of the bytes the
op must move, the fraction of this machine's memory bandwidth (measured here with a 256 MiB
tensor copy), and the time ratio to each baseline. Writes --out (default
benchmarks/results/nf4_cpu.json) and a .md table beside it. Skips (exit 0) with a message when
lowrank._C is not built: every row but the baselines times it.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import _common  # noqa: E402

COLUMNS = ["op", "x", "M", "provider", "ms", "p20", "p80", "gbps", "of_bandwidth", "vs_bnb", "vs_base", "err"]


def cpu_model() -> str:
    for line in open("/proc/cpuinfo", encoding="utf-8"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=pathlib.Path, default=_common.RESULTS / "nf4_cpu.json")
    args = parser.parse_args(argv)
    try:
        from lowrank import _C
    except ImportError as e:  # a traceback said less than this (bench_nf4_cuda.py skips the same way)
        print(f"bench_nf4_cpu: lowrank._C is not built ({e}): nothing to measure; build it with "
              "`python setup.py build_ext --inplace` (docs/csrc.md)")
        return 0
    from lowrank import nf4

    cpu = torch.device("cpu")
    n = k = 512 if args.quick else 4096
    w = torch.randn(n, k, dtype=torch.bfloat16)
    q = nf4.quantize(w, 64, True)
    fields = (q.packed, q.absmax, q.nested_absmax, q.offset, [n, k], 64)
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf

        bq, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    except ImportError:
        bnb = bnbf = bnb_layer = None
    if bnbf is not None:
        layers = {}

        def bnb_layer(dtype):
            """bitsandbytes' Linear4bit of w computing in `dtype`, in eval mode: what a model
            loaded in 4 bits runs for inference (See Note: checked baselines)."""
            if dtype not in layers:
                layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
                layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", blocksize=64,
                                                 compress_statistics=True)
                layers[dtype] = layer.to(cpu).eval()  # .to quantizes
            return layers[dtype]

        def bnbf_matmul(x):
            return bnb.matmul_4bit(x, bq.t(), quant_state=state)

    def timed(fn):
        """(median, p20, p80) ms. Calls of 0.15 ms are timed in batches, so that the clock and
        one stray interruption (the machine is shared) weigh less."""
        fn()  # warm-up
        start = time.perf_counter()
        fn()
        inner = max(1, min(200, int(2e-3 / max(time.perf_counter() - start, 1e-7))))
        samples = []
        for _ in range(3 if args.quick else 15):
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            samples.append(1e3 * (time.perf_counter() - start) / inner)
        return _common.summarize(samples)

    # Note: memory bandwidth. A copy of 256 MiB (far beyond the caches) reads and writes every
    # byte once: 2 * 256 MiB / time. The ops' GB/s below count the bytes they must move the same way.
    big = torch.empty(2**26 if not args.quick else 2**22, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(big)
    copy = timed(lambda: dst.copy_(big))
    bandwidth = 2 * big.numel() * 4 / copy[0] / 1e6  # GB/s
    print(f"memory bandwidth (copy of {big.numel() * 4 >> 20} MiB): {bandwidth:.1f} GB/s", flush=True)

    flush = torch.ones(2**24 if not args.quick else 2**20, dtype=torch.float32)  # 64 MiB, twice the L3 here

    def timed_cold(fn):
        """(median, p20, p80) ms of single calls after reading 64 MiB elsewhere: the weight
        (8.9 MB at 4096 x 4096) comes from memory, not from the 32 MiB L3 that keeps it between
        repeated calls. (Reading, not writing: dirty lines would add their write-back.)"""
        fn()
        samples = []
        for _ in range(3 if args.quick else 21):
            flush.sum()
            start = time.perf_counter()
            fn()
            samples.append(1e3 * (time.perf_counter() - start))
        return _common.summarize(samples)

    rows = []

    def row(op, m, provider, t, moved, peer=None, base=None, x=None, err=None):
        rows.append(dict(op=op, x=x, M=m, provider=provider, err=err, ms=t[0], p20=t[1], p80=t[2], gbps=moved / t[0] / 1e6,
                         of_bandwidth=moved / t[0] / 1e6 / bandwidth,
                         vs_bnb=None if peer is None else peer[0] / t[0], vs_base=None if base is None else base[0] / t[0]))

    moved = q.nbytes + 2 * n * k  # packed weight and scales in, bf16 weight out
    peer = timed(lambda: bnbf.dequantize_4bit(bq, state)) if bnbf else None
    if peer:
        row("dequantize", None, "bitsandbytes", peer, moved, peer)
    row("dequantize", None, "lowrank csrc", timed(lambda: _C.nf4_dequantize_cpu(*fields, torch.bfloat16)), moved, peer)
    out = torch.zeros(n, k, dtype=torch.bfloat16)  # written once: no page faults
    row("dequantize", None, "lowrank csrc kernel, written tensor", timed(lambda: _C.nf4_dequantize_cpu_into(out, *fields)),
        moved, peer)
    best = _C.cpu_isa()
    dense = nf4.dequantize(q, torch.float32).double()  # NF4[c] * scale; bitsandbytes' codes and scales are the same bits

    # Note: checked baselines. bitsandbytes 0.50 has two CPU paths for a 4-bit linear layer.
    # Linear4bit in eval mode under no_grad, on a CPU with AVX512_BF16, first rewrites its weight
    # into another layout (bitsandbytes/functional.py `_convert_weight_packed_for_cpu`: rows
    # interleaved, the double-quantized scales expanded and rounded to bf16) and then runs
    # `gemv_4bit` on it, computing in bf16 whatever x's dtype. Everything else (training, x that
    # requires grad, other CPUs) runs `matmul_4bit` on the layout it saves and loads. Calling
    # `gemv_4bit` on that saved layout, as this benchmark did until 2026-11-30, returns another
    # product (relative error ~1.5) in about the eval path's time: its M = 1 "1.54x bitsandbytes"
    # of 2026-11-27 was against that call. So every provider's output is now compared with the
    # float64 product of NF4[c] * scale first (the err column), and the run stops on a gross
    # difference instead of timing it.
    def linear_rows(dtype, m):
        """The linear rows of x in `dtype` with m rows. Each provider's output is checked against
        the float64 product of the dequantized weight before it is timed (See Note: checked
        baselines)."""
        x = torch.randn(m, k, dtype=torch.bfloat16).to(dtype)
        exact = x.double() @ dense.t()

        def checked(provider, fn, exact=exact):
            err = ((fn().double() - exact).abs().max() / exact.abs().max()).item()
            if not err < 2**-5:
                raise SystemExit(f"bench_nf4_cpu: {provider} computed another product (relative error {err:.3g} "
                                 f"at {dtype}, M = {m}): not timed")
            return err

        name = str(dtype).removeprefix("torch.")
        wd = w.to(dtype)
        base = timed(lambda: F.linear(x, wd))
        row("linear", m, f"{name} F.linear", base, 2 * n * k + 2 * m * (n + k), None, base, x=name,
            err=checked("F.linear", lambda: F.linear(x, wd), x.double() @ wd.double().t()))
        moved = q.nbytes + x.element_size() * m * (n + k)
        peer = None
        if bnb_layer is not None:
            layer = bnb_layer(dtype)
            with torch.no_grad():
                err = checked("bitsandbytes Linear4bit", lambda: layer(x))
                peer = timed(lambda: layer(x))
            row("linear", m, "bitsandbytes Linear4bit, eval", peer, moved, peer, base, x=name, err=err)
            if m == 1:  # training and everything else than eval + no_grad (See Note: checked baselines)
                err = checked("bitsandbytes matmul_4bit", lambda: bnbf_matmul(x))
                row("linear", m, "bitsandbytes matmul_4bit", timed(lambda: bnbf_matmul(x)), moved, peer, base, x=name,
                    err=err)
        ours = lambda: _C.nf4_linear_cpu(x, *fields, None)  # noqa: E731
        row("linear", m, f"lowrank csrc ({best})", timed(ours), moved, peer, base, x=name, err=checked("lowrank", ours))
        if m == 1:  # weights from memory (See timed_cold)
            cold_peer = None
            if bnb_layer is not None:
                with torch.no_grad():
                    cold_peer = timed_cold(lambda: layer(x))
                row("linear, cold", m, "bitsandbytes Linear4bit, eval", cold_peer, moved, cold_peer, x=name)
            row("linear, cold", m, f"lowrank csrc ({best})", timed_cold(ours), moved, cold_peer,
                timed_cold(lambda: F.linear(x, wd)), x=name)
        if best == "avx512bf16" and dtype == torch.bfloat16:  # the AVX-512 FMA kernel, what CPUs without AVX512_BF16 run
            _C.set_cpu_isa("avx512")
            try:
                fma = timed(ours)
            finally:
                _C.set_cpu_isa(best)
            row("linear", m, "lowrank csrc (avx512)", fma, moved, peer, base, x=name)

    for dtype in (torch.bfloat16, torch.float32):
        for m in (1, 4, 16):
            linear_rows(dtype, m)
    env = {**_common.environment(cpu), "device": cpu_model(), "threads": torch.get_num_threads(),
           "cpu_isa": _C.cpu_isa(), "bandwidth_gbps": bandwidth, "shape": [n, k]}
    table = _common.markdown(rows, COLUMNS)
    print(table)
    _common.write(args.out, rows, env, table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

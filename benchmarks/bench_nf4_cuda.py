"""lowrank's CUDA kernels (csrc), each variant, against bitsandbytes and bf16 on one GPU.

    python benchmarks/bench_nf4_cuda.py            # Llama-2-7B and Llama-3-8B shapes, M in {1, 4, 16, 64}, bf16
    python benchmarks/bench_nf4_cuda.py --quick    # one shape
    LOWRANK_CUDA_GEMV=mma-lut python benchmarks/bench_nf4_cuda.py --back-to-back   # the op, decoding, on mma-lut

Providers, each only where it runs: every CUDA kernel of lowrank._C called directly (dequantize:
csrc; linear: csrc-mma, csrc-mma-staged, csrc-mma-lut, csrc-simt and csrc-mma-staged2 up to 16 rows,
csrc-mma-lut-deep up to 8), bitsandbytes
(dequantize_4bit; gemv_4bit at M = 1), and the baseline: bf16 F.linear on the dense weight (for
dequantize: a device-to-device copy of the bf16 weight, the bandwidth ceiling). Every row: median
and 20/80% quantiles (triton.testing.do_bench, L2 flushed), GB/s of the bytes a kernel must move,
and the time ratio to the baseline of the same run; then, for each provider, a line through its M = 1
times over the shapes (fits: the fixed part and the marginal rate). The Triton kernels are timed by
bench_nf4_linear.py, which autotunes them. Writes --out (default benchmarks/results/nf4_cuda.json)
and a .md table beside it. Skips (exit 0) with a message when there is no GPU or _C has no CUDA.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import _common  # noqa: E402
from bench_nf4_linear import RTOL  # noqa: E402 - the same checks' bounds (_common, Note: check before timing)

SHAPES = [(4096, 4096), (1024, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336)]  # Llama-2/3-8B
MS = [1, 4, 16, 32, 64]
COLUMNS = ["op", "N", "K", "M", "provider", "ms", "p20", "p80", "gbps", "speedup"]
# nf4_cuda.h kGemv*: (id, most rows)
GEMV_KERNELS = {"csrc-mma": (1, 64), "csrc-simt": (2, 16), "csrc-mma-staged": (3, 64), "csrc-mma-staged2": (4, 16),
                "csrc-mma-lut": (5, 64), "csrc-mma-lut-deep": (6, 8)}  # deep: mma-lut itself above 8 rows


def fields(q):
    return (q.packed, q.absmax, q.nested_absmax, q.offset, list(q.shape), q.blocksize)


def providers():
    """{name: (dequantize(q) or None, linear(x, q) or None, most rows of linear)}."""
    from lowrank import _C

    out = {}
    out["csrc dequantize"] = (lambda q: _C.nf4_dequantize_cuda(*fields(q), torch.bfloat16), None, 0)
    for name, (kernel, rows) in GEMV_KERNELS.items():
        out[name] = (None, lambda x, q, kernel=kernel: _C.nf4_linear_cuda(x, *fields(q), None, kernel=kernel), rows)
    return out


def back_to_back(device, n=4096, k=4096, calls=2000) -> list[dict]:
    """M = 1 the way decoding calls it: the whole op (torch.ops.lowrank.nf4_linear: dispatch, the
    backend table, the binding) called back to back, wall-clock time a call, L2 warm, eagerly and
    replayed from a CUDA graph; bf16 F.linear likewise. Eager, the slower of the CPU's dispatch
    and the GPU's kernel sets the pace; a graph replays the kernels alone."""
    import time

    from lowrank import nf4, ops

    w = torch.randn(n, k, device=device, dtype=torch.bfloat16)
    q = nf4.quantize(w, 64, True)
    x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
    rows = []
    for name, fn in (("bf16 F.linear (baseline)", lambda: F.linear(x, w)), ("lowrank op", lambda: ops.nf4_linear(x, q))):
        for mode in ("eager", "CUDA graph"):
            call = fn
            if mode == "CUDA graph":
                stream = torch.cuda.Stream()
                with torch.cuda.stream(stream):
                    fn()  # warm-up off the default stream, as capture requires
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for _ in range(100):
                        fn()
                call = graph.replay
            per = 100 if mode == "CUDA graph" else 1
            for _ in range(10):
                call()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(calls // per):
                call()
            torch.cuda.synchronize()
            ms = 1e3 * (time.perf_counter() - start) / calls
            rows.append(dict(op=f"linear back to back, {mode}", N=n, K=k, M=1, provider=name, ms=ms, p20=None, p80=None,
                             gbps=(q.nbytes if name == "lowrank op" else 2 * n * k) / ms / 1e6, speedup=None))
    for r in rows:  # against bf16 in the same mode
        base = next(b["ms"] for b in rows if b["op"] == r["op"] and b["provider"].startswith("bf16"))
        r["speedup"] = base / r["ms"]
    print(_common.markdown(rows, COLUMNS), flush=True)
    return rows


def fits(rows: list[dict], m: int = 1) -> list[dict]:
    """For each provider timed at `m` rows on 3 or more shapes, a straight line through its times:
    ms = fixed + bytes moved / rate (least squares). A row each, op "fit M=<m>": ms is the fixed
    part, gbps the marginal rate. On the H200 (2026-11-30, docs/csrc.md) every kernel's fixed part
    was ~9 us and mma-lut's rate 1.45 TB/s against cuBLAS's 3.5: the rate is what a GEMV can raise."""
    points: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r["op"] == "linear" and r["M"] == m and r["gbps"]:
            points.setdefault(r["provider"], []).append((r["gbps"] * r["ms"] * 1e6, r["ms"]))  # (bytes, ms)
    out = []
    for name, xy in points.items():
        if len({x for x, _ in xy}) < 3:
            continue
        mx, my = sum(x for x, _ in xy) / len(xy), sum(y for _, y in xy) / len(xy)
        slope = sum((x - mx) * (y - my) for x, y in xy) / sum((x - mx) ** 2 for x, _ in xy)  # ms a byte
        out.append(dict(op=f"fit M={m}: fixed ms + bytes at gbps", N=None, K=None, M=m, provider=name, ms=my - slope * mx,
                        p20=None, p80=None, gbps=1 / slope / 1e6 if slope > 0 else None, speedup=None))
    return out


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--back-to-back", action="store_true",
                        help="only the op called back to back (decoding; with LOWRANK_CUDA_GEMV, another GEMV's)")
    parser.add_argument("--out", type=pathlib.Path, default=_common.RESULTS / "nf4_cuda.json")
    args = parser.parse_args(argv)
    try:
        from lowrank import _C
    except ImportError:
        _C = None
    if not torch.cuda.is_available() or _C is None or not _C.with_cuda:
        print("bench_nf4_cuda: no GPU, or lowrank._C built without CUDA: nothing to measure")
        return 0
    from lowrank import nf4

    device = torch.device("cuda")
    provs = providers()
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        bnbf = None
    rows = []

    def measure(op, n, k, m, name, fn, moved, base, ref=None):
        """Time fn and add its row; base: the baseline's ms (None: this is the baseline); ref: what fn
        must compute (a tensor, or a callable giving it), checked first. Returns the ms, None if fn
        failed or differed (then a failed baseline gives the others no speedup, not the last shape's)."""
        try:
            if ref is not None:
                _common.check_close(f"{op} {name} N={n} K={k} M={m}", fn(), ref() if callable(ref) else ref, RTOL[op])
            t = _common.bench(fn, device)
        except Exception as e:  # one failing provider must not cost the others' numbers
            print(f"{op} {name} N={n} K={k} M={m} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
            return None
        speedup = 1.0 if base is None else base / t[0] if base else None
        rows.append(dict(op=op, N=n, K=k, M=m, provider=name, ms=t[0], p20=t[1], p80=t[2], gbps=moved / t[0] / 1e6,
                         speedup=speedup))
        return t[0]

    for n, k in [] if args.back_to_back else SHAPES[:1] if args.quick else SHAPES:
        first = len(rows)
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16)
        q = nf4.quantize(w, 64, True)
        if bnbf is not None:
            bq, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        # dequantize moves the packed weight (+ scales) in and n*k bf16 out; the copy 2 x 2nk
        moved = q.nbytes + 2 * n * k
        dst = torch.empty_like(w)
        base = measure("dequantize", n, k, None, "copy (baseline)", lambda: dst.copy_(w), 4 * n * k, None) or 0.0
        for name, (deq, _, _) in provs.items():
            if deq is not None:
                measure("dequantize", n, k, None, name.replace(" dequantize", ""), lambda deq=deq: deq(q), moved, base, w)
        if bnbf is not None:
            measure("dequantize", n, k, None, "bitsandbytes", lambda: bnbf.dequantize_4bit(bq, state), moved, base, w)
        wq = nf4.dequantize(q).float()  # what lowrank's kernels multiply by (bitsandbytes': its own dequantize)
        for m in MS:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            moved = q.nbytes + 2 * m * (k + n)
            base = measure("linear", n, k, m, "bf16 F.linear (baseline)", lambda: F.linear(x, w),
                           2 * n * k + 2 * m * (k + n), None) or 0.0
            ref = x.float() @ wq.t()
            for name, (_, lin, most) in provs.items():
                if lin is not None and m <= most:
                    measure("linear", n, k, m, name, lambda lin=lin: lin(x, q), moved, base, ref)
            if bnbf is not None and m == 1:
                measure("linear", n, k, m, "bitsandbytes gemv_4bit", lambda: bnbf.gemv_4bit(x, bq.t(), state=state), moved, base,
                        lambda: x.float() @ bnbf.dequantize_4bit(bq, state).float().t())
        print(_common.markdown(rows[first:], COLUMNS), flush=True)
        _common.write(args.out, rows, _common.environment(device), _common.markdown(rows, COLUMNS))  # a timeout keeps these
    rows += fits(rows)
    if not args.quick or args.back_to_back:
        rows += back_to_back(device)
    env = _common.environment(device)
    table = _common.markdown(rows, COLUMNS)
    print(table)
    _common.write(args.out, rows, env, table)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main(sys.argv[1:]))

"""lowrank's CUDA kernels (csrc) against its Triton kernels, bitsandbytes and bf16 on one GPU.

    python benchmarks/bench_nf4_cuda.py            # Llama-2-7B shapes, M in {1, 4, 16}, bf16
    python benchmarks/bench_nf4_cuda.py --quick    # one shape

Providers, each only where it runs: csrc (lowrank._C's CUDA kernels, called directly),
triton (lowrank's Triton backend), bitsandbytes (dequantize_4bit; gemv_4bit at M = 1), and
the baseline: bf16 F.linear on the dense weight (for dequantize: a device-to-device copy of
the bf16 weight, the bandwidth ceiling). Every row: median and 20/80% quantiles
(triton.testing.do_bench, L2 flushed), GB/s of the bytes a kernel must move, and the time
ratio to the baseline of the same run. Writes --out (default benchmarks/results/nf4_cuda.json)
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

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (N, K): Llama-2-7B q/o, gate/up, down
MS = [1, 4, 16]
COLUMNS = ["op", "N", "K", "M", "provider", "ms", "p20", "p80", "gbps", "speedup"]


def providers(device):
    """name -> (dequantize(q), linear(x, q)) callables; None where a provider lacks one."""
    from lowrank import _C, nf4
    from lowrank.ops import backends

    def fields(q):
        return (q.packed, q.absmax, q.nested_absmax, q.offset, list(q.shape), q.blocksize)

    out = {"csrc": (lambda q: _C.nf4_dequantize_cuda(*fields(q), torch.bfloat16),
                    lambda x, q: _C.nf4_linear_cuda(x, *fields(q), None))}
    if "triton" in backends.available("nf4_linear"):
        deq, lin = backends.implementation("nf4_dequantize", "triton"), backends.implementation("nf4_linear", "triton")
        out["triton"] = (lambda q: deq(*fields(q), torch.bfloat16), lambda x, q: lin(x, *fields(q), None))
    try:
        import bitsandbytes.functional as bnbf

        out["bitsandbytes"] = "bnb"
    except ImportError:
        pass
    return out, nf4


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=pathlib.Path, default=_common.RESULTS / "nf4_cuda.json")
    args = parser.parse_args(argv)
    try:
        from lowrank import _C
    except ImportError:
        _C = None
    if not torch.cuda.is_available() or _C is None or not _C.with_cuda:
        print("bench_nf4_cuda: no GPU, or lowrank._C built without CUDA: nothing to measure")
        return 0
    device = torch.device("cuda")
    provs, nf4 = providers(device)
    rows = []
    for n, k in SHAPES[:1] if args.quick else SHAPES:
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16)
        q = nf4.quantize(w, 64, True)
        packed_bytes = q.nbytes
        if "bitsandbytes" in provs:
            import bitsandbytes.functional as bnbf

            bq, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        # dequantize: moves the packed weight in and n*k bf16 out
        moved = packed_bytes + 2 * n * k
        base = _common.bench(lambda: w.clone(), device)
        rows.append(dict(op="dequantize", N=n, K=k, M=None, provider="copy (baseline)", ms=base[0], p20=base[1], p80=base[2],
                         gbps=2 * 2 * n * k / base[0] / 1e6, speedup=1.0))
        for name, p in provs.items():
            fn = (lambda: bnbf.dequantize_4bit(bq, state)) if p == "bnb" else (lambda p=p: p[0](q))
            t = _common.bench(fn, device)
            rows.append(dict(op="dequantize", N=n, K=k, M=None, provider=name, ms=t[0], p20=t[1], p80=t[2],
                             gbps=moved / t[0] / 1e6, speedup=base[0] / t[0]))
        for m in MS:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            moved = packed_bytes + 2 * m * (k + n)
            base = _common.bench(lambda: F.linear(x, w), device)
            rows.append(dict(op="linear", N=n, K=k, M=m, provider="bf16 F.linear (baseline)", ms=base[0], p20=base[1],
                             p80=base[2], gbps=(2 * n * k + 2 * m * (k + n)) / base[0] / 1e6, speedup=1.0))
            for name, p in provs.items():
                if p == "bnb":
                    if m != 1:
                        continue
                    fn = lambda: bnbf.gemv_4bit(x, bq.t(), state=state)  # noqa: E731
                else:
                    fn = lambda p=p: p[1](x, q)  # noqa: E731
                t = _common.bench(fn, device)
                rows.append(dict(op="linear", N=n, K=k, M=m, provider=name, ms=t[0], p20=t[1], p80=t[2],
                                 gbps=moved / t[0] / 1e6, speedup=base[0] / t[0]))
            print(_common.markdown(rows[-len(provs) - 1:], COLUMNS), flush=True)
    env = _common.environment(device)
    table = _common.markdown(rows, COLUMNS)
    print(table)
    _common.write(args.out, rows, env, table)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main(sys.argv[1:]))

"""lowrank's C++ CPU kernels (csrc) against bitsandbytes' CPU path and bf16 on this CPU.

    python benchmarks/bench_nf4_cpu.py            # 4096 x 4096 bf16 weight, double quant, M in {1, 4, 16}
    python benchmarks/bench_nf4_cpu.py --quick    # 512 x 512, few repeats (smoke test)

Rows, all measured in this one run: dequantize (lowrank csrc, bitsandbytes.functional.
dequantize_4bit) and linear (lowrank csrc nf4_linear; bitsandbytes gemv_4bit at M = 1; bf16
F.linear on the dense weight, the baseline). Each: median and 20/80% quantiles, GB/s of the
bytes the op must move, the fraction of this machine's memory bandwidth (measured here with a
256 MiB tensor copy), and the time ratio to each baseline. Writes --out (default
benchmarks/results/nf4_cpu.json) and a .md table beside it.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import _common  # noqa: E402

COLUMNS = ["op", "M", "provider", "ms", "p20", "p80", "gbps", "of_bandwidth", "vs_bnb", "vs_bf16"]


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
    from lowrank import _C, nf4

    cpu = torch.device("cpu")
    n = k = 512 if args.quick else 4096
    w = torch.randn(n, k, dtype=torch.bfloat16)
    q = nf4.quantize(w, 64, True)
    fields = (q.packed, q.absmax, q.nested_absmax, q.offset, [n, k], 64)
    try:
        import bitsandbytes.functional as bnbf

        bq, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    except ImportError:
        bnbf = None

    def timed(fn, reps=None):
        return _common.bench(fn, cpu, quick=args.quick)

    # Note: memory bandwidth. A copy of 256 MiB (far beyond the caches) reads and writes every
    # byte once: 2 * 256 MiB / time. The ops' GB/s below count the bytes they must move the same way.
    big = torch.empty(2**26 if not args.quick else 2**22, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(big)
    copy = timed(lambda: dst.copy_(big))
    bandwidth = 2 * big.numel() * 4 / copy[0] / 1e6  # GB/s
    print(f"memory bandwidth (copy of {big.numel() * 4 >> 20} MiB): {bandwidth:.1f} GB/s", flush=True)

    rows = []

    def row(op, m, provider, t, moved, bnb=None, bf16=None):
        rows.append(dict(op=op, M=m, provider=provider, ms=t[0], p20=t[1], p80=t[2], gbps=moved / t[0] / 1e6,
                         of_bandwidth=moved / t[0] / 1e6 / bandwidth,
                         vs_bnb=None if bnb is None else bnb[0] / t[0], vs_bf16=None if bf16 is None else bf16[0] / t[0]))

    moved = q.nbytes + 2 * n * k  # packed weight and scales in, bf16 weight out
    bnb = timed(lambda: bnbf.dequantize_4bit(bq, state)) if bnbf else None
    if bnb:
        row("dequantize", None, "bitsandbytes", bnb, moved, bnb)
    row("dequantize", None, "lowrank csrc", timed(lambda: _C.nf4_dequantize_cpu(*fields, torch.bfloat16)), moved, bnb)
    for m in (1, 4, 16):
        x = torch.randn(m, k, dtype=torch.bfloat16)
        bf16 = timed(lambda: F.linear(x, w))
        row("linear", m, "bf16 F.linear", bf16, 2 * n * k + 2 * m * (n + k), None, bf16)
        moved = q.nbytes + 2 * m * (n + k)
        bnb = None
        if bnbf and m == 1:
            bnb = timed(lambda: bnbf.gemv_4bit(x, bq.t(), state=state))
            row("linear", m, "bitsandbytes gemv_4bit", bnb, moved, bnb, bf16)
        row("linear", m, "lowrank csrc", timed(lambda: _C.nf4_linear_cpu(x, *fields, None)), moved, bnb, bf16)
    env = {**_common.environment(cpu), "device": cpu_model(), "threads": torch.get_num_threads(),
           "cpu_isa": _C.cpu_isa(), "bandwidth_gbps": bandwidth, "shape": [n, k]}
    table = _common.markdown(rows, COLUMNS)
    print(table)
    _common.write(args.out, rows, env, table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

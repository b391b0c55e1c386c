"""What the CUDA GEMV kernels compile to on a Hopper GPU, without one: instructions a weight.

    python benchmarks/sass_csrc.py               # sm_90a, bfloat16, every n8 tile count (MT = 1, 2, 4, 8)
    python benchmarks/sass_csrc.py --arch 80     # another target (compute capability x 10)

The Triton kernels have benchmarks/sass_triton.py; this is the same count for csrc/nf4_cuda_gemv*.cu,
compiled with nvcc to a cubin for one target and read back with the cuobjdump Triton ships. For each
tensor-core kernel (csrc/nf4_cuda.h: kGemvMma "mma", kGemvMmaStaged "mma-staged", kGemvMmaStaged2
"mma-staged2", kGemvMmaLut "mma-lut", "-rt2" / "-rt4" for its CTAs of 2 / 4 row tiles) and each n8 tile count MT (M <= 8 MT rows of x) a row: registers a thread, the
instructions of the K loop's body (the longest backward branch), the weights a lane decodes in one
trip (8 for each mma step of an n8 tile), their ratio, the share of the decode itself (SHF, LOP3, LDS,
FMUL, F2FP and the mma; for mma-lut PRMT, IMAD, LDS, the mma and the FFMA scaling a block sum), and
the global loads and predicated-select instructions in the loop. It counts instructions; it times nothing
(bench_nf4_cuda.py does, on a GPU). Needs nvcc.
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import _common  # noqa: E402
from sass_triton import cuobjdump, longest_loop, report  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "csrc" / f"nf4_cuda_gemv{part}.cu" for part in ("", "_staged", "_lut")]  # mma; the staged ones; mma-lut
# the decode and the mma: NF4[code] * scale rounded to pairs (mma, staged), or pairs looked up and block
# sums scaled (mma-lut: PRMT + IMAD a pair's address, LDS, HMMA, FFMA)
DECODE_PAIRS = ("PRMT", "IMAD", "LDS", "HMMA", "FFMA")  # mma-lut and its -rt variants
DECODE_SCALED = ("SHF", "LOP3", "LDS", "FMUL", "F2FP", "HMMA", "IMAD.SHL")
COLUMNS = ["kernel", "MT", "regs", "instructions", "weights_per_lane", "per_weight", "decode", "other", "LDG", "SEL"]


def nvcc() -> str:
    found = shutil.which("nvcc") or next((str(p) for p in pathlib.Path("/usr/local").glob("cuda*/bin/nvcc")), None)
    if found is None:
        raise SystemExit("sass_csrc: nvcc not found (PATH, /usr/local/cuda*/bin)")
    return found


def compile_cubin(source: pathlib.Path, arch: int, directory: pathlib.Path) -> pathlib.Path:
    target = f"{arch}a" if arch >= 90 else str(arch)
    cubin = directory / f"{source.stem}.cubin"
    done = subprocess.run([nvcc(), "-std=c++17", "-O3", f"-gencode=arch=compute_{target},code=sm_{target}", "-cubin",
                           "-I", str(ROOT / "csrc"), "-o", str(cubin), str(source)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"sass_csrc: nvcc failed on {source.name}:\n{done.stderr[-4000:]}")
    return cubin


def functions(cubin: pathlib.Path) -> dict[str, tuple[int, list]]:
    """{mangled name: (registers, [(address, opcode with its first modifier, line)])}."""
    tool = str(cuobjdump())
    usage = subprocess.run([tool, "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
    regs = {m.group(1): int(m.group(2)) for m in re.finditer(r"Function (\S+):\s*\n\s*REG:(\d+)", usage)}
    sass = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    parts = re.split(r"\n\s+Function : (\S+)", sass)
    out = {}
    for name, body in zip(parts[1::2], parts[2::2]):
        code = [(int(m.group(1), 16), m.group(3) + (m.group(4) or ""), m.group(0))
                for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.SHL|\.MOV)?[^;]*;", body)]
        out[name] = (regs[name], [c for c in code if c[1] != "NOP"])
    return out


def rows(arch: int, dtype: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        found = {name: f for source in SOURCES for name, f in functions(compile_cubin(source, arch, pathlib.Path(d))).items()}
    out = []
    for name, (regs, code) in found.items():
        m = re.search(r"(mma_kernel|staged_kernel|lut_kernel)I(\w+?)((?:Li\d+E)+)E", name)
        if m is None or not m.group(2).endswith(dtype):
            continue
        params = [int(v) for v in re.findall(r"Li(\d+)E", m.group(3))]  # MT, U (, RT, WARPS)
        mt, rt = params[0], params[2] if len(params) > 2 else 1
        kernel = {"mma_kernel": "mma", "lut_kernel": "mma-lut"}.get(m.group(1), "mma-staged" if rt == 1 else "mma-staged2")
        if kernel == "mma-lut" and params[1] == 8:
            kernel += "-deep"  # batches of 8 tiles (nf4_cuda_gemv_lut.cu, Note: deep batches)
        if kernel.startswith("mma-lut") and params[2] > 1:
            kernel += f"-rt{params[2]}"  # row tiles a CTA (lut_kernel's RTW)
        ops = collections.Counter(op for _, op, _ in longest_loop(code))
        weights = ops["HMMA"] // mt * 8  # an m16n8k16 step takes 8 weights of each lane, for each n8 tile
        total = sum(ops.values())
        decode_ops = DECODE_PAIRS if kernel.startswith("mma-lut") else DECODE_SCALED
        decode = sum(n for op, n in ops.items() if op in decode_ops)
        out.append({"kernel": kernel, "MT": mt, "regs": regs, "instructions": total, "weights_per_lane": weights,
                    "per_weight": total / weights, "decode": decode / weights, "other": (total - decode) / weights,
                    "LDG": ops["LDG"], "SEL": ops["SEL"]})
    return sorted(out, key=lambda r: (r["kernel"], r["MT"]))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: sm_90a, H100/H200)")
    parser.add_argument("--dtype", choices=["bfloat16", "half"], default="bfloat16", help="x's type")
    parser.add_argument("--out", type=pathlib.Path, default=_common.RESULTS / "sass_csrc.json")
    args = parser.parse_args(argv)
    found = rows(args.arch, args.dtype)
    if not found:
        raise SystemExit(f"sass_csrc: no tensor-core kernel found in the cubins of {[p.name for p in SOURCES]}")
    return report(found, COLUMNS, f"sm_{args.arch}{'a' if args.arch >= 90 else ''}", args.out, dtype=args.dtype)


if __name__ == "__main__":
    main()

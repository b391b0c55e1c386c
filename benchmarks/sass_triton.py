"""What the Triton kernels compile to on a Hopper GPU, without one: instructions a weight.

    python benchmarks/sass_triton.py              # every Hopper autotune config, sm_90
    python benchmarks/sass_triton.py --quick      # one config a kernel
    python benchmarks/sass_triton.py --arch 80    # another target (compute capability x 10)
    python benchmarks/sass_triton.py --check      # compile a variant of every kernel branch; exit 1 on a failure

Triton compiles for any target on any machine (its own ptxas); the cubin is read back with the
cuobjdump Triton ships. Each kernel is compiled as a Llama-shaped call specializes it at run
time (pointers and sizes divisible by 16, unit stride along K, bfloat16, blocksize 64, double
quantization) in each config of its Hopper autotune list. Rows: registers a thread, then

- the GEMV (triton_gemv) at M = 1 and its skinny GEMM at M = 16 (tl.dot): the instructions of
  the K loop's body (the longest backward branch), the weights a thread decodes in one trip
  (BLOCK_N x BLOCK_K / threads), their ratio, and the barriers and shuffles inside the loop;
- dequantize (triton_dequantize, no loop): all instructions of the kernel, the elements a thread
  writes, their ratio, barriers.

This counts instructions; it does not time anything. A memory-bound kernel is fast when it
issues few instructions for each byte it moves and keeps enough warps resident (registers),
so these numbers say where a kernel stands between GPU runs (docs/kernels.md), not how fast
it is: that takes bench_nf4_linear.py on the GPU.

--check is the other use: the CPU tests run the kernels in Triton's interpreter, which never
compiles them, so a kernel that the GPU compiler rejects would pass them; --check compiles one
variant of every branch for the GPU (tests/benchmarks/test_sass_triton.py runs it).
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import _common  # noqa: E402

COLUMNS = ["kernel", "config", "regs", "instructions", "weights_per_thread", "per_weight", "barriers", "shuffles"]
SIXTEEN = [["tt.divisibility", 16]]  # what Triton infers at launch for a pointer or size divisible by 16


def cuobjdump() -> pathlib.Path:
    import triton

    tool = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.is_file():
        raise SystemExit(f"sass_triton: this Triton ships no cuobjdump ({tool}); install the Linux x86-64 wheel")
    return tool


def jitted(kernel):
    """The @triton.jit function under a kernel's autotune / heuristics wrappers."""
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def compile_cubin(fn, types: dict, constants: dict, divisible: tuple, config, arch: int) -> bytes:
    """The cubin of jitted `fn` for sm_<arch>: `types` the runtime arguments' Triton types,
    `constants` its constexpr values (config.kwargs added), `divisible` the arguments marked
    divisible by 16."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constants = {**constants, **config.kwargs}
    index = {name: (fn.arg_names.index(name),) for name in fn.arg_names}
    signature = {name: types.get(name, "constexpr") for name in fn.arg_names}
    source = ASTSource(fn=fn, signature=signature, constexprs={index[k]: v for k, v in constants.items()},
                       attrs={index[name]: SIXTEEN for name in divisible})
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages, "enable_fp_fusion": False}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options).asm["cubin"]


def read_cubin(cubin: bytes) -> tuple[int, list[tuple[int, str, str]]]:
    """(registers a thread, [(address, opcode, whole line)]) of a one-kernel cubin."""
    tool = cuobjdump()
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    code = [(int(m.group(1), 16), m.group(3), m.group(0))
            for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)[^;]*;", sass)]
    return regs, [c for c in code if c[1] != "NOP"]


def longest_loop(code: list) -> list:
    """The instructions between the target and the source of the longest backward branch."""
    loops = []
    for address, op, line in code:
        target = re.search(r"BRA\s+(?:`\(\w+\)\s*)?0x([0-9a-f]+)", line) if op == "BRA" else None
        if target and int(target.group(1), 16) < address:
            loops.append((int(target.group(1), 16), address))
    if not loops:
        raise ValueError("no loop in this kernel")
    start, end = max(loops, key=lambda p: p[1] - p[0])
    return [c for c in code if start <= c[0] <= end]


def row(kernel: str, config, regs: int, body: list, weights: int) -> dict:
    ops = collections.Counter(op for _, op, _ in body)
    return {"kernel": kernel, "config": str(config.kwargs) + f" w{config.num_warps} s{config.num_stages}",
            "regs": regs, "instructions": len(body), "weights_per_thread": weights, "per_weight": len(body) / weights,
            "barriers": ops["BAR"], "shuffles": ops["SHFL"]}


def gemv_types(dtype: str, double_quant: bool) -> dict:
    """The split-K kernel's runtime arguments as Triton types (x in `dtype`; uint8 scale codes or float32 scales)."""
    return {"x_ptr": f"*{dtype}", "packed_ptr": "*u8", "absmax_ptr": "*u8" if double_quant else "*fp32",
            **dict.fromkeys(["nested_ptr", "offset_ptr", "nf4_ptr", "dyn_ptr", "partial_ptr"], "*fp32"),
            **dict.fromkeys(["M", "N", "K", "M_BUCKET", "K_SPLIT", "stride_xm", "stride_xk"], "i32")}


def dequantize_types(dtype: str) -> dict:
    """The dequantize kernel's runtime arguments as Triton types (W out in `dtype`)."""
    return {"packed_ptr": "*u8", "absmax_ptr": "*u8", "out_ptr": f"*{dtype}", "n": "i32",
            **dict.fromkeys(["nested_ptr", "offset_ptr", "nf4_ptr", "dyn_ptr"], "*fp32")}


def gemv_rows(arch: int, quick: bool, block_m: int = 1) -> list[dict]:
    """The split-K kernel's K loop for M = 1 (block_m 1: CUDA-core products) or a skinny M
    (block_m 16..64: tl.dot)."""
    from lowrank.ops import triton_gemv

    fn = jitted(triton_gemv._splitk_kernel)
    types = gemv_types("bf16", True)
    del types["stride_xk"]  # a constant 1 below: x's rows are contiguous
    constants = dict(stride_xk=1, BLOCKSIZE=64, DOUBLE_QUANT=True, ROW_ALIGNED=True, DOT_PRECISION="tf32", BLOCK_K=64,
                     BLOCK_M=block_m, LOOKUP="gather")
    divisible = tuple(n for n in types if n.endswith("_ptr")) + ("N", "K", "K_SPLIT", "stride_xm")
    rows = []
    for config in triton_gemv._HOPPER[:1] if quick else triton_gemv._HOPPER:
        regs, code = read_cubin(compile_cubin(fn, types, constants, divisible, config, arch))
        weights = config.kwargs["BLOCK_N"] * constants["BLOCK_K"] // (32 * config.num_warps)
        rows.append(row(f"gemv M={block_m}", config, regs, longest_loop(code), weights))
    return rows


def dequantize_rows(arch: int, quick: bool) -> list[dict]:
    from lowrank.ops import triton_dequantize

    fn = jitted(triton_dequantize._kernel)
    types = dequantize_types("bf16")
    constants = dict(BLOCKSIZE=64, DOUBLE_QUANT=True, LOOKUP="gather", WHOLE=True)  # WHOLE: every Llama shape
    divisible = tuple(n for n in types if n.endswith("_ptr")) + ("n",)
    rows = []
    for config in triton_dequantize._CONFIGS[:1] if quick else triton_dequantize._CONFIGS:
        regs, code = read_cubin(compile_cubin(fn, types, constants, divisible, config, arch))
        weights = config.kwargs["ELEMS_PER_PROGRAM"] // (32 * config.num_warps)
        rows.append(row("dequantize", config, regs, code, weights))
    return rows


def variants():
    """(name, jitted kernel, types, constants, config) for the variants --check compiles: each
    branch of each kernel once (dtypes, M = 1 or tl.dot, the two decode paths, the two lookups,
    plain scales, whole or partial dequantize programs, the fused matmuls)."""
    from lowrank.ops import triton_dequantize, triton_gemv, triton_matmul

    gemv = jitted(triton_gemv._splitk_kernel)
    for dtype in ("bf16", "fp16", "fp32"):
        for block_m in (1, 16):
            for aligned in (True, False):
                constants = dict(BLOCKSIZE=64, DOUBLE_QUANT=True, ROW_ALIGNED=aligned, BLOCK_K=64 if aligned else 32,
                                 DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", BLOCK_M=block_m, LOOKUP="gather")
                yield f"gemv {dtype} M={block_m} aligned={aligned}", gemv, gemv_types(dtype, True), constants, \
                    triton_gemv._HOPPER[0]
    for block_m, lookup, double_quant in ((1, "select", True), (16, "select", True), (1, "gather", False)):
        constants = dict(BLOCKSIZE=64, DOUBLE_QUANT=double_quant, ROW_ALIGNED=True, BLOCK_K=64, DOT_PRECISION="tf32",
                         BLOCK_M=block_m, LOOKUP=lookup)
        yield f"gemv bf16 M={block_m} {lookup} double_quant={double_quant}", gemv, gemv_types("bf16", double_quant), \
            constants, triton_gemv._HOPPER[0]
    dequantize = jitted(triton_dequantize._kernel)
    for dtype in ("bf16", "fp16", "fp32"):
        for whole in (True, False):
            yield f"dequantize {dtype} whole={whole}", dequantize, dequantize_types(dtype), \
                dict(BLOCKSIZE=64, DOUBLE_QUANT=True, LOOKUP="gather", WHOLE=whole), triton_dequantize._CONFIGS[0]
    for kernel in (triton_matmul._linear_kernel, triton_matmul._grad_input_kernel):
        fn = jitted(kernel)
        types = {a: "*fp32" for a in fn.arg_names if a.endswith("_ptr")}
        types |= {a: "i32" for a in fn.arg_names if a in ("M", "N", "K", "M_BUCKET") or a.startswith("stride")}
        types |= {a: "*bf16" for a in ("x_ptr", "gy_ptr", "out_ptr", "gx_ptr", "bias_ptr") if a in fn.arg_names}
        types |= {"packed_ptr": "*u8", "absmax_ptr": "*u8"}
        constants = dict(BLOCKSIZE=64, DOUBLE_QUANT=True, ROW_ALIGNED=True, BLOCK_K=64, DOT_PRECISION="tf32",
                         LOOKUP="gather") | ({"HAS_BIAS": True} if "HAS_BIAS" in fn.arg_names else {})
        yield f"{fn.__name__} bf16", fn, types, constants, triton_matmul._HOPPER[2]


def check(arch: int) -> int:
    """Compile every variant for sm_<arch>; print and count the ones that fail."""
    failed = 0
    for name, fn, types, constants, config in variants():
        try:
            compile_cubin(fn, types, constants, (), config, arch)
        except Exception as e:  # noqa: BLE001 - a compile error of any kind is the finding
            failed += 1
            print(f"FAILED {name}: {type(e).__name__}: {' '.join(str(e).split())[:500]}")
        else:
            print(f"compiled {name}")
    return failed


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the first config of each kernel only")
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100/H200)")
    parser.add_argument("--out", type=pathlib.Path, default=_common.RESULTS / "sass_triton.json")
    parser.add_argument("--check", action="store_true",
                        help="compile one variant of each kernel branch and exit 1 if any fails (no table)")
    args = parser.parse_args(argv)
    from lowrank.ops import triton_nf4_tile

    if triton_nf4_tile.interpreting():
        parser.error("TRITON_INTERPRET is set: the kernels carry their interpreter configs; unset it")
    if args.check:
        failed = check(args.arch)
        print(f"{failed} variant(s) failed to compile for sm_{args.arch}")
        raise SystemExit(1 if failed else 0)
    rows = gemv_rows(args.arch, args.quick) + gemv_rows(args.arch, args.quick, 16) + dequantize_rows(args.arch, args.quick)
    return report(rows, COLUMNS, f"sm_{args.arch}", args.out)


def report(rows: list[dict], columns: list[str], target: str, out: pathlib.Path, **env) -> list[dict]:
    """Print and write (JSON + .md) counted rows with this machine's environment (also sass_csrc.py)."""
    import torch

    env = {"target": f"{target} (compiled here, not run)", **env, **_common.environment(torch.device("cpu"))}
    table = _common.markdown(rows, columns)
    _common.write(out, rows, env, table)
    print(f"{env}\n\n{table}\n\nwrote {out} (+ .md)")
    return rows


if __name__ == "__main__":
    main()

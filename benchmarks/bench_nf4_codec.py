"""NF4 codec speed on this machine: quantize and dequantize Llama-7B-sized weights with
double quantization, lowrank's plain-PyTorch codec (and, when lowrank._C is built, its C++
dequantize kernel) side by side with bitsandbytes and torchao's NF4, in one run, on the CPU
or (--device cuda) a GPU.

    python benchmarks/bench_nf4_codec.py            # the embedded default (make demo)
    python benchmarks/bench_nf4_codec.py --quick    # small shapes, a smoke run
    python benchmarks/bench_nf4_codec.py --device cuda   # the same on a GPU (quantize there: QLoRA's load path)

Prints a markdown table (median and 20/80 quantiles in ms, GB/s, speed-up over
bitsandbytes measured in the same run) and writes the rows with the machine and versions
to benchmarks/results/nf4_codec.json (+ .md).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from anywhere without installing lowrank

import torch  # noqa: E402

import _common  # noqa: E402
import lowrank  # noqa: E402
from lowrank import nf4  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096)]  # Llama-7B: attention projections, MLP up/gate
QUICK_SHAPES = [(256, 512)]
BLOCKSIZE = 64
DTYPE = torch.bfloat16
COLUMNS = ["op", "shape", "provider", "ms", "p20", "p80", "gbps", "speedup"]
CPU = torch.device("cpu")
# Checked before timing (_common, Note: check before timing): each provider's dequantize of its
# quantize against the dense weight, relative error allowed. NF4's rounding of normal weights costs
# ~0.09 (0.092 measured at blocksize 64, every provider here); a wrong layout or scale gives ~1.4.
RTOL = 0.2


def providers():
    """name -> (quantize(w) -> state or None, dequantize(state) -> w). Peers only when
    importable. A provider whose quantize is None times dequantize alone, of lowrank's state."""
    out = {"lowrank": (lambda w: nf4.quantize(w, BLOCKSIZE, True), nf4.dequantize)}
    if "csrc" in lowrank.ops.backends.available("nf4_dequantize"):  # the C++ kernel behind the op
        out["lowrank-csrc"] = (None, lowrank.nf4_dequantize)
    try:
        import bitsandbytes.functional as bnb_f

        def bnb_quantize(w):
            return bnb_f.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4")

        out["bitsandbytes"] = (bnb_quantize, lambda s: bnb_f.dequantize_4bit(s[0], s[1], quant_type="nf4"))
    except ImportError:
        pass
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

        out["torchao"] = (lambda w: to_nf4(w, BLOCKSIZE, 256), lambda t: t.get_original_weight())
    except ImportError:
        pass
    return out


def run(shapes, quick: bool, device: torch.device = CPU) -> list[dict]:
    rows = []
    for shape in shapes:
        w = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device, DTYPE)
        # bytes moved: the bf16 weight one way, 4.127 bits per weight the other way
        moved = w.numel() * w.element_size() + nf4.quantize(w, BLOCKSIZE, True).nbytes
        q = nf4.quantize(w, BLOCKSIZE, True)
        for name, (quantize, dequantize) in providers().items():
            # Note: a provider that fails is left out, with the reason, not the run (a peer's kernel
            # missing for this GPU must not cost lowrank's rows; the GPU run is made once)
            try:
                state = quantize(w) if quantize else q
                _common.check_close(f"{name} dequantize(quantize(w)) {shape[0]}x{shape[1]}", dequantize(state), w, RTOL)
                timed = {"quantize": lambda: quantize(w)} if quantize else {}
                timed["dequantize"] = lambda: dequantize(state)
                times = {op: _common.bench(fn, device, quick) for op, fn in timed.items()}
            except Exception as e:  # noqa: BLE001 - printed, and the provider has no row
                print(f"{name} {shape[0]}x{shape[1]} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            for op, (ms, p20, p80) in times.items():
                rows.append(dict(op=op, shape=f"{shape[0]}x{shape[1]}", provider=name, ms=ms, p20=p20, p80=p80,
                                 gbps=moved / (ms * 1e-3) / 1e9))  # fmt: skip
    base = {(r["op"], r["shape"]): r["ms"] for r in rows if r["provider"] == "bitsandbytes"}
    for r in rows:  # speed-up over bitsandbytes measured in the same run
        b = base.get((r["op"], r["shape"]))
        r["speedup"] = b / r["ms"] if b else None
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few repetitions (smoke run)")
    parser.add_argument("--out", type=pathlib.Path, default=_common.RESULTS / "nf4_codec.json")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cpu (default) or cuda: where the weight is and the codecs run")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this PyTorch sees no CUDA device")
    env = _common.environment(device)
    rows = run(QUICK_SHAPES if args.quick else SHAPES, args.quick, device)
    table = _common.markdown(rows, COLUMNS)
    _common.write(args.out, rows, env, table)
    print(f"NF4 codec, {DTYPE} weight, blocksize {BLOCKSIZE}, double quantization; ms, speed-up over bitsandbytes.")
    print(f"{env}\n\n{table}\n\nwrote {args.out} (+ .md)")
    return rows


if __name__ == "__main__":
    main()

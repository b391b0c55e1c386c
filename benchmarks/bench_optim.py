"""One optimizer step over LoRA-shaped adapters, and the memory its states take: torch.optim.AdamW
(the baseline), lowrank's PagedAdamW with 8-bit states, and bitsandbytes' AdamW8bit when importable.

    python benchmarks/bench_optim.py            # the adapters of 4 Llama-2-7B layers, r 16 (5.3M parameters)
    python benchmarks/bench_optim.py --quick    # one layer

Adapters: for each layer, A (16, in) and B (out, 16) of the seven projections (4096 / 11008
features), float32 (PEFT's default adapter dtype), random gradients. The 8-bit rows: one tensor at a time (the CPU's
default) and, foreach, every tensor of the group as one flat tensor (CUDA's default). Rows: ms a step (median and
20th-80th percentile of 10, after one warm-up step that creates the states), ratio = AdamW's time /
the provider's (> 1 is faster), and the bytes of optimizer state (every state tensor but the step
count). The parameters stay on the device the step runs on: CUDA when present (unpaged there, so
the time is the update's), else the CPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common  # noqa: E402

from lowrank import PagedAdamW  # noqa: E402

COLUMNS = ["provider", "params", "ms", "p20_ms", "p80_ms", "ratio", "state_mib", "state_bytes_per_param"]
PROJECTIONS = [(4096, 4096)] * 4 + [(4096, 11008), (4096, 11008), (11008, 4096)]  # q k v o, gate up, down (in, out)
RANK = 16
# Checked before timing (_common, Note: check before timing): each provider's first two updates
# against torch.optim.AdamW's on the same parameters and gradients, relative error allowed. The
# first is exact (m and v are rounded to 8 bits after it); the second reads the rounded moments
# (0.026 of the two updates measured here, each 8-bit provider); a wrong update (other lr, betas,
# sign, weight decay) is off by ~1.
RTOL = 0.1


def adapters(layers: int, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    params = []
    for _ in range(layers):
        for d_in, d_out in PROJECTIONS:
            for shape in ((RANK, d_in), (d_out, RANK)):
                p = torch.nn.Parameter((torch.randn(shape, generator=g) * 0.01).to(device))
                p.grad = torch.randn(shape, generator=g).to(device)
                params.append(p)
    return params


def providers() -> dict:
    out = {"torch AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-4),
           "lowrank PagedAdamW state_bits=8": lambda ps: PagedAdamW(ps, lr=1e-4, state_bits=8, paged=False),
           "lowrank PagedAdamW state_bits=8 foreach": lambda ps: PagedAdamW(ps, lr=1e-4, state_bits=8, paged=False,
                                                                            foreach=True)}
    try:
        import bitsandbytes as bnb

        out["bitsandbytes AdamW8bit"] = lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-4)
    except ImportError:
        pass
    return out


def check_update(name: str, make, layers: int, device: torch.device) -> None:
    """WrongResult unless two steps of make(params) move the parameters as torch.optim.AdamW's do."""
    moved = {}
    for who, build in (("reference", lambda ps: torch.optim.AdamW(ps, lr=1e-4)), (name, make)):
        params = adapters(layers, device)
        before = [p.detach().clone() for p in params]
        opt = build(params)
        opt.step()
        opt.step()
        moved[who] = torch.cat([(p.detach() - b).flatten() for p, b in zip(params, before)])
    _common.check_close(f"{name}'s first two updates against torch AdamW's", moved[name], moved["reference"], RTOL)


def state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items()
               if torch.is_tensor(t) and k != "step" and not k.startswith("qmap"))  # bnb's shared maps: 2 KiB


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one layer's adapters, 3 steps")
    parser.add_argument("--out", type=Path, default=_common.RESULTS / "optim.json")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    layers = 1 if args.quick else 4
    rows = []
    for name, make in providers().items():
        check_update(name, make, layers, device)
        params = adapters(layers, device)
        opt = make(params)
        ms, p20, p80 = _common.bench(opt.step, device, quick=args.quick)  # the first call (warm-up) makes the states
        n = sum(p.numel() for p in params)
        rows.append({"provider": name, "params": n, "ms": ms, "p20_ms": p20, "p80_ms": p80,
                     "state_mib": state_bytes(opt) / 2**20, "state_bytes_per_param": state_bytes(opt) / n})
    for r in rows:
        r["ratio"] = rows[0]["ms"] / r["ms"]
    _common.report(args.out, rows, COLUMNS, device)
    return rows


if __name__ == "__main__":
    main()

"""Peak host memory of getting a 4-bit model from a dense checkpoint: transformers'
from_pretrained followed by lowrank.quantize (the full-precision model exists once), against
lowrank.skeleton + lowrank.load_and_quantize (tensor by tensor), in one run.

    python benchmarks/bench_load.py            # a Llama of ~120M parameters saved in bf16 (240 MB)
    python benchmarks/bench_load.py --quick    # a tiny one, a smoke run

Each provider runs in a fresh Python process (peak RSS, VmHWM, is per process and never goes down; Linux only);
a third process that only imports the libraries gives the floor, subtracted from both. Rows:
peak_mb (above the import floor), seconds, and ratio = peak / the from_pretrained path's peak.
The checkpoint is sharded (--shard, default 50MB): load_and_quantize closes each shard's memory
map before the next, so its file-backed pages count once per shard, not for the whole model.
Both providers must end with the same state dict (each child prints a digest of every tensor);
a run where they do not stops with the entries that differ.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common  # noqa: E402

FULL = dict(hidden=1024, layers=8, vocab=8192, shard="50MB")
QUICK = dict(hidden=64, layers=2, vocab=256, shard="50KB")

CHILD = r"""
import json, sys, time
import torch, transformers, lowrank
path, how = sys.argv[1], sys.argv[2]
transformers.LlamaForCausalLM  # the model code's import belongs to the floor, not to either provider
start = time.perf_counter()
if how == "from_pretrained+quantize":
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    lowrank.quantize(model, lowrank.NF4Config())
elif how == "skeleton+load_and_quantize":
    with lowrank.skeleton():
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(path),
                                                              dtype=torch.bfloat16)
    lowrank.load_and_quantize(model, path, lowrank.NF4Config())
seconds = time.perf_counter() - start
size = 0 if how == "imports" else sum(t.numel() * t.element_size() for t in model.state_dict().values())
# VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over fork + exec from the parent
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
# after the peak is read: a digest of every tensor of the state dict (bytes, dtype, shape), so that the
# parent can check both providers loaded the same 4-bit model
import hashlib
digests = {} if how == "imports" else {
    k: hashlib.sha256(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                      + f"{t.dtype}{tuple(t.shape)}".encode()).hexdigest()[:16]
    for k, t in model.state_dict().items()}
print(json.dumps({"peak_kb": peak_kb, "seconds": seconds, "bytes": size, "digests": digests}))
"""


def measure(path: str, how: str) -> dict:
    root = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", CHILD, path, how], capture_output=True, text=True,
                         env={**__import__("os").environ, "PYTHONPATH": root})
    if out.returncode:  # the child's own error: check=True would say only its exit status, its stderr captured away
        raise RuntimeError(f"bench_load: the {how!r} process failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def check_same_state(digests: dict[str, dict[str, str]]) -> None:
    """WrongResult unless every provider loaded the same state dict (the same keys, and each tensor's
    bytes, dtype and shape: the digests the children print): a provider that loads less, or other
    weights, has no peak memory to compare (_common, Note: check before timing)."""
    (a, ours), *rest = digests.items()
    for b, theirs in rest:
        differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
        if differ:
            raise _common.WrongResult(f"{b} loaded another model than {a}: {len(differ)} of {len(ours | theirs)} "
                                      f"state-dict entries differ (missing, or other values), e.g. {differ[:4]}")


def main(argv: list[str]) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--shard", help="max shard size of the saved checkpoint")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "load.json")
    args = parser.parse_args(argv)
    shape = QUICK if args.quick else FULL
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                                   intermediate_size=shape["hidden"] * 11 // 4, num_hidden_layers=shape["layers"],
                                   num_attention_heads=max(shape["hidden"] // 64, 2),
                                   num_key_value_heads=max(shape["hidden"] // 64, 2))
    with tempfile.TemporaryDirectory() as path:
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(path, max_shard_size=args.shard or shape["shard"])
        del model
        floor = measure(path, "imports")["peak_kb"]
        rows, digests = [], {}
        for how in ("from_pretrained+quantize", "skeleton+load_and_quantize"):
            r = measure(path, how)
            digests[how] = r["digests"]
            rows.append({"case": f"llama {params / 1e6:.0f}M bf16 -> nf4", "provider": how,
                         "peak_mb": (r["peak_kb"] - floor) / 1024, "model_mb": r["bytes"] / 2**20,
                         "seconds": r["seconds"]})
    check_same_state(digests)
    for r in rows:
        r["ratio"] = r["peak_mb"] / rows[0]["peak_mb"]
    table = _common.markdown(rows, ["case", "provider", "peak_mb", "model_mb", "seconds", "ratio"])
    print(table)
    _common.write(args.out, rows, _common.environment(torch.device("cpu")), table)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])

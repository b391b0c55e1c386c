"""Run every benchmarks/bench_*.py, one after the other.

    python benchmarks/run.py [--quick] [--out DIR]

Each benchmark takes `--quick` and `--out FILE.json` (its rows; a benchmark may write a
.md table and a .png plot beside it); this script gives bench_<name>.py the file
DIR/<name>.json (DIR defaults to benchmarks/results). Each runs in its own process, so a
crash in one does not stop the rest; the exit status is the number that failed."""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="run every benchmarks/bench_*.py")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (the CPU smoke test)")
    parser.add_argument("--out", type=pathlib.Path, default=HERE / "results", help="folder for the results")
    args = parser.parse_args(argv)
    failed = []
    for script in sorted(HERE.glob("bench_*.py")):
        cmd = [sys.executable, str(script), "--out", str(args.out / f"{script.stem.removeprefix('bench_')}.json")]
        cmd += ["--quick"] if args.quick else []
        print(f"== {' '.join(cmd[1:])}", flush=True)
        if subprocess.run(cmd).returncode != 0:
            failed.append(script.name)
    print(f"== {len(failed)} benchmark(s) failed: {failed}" if failed else "== all benchmarks ran")
    return len(failed)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

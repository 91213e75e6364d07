"""A cached `mmsearch query` from a fresh process, two source checkouts side by side.

Runs `python CHECKOUT/cli.py query TEXT --index INDEX` for each checkout in turn, `--rounds`
times, after one warm-up run each (page cache, query cache), and prints the median, min and
max wall time per checkout. The checkouts must read the same index format. Typical use, to
compare a branch with main:

    git archive main | tar -x -C /tmp/main-src
    .venv/bin/python benchmarks/bench_checkouts.py --index IDX /tmp/main-src . --rounds 21
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkouts", nargs="+", type=Path, help="source trees holding cli.py")
    ap.add_argument("--index", type=Path, required=True)
    ap.add_argument("--text", default="a red circle")
    ap.add_argument("--rounds", type=int, default=21)
    args = ap.parse_args()
    argv = {tree: [sys.executable, str(tree / "cli.py"), "query", args.text, "--index", str(args.index)]
            for tree in args.checkouts}
    times: dict[Path, list[float]] = {tree: [] for tree in args.checkouts}
    for cmd in argv.values():
        subprocess.run(cmd, check=True, capture_output=True)
    for _ in range(args.rounds):
        for tree, cmd in argv.items():
            start = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            times[tree].append(time.perf_counter() - start)
    for tree, t in times.items():
        print(f"{tree}: median {statistics.median(t):.3f} s, min {min(t):.3f} s, max {max(t):.3f} s ({len(t)} runs)")


if __name__ == "__main__":
    main()

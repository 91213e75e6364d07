"""Time `mmsearch dupes`'s core on synthetic vectors: blocked exact pairs + union-find.

Run from the repository root::

    .venv/bin/python benchmarks/bench_dupes.py [--n 100000] [--dim 512] [--groups 5000]

Makes `--n` unit vectors: `--groups` planted groups of 2-4 near-copies (noise of length
0.16, cosine ≈ 0.975 to each other) and random vectors for the rest, shuffled, then
times `retrieval.dupes.group_rows(vectors, 0.95)` and checks that exactly the planted groups come back.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from retrieval.dupes import group_rows  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--groups", type=int, default=5000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    sizes = rng.integers(2, 5, args.groups)
    centers = rng.normal(size=(args.groups, args.dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    # Noise of total length ~0.16: two copies of one center have cosine ~0.975.
    members = np.repeat(centers, sizes, axis=0)
    members += rng.normal(scale=0.16 / np.sqrt(args.dim), size=members.shape).astype(np.float32)
    rest = rng.normal(size=(args.n - len(members), args.dim)).astype(np.float32)
    vectors = np.concatenate([members, rest])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    order = rng.permutation(len(vectors))
    truth = np.concatenate([np.repeat(np.arange(args.groups), sizes), -1 - np.arange(len(rest))])[order]
    vectors = vectors[order]
    start = time.perf_counter()
    groups = group_rows(vectors, 0.95)
    elapsed = time.perf_counter() - start
    found = sorted(sorted(truth[g].tolist()) for g in groups)
    exact = found == sorted([[g] * int(s) for g, s in enumerate(sizes)])
    print(f"{args.n} vectors x {args.dim}: {len(groups)} groups ({args.groups} planted, "
          f"{'all found exactly' if exact else 'MISMATCH'}) in {elapsed:.1f} s")
    sys.exit(0 if exact else 1)


if __name__ == "__main__":
    main()

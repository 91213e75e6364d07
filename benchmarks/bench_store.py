"""Cost of one store commit per image: the database share of indexing at GPU speed.

    .venv/bin/python benchmarks/bench_store.py [--batches 8] [--batch-size 256] [--dim 512]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from retrieval.store import NewFile, Store  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--dim", type=int, default=512)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(Path(tmp), create=True)
        elapsed = 0.0
        for b in range(args.batches):
            batch = [NewFile(f"/photos/{b}/{i}.jpg", "image", 1000, 1.0, "0" * 64, [0], [None],
                             rng.standard_normal((1, args.dim)).astype(np.float32)) for i in range(args.batch_size)]
            start = time.perf_counter()
            store.commit(added=batch)
            elapsed += time.perf_counter() - start
        store.close()
    n = args.batches * args.batch_size
    print(f"{1000 * elapsed / n:.3f} ms per image ({n} images in commits of {args.batch_size}, dim {args.dim})")


if __name__ == "__main__":
    main()

"""Cost of store commits per image, and disk bytes per item, for SQLite page sizes side by side.

    .venv/bin/python benchmarks/bench_store.py [--batches 40] [--batch-size 256] [--dim 512]
        [--page-sizes 4096 16384]

The commit cost is the database share of indexing at GPU speed. Each page size gets a
fresh database filled with the same vectors.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from retrieval import store as store_module  # noqa: E402
from retrieval.config import DB_NAME  # noqa: E402
from retrieval.records import ModelManifest, NewFile  # noqa: E402


def run(page_size: int, args: argparse.Namespace) -> tuple[float, float]:
    """(ms per image committed, database bytes per item) with new databases of `page_size`."""
    store_module.PAGE_SIZE = page_size
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        store = store_module.Store.open(Path(tmp))
        store.claim_model(ModelManifest("bench", None, "0" * 64, args.dim))  # the model the vectors are of
        elapsed = 0.0
        for b in range(args.batches):
            batch = [NewFile(f"/photos/{b}/{i}.jpg", "image", 1000, 1.0, "0" * 64, [0], [None],
                             rng.standard_normal((1, args.dim)).astype(np.float32)) for i in range(args.batch_size)]
            start = time.perf_counter()
            store.commit(added=batch)
            elapsed += time.perf_counter() - start
        store.close()
        db = Path(tmp) / DB_NAME
        with sqlite3.connect(db) as conn:
            assert conn.execute("PRAGMA page_size").fetchone()[0] == page_size
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        size = db.stat().st_size
    n = args.batches * args.batch_size
    return 1000 * elapsed / n, size / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--page-sizes", type=int, nargs="+", default=[4096, store_module.PAGE_SIZE])
    args = ap.parse_args()
    n = args.batches * args.batch_size
    print(f"{n} images in commits of {args.batch_size}, dim {args.dim} ({4 * args.dim} bytes of float32 each)")
    print("| page size | ms per image | bytes per item on disk |")
    print("|---|---|---|")
    for page_size in args.page_sizes:
        ms, per_item = run(page_size, args)
        print(f"| {page_size} | {ms:.3f} | {per_item:,.0f} |")


if __name__ == "__main__":
    main()

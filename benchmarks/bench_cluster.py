"""Beyond one machine (issue 14): measurements of the cluster back ends, one part at a time.

    .venv/bin/python benchmarks/bench_cluster.py --part metadata [--batches 40] [--batch-size 256]
        [--dim 512] [--repeat 3] [--pg URL]

`--part metadata`: insert throughput of the metadata store, PostgreSQL vs SQLite, in the same
run with the same batches: each batch of `--batch-size` files (one 512-d float32 vector each)
is one `Store.commit`, the call the indexer makes per batch. SQLite is an index directory's
database (WAL, synchronous=NORMAL); PostgreSQL a throwaway local cluster over TCP on
127.0.0.1 (tests/pg_cluster.py), once with the server's durable defaults (an fsync per commit)
and once with synchronous_commit=off (a crash may lose the last commits but never corrupts,
like SQLite's NORMAL), or the server at `--pg URL` (a database named in it is used as it is).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]
from retrieval.records import ModelManifest, NewFile  # noqa: E402
from retrieval.store import Store  # noqa: E402


def batches(args: argparse.Namespace) -> list[list[NewFile]]:
    """The same files and vectors for every store."""
    rng = np.random.default_rng(0)
    return [[NewFile(f"/photos/{b}/{i}.jpg", "image", 1000, 1.0, "0" * 64, [0], [None],
                     rng.standard_normal((1, args.dim)).astype(np.float32)) for i in range(args.batch_size)]
            for b in range(args.batches)]


def insert_rate(open_store: Callable[[], Store], data: list[list[NewFile]]) -> float:
    """Items per second committed into a new store, one `commit` per batch."""
    store = open_store()
    store.claim_model(ModelManifest("bench", None, "0" * 64, len(data[0][0].vectors[0])))  # whose vectors these are
    try:
        start = time.perf_counter()
        for batch in data:
            store.commit(added=batch)
        elapsed = time.perf_counter() - start
    finally:
        store.close()
    return sum(len(b) for b in data) / elapsed


def part_metadata(args: argparse.Namespace) -> None:
    """PostgreSQL vs SQLite insert throughput, interleaved rounds, median of `--repeat`."""
    from sqlalchemy import create_engine, text

    from retrieval.sql_store import connect, parse_url

    data = batches(args)
    n = sum(len(b) for b in data)
    round_number = iter(range(10**6))
    scratch = tempfile.TemporaryDirectory(prefix="bench-sqlite-")  # removed when the part ends

    def sqlite_store() -> Store:
        return Store.open(Path(scratch.name) / f"idx{next(round_number)}")

    def pg_store(server: str, options: str) -> Callable[[], Store]:
        def make() -> Store:
            name = f"bench_{os.getpid()}_{next(round_number)}"
            admin = create_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
            admin.dispose()
            url = f"{server}/{name}" + (f"?options={options}" if options else "")
            return Store.attach(connect(parse_url(url)))

        return make

    def measure(server: str) -> dict[str, list[float]]:
        stores = {"SQLite (WAL, synchronous=NORMAL)": sqlite_store,
                  "PostgreSQL (synchronous_commit=off)": pg_store(server, "-csynchronous_commit%3Doff"),
                  "PostgreSQL (defaults: fsync per commit)": pg_store(server, "")}
        rates: dict[str, list[float]] = {name: [] for name in stores}
        insert_rate(sqlite_store, data[:2])  # warm imports and caches once
        for _ in range(args.repeat):
            for name, make in stores.items():
                rates[name].append(insert_rate(make, data))
        return rates

    if args.pg:
        rates = measure(args.pg.rstrip("/"))
    else:
        from pg_cluster import cluster

        with cluster(durable=True) as server:
            rates = measure(server)
    scratch.cleanup()
    print(f"{n} items in commits of {args.batch_size}, dim {args.dim}; median of {args.repeat} interleaved rounds; "
          f"{platform.node()} {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| metadata store | items/s | vs SQLite |")
    print("|---|---|---|")
    base = float(np.median(next(iter(rates.values()))))
    for name, values in rates.items():
        median = float(np.median(values))
        print(f"| {name} | {median:,.0f} | {median / base:.2f}x |")


PARTS = {"metadata": part_metadata}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=sorted(PARTS), required=True)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--pg", metavar="URL", help="a PostgreSQL server to use (postgresql+psycopg://USER@HOST:PORT), "
                    "default: a throwaway local cluster")
    args = ap.parse_args()
    PARTS[args.part](args)


if __name__ == "__main__":
    main()

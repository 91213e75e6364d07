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

`--part vectors`: query latency of the vector stores, FAISS (`retrieval.vectors.VectorIndex`, the
embedded default) against Milvus (`retrieval.milvus_store.MilvusVectorStore`, here milvus-lite in
this process), on the same generated unit vectors, in the same run: each store builds its
automatic layout for the size (FAISS: Flat / HNSW32,SQfp16 tuned; Milvus: FLAT / HNSW M=32), then
answers the same single-vector queries one at a time; p50/p95 latency and recall@10 against exact
search are printed as JSON.

    .venv/bin/python benchmarks/bench_cluster.py --part vectors --n 100000 [--dim 512] [--queries 300]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
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


def generated(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Clustered unit vectors (1,000 centres, spread like image embeddings of many subjects)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((1000, dim)).astype(np.float32)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        block = centres[rng.integers(0, len(centres), m)] + 0.6 * rng.standard_normal((m, dim)).astype(np.float32)
        out[start:start + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


class GeneratedReader:
    """The part of a metadata store a vector store reads, over generated vectors (kind 'image')."""

    def __init__(self, vectors: np.ndarray) -> None:
        self.vecs = vectors
        self.ids = np.arange(1, len(vectors) + 1, dtype=np.int64)
        settings: dict[str, str | None] = {}
        self.setting, self.set_setting = settings.get, settings.__setitem__  # also the writer's
        self.generation = lambda model=None: 1

    def models(self) -> dict[str, ModelManifest]:
        return {"bench": ModelManifest("bench", None, None, self.vecs.shape[1])}

    def item_ids(self, kind: str, model: str | None = None) -> np.ndarray:
        return self.ids if kind == "image" else np.zeros(0, np.int64)

    def vectors(self, kind: str, ids: np.ndarray | None = None,
                model: str | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if kind != "image":
            return
        ids = self.ids if ids is None else np.asarray(ids)
        for start in range(0, len(ids), 50_000):
            part = ids[start:start + 50_000]
            yield part, self.vecs[part - 1]


def _lite_indexes_built(name: str, path: str) -> None:
    """Wait for milvus-lite's background index build over the flushed segments (it has no RPC for
    that: its in-process engine is asked directly), so queries are timed on the built index."""
    from milvus_lite.server_manager import server_manager_instance

    _, db, _ = server_manager_instance._servers[os.path.abspath(path)]
    db.get_collection(name)._wait_for_bg()


def _latency(search, queries: np.ndarray, k: int) -> tuple[dict[str, float], np.ndarray]:
    """p50/p95/mean milliseconds of one query at a time, and the ids found [q, k]."""
    search(queries[0], k)  # warm up
    times, found = [], []
    for q in queries:
        start = time.perf_counter()
        _, ids = search(q, k)
        times.append((time.perf_counter() - start) * 1000)
        found.append(ids[0])
    t = np.array(times)
    return {"p50_ms": round(float(np.percentile(t, 50)), 3), "p95_ms": round(float(np.percentile(t, 95)), 3),
            "mean_ms": round(float(t.mean()), 3)}, np.array(found)


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return round(float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)])), 4)


def part_vectors(n: int, dim: int, n_queries: int, k: int = 10) -> dict[str, object]:
    """FAISS vs Milvus (lite) query latency at `n` generated vectors, same data, same queries."""
    from retrieval.milvus_store import MilvusVectorStore
    from retrieval.stores import VectorKey
    from retrieval.vectors import VectorIndex

    vecs = generated(n, dim)
    rng = np.random.default_rng(1)
    noise = rng.standard_normal((n_queries, dim)).astype(np.float32) * (0.3 / np.sqrt(dim))  # |noise| ~ 0.3
    queries = vecs[rng.choice(n, n_queries, replace=False)] + noise
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    truth = np.argpartition(-(queries @ vecs.T), k, axis=1)[:, :k] + 1  # ids are rows + 1 (recall ignores order)
    reader = GeneratedReader(vecs)
    out: dict[str, object] = {"n": n, "dim": dim, "queries": n_queries, "k": k}

    start = time.perf_counter()
    faiss_index = VectorIndex.build(reader.ids, vecs, dim)
    build = time.perf_counter() - start
    stats, found = _latency(lambda q, kk: faiss_index.search(q[None, :], kk), queries, k)
    out["faiss"] = {"layout": faiss_index.layout, "build_s": round(build, 1), **stats, "recall@10": _recall(found, truth)}

    with tempfile.TemporaryDirectory() as tmp:
        store = MilvusVectorStore(str(Path(tmp) / "bench.db"), reader, "bench", lambda: reader)  # type: ignore[arg-type]
        key = VectorKey("bench", "image")
        start = time.perf_counter()
        vector_set = store.get(key)  # a new collection, filled from the "metadata store", flushed
        filled = time.perf_counter() - start
        _lite_indexes_built(vector_set.name, store.uri)
        build = time.perf_counter() - start
        stats, found = _latency(lambda q, kk: vector_set.search(q[None, :], kk), queries, k)
        out["milvus_lite"] = {"layout": vector_set.layout, "build_s": round(build, 1), "upsert_flush_s": round(filled, 1),
                              **stats, "recall@10": _recall(found, truth), "vectors": len(vector_set)}
        # Opened with the metadata store a generation ahead (as after a crash) but nothing to repair:
        # the cost of a reconcile is reading every id back from Milvus.
        reader.generation = lambda model=None: 2
        start = time.perf_counter()
        MilvusVectorStore(store.uri, reader, "bench", lambda: reader).get(key)  # type: ignore[arg-type]
        out["milvus_lite"]["reconcile_nothing_s"] = round(time.perf_counter() - start, 2)  # type: ignore[index]
        allowed = reader.ids[: max(k, n // 100)]  # a 1 % --under / filter share, applied inside each store
        stats, _ = _latency(lambda q, kk: faiss_index.search(q[None, :], kk, allowed), queries[:100], k)
        out["faiss"]["filtered_1pct"] = stats  # type: ignore[index]
        stats, _ = _latency(lambda q, kk: vector_set.search(q[None, :], kk, allowed), queries[:100], k)
        out["milvus_lite"]["filtered_1pct"] = stats  # type: ignore[index]
    return out


def part_vectors_cli(args: argparse.Namespace) -> None:
    """`--part vectors`: print `part_vectors` as JSON with the machine and its load."""
    result = part_vectors(args.n, args.dim, args.queries)
    result["machine"] = f"{platform.node()} {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}"
    print(json.dumps(result, indent=1))


PARTS = {"metadata": part_metadata, "vectors": part_vectors_cli}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=sorted(PARTS), required=True)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--n", type=int, default=100_000, help="vectors (--part vectors)")
    ap.add_argument("--queries", type=int, default=300, help="queries (--part vectors)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--pg", metavar="URL", help="a PostgreSQL server to use (postgresql+psycopg://USER@HOST:PORT), "
                    "default: a throwaway local cluster")
    args = ap.parse_args()
    PARTS[args.part](args)


if __name__ == "__main__":
    main()

"""Search benchmark: numpy brute force vs exact FAISS vs the auto-chosen layout.

Runs the real code (``retrieval.vectors.VectorIndex.build/search/save/load``) on synthetic
L2-normalised float32 vectors and prints a markdown table.

    .venv/bin/python benchmarks/bench_search.py --n 100000 1000000 \
        --dist clustered continuous --queries 1000 --seed 0

Distributions (queries are held-out points of the same distribution, not in the index):
  clustered   4096 random unit centres + isotropic Gaussian noise (norm 0.5), normalised.
  continuous  rank-24 Gaussian latent through a random 24x512 projection + N(0, 0.1^2)
              noise per dimension, normalised: neighbours do not sit in tidy cells.

Columns: build = wall seconds (CPU seconds of this process in brackets: on a shared
machine the wall time includes waiting for the CPU); index MB = bytes of the saved
vector file (FAISS payload + id map), i.e. what the index holds in memory; p50/p99 =
single-query wall latency (one query per call, k=10); p50 cpu = CPU time of the
calling thread per query (numpy's BLAS threads not counted); batch = queries/s for all
queries in one call; recall@10 against exact search; speedup = numpy p50 / p50.
Rows "allowed=s" search with a filter of a random share s of the ids (100 queries);
rows "efSearch=e" re-time the same graph at another beam width (--ef-sweep).
The auto layout's build includes its tuning (efSearch / nprobe for recall@10 >= 0.95 on
held-out stored vectors); notes show the recall the tuning measured. --max-memory adds a
row for the layout picked under that budget, re-ranked with exact vectors fetched by id
from the in-memory array (the database's role in mmsearch; a SQLite fetch is not timed).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from retrieval.vectors import VectorIndex  # noqa: E402

DIM = 512
K = 10
CHUNK = 100_000


# --- data ----------------------------------------------------------------------------------


def generate(dist: str, n: int, dim: int, seed: int, stream: int) -> np.ndarray:
    """``n`` unit vectors of ``dist``; generated in chunks so only one chunk of temporaries
    lives at a time. ``stream`` separates the indexed points (1) from the queries (2) while
    the distribution itself (centres / projection) depends on ``seed`` only."""
    base = np.random.default_rng([seed, 0])
    if dist == "clustered":
        centres = base.standard_normal((4096, dim), dtype=np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    elif dist == "continuous":
        proj = base.standard_normal((24, dim), dtype=np.float32) / np.float32(np.sqrt(24))
    else:
        raise ValueError(dist)
    out = np.empty((n, dim), dtype=np.float32)
    for c, start in enumerate(range(0, n, CHUNK)):
        rng = np.random.default_rng([seed, stream, c])
        m = min(CHUNK, n - start)
        if dist == "clustered":
            x = centres[rng.integers(0, len(centres), m)]
            x += rng.standard_normal((m, dim), dtype=np.float32) * np.float32(0.5 / np.sqrt(dim))
        else:
            x = rng.standard_normal((m, 24), dtype=np.float32) @ proj
            x += rng.standard_normal((m, dim), dtype=np.float32) * np.float32(0.1)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[start:start + m] = x
    return out


# --- measurement helpers -------------------------------------------------------------------


def numpy_topk(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """What rclip / llm do: full scan, argpartition, sort the k winners."""
    scores = x @ q
    top = np.argpartition(-scores, k)[:k]
    return top[np.argsort(-scores[top])]


def latencies(fn, queries: np.ndarray) -> np.ndarray:
    """[2, nq] seconds per call: wall clock, and CPU time of the calling thread (what the
    call costs when the machine is not shared; BLAS worker threads are not counted)."""
    out = np.empty((2, len(queries)))
    fn(queries[0])  # warm-up: page faults, lazy caches
    for i, q in enumerate(queries):
        t, c = time.perf_counter(), time.thread_time()
        fn(q)
        out[0, i], out[1, i] = time.perf_counter() - t, time.thread_time() - c
    return out


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    hits = [len(np.intersect1d(f[f >= 0], t)) for f, t in zip(found, truth)]
    return float(np.sum(hits)) / truth.size


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


# --- one (n, dist) case --------------------------------------------------------------------


def run_case(n: int, dist: str, args: argparse.Namespace, rows: list[dict]) -> None:
    print(f"## n={n:,} dist={dist} (load avg {loadavg()})", file=sys.stderr, flush=True)
    x, gen_s, _ = timed(lambda: generate(dist, n, DIM, args.seed, 1))
    queries = generate(dist, args.queries, DIM, args.seed, 2)
    ids = np.arange(1, n + 1, dtype=np.int64)  # like SQLite rowids
    raw = x.nbytes
    slow_q = queries[: args.slow_queries]
    print(f"  generated in {gen_s:.1f}s", file=sys.stderr, flush=True)

    # numpy baseline
    faiss.omp_set_num_threads(args.threads)
    lat_np = latencies(lambda q: numpy_topk(x, q, K), slow_q)

    def numpy_batch() -> np.ndarray:
        res = np.empty((len(queries), K), dtype=np.int64)
        for s in range(0, len(queries), 100):  # bound the score matrix to 100 x n
            sc = queries[s:s + 100] @ x.T
            top = np.argpartition(-sc, K, axis=1)[:, :K]
            order = np.argsort(-np.take_along_axis(sc, top, axis=1), axis=1)
            res[s:s + 100] = np.take_along_axis(top, order, axis=1)
        return res

    np_top, np_batch_s, _ = timed(numpy_batch)
    np_p50 = float(np.median(lat_np[0]))

    # exact FAISS flat through our own code; it is also the ground truth
    flat, fb_w, fb_c = timed(lambda: VectorIndex.build(ids, x, DIM, layout="Flat"))
    (_, truth), flat_batch_s, _ = timed(lambda: flat.search(queries, K))
    faiss.omp_set_num_threads(args.single_threads)
    lat_flat = latencies(lambda q: flat.search(q, K), slow_q)
    faiss.omp_set_num_threads(args.threads)
    flat_bytes = save_size(flat)
    del flat

    rows.append(row(n, dist, "numpy scan", "-", None, None, raw, lat_np, len(queries) / np_batch_s,
                    recall_at(np_top + 1, truth), np_p50, len(slow_q)))
    rows.append(row(n, dist, "FAISS exact", "Flat", fb_w, fb_c, flat_bytes, lat_flat,
                    len(queries) / flat_batch_s, 1.0, np_p50, len(slow_q)))

    approx(n, dist, args, rows, x, ids, queries, truth, np_p50, args.layout, None)
    if args.max_memory:
        approx(n, dist, args, rows, x, ids, queries, truth, np_p50, None, args.max_memory)
    print(f"  done (load avg {loadavg()})", file=sys.stderr, flush=True)


def approx(n: int, dist: str, args: argparse.Namespace, rows: list[dict], x: np.ndarray, ids: np.ndarray,
           queries: np.ndarray, truth: np.ndarray, np_p50: float, forced: str | None,
           max_memory: int | None) -> None:
    """Build, save, mmap-load and time one approximate index (forced layout, auto, or auto
    under a memory budget), with its filtered and efSearch-sweep rows."""
    exact = (lambda want: x[want - 1]) if max_memory else None  # ids are 1..n
    print(f"  building {forced or 'the automatic layout'} (load avg {loadavg()}) ...", file=sys.stderr, flush=True)
    # The automatic layout is chosen inside build: it also looks at the data's spectrum.
    index, b_w, b_c = timed(lambda: VectorIndex.build(ids, x, DIM, layout=forced, max_memory=max_memory))
    layout = index.layout
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        path = Path(tmp) / "vectors.faiss"
        _, save_s, _ = timed(lambda: index.save(path, generation=1))
        size = path.stat().st_size
        del index
        # mmap load, as a query process would
        (index, _), load_s, _ = timed(lambda: VectorIndex.load(path, DIM))
        if args.ef:
            index.params["efSearch"] = args.ef
        (_, found), batch_s, _ = timed(lambda: index.search(queries, K, exact=exact))
        faiss.omp_set_num_threads(args.single_threads)
        lat = latencies(lambda q: index.search(q, K, exact=exact), queries)
        faiss.omp_set_num_threads(args.threads)
        label = f"{layout} {index.params}" if index.params else layout
        method = ("VectorIndex" if forced else "VectorIndex (auto)") + (
            f" --max-memory {max_memory / 1e6:g}MB" if max_memory else "")
        tuned = index.tuning
        note = f"tuned recall {tuned['recall']:.3f} in {tuned['seconds']:.0f}s, " if tuned else ""
        rows.append(row(n, dist, method, label, b_w, b_c, size, lat, len(queries) / batch_s,
                        recall_at(found, truth), np_p50, len(queries),
                        extra=f"{note}save {save_s:.1f}s, mmap load {load_s * 1e3:.0f} ms"))
        for ef in args.ef_sweep if "efSearch" in index.params else []:
            default_ef, index.params["efSearch"] = index.params["efSearch"], ef
            faiss.omp_set_num_threads(args.single_threads)
            lat = latencies(lambda q: index.search(q, K), queries)
            faiss.omp_set_num_threads(args.threads)
            found = index.search(queries, K)[1]
            index.params["efSearch"] = default_ef
            rows.append(row(n, dist, f"  efSearch={ef}", "", None, None, None, lat, None,
                            recall_at(found, truth), np_p50, len(queries)))
        if args.filter_shares:
            filtered(index, x, ids, queries, args, n, dist, rows, exact)
        del index


def filtered(index: VectorIndex, x: np.ndarray, ids: np.ndarray, queries: np.ndarray,
             args: argparse.Namespace, n: int, dist: str, rows: list[dict], exact=None) -> None:
    """``allowed`` = a random share of the ids (a folder filter), 100 queries each."""
    rng = np.random.default_rng(args.seed + 99)
    q = queries[:100]
    for share in args.filter_shares:
        allowed = np.sort(rng.choice(ids, max(1, int(share * n)), replace=False))
        sub = x[allowed - 1]
        truth = allowed[np.argsort(-(q @ sub.T), axis=1)[:, :K]]
        faiss.omp_set_num_threads(args.single_threads)
        lat = latencies(lambda qq: index.search(qq, K, allowed=allowed, exact=exact), q)
        found = np.stack([index.search(qq, K, allowed=allowed, exact=exact)[1][0] for qq in q])
        full = int(np.sum((found >= 0).sum(axis=1) == min(K, len(allowed))))
        faiss.omp_set_num_threads(args.threads)
        rows.append(row(n, dist, f"  allowed={share:g}", "", None, None, None, lat, None,
                        recall_at(found, truth), None, len(q),
                        extra=f"{full}/{len(q)} queries got k results"))


def save_size(index: VectorIndex) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "v"
        index.save(p, generation=0)
        return p.stat().st_size


def row(n, dist, method, layout, build_w, build_c, nbytes, lat, qps, rec, np_p50, nq, extra=""):
    p50 = float(np.median(lat[0]))
    return {
        "n": f"{n:,}", "dist": dist, "method": method, "layout": layout,
        "build s": "-" if build_w is None else f"{build_w:.1f} ({build_c:.0f} cpu)",
        "index MB": "-" if nbytes is None
        else f"{nbytes / 2**20:,.0f} ({nbytes / (n * DIM * 4):.2f}x)",
        "p50 ms": f"{p50 * 1e3:.3f}", "p99 ms": f"{np.percentile(lat[0], 99) * 1e3:.3f}",
        "p50 cpu ms": f"{np.median(lat[1]) * 1e3:.3f}",
        "single q": str(nq),
        "batch q/s": "-" if qps is None else f"{qps:,.0f}",
        "recall@10": f"{rec:.4f}",
        "speedup vs numpy": "-" if np_p50 is None else f"{np_p50 / p50:,.0f}x",
        "notes": extra,
    }


def table(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r[c] for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dist", nargs="+", default=["clustered", "continuous"],
                    choices=["clustered", "continuous"])
    ap.add_argument("--layout", help="FAISS factory string instead of the automatic layout")
    ap.add_argument("--ef", type=int, help="override efSearch of an HNSW layout")
    ap.add_argument("--max-memory", type=float, default=None,
                    help="also build the auto layout under this memory budget (bytes, e.g. 3e8)")
    ap.add_argument("--ef-sweep", type=int, nargs="*", default=[],
                    help="also time the built HNSW index at these efSearch values")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--slow-queries", type=int, default=100,
                    help="single queries timed for the O(n) baselines (numpy, exact)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="faiss.omp_set_num_threads for build and batch search")
    ap.add_argument("--single-threads", type=int, default=1,
                    help="faiss threads while timing single queries (one query per call)")
    ap.add_argument("--filter-shares", type=float, nargs="*", default=[0.001, 0.01, 0.1, 0.5],
                    help="also time searches restricted to this share of random ids")
    ap.add_argument("--tmp", default=None, help="directory for the saved index (default: TMPDIR)")
    args = ap.parse_args(argv)
    # data + exact copy + approximate index + score chunks: ~4x the raw vectors at peak
    if 4 * DIM * 4 * max(args.n) > os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"):
        print("warning: this n likely needs more RAM than this machine has", file=sys.stderr)

    rows: list[dict] = []
    started = datetime.datetime.now().astimezone()
    for n in args.n:
        for dist in args.dist:
            before = len(rows)
            run_case(n, dist, args, rows)
            print(table(rows[before:]), file=sys.stderr, flush=True)
    print(f"# bench_search {started:%Y-%m-%d %H:%M %Z}\n")
    print(f"command: `{' '.join([Path(sys.executable).name, *sys.argv])}`  ")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, "
          f"faiss {faiss.__version__}, numpy {np.__version__}  ")
    print(f"threads: faiss.omp_set_num_threads({args.threads}) for builds and batches, "
          f"({args.single_threads}) while timing single queries; numpy uses its BLAS default  ")
    print(f"dim {DIM}, k {K}, {args.queries} held-out queries (numpy/exact single-query "
          f"latency over the first {args.slow_queries})  ")
    print(f"load average at the end: {loadavg()}\n")
    print(table(rows))


if __name__ == "__main__":
    main()

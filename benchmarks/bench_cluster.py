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

`--part reconcile`: time of a Milvus (milvus-lite) reconcile, the repair of a collection whose
recorded generation differs from the metadata store's (a crash between commit and mirror), over
`--n` generated vectors, one run, in order: the full comparison (every id read back from Milvus,
forced by clearing the collection's recorded top), then the common cases on the cheap path
(nothing to repair; `--added` new items never mirrored), then one orphan (counts differ: full).

    .venv/bin/python benchmarks/bench_cluster.py --part reconcile --n 100000 [--dim 512] [--added 1000]

    .venv/bin/python benchmarks/bench_cluster.py --part ingest [--n 100,400] [--model ViT-B-32] [--repeat 3]
        [--batch-size 64] [--photo-size 1280x960] [--unique 32] [--json out.json]

--part ingest: images/s of `mmsearch index --no-ocr` (the local path: a decode thread or processes and the
model in one process) against `mmsearch index --ray local` (Ray Data: read + decode tasks, an
embedding actor, the driver committing; Ray started by the run and shut down at its end), as whole
processes, start to exit, each into a fresh index of the same photo-like JPEGs (bench_index.py's,
--unique distinct ones cycled over --n files, read once beforehand so both find them in the page
cache), the two alternated in ABBA order over --repeat rounds; random weights, the model's ONNX
export made once beforehand (untimed). Two folder sizes separate Ray's fixed cost (start-up,
actor and model load) from its per-image rate: marginal images/s = (n2 - n1) / (t2 - t1). CPU s: all
processes of the run (each is started in a session of its own, which Ray's processes inherit), so a
pipeline that spreads over more processes is not credited for taking more of a shared machine.

Each part takes its own options (`--part NAME --help` lists them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "benchmarks")]
from retrieval.records import ModelManifest, NewFile  # noqa: E402
from retrieval.store import Store  # noqa: E402
from bench_index import ensure_photos, loadavg, log  # noqa: E402 - the same photos as bench_index


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

    def top_item_id(self, kind: str, model: str | None = None) -> int:
        return int(self.item_ids(kind, model).max(initial=0))

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


def part_reconcile_cli(args: argparse.Namespace) -> None:
    """`--part reconcile`: seconds of each reconcile case, as JSON with the machine and its load."""
    from retrieval.milvus_store import TOP_PROPERTY, MilvusVectorStore
    from retrieval.stores import VectorKey

    n = args.n
    reader = GeneratedReader(generated(n + args.added, args.dim))
    everything, reader.ids = reader.ids, reader.ids[:n]
    key = VectorKey("bench", "image")
    out: dict[str, object] = {"n": n, "dim": args.dim, "load_start": loadavg()}

    def reconcile(case: str, generation: int) -> None:
        reader.generation = lambda model=None: generation
        start = time.perf_counter()
        vector_set = MilvusVectorStore(uri, reader, "bench", lambda: reader).get(key)  # type: ignore[arg-type]
        out[case + "_s"] = round(time.perf_counter() - start, 2)
        assert len(vector_set) == len(reader.ids) and vector_set.generation() == generation, case

    with tempfile.TemporaryDirectory() as tmp:
        uri = str(Path(tmp) / "bench.db")
        start = time.perf_counter()
        vector_set = MilvusVectorStore(uri, reader, "bench", lambda: reader).get(key)  # type: ignore[arg-type]
        out["fill_s"] = round(time.perf_counter() - start, 1)
        vector_set._client.alter_collection_properties(vector_set.name, properties={TOP_PROPERTY: ""})
        reconcile("full_nothing_to_repair", 2)  # no top recorded: every id read back (the only way before)
        reconcile("nothing_to_repair", 3)
        reader.ids = everything
        reconcile(f"{args.added}_added", 4)
        reader.ids = np.delete(everything, 5)
        reconcile("one_orphan", 5)
    out["machine"] = f"{platform.node()} {os.cpu_count()} CPUs, load at the end {loadavg()}"
    print(json.dumps(out, indent=1))


def _session_cpu(session: int, seen: dict[int, float]) -> None:
    """Record the CPU seconds (user + system) of every process of `session` now alive, into `seen` by pid."""
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session:  # field 6 of stat: the session id
            seen[int(entry)] = max(seen.get(int(entry), 0.0), (int(fields[11]) + int(fields[12])) / tick)


def run_session(cmd: list[str], cwd: Path, env: dict[str, str]) -> dict:
    """Run one process in a session of its own to its exit: wall seconds, and the CPU seconds of every
    process of that session (Ray's raylet, workers and actors too), sampled every 0.1 s (a process's
    last 0.1 s before it exits can be missed)."""
    seen: dict[int, float] = {}
    # stderr to a file, not a pipe read after exit: a child writing more than a pipe holds would block forever
    with tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True,
                                start_new_session=True)
        while proc.poll() is None:
            _session_cpu(proc.pid, seen)
            time.sleep(0.1)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{cmd[:3]} failed ({proc.returncode}): {err.read()[-2000:]}")
    _session_cpu(proc.pid, seen)  # what the session left behind (Ray processes still exiting)
    return {"seconds": seconds, "cpu_s": sum(seen.values()), "processes": len(seen)}


def index_cmd(folder: Path, index: Path, args: argparse.Namespace, ray: bool) -> list[str]:
    """A whole `mmsearch index` of `folder` into a new `index`, locally or on a local Ray."""
    # --no-ocr: the part measures decode + embed; OCR (on by default where Tesseract is installed) runs
    # afterwards on the driver in both paths, and the figures in RESULTS.md predate it.
    return [sys.executable, str(REPO / "cli.py"), "index", str(folder), "--index", str(index), "--model", args.model,
            "--pretrained", "random", "--device", "cpu", "-q", "--no-ocr", "--batch-size", str(args.batch_size),
            *(["--ray", "local"] if ray else [])]


def part_ingest(args: argparse.Namespace) -> dict:
    """--part ingest: see the module docstring."""
    width, height = (int(v) for v in args.photo_size.split("x"))
    sizes = sorted(int(n) for n in args.n.split(","))
    folders = {n: ensure_photos(args.cache, n, width, height, 90, args.unique) for n in sizes}
    env = {**os.environ, "MMSEARCH_CACHE": str(args.model_cache), "MMSEARCH_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    work = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    contenders = [("local", False), ("ray", True)]
    runs: dict[str, dict[int, list[dict]]] = {name: {n: [] for n in sizes} for name, _ in contenders}
    try:
        log(f"export (untimed, once) of {args.model} into {args.model_cache} ...")
        run_session(index_cmd(folders[sizes[0]], work / "warm", args, ray=False), REPO, env)
        for r in range(args.repeat):
            for n in sizes:
                for name, ray in contenders if r % 2 == 0 else contenders[::-1]:
                    res = run_session(index_cmd(folders[n], work / f"{name}-{n}-{r}", args, ray), REPO, env)
                    res.update(round=r, load=loadavg(), images_per_s=n / res["seconds"])
                    runs[name][n].append(res)
                    log(f"  [{r}] {name:5s} n={n:5d} {res['seconds']:6.2f} s  {res['images_per_s']:6.1f} img/s  "
                        f"CPU {res['cpu_s']:6.1f} s in {res['processes']} processes  (load {res['load']})")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{args.model} (random weights, ONNX on the CPU), {width}x{height} JPEGs, whole `mmsearch index` "
          f"processes, medians over {args.repeat} rounds, {os.cpu_count()} cores ({platform.processor() or platform.machine()})")
    print(f"{'path':6s} " + " ".join(f"{f'n={n} s':>9s} {'img/s':>6s} {'CPU s':>6s}" for n in sizes)
          + "  marginal img/s  fixed s")
    summary = {}
    for name, by_n in runs.items():
        wall = {n: statistics.median(x["seconds"] for x in rs) for n, rs in by_n.items()}
        cpu = {n: statistics.median(x["cpu_s"] for x in rs) for n, rs in by_n.items()}
        marginal = fixed = None
        if len(sizes) > 1:
            lo, hi = sizes[0], sizes[-1]
            marginal = (hi - lo) / (wall[hi] - wall[lo]) if wall[hi] > wall[lo] else float("inf")
            fixed = wall[lo] - lo / marginal
        summary[name] = {"wall_s": wall, "cpu_s": cpu, "marginal_images_per_s": marginal, "fixed_s": fixed}
        cells = " ".join(f"{wall[n]:9.2f} {n / wall[n]:6.1f} {cpu[n]:6.1f}" for n in sizes)
        extra = f"  {marginal:14.1f}  {fixed:7.2f}" if marginal is not None else ""
        print(f"{name:6s} {cells}{extra}")
    ratio = {n: summary["local"]["wall_s"][n] / summary["ray"]["wall_s"][n] for n in sizes}
    print("ray / local images/s: " + ", ".join(f"n={n}: {v:.2f}x" for n, v in ratio.items()))
    return {"runs": runs, "summary": summary, "ratio": ratio}


def part_ingest_cli(args: argparse.Namespace) -> None:
    """`--part ingest`: run `part_ingest`, print when and under what load, and keep the results (`--json`)."""
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_start = loadavg()
    result = part_ingest(args)
    print(f"{started}, load average {load_start} at the start, {loadavg()} at the end; command: "
          f"{' '.join(sys.argv)}")
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "started": started, "load_start": load_start,
                                         "load_end": loadavg(), **result}, indent=1, default=str))


def metadata_options(ap: argparse.ArgumentParser) -> None:
    """Options of `--part metadata`."""
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--pg", metavar="URL", help="a PostgreSQL server to use (postgresql+psycopg://USER@HOST:PORT), "
                    "default: a throwaway local cluster")


def vectors_options(ap: argparse.ArgumentParser) -> None:
    """Options of `--part vectors`."""
    ap.add_argument("--n", type=int, default=100_000, help="vectors")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=300)


def reconcile_options(ap: argparse.ArgumentParser) -> None:
    """Options of `--part reconcile`."""
    ap.add_argument("--n", type=int, default=100_000, help="vectors in the collection")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--added", type=int, default=1000, help="new items the crash left unmirrored")


def ingest_options(ap: argparse.ArgumentParser) -> None:
    """Options of `--part ingest`."""
    ap.add_argument("--n", default="100,400", help="comma-separated folder sizes (two give Ray's fixed cost)")
    ap.add_argument("--model", default="ViT-B-32", help="open_clip architecture (random weights)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3, help="rounds, alternating the contenders (medians reported)")
    ap.add_argument("--photo-size", default="1280x960")
    ap.add_argument("--unique", type=int, default=32, help="distinct photos generated; the files cycle over them")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("MMSEARCH_BENCH_DIR", "~/.cache/mmsearch-bench")).expanduser())
    ap.add_argument("--model-cache", type=Path, default=Path(tempfile.gettempdir()) / "mmsearch-bench-model-cache",
                    help="MMSEARCH_CACHE of the mmsearch processes (their ONNX exports)")
    ap.add_argument("--json", type=Path, help="write the results here")


#: Each part: the options it takes, and what it runs.
PARTS = {"metadata": (metadata_options, part_metadata), "vectors": (vectors_options, part_vectors_cli),
         "ingest": (ingest_options, part_ingest_cli), "reconcile": (reconcile_options, part_reconcile_cli)}


def main() -> None:
    first = argparse.ArgumentParser(add_help=False)  # the part first: its options depend on it
    first.add_argument("--part", choices=sorted(PARTS))
    part = first.parse_known_args()[0].part
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=sorted(PARTS), required=True, help="which comparison to run")
    if part is not None:
        PARTS[part][0](ap)
    args = ap.parse_args()
    PARTS[args.part][1](args)

if __name__ == "__main__":
    main()

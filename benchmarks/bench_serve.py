"""`mmsearch serve` latency and throughput over HTTP, side by side with `mmsearch query` processes.

    .venv/bin/python benchmarks/bench_serve.py [--items 100000] [--queries 500] [--clients 8]
        [--total 2000] [--cli-queries 40]

Indexes the demo corpus with shapes-mini, adds synthetic image items up to --items (clustered unit
vectors, stored like real ones; see bench_query.py), starts `mmsearch serve` on a free 127.0.0.1
port and measures, all against 127.0.0.1 only and with a fixed number of requests (it stops by itself):

- warm text queries one at a time: new texts (the ONNX text tower runs) and a repeated text (its vector kept);
- --clients threads sending --total new-text queries in all, each over a keep-alive connection;
- the same kind of queries as `mmsearch query` processes (--cli-queries of them, --clients at a time);
- thumbnails: first request (decode, resize, write the cache) and cached request, for each demo image.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_index import loadavg  # noqa: E402
from bench_query import MMSEARCH, add_synthetic, timed  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square", "triangle", "star", "cross"]


def texts(n: int, salt: str) -> list[str]:
    """`n` distinct query texts (none in the query cache)."""
    return [f"a {COLORS[i % 8]} {SHAPES[(i // 8) % 5]} {salt}-{i}" for i in range(n)]


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank), in milliseconds."""
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


def row(name: str, values: list[float], wall: float | None = None, errors: int = 0) -> str:
    rate = f"{len(values) / wall:.1f}" if wall else "-"
    return (f"| {name} | {len(values)} | {pct(values, 50):.1f} | {pct(values, 99):.1f} | {1000 * max(values):.1f} "
            f"| {rate} | {errors} |")


def start(index: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([*MMSEARCH, "serve", "--index", str(index), "--port", "0"],
                            stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    if "http://127.0.0.1:" not in line:
        proc.kill()
        raise RuntimeError(f"server did not start: {line}{proc.stderr.read()}")
    return proc, line.split(" at ", 1)[1].split()[0].rstrip("/")


def main() -> None:
    import httpx

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=100_000, help="Items in the index in all (synthetic beyond the demo).")
    ap.add_argument("--queries", type=int, default=500, help="Sequential queries of each sort.")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--total", type=int, default=2000, help="Concurrent queries in all.")
    ap.add_argument("--cli-queries", type=int, default=40, help="`mmsearch query` processes to compare with.")
    args = ap.parse_args()
    before = loadavg()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        index = Path(tmp) / "index"
        timed([*MMSEARCH, "index", str(REPO / "index_data" / "demo"), "--index", str(index), "--model", "shapes-mini", "-q"])
        import retrieval

        with retrieval.open_index(index, create=False) as idx:
            demo = idx.info()["images"] + idx.info()["texts"]
        if args.items > demo:
            add_synthetic(index, args.items - demo)
        proc, url = start(index)
        table = []
        try:
            with httpx.Client(base_url=url, timeout=60) as client:
                info = client.get("/api/info").json()
                items = info["images"] + info["texts"]

                def ask(q: str, http: httpx.Client = client) -> float:
                    t0 = time.perf_counter()
                    response = http.get("/api/search", params={"q": q, "k": 10})
                    elapsed = time.perf_counter() - t0
                    if response.status_code != 200 or len(response.json()) != 10:
                        raise RuntimeError(f"{response.status_code}: {response.text[:200]}")
                    return elapsed

                for q in texts(20, "warm"):
                    ask(q)
                table.append(row("HTTP, new text, one at a time", [ask(q) for q in texts(args.queries, "seq")]))
                table.append(row("HTTP, repeated text (kept in memory), one at a time",
                                 [ask("a red circle") for _ in range(args.queries)]))

                # Concurrent clients: a bounded number of requests, each thread its own connection.
                queue = iter(texts(args.total, "conc"))
                lock = threading.Lock()
                times: list[float] = []
                errors: list[str] = []

                def worker() -> None:
                    with httpx.Client(base_url=url, timeout=60) as own:
                        while True:
                            with lock:
                                q = next(queue, None)
                            if q is None:
                                return
                            try:
                                times.append(ask(q, own))
                            except Exception as exc:  # noqa: BLE001 - counted and reported
                                errors.append(str(exc))

                t0 = time.perf_counter()
                threads = [threading.Thread(target=worker) for _ in range(args.clients)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                wall = time.perf_counter() - t0
                table.append(row(f"HTTP, new text, {args.clients} clients", times, wall, len(errors)))

                # Thumbnails: first (decode + resize + cache write) and cached, for every demo image.
                ids = [r["id"] for r in client.get("/api/search", params={"q": "a shape", "k": 1000,
                                                                           "under": str(REPO / "index_data/demo")}).json()]
                first, cached = [], []
                for item in ids:
                    for sink in (first, cached):
                        t0 = time.perf_counter()
                        assert client.get(f"/thumb/{item}").status_code == 200
                        sink.append(time.perf_counter() - t0)
                table.append(row("thumbnail, first request", first))
                table.append(row("thumbnail, cached", cached))
        finally:
            proc.terminate()
            proc.wait(timeout=30)

        # The same sort of queries as fresh `mmsearch query` processes, --clients at a time.
        cli = texts(args.cli_queries, "cli")
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            cli_times = list(pool.map(lambda q: timed([*MMSEARCH, "query", q, "--index", str(index), "-k", "10"]), cli))
        cli_wall = time.perf_counter() - t0
        table.append(row(f"`mmsearch query` processes, {args.clients} at a time", cli_times, cli_wall))
        seq = [timed([*MMSEARCH, "query", q, "--index", str(index), "-k", "10"]) for q in texts(10, "cli-seq")]
        table.append(row("`mmsearch query` process, one at a time", seq))
    print(f"{started}; {items:,} items (shapes-mini, demo + synthetic); load before: {before}; after: {loadavg()}")
    print("| what | requests | p50 ms | p99 ms | max ms | per s | errors |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(table))


if __name__ == "__main__":
    main()

"""Time to answer one query from the shell, side by side in one run: `mmsearch query` vs rclip.

    .venv/bin/python benchmarks/bench_query.py [--n 50] [--rounds 7] [--model ViT-B-32-256]
        [--rclip .peers/rclip/venv/bin/rclip] [--extra 0]

Both index the same --n photo-like JPEGs (benchmarks/bench_index.py makes them) with the same
architecture (random weights: only timings mean anything), then each round runs, in fresh
processes and alternating: `mmsearch query "<new text>"` (no cached embedding: ONNX text tower,
no torch), `mmsearch query "a dog"` (embedding cached by an earlier run), and `rclip -n "<new
text>"` (rclip's query-only run). Medians are reported, with the ratio to rclip.

`--extra N` adds N synthetic image items (clustered unit vectors from bench_search.py, stored
like real ones) to our index before timing, so the same commands show what a large
collection costs a fresh process (at 50k and more: the HNSW file, memory-mapped).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_index import ensure_photos, loadavg  # noqa: E402
from bench_search import generate  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MMSEARCH = [sys.executable, str(REPO / "cli.py")]


def timed(cmd: list[str], **kwargs: object) -> float:
    """Wall seconds of one command, which must succeed."""
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed: {done.stderr[-2000:]}")
    return elapsed


def add_synthetic(index: Path, n: int, chunk: int = 20000) -> None:
    """Commit `n` fake image files with clustered unit vectors, as the indexer would."""
    import retrieval
    from retrieval.records import NewFile

    with retrieval.open_index(index, create=False) as idx, idx.writing():
        dim = idx.manifest.dim
        for start in range(0, n, chunk):
            vecs = generate("clustered", min(chunk, n - start), dim, seed=0, stream=10 + start // chunk)
            files = [NewFile(f"/synthetic/{start + i:07d}.jpg", "image", 1, 0.0, "0" * 64, [0], [None], v[None])
                     for i, v in enumerate(vecs)]
            idx.storage.commit(added=files)  # into the database, then mirrored into the vector files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--model", default="ViT-B-32-256")
    ap.add_argument("--rclip", type=Path, default=REPO / ".peers/rclip/venv/bin/rclip")
    ap.add_argument("--extra", type=int, default=0, help="Synthetic image items added to our index.")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("MMSEARCH_BENCH_DIR", "~/.cache/mmsearch-bench")).expanduser())
    args = ap.parse_args()

    folder = ensure_photos(args.cache, args.n, 1280, 960, 90)
    with tempfile.TemporaryDirectory(prefix="bench-query-") as tmp:
        index = Path(tmp) / "index"
        timed([*MMSEARCH, "index", str(folder), "--index", str(index), "--model", args.model, "--pretrained", "random", "-q"])
        if args.extra:
            start = time.perf_counter()
            add_synthetic(index, args.extra)
            info = subprocess.run([*MMSEARCH, "info", "--json", "--index", str(index)], capture_output=True, text=True)
            layout = json.loads(info.stdout)["layouts"]["image"]
            print(f"added {args.extra:,} synthetic items in {time.perf_counter() - start:.0f} s; layout {layout}")
        timed([*MMSEARCH, "query", "a dog", "--index", str(index)])  # fills the query cache for "a dog"
        rclip_env = None
        if args.rclip.exists():
            data = Path(tmp) / "rclip-data"
            data.mkdir()
            for entry in (args.rclip.parent.parent.parent / "data").iterdir():
                if entry.is_dir():
                    os.symlink(entry, data / entry.name)
            rclip_env = {**os.environ, "RCLIP_DATADIR": str(data), "HF_HUB_OFFLINE": "1"}
            timed([str(args.rclip), "-t", "5", "a dog"], cwd=folder, env=rclip_env)  # rclip indexes on its first run
        times: dict[str, list[float]] = {"mmsearch query (new text)": [], "mmsearch query (cached)": [], "rclip -n": []}
        for i in range(args.rounds):
            text = f"a photo of thing number {i} at {time.time()}"
            times["mmsearch query (new text)"].append(timed([*MMSEARCH, "query", text, "--index", str(index), "-k", "5"]))
            times["mmsearch query (cached)"].append(timed([*MMSEARCH, "query", "a dog", "--index", str(index), "-k", "5"]))
            if rclip_env:
                times["rclip -n"].append(timed([str(args.rclip), "-n", "-t", "5", text], cwd=folder, env=rclip_env))
    extra = f" + {args.extra:,} synthetic items" if args.extra else ""
    print(f"{args.n} photos{extra}, {args.model} (random weights), {args.rounds} rounds, load before: {loadavg()}")
    print("| command | median s | min s | ratio to rclip -n |")
    print("|---|---|---|---|")
    base = statistics.median(times["rclip -n"]) if times["rclip -n"] else None
    for name, values in times.items():
        if values:
            med = statistics.median(values)
            ratio = f"{med / base:.2f}" if base else "-"
            print(f"| {name} | {med:.3f} | {min(values):.3f} | {ratio} |")


if __name__ == "__main__":
    main()

"""Where one query's time goes in a fresh process: wall time of each step, in order.

    .venv/bin/python benchmarks/query_stages.py INDEX_DIR "query text"

Run it twice with the same text to see the cached path (the first run fills the query cache).
"""

from __future__ import annotations

import sys
import time

START = time.perf_counter()
STEPS: list[tuple[str, float]] = []


def step(name: str) -> None:
    """Record the end of one step."""
    STEPS.append((name, time.perf_counter()))


import numpy  # noqa: E402,F401

step("import numpy")
import click  # noqa: E402,F401

step("import click")
import retrieval  # noqa: E402

step("import retrieval")


def main() -> None:
    index_dir, text = sys.argv[1], sys.argv[2]
    with retrieval.open_index(index_dir, create=False) as idx:
        idx.manifest
        step("open the index, read the model manifest")
        idx.embed_query_text(text)
        step("query embedding (ONNX text tower, or the query cache)")
        idx.vectors("image")
        step("import faiss, load the vector file")
        idx.search(text, k=10)
        step("search and result rows")
    previous = START
    for name, at in STEPS:
        print(f"{(at - previous) * 1000:8.1f} ms  {name}")
        previous = at
    print(f"{(previous - START) * 1000:8.1f} ms  in all, after the interpreter started")


if __name__ == "__main__":
    main()

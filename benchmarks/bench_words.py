"""Cost of the words half of a hybrid query: `MetadataReader.match_words` on 100k image items.

The items are made up (4-d vectors; no model), their paths like a photo library's: ten folders of
10k photos each, in 7 day folders, all named IMG_NNNNNN.jpg, plus 20 files named zanzibar_N.jpg.
Prints the time to write them and their words, and per query the mean of 20 searches (top 50).

    python benchmarks/bench_words.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from retrieval.indexer import fill_words  # noqa: E402
from retrieval.local import LocalStorage  # noqa: E402
from retrieval.records import NewFile  # noqa: E402

PLACES = ["germany_trip", "paris", "beach_2019", "birthdayParty", "work", "garden", "snow", "mountains", "city",
          "family"]
QUERIES = ["germany", "zanzibar", "germany beach snow", "IMG_004242"]


def main() -> None:
    with tempfile.TemporaryDirectory() as where:
        storage = LocalStorage(Path(where))
        vector = np.ones((1, 4), np.float32)
        files = [NewFile(f"/photos/{PLACES[i % 10]}/day{i % 7}/IMG_{i:06}.jpg", "image", 1, 0.0, str(i), [0], [None],
                         vector) for i in range(100_000)]
        files += [NewFile(f"/photos/misc/zanzibar_{i}.jpg", "image", 1, 0.0, f"z{i}", [0], [None], vector)
                  for i in range(20)]
        start = time.perf_counter()
        storage.writer.commit(added=files)
        storage.writer.add_roots(["/photos"])
        print(f"commit {len(files)} items: {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        print(f"fill_words: {fill_words(storage, False)} items, {time.perf_counter() - start:.1f} s")
        for query in QUERIES:
            storage.reader.match_words(query, "image", 50)  # warm
            start = time.perf_counter()
            for _ in range(20):
                ids, _ = storage.reader.match_words(query, "image", 50)
            print(f"{query!r}: {len(ids)} hits, {(time.perf_counter() - start) / 20 * 1000:.1f} ms")
        storage.close()


if __name__ == "__main__":
    main()

"""Build tests/data/index-v2: an index written by mmsearch before migration 0003 (schema 0002_root_options_ignored).

Run once, from a checkout of that release (main at commit 3a84e92), to make the fixture that the
metadata migration tests (tests/test_filters.py) migrate: `python tests/data/make_index_v2.py`. It indexes six demo images
and a four-line caption file, copied to /tmp/mmsearch-index-v2 (the paths the fixture records),
with the bundled shapes-mini model, then keeps the database and the vector files plus
`expected.json`: the query vector of "a red circle" and the ranked paths it returned.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

import retrieval  # noqa: E402
from retrieval.config import BUNDLED_DIR  # noqa: E402

SOURCE = Path("/tmp/mmsearch-index-v2")
IMAGES = ["red_circle_01.jpg", "blue_square_01.jpg", "green_circle_01.png", "black_star_01.jpg",
          "purple_cross_01.jpg", "orange_triangle_01.png"]
CAPTIONS = ["a red circle", "a blue square", "a green circle", "a black star"]


def main() -> None:
    shutil.rmtree(SOURCE, ignore_errors=True)
    (SOURCE / "photos").mkdir(parents=True)
    for name in IMAGES:
        shutil.copy(BUNDLED_DIR / "demo" / name, SOURCE / "photos" / name)
    (SOURCE / "captions.txt").write_text("\n".join(CAPTIONS) + "\n")
    index = SOURCE / "index"
    with retrieval.open_index(index, model="shapes-mini") as idx:
        report = idx.add([SOURCE / "photos", SOURCE / "captions.txt"], workers=0)
        assert (report.added, report.texts) == (7, 4), report
        vector = idx.embed_texts(["a red circle"])[0]
        hits = idx.search(vector, k=10, target="all")
    out = HERE / "index-v2"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    for name in ["mmsearch.db", "vectors-image.faiss", "vectors-text.faiss"]:
        shutil.copy(index / name, out / name)
    expected = {"query": "a red circle", "vector": [float(x) for x in vector.astype(np.float32)],
                "paths": [h.path for h in hits], "texts": [h.text for h in hits]}
    (out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    print(f"wrote {out}: {sum(p.stat().st_size for p in out.iterdir())} bytes")


if __name__ == "__main__":
    main()

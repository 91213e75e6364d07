"""Build tests/data/index-v1: an index written by mmsearch before migration 0002 (schema 0001_initial).

Run once, from a checkout of that release (commit 8cabff3), to make the fixture that
tests/test_trust.py migrates: `python tests/data/make_index_v1.py`. It indexes six demo images
and a four-line caption file, copied to /tmp/mmsearch-index-v1 (the paths the fixture records),
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

IMAGES = ["red_circle_01.jpg", "blue_square_01.jpg", "green_circle_01.png", "black_star_01.jpg",
          "purple_cross_01.jpg", "orange_triangle_01.png"]
CAPTIONS = ["a red circle", "a blue square", "a green circle", "a black star"]


def build(name: str) -> None:
    """Index the sources, copied to /tmp/mmsearch-NAME, and write tests/data/NAME (also used by make_index_v2)."""
    source = Path(f"/tmp/mmsearch-{name}")
    shutil.rmtree(source, ignore_errors=True)
    (source / "photos").mkdir(parents=True)
    for image in IMAGES:
        shutil.copy(BUNDLED_DIR / "demo" / image, source / "photos" / image)
    (source / "captions.txt").write_text("\n".join(CAPTIONS) + "\n")
    index = source / "index"
    with retrieval.open_index(index, model="shapes-mini") as idx:
        report = idx.add([source / "photos", source / "captions.txt"], workers=0)
        assert (report.added, report.texts) == (7, 4), report
        vector = idx.embed_texts(["a red circle"])[0]
        hits = idx.search(vector, k=10, target="all")
    out = HERE / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    for file in ["mmsearch.db", "vectors-image.faiss", "vectors-text.faiss"]:
        shutil.copy(index / file, out / file)
    expected = {"query": "a red circle", "vector": [float(x) for x in vector.astype(np.float32)],
                "paths": [h.path for h in hits], "texts": [h.text for h in hits]}
    (out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    print(f"wrote {out}: {sum(p.stat().st_size for p in out.iterdir())} bytes")


if __name__ == "__main__":
    build("index-v1")

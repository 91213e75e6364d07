"""The bundled `shapes-mini` model really retrieves, through the library and through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import retrieval
from conftest import REPO, run_mmsearch
from index_data.shapes import PROMPTS, sample

DEMO = REPO / "index_data" / "demo"
pytestmark = pytest.mark.skipif(not (REPO / "index_data" / "shapes-mini.pt").exists(), reason="bundled model not built")

#: Held-out images: a seed used neither by training nor by the demo nor by benchmarks/eval_shapes.py.
HELD_OUT_SEED = 20261125


def test_held_out_retrieval_through_the_library(tmp_path: Path) -> None:
    rng = np.random.default_rng(HELD_OUT_SEED)
    folder = tmp_path / "held-out"
    folder.mkdir()
    truth = {}
    for i in range(120):
        image, color, shape = sample(rng)
        path = folder / f"{i:03d}.png"
        image.save(path)
        truth[str(path)] = f"a {color} {shape}"
    with retrieval.open_index(tmp_path / "idx", model="shapes-mini") as index:
        report = index.add([folder])
        assert report.added == 120 and report.skipped == 0
        index.add_texts(PROMPTS, source="prompts")
        image_vecs = index.embed_images(list(truth))
        text_vecs = index.embed_texts(PROMPTS)
        assert image_vecs.dtype == np.float32 and np.allclose(np.linalg.norm(image_vecs, axis=1), 1, atol=1e-4)
        # Zero-shot: the most similar of the 40 prompts names the image's color and shape.
        best_prompt = (image_vecs @ text_vecs.T).argmax(axis=1)
        zero_shot = np.mean([PROMPTS[j] == t for j, t in zip(best_prompt, truth.values())])
        # Text -> image through the index: the top image for each prompt shows that prompt.
        present = [p for p in PROMPTS if p in truth.values()]
        t2i = np.mean([truth[index.search(p, k=1)[0].path] == p for p in present])
        # Image -> text through the index, on a sample of the images.
        i2t = np.mean([index.search(Path(p), k=1, target="texts")[0].text == t for p, t in list(truth.items())[:40]])
    assert zero_shot >= 0.9, zero_shot
    assert t2i >= 0.9, t2i
    assert i2t >= 0.9, i2t


def test_demo_through_the_cli(tmp_path: Path) -> None:
    index = tmp_path / "idx"
    built = run_mmsearch("index", DEMO, "--index", index, "--model", "shapes-mini")
    assert built.returncode == 0, built.stderr
    hits = json.loads(run_mmsearch("query", "a red circle", "--index", index, "--json").stdout)
    assert Path(hits[0]["path"]).name.startswith("red_circle")
    star = next(DEMO.glob("blue_star_*"))
    texts = run_mmsearch("query", "--image", star, "--target", "texts", "--index", index, "--json")
    assert texts.returncode == 0, texts.stderr
    first = json.loads(texts.stdout)[0]
    assert "blue" in first["text"] and "star" in first["text"] and first["line"] >= 1

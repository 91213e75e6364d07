"""Several models in one index: `index --add-model`, `query --model`, `remove --model` (migration 0004).

The second model is the tiny random model of conftest (another architecture, dimension 32), not
shapes-mini again: its answers must be those of an index built with it alone, and the first
model's answers and vector files must not change when it comes or goes.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import retrieval
from retrieval.config import BUNDLED_DIR
from retrieval.errors import ModelInUse, ModelMismatch

from conftest import REPO, immutable_reader, invoke, release_index_copy, solid_image
from test_reliability import _read_only_runner

DEMO = BUNDLED_DIR / "demo"
IMAGES = ["red_circle_01.jpg", "red_circle_02.jpg", "blue_square_01.jpg", "green_circle_01.png", "black_star_01.jpg",
          "purple_cross_01.jpg", "orange_triangle_01.png", "yellow_star_01.jpg", "white_square_02.webp",
          "blue_star_01.webp"]
CAPTIONS = ["a red circle", "a blue square", "a green circle", "a black star", "a yellow star"]
V3 = Path(__file__).parent / "data" / "index-v3"


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """Ten demo images and five captions."""
    root = tmp_path / "corpus"
    root.mkdir()
    for name in IMAGES:
        shutil.copy(DEMO / name, root / name)
    (root / "captions.txt").write_text("\n".join(CAPTIONS) + "\n")
    return root


def answers(idx: retrieval.Collection, corpus: Path, model: str | None = None) -> list[list[tuple[str, float]]]:
    """Ranked (path or text, score) of text and image queries, with --not, --min-score auto, combined, a
    filter and --collapse."""
    queries = [("a red circle", {}), (corpus / "blue_star_01.webp", {}), ("a star", {"target": "texts"}),
               (corpus / "red_circle_01.jpg", {"target": "images"}), ("a red circle", {"exclude": ["a blue star"]}),
               ("a red circle", {"min_score": "auto"}), ([corpus / "red_circle_01.jpg", "a star"], {}),
               ("a red circle", {"ext": "png"}), ("a red circle", {"collapse": 0.9, "subtract": ["a star::0.5"]})]
    return [[(h.text or Path(h.path).name, round(h.score, 5)) for h in idx.search(q, k=5, model=model, **opts)]
            for q, opts in queries]


def same_answers(got: list[list[tuple[str, float]]], want: list[list[tuple[str, float]]]) -> None:
    for g, w in zip(got, want, strict=True):
        assert [p for p, _ in g] == [p for p, _ in w]
        np.testing.assert_allclose([s for _, s in g], [s for _, s in w], atol=2e-4)


def test_a_second_model_answers_as_an_index_of_its_own_and_leaves_the_first_untouched(tmp_path, corpus,
                                                                                         tiny_model) -> None:
    with retrieval.open_index(tmp_path / "alone", model=tiny_model, pretrained="random") as alone:
        alone.add([corpus], workers=0)
        want_b = answers(alone, corpus)
        dupes_b = [[Path(m.path).name for m in g.members] for g in alone.duplicates(0.9)]
    index = tmp_path / "both"
    with retrieval.open_index(index, model="shapes-mini") as idx:
        idx.add([corpus], workers=0)
        want_a = answers(idx, corpus)
    files_a = {p.name: p.read_bytes() for p in index.glob("vectors-*.faiss")}
    with retrieval.open_index(index, create=False) as idx:
        report = idx.add_model(tiny_model, "random", workers=0)
        key = idx.model_of(tiny_model)
        assert report.filled == {key: len(IMAGES) + len(CAPTIONS)}
        assert idx.add_model(tiny_model, "random", workers=0).filled == {}  # nothing left to embed
        same_answers(answers(idx, corpus, model=tiny_model), want_b)
        same_answers(answers(idx, corpus, model=key), want_b)  # by key, as `info` shows it
        same_answers(answers(idx, corpus), want_a)  # the first model stays the default
        assert answers(idx, corpus, model=tiny_model)[0] != want_a[0]  # really another model's ranking
        models = idx.info()["models"]
        assert [(m["name"], m["default"], m["dim"], m["images"], m["texts"]) for m in models] == [
            ("shapes-mini", True, 64, 10, 5), (tiny_model, False, 32, 10, 5)]
        assert [[Path(m.path).name for m in g.members] for g in idx.duplicates(0.9, model=tiny_model)] == dupes_b
        with pytest.raises(ModelMismatch, match="no model"):
            idx.search("a red circle", model="ViT-B-32")
    # The first model's vector files were not rewritten: switching models never touches them.
    assert {p.name: p.read_bytes() for p in index.glob("vectors-*.faiss") if p.name.count("-") == 1} == files_a


def test_a_later_index_run_embeds_new_files_with_every_model(tmp_path, corpus, tiny_model) -> None:
    index = tmp_path / "idx"
    with retrieval.open_index(index, model="shapes-mini") as idx:
        idx.add([corpus], workers=0)
        idx.add_model(tiny_model, "random", workers=0)
    new = solid_image(corpus / "new.png", (230, 30, 30), size=(96, 64))
    with retrieval.open_index(index, create=False) as idx:
        report = idx.add(workers=0)  # a bare re-scan
        assert report.added == 1 and report.filled == {idx.model_of(tiny_model): 1}
        for model in (None, tiny_model):
            top = idx.search(new, k=1, target="images", model=model)[0]
            assert Path(top.path).name == "new.png" and top.score > 0.999  # its own vector under each model
        assert [(m["images"], m["texts"]) for m in idx.info()["models"]] == [(11, 5), (11, 5)]
        idx.add_texts(["a red square"], source="notes")
        assert [(m["images"], m["texts"]) for m in idx.info()["models"]] == [(11, 6), (11, 6)]
        # A removed file leaves every model's vectors.
        new.unlink()
        idx.add(workers=0)
        assert [(m["images"], m["texts"]) for m in idx.info()["models"]] == [(10, 6), (10, 6)]
        assert all(Path(h.path).name != "new.png" for h in idx.search("a red circle", k=20, model=tiny_model))


def test_a_query_with_another_model_beside_a_gpu_loads_no_torch_model(tmp_path, corpus, tiny_model,
                                                                        monkeypatch) -> None:
    """A text query runs on the ONNX text tower even where a GPU would be used, for every model of
    the index, not only the default: no torch import, no CUDA start for one query."""
    index = tmp_path / "idx"
    with retrieval.open_index(index, model="shapes-mini") as idx:
        idx.add([corpus], workers=0)
        idx.add_model(tiny_model, "random", workers=0)
        want = [h.path for h in idx.search("a green square", k=5, model=tiny_model)]
    from retrieval import encoder

    def no_torch(*args, **kwargs):
        raise AssertionError("a query loaded the torch model")

    monkeypatch.setattr(encoder, "gpu_likely", lambda: True)
    monkeypatch.setattr(encoder, "load_source", no_torch)
    with retrieval.open_index(index, create=False, device="auto") as idx:
        for model in (None, tiny_model):
            assert len(idx.search("a new query text", k=3, model=model)) == 3
        assert [h.path for h in idx.search("a green square", k=5, model=tiny_model)] == want


def test_removing_a_model_removes_its_vectors_only_and_never_the_default(tmp_path, corpus, tiny_model) -> None:
    index = tmp_path / "idx"
    with retrieval.open_index(index, model="shapes-mini") as idx:
        idx.add([corpus], workers=0)
        want_a = answers(idx, corpus)
        idx.add_model(tiny_model, "random", workers=0)
        key = idx.model_of(tiny_model)
        assert len(list(index.glob(f"vectors-{key}-*.faiss"))) == 2
        with pytest.raises(ModelInUse, match="default"):
            idx.remove_model("shapes-mini")
        assert idx.remove_model(tiny_model) == len(IMAGES) + len(CAPTIONS)
        assert list(index.glob(f"*{key}*")) == []
        same_answers(answers(idx, corpus), want_a)
        with pytest.raises(ModelMismatch):
            idx.search("a red circle", model=tiny_model)
        assert [m["name"] for m in idx.info()["models"]] == ["shapes-mini"]
        assert idx.info()["images"] == len(IMAGES)  # every item stays
    db = sqlite3.connect(index / "mmsearch.db")
    assert db.execute("SELECT count(*) FROM vectors").fetchone()[0] == len(IMAGES) + len(CAPTIONS)
    db.close()


def test_cli_add_model_query_info_dupes_and_remove(runner, tmp_path, corpus, tiny_model) -> None:
    index = tmp_path / "idx"
    assert invoke(runner, "index", corpus, "--index", index, "--model", "shapes-mini", "--workers", "0").exit_code == 0
    before = {p.name: p.read_bytes() for p in index.iterdir() if p.is_file()}
    # Another model without --add-model (a typo, or a different model) is refused, and nothing is written.
    refused = invoke(runner, "index", corpus, "--index", index, "--model", tiny_model, "--pretrained", "random")
    assert refused.exit_code == 1 and "--add-model" in refused.stderr and "Traceback" not in refused.output
    assert {p.name: p.read_bytes() for p in index.iterdir() if p.is_file()} == before
    assert invoke(runner, "index", "--index", index, "--add-model").exit_code == 2  # needs --model
    added = invoke(runner, "index", "--index", index, "--model", tiny_model, "--pretrained", "random", "--add-model",
                   "--workers", "0")
    assert added.exit_code == 0, added.output
    assert f"{len(IMAGES) + len(CAPTIONS)} items embedded" in added.stderr
    info = json.loads(invoke(runner, "info", "--index", index, "--json").stdout)
    assert [(m["name"], m["images"], m["texts"]) for m in info["models"]] == [
        ("shapes-mini", 10, 5), (tiny_model, 10, 5)]
    text = invoke(runner, "info", "--index", index).stdout
    assert text.count("vectors:  ") == 2 and "(default): 10 images, 5 texts" in text
    with retrieval.open_index(index, create=False) as idx:
        want = [Path(h.path).name for h in idx.search("a red circle", k=3, model=tiny_model)]
    query = invoke(runner, "query", "a red circle", "--index", index, "-k", "3", "--model", tiny_model, "--json")
    assert [Path(r["path"]).name for r in json.loads(query.stdout)] == want
    bad = invoke(runner, "query", "a red circle", "--index", index, "--model", "nope")
    assert bad.exit_code == 1 and "no model nope" in bad.stderr
    assert invoke(runner, "dupes", "--index", index, "--model", tiny_model, "--json").exit_code == 0
    default = invoke(runner, "remove", "--index", index, "--model", "shapes-mini")
    assert default.exit_code == 1 and "default" in default.stderr
    both = invoke(runner, "remove", corpus, "--index", index, "--model", tiny_model)
    assert both.exit_code == 2
    removed = invoke(runner, "remove", "--index", index, "--model", tiny_model)
    assert removed.exit_code == 0 and "15 vectors" in removed.stderr
    info = json.loads(invoke(runner, "info", "--index", index, "--json").stdout)
    assert [m["name"] for m in info["models"]] == ["shapes-mini"] and info["images"] == 10


def test_http_api_takes_a_model_parameter(tmp_path, corpus, tiny_model) -> None:
    pytest.importorskip("starlette", reason="the serve extra is not installed")
    pytest.importorskip("httpx", reason="Starlette's test client needs httpx")
    from starlette.testclient import TestClient

    from retrieval import server

    index = tmp_path / "idx"
    with retrieval.open_index(index, model="shapes-mini") as idx:
        idx.add([corpus], workers=0)
        idx.add_model(tiny_model, "random", workers=0)
    with retrieval.open_index(index, create=False) as idx:
        client = TestClient(server.create_app(idx), base_url="http://127.0.0.1:8765")
        for model in (None, tiny_model):
            want = [h.path for h in idx.search("a red circle", k=4, model=model)]
            got = client.get("/api/search", params={"q": "a red circle", "k": 4, **({"model": model} if model else {})})
            assert got.status_code == 200 and [r["path"] for r in got.json()] == want
            first = got.json()[0]["id"]
            (_, stored), = idx.reader.vectors("image", [first], idx.model_of(model))  # its vector under that model
            like = [h.path for h in idx.search(stored[0], k=4, target="images", model=model) if h.id != first][:3]
            similar = client.get(f"/api/similar/{first}", params={"k": 3, **({"model": model} if model else {})})
            assert [r["path"] for r in similar.json()] == like
        assert client.get("/api/search", params={"q": "a red circle", "model": "nope"}).status_code == 400
        assert [m["name"] for m in client.get("/api/info").json()["models"]] == ["shapes-mini", tiny_model]


# --- the previous release's index (schema 0003) ---------------------------------------------

def v3_copy(tmp_path: Path) -> Path:
    return release_index_copy("index-v3", tmp_path)


def relocate_sources(index: Path, folder: Path) -> Path:
    """Put the fixture's source files (demo images, captions) in `folder`, as they were when it was
    indexed (same content, size and mtime), and point its database there."""
    db = sqlite3.connect(index / "mmsearch.db")
    rows = db.execute("SELECT path, mtime FROM files").fetchall()
    for table in ("files", "roots"):
        db.execute(f"UPDATE {table} SET path = replace(path, '/tmp/mmsearch-index-v3', ?)", (str(folder),))
    db.commit()
    db.close()
    for path, mtime in rows:
        target = folder / Path(path).relative_to("/tmp/mmsearch-index-v3")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.suffix == ".txt":
            target.write_text("\n".join(["a red circle", "a blue square", "a green circle", "a black star"]) + "\n")
        else:
            shutil.copy(DEMO / target.name, target)
        os.utime(target, (mtime, mtime))
    return folder


def test_previous_release_index_migrates_keeps_its_answers_and_vector_files_and_takes_a_second_model(
        tmp_path, tiny_model) -> None:
    expected = json.loads((V3 / "expected.json").read_text())
    index = v3_copy(tmp_path)
    faiss_files = {p.name: p.read_bytes() for p in index.glob("*.faiss")}
    with retrieval.open_index(index, create=False) as idx:
        hits = idx.search(np.asarray(expected["vector"], np.float32), k=10, target="all")
        assert [h.path for h in hits] == expected["paths"] and [h.text for h in hits] == expected["texts"]
        assert [(m["name"], m["default"], m["images"], m["texts"]) for m in idx.info()["models"]] == [
            ("shapes-mini", True, 6, 4)]
    # Migrated: the vectors moved to their table, the FAISS files are still a valid cache (not rebuilt).
    db = sqlite3.connect(index / "mmsearch.db")
    assert "0004_model_vectors" in {r[0] for r in db.execute("SELECT name FROM migrations")}
    assert "vector" not in {r[1] for r in db.execute("PRAGMA table_info(items)")}
    assert db.execute("SELECT count(*) FROM vectors").fetchone()[0] == 10
    assert db.execute("SELECT count(*) FROM meta WHERE key = 'model'").fetchone()[0] == 0
    db.close()
    assert {p.name: p.read_bytes() for p in index.glob("*.faiss")} == faiss_files
    # It takes a second model: from the stored texts, and from the image files as they were indexed;
    # one changed since (another mtime) is left for its re-scan, with a warning.
    sources = relocate_sources(index, tmp_path / "sources")
    changed = sources / "photos" / "black_star_01.jpg"
    os.utime(changed, (changed.stat().st_mtime + 60,) * 2)
    with retrieval.open_index(index, create=False) as idx:
        report = idx.add_model(tiny_model, "random", workers=0)
        key = idx.model_of(tiny_model)
        assert report.filled == {key: 9} and "1 images changed or unreadable" in report.warnings[0]
        assert idx.info()["models"][1]["images"] == 5
        hits = idx.search(np.asarray(expected["vector"], np.float32), k=10, target="all")
        assert [h.path for h in hits] == [p.replace("/tmp/mmsearch-index-v3", str(sources)) for p in expected["paths"]]
        idx.add(workers=0)  # the re-scan re-embeds the changed file, with both models
        assert [(m["images"], m["texts"]) for m in idx.info()["models"]] == [(6, 4), (6, 4)]
        top = idx.search(changed, k=1, target="images", model=tiny_model)[0]
        assert top.path == str(changed) and top.score > 0.999


def test_read_only_previous_release_index_answers_without_migrating(tmp_path) -> None:
    expected = json.loads((V3 / "expected.json").read_text())
    index = v3_copy(tmp_path)
    before = {p.name: p.read_bytes() for p in index.iterdir()}
    reader = immutable_reader(index)
    assert reader.needs_migration()
    (key, manifest), = reader.models().items()
    assert manifest.name == "shapes-mini" and reader.manifest() == manifest
    assert reader.model_counts() == {key: {"image": 6, "text": 4}}
    assert len(reader.item_ids("image")) == 6 and len(reader.item_ids("text", key)) == 4
    ids, vecs = next(reader.vectors("image", model=key))
    assert vecs.shape == (6, manifest.dim)
    reader.close()
    prefix = _read_only_runner(index)
    if prefix is None:
        pytest.skip("no way to make a read-only directory here")
    cmd = [*prefix, sys.executable, str(REPO / "cli.py")]
    query = subprocess.run([*cmd, "query", "a red circle", "--target", "all", "--json", "--model", "shapes-mini",
                            "--index", str(index)], capture_output=True, text=True, timeout=300)
    assert query.returncode == 0, query.stderr
    assert json.loads(query.stdout)[0]["path"] == expected["paths"][0]
    info = subprocess.run([*cmd, "info", "--json", "--index", str(index)], capture_output=True, text=True, timeout=120)
    assert info.returncode == 0, info.stderr
    assert [(m["name"], m["images"]) for m in json.loads(info.stdout)["models"]] == [("shapes-mini", 6)]
    if os.geteuid() != 0:
        index.chmod(0o755)
    assert {p.name: p.read_bytes() for p in index.iterdir()} == before

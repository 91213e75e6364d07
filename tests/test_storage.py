"""The storage seam: another vector store plugs in where an index is opened, vector sets are
keyed by (model, kind), and data flows one way (front ends → Collection → indexer/search → stores)."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import numpy as np
import pytest

import retrieval
from retrieval.collection import Collection
from retrieval.faiss_store import FaissVectorStore
from retrieval.local import LocalStorage
from retrieval.records import ModelManifest
from retrieval.stores import MetadataReader, VectorKey, model_key

REPO = Path(__file__).resolve().parent.parent
FIXTURE = Path(__file__).parent / "data" / "index-v1"


class NumpyVectorSet:
    """Exact search over vectors held in memory: the smallest thing that satisfies `VectorSet`."""

    layout = "numpy"

    def __init__(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.vecs = dict(zip(ids.tolist(), vectors))

    def __len__(self) -> int:
        return len(self.vecs)

    def ids(self) -> np.ndarray:
        return np.array(sorted(self.vecs), dtype=np.int64)

    def describe(self) -> dict:
        return {"layout": self.layout, "params": {}, "tuning": {}, "vectors": len(self), "tombstones": 0}

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None,
               exact: object = None) -> tuple[np.ndarray, np.ndarray]:
        ids = [i for i in self.vecs if allowed is None or i in set(allowed.tolist())]
        scores = np.array([float(self.vecs[i] @ queries[0]) for i in ids])
        order = np.argsort(-scores)[:k]
        pad = k - len(order)
        return (np.concatenate([scores[order], np.full(pad, -np.inf)])[None],
                np.concatenate([np.array(ids, dtype=np.int64)[order], np.full(pad, -1)])[None])


class NumpyVectorStore:
    """A `VectorStore` kept in memory, loaded from the metadata store on first use."""

    def __init__(self, reader: MetadataReader) -> None:
        self.reader = reader
        self.sets: dict[VectorKey, NumpyVectorSet] = {}

    def get(self, key: VectorKey) -> NumpyVectorSet:
        if key not in self.sets:
            chunks = list(self.reader.vectors(key.kind))
            ids = np.concatenate([c[0] for c in chunks]) if chunks else np.zeros(0, np.int64)
            vecs = np.concatenate([c[1] for c in chunks]) if chunks else np.zeros((0, 1), np.float32)
            self.sets[key] = NumpyVectorSet(ids, vecs)
        return self.sets[key]

    def add(self, key: VectorKey, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.get(key).vecs.update(zip(ids.tolist(), vectors))

    def remove(self, key: VectorKey, ids: np.ndarray) -> None:
        for i in ids.tolist():
            self.get(key).vecs.pop(i, None)

    def save(self) -> None:
        pass

    def refresh(self) -> list[VectorKey]:
        return []  # nothing on disk to take up

    def relayout(self, keys) -> None:
        pass  # exact search: no layout to fit a memory budget

    def rebuild(self, keys, layout=None):
        for key in keys:
            self.sets.pop(key, None)
        return {key: self.get(key) for key in keys}


class InMemoryVectors(LocalStorage):
    """SQLite metadata, vectors in memory: a back end chosen only where the index is opened."""

    @property
    def vectors(self) -> NumpyVectorStore:
        if self._vectors is None:
            self._vectors = NumpyVectorStore(self.reader)
        return self._vectors


def _open(index: Path, storage_class: type[LocalStorage], tiny_model: str) -> Collection:
    return Collection(index, storage_class.open(index), model=tiny_model, pretrained="random")


def test_another_vector_store_plugs_in_where_the_index_is_opened(tmp_path, tiny_model, photos) -> None:
    """Index, search both ways, filter by folder and remove through an in-memory vector store; the
    FAISS files left behind are then synced to the database's generation when opened as usual."""
    index = tmp_path / "idx"
    sub = photos / "sub" / "img5.gif"  # the fixture's one image in a subfolder
    (photos / "captions.txt").write_text("a red square\na green square\na blue square\n")
    with _open(index, LocalStorage, tiny_model) as faiss_idx:
        assert faiss_idx.add([photos], workers=0).added >= 4
        expected = faiss_idx.search("a red square", k=3)
        expected_texts = faiss_idx.search(sub, k=2)
    faiss_file = (index / "vectors-image.faiss").read_bytes()
    with _open(index, InMemoryVectors, tiny_model) as idx:
        got = idx.search("a red square", k=3)
        assert [h.path for h in got] == [h.path for h in expected]
        assert [h.score for h in got] == pytest.approx([h.score for h in expected], abs=1e-5)
        assert [h.text for h in idx.search(sub, k=2)] == [h.text for h in expected_texts]
        assert [h.path for h in idx.search("a red square", under=photos / "sub")] == [str(sub)]
        assert idx.remove([photos / "sub"]).items == 1
        assert str(sub) not in {h.path for h in idx.search("a red square", k=10)}
        assert isinstance(idx.storage.vectors, NumpyVectorStore)
        assert idx.info()["vector_index"]["image"]["layout"] == "numpy"
    assert (index / "vectors-image.faiss").read_bytes() == faiss_file  # untouched by the other store
    with retrieval.open_index(index, create=False) as idx:  # the FAISS file lags one generation behind
        assert isinstance(idx.storage.vectors, FaissVectorStore)
        hits = idx.search("a red square", k=10)
        assert str(sub) not in {h.path for h in hits}
        assert len(hits) == idx.info()["images"] == len(idx.vectors("image"))  # synced by id, not only filtered


def test_vector_sets_are_keyed_by_model_and_kind_with_the_old_file_names(tmp_path) -> None:
    """Sets are per (model, kind); the index's own model keeps the file names of earlier releases,
    so the previous release's index opens without rebuilding its vector files."""
    a = ModelManifest("ViT-B-32", "laion2b_s34b_b79k", None, 512)
    assert model_key(a) != model_key(ModelManifest("ViT-B-32", "openai", None, 512))
    assert model_key(a) == model_key(ModelManifest("ViT-B-32", "laion2b_s34b_b79k", None, 512))
    assert "/" not in model_key(ModelManifest("conf/my model.json", None, "ab" * 32, 64))
    index = tmp_path / "v1"
    shutil.copytree(FIXTURE, index)
    before = {p.name: p.read_bytes() for p in index.glob("*.faiss")}
    with retrieval.open_index(index, create=False) as idx:
        key = idx.storage.key("image")
        assert key == VectorKey(model_key(idx.manifest), "image")
        assert idx.storage.vectors.path(key) == index / "vectors-image.faiss"
        assert len(idx.vectors("image")) == 6 and idx.info()["texts"] == 4
        with pytest.raises(retrieval.BadQuery, match="no vectors of model"):
            idx.storage.vectors.get(VectorKey("another-model", "image"))
    assert {p.name: p.read_bytes() for p in index.glob("*.faiss")} == before  # opened, not rebuilt


def test_a_reader_takes_up_what_another_writer_saved_and_loads_each_set_once(tmp_path, tiny_model, photos,
                                                                            monkeypatch) -> None:
    """A long-lived reader (a web server) sees a later `add` after `refresh`, never a half-state; threads
    asking for the same set at once load its file once."""
    import threading
    import time

    from retrieval import vectors

    index = tmp_path / "idx"
    extra = photos / "sub" / "img5.gif"
    moved = tmp_path / "img5.gif"
    extra.rename(moved)
    with _open(index, LocalStorage, tiny_model) as writer:
        writer.add([photos], workers=0)
    loads = []
    real_load = vectors.VectorIndex.load.__func__

    def slow_load(cls, *args, **kwargs):
        loads.append(1)
        time.sleep(0.2)  # widen the window in which a second thread would load it again
        return real_load(cls, *args, **kwargs)

    monkeypatch.setattr(vectors.VectorIndex, "load", classmethod(slow_load))
    with retrieval.open_index(index, create=False) as reader:
        threads = [threading.Thread(target=reader.vectors, args=("image",)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(loads) == 1
        held = reader.vectors("image")
        assert reader.refresh() == []  # nothing saved since
        moved.rename(extra)
        with _open(index, LocalStorage, tiny_model) as writer:
            assert writer.add([photos], workers=0).added == 1
        assert reader.refresh() == ["image"]
        assert len(reader.vectors("image")) == len(held) + 1
        assert reader.search("a red square", k=10, under=photos / "sub")[0].path == str(extra)


@pytest.mark.parametrize("module", ["indexer", "search", "compose", "dupes", "calibrate", "stores", "local", "faiss_store", "store", "reader", "schema"])
def test_the_layers_below_the_collection_never_import_it(module: str) -> None:
    """Data flows one way: the indexer, search and the stores are handed what they need."""
    tree = ast.parse((REPO / "retrieval" / f"{module}.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    assert not {m for m in imported if m and m.split(".")[-1] == "collection"}

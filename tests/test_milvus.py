"""Vectors in Milvus (milvus-lite, embedded): same answers as FAISS, changes mirrored with no stale
ids, filters applied inside Milvus, and the collection reconciled after a crash between the
metadata commit and the Milvus write. Skipped where pymilvus or milvus-lite is not installed."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

import retrieval  # noqa: E402
from conftest import free_port  # noqa: E402
from retrieval.backends import client_args  # noqa: E402
from retrieval.collection import Collection  # noqa: E402
from retrieval.errors import BadQuery, VectorStoreUnavailable  # noqa: E402
from retrieval.local import LocalStorage  # noqa: E402
from retrieval.milvus_store import MilvusVectorStore  # noqa: E402
from retrieval.records import ModelManifest, NewFile  # noqa: E402
from retrieval.stores import MAX_MEMORY_SETTING, VectorKey  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "index_data" / "demo"
pytestmark = pytest.mark.skipif(not (REPO / "index_data" / "shapes-mini.pt").exists(), reason="bundled model not built")


@pytest.fixture(scope="module")
def lite(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One milvus-lite database for the module (each index gets its own collections in it)."""
    return str(tmp_path_factory.mktemp("milvus") / "vectors.db")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo corpus with its blue images in a subfolder (for --under)."""
    root = tmp_path_factory.mktemp("corpus") / "demo"
    shutil.copytree(DEMO, root)
    (root / "blue").mkdir()
    for path in root.glob("blue_*"):
        path.rename(root / "blue" / path.name)
    return root


@pytest.fixture(scope="module")
def faiss_index(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    """The corpus indexed with shapes-mini, vectors in FAISS: the reference answers."""
    index = tmp_path_factory.mktemp("faiss") / "index"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMSEARCH_OFFLINE", "1")
        with retrieval.open_index(index, model="shapes-mini") as idx:
            idx.add([corpus])
    return index


class MilvusStorage(LocalStorage):
    """SQLite metadata, vectors in Milvus at `uri` (the class attribute, set per index)."""

    uri = ""

    @property
    def vectors(self) -> MilvusVectorStore:
        if self._vectors is None:
            model = self.model()
            if model is None:
                raise self.empty_index_error()
            self._vectors = MilvusVectorStore(self.uri, self.reader, model, lambda: self.writer)
        return self._vectors


def milvus(index: Path, uri: str, model: str | None = "shapes-mini", create: bool = True) -> Collection:
    """The index at `index` with its vectors in Milvus at `uri`."""
    storage_class = type("Storage", (MilvusStorage,), {"uri": uri})
    return Collection(index, storage_class.open(index, create=create), model)


def answers(hits: list) -> list[tuple[str, float]]:
    return [(h.path, round(h.score, 4)) for h in hits]


QUERIES = ["a red circle", "a blue star", "a green square", "a yellow triangle"]


def same(got: list, want: list) -> None:
    """Same items in the same order, scores equal within the embedding's run-to-run noise."""
    assert [h.path for h in got] == [h.path for h in want]
    assert [h.text for h in got] == [h.text for h in want]
    assert [h.score for h in got] == pytest.approx([h.score for h in want], abs=2e-3)


def test_same_top_k_as_faiss_both_ways_from_a_collection_built_by_indexing(tmp_path, lite, corpus, faiss_index) -> None:
    """Indexed straight into Milvus: text → image, image → text and --under give FAISS's answers."""
    with retrieval.open_index(faiss_index, create=False) as ref, milvus(tmp_path / "idx", lite) as idx:
        idx.add([corpus])
        assert isinstance(idx.storage.vectors, MilvusVectorStore)
        for query in QUERIES:
            same(idx.search(query, k=8), ref.search(query, k=8))
        image = corpus / "red_circle_01.jpg"
        same(idx.search(image, k=5), ref.search(image, k=5))
        under = idx.search("a red circle", k=3, under=corpus / "blue")
        same(under, ref.search("a red circle", k=3, under=corpus / "blue"))
        assert len(under) == 3 and all("/blue/" in h.path for h in under)  # k pass, k come back
        cut = idx.search("a red circle", k=50, min_score=0.6)
        same(cut, ref.search("a red circle", k=50, min_score=0.6))
        assert 0 < len(cut) < 50 and min(h.score for h in cut) >= 0.6
        info = idx.info()["vector_index"]["image"]
        assert info["layout"] == "FLAT" and info["vectors"] == idx.info()["images"]
        assert info["generation"] == idx.reader.generation()


def test_a_collection_made_from_an_existing_index_answers_as_faiss(tmp_path, lite, faiss_index, corpus) -> None:
    """An index whose vectors were in FAISS gets its Milvus collections filled from the metadata
    store on first use; a k larger than the set gives the whole set, best first."""
    index = tmp_path / "copy"
    shutil.copytree(faiss_index, index)
    with retrieval.open_index(faiss_index, create=False) as ref, milvus(index, lite, None, create=False) as idx:
        for query in QUERIES:
            assert answers(idx.search(query, k=5)) == answers(ref.search(query, k=5))
        everything = idx.search("a red circle", k=1000, mode="semantic")  # by cosine alone: no words fused in
        assert len(everything) == idx.info()["images"]
        assert [h.score for h in everything] == sorted((h.score for h in everything), reverse=True)
        assert answers(everything) == answers(ref.search("a red circle", k=1000, mode="semantic"))
        assert answers(idx.search("a red circle", k=4, ext="png")) == answers(ref.search("a red circle", k=4, ext="png"))


def test_reindex_remove_and_rename_leave_no_stale_ids(tmp_path, lite, corpus) -> None:
    """A new file appears, a removed one is gone from Milvus itself, a renamed one keeps its vector
    under its new path (and --under follows the rename): the collection holds exactly the items."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("red_circle_01.jpg", "red_circle_02.jpg", "green_square_01.jpg", "purple_star_01.jpg"):
        shutil.copy(corpus / name, photos / name)
    index = tmp_path / "idx"
    with milvus(index, lite) as idx:
        idx.add([photos])
        key = idx.storage.key("image")

        def stored() -> np.ndarray:
            return idx.storage.vectors.get(key).ids()

        assert list(stored()) == list(idx.reader.item_ids("image"))
        shutil.copy(corpus / "red_square_03.webp", photos / "red_square_03.webp")
        idx.add([photos])  # incremental: only the new file
        assert str(photos / "red_square_03.webp") in {h.path for h in idx.search("a red square", k=2)}
        assert len(stored()) == 5

        gone = idx.search("a red circle", k=1)[0]
        Path(gone.path).unlink()  # else the next re-scan of the folder adds it again
        assert idx.remove([Path(gone.path)]).items == 1
        assert gone.id not in stored() and len(stored()) == 4
        assert gone.path not in {h.path for h in idx.search("a red circle", k=10)}

        (photos / "sub").mkdir()
        (photos / "purple_star_01.jpg").rename(photos / "sub" / "star.jpg")
        before = set(stored())
        idx.add([photos])
        assert set(stored()) == before  # a rename keeps the item and its vector
        hits = idx.search("a purple star", k=10)
        assert str(photos / "sub" / "star.jpg") in {h.path for h in hits}
        assert str(photos / "purple_star_01.jpg") not in {h.path for h in hits}
        assert [h.path for h in idx.search("a purple star", k=3, under=photos / "sub")] == [str(photos / "sub" / "star.jpg")]
        assert list(stored()) == list(idx.reader.item_ids("image"))


def test_metadata_ahead_of_milvus_is_reconciled_and_never_answers_stale(tmp_path, lite, corpus) -> None:
    """A crash between the metadata commit and the Milvus write (simulated: batches committed to the
    metadata store alone) leaves Milvus behind: until reconciled, a removed item is never returned;
    when the set is next opened, missing vectors are upserted and orphans deleted."""
    photos = tmp_path / "photos"
    shutil.copytree(corpus, photos, ignore=shutil.ignore_patterns("*.txt", "blue"))
    index = tmp_path / "idx"
    with milvus(index, lite) as idx:
        idx.add([photos])
        best = idx.search("a red circle", k=1)[0]
        red = idx.reader.file(best.path)
        vector = next(idx.reader.vectors("image", np.array([best.id])))[1]
        generation = idx.reader.generation()
        # The "crash": the metadata store removes the best match and gains a new image; Milvus never hears.
        with idx.storage.lock(0):
            idx.storage.writer.commit(removed_files=[red.id])
            idx.storage.writer.commit(added=[NewFile(str(photos / "new.png"), "image", 1, 1.0, "f" * 64, [0], [None],
                                                     -vector)])
        assert idx.reader.generation() > generation
        vectors = idx.storage.vectors.get(idx.storage.key("image"))  # loaded before: not reconciled yet
        assert best.id in vectors.ids()
        assert best.path not in {h.path for h in idx.search("a red circle", k=5)}  # the truth filters it
    with milvus(index, lite, create=False) as idx:  # next open: behind, so reconciled by id
        vectors = idx.storage.vectors.get(idx.storage.key("image"))
        assert list(vectors.ids()) == list(idx.reader.item_ids("image"))
        assert best.id not in vectors.ids()
        assert idx.search("a red circle", k=1)[0].path != best.path
        assert idx.search(-vector, k=1, target="images")[0].path == str(photos / "new.png")
        assert vectors.generation() == idx.reader.generation()


def test_a_crash_that_only_added_is_repaired_without_reading_every_id(tmp_path, lite, corpus, monkeypatch) -> None:
    """The common crash: new images committed to the metadata store never reached Milvus. The
    reconcile upserts the ids above the collection's recorded top and compares counts, without
    reading every id back from Milvus; the repaired collection answers as FAISS over the same
    metadata store. A crash that also removed an item leaves an orphan: the counts differ, the ids
    are read once and the orphan goes."""
    from retrieval.milvus_store import MilvusVectorSet

    photos = tmp_path / "photos"
    shutil.copytree(corpus, photos, ignore=shutil.ignore_patterns("*.txt", "blue"))
    index = tmp_path / "idx"
    with milvus(index, lite) as idx:
        idx.add([photos])
        key = idx.storage.key("image")
        ids = idx.reader.item_ids("image")
        generation = idx.reader.generation()
        rng = np.random.default_rng(0)
        with idx.storage.lock(0):  # the "crash": three batches of new images, none mirrored
            for n, (_, vecs) in enumerate(idx.reader.vectors("image", ids[:6:2])):
                vecs = vecs + 0.5 * rng.standard_normal(vecs.shape).astype(np.float32)
                for i, vec in enumerate(vecs / np.linalg.norm(vecs, axis=1, keepdims=True)):
                    idx.storage.writer.commit(added=[NewFile(str(photos / f"new{n}{i}.png"), "image", 1, 1.0,
                                                             f"{n}{i}".ljust(64, "f"), [0], [None], vec[None, :])])
        want = idx.reader.item_ids("image")
        assert len(want) == len(ids) + 3 and idx.reader.generation() == generation + 3

    def every_id(self: MilvusVectorSet) -> np.ndarray:
        raise AssertionError("every id read back from Milvus")

    with monkeypatch.context() as mp:
        mp.setattr(MilvusVectorSet, "ids", every_id)
        with milvus(index, lite, create=False) as idx:
            vectors = idx.storage.vectors.get(key)
            assert len(vectors) == len(want) and vectors.generation() == idx.reader.generation()
            got = {q: idx.search(q, k=8) for q in QUERIES}
            new_vector = next(idx.reader.vectors("image", want[-1:]))[1][0]
            got["new"] = idx.search(new_vector, k=3, target="images")
    with milvus(index, lite, create=False) as idx:
        assert list(idx.storage.vectors.get(key).ids()) == list(want)
    with retrieval.open_index(index) as reference:  # FAISS over the same metadata store
        for q in QUERIES:
            same(got[q], reference.search(q, k=8))
        same(got["new"], reference.search(new_vector, k=3, target="images"))
        assert got["new"][0].id == want[-1]

    with milvus(index, lite, create=False) as idx, idx.storage.lock(0):  # a crash after removing an image
        gone = idx.reader.file(str(photos / "new00.png"))
        idx.storage.writer.commit(removed_files=[gone.id])
    reads, read_ids = [], MilvusVectorSet.ids
    with monkeypatch.context() as mp:
        mp.setattr(MilvusVectorSet, "ids", lambda self: reads.append(self.name) or read_ids(self))
        with milvus(index, lite, create=False) as idx:
            vectors = idx.storage.vectors.get(key)
            assert len(reads) == 1 and len(vectors) == len(want) - 1
    with milvus(index, lite, create=False) as idx:
        assert list(idx.storage.vectors.get(key).ids()) == list(idx.reader.item_ids("image"))
        assert want[-3] not in idx.storage.vectors.get(key).ids()


def test_an_orphan_left_in_milvus_is_deleted_and_never_returned(tmp_path, lite, corpus) -> None:
    """An id Milvus holds but the metadata store does not (a delete that never reached Milvus) is
    not returned even when it is the best match, and is deleted when the set is reconciled."""
    photos = tmp_path / "photos"
    shutil.copytree(corpus / "blue", photos)
    with milvus(tmp_path / "idx", lite) as idx:
        idx.add([photos])
        key = idx.storage.key("image")
        query = idx.embed_query_text("a blue star")
        vectors = idx.storage.vectors.get(key)
        vectors.upsert(np.array([10**9]), query[None, :])  # a perfect match no item has
        assert 10**9 in vectors.ids()
        assert [h.id for h in idx.search(query, k=3, target="images")] == \
               [h.id for h in idx.search("a blue star", k=3)]
        assert all(h.id != 10**9 for h in idx.search("a blue star", k=50))
        vectors.set_generation(-1)  # as if the last save never happened
    with milvus(tmp_path / "idx", lite, create=False) as idx:
        assert 10**9 not in idx.storage.vectors.get(idx.storage.key("image")).ids()


def test_index_types_forced_and_refused(tmp_path, lite, corpus) -> None:
    """`reindex --faiss HNSW` builds an HNSW index in Milvus (kept by later saves); a type milvus-lite
    cannot build is refused before anything changes."""
    photos = tmp_path / "photos"
    shutil.copytree(corpus / "blue", photos)
    with milvus(tmp_path / "idx", lite) as idx:
        idx.add([photos])
        exact = answers(idx.search("a blue star", k=3))
        assert idx.reindex("hnsw")["image"] == "HNSW"
        assert idx.info()["vector_index"]["image"]["params"]["ef"] >= 128
        assert answers(idx.search("a blue star", k=3)) == exact
        with pytest.raises(BadQuery, match="milvus-lite builds"):
            idx.reindex("DISKANN")
        assert idx.info()["layouts"]["image"] == "HNSW"
        shutil.copy(corpus / "red_circle_01.jpg", photos / "red.jpg")
        idx.add([photos])
        assert idx.info()["layouts"]["image"] == "HNSW"  # the forced type is kept
        assert idx.reindex("IVF_FLAT")["image"] == "IVF_FLAT"
        assert idx.info()["vector_index"]["image"]["params"] == {"nlist": 16, "nprobe": 1}
        assert answers(idx.search("a blue star", k=3)) == exact  # one list of a few vectors holds them all
        assert idx.reindex(None)["image"] == "FLAT"  # back to the automatic choice


def test_a_second_model_has_its_own_collections_dropped_with_it(tmp_path, lite, corpus, tiny_model) -> None:
    """Another model's vectors (`add_model`) go to their own collections, answer as FAISS does from
    the same metadata, and leave Milvus with the model (`remove_model`)."""
    photos = tmp_path / "photos"
    shutil.copytree(corpus / "blue", photos)
    index = tmp_path / "idx"
    with milvus(index, lite) as idx:
        idx.add([photos], workers=0)
        idx.add_model(tiny_model, "random", workers=0)
        got = idx.search("a blue star", k=5, model=tiny_model)
        first = idx.search("a blue star", k=5)
        vectors = idx.storage.vectors
        name = vectors.collection(idx.storage.key("image", idx.model_of(tiny_model)))
        assert vectors.client.has_collection(name) and name != vectors.collection(idx.storage.key("image"))
    with retrieval.open_index(index, create=False) as ref:  # FAISS files made from the same metadata
        same(got, ref.search("a blue star", k=5, model=tiny_model))
        same(first, ref.search("a blue star", k=5))
    with milvus(index, lite, None, create=False) as idx:
        idx.remove_model(tiny_model)
        assert not idx.storage.vectors.client.has_collection(name)
        same(idx.search("a blue star", k=5), first)


def test_automatic_index_type_by_size() -> None:
    """FLAT while a scan is cheap (the FAISS threshold, with its hysteresis), HNSW above, IVF_FLAT
    when an HNSW build would exceed the CPU budget, IVF_SQ8 within a small memory budget."""

    reader = Generated(np.zeros((1, 512), np.float32))
    store = MilvusVectorStore("/nonexistent/x.db", reader, "gen", lambda: reader)  # type: ignore[arg-type]
    key = VectorKey("gen", "image")
    assert store._auto_layout(key, 10_000) == "FLAT"
    assert store._auto_layout(key, 60_000) == "HNSW"
    assert store._auto_layout(key, 40_000, "HNSW") == "HNSW"  # not back to FLAT at once
    assert store._auto_layout(key, 20_000, "HNSW") == "FLAT"
    assert store._auto_layout(key, 5_000_000) == "IVF_FLAT"
    reader.set_setting(MAX_MEMORY_SETTING, str(100 * 2**20))
    assert store._auto_layout(key, 1_000_000) == "IVF_SQ8"


def test_uris() -> None:
    """milvus:// is a server over http; a local PATH.db is milvus-lite; anything else is refused."""
    assert client_args("milvus://host:19531") == {"uri": "http://host:19531"}
    assert client_args("milvus://u:p@host/db1") == {"uri": "http://host:19530", "token": "u:p", "db_name": "db1"}
    assert client_args("https://h:443") == {"uri": "https://h:443"}
    assert client_args("rel/v.db")["uri"].endswith("/rel/v.db")
    for bad in ("ftp://x", "milvus://", "vectors.sqlite"):
        with pytest.raises(BadQuery):
            client_args(bad)


def test_a_milvus_lite_file_open_in_another_process_is_a_clear_error(tmp_path, corpus) -> None:
    """milvus-lite serves one process per file: the second gets a one-line error saying so."""
    uri = str(tmp_path / "busy.db")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, pymilvus; c = pymilvus.MilvusClient(sys.argv[1]); "
                               "print('ready', flush=True); sys.stdin.read()", uri],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        photos = tmp_path / "photos"
        shutil.copytree(corpus / "blue", photos)
        with milvus(tmp_path / "idx", uri) as idx, pytest.raises(VectorStoreUnavailable, match="one process at a time"):
            idx.add([photos])
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_a_milvus_server_shared_by_two_clients(tmp_path, corpus, faiss_index) -> None:
    """The same client code against a server (`milvus-lite server`, over gRPC, reached as
    milvus://HOST:PORT): an index written through one client is searched through another while the
    first is open (the sharing milvus-lite's embedded file refuses)."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(tmp_path / "server"),
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        uri = f"milvus://127.0.0.1:{port}"
        _wait_for_server(uri)
        photos = tmp_path / "photos"
        shutil.copytree(corpus / "blue", photos)
        index = tmp_path / "idx"
        with milvus(index, uri) as writer, retrieval.open_index(faiss_index, create=False) as ref:
            writer.add([photos])
            assert not writer.storage.vectors.lite
            with milvus(index, uri, None, create=False) as reader:
                want = ref.search("a blue star", k=3, under=corpus / "blue")
                got = reader.search("a blue star", k=3)
                assert [Path(h.path).name for h in got] == [Path(h.path).name for h in want]
                assert [h.score for h in got] == pytest.approx([h.score for h in want], abs=2e-3)
                assert reader.info()["vector_index"]["image"]["generation"] == reader.reader.generation()
    finally:
        server.terminate()
        server.wait(timeout=30)


def _wait_for_server(uri: str, timeout: float = 30.0) -> None:
    from pymilvus import MilvusClient

    deadline = time.monotonic() + timeout
    while True:
        try:
            MilvusClient(**client_args(uri), timeout=2).close()
            return
        except Exception:  # noqa: BLE001 - not listening yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_default_path_never_imports_pymilvus() -> None:
    """`import retrieval` and a FAISS index never load pymilvus."""
    code = ("import sys, retrieval, retrieval.local, retrieval.collection; "
            "assert 'pymilvus' not in sys.modules and 'retrieval.milvus_store' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)



class Generated:
    """The reads a vector store makes of a metadata store, over generated vectors of kind 'image'."""

    def __init__(self, vectors: np.ndarray) -> None:
        self.vecs = vectors
        self.ids = np.arange(1, len(vectors) + 1, dtype=np.int64) * 3  # sparse ids, as after deletions
        self.settings: dict[str, str] = {}

    def generation(self, model: str | None = None) -> int:
        return 1

    def models(self) -> dict[str, ModelManifest]:
        return {"gen": ModelManifest("gen", None, None, self.vecs.shape[1])}

    def setting(self, key: str) -> str | None:
        return self.settings.get(key)

    def set_setting(self, key: str, value: str | None) -> None:
        self.settings[key] = value

    def item_ids(self, kind: str, model: str | None = None) -> np.ndarray:
        return self.ids if kind == "image" else self.ids[:0]

    def top_item_id(self, kind: str, model: str | None = None) -> int:
        return int(self.item_ids(kind, model).max(initial=0))

    def vectors(self, kind: str, ids: np.ndarray | None = None, model: str | None = None):
        want = self.ids if ids is None else np.asarray(ids)
        if kind == "image" and len(want):
            yield want, self.vecs[want // 3 - 1]


def test_allowed_sets_of_every_size_give_the_exact_top_k(lite, monkeypatch) -> None:
    """A filter of a few ids, of most of the set (wider unfiltered searches), and of more ids
    than one request takes (per-batch filtered searches): always the exact top k among them."""
    from retrieval import milvus_store
    from retrieval.milvus_store import BATCH

    monkeypatch.setattr(milvus_store, "MAX_TOPK", 1000)  # below the set's size, as at scale

    rng = np.random.default_rng(3)
    vecs = rng.standard_normal((2 * BATCH + 500, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    reader = Generated(vecs)
    store = MilvusVectorStore(lite, reader, "gen", lambda: reader)  # type: ignore[arg-type]
    vector_set = store.get(VectorKey("gen", "image"))
    assert len(vector_set) == len(vecs)
    query = vecs[7] + 0.1 * vecs[70]
    scores = vecs @ query
    for allowed in (reader.ids[[5, 70, 900]], reader.ids[::3], reader.ids[: len(vecs) - 30],
                    reader.ids[np.argsort(scores)[: BATCH + 10]]):  # the worst-scoring: widening cannot reach them
        rows = allowed // 3 - 1
        want = allowed[np.argsort(-scores[rows])][:10]
        got_scores, got = vector_set.search(query[None, :], 10, allowed)
        assert list(got[0][got[0] >= 0]) == list(want)
        assert got_scores[0][: len(want)] == pytest.approx(np.sort(scores[rows])[::-1][:10], abs=1e-5)
    floor = float(np.sort(scores)[-40])  # a range search: every item at or above the floor, no other
    got_scores, got = vector_set.search(query[None, :], 1000, min_score=floor)
    assert sorted(got[0][got[0] >= 0]) == sorted(reader.ids[scores >= floor]) and len(got[0][got[0] >= 0]) == 40
    got_scores, got = vector_set.search(query[None, :], 1000, reader.ids[::2], min_score=floor)
    assert sorted(got[0][got[0] >= 0]) == sorted(reader.ids[::2][scores[::2] >= floor])


def test_a_reconcile_racing_a_writer_deletes_nothing_it_cannot_be_sure_of(lite) -> None:
    """An id in Milvus but not in the metadata store read a moment ago may be a writer's newest item:
    while the metadata generation moves during a reconcile, no orphan is deleted and no generation is
    recorded (the next open tries again); with it still, the orphan goes."""
    rng = np.random.default_rng(5)
    vecs = rng.standard_normal((50, 8)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    reader = Generated(vecs)
    key = VectorKey("gen", "image")
    MilvusVectorStore(lite, reader, "gen", lambda: reader).get(key).upsert(np.array([10**6]), vecs[:1])

    class Busy(Generated):
        """A metadata store a writer commits to while it is read."""

        def __init__(self, vectors: np.ndarray) -> None:
            super().__init__(vectors)
            self.calls = 0

        def generation(self, model: str | None = None) -> int:
            self.calls += 1
            return 1 + self.calls  # another commit between any two reads

    busy = Busy(vecs)
    busy.settings = reader.settings  # the same index (its collection prefix)
    vector_set = MilvusVectorStore(lite, busy, "gen", lambda: busy).get(key)  # type: ignore[arg-type]
    assert 10**6 in vector_set.ids() and vector_set.generation() != busy.generation()
    reader.generation = lambda model=None: 9  # type: ignore[method-assign] - the writer is done
    vector_set = MilvusVectorStore(lite, reader, "gen", lambda: reader).get(key)  # type: ignore[arg-type]
    assert list(vector_set.ids()) == list(reader.ids) and vector_set.generation() == 9


def test_a_backfill_that_an_orphan_hides_from_the_counts_is_still_repaired(lite) -> None:
    """Vectors written for older items (a model's backfill: its own generation moves) can lack in
    Milvus below the recorded top; a deletion never mirrored can make the counts equal all the same.
    The reconcile then compares every id: the backfilled vector is upserted and the orphan deleted."""
    rng = np.random.default_rng(8)
    vecs = rng.standard_normal((40, 8)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)

    class Backfilled(Generated):
        """A metadata store whose model's own generation counts its backfills."""

        base, own = 1, 0

        def generation(self, model: str | None = None) -> int:
            return self.base + (self.own if model else 0)

    reader = Backfilled(vecs)
    everything, reader.ids = reader.ids, reader.ids[::2]  # the odd items have no vector of this model yet
    key = VectorKey("gen", "image")
    vector_set = MilvusVectorStore(lite, reader, "gen", lambda: reader).get(key)  # type: ignore[arg-type]
    assert vector_set.top() == (int(reader.ids[-1]), 0)
    reader.ids = np.sort(np.concatenate([everything[::2][1:], everything[1:2]]))  # one deleted, one backfilled
    reader.base, reader.own = 2, 1
    assert len(reader.ids) == len(vector_set) and everything[1] < vector_set.top()[0]
    vector_set = MilvusVectorStore(lite, reader, "gen", lambda: reader).get(key)  # type: ignore[arg-type]
    assert list(vector_set.ids()) == list(reader.ids)
    assert vector_set.generation() == 3 and vector_set.top() == (int(reader.ids[-1]), 1)

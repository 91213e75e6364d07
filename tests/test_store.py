"""The database: writes through `store` (SQLAlchemy), reads through `reader` (sqlite3), same data."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from retrieval import reader as reader_module
from retrieval.config import DB_NAME
from retrieval.errors import IndexNotFound
from retrieval.reader import StoreReader
from retrieval.records import ModelManifest, NewFile
from retrieval.store import PAGE_SIZE, Store


def _files(paths: list[str], dim: int = 8, seed: int = 0) -> list[NewFile]:
    rng = np.random.default_rng(seed)
    return [NewFile(p, "image", 10, 1.0, f"{i:064x}", [0], [None], rng.standard_normal((1, dim)).astype(np.float32))
            for i, p in enumerate(paths)]


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Store, StoreReader]:
    store = Store.open(tmp_path / "idx")
    reader = StoreReader.open(tmp_path / "idx")
    yield store, reader
    reader.close()
    store.close()


def test_reader_sees_each_commit_and_the_vectors_written(pair, monkeypatch) -> None:
    store, reader = pair
    assert reader.manifest() is None and reader.generation() == 0 and reader.kinds() == set()
    store.claim_model(ModelManifest("tiny", None, "ab" * 32, 8))
    files = _files([f"/p/{i}.jpg" for i in range(7)])
    ids, vecs, _ = store.commit(added=files)
    assert reader.manifest() == ModelManifest("tiny", None, "ab" * 32, 8)
    assert reader.generation() == 1 and reader.kinds() == {"image"}
    assert reader.counts() == {"image": 7, "files": 7, "failures": 0}
    # Whole-kind reads page through the table: small pages must still return every row once, in order.
    monkeypatch.setattr(reader_module, "CHUNK", 3)
    chunks = list(reader.vectors("image"))
    assert [len(c[0]) for c in chunks] == [3, 3, 1]
    got_ids = np.concatenate([c[0] for c in chunks])
    np.testing.assert_array_equal(got_ids, ids["image"])
    np.testing.assert_array_equal(np.concatenate([c[1] for c in chunks]), vecs["image"])
    picked = ids["image"][[6, 0, 4]]
    (sub_ids, sub_vecs), = [c for c in reader.vectors("image", picked) if len(c[0])]
    assert sorted(sub_ids) == sorted(picked)
    rows = reader.items([*picked, 10**9])  # an unknown id is simply absent
    assert set(rows) == set(picked.tolist()) and rows[picked[0]].path == "/p/6.jpg"


def test_folder_filters_match_whole_path_components(pair) -> None:
    store, reader = pair
    store.claim_model(ModelManifest("tiny", None, "ab" * 32, 8))
    store.commit(added=_files(["/a/b/1.jpg", "/a/b/sub/2.jpg", "/a/bc/3.jpg", "/a/b"]))
    assert set(reader.files_under("/a/b")) == {"/a/b/1.jpg", "/a/b/sub/2.jpg", "/a/b"}
    under = reader.items(reader.ids_under("/a/b/sub", "image"))
    assert [r.path for r in under.values()] == ["/a/b/sub/2.jpg"]
    assert len(reader.ids_under("/a", "text")) == 0


def test_new_database_packs_vectors_into_large_pages(pair, tmp_path) -> None:
    """16 KB pages: a 512-d float32 vector costs ~2.4 KB on disk, not a whole 4 KB page."""
    store, _ = pair
    store.claim_model(ModelManifest("tiny", None, "ab" * 32, 512))
    db = tmp_path / "idx" / DB_NAME

    def size_after(paths: list[str]) -> int:
        store.commit(added=_files(paths, dim=512))
        with sqlite3.connect(db) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return db.stat().st_size

    first = size_after([f"/p/{i}.jpg" for i in range(100)])  # every table and index has its first page
    grown = size_after([f"/q/{i}.jpg" for i in range(400)]) - first
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA page_size").fetchone()[0] == PAGE_SIZE == 16384
    assert grown / 400 < 3000, f"{grown / 400:.0f} bytes per item"


def test_reader_needs_an_existing_index(tmp_path) -> None:
    with pytest.raises(IndexNotFound, match="mmsearch index"):
        StoreReader.open(tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()


def test_removing_more_files_than_one_statement_takes(pair) -> None:
    """Deleting a big folder must not hit SQLite's bound-parameter limit (32,766 on many systems)."""
    from sqlalchemy import event

    store, reader = pair
    store.claim_model(ModelManifest("tiny", None, "ab" * 32, 4))
    n = reader_module.CHUNK + 5000
    ids, _, _ = store.commit(added=_files([f"/big/{i}.jpg" for i in range(n)], dim=4))
    store.engine.dispose()
    event.listen(store.engine, "connect", lambda conn, _: conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER,
                                                                         reader_module.CHUNK))
    file_ids = [row.id for row in reader.files_under("/big").values()]
    _, _, gone = store.commit(removed_files=file_ids, cleared_failures=[f"/big/{i}.jpg" for i in range(n)])
    assert sorted(gone["image"]) == sorted(ids["image"]) and len(gone["image"]) == n
    assert reader.counts()["files"] == 0 and reader.kinds() == set()


DATA = Path(__file__).parent / "data"


def _schema_text(db: Path) -> str:
    """The database's schema as `sqlite3 DB .schema` prints it (statements in creation order)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return "".join(f"{sql};\n" for (sql,) in conn.execute(
            "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY rowid"))


def test_schema_built_from_plain_data_is_the_released_one(tmp_path) -> None:
    """A new index, and the first release's index once migrated, have exactly the schema of the
    release before the schema became plain data plus migration 0003's five nullable `files` columns
    and 0004's `models` and `vectors` tables, `items` without its `vector` column (dumps taken with
    `sqlite3 mmsearch.db .schema`; the 0003 dumps differed only by those), followed by migration
    0005's `words` table and its FTS5 index and triggers."""
    import shutil

    words = (DATA / "schema-0005-words.sql").read_text()
    Store.open(tmp_path / "new").close()
    assert _schema_text(tmp_path / "new" / DB_NAME) == (DATA / "schema-0004.sql").read_text() + words
    shutil.copytree(DATA / "index-v1", tmp_path / "v1")
    Store.open(tmp_path / "v1").close()
    assert _schema_text(tmp_path / "v1" / DB_NAME) == (DATA / "schema-v1-migrated-0004.sql").read_text() + words


def test_reader_sql_names_only_columns_of_the_schema() -> None:
    """The reader's column lists come from `schema`: a renamed column fails at import, not at query time."""
    from retrieval import schema

    assert reader_module._FILE_ROW == "files.id, files.path, files.kind, files.size, files.mtime, files.sha256"
    with pytest.raises(KeyError):
        schema.ITEMS.cols("vector", "no_such_column")

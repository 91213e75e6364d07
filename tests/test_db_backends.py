"""An index in a database (`--db`: PostgreSQL, or an SQLite URL) behaves as an index directory does:
the same suites run over {directory, postgresql, sqlite URL}; plus what only a database URL has
(migrations on PostgreSQL, the advisory lock, caches in the per-user cache dir, its errors).
PostgreSQL cases run on a throwaway cluster (`postgres` fixture) and skip where it cannot start."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import retrieval
from conftest import REPO, free_port, invoke, run_mmsearch, solid_image
from retrieval.errors import IndexInUse

#: Where an index's metadata and vectors are: the embedded default (SQLite + FAISS in a directory), a
#: database URL with FAISS caches (PostgreSQL, SQLite), and the scale-out pair PostgreSQL + Milvus (lite).
BACKENDS = ["directory", "postgresql", "sqlite-url", "postgresql+milvus"]


@pytest.fixture(params=BACKENDS)
def where(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """open_index keywords, and CLI options, of an index in each back end."""
    if request.param == "directory":
        return {"directory": str(tmp_path / "idx")}
    if request.param == "sqlite-url":
        return {"db": f"sqlite:///{tmp_path / 'meta.db'}"}
    if request.param == "postgresql+milvus":
        pytest.importorskip("pymilvus", reason="pymilvus is not installed (pip install 'mmsearch[cluster]')")
        return {"db": request.getfixturevalue("pg_db"), "vectors": str(tmp_path / "vectors.db")}
    return {"db": request.getfixturevalue("pg_db")}


def cli_args(where: dict[str, str]) -> list[str]:
    """The CLI options of `where`: --index DIR, or --db URL [--vectors URI]."""
    return [arg for name, value in where.items() for arg in ("--index" if name == "directory" else f"--{name}", value)]


def stores(where: dict[str, str]) -> tuple[str, str]:
    """The kinds `info` should name for the metadata and the vectors of `where`."""
    metadata = "sqlite" if "directory" in where or where["db"].startswith("sqlite") else "postgresql"
    return metadata, "milvus" if "vectors" in where else "faiss"


def test_library_suite(where, tiny_model, photos) -> None:
    """Index, incremental re-index, rename, query both ways, a filter, remove, info."""
    (photos / "captions.txt").write_text("a red square\na green square\na blue square\n")
    with retrieval.open_index(**where, model=tiny_model, pretrained="random") as idx:
        report = idx.add([photos], workers=0)
        assert (report.added, report.unchanged) == (7, 0)
        by_text = idx.search("a red square", k=3)
        assert len(by_text) == 3 and all(r.kind == "image" for r in by_text)
        by_image = idx.search(photos / "img0.jpg", k=2)
        assert [r.kind for r in by_image] == ["text", "text"] and by_image[0].text in (
            "a red square", "a green square", "a blue square")
        assert idx.search(photos / "img0.jpg", target="images", k=1)[0].path == str(photos / "img0.jpg")
        assert {Path(r.path).suffix for r in idx.search("a square", k=10, ext="png,gif")} == {".png", ".gif"}
    (photos / "img1.png").rename(photos / "renamed.png")
    solid_image(photos / "new.jpg", (10, 200, 10))
    with retrieval.open_index(**where, create=False) as idx:
        again = idx.add([photos], workers=0)
        assert (again.added, again.renamed, again.unchanged) == (1, 1, 6)
        assert str(photos / "renamed.png") in {r.path for r in idx.search("a square", k=20)}
        # Words search (migration 0005: FTS5 in SQLite, a GIN-indexed tsvector in PostgreSQL): the new
        # file name, stemmed ("renaming" matches "renamed"), and a caption's words, nothing else.
        assert [r.path for r in idx.search("renaming", mode="words", k=5)] == [str(photos / "renamed.png")]
        assert {r.text for r in idx.search("green", mode="words", target="texts", k=5)} == {"a green square"}
        removal = idx.remove([photos / "sub"])
        assert removal.files == 1
        data = idx.info()
        assert (data["images"], data["texts"], data["files"]) == (6, 3, 7)
        assert (data["backends"]["metadata"]["kind"], data["backends"]["vectors"]["kind"]) == stores(where)
        assert str(photos / "sub" / "img5.gif") not in {r.path for r in idx.search("a square", k=20)}


def test_a_second_model_in_every_metadata_store(where, tiny_model, photos) -> None:
    """Migration 0004's models and vectors tables: a second model answers as an index of its own."""
    with retrieval.open_index(**where, model="shapes-mini") as idx:
        idx.add([photos], workers=0)
        first = [(r.path, round(r.score, 4)) for r in idx.search(photos / "img0.jpg", target="images", k=6)]
        assert idx.add_model(tiny_model, "random", workers=0).filled == {idx.model_of(tiny_model): 6}
    with retrieval.open_index(**where, create=False) as idx:
        second = [(r.path, round(r.score, 4)) for r in idx.search(photos / "img0.jpg", target="images", k=6,
                                                                  model=tiny_model)]
        assert first[0][0] == second[0][0] == str(photos / "img0.jpg") and first != second  # another model's scores
        assert [(r.path, round(r.score, 4)) for r in idx.search(photos / "img0.jpg", target="images", k=6)] == first
        assert [(m["default"], m["images"]) for m in idx.info()["models"]] == [(True, 6), (False, 6)]


def test_words_search_leaves_out_words_of_half_the_items_in_every_store(where, tiny_model, photos) -> None:
    """The rule BM25 implies, kept by PostgreSQL's ranking too: a word in half the items or more
    ("img", "photos": every file's) matches nothing; a query's other words still do."""
    (photos / "captions.txt").write_text("a red square\ntwo green circles\na blue square\n")
    with retrieval.open_index(**where, model=tiny_model, pretrained="random") as idx:
        idx.add([photos], workers=0)
        assert [Path(h.path).name for h in idx.search("img3", mode="words", k=3)] == ["img3.JPG"]
        assert [t.text for t in idx.search("circle", mode="words", target="texts", k=3)] == ["two green circles"]
        assert idx.search("photos", mode="words", k=3) == []


def test_info_counts_words_and_ocr_text_in_every_store(where, tiny_model, photos, monkeypatch) -> None:
    """`info`'s words counts (the same SQL in every store): items with words, images read by OCR (its
    engine stood in for here), those it found text in."""
    from retrieval import ocr

    monkeypatch.setattr(ocr, "available", lambda: True)
    monkeypatch.setattr(ocr, "read_text", lambda path: "zanzibar harbour" if path.endswith("img2.webp") else "")
    (photos / "captions.txt").write_text("a red square\ntwo green circles\n")
    with retrieval.open_index(**where, model=tiny_model, pretrained="random") as idx:
        idx.add([photos], workers=0, ocr=True)
        assert idx.info()["words"] == {"items": 8, "ocr_read": 6, "ocr_text": 1}
        assert [Path(h.path).name for h in idx.search("zanzibar", mode="words", target="all", k=3)] == ["img2.webp"]


def test_cli_suite(runner, where, tiny_model, photos) -> None:
    """`index`, `query` (text and --image), `remove` and `info --json` with --index or --db."""
    at = cli_args(where)
    done = invoke(runner, "index", str(photos), *at, "--model", tiny_model, "--pretrained", "random", "--workers", "0")
    assert done.exit_code == 0, done.output
    assert "added 6" in done.stderr
    again = invoke(runner, "index", *at)
    assert "unchanged 6" in again.stderr, again.output
    hits = json.loads(invoke(runner, "query", "--image", str(photos / "img0.jpg"), "--target", "images", *at,
                             "--json").stdout)
    assert hits[0]["path"] == str(photos / "img0.jpg") and len(hits) == 6
    assert len(json.loads(invoke(runner, "query", "a red square", "--ext", "gif", *at, "--json").stdout)) == 1
    assert invoke(runner, "remove", str(photos / "img0.jpg"), *at).exit_code == 0
    info = json.loads(invoke(runner, "info", *at, "--json").stdout)
    assert info["images"] == 5
    text = invoke(runner, "info", *at).stdout
    metadata = info["backends"]["metadata"]
    assert (metadata["kind"], info["backends"]["vectors"]["kind"]) == stores(where)
    assert f"metadata: {metadata['kind']} ({metadata['where']})" in text and f"vectors: {stores(where)[1]} (" in text


def test_fresh_postgresql_gets_every_migration_as_sqlite_does(pg_db, tmp_path) -> None:
    from sqlalchemy import create_engine, inspect, text

    from retrieval.store import MIGRATIONS, Store

    with retrieval.open_index(db=pg_db) as pg, retrieval.open_index(tmp_path / "idx") as local:
        for idx in (pg, local):
            idx.store.set_setting("probe", "1")  # the first write creates the tables
    engines = [create_engine(pg_db), create_engine(f"sqlite:///{tmp_path / 'idx' / 'mmsearch.db'}")]
    names = []
    for engine in engines:
        with engine.connect() as conn:
            names.append([r[0] for r in conn.execute(text("SELECT name FROM migrations ORDER BY name"))])
        assert {t: {c["name"] for c in inspect(engine).get_columns(t)} for t in ("files", "roots")} == \
            {t: {c["name"] for c in inspect(engines[0]).get_columns(t)} for t in ("files", "roots")}
        engine.dispose()
    assert names[0] == names[1] == [name for name, _ in MIGRATIONS]
    assert Store  # the writer every back end migrates through


def test_an_older_postgresql_index_is_migrated_and_keeps_its_rows(pg_db, monkeypatch) -> None:
    """A database at 0001_initial (no roots.options, no ignored table, no file metadata) gets 0002 and
    0003 when opened; its files stay."""
    from sqlalchemy import create_engine, inspect, text

    from retrieval import store as store_module

    engine = create_engine(pg_db)
    with monkeypatch.context() as mp:
        mp.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:1])
        store_module.Store.attach(engine)
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE roots DROP COLUMN options"))
        conn.execute(text("DROP TABLE ignored"))
        for column in ("taken_at", "taken_offset", "camera", "width", "height"):
            conn.execute(text(f"ALTER TABLE files DROP COLUMN {column}"))
        conn.execute(text("INSERT INTO files (path, kind, size, mtime, sha256) VALUES ('/p/a.jpg', 'image', 1, 0, 'x')"))
        conn.execute(text("INSERT INTO roots (path) VALUES ('/p')"))
    with retrieval.open_index(db=pg_db, create=False) as idx:
        assert idx.reader.needs_migration() is False
        assert idx.reader.files_without_metadata() == [(1, "/p/a.jpg")]
        assert idx.reader.ignored() == [] and idx.reader.roots() == ["/p"]
    assert {"options"} <= {c["name"] for c in inspect(engine).get_columns("roots")}
    engine.dispose()


def test_second_writer_gets_in_use_then_waits(pg_db) -> None:
    """The PostgreSQL advisory lock: one writer at a time, across connections (so across machines)."""
    with retrieval.open_index(db=pg_db) as first, retrieval.open_index(db=pg_db) as second:
        with first.writing():
            with pytest.raises(IndexInUse, match="in use"):
                with second.writing():
                    pass
            started = time.monotonic()
            with pytest.raises(IndexInUse):
                with second.storage.lock(0.5):
                    pass
            assert time.monotonic() - started >= 0.5
        with second.writing():  # released
            pass


def test_another_machines_vector_cache_follows_the_database(pg_db, tmp_path, monkeypatch, model_cache, tiny_model,
                                                            photos) -> None:
    """Two per-user caches (two machines) on one database: each is brought up to the database's state."""
    caches = {name: tmp_path / name for name in ("a", "b")}
    for cache in caches.values():
        shutil.copytree(model_cache, cache)  # the model's ONNX export, made once per run
    monkeypatch.setenv("MMSEARCH_CACHE", str(caches["a"]))
    with retrieval.open_index(db=pg_db, model=tiny_model, pretrained="random") as idx:
        idx.add([photos], workers=0)
    monkeypatch.setenv("MMSEARCH_CACHE", str(caches["b"]))
    with retrieval.open_index(db=pg_db, create=False) as idx:
        assert len(idx.search(photos / "img0.jpg", target="images", k=20)) == 6
    monkeypatch.setenv("MMSEARCH_CACHE", str(caches["a"]))
    new = solid_image(photos / "new.png", (250, 250, 0))
    (photos / "img1.png").unlink()
    with retrieval.open_index(db=pg_db, create=False) as idx:
        idx.add([photos], workers=0)
    monkeypatch.setenv("MMSEARCH_CACHE", str(caches["b"]))
    with retrieval.open_index(db=pg_db, create=False) as idx:
        found = {r.path for r in idx.search(new, target="images", k=20)}
    assert str(new) in found and str(photos / "img1.png") not in found and len(found) == 6
    # B kept what it synced: its next query reads no vector from the database.
    with retrieval.open_index(db=pg_db, create=False) as idx:
        monkeypatch.setattr(idx.reader, "vectors", lambda *a, **k: pytest.fail("vectors read from the database"))
        assert {r.path for r in idx.search(new, target="images", k=20)} == found


def test_a_running_reader_takes_up_another_machines_commits(pg_db, tmp_path, monkeypatch, model_cache, tiny_model,
                                                             photos) -> None:
    """`serve` on machine B (its refresh before each request) finds what machine A indexed meanwhile."""
    caches = {name: tmp_path / name for name in ("a", "b")}
    for cache in caches.values():
        shutil.copytree(model_cache, cache)
    monkeypatch.setenv("MMSEARCH_CACHE", str(caches["a"]))
    with retrieval.open_index(db=pg_db, model=tiny_model, pretrained="random") as idx:
        idx.add([photos], workers=0)
    monkeypatch.setenv("MMSEARCH_CACHE", str(caches["b"]))
    server = retrieval.open_index(db=pg_db, create=False)
    try:
        before = {r.path for r in server.search(photos / "img0.jpg", target="images", k=20)}
        assert server.refresh() == []  # nothing new
        monkeypatch.setenv("MMSEARCH_CACHE", str(caches["a"]))
        new = solid_image(photos / "new.png", (250, 250, 0))
        (photos / "img1.png").unlink()
        with retrieval.open_index(db=pg_db, create=False) as writer:
            writer.add([photos], workers=0)
        assert str(new) not in {r.path for r in server.search(new, target="images", k=20)}  # not yet
        assert server.refresh() == ["image"]
        after = {r.path for r in server.search(new, target="images", k=20)}
        assert after == before - {str(photos / "img1.png")} | {str(new)}
    finally:
        server.close()


def test_a_killed_writer_leaves_no_lock_behind(pg_db) -> None:
    """The advisory lock is the writer's session's: the server drops it when the process dies (kill -9)."""
    code = ("import sys, time, retrieval\n"
            f"idx = retrieval.open_index(db={pg_db!r})\n"
            "with idx.storage.lock(0):\n"
            "    print('locked', flush=True)\n"
            "    time.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with retrieval.open_index(db=pg_db) as idx:
            with pytest.raises(IndexInUse):
                with idx.storage.lock(0):
                    pass
            holder.kill()
            holder.wait()
            with idx.storage.lock(10):  # the server notices the closed connection at once
                pass
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


@pytest.mark.cluster
def test_two_concurrent_writers_leave_one_row_per_file(pg_db, tiny_model, photos) -> None:
    args = ["index", str(photos), "--db", pg_db, "--model", tiny_model, "--pretrained", "random", "--workers", "0",
            "--wait", "120", "--quiet"]
    procs = [subprocess.Popen([sys.executable, str(REPO / "cli.py"), *args], stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    from sqlalchemy import create_engine, text

    engine = create_engine(pg_db)
    with engine.connect() as conn:
        per_file = conn.execute(text("SELECT f.path, count(i.id) FROM files f JOIN items i ON i.file_id = f.id "
                                     "GROUP BY f.path")).all()
    engine.dispose()
    assert len(per_file) == 6 and all(n == 1 for _, n in per_file)


def test_query_cache_of_a_url_index_is_in_the_per_user_cache_dir(runner, tmp_path, monkeypatch, pg_db, tiny_model,
                                                                 photos) -> None:
    monkeypatch.delenv("MMSEARCH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.chdir(tmp_path)
    at = ["--db", pg_db]
    assert invoke(runner, "index", str(photos), *at, "--model", tiny_model, "--pretrained", "random",
                  "--workers", "0").exit_code == 0
    assert invoke(runner, "query", "a cached query", *at).exit_code == 0
    cached = list((tmp_path / "xdg-cache" / "mmsearch" / "db").glob("*/query-cache/*.npy"))
    assert len(cached) == 1
    assert list((tmp_path / "xdg-cache" / "mmsearch" / "db").glob("*/vectors-*/vectors-image.faiss"))
    assert not (photos / "query-cache").exists() and not (tmp_path / "query-cache").exists()


def test_password_is_never_shown(runner, postgres, pg_db) -> None:
    with_password = pg_db.replace("postgres@", "postgres:s3cret-pw@")  # trust auth: any password is taken
    with retrieval.open_index(db=with_password) as idx:
        idx.store.set_setting("probe", "1")
    for args in (["info"], ["info", "--json"]):
        out = invoke(runner, *args, "--db", with_password)
        assert out.exit_code == 0, out.output
        assert "s3cret" not in out.output and "postgres@127.0.0.1" in out.output


def test_bad_urls_fail_in_one_line_naming_the_fix(tmp_path) -> None:
    cases = [
        (["--db", "nonsense"], "not a database URL"),
        (["--db", "mysql://u@h/db"], "only PostgreSQL"),
        (["--db", f"postgresql+psycopg://u:pw@127.0.0.1:{free_port()}/db"], "cannot reach the database"),
        (["--db", "sqlite:///x.db", "--index", str(tmp_path)], "not both"),
        (["--vectors", "nowhere"], "milvus://HOST:PORT"),
    ]
    for args, message in cases:
        started = time.monotonic()
        done = run_mmsearch("info", *args, cwd=tmp_path, timeout=60)
        assert done.returncode == 1 and message in done.stderr, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
        assert "pw" not in done.stderr.replace("psycopg", "")
        assert time.monotonic() - started < 15


def test_missing_driver_names_the_extra(tmp_path) -> None:
    code = ("import sys; sys.modules['psycopg'] = None; sys.argv = ['mmsearch', 'info', '--db', "
            "'postgresql://u@127.0.0.1:1/db']\nfrom retrieval.cli import main\nmain()")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "pip install 'mmsearch[cluster]'" in done.stderr, done.stderr


def test_env_vars_choose_the_back_ends(runner, monkeypatch, tmp_path, tiny_model, photos) -> None:
    monkeypatch.setenv("MMSEARCH_DB", f"sqlite:///{tmp_path / 'env.db'}")
    assert invoke(runner, "index", str(photos), "--model", tiny_model, "--pretrained", "random",
                  "--workers", "0").exit_code == 0
    assert (tmp_path / "env.db").exists() and not (tmp_path / "default-index").exists()
    assert json.loads(invoke(runner, "info", "--json").stdout)["images"] == 6
    # --index wins over MMSEARCH_DB: that directory holds no index
    assert invoke(runner, "info", "--index", str(tmp_path / "other")).exit_code == 1


@pytest.mark.parametrize("metadata", ["directory", "sqlite-url"])
def test_vectors_in_milvus_with_the_embedded_metadata_stores(runner, metadata, tmp_path, tiny_model, photos) -> None:
    """`--vectors PATH.db` (milvus-lite) beside an index directory or an SQLite URL (PostgreSQL + Milvus
    runs the suites above)."""
    pytest.importorskip("pymilvus", reason="pymilvus is not installed (pip install 'mmsearch[cluster]')")
    where = {"directory": str(tmp_path / "idx")} if metadata == "directory" else {"db": f"sqlite:///{tmp_path / 'm.db'}"}
    at = [*cli_args(where), "--vectors", str(tmp_path / "vectors.db")]
    args = ["index", str(photos), *at, "--model", tiny_model, "--pretrained", "random", "--workers", "0"]
    assert invoke(runner, *args).exit_code == 0
    hits = json.loads(invoke(runner, "query", "--image", str(photos / "img0.jpg"), "--target", "images", *at,
                             "--json").stdout)
    assert hits[0]["path"] == str(photos / "img0.jpg")
    assert json.loads(invoke(runner, "info", *at, "--json").stdout)["backends"]["vectors"]["kind"] == "milvus"


def test_reading_commands_create_no_index_in_a_database(runner, tmp_path, pg_db) -> None:
    from sqlalchemy import create_engine, inspect

    for db in (pg_db, f"sqlite:///{tmp_path / 'none.db'}"):
        done = invoke(runner, "query", "a dog", "--db", db)
        assert done.exit_code == 1 and "no index in database" in done.output
    engine = create_engine(pg_db)
    assert inspect(engine).get_table_names() == []
    engine.dispose()
    assert not (tmp_path / "none.db").exists()

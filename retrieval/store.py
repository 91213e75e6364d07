"""SQLite metadata store (through SQLAlchemy): migrations and every write to an index.

One database per index directory holds the files seen, the items embedded from them
(one per image, one per text line/record) with their float32 vectors, the model that
built the index, and the failures of the last runs. It is the source of truth. Every
write is one transaction; `generation` grows with each, so a vector cache can tell
whether it is current. The tables are those of `schema`; reads are in `reader`, which a
query uses without importing SQLAlchemy. Knows nothing of torch or FAISS.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

import numpy as np
from sqlalchemy import (
    Column,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, Engine, ExceptionContext
from sqlalchemy.exc import OperationalError
from sqlalchemy.schema import CreateIndex, CreateTable

from . import schema
from .config import DB_NAME
from .errors import IndexReadOnly, ModelInUse, ModelMismatch
from .reader import chunks, database_error, is_under, root_of
from .schema import SCHEMA_VERSION
from .records import FileMetadata, ModelManifest, NewFile, RootOptions
from .stores import model_key


#: SQLAlchemy type of each `schema.TYPES` name. Strings (paths) compare byte-wise on PostgreSQL as on
#: SQLite (collation "C"), so ORDER BY and comparisons of names agree whatever the server's locale.
_TYPES = {"string": String().with_variant(String(collation="C"), "postgresql"), "text": Text(), "integer": Integer(),
          "float": Float(), "blob": LargeBinary()}


def _table(metadata: MetaData, table: schema.Table) -> Table:
    """The SQLAlchemy table of a `schema` table (portable to PostgreSQL)."""
    columns = [
        Column(c.name, _TYPES[c.type],
               *([ForeignKey(c.references, ondelete="CASCADE")] if c.references else []),
               primary_key=c.primary_key, nullable=c.nullable and not c.primary_key, unique=c.unique or None,
               index=c.index or None, default=c.default)
        for c in table.columns
    ]
    return Table(table.name, metadata, *columns, sqlite_autoincrement=table.autoincrement)


#: The index schema, built from `schema.TABLES`.
METADATA = MetaData()
for _t in schema.TABLES:
    _table(METADATA, _t)
Migration, Meta, Root, File, Item, Failure, Ignored, Model, Vector, Words = (METADATA.tables[t.name] for t in (
    schema.MIGRATIONS, schema.META, schema.ROOTS, schema.FILES, schema.ITEMS, schema.FAILURES, schema.IGNORED,
    schema.MODELS, schema.VECTORS, schema.WORDS))


def _create(conn: Connection, table: Table) -> None:
    """Create `table` and its indexes unless it exists; indexes in name order, so every new
    database has the same schema text (SQLAlchemy keeps a table's indexes in a set)."""
    if inspect(conn).has_table(table.name):
        return
    conn.execute(CreateTable(table))
    for index in sorted(table.indexes, key=lambda ix: str(ix.name)):
        conn.execute(CreateIndex(index))


def _m0001_initial(conn: Connection) -> None:
    # Creates the tables as `schema` defines them now, so later migrations check before they add.
    for table in METADATA.tables.values():  # in `schema.TABLES` order
        _create(conn, table)


def _m0002_root_options_ignored(conn: Connection) -> None:
    # A new database got both from 0001's create_all (the current models); an older one gets them here.
    if "options" not in {c["name"] for c in inspect(conn).get_columns("roots")}:
        conn.execute(text("ALTER TABLE roots ADD COLUMN options TEXT"))
    _create(conn, Ignored)


def _m0003_file_metadata(conn: Connection) -> None:
    # Nullable columns: an older index gets them empty, filled by its next scan without re-embedding.
    have = {c["name"] for c in inspect(conn).get_columns("files")}
    for column in schema.FILES.columns:
        if column.name not in have:
            conn.execute(text(f"ALTER TABLE files ADD COLUMN {column.name} {_TYPES[column.type].compile(conn.dialect)}"))


def _m0004_model_vectors(conn: Connection) -> None:
    # The one model (meta 'model') becomes the default row of `models`, and its vectors move from
    # items.vector to `vectors`; the generation is kept, so the FAISS files stay a valid cache.
    _create(conn, Model)
    _create(conn, Vector)
    raw = conn.scalar(select(Meta.c.value).where(Meta.c.key == "model"))
    if raw is not None:
        model_id = conn.execute(insert(Model).values(
            key=model_key(ModelManifest(**json.loads(raw))), manifest=raw, is_default=1, generation=0)).inserted_primary_key[0]
        conn.execute(delete(Meta).where(Meta.c.key == "model"))
    if "vector" in {c["name"] for c in inspect(conn).get_columns("items")}:
        if raw is not None:
            conn.execute(text("INSERT INTO vectors (item_id, model_id, vector) SELECT id, :model, vector FROM items"),
                         {"model": model_id})
        conn.execute(text("ALTER TABLE items DROP COLUMN vector"))


#: SQLite's full-text index over `words` (external content: it stores only the index), kept in step by
#: triggers on `words`, which fire for the rows a deleted item takes with it too. The porter stemmer
#: lets "trips" find "trip"; diacritics are folded ("café" finds "cafe").
_FTS = [
    f"CREATE VIRTUAL TABLE IF NOT EXISTS {schema.WORDS_FTS} USING fts5(text, ocr, content='words', "
    "content_rowid='item_id', tokenize='porter unicode61 remove_diacritics 2')",
    f"CREATE TRIGGER IF NOT EXISTS words_ai AFTER INSERT ON words BEGIN "
    f"INSERT INTO {schema.WORDS_FTS}(rowid, text, ocr) VALUES (new.item_id, new.text, new.ocr); END",
    f"CREATE TRIGGER IF NOT EXISTS words_ad AFTER DELETE ON words BEGIN "
    f"INSERT INTO {schema.WORDS_FTS}({schema.WORDS_FTS}, rowid, text, ocr) VALUES ('delete', old.item_id, old.text, old.ocr); END",
    f"CREATE TRIGGER IF NOT EXISTS words_au AFTER UPDATE ON words BEGIN "
    f"INSERT INTO {schema.WORDS_FTS}({schema.WORDS_FTS}, rowid, text, ocr) VALUES ('delete', old.item_id, old.text, old.ocr); "
    f"INSERT INTO {schema.WORDS_FTS}(rowid, text, ocr) VALUES (new.item_id, new.text, new.ocr); END",
]


def _m0005_words(conn: Connection) -> None:
    # The words of every item whose file's metadata is known are filled in here from what is stored
    # (no file is read: a read-only index of this version answers words queries after one writable
    # open); an image whose metadata an older index lacks gets them from the next scan, after its metadata.
    from .words import item_words

    _create(conn, Words)
    if conn.dialect.name == "sqlite":
        for statement in _FTS:
            conn.execute(text(statement))
    elif conn.dialect.name == "postgresql":
        conn.execute(text(f"CREATE INDEX IF NOT EXISTS ix_words_tsvector ON words USING GIN ({schema.WORDS_TSVECTOR})"))
    roots = list(conn.scalars(select(Root.c.path)))
    rows = conn.execute(
        select(Item.c.id, Item.c.kind, File.c.path, Item.c.text, File.c.camera, File.c.taken_at, File.c.taken_offset)
        .join(File, File.c.id == Item.c.file_id).outerjoin(Words, Words.c.item_id == Item.c.id)
        .where(Words.c.item_id.is_(None), (Item.c.kind != "image") | File.c.width.is_not(None)))
    values = [{"item_id": r.id, "text": item_words(r.kind, r.path, root_of(r.path, roots), r.text, r.camera,
                                                   r.taken_at, r.taken_offset)} for r in rows]
    if values:
        conn.execute(insert(Words), values)


#: Named schema migrations, applied once each, in order; the last is `reader.SCHEMA_VERSION`.
MIGRATIONS = [("0001_initial", _m0001_initial), ("0002_root_options_ignored", _m0002_root_options_ignored),
              ("0003_file_metadata", _m0003_file_metadata), ("0004_model_vectors", _m0004_model_vectors),
              ("0005_words", _m0005_words)]
assert MIGRATIONS[-1][0] == SCHEMA_VERSION, "reader.SCHEMA_VERSION must name the last migration"


#: SQLite page size of new index databases (see `_sqlite_pragmas`).
PAGE_SIZE = 16384


def _sqlite_pragmas(dbapi_conn: sqlite3.Connection, _record: object) -> None:
    cur = dbapi_conn.cursor()
    # Takes effect only when the file is created. A 512-d float32 vector is a 2 KB row: with
    # 4 KB pages each row fills a page (4.1 KB a row); 16 KB pages hold 7 (2.4 KB a row).
    cur.execute(f"PRAGMA page_size={PAGE_SIZE}")
    # WAL: readers never block the writer and a crash rolls back to the last commit.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def _raise_typed(context: ExceptionContext, directory: Path) -> None:
    """Any SQLite failure of a write (a damaged file, a lock, a full disk) as one typed, one-line error."""
    if isinstance(context.original_exception, sqlite3.DatabaseError):
        raise database_error(str(context.original_exception), directory) from None


#: Key of the PostgreSQL advisory lock held while migrating, so two first writers do not both create tables.
_MIGRATION_LOCK = 0x6D6D_7365_6172_6368  # "mmsearch"


class Store:
    """The metadata database of one index (an index directory's SQLite file, or a database URL's)."""

    def __init__(self, engine: Engine, directory: Path | None) -> None:
        self.engine = engine
        self.directory = directory

    @classmethod
    def open(cls, directory: Path) -> Store:
        """Open the database in `directory` for writing, creating and migrating it as needed."""
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise IndexReadOnly(f"cannot create index directory {directory}: {exc.strerror}") from None
        engine = create_engine(f"sqlite:///{directory / DB_NAME}")
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "handle_error", lambda context: _raise_typed(context, directory))
        store = cls(engine, directory)
        try:
            store._migrate()
        except OperationalError as exc:
            raise database_error(str(exc.orig), directory) from None
        return store

    @classmethod
    def attach(cls, engine: Engine) -> Store:
        """The metadata database behind `engine` (any dialect `sql_store` accepts), created and
        migrated as needed; the engine's own error handler types its failures."""
        store = cls(engine, None)
        store._migrate()
        return store

    def close(self) -> None:
        """Release database connections."""
        self.engine.dispose()

    def _migrate(self) -> None:
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":  # held to the end of this transaction
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
            _create(conn, Migration)
            done = set(conn.scalars(select(Migration.c.name)))
            for name, step in MIGRATIONS:
                if name not in done:
                    step(conn)
                    conn.execute(insert(Migration).values(name=name, applied_at=time.time()))

    # --- meta -------------------------------------------------------------------------------

    def _get_meta(self, conn: Connection, key: str) -> str | None:
        return conn.scalar(select(Meta.c.value).where(Meta.c.key == key))

    def _set_meta(self, conn: Connection, key: str, value: str) -> None:
        conn.execute(delete(Meta).where(Meta.c.key == key))
        conn.execute(insert(Meta).values(key=key, value=value))

    def claim_model(self, manifest: ModelManifest) -> None:
        """Record the index's (default) model, or refuse a different one (ModelMismatch)."""
        with self.engine.begin() as conn:
            raw = conn.scalar(select(Model.c.manifest).where(Model.c.is_default == 1))
            if raw is None:
                self._insert_model(conn, manifest, default=True)
                return
        current = ModelManifest(**json.loads(raw))
        if current.identity() != manifest.identity():
            raise ModelMismatch(
                f"this index was built with {current.describe()}, not {manifest.describe()}; "
                "use the same model or another --index (or add it with --add-model)"
            )

    def _insert_model(self, conn: Connection, manifest: ModelManifest, default: bool) -> None:
        conn.execute(insert(Model).values(key=model_key(manifest), manifest=json.dumps(asdict(manifest)),
                                          is_default=int(default), generation=0))

    def add_model(self, manifest: ModelManifest) -> bool:
        """Record another model of the index (its vectors come with `add_vectors`); False if it is one already."""
        with self.engine.begin() as conn:
            if conn.scalar(select(Model.c.id).where(Model.c.key == model_key(manifest))) is not None:
                return False
            self._insert_model(conn, manifest, default=False)
        return True

    def remove_model(self, key: str) -> int:
        """Forget a model that is not the default (ModelInUse for the default) and delete its vectors;
        returns how many were deleted."""
        with self.engine.begin() as conn:
            row = conn.execute(select(Model.c.id, Model.c.is_default).where(Model.c.key == key)).first()
            if row is None:
                return 0
            if row.is_default:
                raise ModelInUse(f"model {key} is the index's default (it embeds new files first): it cannot be removed")
            gone = conn.execute(delete(Vector).where(Vector.c.model_id == row.id)).rowcount
            conn.execute(delete(Model).where(Model.c.id == row.id))
        return gone

    def add_vectors(self, key: str, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Store vectors of model `key` for existing items (one transaction; bumps that model's generation)."""
        with self.engine.begin() as conn:
            model_id = conn.scalar(select(Model.c.id).where(Model.c.key == key))
            rows = [{"item_id": int(i), "model_id": model_id, "vector": v.tobytes()}
                    for i, v in zip(ids, np.ascontiguousarray(vectors, dtype=np.float32))]
            if rows:
                conn.execute(insert(Vector), rows)
            conn.execute(update(Model).where(Model.c.id == model_id).values(generation=Model.c.generation + 1))

    def set_setting(self, key: str, value: str | None) -> None:
        """Store (or with None, clear) a value kept with the index."""
        with self.engine.begin() as conn:
            conn.execute(delete(Meta).where(Meta.c.key == f"setting:{key}"))
            if value is not None:
                conn.execute(insert(Meta).values(key=f"setting:{key}", value=value))

    def _bump(self, conn: Connection) -> None:
        value = int(self._get_meta(conn, "generation") or 0) + 1
        self._set_meta(conn, "generation", str(value))

    # --- writes -----------------------------------------------------------------------------

    def add_roots(self, paths: Iterable[str], options: dict[str, RootOptions] | None = None) -> None:
        """Remember folders/files the user indexed so a bare `index` re-scans them.

        A new root is stored with its `options` (default: none); a known root keeps its own
        (see `set_root_options`).
        """
        options = options or {}
        with self.engine.begin() as conn:
            known = set(conn.scalars(select(Root.c.path)))
            for path in dict.fromkeys(paths):  # a path named twice is one root
                if path not in known:
                    conn.execute(insert(Root).values(path=path, options=options.get(path, RootOptions()).to_json()))

    def set_root_options(self, options: dict[str, RootOptions]) -> None:
        """Store how each (known) root is scanned from now on."""
        with self.engine.begin() as conn:
            for path, opts in options.items():
                conn.execute(update(Root).where(Root.c.path == path).values(options=opts.to_json()))

    def replace_ignored(self, roots: Iterable[str], found: Iterable[str], keep_under: Iterable[str] = ()) -> None:
        """Make `found` the files of unsupported type at or below `roots` (those below the
        unreadable folders `keep_under` stay as they were)."""
        keep = list(keep_under)
        wanted = dict.fromkeys(found)
        with self.engine.begin() as conn:
            stored: set[str] = set()
            for root in roots:
                prefix = root.rstrip(os.sep) + os.sep
                stored.update(conn.scalars(select(Ignored.c.path).where(
                    (Ignored.c.path == root) | (func.substr(Ignored.c.path, 1, len(prefix)) == prefix))))
            drop = [p for p in stored if p not in wanted and not any(is_under(p, k) for k in keep)]
            for part in chunks(drop):
                conn.execute(delete(Ignored).where(Ignored.c.path.in_(part)))
            now = time.time()
            rows = [{"path": p, "at": now} for p in wanted if p not in stored]
            if rows:  # only what changed is written: a re-scan of an unchanged folder writes nothing
                conn.execute(insert(Ignored), rows)

    def set_file_metadata(self, rows: Iterable[tuple[int, FileMetadata]]) -> None:
        """Store the image metadata read for files (by id)."""
        values = [{"fid": file_id, **asdict(meta)} for file_id, meta in rows]
        if values:
            with self.engine.begin() as conn:
                conn.execute(update(File).where(File.c.id == bindparam("fid")), values)

    def set_words(self, rows: Iterable[tuple[int, str, str | None]]) -> None:
        """Store (replacing) the searchable words of items: (item id, words, OCR text or None)."""
        values = [{"item_id": item_id, "text": words, "ocr": ocr} for item_id, words, ocr in rows]
        if not values:
            return
        with self.engine.begin() as conn:
            for part in chunks(values):
                conn.execute(delete(Words).where(Words.c.item_id.in_([v["item_id"] for v in part])))
                conn.execute(insert(Words), list(part))

    def commit(
        self,
        added: Iterable[NewFile] = (),
        removed_files: Iterable[int] = (),
        moved: Iterable[tuple[int, str, int, float]] = (),
        failures: Iterable[tuple[str, str]] = (),
        cleared_failures: Iterable[str] = (),
        forgotten_roots: Iterable[str] = (),
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Apply one batch of changes in one transaction.

        `added` files replace any earlier file of the same path; `moved` is (file id, new
        path, size, mtime) for a file recognized by content; `forgotten_roots` are no longer
        re-scanned. Returns, per kind, the new item ids, their vectors, and the item ids that
        were deleted, for the vector cache.
        """
        new_ids: dict[str, list[int]] = {}
        new_vecs: dict[str, list[np.ndarray]] = {}
        gone: dict[str, list[int]] = {}
        added = list(added)
        failures = list(failures)
        with self.engine.begin() as conn:
            for file_id, path, size, mtime in moved:
                conn.execute(update(File).where(File.c.id == file_id).values(path=path, size=size, mtime=mtime))
                # Its name words are made again by the scan's end (its OCR text still holds: same content).
                conn.execute(update(Words).where(Words.c.item_id.in_(select(Item.c.id).where(Item.c.file_id == file_id)))
                             .values(text=None))
            removed = list(removed_files)
            if added:
                removed.extend(conn.scalars(select(File.c.id).where(File.c.path.in_([nf.path for nf in added]))))
            for part in chunks(removed):  # a deleted folder can hold more files than one statement takes
                items = conn.execute(select(Item.c.kind, Item.c.id).where(Item.c.file_id.in_(part))).all()
                for kind, item_id in items:
                    gone.setdefault(kind, []).append(item_id)
                for ids in chunks([item_id for _, item_id in items]):
                    conn.execute(delete(Vector).where(Vector.c.item_id.in_(ids)))
                conn.execute(delete(Item).where(Item.c.file_id.in_(part)))
                conn.execute(delete(File).where(File.c.id.in_(part)))
            # Bulk inserts with RETURNING (one statement per table, ids in parameter order): per-row
            # inserts cost ~1 ms an image, a ceiling for GPU-speed indexing.
            if added:
                file_ids = conn.execute(
                    insert(File).returning(File.c.id, sort_by_parameter_order=True),
                    [{"path": nf.path, "kind": nf.kind, "size": nf.size, "mtime": nf.mtime, "sha256": nf.sha256}
                     for nf in added],
                ).scalars().all()
                rows = [
                    (nf.kind, {"file_id": file_id, "kind": nf.kind, "line": line, "text": text}, vec)
                    for nf, file_id in zip(added, file_ids)
                    if nf.vectors is not None and len(nf.lines)
                    for line, text, vec in zip(nf.lines, nf.texts, np.ascontiguousarray(nf.vectors, dtype=np.float32))
                ]
                if rows:
                    item_ids = conn.execute(
                        insert(Item).returning(Item.c.id, sort_by_parameter_order=True), [r[1] for r in rows]
                    ).scalars().all()
                    for (kind, _, vec), item_id in zip(rows, item_ids):
                        new_ids.setdefault(kind, []).append(item_id)
                        new_vecs.setdefault(kind, []).append(vec)
                    # A new item's vector is the default model's; the other models' come with `add_vectors`.
                    model_id = conn.scalar(select(Model.c.id).where(Model.c.is_default == 1))
                    conn.execute(insert(Vector), [{"item_id": item_id, "model_id": model_id, "vector": vec.tobytes()}
                                                  for (_, _, vec), item_id in zip(rows, item_ids)])
            stale = list(cleared_failures) + [path for path, _ in failures]
            for part in chunks(stale):
                conn.execute(delete(Failure).where(Failure.c.path.in_(part)))
            for part in chunks(list(forgotten_roots)):
                conn.execute(delete(Root).where(Root.c.path.in_(part)))
            if failures:
                now = time.time()
                conn.execute(insert(Failure), [{"path": p, "reason": r, "at": now} for p, r in dict(failures).items()])
            self._bump(conn)
        ids = {k: np.asarray(v, dtype=np.int64) for k, v in new_ids.items()}
        vecs = {k: np.stack(v) for k, v in new_vecs.items()}
        return ids, vecs, {k: np.asarray(v, dtype=np.int64) for k, v in gone.items()}


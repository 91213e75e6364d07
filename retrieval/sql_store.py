"""Metadata in a database given by an SQLAlchemy URL (`--db`): PostgreSQL through psycopg 3, or `sqlite:///`.

The same tables and migrations as an index directory's SQLite file (`schema`, `store`), the
same reads (`reader.StoreReader`'s SQL, run here over SQLAlchemy), vectors kept in the
database as float32 blobs (bytea). The searchable vectors are a cache, by default FAISS files
in the per-user cache directory keyed by the URL (without its password), with the query cache
and calibration samples. One writer at a time: a PostgreSQL advisory lock (an flock beside the
file for `sqlite:///`). Imported only when a URL is given: the embedded default never loads it.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import URL, Engine, ExceptionContext, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError

from . import schema
from .config import CLUSTER_EXTRA, cache_dir
from .errors import DatabaseUnavailable, IndexDamaged, IndexNotFound, MMSearchError
from .local import LocalStorage, acquire, file_lock
from .reader import StoreReader
from .store import Store, _sqlite_pragmas
from .stores import VectorBackend, VectorSet

#: Seconds to wait for a database server to answer before giving up (a server down fails fast).
CONNECT_TIMEOUT = 5


def parse_url(db: str) -> URL:
    """The SQLAlchemy URL of `--db` (`postgresql://` means psycopg 3); DatabaseUnavailable for
    anything but a PostgreSQL or SQLite URL."""
    try:
        url = make_url(db)
    except ArgumentError:
        raise DatabaseUnavailable(f"--db {db.split('@')[-1]!r} is not a database URL: use "
                                  "postgresql+psycopg://USER@HOST/DB or sqlite:///PATH") from None
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        raise DatabaseUnavailable("--db sqlite:/// needs a file (sqlite:///PATH): an index in memory would be lost")
    if url.get_backend_name() not in ("postgresql", "sqlite"):
        raise DatabaseUnavailable(f"--db {shown(url)}: only PostgreSQL (postgresql+psycopg://) and SQLite "
                                  "(sqlite:///PATH) databases are supported")
    return url


def shown(url: URL) -> str:
    """`url` as printed and as the key of its caches: never with its password."""
    bare = URL.create(url.drivername, url.username, None, url.host, url.port, url.database, url.query)
    return bare.render_as_string(hide_password=False)


def connect(url: URL) -> Engine:
    """An engine for `url` whose failures are typed errors; one round trip checks that it answers."""
    where = shown(url)
    try:
        if url.get_backend_name() == "postgresql":
            # No pre-ping (a round trip per checkout, so per read): a dropped connection fails its
            # statement once, as a disconnect, and SQLAlchemy refreshes the pool.
            engine = create_engine(url, connect_args={"connect_timeout": CONNECT_TIMEOUT})
        else:
            engine = create_engine(url)
            event.listen(engine, "connect", _sqlite_pragmas)
    except ImportError as exc:
        raise DatabaseUnavailable(f"--db {where} needs the database driver {exc.name}: {CLUSTER_EXTRA}") from None
    hint = "is the server running, and the URL right?" if url.get_backend_name() == "postgresql" else \
        "does its folder exist, and may it be written?"
    event.listen(engine, "handle_error", lambda context: _raise_typed(context, where, hint))
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except BaseException:
        engine.dispose()
        raise
    return engine


def _raise_typed(context: ExceptionContext, where: str, hint: str) -> None:
    """A database failure as one line: cannot connect (DatabaseUnavailable), else MMSearchError."""
    original = context.original_exception
    message = str(original).strip().splitlines()[0] if str(original).strip() else type(original).__name__
    if context.connection is None or context.is_disconnect:
        raise DatabaseUnavailable(f"cannot reach the database {where}: {message} "
                                  f"({hint})") from None
    if isinstance(context.sqlalchemy_exception, DBAPIError):
        raise MMSearchError(f"database {where}: {message}") from None


class SqlReader(StoreReader):
    """`StoreReader`'s SQL run over SQLAlchemy: each read is one statement on a pooled connection
    in autocommit mode, so it sees the latest committed state and holds nothing open."""

    def __init__(self, engine: Engine, location: str) -> None:
        super().__init__(None, None)
        self._engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.location = location

    def _all(self, sql: str, params: Iterable[object] = ()) -> list[tuple]:
        named, values = _named(sql, list(params))
        with self._engine.connect() as conn:
            return [tuple(row) for row in conn.execute(text(named), values)]

    def _tables(self) -> set[str]:
        return set(inspect(self._engine).get_table_names())

    def _matching(self, terms: Sequence[str]) -> tuple[str, list[object], str, str, str, list[object]]:
        """SQLite's FTS5 match for an `sqlite:///` URL; PostgreSQL's full text otherwise: the words'
        tsvector (GIN-indexed) against the terms' tsqueries OR-ed, scored by ts_rank."""
        if self._engine.dialect.name == "sqlite":
            return super()._matching(terms)
        query = " || ".join("plainto_tsquery('english', ?)" for _ in terms)
        return (f"{schema.WORDS} CROSS JOIN (SELECT {query} AS q) AS wanted", list(terms), schema.WORDS.cols("item_id"),
                f"ts_rank({schema.WORDS_TSVECTOR}, wanted.q)", f"{schema.WORDS_TSVECTOR} @@ wanted.q", [])

    def _missing(self, message: str) -> bool:
        return "does not exist" in message or "no such" in message

    def _foreign(self) -> IndexDamaged:
        return IndexDamaged(f"database {self.location} holds tables of something else, not an mmsearch index "
                            "(no migrations table): use another database or schema")

    def close(self) -> None:
        """Nothing to release: the engine belongs to the storage."""


class SqlStorage(LocalStorage):
    """An index whose metadata is at a database URL; its "directory" is the per-user cache directory
    keyed by the URL (vector files, query cache, samples). `reader` is None until the index's tables
    are created by its first write."""

    def __init__(self, url: URL, engine: Engine, reader: SqlReader | None, vectors: VectorBackend | None) -> None:
        super().__init__(_cache_dir(url), reader, None, vectors)
        self.url = url
        self.location = shown(url)
        self._engine = engine

    @classmethod
    def open(cls, db: str, *, create: bool = True, vectors: VectorBackend | None = None) -> SqlStorage:  # type: ignore[override]
        """The index in the database `db` (a URL): a new one (created by its first write) when the
        database holds none and `create`, else IndexNotFound. An older schema is migrated."""
        url = parse_url(db)
        if url.get_backend_name() == "sqlite" and not create and not Path(str(url.database)).exists():
            raise IndexNotFound(f"no index in database {shown(url)} (run `mmsearch index PATH --db ...` first)")
        engine = connect(url)
        reader = SqlReader(engine, shown(url))
        try:
            if schema.MIGRATIONS.name not in reader.check_origin():
                if not create:
                    raise IndexNotFound(f"no index in database {shown(url)} (run `mmsearch index PATH --db ...` first)")
                return cls(url, engine, None, vectors)
            storage = cls(url, engine, reader, vectors)
            if reader.needs_migration():
                storage.writer  # noqa: B018 - an index from an older mmsearch: migrate it before reading
            return storage
        except BaseException:
            engine.dispose()
            raise

    #: Other machines write this database, and save their vector files in their own caches.
    follows = True

    def _open_reader(self) -> SqlReader:
        return SqlReader(self._engine, self.location)

    def _open_writer(self) -> Store:
        return Store.attach(self._engine)

    def _faiss_dir(self) -> Path:
        """The FAISS files of this database's index: keyed also by when its tables were created, so a
        database dropped and made again at the same URL never meets the vectors of the old one."""
        created = self.reader._all(f"SELECT applied_at FROM {schema.MIGRATIONS} WHERE name = ?", ["0001_initial"])
        directory = self.directory / f"vectors-{hashlib.sha256(repr(created).encode()).hexdigest()[:8]}"
        directory.mkdir(parents=True, exist_ok=True)
        return directory

    def vector_set(self, kind: str, model: str | None = None) -> VectorSet:
        """As `Storage.vector_set`; a FAISS set built or synced from the database is also kept in this
        user's cache right away (a reading process holds no lock, and its cache is its own), so a
        machine that only queries does not read every vector from the database again next time."""
        index = super().vector_set(kind, model)
        if self._vector_backend is None:
            self.vectors.persist_loaded()  # type: ignore[attr-defined] - FAISS files (faiss_vectors)
        return index

    def _metadata_backend(self) -> dict[str, str]:
        return {"kind": self.url.get_backend_name(), "where": self.location}

    @contextmanager
    def lock(self, wait: float) -> Iterator[None]:
        """PostgreSQL: a session advisory lock keyed by the database and schema (released by the
        server if this process dies); SQLite: an flock on `<file>.lock`."""
        if self.url.get_backend_name() != "postgresql":
            with file_lock(Path(f"{self.url.database}.lock"), self.location, wait):
                yield
            return
        with self._engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            where = conn.execute(text("SELECT current_database(), current_schema()")).one()
            key = _lock_key(f"mmsearch-index:{where[0]}:{where[1]}")
            acquire(lambda: bool(conn.scalar(text("SELECT pg_try_advisory_lock(:key)"), {"key": key})),
                    self.location, wait)
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})

    def size_bytes(self) -> int:
        """Bytes of the index's tables (PostgreSQL: with their indexes and TOAST; SQLite: the file),
        plus the cache files."""
        if self.url.get_backend_name() == "postgresql":
            present = self.reader._tables()
            tables = [name for name in (t.name for t in schema.TABLES) if name in present]
            size = sum(self.reader._all("SELECT pg_total_relation_size(?)", [name])[0][0] for name in tables)
        else:
            size = Path(str(self.url.database)).stat().st_size
        return size + sum(p.stat().st_size for p in self.directory.rglob("*") if p.is_file())

    def close(self) -> None:
        """Release the database connections."""
        self._engine.dispose()


def _cache_dir(url: URL) -> Path:
    """`$XDG_CACHE_HOME/mmsearch/db/<hash of the URL without its password>`: what is cached of an index in a database."""
    return cache_dir() / "db" / hashlib.sha256(shown(url).encode()).hexdigest()[:16]


def _named(sql: str, params: list[object]) -> tuple[str, dict[str, object]]:
    """`reader`'s SQL with its `?` parameters (sqlite3's style) as `:p0, :p1, ...` (SQLAlchemy's
    `text()`); a `?` inside a quoted literal stays as it is."""
    count = itertools.count()
    parts = sql.split("'")
    parts[::2] = [re.sub(r"\?", lambda _: f":p{next(count)}", part) for part in parts[::2]]
    names = next(count)
    if names != len(params):
        raise ValueError(f"{names} parameters in the SQL, {len(params)} given")
    return "'".join(parts), {f"p{n}": value for n, value in enumerate(params)}


def _lock_key(name: str) -> int:
    """A signed 64-bit advisory lock key for `name`."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


"""Reads of an index database, in plain SQL through the standard library's sqlite3 driver.

The tables are defined in `schema`, which this SQL takes its names from; migrations and
every write live in `store` (SQLAlchemy). Reads come here
because a query from the shell must start fast: importing SQLAlchemy costs about 0.25 s,
most of a cached query's time (benchmarks/RESULTS.md, "Query latency"). The SQL is plain
(JOIN, IN, substr, LIKE, GROUP BY, `?` parameters), so `sql_store.SqlReader` runs the same text over
SQLAlchemy for a database given by URL (PostgreSQL), through a few overridable driver hooks.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from dataclasses import fields
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from .config import DB_NAME, KINDS
from .errors import BadQuery, IndexDamaged, IndexInUse, IndexNotFound, IndexReadOnly, IndexTooNew, MMSearchError
from .records import FileRow, ItemRow, ModelManifest, RootOptions, WordSource
from .schema import (ANY_ROW, FAILURES, FILES, IGNORED, ITEMS, META, MIGRATIONS, MODELS, ROOTS, SCHEMA_VERSION, VECTORS,
                     WORDS, WORDS_FTS)
from .words import query_terms

if TYPE_CHECKING:
    from .filters import Filters

T = TypeVar("T")

#: SQLite limits bound parameters per statement (32,766 by default); lists go in chunks of this size.
CHUNK = 20000


def chunks(values: Sequence[T]) -> Iterator[Sequence[T]]:
    """`values` in slices of at most CHUNK, for IN lists within SQLite's parameter limit."""
    for start in range(0, len(values), CHUNK):
        yield values[start : start + CHUNK]


def database_error(message: str, directory: Path) -> MMSearchError:
    """The typed error for an SQLite failure message on the index at `directory`."""
    if "readonly" in message or "unable to open" in message:
        return IndexReadOnly(f"index at {directory} is read-only or cannot be opened: {message}")
    if "locked" in message:
        return IndexInUse(f"index at {directory} is in use by another process: {message}")
    if "malformed" in message or "not a database" in message:
        return IndexDamaged(f"{directory / DB_NAME} is damaged or not a database ({message}): "
                            "move it away (and index again) or use another --index")
    return MMSearchError(f"index at {directory} cannot be used: {message}")


def is_under(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies below it (whole path components)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def root_of(path: str, roots: Iterable[str]) -> str | None:
    """The innermost of `roots` that `path` is or lies below (None: none)."""
    return max((r for r in roots if is_under(path, r)), key=len, default=None)


#: Column lists of the records read, in their field order, and the join of an item to its file.
_FILE_ROW = FILES.cols(*(f.name for f in fields(FileRow)))
_ITEM_ROW = f"{ITEMS.cols('id', 'kind')}, {FILES.cols('path')}, {ITEMS.cols('line', 'text')}"
_JOIN = f"{FILES.cols('id')} = {ITEMS.cols('file_id')}"
#: The items joined to their vectors (of the model a condition picks), and the model picked by key / the default.
_VECTOR_JOIN = f"{ITEMS} JOIN {VECTORS} ON {VECTORS.cols('item_id')} = {ITEMS.cols('id')}"
_BY_KEY = f"{VECTORS.cols('model_id')} = (SELECT id FROM {MODELS} WHERE key = ?)"
_BY_DEFAULT = f"{VECTORS.cols('model_id')} = (SELECT id FROM {MODELS} WHERE is_default = 1)"


def _under(column: str, folder: str) -> tuple[str, list[object]]:
    """SQL condition (and its parameters) for `column` being `folder` or a path below it."""
    prefix = folder.rstrip(os.sep) + os.sep
    return f"({column} = ? OR substr({column}, 1, ?) = ?)", [folder, len(prefix), prefix]


class StoreReader:
    """Read-only view of one index database; every call sees the latest committed state.

    Runs its SQL over the standard library's sqlite3 on an index directory's database;
    `sql_store.SqlReader` overrides the driver hooks (`_all`, `_tables`, `_missing`, `_foreign`,
    `close`) to run the same SQL over SQLAlchemy for a database URL.
    """

    def __init__(self, connection: sqlite3.Connection | None, directory: Path | None) -> None:
        """Read through `connection` the index in `directory` (None for both: a subclass's own driver)."""
        self._conn = connection
        self.directory = directory
        #: Where the index is, for messages.
        self.location = str(directory)
        # One connection, shared by the threads of a library user (a web server, say).
        self._lock = threading.Lock()
        #: Whether the vectors are still a column of `items` (an index before 0004 that could not be migrated).
        self._legacy: bool | None = None

    @classmethod
    def open(cls, directory: Path) -> StoreReader:
        """Open the database in `directory` (IndexNotFound if there is none)."""
        db = directory / DB_NAME
        if not db.exists():
            raise IndexNotFound(f"no index at {directory} (run `mmsearch index PATH` first, or pass --index)")
        # A directory we cannot write cannot hold WAL's shared-memory file: read it immutable.
        mode = "rw" if os.access(directory, os.W_OK) else "ro&immutable=1"
        try:
            conn = sqlite3.connect(f"file:{db}?mode={mode}", uri=True, isolation_level=None,
                                   check_same_thread=False, timeout=10.0)
        except sqlite3.Error as exc:
            raise database_error(str(exc), directory) from None
        reader = cls(conn, directory)
        try:
            reader.check_origin()
        except BaseException:
            conn.close()
            raise
        return reader

    def check_origin(self) -> set[str]:
        """Refuse a database that is not an index database of this mmsearch, before anything reads or
        writes it; return the names of its tables (empty: a new database), read for the check.

        Migration names sort in the order they were added (`0001_…`, `0002_…`), so a name after
        SCHEMA_VERSION is one a newer mmsearch applied: its index must not be "repaired" here.
        """
        tables = self._tables()
        if tables and MIGRATIONS.name not in tables:
            raise self._foreign()
        newer = [r[0] for r in self._all(f"SELECT name FROM {MIGRATIONS} WHERE name > ? ORDER BY name",
                                         [SCHEMA_VERSION])] if tables else []
        if newer:
            raise IndexTooNew(f"index at {self.location} was written by a newer mmsearch (schema {newer[-1]}; "
                              f"this version knows up to {SCHEMA_VERSION}): upgrade mmsearch to use it")
        return tables

    # --- driver hooks (overridden by `sql_store.SqlReader`) ----------------------------------

    def close(self) -> None:
        """Release the connection."""
        self._conn.close()

    def _all(self, sql: str, params: Iterable[object] = ()) -> list[tuple]:
        """Every row of `sql` (`?` parameters); a database failure as a typed error."""
        with self._lock:
            try:
                return self._conn.execute(sql, tuple(params)).fetchall()
            except sqlite3.Error as exc:
                raise database_error(str(exc), self.directory) from None

    def _tables(self) -> set[str]:
        """Names of the tables in the database."""
        return {r[0] for r in self._all("SELECT name FROM sqlite_master WHERE type = 'table'")}

    def _missing(self, message: str) -> bool:
        """Whether a failure message says a table or column does not exist."""
        return "no such table" in message or "no such column" in message

    def _foreign(self) -> IndexDamaged:
        """The error for a database that holds tables, none of them an mmsearch index's."""
        return IndexDamaged(f"{self.directory / DB_NAME} is an SQLite database of something else, "
                            "not an mmsearch index: use another --index")

    # --- the same for every database --------------------------------------------------------

    def _newer(self, sql: str, params: Iterable[object] = ()) -> list[tuple] | None:
        """Rows of `sql`, which reads a table or column added by a later migration; None on an
        index too old to have it (one that could not be migrated: a read-only directory)."""
        try:
            return self._all(sql, params)
        except MMSearchError as exc:
            if self._missing(str(exc)):
                return None
            raise

    def _meta(self, key: str) -> str | None:
        rows = self._all(f"SELECT value FROM {META} WHERE key = ?", [key])
        return rows[0][0] if rows else None

    # --- index-wide -------------------------------------------------------------------------

    def needs_migration(self) -> bool:
        """Whether the schema predates this version of mmsearch."""
        try:
            return not self._all(f"SELECT 1 FROM {MIGRATIONS} WHERE name = ?", [SCHEMA_VERSION])
        except MMSearchError:
            return True  # no migrations table yet

    def _before_models(self) -> bool:
        """Whether the index predates migration 0004 (one model, in meta; vectors in items.vector)."""
        if self._legacy is None:
            self._legacy = self._newer(f"SELECT 1 FROM {MODELS} WHERE 1 = 0") is None
        return self._legacy

    def manifest(self) -> ModelManifest | None:
        """The index's default model (the first recorded), or None for a new index."""
        if self._before_models():
            raw = self._meta("model")
            return ModelManifest(**json.loads(raw)) if raw else None
        rows = self._all(f"SELECT manifest FROM {MODELS} WHERE is_default = 1")
        return ModelManifest(**json.loads(rows[0][0])) if rows else None

    def models(self) -> dict[str, ModelManifest]:
        """Every model of the index by its key (`stores.model_key`), the default first, then as added."""
        if self._before_models():
            from .stores import model_key

            manifest = self.manifest()
            return {model_key(manifest): manifest} if manifest else {}
        rows = self._all(f"SELECT key, manifest FROM {MODELS} ORDER BY is_default DESC, id")
        return {key: ModelManifest(**json.loads(raw)) for key, raw in rows}

    def model_counts(self) -> dict[str, dict[str, int]]:
        """Vectors per model key and item kind (models without vectors are absent)."""
        if self._before_models():
            return {key: {k: n for k, n in self.counts().items() if k in KINDS} for key in self.models()}
        rows = self._all(f"SELECT {MODELS.cols('key')}, {ITEMS.cols('kind')}, count(*) FROM {_VECTOR_JOIN} "
                         f"JOIN {MODELS} ON {MODELS.cols('id')} = {VECTORS.cols('model_id')} "
                         f"GROUP BY {MODELS.cols('key')}, {ITEMS.cols('kind')}")
        out: dict[str, dict[str, int]] = {}
        for key, kind, n in rows:
            out.setdefault(key, {})[kind] = n
        return out

    def _vectors_of(self, model: str | None) -> tuple[str, str, str, list[object]]:
        """(FROM clause, vector column, condition, parameters) reading the vectors of `model` (None: the default)."""
        if self._before_models():
            return str(ITEMS), f"{ITEMS}.vector", ANY_ROW, []  # one model, its vectors in the column 0004 moved
        return _VECTOR_JOIN, VECTORS.cols("vector"), _BY_KEY if model else _BY_DEFAULT, [model] if model else []

    def setting(self, key: str) -> str | None:
        """A value stored with the index (for instance a FAISS layout the user forced)."""
        return self._meta(f"setting:{key}")

    def generation(self, model: str | None = None) -> int:
        """Counter bumped by every write; a vector cache records the one it reflects. With `model`,
        also counts the writes of that model's vectors alone (which leave the other models' caches current)."""
        own = self._newer(f"SELECT generation FROM {MODELS} WHERE key = ?", [model]) if model else None
        return int(self._meta("generation") or 0) + (int(own[0][0]) if own else 0)

    def kinds(self) -> set[str]:
        """The item kinds present, each found by one index lookup (counting is O(n))."""
        exists = f"SELECT EXISTS (SELECT 1 FROM {ITEMS} WHERE kind = ?)"
        return {kind for kind in KINDS if self._all(exists, [kind])[0][0]}

    def counts(self) -> dict[str, int]:
        """Number of items per kind, plus files and recorded failures."""
        out = dict(self._all(f"SELECT kind, count(*) FROM {ITEMS} GROUP BY kind"))
        out["files"] = self._all(f"SELECT count(*) FROM {FILES}")[0][0]
        out["failures"] = self._all(f"SELECT count(*) FROM {FAILURES}")[0][0]
        return out

    def word_counts(self) -> dict[str, int] | None:
        """Items whose words are indexed (`items`), image items read by OCR (`ocr_read`) and those of
        them it found text in (`ocr_text`); None on an index without words (read-only, not migrated to 0005)."""
        rows = self._newer(f"SELECT count({WORDS}.text), count({WORDS}.ocr), "
                           f"sum(CASE WHEN {WORDS}.ocr <> '' THEN 1 ELSE 0 END) FROM {WORDS}")
        if rows is None:
            return None
        items, read, found = rows[0]
        return {"items": items, "ocr_read": read, "ocr_text": found or 0}  # sum over no rows is NULL

    def roots(self, under: str | None = None) -> list[str]:
        """Every root indexed so far (or those at or below the folder `under`)."""
        where, params = _under("path", under) if under else (ANY_ROW, [])
        return [r[0] for r in self._all(f"SELECT path FROM {ROOTS} WHERE {where} ORDER BY path", params)]

    def root_options(self) -> dict[str, RootOptions]:
        """How each root is scanned (defaults for a root indexed before options were stored)."""
        rows = self._newer(f"SELECT path, options FROM {ROOTS} ORDER BY path")
        if rows is None:
            return {path: RootOptions() for path in self.roots()}
        return {path: RootOptions.from_json(raw) for path, raw in rows}

    def ignored(self, under: str | None = None) -> list[str]:
        """Files skipped for their type at the last scan of their root (or only at or below `under`)."""
        where, params = _under("path", under) if under else (ANY_ROW, [])
        rows = self._newer(f"SELECT path FROM {IGNORED} WHERE {where} ORDER BY path", params)
        return [r[0] for r in rows or []]

    def has_items(self, folder: str) -> bool:
        """Whether any item comes from `folder` (a file) or a file below it; stops at the first."""
        where, params = _under(FILES.cols("path"), folder)
        sql = f"SELECT EXISTS (SELECT 1 FROM {ITEMS} JOIN {FILES} ON {_JOIN} WHERE {where})"
        return bool(self._all(sql, params)[0][0])

    def failures(self, under: str | None = None) -> list[tuple[str, str]]:
        """(path, reason) of everything skipped and not indexed since (or only at or below `under`)."""
        where, params = _under("path", under) if under else (ANY_ROW, [])
        return [(p, r) for p, r in self._all(f"SELECT path, reason FROM {FAILURES} WHERE {where} ORDER BY path", params)]

    # --- files and items --------------------------------------------------------------------

    def files_under(self, root: str) -> dict[str, FileRow]:
        """Files recorded at `root` (a file) or below it (a folder), by path."""
        where, params = _under("path", root)
        rows = self._all(f"SELECT {_FILE_ROW} FROM {FILES} WHERE {where}", params)
        return {r[1]: FileRow(*r) for r in rows}

    def file(self, path: str) -> FileRow | None:
        """The file recorded at exactly `path` (one index lookup), or None."""
        rows = self._all(f"SELECT {_FILE_ROW} FROM {FILES} WHERE path = ?", [path])
        return FileRow(*rows[0]) if rows else None

    def item_ids(self, kind: str, model: str | None = None) -> np.ndarray:
        """Every item id of one kind that has a vector of `model` (None: the default), ascending."""
        source, _, cond, params = self._vectors_of(model)
        rows = self._all(f"SELECT {ITEMS.cols('id')} FROM {source} WHERE {ITEMS.cols('kind')} = ? AND {cond} "
                         f"ORDER BY {ITEMS.cols('id')}", [kind, *params])
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def top_item_id(self, kind: str, model: str | None = None) -> int:
        """The highest item id of one kind that has a vector of `model` (None: the default); 0 when none.
        Ids only grow (AUTOINCREMENT, one writer at a time), so every item written later has a higher one."""
        source, _, cond, params = self._vectors_of(model)
        # A walk down the ids from the top that stops at the first match (SQLite: well under 1 ms at 1M items).
        rows = self._all(f"SELECT {ITEMS.cols('id')} FROM {source} WHERE {ITEMS.cols('kind')} = ? AND {cond} "
                         f"ORDER BY {ITEMS.cols('id')} DESC LIMIT 1", [kind, *params])
        return int(rows[0][0]) if rows else 0

    def missing_vectors(self, model: str) -> list[tuple[int, str, str, str | None, int, float]]:
        """(item id, kind, file path, text, file size, file mtime) of the items without a vector of `model`."""
        rows = self._all(f"SELECT {ITEMS.cols('id', 'kind')}, {FILES.cols('path')}, {ITEMS.cols('text')}, "
                         f"{FILES.cols('size', 'mtime')} FROM {ITEMS} JOIN {FILES} ON {_JOIN} WHERE NOT EXISTS "
                         f"(SELECT 1 FROM {VECTORS} WHERE {VECTORS.cols('item_id')} = {ITEMS.cols('id')} AND {_BY_KEY}) "
                         f"ORDER BY {ITEMS.cols('id')}", [model])
        return [tuple(r) for r in rows]

    def ids_under(self, folder: str, kind: str) -> np.ndarray:
        """Item ids of one kind whose file lies under `folder`."""
        where, params = _under(FILES.cols("path"), folder)
        rows = self._all(f"SELECT {ITEMS.cols('id')} FROM {ITEMS} JOIN {FILES} ON {_JOIN} "
                         f"WHERE {ITEMS.cols('kind')} = ? AND {where}", [kind, *params])
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def ids_filtered(self, kind: str, folder: str | None, filters: Filters) -> np.ndarray:
        """Item ids of one kind whose file lies under `folder` (None: anywhere) and passes `filters`.

        Raises BadQuery when a filter needs the metadata of migration 0003 and the index (read-only,
        so not migrated) lacks it."""
        where, params = _under(FILES.cols("path"), folder) if folder else (ANY_ROW, [])
        cond, more = filters.sql()
        rows = self._newer(f"SELECT {ITEMS.cols('id')} FROM {ITEMS} JOIN {FILES} ON {_JOIN} "
                           f"WHERE {ITEMS.cols('kind')} = ? AND {where} AND {cond}", [kind, *params, *more])
        if rows is None:
            raise BadQuery(f"index at {self.location} was built before date, camera and size filters: "
                           "run `mmsearch index` on it once (with write access) to read them")
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def files_without_metadata(self) -> list[tuple[int, str]]:
        """(id, path) of the image files whose metadata (migration 0003) has not been read yet."""
        return [(i, p) for i, p in self._newer(
            f"SELECT id, path FROM {FILES} WHERE kind = 'image' AND width IS NULL ORDER BY id") or []]

    def words_todo(self, ocr: bool) -> list[WordSource]:
        """Items whose searchable words (migration 0005) are missing or stale and, with `ocr`, image
        items not read by OCR yet; none on an index without them (read-only, so not migrated)."""
        wanted = f"{WORDS.cols('item_id')} IS NULL OR {WORDS.cols('text')} IS NULL"
        if ocr:
            wanted += f" OR ({ITEMS.cols('kind')} = 'image' AND {WORDS.cols('ocr')} IS NULL)"
        rows = self._newer(
            f"SELECT {ITEMS.cols('id', 'kind')}, {FILES.cols('path')}, {ITEMS.cols('text')}, "
            f"{FILES.cols('camera', 'taken_at', 'taken_offset')}, {WORDS.cols('text', 'ocr')} "
            f"FROM {ITEMS} JOIN {FILES} ON {_JOIN} LEFT JOIN {WORDS} ON {WORDS.cols('item_id')} = {ITEMS.cols('id')} "
            f"WHERE {wanted} ORDER BY {ITEMS.cols('id')}")
        return [WordSource(*r) for r in rows or []]

    def match_words(self, query: str, kind: str, limit: int, folder: str | None = None,
                    filters: Filters | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(item ids, scores) of one kind whose words match any word of `query` but those found in
        half the items or more: `match_terms` of `rare_terms(query)`."""
        return self.match_terms(self.rare_terms(query), kind, limit, folder, filters)

    def rare_terms(self, query: str) -> list[str]:
        """The distinct words of `query` (`words.query_terms`) found in fewer than half the items'
        words, counted once each: a query asks this once for all its kinds. Empty for a query of
        punctuation only, and on an index without words (read-only, not migrated to 0005)."""
        terms = query_terms(query)
        total = self._newer(f"SELECT count(*) FROM {WORDS}") if terms else None
        if total is None:
            return []

        def matches(term: str) -> int:
            source, source_params, _, _, cond, params = self._matching([term])
            return self._all(f"SELECT count(*) FROM {source} WHERE {cond}", [*source_params, *params])[0][0]

        # A word found in half the items or more tells nothing apart (BM25 weighs it zero, FTS5 at its
        # 1e-6 floor): the indexed folder's own name, "IMG" in every camera's file names. Left out
        # before the search, it also costs nothing (ranking 100k matches of "img" took 0.2 s).
        return [term for term in terms if 2 * matches(term) < total[0][0]]

    def match_terms(self, terms: Sequence[str], kind: str, limit: int, folder: str | None = None,
                    filters: Filters | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(item ids, scores) of one kind whose words hold any of `terms` (from `rare_terms`), best
        first, at most `limit`; restricted like `ids_filtered`. The score is FTS5's bm25 negated
        (higher is better). Each term is quoted, so no text is read as FTS5 syntax; no terms match nothing."""
        empty = np.zeros(0, np.int64), np.zeros(0, np.float32)
        if not terms:
            return empty
        source, source_params, item, score, cond, params = self._matching(terms)
        where, under = _under(FILES.cols("path"), folder) if folder else (ANY_ROW, [])
        filtered, more = filters.sql() if filters else (ANY_ROW, [])
        rows = self._newer(
            f"SELECT {item}, {score} FROM {source} "
            f"JOIN {ITEMS} ON {ITEMS.cols('id')} = {item} JOIN {FILES} ON {_JOIN} "
            f"WHERE {cond} AND {ITEMS.cols('kind')} = ? AND {where} AND {filtered} "
            f"ORDER BY {score} DESC, {item} LIMIT ?", [*source_params, *params, kind, *under, *more, limit])
        if not rows:
            return empty
        return (np.fromiter((r[0] for r in rows), np.int64, len(rows)),
                np.fromiter((r[1] for r in rows), np.float32, len(rows)))

    def _matching(self, terms: Sequence[str]) -> tuple[str, list[object], str, str, str, list[object]]:
        """How items whose words hold any of `terms` are found, as SQL: (the source to select from and
        its parameters, its item id column, a score, higher is better, the match condition and its
        parameters). Here SQLite's FTS5 index with each term quoted, so no text is read as FTS5 syntax;
        another database overrides this (`sql_store`)."""
        match = " OR ".join('"' + term.replace('"', '""') + '"' for term in terms)
        return WORDS_FTS, [], f"{WORDS_FTS}.rowid", f"-bm25({WORDS_FTS})", f"{WORDS_FTS} MATCH ?", [match]

    def capture_times(self, ids: Iterable[int]) -> dict[int, tuple[float | None, int | None]]:
        """(taken_at, taken_offset) of the files of item ids (see `schema.FILES`), by id; empty on an
        index without them (read-only, so not migrated to 0003)."""
        return self._file_metadata(ids, "taken_at", "taken_offset")

    def image_sizes(self, ids: Iterable[int]) -> dict[int, tuple[int | None, int | None]]:
        """(width, height) of the files of item ids as stored at index time (see `schema.FILES`; None
        until a scan reads it), by id; empty on an index without them (read-only, not migrated to 0003)."""
        return self._file_metadata(ids, "width", "height")

    def _file_metadata(self, ids: Iterable[int], *columns: str) -> dict[int, tuple]:
        """`columns` of the files of item ids, columns of migration 0003, by id; empty on an index without them."""
        sql = (f"SELECT {ITEMS.cols('id')}, {FILES.cols(*columns)} FROM {ITEMS} JOIN {FILES} ON {_JOIN} "
               f"WHERE {ITEMS.cols('id')} IN ({{ids}})")
        return {r[0]: tuple(r[1:]) for rows in self._by_ids(sql, ids, newer=True) for r in rows}

    def _by_ids(self, sql: str, ids: Iterable[int], params: Sequence[object] = (),
                newer: bool = False) -> Iterator[list[tuple]]:
        """Rows of `sql`, whose `{ids}` is an IN list after `params`, for `ids` sent CHUNK at a time.
        `newer`: `sql` reads a table or column of a later migration (see `_newer`); none on an index without it."""
        run = self._newer if newer else self._all
        for part in chunks([int(i) for i in ids]):
            yield run(sql.format(ids=",".join("?" * len(part))), [*params, *part]) or []

    def items(self, ids: Iterable[int]) -> dict[int, ItemRow]:
        """Display rows for item ids that still exist (a missing id is simply absent)."""
        sql = (f"SELECT {_ITEM_ROW} FROM {ITEMS} JOIN {FILES} ON {_JOIN} "
               f"WHERE {ITEMS.cols('id')} IN ({{ids}})")
        return {r[0]: ItemRow(*r) for rows in self._by_ids(sql, ids) for r in rows}

    def item_files(self, ids: Iterable[int]) -> dict[int, tuple[str, str]]:
        """(file path, content sha256) of item ids that still exist, by id."""
        sql = (f"SELECT {ITEMS.cols('id')}, {FILES.cols('path', 'sha256')} FROM {ITEMS} JOIN {FILES} ON {_JOIN} "
               f"WHERE {ITEMS.cols('id')} IN ({{ids}})")
        return {r[0]: (r[1], r[2]) for rows in self._by_ids(sql, ids) for r in rows}

    def vectors(self, kind: str, ids: np.ndarray | None = None,
                model: str | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, float32 vectors) of one kind under `model` (None: the default) in chunks of at most
        CHUNK; all items, or only `ids` (those without a vector of that model are left out)."""
        source, column, cond, params = self._vectors_of(model)
        item_id = ITEMS.cols("id")
        if ids is None:
            # Keyset pagination: each chunk is one short statement, so no read stays open between chunks.
            after = -1
            while rows := self._all(f"SELECT {item_id}, {column} FROM {source} WHERE {ITEMS.cols('kind')} = ? "
                                    f"AND {cond} AND {item_id} > ? ORDER BY {item_id} LIMIT ?",
                                    [kind, *params, after, CHUNK]):
                after = rows[-1][0]
                yield _unpack(rows)
            return
        for rows in self._by_ids(f"SELECT {item_id}, {column} FROM {source} WHERE {cond} AND {item_id} IN ({{ids}})",
                                 ids, params):
            if rows:
                yield _unpack(rows)


def _unpack(rows: list[tuple]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    return ids, np.stack([np.frombuffer(r[1], dtype=np.float32) for r in rows])

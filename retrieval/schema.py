"""The tables of an index database, as plain data: the one definition of the schema.

`store` builds its SQLAlchemy tables (writes, migrations) from these, and `reader` takes its
table and column names from them for the plain SQL it runs through the standard library's
sqlite3. No SQLAlchemy here: a query imports this module and must start fast.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Name of the last migration in `store.MIGRATIONS`: an index without it is opened for writing
#: once (which migrates it) before it is read; one with a later name was written by a newer mmsearch.
SCHEMA_VERSION = "0005_words"

#: An SQL condition that holds for every row (SQLite's bare `1` is no boolean on PostgreSQL).
ANY_ROW = "1 = 1"

#: Column types, as portable names (`store` maps each to an SQLAlchemy type).
TYPES = ("string", "text", "integer", "float", "blob")


@dataclass(frozen=True)
class Column:
    """One column; NOT NULL unless `nullable`."""

    name: str
    type: str
    nullable: bool = False
    primary_key: bool = False
    unique: bool = False
    #: A secondary index on this column (named `ix_<table>_<column>`).
    index: bool = False
    #: "table.column" this column refers to; the row is deleted with the one it refers to.
    references: str | None = None
    #: Value written when an insert leaves the column out (applied by the writer, not the database).
    default: object = None

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise ValueError(f"column {self.name}: unknown type {self.type!r}")


@dataclass(frozen=True)
class Table:
    """One table: its columns in order, and whether its integer key never reuses ids."""

    name: str
    columns: tuple[Column, ...]
    #: Ids are never reused (SQLite AUTOINCREMENT), so a stale vector cache never maps an old id to a new row.
    autoincrement: bool = False

    def __str__(self) -> str:
        return self.name

    def names(self) -> tuple[str, ...]:
        """Column names in table order."""
        return tuple(c.name for c in self.columns)

    def cols(self, *names: str) -> str:
        """'table.a, table.b' for SQL (every column, in order, when none are named); an unknown name is a bug."""
        unknown = set(names) - set(self.names())
        if unknown:
            raise KeyError(f"table {self.name} has no column {', '.join(sorted(unknown))}")
        return ", ".join(f"{self.name}.{n}" for n in names or self.names())


MIGRATIONS = Table("migrations", (
    Column("name", "string", primary_key=True),
    Column("applied_at", "float"),
))

META = Table("meta", (
    Column("key", "string", primary_key=True),
    Column("value", "text"),
))

#: A folder or file a user asked to index; re-scanned by a bare `mmsearch index`.
ROOTS = Table("roots", (
    Column("id", "integer", primary_key=True),
    Column("path", "string", unique=True),
    #: `RootOptions` as JSON (exclude patterns, include_hidden, text_field); NULL before 0002.
    Column("options", "text", nullable=True),
))

#: A file on disk: an image, or a text corpus that yields many items. Columns in `records.FileRow` order.
FILES = Table("files", (
    Column("id", "integer", primary_key=True),
    Column("path", "string", unique=True),
    Column("kind", "string"),
    Column("size", "integer"),
    Column("mtime", "float"),
    Column("sha256", "string", index=True),
    # Image metadata for the search filters (0003; NULL for texts, and until a scan reads it).
    #: Capture time, epoch seconds: EXIF DateTimeOriginal (UTC when `taken_offset` came from EXIF's
    #: OffsetTimeOriginal; the camera's local time as written when the offset is unknown), else the mtime.
    Column("taken_at", "float", nullable=True),
    #: Seconds east of UTC of `taken_at`'s local time (NULL: unknown, the camera's clock as written).
    Column("taken_offset", "integer", nullable=True),
    #: EXIF Make and Model, joined by a space.
    Column("camera", "string", nullable=True),
    #: Pixel size as shown (EXIF orientation applied); a file whose metadata was read has a width.
    Column("width", "integer", nullable=True),
    Column("height", "integer", nullable=True),
))

#: One embedded thing; its id is the key of its vectors in the vector store (one per model, in `VECTORS`).
ITEMS = Table("items", (
    Column("id", "integer", primary_key=True),
    Column("file_id", "integer", index=True, references="files.id"),
    Column("kind", "string", index=True),
    Column("line", "integer", default=0),
    Column("text", "text", nullable=True),
), autoincrement=True)

#: The models of an index (0004): the first recorded is the default, which embeds new files first and
#: answers a query that names no model; the others are added with `index --add-model`.
MODELS = Table("models", (
    Column("id", "integer", primary_key=True),
    #: `stores.model_key` of the manifest: names the model's vector sets (and their files).
    Column("key", "string", unique=True),
    #: `records.ModelManifest` as JSON.
    Column("manifest", "text"),
    Column("is_default", "integer", default=0),
    #: Bumped by each write of this model's vectors alone (a backfill): with `meta.generation`, what
    #: this model's vector caches are checked against (see `reader.StoreReader.generation`).
    Column("generation", "integer", default=0),
))

#: One item's vector under one model: float32, little-endian, that model's dimension (0004; before,
#: the one model's vector was a column of `items`).
VECTORS = Table("vectors", (
    Column("item_id", "integer", primary_key=True, references="items.id"),
    Column("model_id", "integer", primary_key=True, references="models.id"),
    Column("vector", "blob"),
))

#: A file (or text record) that could not be indexed, with the reason.
FAILURES = Table("failures", (
    Column("path", "string", primary_key=True),
    Column("reason", "text"),
    Column("at", "float"),
))

#: A file skipped for its type (.heic, .cr2, no extension): listed by `info`, not a failure.
IGNORED = Table("ignored", (
    Column("path", "string", primary_key=True),
    Column("at", "float"),
))

#: The searchable words of an item (0005), for the full-text half of a hybrid query (see `words`).
#: The embedded store indexes both text columns with an SQLite FTS5 table, `WORDS_FTS`, kept in step
#: by triggers; another back end indexes them its own way.
WORDS = Table("words", (
    Column("item_id", "integer", primary_key=True, references="items.id"),
    #: File name and folder names below the root, EXIF camera and capture year and month, or a text
    #: item's own text; NULL: to be (re)computed by the next scan (a renamed file).
    Column("text", "text", nullable=True),
    #: Text read from an image by OCR ('' when none was found); NULL: not read yet.
    Column("ocr", "text", nullable=True),
))

#: The FTS5 table over `WORDS` in the embedded store (its rowid is the item id).
WORDS_FTS = "words_fts"
#: PostgreSQL's full-text document of a `WORDS` row (English stemming, as FTS5's porter tokenizer);
#: a GIN index over this very expression (migration 0005) serves the match.
WORDS_TSVECTOR = "to_tsvector('english', coalesce(words.text, '') || ' ' || coalesce(words.ocr, ''))"

#: Every table, in the order a new database creates them (a table after those it refers to).
TABLES = (MIGRATIONS, META, ROOTS, FILES, FAILURES, IGNORED, ITEMS, MODELS, VECTORS, WORDS)

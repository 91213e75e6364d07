"""The one place that maps where an index is to its storage back ends.

An index directory (default) is SQLite + FAISS files in it (`local`); a database URL (`--db`,
MMSEARCH_DB) is metadata in that database (`sql_store`: PostgreSQL or SQLite through
SQLAlchemy) with FAISS files in the per-user cache. Either takes another vector store with
`--vectors` (MMSEARCH_VECTORS): a Milvus server (`milvus://host:port`, `http(s)://`) or an
embedded milvus-lite file (`PATH.db`), through `milvus_store`. Back ends beyond the embedded
default are imported only when asked for.
"""

from __future__ import annotations

import functools
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from .errors import MMSearchError
from .local import LocalStorage
from .stores import Storage, VectorBackend

#: The fix named when an optional back end is not installed.
CLUSTER_EXTRA = "pip install 'mmsearch[cluster]'"


def open_storage(directory: Path | None, *, db: str | None = None, vectors: str | None = None,
                 create: bool = True) -> Storage:
    """The storage of the index at `directory` or in the database `db` (one of them), with the
    vector store at `vectors` when given (else FAISS files). `create`: see `LocalStorage.open`."""
    if directory is not None and db is not None:
        raise MMSearchError("give an index directory (--index) or a database URL (--db), not both")
    backend = vector_backend(vectors) if vectors else None
    if db is not None:
        from .sql_store import SqlStorage  # SQLAlchemy and the driver load only for a URL

        return SqlStorage.open(db, create=create, vectors=backend)
    assert directory is not None
    return LocalStorage.open(directory, create=create, vectors=backend)


def vector_backend(uri: str) -> VectorBackend:
    """The Milvus vector store at `uri`: a server (`milvus://host:port`, `http(s)://host:port`) or a
    milvus-lite file (`PATH.db`); `milvus_store` reads the URI itself (as pymilvus' client does)."""
    if urlsplit(uri).scheme not in ("milvus", "http", "https") and not uri.endswith(".db"):
        raise MMSearchError(f"--vectors {_without_password(uri)!r}: give milvus://HOST:PORT, http(s)://HOST:PORT "
                            "(a Milvus server) or a file PATH.db (embedded milvus-lite)")
    try:
        from .milvus_store import MilvusVectorStore
    except ImportError as exc:
        missing = "this mmsearch has no Milvus support" if exc.name == f"{__package__}.milvus_store" else \
            f"{exc.name} is not installed"
        raise MMSearchError(f"--vectors needs Milvus ({missing}): {CLUSTER_EXTRA}") from None
    return VectorBackend("milvus", _without_password(uri), functools.partial(MilvusVectorStore, uri))


def _without_password(uri: str) -> str:
    """`uri` as shown: a password in it is left out."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.rsplit("@", 1)
    user = (parts.username or "") + "@"
    return urlunsplit((parts.scheme, user + netloc[-1], *parts[2:]))

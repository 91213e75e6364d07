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
from typing import Any
from urllib.parse import urlsplit

from .config import CLUSTER_EXTRA
from .errors import BadQuery, MMSearchError
from .local import LocalStorage
from .stores import Storage, VectorBackend

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
    milvus-lite file (`PATH.db`); a URI that can be neither is BadQuery before Milvus is imported."""
    client_args(uri)
    try:
        from .milvus_store import MilvusVectorStore
    except ImportError as exc:
        missing = "this mmsearch has no Milvus support" if exc.name == f"{__package__}.milvus_store" else \
            f"{exc.name} is not installed"
        raise MMSearchError(f"--vectors needs Milvus ({missing}): {CLUSTER_EXTRA}") from None
    return VectorBackend("milvus", redacted(uri), functools.partial(MilvusVectorStore, uri))


def client_args(uri: str) -> dict[str, Any]:
    """`MilvusClient` arguments for a `--vectors` URI (BadQuery for one it cannot be)."""
    parts = urlsplit(uri)
    if parts.scheme in ("milvus", "http", "https"):
        if not parts.hostname:
            raise BadQuery(f"--vectors {redacted(uri)!r}: no host (use milvus://HOST:19530)")
        scheme = "http" if parts.scheme == "milvus" else parts.scheme
        args: dict[str, Any] = {"uri": f"{scheme}://{parts.hostname}:{parts.port or 19530}"}
        if parts.username:
            args["token"] = f"{parts.username}:{parts.password or ''}"
        if parts.path.strip("/"):
            args["db_name"] = parts.path.strip("/")
        return args
    path = Path(uri).expanduser()
    # A one-letter scheme is a Windows drive; a milvus-lite file must end in .db.
    if (parts.scheme and len(parts.scheme) > 1) or path.suffix != ".db":
        raise BadQuery(f"--vectors {redacted(uri)!r}: give milvus://HOST:PORT, http(s)://HOST:PORT "
                       "(a Milvus server) or a file PATH.db (embedded milvus-lite)")
    return {"uri": str(path.resolve())}


def redacted(uri: str) -> str:
    """The URI without a password, for messages and `info`."""
    parts = urlsplit(uri)
    if parts.password:
        return uri.replace(f":{parts.password}@", ":***@", 1)
    return uri

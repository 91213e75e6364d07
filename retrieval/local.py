"""The embedded back end: an index directory holding an SQLite database, FAISS files and a lock file.

Reads go through `reader` (stdlib sqlite3, so a query never imports SQLAlchemy), writes
through `store` (SQLAlchemy), opened only once something is written; the vectors are
`faiss_store`'s files. One writer at a time holds an flock on the `lock` file.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from .config import DB_NAME, LOCK_NAME
from .errors import IndexInUse, IndexReadOnly
from .reader import StoreReader
from .stores import Storage, VectorBackend

if TYPE_CHECKING:
    from .store import Store
    from .stores import MetadataReader, MetadataWriter, VectorStore, VectorStoreFactory

log = logging.getLogger("mmsearch")


class LocalStorage(Storage):
    """SQLite + FAISS in `directory`; `reader` is None until a new index is created by its first write."""

    def __init__(self, directory: Path, reader: StoreReader | None = None, store: Store | None = None,
                 vectors: VectorBackend | None = None) -> None:
        super().__init__()
        self.directory = directory
        self.location = str(directory)
        self._reader = reader
        self._store = store
        #: Another vector store than the directory's FAISS files (`--vectors`).
        self._vector_backend = vectors
        self._vectors: VectorStore | None = None
        # Threads of one process (a web server) share this object: each lazy open happens once.
        self._opening = threading.RLock()

    @classmethod
    def open(cls, directory: Path, *, create: bool = True, vectors: VectorBackend | None = None) -> LocalStorage:
        """The index in `directory`: a new one (created by its first write) when there is none and
        `create`, else IndexNotFound. An index of an older mmsearch is migrated where it is writable.
        `vectors`: another vector store than FAISS files in the directory."""
        if create and not (directory / DB_NAME).exists():
            return cls(directory, vectors=vectors)
        reader = StoreReader.open(directory)  # IndexNotFound where there is none
        store = None
        if reader.needs_migration() and os.access(directory, os.W_OK):
            store = _open_store(directory)  # an index from an older mmsearch: migrate it before reading
        return cls(directory, reader, store, vectors)

    @property
    def exists(self) -> bool:
        """Whether the database exists (opened or created)."""
        return self._reader is not None

    @property
    def reader(self) -> StoreReader:
        """Reads of the database; a new index is created here, on its first use."""
        if self._reader is None:
            with self._opening:
                if self._reader is None:
                    self.writer  # noqa: B018 - creates and migrates the database
                    self._reader = self._open_reader()
        return self._reader

    @property
    def writer(self) -> Store:
        """The database for writing (SQLAlchemy), opened on first use."""
        if self._store is None:
            with self._opening:
                if self._store is None:
                    self._store = self._open_writer()
        return self._store

    @property
    def vectors(self) -> VectorStore:
        """The FAISS files of this directory, or the `vectors` store given (EmptyIndex while no model is recorded)."""
        if self._vectors is None:
            with self._opening:
                if self._vectors is None:
                    self._vectors = self.open_vectors(self._vector_backend.factory if self._vector_backend
                                                      else faiss_vectors(self._faiss_dir(), self.follows))
        return self._vectors

    # --- where things are (overridden by `sql_store.SqlStorage`) --------------------------------

    #: Whether the FAISS files must follow commits that no file here shows (see `FaissVectorStore`):
    #: not in an index directory, whose writers save the files others read.
    follows = False

    def _open_reader(self) -> StoreReader:
        return StoreReader.open(self.directory)

    def _open_writer(self) -> Store:
        return _open_store(self.directory)

    def _faiss_dir(self) -> Path:
        """Where the FAISS files are."""
        return self.directory

    def _metadata_backend(self) -> dict[str, str]:
        return {"kind": "sqlite", "where": str(self.directory / DB_NAME)}

    def backends(self) -> dict[str, dict[str, str]]:
        """The metadata store; FAISS files or the vector store given."""
        vectors = self._vector_backend
        return {"metadata": self._metadata_backend(),
                "vectors": {"kind": vectors.kind, "where": vectors.where} if vectors
                else {"kind": "faiss", "where": str(self.directory)}}

    @property
    def cache_dir(self) -> Path:
        """The index directory."""
        return self.directory

    @contextmanager
    def lock(self, wait: float) -> Iterator[None]:
        """An flock on the directory's lock file; IndexReadOnly where the directory cannot be written."""
        with file_lock(self.directory / LOCK_NAME, self.location, wait):
            if not os.access(self.directory, os.W_OK):
                raise IndexReadOnly(f"index directory {self.directory} is read-only")
            yield

    def size_bytes(self) -> int:
        """Bytes of the files in the index directory."""
        return sum(p.stat().st_size for p in self.directory.iterdir() if p.is_file())

    def close(self) -> None:
        """Release the database connections."""
        if self._reader is not None:
            self._reader.close()
        if self._store is not None:
            self._store.close()


def faiss_vectors(directory: Path, follow: bool = False) -> VectorStoreFactory:
    """The factory of FAISS files in `directory` (the embedded vector store); `follow`: see `FaissVectorStore`."""

    def make(reader: MetadataReader, model: str, writer: Callable[[], MetadataWriter]) -> VectorStore:
        from .faiss_store import FaissVectorStore  # FAISS loads only when vectors are needed

        return FaissVectorStore(directory, reader, model, writer, follow)

    return make


@contextmanager
def file_lock(path: Path, location: str, wait: float) -> Iterator[None]:
    """Hold an flock on `path` (created if need be) for the index at `location`, waiting up to
    `wait` s for another writer (IndexInUse); IndexReadOnly where it cannot be created."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise IndexReadOnly(f"index {location} is read-only ({exc.strerror}): "
                            "it can be queried but not changed") from None
    try:
        acquire(lambda: _try_flock(fd), location, wait)
        yield
    finally:
        os.close(fd)


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        return False


def acquire(try_lock: Callable[[], bool], location: str, wait: float) -> None:
    """Call `try_lock` until it takes the write lock of the index at `location`, for up to `wait` s
    (IndexInUse after that; one warning while waiting)."""
    deadline = time.monotonic() + wait
    waiting = False
    while not try_lock():
        left = deadline - time.monotonic()
        if left <= 0:
            raise IndexInUse(f"index {location} is in use by another `mmsearch index`; "
                             "try again when it finishes, or wait for it (--wait SECONDS)")
        if not waiting:
            log.warning("index %s is in use by another process; waiting up to %.0f s", location, wait)
            waiting = True
        time.sleep(min(0.25, left))


def _open_store(directory: Path) -> Store:
    from .store import Store  # SQLAlchemy loads only when something is written

    return Store.open(directory)

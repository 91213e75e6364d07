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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from .config import DB_NAME, LOCK_NAME
from .errors import IndexInUse, IndexReadOnly
from .reader import StoreReader
from .stores import Storage

if TYPE_CHECKING:
    from .faiss_store import FaissVectorStore
    from .store import Store

log = logging.getLogger("mmsearch")


class LocalStorage(Storage):
    """SQLite + FAISS in `directory`; `reader` is None until a new index is created by its first write."""

    def __init__(self, directory: Path, reader: StoreReader | None = None, store: Store | None = None) -> None:
        super().__init__()
        self.directory = directory
        self.location = str(directory)
        self._reader = reader
        self._store = store
        self._vectors: FaissVectorStore | None = None
        # Threads of one process (a web server) share this object: each lazy open happens once.
        self._opening = threading.RLock()

    @classmethod
    def open(cls, directory: Path, *, create: bool = True) -> LocalStorage:
        """The index in `directory`: a new one (created by its first write) when there is none and
        `create`, else IndexNotFound. An index of an older mmsearch is migrated where it is writable."""
        if create and not (directory / DB_NAME).exists():
            return cls(directory)
        reader = StoreReader.open(directory)  # IndexNotFound where there is none
        store = None
        if reader.needs_migration() and os.access(directory, os.W_OK):
            store = _open_store(directory)  # an index from an older mmsearch: migrate it before reading
        return cls(directory, reader, store)

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
                    self._reader = StoreReader.open(self.directory)
        return self._reader

    @property
    def writer(self) -> Store:
        """The database for writing (SQLAlchemy), opened on first use."""
        if self._store is None:
            with self._opening:
                if self._store is None:
                    self._store = _open_store(self.directory)
        return self._store

    @property
    def vectors(self) -> FaissVectorStore:
        """The FAISS files of this directory (EmptyIndex while no model is recorded)."""
        if self._vectors is None:
            from .faiss_store import FaissVectorStore

            with self._opening:
                if self._vectors is None:
                    model = self.model()
                    if model is None:
                        raise self.empty_index_error()
                    self._vectors = FaissVectorStore(self.directory, self.reader, model, lambda: self.writer)
        return self._vectors

    @property
    def cache_dir(self) -> Path:
        """The index directory."""
        return self.directory

    @contextmanager
    def lock(self, wait: float) -> Iterator[None]:
        """An flock on the directory's lock file; IndexReadOnly where the directory cannot be written."""
        try:
            fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise IndexReadOnly(f"index {self.directory} is read-only ({exc.strerror}): "
                                "it can be queried but not changed") from None
        try:
            _flock(fd, self.directory, wait)
            if not os.access(self.directory, os.W_OK):
                raise IndexReadOnly(f"index directory {self.directory} is read-only")
            yield
        finally:
            os.close(fd)

    def size_bytes(self) -> int:
        """Bytes of the files in the index directory."""
        return sum(p.stat().st_size for p in self.directory.iterdir() if p.is_file())

    def close(self) -> None:
        """Release the database connections."""
        if self._reader is not None:
            self._reader.close()
        if self._store is not None:
            self._store.close()


def _flock(fd: int, directory: Path, wait: float) -> None:
    deadline = time.monotonic() + wait
    waiting = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
        left = deadline - time.monotonic()
        if left <= 0:
            raise IndexInUse(f"index {directory} is in use by another `mmsearch index`; "
                             "try again when it finishes, or wait for it (--wait SECONDS)")
        if not waiting:
            log.warning("index %s is in use by another process; waiting up to %.0f s", directory, wait)
            waiting = True
        time.sleep(min(0.25, left))


def _open_store(directory: Path) -> Store:
    from .store import Store  # SQLAlchemy loads only when something is written

    return Store.open(directory)

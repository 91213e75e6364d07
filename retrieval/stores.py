"""The storage seam: what an index needs from its metadata store and its vector store.

An index is one metadata store (the truth: files, items and their vectors, settings, the
model, a `generation` bumped by every write) and one vector store (a cache of the metadata
store's vectors, searchable, keyed by item id, one vector set per (model, kind)). `Storage`
pairs the two with the index's write lock; the implementation is chosen once, where an index
is opened (`local.LocalStorage`: SQLite + FAISS files in a directory). The indexer and search
work through these interfaces only.

No implementation is imported here: a query imports this module and must start fast.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import numpy as np

from .config import KINDS
from .errors import EmptyIndex
from .records import FileMetadata, FileRow, ItemRow, ModelManifest, NewFile, RootOptions, WordSource

if TYPE_CHECKING:
    from .filters import Filters


#: Setting (`MetadataWriter.set_setting`) holding the memory budget of the automatic vector layouts, in bytes.
MAX_MEMORY_SETTING = "max_memory"


class MetadataReader(Protocol):
    """Reads of the metadata store; every call sees the latest committed state."""

    def needs_migration(self) -> bool: ...
    def manifest(self) -> ModelManifest | None: ...
    def setting(self, key: str) -> str | None: ...
    def generation(self) -> int: ...
    def kinds(self) -> set[str]: ...
    def counts(self) -> dict[str, int]: ...
    def roots(self, under: str | None = None) -> list[str]: ...
    def root_options(self) -> dict[str, RootOptions]: ...
    def ignored(self, under: str | None = None) -> list[str]: ...
    def has_items(self, folder: str) -> bool: ...
    def failures(self, under: str | None = None) -> list[tuple[str, str]]: ...
    def files_under(self, root: str) -> dict[str, FileRow]: ...
    def file(self, path: str) -> FileRow | None: ...
    def item_ids(self, kind: str) -> np.ndarray: ...
    def ids_under(self, folder: str, kind: str) -> np.ndarray: ...
    def ids_filtered(self, kind: str, folder: str | None, filters: Filters) -> np.ndarray: ...
    def files_without_metadata(self) -> list[tuple[int, str]]: ...
    def words_todo(self, ocr: bool) -> list[WordSource]: ...
    def match_words(self, query: str, kind: str, limit: int, folder: str | None = None,
                    filters: Filters | None = None) -> tuple[np.ndarray, np.ndarray]: ...
    def capture_times(self, ids: Iterable[int]) -> dict[int, tuple[float | None, int | None]]: ...
    def items(self, ids: Iterable[int]) -> dict[int, ItemRow]: ...
    def item_files(self, ids: Iterable[int]) -> dict[int, tuple[str, str]]: ...
    def vectors(self, kind: str, ids: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...
    def close(self) -> None: ...


class MetadataWriter(Protocol):
    """Writes of the metadata store; each call is one transaction that bumps the generation
    when it changes items."""

    def claim_model(self, manifest: ModelManifest) -> None: ...
    def set_setting(self, key: str, value: str | None) -> None: ...
    def add_roots(self, paths: Iterable[str], options: dict[str, RootOptions] | None = None) -> None: ...
    def set_root_options(self, options: dict[str, RootOptions]) -> None: ...
    def replace_ignored(self, roots: Iterable[str], found: Iterable[str], keep_under: Iterable[str] = ()) -> None: ...
    def set_file_metadata(self, rows: Iterable[tuple[int, FileMetadata]]) -> None: ...
    def set_words(self, rows: Iterable[tuple[int, str, str | None]]) -> None: ...
    def commit(self, added: Iterable[NewFile] = (), removed_files: Iterable[int] = (),
               moved: Iterable[tuple[int, str, int, float]] = (), failures: Iterable[tuple[str, str]] = (),
               cleared_failures: Iterable[str] = (), forgotten_roots: Iterable[str] = (),
               ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]: ...
    def close(self) -> None: ...


class VectorKey(NamedTuple):
    """Which vector set: the model's key (`model_key`) and the item kind."""

    model: str
    kind: str


def model_key(manifest: ModelManifest) -> str:
    """A short, file-name-safe key of a model: its name and a hash of what identifies it."""
    import hashlib

    digest = hashlib.sha256(repr(manifest.identity()).encode()).hexdigest()[:10]
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', manifest.name)}-{digest}"


class VectorSet(Protocol):
    """One searchable set of unit vectors keyed by item id (inner product == cosine).

    `search` takes the ids `allowed` (None: all) and `exact`, which gives the stored vectors of
    ids, for layouts that re-rank compressed candidates; `describe` is layout and tuning for `info`.
    """

    layout: str

    def __len__(self) -> int: ...
    def ids(self) -> np.ndarray: ...
    def describe(self) -> dict[str, Any]: ...
    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None, *,
               exact: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]: ...


class VectorStore(Protocol):
    """The vector sets of an index: a cache of the metadata store's vectors.

    `get` returns a set brought up to date with the metadata store's generation (synced by id
    when behind, rebuilt when damaged or missing); `add`/`remove` mirror a committed batch
    (an id added again replaces its vector); `save` persists every changed set atomically with
    the generation it reflects; `refresh` takes up, for the sets loaded, what another process
    saved since (returning the keys swapped); `relayout` has sets rebuilt at the next save (a
    new memory budget); `rebuild` makes sets afresh from the metadata store (a layout given is
    kept for them), all or none.
    """

    def get(self, key: VectorKey) -> VectorSet: ...
    def add(self, key: VectorKey, ids: np.ndarray, vectors: np.ndarray) -> None: ...
    def remove(self, key: VectorKey, ids: np.ndarray) -> None: ...
    def save(self) -> None: ...
    def refresh(self) -> list[VectorKey]: ...
    def relayout(self, keys: Sequence[VectorKey]) -> None: ...
    def rebuild(self, keys: Sequence[VectorKey], layout: str | None = None) -> Mapping[VectorKey, VectorSet]: ...


class Storage(ABC):
    """The stores of one index and its write lock; the seam between an index and its back ends.

    Subclasses say where things are; the rules that hold for every back end are here: a batch is
    committed to the metadata store, then mirrored into the vector sets (loaded before, so each
    batch is applied exactly once); a write holds the lock and saves the vector sets on exit.
    """

    #: Where the index is, for messages and `info` (a directory, or later a database URL).
    location: str

    def __init__(self) -> None:
        self._model: str | None = None  # `model_key` of the index's model, once recorded

    @property
    @abstractmethod
    def exists(self) -> bool:
        """Whether the index has been created (a new one is created by its first write)."""

    @property
    @abstractmethod
    def reader(self) -> MetadataReader:
        """Reads of the metadata store; a new index is created on first use."""

    @property
    @abstractmethod
    def writer(self) -> MetadataWriter:
        """Writes of the metadata store (creating and migrating it as needed), opened on first use."""

    @property
    @abstractmethod
    def vectors(self) -> VectorStore:
        """The vector sets; needs a model recorded (EmptyIndex before)."""

    @property
    @abstractmethod
    def cache_dir(self) -> Path:
        """A directory for caches derived from the index (query vectors, calibration samples)."""

    @abstractmethod
    def lock(self, wait: float) -> AbstractContextManager[None]:
        """Hold the index's single-writer lock, waiting up to `wait` s for another writer (IndexInUse)."""

    @abstractmethod
    def size_bytes(self) -> int:
        """Bytes the index takes on disk."""

    @abstractmethod
    def close(self) -> None:
        """Release connections; vector sets not yet saved are synced from the metadata store next time."""

    # --- the same for every back end ---------------------------------------------------------

    def manifest(self) -> ModelManifest | None:
        """The model that built this index (None while it is new or empty)."""
        return self.reader.manifest() if self.exists else None

    def model(self) -> str | None:
        """`model_key` of the index's model (None while none is recorded); never changes once recorded."""
        if self._model is None:
            manifest = self.manifest()
            self._model = model_key(manifest) if manifest is not None else None
        return self._model

    def key(self, kind: str) -> VectorKey:
        """The vector set of `kind` for the index's model."""
        model = self.model()
        if model is None:
            raise self.empty_index_error()
        return VectorKey(model, kind)

    def empty_index_error(self) -> EmptyIndex:
        """The error for an index that has no model recorded yet, hence no vectors."""
        return EmptyIndex(f"index {self.location} is empty: run `mmsearch index PATH` first")

    def vector_set(self, kind: str) -> VectorSet:
        """The searchable vectors of one kind, up to date with the metadata store."""
        return self.vectors.get(self.key(kind))

    def load_vectors(self) -> None:
        """Load every vector set of the index's model (nothing while there is none)."""
        if self.model() is not None:
            for kind in KINDS:
                self.vector_set(kind)

    def set_memory_budget(self, max_memory: int) -> None:
        """Keep a memory budget (bytes; 0 clears it) for the automatic vector layouts; the vector
        sets are re-laid out to it when next saved."""
        value = str(int(max_memory)) if max_memory else None
        if value != self.reader.setting(MAX_MEMORY_SETTING):
            self.writer.set_setting(MAX_MEMORY_SETTING, value)
            if self.model() is not None:
                self.vectors.relayout([self.key(kind) for kind in KINDS])

    def claim_model(self, manifest: ModelManifest) -> None:
        """Record (or check: ModelMismatch) the index's model, then load its vector sets."""
        self.writer.claim_model(manifest)
        self.load_vectors()

    def commit(self, **changes: Any) -> dict[str, np.ndarray]:
        """One batch (see `MetadataWriter.commit`) into the metadata store, then mirrored into the
        vector sets; returns the item ids deleted, per kind."""
        self.load_vectors()
        ids, vecs, gone = self.writer.commit(**changes)
        for kind, removed in gone.items():
            if len(removed):
                self.vectors.remove(self.key(kind), removed)
        for kind, new in ids.items():
            self.vectors.add(self.key(kind), new, vecs[kind])
        return gone

    @contextmanager
    def writing(self, wait: float = 0.0) -> Iterator[None]:
        """Hold the write lock for a change; the vector sets are saved on the way out, also after an error."""
        self.reader  # noqa: B018 - a new index is created by its first write
        with self.lock(wait):
            try:
                yield
            finally:
                if self.model() is not None:
                    self.vectors.save()

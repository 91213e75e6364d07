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
from .errors import BadQuery, EmptyIndex
from .records import FileMetadata, FileRow, ItemRow, ModelManifest, NewFile, RootOptions, WordSource

if TYPE_CHECKING:
    from .filters import Filters


#: Setting (`MetadataWriter.set_setting`) holding the memory budget of the automatic vector layouts, in bytes.
MAX_MEMORY_SETTING = "max_memory"
#: Setting holding a config-file model's content key (`encoder.export_name`): its export is found by it.
CONFIG_SETTING = "model:config"


class MetadataReader(Protocol):
    """Reads of the metadata store; every call sees the latest committed state."""

    def needs_migration(self) -> bool: ...
    def manifest(self) -> ModelManifest | None: ...
    def models(self) -> dict[str, ModelManifest]: ...
    def model_counts(self) -> dict[str, dict[str, int]]: ...
    def setting(self, key: str) -> str | None: ...
    def generation(self, model: str | None = None) -> int: ...
    def kinds(self) -> set[str]: ...
    def counts(self) -> dict[str, int]: ...
    def word_counts(self) -> dict[str, int] | None: ...
    def roots(self, under: str | None = None) -> list[str]: ...
    def root_options(self) -> dict[str, RootOptions]: ...
    def ignored(self, under: str | None = None) -> list[str]: ...
    def has_items(self, folder: str) -> bool: ...
    def failures(self, under: str | None = None) -> list[tuple[str, str]]: ...
    def files_under(self, root: str) -> dict[str, FileRow]: ...
    def file(self, path: str) -> FileRow | None: ...
    def item_ids(self, kind: str, model: str | None = None) -> np.ndarray: ...
    def top_item_id(self, kind: str, model: str | None = None) -> int: ...
    def missing_vectors(self, model: str) -> list[tuple[int, str, str, str | None, int, float]]: ...
    def ids_under(self, folder: str, kind: str) -> np.ndarray: ...
    def ids_filtered(self, kind: str, folder: str | None, filters: Filters) -> np.ndarray: ...
    def files_without_metadata(self) -> list[tuple[int, str]]: ...
    def words_todo(self, ocr: bool) -> list[WordSource]: ...
    def match_words(self, query: str, kind: str, limit: int, folder: str | None = None,
                    filters: Filters | None = None) -> tuple[np.ndarray, np.ndarray]: ...
    def rare_terms(self, query: str) -> list[str]: ...
    def match_terms(self, terms: Sequence[str], kind: str, limit: int, folder: str | None = None,
                    filters: Filters | None = None) -> tuple[np.ndarray, np.ndarray]: ...
    def capture_times(self, ids: Iterable[int]) -> dict[int, tuple[float | None, int | None]]: ...
    def image_sizes(self, ids: Iterable[int]) -> dict[int, tuple[int | None, int | None]]: ...
    def items(self, ids: Iterable[int]) -> dict[int, ItemRow]: ...
    def item_files(self, ids: Iterable[int]) -> dict[int, tuple[str, str]]: ...
    def vectors(self, kind: str, ids: np.ndarray | None = None,
                model: str | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...
    def close(self) -> None: ...


class MetadataWriter(Protocol):
    """Writes of the metadata store; each call is one transaction that bumps the generation
    when it changes items."""

    def claim_model(self, manifest: ModelManifest) -> None: ...
    def add_model(self, manifest: ModelManifest) -> bool: ...
    def remove_model(self, key: str) -> int: ...
    def add_vectors(self, key: str, ids: np.ndarray, vectors: np.ndarray) -> None: ...
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

    def name(self, default: str) -> str:
        """The set's name in file and setting names: the kind alone for the index's `default` model (as
        before there were several), else the model's key and the kind."""
        return self.kind if self.model == default else f"{self.model}-{self.kind}"


def model_key(manifest: ModelManifest) -> str:
    """A short, file-name-safe key of a model: its name (a config file's by its file name) and a hash
    of what identifies it."""
    import hashlib

    digest = hashlib.sha256(repr(manifest.identity()).encode()).hexdigest()[:10]
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', Path(manifest.name).name)}-{digest}"


class ModelDims:
    """The vector dimension of each model of an index, by model key, read once from its metadata
    store (BadQuery for a model the index does not have)."""

    def __init__(self, reader: MetadataReader) -> None:
        self._reader = reader
        self._dims: dict[str, int] = {}

    def __call__(self, model: str) -> int:
        if model not in self._dims:
            manifest = self._reader.models().get(model)
            if manifest is None:
                raise BadQuery(f"this index holds no vectors of model {model}")
            self._dims[model] = manifest.dim
        return self._dims[model]


class VectorSet(Protocol):
    """One searchable set of unit vectors keyed by item id (inner product == cosine).

    `search` takes the ids `allowed` (None: all), `exact`, which gives the stored vectors of
    ids, for layouts that re-rank compressed candidates, and `min_score`: results below it are
    left out (a range search where the store has one); `describe` is layout and tuning for `info`.
    """

    layout: str

    def __len__(self) -> int: ...
    def ids(self) -> np.ndarray: ...
    def describe(self) -> dict[str, Any]: ...
    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None, *,
               exact: Callable[[np.ndarray], np.ndarray] | None = None,
               min_score: float | None = None) -> tuple[np.ndarray, np.ndarray]: ...


class VectorStore(Protocol):
    """The vector sets of an index: a cache of the metadata store's vectors.

    `get` returns a set brought up to date with the metadata store's generation (synced by id
    when behind, rebuilt when damaged or missing); `add`/`remove` mirror a committed batch
    (an id added again replaces its vector); `save` persists every changed set atomically with
    the generation it reflects; `refresh` takes up, for the sets loaded, what another process
    saved since (returning the keys swapped); `relayout` has sets rebuilt at the next save (a
    new memory budget); `rebuild` makes sets afresh from the metadata store (a layout given is
    kept for them), all or none; `drop` deletes sets (a model removed).
    """

    def get(self, key: VectorKey) -> VectorSet: ...
    def add(self, key: VectorKey, ids: np.ndarray, vectors: np.ndarray) -> None: ...
    def remove(self, key: VectorKey, ids: np.ndarray) -> None: ...
    def save(self) -> None: ...
    def refresh(self) -> list[VectorKey]: ...
    def relayout(self, keys: Sequence[VectorKey]) -> None: ...
    def rebuild(self, keys: Sequence[VectorKey], layout: str | None = None) -> Mapping[VectorKey, VectorSet]: ...
    def drop(self, keys: Sequence[VectorKey]) -> None: ...


#: Makes the vector store of an index: (metadata reader, `model_key` of the index's default model,
#: opener of the metadata writer) -> VectorStore.
VectorStoreFactory = Callable[[MetadataReader, str, Callable[[], MetadataWriter]], VectorStore]


class VectorBackend(NamedTuple):
    """A vector store chosen where the index is opened (`backends`): what and where, and its factory."""

    kind: str  # "faiss", "milvus"
    where: str  # for `info`: a directory, a URI without its password
    factory: VectorStoreFactory


class Storage(ABC):
    """The stores of one index and its write lock; the seam between an index and its back ends.

    Subclasses say where things are; the rules that hold for every back end are here: a batch is
    committed to the metadata store, then mirrored into the vector sets (loaded before, so each
    batch is applied exactly once); a write holds the lock and saves the vector sets on exit.
    """

    #: Where the index is, for messages and `info` (a directory, or a database URL without its password).
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
    def backends(self) -> dict[str, dict[str, str]]:
        """What holds the metadata and the vectors, and where, for `info`:
        {"metadata": {"kind": "sqlite", "where": ...}, "vectors": {"kind": "faiss", "where": ...}}."""

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

    def manifest(self, model: str | None = None) -> ModelManifest | None:
        """The index's default model (None while it is new or empty), or the model of key `model`."""
        if model is not None:
            return self.models().get(model)
        return self.reader.manifest() if self.exists else None

    def models(self) -> dict[str, ModelManifest]:
        """Every model of the index by key, the default first (read each time: another process may add one)."""
        return self.reader.models() if self.exists else {}

    def model(self) -> str | None:
        """`model_key` of the index's default model (None while none is recorded); never changes once recorded."""
        if self._model is None:
            manifest = self.manifest()
            self._model = model_key(manifest) if manifest is not None else None
        return self._model

    def key(self, kind: str, model: str | None = None) -> VectorKey:
        """The vector set of `kind` for the model of key `model` (None: the default)."""
        default = self.model()
        if default is None:
            raise self.empty_index_error()
        return VectorKey(model or default, kind)

    def keys(self) -> list[VectorKey]:
        """Every vector set of the index: each kind of each model."""
        return [self.key(kind, model) for model in self.models() for kind in KINDS]

    def empty_index_error(self) -> EmptyIndex:
        """The error for an index that has no model recorded yet, hence no vectors."""
        return EmptyIndex(f"index {self.location} is empty: run `mmsearch index PATH` first")

    def open_vectors(self, factory: VectorStoreFactory) -> VectorStore:
        """The vector store `factory` makes for the index (EmptyIndex while no model is recorded)."""
        model = self.model()
        if model is None:
            raise self.empty_index_error()
        return factory(self.reader, model, lambda: self.writer)

    def vector_set(self, kind: str, model: str | None = None) -> VectorSet:
        """The searchable vectors of one kind (of model `model`, None: the default), up to date with the metadata store."""
        return self.vectors.get(self.key(kind, model))

    def load_vectors(self) -> None:
        """Load every vector set of every model of the index (nothing while there is none)."""
        if self.model() is not None:
            for key in self.keys():
                self.vectors.get(key)

    def set_memory_budget(self, max_memory: int) -> None:
        """Keep a memory budget (bytes; 0 clears it) for the automatic vector layouts; the vector
        sets are re-laid out to it when next saved."""
        value = str(int(max_memory)) if max_memory else None
        if value != self.reader.setting(MAX_MEMORY_SETTING):
            self.writer.set_setting(MAX_MEMORY_SETTING, value)
            if self.model() is not None:
                self.vectors.relayout(self.keys())

    def claim_model(self, manifest: ModelManifest) -> None:
        """Record (or check: ModelMismatch) the index's model, then load its vector sets."""
        self.writer.claim_model(manifest)
        self.load_vectors()

    def add_model(self, manifest: ModelManifest) -> str:
        """Record another model of the index (nothing if it is one already); returns its key.
        Its vectors come with `add_vectors`."""
        if self.model() is None:
            raise self.empty_index_error()
        self.writer.add_model(manifest)
        return model_key(manifest)

    def remove_model(self, model: str) -> int:
        """Delete a model's vectors, its vector sets and its record (ModelInUse for the default);
        returns how many vectors were deleted."""
        removed = self.writer.remove_model(model)
        self.vectors.drop([VectorKey(model, kind) for kind in KINDS])
        return removed

    def commit(self, **changes: Any) -> dict[str, np.ndarray]:
        """One batch (see `MetadataWriter.commit`) into the metadata store, then mirrored into the
        vector sets (an item removed leaves every model's); returns the item ids deleted, per kind."""
        self.load_vectors()
        models = list(self.models())
        ids, vecs, gone = self.writer.commit(**changes)
        for kind, removed in gone.items():
            for model in models if len(removed) else ():
                self.vectors.remove(self.key(kind, model), removed)
        for kind, new in ids.items():
            self.vectors.add(self.key(kind), new, vecs[kind])
        return gone

    def add_vectors(self, model: str, kind: str, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Vectors of model `model` for existing items of one kind, into the metadata store, then its vector set."""
        key = self.key(kind, model)
        self.vectors.get(key)  # loaded before the write, so the batch is applied once
        self.writer.add_vectors(model, ids, vectors)
        self.vectors.add(key, ids, vectors)

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

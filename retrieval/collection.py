"""An index directory as one object: the metadata store, the vector caches and the model.

This is the library's entry point (`retrieval.open_index`). The database is the truth:
reads go through `reader` (stdlib sqlite3), writes through `store` (SQLAlchemy), opened
only once something is written. Each kind's FAISS file is a cache checked against the
database's generation when opened, synced by id when behind, and rebuilt when damaged.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import DB_NAME, KINDS, LOCK_NAME, default_index_dir, default_model
from .errors import BadQuery, EmptyIndex, IndexInUse, IndexReadOnly, ModelMismatch, ModelUnavailable
from .reader import StoreReader
from .scan import type_counts
from .records import ModelManifest

if TYPE_CHECKING:
    from PIL import Image

    from .dupes import Group
    from .encoder import Encoder, ModelSource
    from .indexer import IndexReport, Removal
    from .search import Result
    from .store import Store
    from .vectors import VectorIndex

log = logging.getLogger("mmsearch")

#: Setting (Store.set_setting) holding the image tower's precision: requested, used, int8 gate.
PRECISION_SETTING = "encoder:precision"
#: Setting holding a config-file model's content key (`encoder.export_name`): its export is found by it.
CONFIG_SETTING = "model:config"


class Collection:
    """An open index: add files or texts, search by text, image or vector, embed."""

    def __init__(self, directory: Path, reader: StoreReader | None, model: str | None = None,
                 pretrained: str | None = None, device: str = "auto", backend: str | None = None,
                 store: Store | None = None, wait: float = 0.0, precision: str | None = None) -> None:
        self.directory = directory
        self._reader = reader  # None until a new index is created by its first write
        self._store = store
        self.device = device
        #: Seconds a write waits for another process's write to finish before IndexInUse.
        self.wait = wait
        #: 'auto' (onnxruntime on CPU, torch on CUDA), 'torch' or 'onnx'; env MMSEARCH_BACKEND.
        self.backend = backend or os.environ.get("MMSEARCH_BACKEND", "auto")
        self._requested = (model, pretrained)
        #: Image tower precision asked for (auto|fp32|int8); None: the index's recorded choice, else auto.
        self.precision = precision
        self._encoder: Encoder | None = None
        self._query_encoder: Encoder | None = None
        self._vectors: dict[str, VectorIndex] = {}
        self._dirty: set[str] = set()
        #: (inode, mtime, size) of each vector file as loaded, to notice another process's save.
        self._loaded: dict[str, tuple[int, int, int]] = {}
        # Threads of one process (a web server) share this object: the lazy loads happen once.
        self._loading = threading.RLock()
        self._relayout: set[str] = set()  # caches to rebuild on save (a new memory budget)

    # --- opening ----------------------------------------------------------------------------

    @classmethod
    def open(cls, directory: str | Path | None = None, *, model: str | None = None,
             pretrained: str | None = None, device: str = "auto", backend: str | None = None,
             create: bool = True, wait: float = 0.0, precision: str | None = None) -> Collection:
        """Open the index at `directory` (default: MMSEARCH_INDEX or the per-user data dir).

        `model`/`pretrained` name the model for a new index; on an existing one they must
        match the recorded model (ModelMismatch) or may be left out. `wait`: seconds a write
        (add, reindex) waits for another process's write to finish before IndexInUse.
        `device`: 'auto', 'cpu', 'cuda' or 'cuda:N' (DeviceUnavailable otherwise, or without a GPU).
        `precision`: of the
        image tower, auto (on CPU int8 where the model's int8 gate passed and int8 ran faster, else fp32;
        fp16 on CUDA), fp32 or int8; kept with the index for later runs.
        A new index (`create`) is created on disk by its first write, once its inputs are checked.
        """
        if device not in ("auto", "cpu"):  # the usual two need no check (nor the encoder module)
            from .encoder import check_device

            check_device(device)
        path = Path(directory).expanduser().resolve() if directory else default_index_dir()
        if create and not (path / DB_NAME).exists():
            return cls(path, None, model, pretrained, device, backend, None, wait, precision)
        reader = StoreReader.open(path)  # IndexNotFound where there is none
        store = None
        if reader.needs_migration() and os.access(path, os.W_OK):
            store = _open_store(path)  # an index from an older mmsearch: migrate it before reading
        return cls(path, reader, model, pretrained, device, backend, store, wait, precision)

    @property
    def reader(self) -> StoreReader:
        """Reads of the database; a new index is created here, on its first use."""
        if self._reader is None:
            self.store  # noqa: B018 - creates and migrates the database
            self._reader = StoreReader.open(self.directory)
        return self._reader

    @property
    def store(self) -> Store:
        """The database for writing (SQLAlchemy), opened on first use."""
        if self._store is None:
            self._store = _open_store(self.directory)
        return self._store

    def close(self) -> None:
        """Release the database; vectors not yet saved are rebuilt from it next time."""
        if self._reader is not None:
            self._reader.close()
        if self._store is not None:
            self._store.close()

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- model ------------------------------------------------------------------------------

    @property
    def manifest(self) -> ModelManifest | None:
        """The model that built this index (None while it is empty and new)."""
        return self._reader.manifest() if self._reader is not None else None

    def _checked_request(self, manifest: ModelManifest) -> ModelSource | None:
        """Refuse a model asked for that is not the index's; the resolved weights if some were named."""
        from .encoder import model_key, resolve_model

        name, pretrained = self._requested
        if name is not None and model_key(name) != manifest.name:
            raise ModelMismatch(f"this index was built with {manifest.describe()}, not {name}; "
                                "use the same model or another --index")
        if pretrained is None:
            return None
        source = resolve_model(manifest.name, pretrained)
        if (source.sha256 or source.pretrained) != (manifest.checkpoint_sha256 or manifest.pretrained):
            raise ModelMismatch(f"this index was built with {manifest.describe()}, not weights {pretrained}; "
                                "use the same model or another --index")
        return source

    def _new_model(self) -> tuple[str, str | None]:
        """(name, pretrained) of the model for a new index: the one asked for, else the default."""
        name, pretrained = self._requested
        if name is None:
            name, default_pretrained = default_model()
            pretrained = pretrained or default_pretrained
        return name, pretrained

    def _source(self) -> ModelSource:
        """The model to use: the recorded one (checked against any model asked for), or the one asked for."""
        from .encoder import resolve_model

        manifest = self.manifest
        if manifest is None:
            return resolve_model(*self._new_model())
        source = self._checked_request(manifest)
        if source is not None:
            return source
        if manifest.checkpoint_sha256 and manifest.pretrained and not Path(manifest.pretrained).is_file():
            raise ModelUnavailable(f"the checkpoint this index was built with is missing: {manifest.pretrained}")
        return resolve_model(manifest.name, manifest.pretrained)

    @property
    def encoder(self) -> Encoder:
        """The encoder of this index's model, loaded on first use.

        On a CPU, a model exported to ONNX before loads without torch, for a new index too.
        """
        if self._encoder is not None:
            return self._encoder
        with self._loading:
            if self._encoder is None:
                from .encoder import find_export, gpu_likely, load_export, load_source

                manifest = self.manifest
                cpu = self.device == "cpu" or (self.device == "auto" and not gpu_likely())
                encoder = None
                if manifest is not None and cpu and self.backend != "torch":
                    self._checked_request(manifest)
                    encoder = load_export(manifest, self.reader.setting(CONFIG_SETTING))
                elif cpu and self.backend != "torch":
                    encoder = find_export(*self._new_model())
                if encoder is None:
                    encoder = load_source(self._source(), self.device, self.backend)
                encoder.set_precision(self.precision or self.precision_setting().get("requested") or "auto")
                self._encoder = encoder
        return self._encoder

    def precision_setting(self) -> dict[str, Any]:
        """The precision recorded by the last `add`: requested, used, and the int8 gate's outcome."""
        raw = self.reader.setting(PRECISION_SETTING)
        try:
            value = json.loads(raw) if raw else {}
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}

    def embed_query_text(self, text: str) -> np.ndarray:
        """The unit vector of one query text: from the query cache, else the fastest encoder at hand.

        Even beside a GPU, a single query runs on the ONNX text tower: no torch import, no CUDA start.
        """
        from .encoder import load_export
        from .query_cache import QueryCache

        manifest = self.manifest
        cache = QueryCache(self.directory / "query-cache", repr(manifest.identity())) if manifest else None
        vector = cache.get(text) if cache else None
        if vector is None:
            with self._loading:
                if self._query_encoder is None:
                    exported = (load_export(manifest, self.reader.setting(CONFIG_SETTING))
                                if manifest and self.backend != "torch" else None)
                    self._query_encoder = self._encoder or exported or self.encoder
            vector = self._query_encoder.embed_texts([text])[0]
            if cache:
                cache.put(text, vector)
        return vector

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalized float32 [n, dim] embeddings of texts with this index's model."""
        texts = _listed(texts, "embed_texts")
        return self.encoder.embed_texts(texts)

    def embed_images(self, images: Sequence[Image.Image | str | Path]) -> np.ndarray:
        """L2-normalized float32 [n, dim] embeddings of PIL images or image files."""
        images = _listed(images, "embed_images")
        return self.encoder.embed_images(images)

    # --- writing ----------------------------------------------------------------------------

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the index's write lock (waiting up to `self.wait` s for another process) and save on exit."""
        self.reader  # noqa: B018 - a new index is created by its first write
        try:
            fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise IndexReadOnly(f"index {self.directory} is read-only ({exc.strerror}): "
                                "it can be queried but not changed") from None
        try:
            self._lock(fd)
            if not os.access(self.directory, os.W_OK):
                raise IndexReadOnly(f"index directory {self.directory} is read-only")
            try:
                yield
            finally:
                self.save()
        finally:
            os.close(fd)

    def _lock(self, fd: int) -> None:
        deadline = time.monotonic() + self.wait
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
                raise IndexInUse(f"index {self.directory} is in use by another `mmsearch index`; "
                                 "try again when it finishes, or wait for it (--wait SECONDS)")
            if not waiting:
                log.warning("index %s is in use by another process; waiting up to %.0f s", self.directory, self.wait)
                waiting = True
            time.sleep(min(0.25, left))

    def claim_model(self) -> Encoder:
        """Load the encoder and record (or check) it as this index's model."""
        from .encoder import export_name

        encoder = self.encoder
        self.store.claim_model(encoder.manifest)
        name = encoder.manifest.name
        if name.lower().endswith(".json") and self.reader.setting(CONFIG_SETTING) is None:
            self.store.set_setting(CONFIG_SETTING, export_name(name))  # the config's content, as built
        setting = {"requested": self.precision or self.precision_setting().get("requested") or "auto",
                   "used": encoder.precision, "int8_gate": encoder.int8_gate}
        if setting != self.precision_setting():
            self.store.set_setting(PRECISION_SETTING, json.dumps(setting, sort_keys=True))
        self.load_vectors()
        return encoder

    def load_vectors(self) -> None:
        """Load every vector cache; done before a commit, so each batch is mirrored into them exactly once."""
        if self.manifest is not None:
            for kind in KINDS:
                self.vectors(kind)

    def add(self, paths: Sequence[str | Path] = (), **options: Any) -> IndexReport:
        """Index image files/folders and text corpora (incremental); see `indexer.index_paths`.

        With no paths, re-scans every root indexed before. Options include `prune=True`,
        `exclude=[patterns]`, `include_hidden=True` and `text_field=NAME` (the last three are
        stored with each root; None keeps what is stored). A new index is created only once
        the paths exist and its model loads.
        """
        from .indexer import check_paths, index_paths

        paths = [str(p) for p in _listed(paths, "add")]
        max_memory = options.pop("max_memory", None)
        if self._reader is None:
            check_paths(paths)
            self.encoder  # noqa: B018 - a model that cannot load leaves no index behind
        with self.writing():
            if max_memory is not None:
                self._set_max_memory(max_memory)
            return index_paths(self, paths, **options)

    def remove(self, paths: Sequence[str | Path]) -> Removal:
        """Take files and folders (and what was indexed from them) out of the index; see `indexer.remove_paths`."""
        from .indexer import remove_paths

        paths = [str(p) for p in _listed(paths, "remove")]
        with self.writing():
            return remove_paths(self, paths)

    def add_texts(self, texts: Sequence[str], source: str) -> IndexReport:
        """Index texts that live in no file, under the name `source` (replacing earlier ones)."""
        from .indexer import index_texts

        texts = _listed(texts, "add_texts")
        if self._reader is None:
            self.encoder  # noqa: B018 - a model that cannot load leaves no index behind
        with self.writing():
            return index_texts(self, texts, source)

    def apply(self, ids: dict[str, np.ndarray], vecs: dict[str, np.ndarray], gone: dict[str, np.ndarray]) -> None:
        """Mirror one committed store batch into the vector caches."""
        for kind, removed in gone.items():
            if len(removed):
                self.vectors(kind).remove(removed)
                self._dirty.add(kind)
        for kind, new in ids.items():
            self.vectors(kind).add(new, vecs[kind])
            self._dirty.add(kind)

    def save(self) -> None:
        """Atomically write every changed vector cache, re-laid out when it outgrew its layout."""
        generation = self.reader.generation()
        for kind in sorted(self._dirty):
            index = self._vectors[kind]
            forced = self.reader.setting(f"layout:{kind}")
            if index.needs_rebuild(keep_layout=forced is not None) or kind in self._relayout:
                index = self._vectors[kind] = self._build(kind, forced)
            index.save(self._vector_path(kind), generation)
            self._loaded[kind] = _file_key(self._vector_path(kind)) or (0, 0, 0)
        self._dirty.clear()
        self._relayout.clear()

    def reindex(self, layout: str | None = None, max_memory: int | None = None) -> dict[str, str]:
        """Rebuild (and re-tune) every vector cache from the store.

        A FAISS `layout` given is kept by later runs; None goes back to the automatic choice.
        `max_memory` (bytes, kept by later runs; 0 clears it; None keeps the stored one) has
        the automatic choice pick a layout that fits, compressed if need be.
        """
        with self.writing():
            self.load_vectors()  # refuses vector files of a newer mmsearch instead of rebuilding over them
            if max_memory is not None:
                self._set_max_memory(max_memory)
            try:
                built = {kind: self._build(kind, layout) for kind in KINDS}
            except ValueError as exc:  # an unparsable FAISS factory string
                raise BadQuery(str(exc).splitlines()[0]) from None
            self._relayout.clear()  # just built with the budget
            for kind, index in built.items():
                self.store.set_setting(f"layout:{kind}", layout)
                self._vectors[kind] = index
                self._dirty.add(kind)
        return {kind: self._vectors[kind].layout for kind in KINDS}

    # --- vector caches ----------------------------------------------------------------------

    def _vector_path(self, kind: str) -> Path:
        return self.directory / f"vectors-{kind}.faiss"

    def _dim(self) -> int:
        manifest = self.manifest
        if manifest is None:
            raise EmptyIndex(f"index {self.directory} is empty: run `mmsearch index PATH` first")
        return manifest.dim

    def _set_max_memory(self, max_memory: int) -> None:
        """Store the vector memory budget (0 clears it); caches are re-laid out on save."""
        value = str(int(max_memory)) if max_memory else None
        if value != self.reader.setting("max_memory"):
            self.store.set_setting("max_memory", value)
            self.load_vectors()
            self._relayout.update(self._vectors)
            self._dirty.update(self._vectors)

    def _build(self, kind: str, layout: str | None = None) -> VectorIndex:
        from .vectors import VectorIndex  # faiss loads only when vectors are needed

        chunks = list(self.reader.vectors(kind))
        dim = self._dim()
        ids = np.concatenate([c[0] for c in chunks]) if chunks else np.zeros(0, np.int64)
        vecs = np.concatenate([c[1] for c in chunks]) if chunks else np.zeros((0, dim), np.float32)
        # The other modality's vectors also tune the layout: they query across the gap.
        other = next(self.reader.vectors("text" if kind == "image" else "image"), (None, None))[1]
        budget = self.reader.setting("max_memory")
        try:
            return VectorIndex.build(ids, vecs, dim, layout, cross_queries=other,
                                     max_memory=int(budget) if budget and not layout else None)
        except ValueError as exc:
            if not budget or layout or "no layout fits" not in str(exc):
                raise
            log.warning("%s; using the automatic layout for the %s vectors", exc, kind)
            return VectorIndex.build(ids, vecs, dim, cross_queries=other)

    def vectors(self, kind: str) -> VectorIndex:
        """The FAISS cache of one kind, loaded and brought up to date with the store."""
        index = self._vectors.get(kind)
        if index is not None:
            return index
        with self._loading:
            if kind not in self._vectors:
                self._vectors[kind] = self._load_vectors(kind)
            return self._vectors[kind]

    def _load_vectors(self, kind: str) -> VectorIndex:
        from .vectors import VectorFileDamaged, VectorIndex

        generation = self.reader.generation()
        path = self._vector_path(kind)
        key = _file_key(path)
        try:
            index, saved = VectorIndex.load(path, self._dim())
        except VectorFileDamaged as exc:
            if path.exists():
                log.warning("vector file %s is damaged (%s); rebuilding it from the database", path.name, exc)
            index, saved = self._build(kind, self.reader.setting(f"layout:{kind}")), -1
            self._dirty.add(kind)
        if saved != generation and saved != -1:
            self._sync(kind, index)
        if key is not None:
            self._loaded[kind] = key
        return index

    def refresh(self) -> list[str]:
        """Swap in the vector files another process (`mmsearch index`) saved since they were loaded.

        Each file is a committed state (written whole, then renamed), loaded memory-mapped and
        used as it is, never copied; a search already running keeps the index it started with.
        Items committed but not yet saved appear at the writer's next save. Returns the kinds swapped.
        """
        from .vectors import VectorFileDamaged, VectorIndex

        swapped = []
        with self._loading:
            for kind in list(self._vectors):
                key = _file_key(self._vector_path(kind))
                if key is None or key == self._loaded.get(kind) or kind in self._dirty:
                    continue
                try:
                    index, _ = VectorIndex.load(self._vector_path(kind), self._dim())
                except VectorFileDamaged:
                    continue  # keep answering from the one we have
                self._vectors[kind] = index
                self._loaded[kind] = key
                swapped.append(kind)
        return swapped

    def _sync(self, kind: str, index: VectorIndex) -> None:
        """Bring a cache that lags the store (a crash between commit and save) up to date by id."""
        have, want = index.ids(), self.reader.item_ids(kind)
        extra = np.setdiff1d(have, want, assume_unique=True)
        missing = np.setdiff1d(want, have, assume_unique=True)
        if len(extra):
            index.remove(extra)
        for ids, vecs in self.reader.vectors(kind, missing):
            index.add(ids, vecs)
        if len(extra) or len(missing):
            log.info("vector cache %s: %d added, %d removed to match the database", kind, len(missing), len(extra))
            self._dirty.add(kind)

    # --- searching --------------------------------------------------------------------------

    def search(self, query: str | Path | Image.Image | np.ndarray | Sequence[str | Path | Image.Image],
               **options: Any) -> list[Result]:
        """Search by text, image (path or PIL image), vector, or a list of texts and images combined.

        Options include `k`, `target`, `under`, `add`/`subtract` (texts, "text::weight"), `exclude`
        (texts), `min_score` (a cosine or 'auto'), `within` and `collapse`; see `search.search`.
        """
        from .search import search

        return search(self, query, **options)

    def duplicates(self, threshold: float | None = None) -> list[Group]:
        """Groups of near-identical images (cosine ≥ threshold, default 0.95); reports only; see `dupes`."""
        from .dupes import DEFAULT_THRESHOLD, find_duplicates

        return find_duplicates(self, DEFAULT_THRESHOLD if threshold is None else threshold)

    def info(self) -> dict[str, Any]:
        """Index path, model, counts per kind, FAISS layouts, roots and how each is scanned,
        files ignored for their type (count, and per type), and size on disk."""
        counts = self.reader.counts()
        ignored = self.reader.ignored()
        manifest = self.manifest
        size = sum(p.stat().st_size for p in self.directory.iterdir() if p.is_file())
        layouts, vectors = {}, {}
        if manifest is not None:
            for kind in KINDS:
                if counts.get(kind):
                    layouts[kind] = self.vectors(kind).layout
                    vectors[kind] = self.vectors(kind).describe()
        return {
            "index": str(self.directory),
            "model": None if manifest is None else {
                "name": manifest.name, "pretrained": manifest.pretrained,
                "checkpoint_sha256": manifest.checkpoint_sha256, "dim": manifest.dim,
            },
            "images": counts.get("image", 0),
            "texts": counts.get("text", 0),
            "files": counts["files"],
            "failures": counts["failures"],
            "layouts": layouts,
            "precision": self.precision_setting() or None,
            "vector_index": vectors,
            "max_memory": int(self.reader.setting("max_memory") or 0) or None,
            "roots": self.reader.roots(),
            "root_options": {root: asdict(opts) for root, opts in self.reader.root_options().items()},
            "ignored": len(ignored),
            "ignored_types": type_counts(ignored),
            "ignored_files": ignored,
            "size_bytes": size,
        }

    def failures(self) -> list[tuple[str, str]]:
        """(path, reason) of every file or record skipped and not indexed since."""
        return self.reader.failures()

    def ignored(self) -> list[str]:
        """Files skipped for their type (not failures) at the last scan of their root."""
        return self.reader.ignored()


def open_index(directory: str | Path | None = None, **options: Any) -> Collection:
    """Open (or create) an index; see `Collection.open`."""
    return Collection.open(directory, **options)


def _listed(values: Any, method: str) -> list[Any]:
    """`values` as a list; a lone str or path is refused (TypeError), never split into characters."""
    if isinstance(values, (str, bytes, os.PathLike)):
        raise TypeError(f"{method}() takes a list, not a single {type(values).__name__}: "
                        f"pass [{values!r}] for one item")
    return list(values)


def _file_key(path: Path) -> tuple[int, int, int] | None:
    """What changes when a file is replaced or rewritten (None if it is missing)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _open_store(directory: Path) -> Store:
    from .store import Store  # SQLAlchemy loads only when something is written

    return Store.open(directory)

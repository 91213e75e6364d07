"""The embedded vector store: one FAISS file per vector set in the index directory.

Each file is a cache of the metadata store's vectors of one (model, kind), recording the
generation it reflects (`MetadataReader.generation(model)`): checked when loaded, synced by id
when behind (a crash between a commit and a save), rebuilt when damaged or missing, and written
atomically. The sets of the index's default model keep the file names of earlier releases
(`vectors-image.faiss`), so an existing index, read-only ones included, opens without a rebuild;
another model's are `vectors-<model key>-image.faiss`. FAISS loads only once a set is needed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import BadQuery
from .stores import MAX_MEMORY_SETTING, MetadataReader, MetadataWriter, ModelDims, VectorKey

if TYPE_CHECKING:
    from .vectors import VectorIndex

log = logging.getLogger("mmsearch")


class FaissVectorStore:
    """FAISS files in `directory`, cached from the metadata store `reader`.

    `primary` is the key of the index's default model (its sets keep the file names of one-model
    indexes); `writer` opens the metadata store for writing, where a layout chosen by `rebuild` is kept.
    `follow`: `refresh` also takes up commits no file of this directory shows (an index in a database
    written from another machine, whose cache is elsewhere), by the metadata store's generation.
    """

    def __init__(self, directory: Path, reader: MetadataReader, primary: str,
                 writer: Callable[[], MetadataWriter], follow: bool = False) -> None:
        self.directory = directory
        self._follow = follow
        #: The metadata store's generation each loaded set reflects.
        self._generation: dict[VectorKey, int] = {}
        self._reader = reader
        self._dims = ModelDims(reader)
        self._primary = primary
        self._writer = writer
        self._sets: dict[VectorKey, VectorIndex] = {}
        self._dirty: set[VectorKey] = set()
        #: Sets built or synced from the metadata store when loaded and unchanged since, with the
        #: generation read before their rows (see `persist_loaded`).
        self._fresh: dict[VectorKey, int] = {}
        self._relayout: set[VectorKey] = set()  # sets to rebuild on save (a new memory budget)
        #: (inode, mtime, size) of each set's file as loaded or saved, to notice another process's save.
        self._loaded: dict[VectorKey, tuple[int, int, int]] = {}
        # Threads of one process (a web server) share this store: each set is loaded once.
        self._loading = threading.RLock()

    def _dim(self, key: VectorKey) -> int:
        """The dimension of the set's model (BadQuery for a model the index does not have)."""
        return self._dims(key.model)

    def path(self, key: VectorKey) -> Path:
        """The file of one vector set."""
        return self.directory / f"vectors-{key.name(self._primary)}.faiss"

    def _layout_setting(self, key: VectorKey) -> str:
        return f"layout:{key.name(self._primary)}"

    def get(self, key: VectorKey) -> VectorIndex:
        """The set of `key`, loaded and brought up to date with the metadata store."""
        index = self._sets.get(key)
        if index is not None:
            return index
        with self._loading:
            if key not in self._sets:
                self._sets[key] = self._load(key)
            return self._sets[key]

    def _load(self, key: VectorKey) -> VectorIndex:
        from .vectors import VectorFileDamaged, VectorIndex  # faiss loads only when vectors are needed

        generation = self._reader.generation(key.model)
        path = self.path(key)
        stamp = _file_stamp(path)
        try:
            index, saved = VectorIndex.load(path, self._dim(key))
        except VectorFileDamaged as exc:
            if path.exists():
                log.warning("vector file %s is damaged (%s); rebuilding it from the database", path.name, exc)
            index, saved = self._build(key, self._reader.setting(self._layout_setting(key))), -1
            self._dirty.add(key)
        if saved != generation and saved != -1:
            self._sync(key, index)
        if stamp is not None:
            self._loaded[key] = stamp
        if key in self._dirty:
            self._fresh[key] = generation
        self._generation[key] = generation
        return index

    def refresh(self) -> list[VectorKey]:
        """Swap in the files another process (`mmsearch index`) saved since the sets were loaded.

        Each file is a committed state (written whole, then renamed), loaded memory-mapped and
        used as it is, never copied; a search already running keeps the set it started with.
        Items committed but not yet saved appear at the writer's next save. Returns the keys swapped.
        """
        from .vectors import VectorFileDamaged, VectorIndex

        swapped = []
        with self._loading:
            for key in list(self._sets):
                path = self.path(key)
                stamp = _file_stamp(path)
                if stamp is None or stamp == self._loaded.get(key) or key in self._dirty:
                    continue
                try:
                    index, saved = VectorIndex.load(path, self._dim(key))
                except VectorFileDamaged:
                    continue  # keep answering from the one we have
                self._sets[key] = index
                self._loaded[key] = stamp
                self._generation[key] = saved
                swapped.append(key)
            if self._follow:
                swapped += self._follow_metadata()
        return swapped

    def _follow_metadata(self) -> list[VectorKey]:
        """Sets the metadata store's generation has moved past: loaded again (from this directory's
        file, not the set in use: a running search keeps its own), synced by id, swapped in and kept."""
        clean = [key for key in self._sets if key not in self._dirty]
        current = {model: self._reader.generation(model) for model in {key.model for key in clean}}  # once per model
        behind = [key for key in clean if current[key.model] != self._generation.get(key)]
        for key in behind:
            self._sets[key] = self._load(key)
        if behind:
            self.persist_loaded()
        return behind

    def add(self, key: VectorKey, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add (or replace) vectors by item id."""
        self.get(key).add(ids, vectors)
        self._dirty.add(key)
        self._fresh.pop(key, None)

    def remove(self, key: VectorKey, ids: np.ndarray) -> None:
        """Remove vectors by item id (unknown ids are ignored)."""
        self.get(key).remove(ids)
        self._dirty.add(key)
        self._fresh.pop(key, None)

    def save(self) -> None:
        """Atomically write every changed set, re-laid out when it outgrew its layout."""
        for key in sorted(self._dirty):
            generation = self._reader.generation(key.model)
            index = self._sets[key]
            forced = self._reader.setting(self._layout_setting(key))
            if index.needs_rebuild(keep_layout=forced is not None) or key in self._relayout:
                index = self._sets[key] = self._build(key, forced)
            index.save(self.path(key), generation)
            self._loaded[key] = _file_stamp(self.path(key)) or (0, 0, 0)
            self._generation[key] = generation
        self._dirty.clear()
        self._relayout.clear()
        self._fresh.clear()

    def persist_loaded(self) -> None:
        """Write the sets that were built or synced from the metadata store when loaded (and not
        changed since), so the next process starts from them; without the write lock: for a cache
        of its own (the per-user cache of an index in a database). Each is stamped with the
        generation read before its rows, so a commit made meanwhile has the next load sync it again."""
        with self._loading:
            for key, generation in sorted(self._fresh.items()):
                self._sets[key].save(self.path(key), generation)
                self._loaded[key] = _file_stamp(self.path(key)) or (0, 0, 0)
                self._dirty.discard(key)
            self._fresh.clear()

    def relayout(self, keys: Sequence[VectorKey]) -> None:
        """Rebuild these sets at the next save (the memory budget changed)."""
        for key in keys:
            self.get(key)
            self._relayout.add(key)
            self._dirty.add(key)
            self._fresh.pop(key, None)

    def rebuild(self, keys: Sequence[VectorKey], layout: str | None = None) -> dict[VectorKey, VectorIndex]:
        """Build the sets afresh from the metadata store, all or (BadQuery: a `layout` FAISS cannot
        parse or train) none; a `layout` given is kept by later rebuilds, None goes back to the
        automatic choice."""
        for key in keys:
            self.get(key)  # refuses a file of a newer mmsearch instead of rebuilding over it
        try:
            built = {key: self._build(key, layout) for key in keys}
        except ValueError as exc:
            raise BadQuery(str(exc).splitlines()[0]) from None
        for key, index in built.items():
            self._writer().set_setting(self._layout_setting(key), layout)
            self._sets[key] = index
            self._dirty.add(key)
            self._fresh.pop(key, None)
            self._relayout.discard(key)  # just built with the budget
        return built

    def drop(self, keys: Sequence[VectorKey]) -> None:
        """Forget these sets and delete their files and layout settings (their model was removed)."""
        with self._loading:
            for key in keys:
                self._sets.pop(key, None)
                self._loaded.pop(key, None)
                self._dirty.discard(key)
                self._fresh.pop(key, None)
                self._relayout.discard(key)
                self.path(key).unlink(missing_ok=True)
                self._writer().set_setting(self._layout_setting(key), None)

    def _build(self, key: VectorKey, layout: str | None = None) -> VectorIndex:
        from .vectors import VectorIndex

        dim = self._dim(key)
        chunks = list(self._reader.vectors(key.kind, model=key.model))
        ids = np.concatenate([c[0] for c in chunks]) if chunks else np.zeros(0, np.int64)
        vecs = np.concatenate([c[1] for c in chunks]) if chunks else np.zeros((0, dim), np.float32)
        # The other modality's vectors also tune the layout: they query across the gap.
        other = next(self._reader.vectors("text" if key.kind == "image" else "image", model=key.model), (None, None))[1]
        budget = self._reader.setting(MAX_MEMORY_SETTING)
        try:
            return VectorIndex.build(ids, vecs, dim, layout, cross_queries=other,
                                     max_memory=int(budget) if budget and not layout else None)
        except ValueError as exc:
            if not budget or layout or "no layout fits" not in str(exc):
                raise
            log.warning("%s; using the automatic layout for the %s vectors", exc, key.kind)
            return VectorIndex.build(ids, vecs, dim, cross_queries=other)

    def _sync(self, key: VectorKey, index: VectorIndex) -> None:
        """Bring a set that lags the metadata store (a crash between commit and save) up to date by id."""
        have, want = index.ids(), self._reader.item_ids(key.kind, key.model)
        extra = np.setdiff1d(have, want, assume_unique=True)
        missing = np.setdiff1d(want, have, assume_unique=True)
        if len(extra):
            index.remove(extra)
        for ids, vecs in self._reader.vectors(key.kind, missing, key.model):
            index.add(ids, vecs)
        if len(extra) or len(missing):
            log.info("vector cache %s: %d added, %d removed to match the database", key.name(self._primary),
                     len(missing), len(extra))
            self._dirty.add(key)


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    """What changes when a file is replaced or rewritten (None if it is missing)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size

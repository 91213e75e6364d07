"""Vectors in Milvus: a `VectorStore` over pymilvus' `MilvusClient`, for a Milvus server or milvus-lite.

`uri` is what pymilvus takes, plus `milvus://`: `milvus://host:19530` (read as `http://host:19530`;
`milvus://user:password@host:19530/dbname` for a secured server and a named database),
`http(s)://host:port`, or a local file `PATH.db`, which runs milvus-lite embedded in this process.

Each vector set is one collection, `mm_<index id>_<model>_<kind>`: the index id is a random name
kept in the metadata store (setting `vectors_id`), so indexes sharing one Milvus never meet. A row
is (item id as primary key, unit vector); the metric is inner product (== cosine). Filters
(`--under`, `--after`, ...) are answered by the metadata store, the truth, as a set of item ids,
which Milvus applies inside the search as an `id in [...]` expression (see `_search` for sets
larger than one request): no path is stored in Milvus, so a rename never makes a Milvus row
stale. `min_score` is a range search in Milvus (`radius`).

The collection is a cache of the metadata store's vectors, as the FAISS file is: the two share
no transaction, so the collection records (property `mmsearch.generation`) the metadata generation
it reflects. A batch is committed to the metadata store, then mirrored into Milvus (upserts and
deletes, applied at once, seen by the next search: consistency level Strong); when the writer
saves, what it wrote is flushed (sealed, indexed) and the generation recorded. A set whose
recorded generation differs from the metadata store's (a crash between commit and mirror, a new
collection, another Milvus) is reconciled when first used: missing vectors are upserted from the
metadata store, orphans deleted. Item ids are never reused and a vector never changes under its
id, so an id present in both is current. Ids only grow (one writer at a time), so with each
generation the collection also records its top (the highest id the metadata store then held for
it, and its model's own generation): a later state lacks in Milvus at most the ids above that top,
unless vectors of the model were written for older items since (a backfill: the model's own
generation moved). The common reconcile (after a crash, the metadata store ahead) therefore
upserts the ids above the top and counts: with every wanted id held, equal counts mean no orphan.
Only when counts differ, no top was recorded, a backfill happened or the metadata store is not
ahead are all ids read back from Milvus and compared (at 1M on milvus-lite that read takes
minutes). Searches drop any id the metadata store no longer holds (`search._search_kind`), so a
removed item is never returned even while a reconcile is pending. Orphans are deleted only when the metadata store's generation did not
move during the reconcile (an id committed and mirrored meanwhile by a writer is never taken for one).

Index type by size, like the FAISS layouts: FLAT (exact) while a scan is cheap, HNSW above,
IVF_FLAT where an HNSW build would exceed the CPU budget, IVF_SQ8 where a memory budget asks for
it. milvus-lite (3.x, pure Python over FAISS) builds FLAT, HNSW, HNSW_SQ, IVF_FLAT, IVF_SQ8 and
AUTOINDEX (HNSW there); `mmsearch reindex --faiss TYPE` forces one of these, or on a server any type
it builds (DISKANN, IVF_PQ, SCANN, ...). milvus-lite serves one process per file: a second process
gets VectorStoreUnavailable; several processes use `milvus-lite server` or a Milvus server.

This module imports pymilvus (ImportError where it is not installed: `pip install 'mmsearch[cluster]'`);
only an index opened with a Milvus URI imports this module, so `import retrieval` and the default
store never load pymilvus.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
from pymilvus import DataType, MilvusClient
from pymilvus.exceptions import MilvusException

from .backends import client_args, redacted
from .errors import BadQuery, VectorStoreUnavailable
from .stores import MAX_MEMORY_SETTING, MetadataReader, MetadataWriter, ModelDims, VectorKey
from .vectors import (BUILD_BUDGET_CPU_S, FLAT_MAX_FLOATS, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, IVF_PROBE_FRACTION,
                      SHRINK_HYSTERESIS, hnsw_build_cpu_s, ivf_nlist, layout_bytes)

log = logging.getLogger("mmsearch")

#: Setting (metadata store) naming this index's collections in Milvus.
INDEX_ID_SETTING = "vectors_id"
#: Collection properties: the metadata generation the collection reflects, a forced index type, and
#: the build parameters of its index (milvus-lite's describe_index leaves them out; IVF's nprobe needs nlist).
GENERATION_PROPERTY = "mmsearch.generation"
LAYOUT_PROPERTY = "mmsearch.layout"
INDEX_PARAMS_PROPERTY = "mmsearch.index_params"
#: Collection property: JSON {"id", "model_generation"}: the highest item id of the set at a recorded
#: generation, and its model's own generation then (see the module docstring; `_reconcile`).
TOP_PROPERTY = "mmsearch.top"
#: Index types milvus-lite builds (3.x; AUTOINDEX is HNSW there); a server builds these and more.
LITE_INDEX_TYPES = ("FLAT", "HNSW", "HNSW_SQ", "IVF_FLAT", "IVF_SQ8", "AUTOINDEX")
#: Rows per upsert and ids per `id in [...]` filter: well under Milvus' 64 MB per request at d=2048.
BATCH = 4096
#: Milvus' largest `limit` (topk) of one search.
MAX_TOPK = 16384
#: Candidates fetched per result from quantized (SQ) index types, re-scored with the exact vectors.
RERANK_FACTOR = 4
#: Seconds to wait for a Milvus server before giving up.
CONNECT_TIMEOUT_S = 10.0
_VECTOR, _ID = "vector", "id"


class MilvusVectorStore:
    """The vector sets of an index in Milvus at `uri`, cached from the metadata store `reader`; the
    signature of `faiss_store.FaissVectorStore` with `uri` for its directory. `primary`, the key of
    the index's default model, names nothing here: every collection is named by its model's key.
    `writer` opens the metadata store for writing, where the index's collection prefix is kept."""

    def __init__(self, uri: str, reader: MetadataReader, primary: str, writer: Callable[[], MetadataWriter]) -> None:
        self.uri = uri
        self._args = client_args(uri)
        self.lite = self._args["uri"].endswith(".db")
        self._reader = reader
        self._dims = ModelDims(reader)
        self._writer = writer
        self._client: Any = None
        self._sets: dict[VectorKey, MilvusVectorSet] = {}
        self._changed: set[VectorKey] = set()  # sets written since the last save
        self._relayout: set[VectorKey] = set()
        # Threads of one process (a web server) share this store: each set is opened once.
        self._opening = threading.RLock()

    # --- connection and names -----------------------------------------------------------------

    @property
    def client(self) -> Any:
        """The `MilvusClient`, connected on first use (VectorStoreUnavailable when it cannot be)."""
        if self._client is None:
            with self._opening:
                if self._client is None:
                    try:
                        self._client = MilvusClient(**self._args, timeout=CONNECT_TIMEOUT_S)
                    except Exception as exc:  # noqa: BLE001 - pymilvus raises several types for one failure
                        hint = (" (milvus-lite serves one process at a time: is another mmsearch using it? "
                                "For several, run `milvus-lite server --data-dir FILE` and use --vectors "
                                "http://127.0.0.1:19530)") if self.lite else ""
                        raise VectorStoreUnavailable(
                            f"cannot open the vector store {redacted(self.uri)}: {_reason(exc)}{hint}") from None
        return self._client

    def _index_id(self) -> str:
        """The random name of this index's collections, made and kept by the first use."""
        found = self._reader.setting(INDEX_ID_SETTING)
        if found is None:
            with self._opening:
                found = self._reader.setting(INDEX_ID_SETTING)
                if found is None:
                    found = secrets.token_hex(6)
                    self._writer().set_setting(INDEX_ID_SETTING, found)
        return found

    def dim(self, key: VectorKey) -> int:
        """The dimension of the set's model (BadQuery for a model the index does not have)."""
        return self._dims(key.model)

    def collection(self, key: VectorKey) -> str:
        """The collection of one vector set (letters, digits and `_`, at most 255 characters)."""
        name = re.sub(r"[^A-Za-z0-9_]", "_", f"mm_{self._index_id()}_{key.model}_{key.kind}")
        if len(name) > 255:  # a long model name: keep it unique with a hash
            name = f"{name[:200]}_{hashlib.sha256(name.encode()).hexdigest()[:16]}"
        return name

    # --- VectorStore ----------------------------------------------------------------------------

    def get(self, key: VectorKey) -> MilvusVectorSet:
        """The set of `key`, its collection created when missing and reconciled with the metadata
        store when it reflects another generation."""
        found = self._sets.get(key)
        if found is not None:
            return found
        with self._opening, _milvus_errors(self.uri):
            if key not in self._sets:
                dim, name = self.dim(key), self.collection(key)  # BadQuery for a model the index lacks
                if not self.client.has_collection(name):
                    n = len(self._reader.item_ids(key.kind, key.model))
                    self._create(key, name, n, self._auto_layout(key, n))
                else:
                    self.client.load_collection(name)  # milvus-lite opens collections released
                vector_set = MilvusVectorSet(self, name, key, dim)
                if vector_set.generation() != self._reader.generation(key.model):
                    self._reconcile(vector_set)
                self._sets[key] = vector_set
            return self._sets[key]

    def add(self, key: VectorKey, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Upsert vectors by item id (an id added again replaces its vector)."""
        if len(ids):
            with _milvus_errors(self.uri):
                self.get(key).upsert(ids, vectors)
            self._changed.add(key)

    def remove(self, key: VectorKey, ids: np.ndarray) -> None:
        """Delete vectors by item id (unknown ids are ignored)."""
        if len(ids):
            with _milvus_errors(self.uri):
                self.get(key).delete(ids)
            self._changed.add(key)

    def save(self) -> None:
        """Record the metadata generation in every set loaded (each mirrored every batch committed
        since it was loaded, under the write lock), re-indexing those whose size or memory budget
        now asks for another index type."""
        with _milvus_errors(self.uri):
            for key in sorted(self._sets):
                vector_set = self._sets[key]
                generation = self._reader.generation(key.model)
                if key in self._changed or key in self._relayout:
                    forced = vector_set.forced_layout()
                    want = forced or self._auto_layout(key, len(vector_set), vector_set.layout)
                    if want != vector_set.layout or key in self._relayout:
                        vector_set.reindex(want, forced)
                if vector_set.unflushed:
                    vector_set.flush()
                if vector_set.generation() != generation:
                    vector_set.set_generation(generation, self._top(key))
        self._changed.clear()
        self._relayout.clear()

    def refresh(self) -> list[VectorKey]:
        """Nothing to take up: every search reads the collection as it is now."""
        return []

    def relayout(self, keys: Sequence[VectorKey]) -> None:
        """Choose the index type of these sets afresh at the next save (the memory budget changed)."""
        for key in keys:
            self.get(key)
            self._relayout.add(key)

    def rebuild(self, keys: Sequence[VectorKey], layout: str | None = None) -> dict[VectorKey, MilvusVectorSet]:
        """Re-create the collections from the metadata store, with the index type `layout` (kept
        by later saves; None: the automatic choice). An index type this Milvus cannot build is
        refused (BadQuery) before anything is dropped."""
        if layout is not None:
            layout = layout.strip().upper()
            if self.lite and layout not in LITE_INDEX_TYPES:
                raise BadQuery(f"milvus-lite builds the index types {', '.join(LITE_INDEX_TYPES)}, not {layout!r} "
                               "(other types need a Milvus server)")
        built = {}
        with self._opening, _milvus_errors(self.uri):
            for key in keys:
                self.get(key)
            for key in keys:
                name = self.collection(key)
                self.client.drop_collection(name)
                self._sets.pop(key, None)
                n = len(self._reader.item_ids(key.kind, key.model))
                try:
                    self._create(key, name, n, layout or self._auto_layout(key, n), layout)
                except Exception as exc:  # noqa: BLE001 - the server names what it cannot build
                    self.client.drop_collection(name)
                    self._create(key, name, n, self._auto_layout(key, n))
                    raise BadQuery(f"Milvus cannot build index type {layout!r}: {_reason(exc)}") from None
                built[key] = self.get(key)
                self._relayout.discard(key)
        return built

    def drop(self, keys: Sequence[VectorKey]) -> None:
        """Drop the collections of these sets (their model was removed)."""
        with self._opening, _milvus_errors(self.uri):
            for key in keys:
                self._sets.pop(key, None)
                self._changed.discard(key)
                self._relayout.discard(key)
                self.client.drop_collection(self.collection(key))

    # --- inside -----------------------------------------------------------------------------------

    def _create(self, key: VectorKey, name: str, n: int, layout: str, forced: str | None = None) -> None:
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field(_ID, DataType.INT64, is_primary=True)
        schema.add_field(_VECTOR, DataType.FLOAT_VECTOR, dim=self.dim(key))
        self.client.create_collection(name, schema=schema, consistency_level="Strong",
                                      properties={GENERATION_PROPERTY: "-1", LAYOUT_PROPERTY: forced or ""})
        self._build_index(name, layout, n)

    def _build_index(self, name: str, layout: str, n: int) -> None:
        built = build_params(layout, n)
        params = self.client.prepare_index_params()
        params.add_index(field_name=_VECTOR, index_type=layout, metric_type="IP", params=built)
        self.client.alter_collection_properties(name, properties={INDEX_PARAMS_PROPERTY: json.dumps(built)})
        # Not waited for (sync=False): milvus-lite lacks the RPC pymilvus waits with; it, like a server,
        # indexes each sealed segment in the background and searches unindexed ones exactly meanwhile.
        self.client.create_index(name, params, sync=False)
        self.client.load_collection(name)

    def _auto_layout(self, key: VectorKey, n: int, current: str | None = None) -> str:
        """FLAT while a scan is cheap (the FAISS store's threshold, with its hysteresis on the way
        back), HNSW above, IVF_FLAT where an HNSW build would exceed the CPU budget, IVF_SQ8 (one
        byte per dimension) where the memory budget is smaller than HNSW's."""
        dim = self.dim(key)
        if n * dim <= FLAT_MAX_FLOATS * (1 if current in (None, "FLAT") else SHRINK_HYSTERESIS):
            return "FLAT"
        budget = self._reader.setting(MAX_MEMORY_SETTING)
        if budget and layout_bytes("HNSW32", n, dim) > int(budget):
            return "IVF_SQ8"
        return "IVF_FLAT" if hnsw_build_cpu_s(n, dim) > BUILD_BUDGET_CPU_S else "HNSW"

    def _top(self, key: VectorKey) -> tuple[int, int]:
        """The set's highest item id in the metadata store and its model's own generation (the writes
        of its vectors alone, `reader.generation`), to record with a generation the set reflects."""
        own = self._reader.generation(key.model) - self._reader.generation()
        return self._reader.top_item_id(key.kind, key.model), own

    def _reconcile(self, vector_set: MilvusVectorSet) -> None:
        """Bring a collection to the metadata store's items: upsert missing, delete orphans. Cheap
        when the collection's recorded top says which ids it can lack (see the module docstring):
        those are upserted, and Milvus' count then tells whether any orphan is left; otherwise, or
        when the counts differ, every id is read back from Milvus and compared."""
        model, kind = vector_set.key
        generation = self._reader.generation(model)  # first: the ids read next are at least this new
        own = generation - self._reader.generation()
        want = self._reader.item_ids(kind, model)
        held, top = len(vector_set), vector_set.top()
        missing: np.ndarray | None = None  # None: not known without reading every id
        if not held:
            missing = want
        elif top is not None and top[1] == own and generation > vector_set.generation():
            missing = want[np.searchsorted(want, top[0], side="right"):]  # may hold some already mirrored
        orphans = np.zeros(0, np.int64)
        if missing is not None:
            self._upsert_from_metadata(vector_set, missing)
            if len(vector_set) != len(want):  # every wanted id is held: more rows are orphans (or a writer's)
                missing = None
        if missing is None:
            have = vector_set.ids()
            missing = np.setdiff1d(want, have, assume_unique=True)
            orphans = np.setdiff1d(have, want, assume_unique=True)
            self._upsert_from_metadata(vector_set, missing)
        settled = self._reader.generation(model) == generation
        if len(orphans) and settled:  # else a writer is at work: an id may be newer than `want`
            vector_set.delete(orphans)
        if vector_set.unflushed:
            vector_set.flush()
        if settled:
            vector_set.set_generation(generation, (int(want[-1]) if len(want) else 0, own))
        log.info("vector collection %s: %d upserted, %d removed to match the metadata store",
                 vector_set.name, len(missing), len(orphans) if settled else 0)

    def _upsert_from_metadata(self, vector_set: MilvusVectorSet, ids: np.ndarray) -> None:
        """Copy the vectors of `ids` from the metadata store into the collection."""
        model, kind = vector_set.key
        for found, vecs in self._reader.vectors(kind, ids, model):
            vector_set.upsert(found, vecs)


class MilvusVectorSet:
    """One collection: the vectors of one (model, kind), searched in Milvus."""

    def __init__(self, store: MilvusVectorStore, name: str, key: VectorKey, dim: int) -> None:
        self._store = store
        self.name = name
        self.key = key
        self.dim = dim
        self.layout, self._params = self._read_index()
        self.unflushed = False  # written since the last flush

    @property
    def _client(self) -> Any:
        return self._store.client

    def _read_index(self) -> tuple[str, dict[str, Any]]:
        info = self._client.describe_index(self.name, _VECTOR) or {}
        return str(info.get("index_type", "FLAT")), json.loads(self._properties().get(INDEX_PARAMS_PROPERTY) or "{}")

    def _properties(self) -> dict[str, str]:
        return dict(self._client.describe_collection(self.name).get("properties") or {})

    def generation(self) -> int:
        """The metadata generation this collection reflects (-1: none yet)."""
        return int(self._properties().get(GENERATION_PROPERTY) or -1)

    def set_generation(self, generation: int, top: tuple[int, int] | None = None) -> None:
        """Record the metadata generation the collection now reflects, and with `top` (highest item
        id, model's own generation) the ids it holds all of (a top recorded before stays true)."""
        properties = {GENERATION_PROPERTY: str(generation)}
        if top is not None:
            properties[TOP_PROPERTY] = json.dumps({"id": top[0], "model_generation": top[1]})
        self._client.alter_collection_properties(self.name, properties=properties)

    def top(self) -> tuple[int, int] | None:
        """The (highest item id, model's own generation) recorded with a generation (None: never)."""
        raw = self._properties().get(TOP_PROPERTY)
        if not raw:
            return None
        found = json.loads(raw)
        return int(found["id"]), int(found["model_generation"])

    def forced_layout(self) -> str | None:
        """The index type `rebuild` was given, kept by later saves (None: automatic)."""
        return self._properties().get(LAYOUT_PROPERTY) or None

    def reindex(self, layout: str, forced: str | None) -> None:
        """Build another index type over the stored vectors (they stay; only the index changes)."""
        log.info("vector collection %s: index %s -> %s", self.name, self.layout, layout)
        self._client.release_collection(self.name)
        self._client.drop_index(self.name, _VECTOR)
        self._store._build_index(self.name, layout, len(self))
        self._client.alter_collection_properties(self.name, properties={LAYOUT_PROPERTY: forced or ""})
        self.layout, self._params = self._read_index()

    def upsert(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Write vectors by id, in requests of at most BATCH rows."""
        vectors = np.asarray(vectors, dtype=np.float32)
        for start in range(0, len(ids), BATCH):
            rows = [{_ID: int(i), _VECTOR: v} for i, v in zip(ids[start:start + BATCH], vectors[start:start + BATCH])]
            self._client.upsert(self.name, rows)
        self.unflushed = True

    def delete(self, ids: np.ndarray) -> None:
        """Delete rows by id."""
        for start in range(0, len(ids), BATCH):
            self._client.delete(self.name, ids=[int(i) for i in ids[start:start + BATCH]])
        self.unflushed = True

    def flush(self) -> None:
        """Seal what was written into segments, indexed in the background. milvus-lite searches
        unsealed rows one query at a time in Python (measured: 1.5 s a query over 20k rows, 66 ms
        once sealed; its background HNSW build then takes a query at 20k from 179 ms to 12 ms). A
        server seals by itself and may refuse a flush soon after another (rate limit), which
        changes nothing written, so that refusal is only logged."""
        try:
            self._client.flush(self.name)
            self.unflushed = False
        except MilvusException as exc:
            log.info("vector collection %s: flush refused (%s)", self.name, _reason(exc))

    # --- VectorSet ------------------------------------------------------------------------------

    def __len__(self) -> int:
        rows = self._client.query(self.name, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"]) if rows else 0

    def ids(self) -> np.ndarray:
        """Every id in the collection, ascending."""
        found = [np.fromiter((r[_ID] for r in batch), np.int64, len(batch)) for batch in self._batches()]
        return np.sort(np.concatenate(found)) if found else np.zeros(0, np.int64)

    def _batches(self) -> Iterator[list[dict[str, Any]]]:
        # milvus-lite gives the iterator no server timestamp; pymilvus then warns each time, harmlessly.
        quiet = logging.getLogger("pymilvus.client.iterator.query_iterator")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            it = self._client.query_iterator(self.name, batch_size=BATCH, filter="", output_fields=[_ID])
        finally:
            quiet.setLevel(level)
        try:
            while batch := it.next():
                yield batch
        finally:
            it.close()

    def describe(self) -> dict[str, Any]:
        """Index type and parameters, for `info`."""
        with _milvus_errors(self._store.uri):
            return {"layout": self.layout, "params": {**self._params, **self._search_params(10)}, "tuning": {},
                    "vectors": len(self), "tombstones": 0, "collection": self.name,
                    "store": redacted(self._store.uri), "generation": self.generation()}

    def _search_params(self, k: int, wide: bool = False) -> dict[str, Any]:
        """HNSW's beam and IVF's lists probed for `k` results; `wide`: as many as it takes."""
        if self.layout.startswith("HNSW") or self.layout == "AUTOINDEX":
            return {"ef": max(HNSW_EF_SEARCH, k * (8 if wide else 1))}
        if self.layout.startswith("IVF"):
            nlist = int(self._params.get("nlist") or 1)
            return {"nprobe": nlist if wide else max(1, math.ceil(nlist * IVF_PROBE_FRACTION))}
        return {}

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None, *,
               exact: Callable[[np.ndarray], np.ndarray] | None = None,
               min_score: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-`k` by inner product for each query, `(scores, ids)` of shape [q, k] padded with
        -inf / -1. `allowed` restricts the search (inside Milvus) to those ids; `exact(ids)` gives
        the stored vectors, used to re-score the candidates of a quantized (SQ) index type;
        `min_score` makes it a range search in Milvus (only scores at or above it come back)."""
        q = np.asarray(queries, dtype=np.float32).reshape(-1, self.dim)
        k = int(k)
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        labels = np.full((len(q), k), -1, dtype=np.int64)
        if allowed is not None:
            allowed = np.unique(np.asarray(allowed, dtype=np.int64))
            if not len(allowed):
                return scores, labels
        rerank = exact is not None and "SQ" in self.layout
        fetch = min(k * RERANK_FACTOR if rerank else k, MAX_TOPK)
        with _milvus_errors(self._store.uri):
            hits = self._search(q, fetch, allowed, min_score)
            if self.layout != "FLAT" and any(len(found) < fetch for found in hits):
                # An approximate index may stop short of what exists (few IVF lists probed, a
                # cut-off or a filter far from the query): search those wide, as FAISS does.
                exist = min(fetch, len(self) if allowed is None else len(allowed))
                if any(len(found) < exist for found in hits):
                    hits = self._search(q, fetch, allowed, min_score, wide=True)
        for row, found in enumerate(hits):
            if rerank and found:
                ids = np.array([i for _, i in found], dtype=np.int64)
                found = list(zip((exact(ids) @ q[row]).tolist(), ids.tolist()))
            if min_score is not None:  # Milvus' radius is exclusive, and re-scored candidates moved
                found = [hit for hit in found if hit[0] >= min_score]
            found.sort(key=lambda hit: -hit[0])
            found = found[:k]
            scores[row, :len(found)] = [s for s, _ in found]
            labels[row, :len(found)] = [i for _, i in found]
        return scores, labels

    def _search(self, q: np.ndarray, limit: int, allowed: np.ndarray | None,
                min_score: float | None = None, wide: bool = False) -> list[list[tuple[float, int]]]:
        """Hits (score, id) per query, at least `limit` allowed ones where that many exist.

        Up to BATCH allowed ids: one search filtered by `id in [...]` inside Milvus. More (a
        folder holding much of the index, `--ext jpg` on a library of JPEGs): unfiltered searches
        of a widening `limit` (2 / share of the set, x4 each time) whose hits are kept when
        allowed, until `limit` pass; where that reaches Milvus' largest topk, one filtered search
        per BATCH allowed ids, merged."""
        if allowed is None or len(allowed) <= BATCH:
            return self._filtered(q, limit, allowed, min_score, wide)
        fetch = min(MAX_TOPK, max(limit, math.ceil(2 * limit * len(self) / len(allowed))))
        while True:
            hits = self._filtered(q, fetch, None, min_score, wide)
            kept = [[hit for hit, ok in zip(found, _allowed_mask(allowed, found)) if ok] for found in hits]
            if all(len(k) >= limit for k in kept) or all(len(found) < fetch for found in hits):
                return kept
            if fetch == MAX_TOPK:
                break
            fetch = min(MAX_TOPK, fetch * 4)
        merged: list[list[tuple[float, int]]] = [[] for _ in q]
        for start in range(0, len(allowed), BATCH):
            for row, found in enumerate(self._filtered(q, limit, allowed[start:start + BATCH], min_score, wide)):
                merged[row].extend(found)
        return merged

    def _filtered(self, q: np.ndarray, limit: int, allowed: np.ndarray | None,
                  min_score: float | None, wide: bool) -> list[list[tuple[float, int]]]:
        """One Milvus search: hits (score, id) per query, restricted to `allowed` inside Milvus, a
        range search (scores above `radius`) with a `min_score`."""
        expr = "" if allowed is None else f"{_ID} in [{','.join(map(str, allowed.tolist()))}]"
        params = self._search_params(limit, wide)
        if min_score is not None:  # radius is exclusive: a hair below keeps a score equal to min_score
            params["radius"] = float(np.nextafter(np.float32(min_score), np.float32(-2)))
        result = self._client.search(self.name, data=list(q), limit=limit, filter=expr, output_fields=[_ID],
                                     search_params={"metric_type": "IP", "params": params})
        return [[(float(h["distance"]), int(h["id"])) for h in found] for found in result]


def _allowed_mask(allowed: np.ndarray, found: list[tuple[float, int]]) -> np.ndarray:
    """Which hits of `found` have an id in the sorted array `allowed`."""
    ids = np.array([i for _, i in found], dtype=np.int64)
    if not len(ids):
        return np.zeros(0, bool)
    return allowed[np.clip(np.searchsorted(allowed, ids), 0, len(allowed) - 1)] == ids


def build_params(layout: str, n: int) -> dict[str, Any]:
    """Build parameters of an index type for `n` vectors (the FAISS layouts' choices where they apply)."""
    if layout.startswith("HNSW"):
        return {"M": 32, "efConstruction": HNSW_EF_CONSTRUCTION}
    if layout.startswith("IVF"):
        return {"nlist": ivf_nlist(n)}
    return {}


def _reason(exc: BaseException) -> str:
    """A pymilvus error as one line."""
    return str(getattr(exc, "message", None) or exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


@contextmanager
def _milvus_errors(uri: str) -> Iterator[None]:
    """pymilvus and gRPC failures (a server gone, a request refused) as VectorStoreUnavailable."""
    try:
        yield
    except MilvusException as exc:
        raise VectorStoreUnavailable(f"vector store {redacted(uri)}: {_reason(exc)}") from None

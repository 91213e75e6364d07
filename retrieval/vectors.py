"""FAISS vector cache: exact or approximate inner-product search keyed by SQLite row ids.

SQLite is the source of truth; the file written here is only a cache that can be rebuilt
from it at any time. Vectors are L2-normalised float32, so inner product == cosine.

Design notes
------------
* FAISS labels are *slots* (0..ntotal-1, in insertion order); ``_slot_ids`` maps a slot to
  the store's int64 row id. Keeping the map ourselves (instead of ``IndexIDMap2``) lets one
  mechanism serve every layout: exact layouts compact on ``remove``; graph/IVF layouts,
  which FAISS cannot (HNSW) or should not renumber, mark slots dead (tombstones) and filter
  them at search time with an ``IDSelectorBitmap``.
* Layouts are tuned to the data at build time, like autofaiss: the smallest efSearch /
  nprobe (and re-rank depth) reaching a recall@10 target on held-out stored vectors and
  other-modality queries is saved with the file (``params``, ``tuning``). The layout also
  follows the data: vectors close to a subspace (by a sample's PCA spectrum) get their graph
  built over the projected vectors, re-scored from a float16 copy. Large collections whose
  HNSW build would exceed a CPU budget get IVF over fast-scan PQ codes with a float16
  refine copy; a memory budget picks compressed IVF-PQ / OPQ layouts whose candidates the
  caller re-ranks with the exact vectors from SQLite (``search(..., exact=...)``).
* File = ``[faiss index][metadata][64-byte footer]``. FAISS stops reading at the end of its
  own data, so the file can be memory-mapped with ``IO_FLAG_MMAP_IFC`` and a query process
  does not copy the vectors into private memory.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import struct
import time
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Callable

import faiss
import numpy as np

from retrieval.errors import IndexTooNew, MMSearchError

__all__ = ["VectorFileDamaged", "VectorIndex", "choose_layout"]


class VectorFileDamaged(MMSearchError):
    """The vector cache file is missing, truncated, corrupt or was built for another dim.

    The file is a cache: callers rebuild it from SQLite when they see this error.
    """


# --- layout policy (numbers: benchmarks/RESULTS-search.md) ---------------------------------

#: Exact search is kept while one brute-force scan touches at most this many floats
#: (n * dim, the cost of a scan). Measured at d=512 on 2 shared cores, 1 thread, CPU time
#: per query: exact 0.7 ms at 10k, 1.8 ms at 20k, 5.5 ms at 50k, 8 ms at 100k; HNSW 0.4-0.8 ms
#: but ~25 CPU-s of build at 50k and recall < 1. Up to ~5 ms a scan is not worth trading
#: exactness, instant builds/removes and exact filters for, hence 50k vectors at d=512.
FLAT_MAX_FLOATS = 50_000 * 512

#: Approximate layout above the threshold: HNSW graph (M=32) over float16 codes. At 1M x 512
#: the file is 0.64x the raw float32 size (SQ8 would be 0.38x and 1.2-1.5x faster, but caps
#: recall@10 near 0.99 and needs trained per-dimension ranges that later adds may exceed;
#: float32 storage is 1.13x and ~1.5x slower for no recall gain).
APPROX_LAYOUT = "HNSW32,SQfp16"
#: Graph quality knob; clustered data needs it. With 40 (FAISS default) 1M clustered
#: vectors gave recall@10 0.85 at efSearch 96: some queries were routed into a wrong
#: cluster and no beam width fixed it. 80 costs 1.7x the build CPU (1M continuous: 870
#: CPU-s, ~10 min wall on 2 cores).
HNSW_EF_CONSTRUCTION = 80
#: Default search beam: the smallest with recall@10 >= 0.95 and margin at 1M on both
#: benchmark distributions (clustered 0.986 at 0.36 ms, continuous 0.991 at 1.27 ms).
HNSW_EF_SEARCH = 128
#: Untuned IVF layouts probe this share of lists (also the floor of a filtered search).
IVF_PROBE_FRACTION = 1 / 32

#: Rebuild once this share of slots is dead (tombstones cost memory and search effort).
TOMBSTONE_REBUILD_FRACTION = 0.2
#: An automatic layout is chosen and tuned for the collection it was built over: once the
#: collection has grown this many times over, it is chosen and tuned again (a beam tuned at
#: 100k misses neighbours at 1M, and the data may no longer fit its projection). Sizes
#: doubling, all the rebuilds together cost less than twice the last one.
GROWTH_REBUILD_FACTOR = 2
#: An approximate layout is only worth replacing by Flat once the collection shrank well
#: below the threshold; the gap avoids flip-flopping around it.
SHRINK_HYSTERESIS = 0.5

#: ``allowed`` filters on a graph layout: either scan the stored codes of the allowed slots
#: (exact, cost ~ a bitmap test per slot + a distance per allowed item) or widen the HNSW
#: beam by 1/share so it still collects ~efSearch allowed items. Per-unit CPU costs measured
#: at 1M x 512 (HNSW32,SQfp16, 1 thread): scan ~2 ns/slot + ~370 ns/allowed item, beam
#: ~8 us per unit of efSearch. The scan is exact and does not care where the allowed items
#: lie, so it is kept unless the beam is EXACT_PREFERENCE times cheaper (crossover near a
#: 7 % share at 1M, 23 % at 100k with efSearch 128).
SCAN_NS_PER_SLOT = 2.0
SCAN_NS_PER_ALLOWED = 370.0
BEAM_NS_PER_EF = 8000.0
EXACT_PREFERENCE = 2.0
#: Up to this many allowed items, their vectors are decoded and scored directly, which
#: does not depend on the collection size (measured: 0.16 ms for 100 items vs ~2.8 ms for a
#: 1M-slot scan; ~4 ms at 1000 items, where the scan is already cheaper).
ALLOWED_GATHER_MAX = 256
#: Ids are mapped to slots through a dense array while max id < this many times the
#: number of live items (SQLite row ids), else through a binary search.
DENSE_LOOKUP_FACTOR = 4
#: Filtered searches on the IVF + Refine layout scan the float16 copy exactly while that
#: costs at most this (by the constants above: allowed shares up to ~1.5 % at 1M). At 1M
#: clustered, widened probes gave recall@10 0.79 for a 1 % share (0.72 ms), 0.99 for 10 %.
IVF_EXACT_SCAN_NS = 8e6
#: Cap on the widened HNSW beam for filtered searches.
MAX_EF_SEARCH = 4096

#: Vectors used to train layouts that need it (SQ ranges, IVF centroids); fixed seed so a
#: rebuild of the same data gives the same index.
TRAIN_SAMPLE = 200_000
TRAIN_SEED = 1234
#: Vectors added per FAISS call when a build holds some out (bounds the temporary copy).
_ADD_CHUNK = 100_000


#: Build-time tuning (like autofaiss): recall@10 the automatic layouts aim for, measured
#: at build time against exact search, with a sample of the stored vectors as queries (held
#: out of the index while it is tuned, so never their own result) plus vectors of the other
#: modality.
TARGET_RECALL = 0.95
TUNE_K = 10
#: Stored vectors used as tuning queries; other-modality queries are capped likewise.
TUNE_QUERIES = 300
#: Beam widths / probe counts tried, ascending: the smallest reaching the target is kept.
EF_CANDIDATES = (16, 24, 32, 48, 64, 80, 96, 128, 160, 192, 256, 384, 512)
NPROBE_CANDIDATES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)

#: CPU seconds an automatic build may spend (10 min wall on a 2-core machine that is half
#: ours). An HNSW32 build with efConstruction 80 measured 870 CPU-s at 1M x 512 (SQfp16,
#: continuous data, the harder case), 50 CPU-s at 100k, and 186 CPU-s at 1M x 32 (float32
#: after a projection): per vector at 1M a fixed part (the graph's own work) plus a part
#: per dimension, growing as n^0.24. Above the budget the IVF layout below builds in a
#: fraction of that.
BUILD_BUDGET_CPU_S = 600.0
HNSW_BUILD_S_FIXED = 0.14e-3
HNSW_BUILD_S_PER_DIM = 1.425e-6
#: Vectors close to a subspace (a sample's PCA keeps at least REDUCE_MIN_ENERGY of the
#: variance in one of REDUCED_DIMS, at most dim/4, dimensions) get their graph built over
#: the projected vectors, and FAISS re-scores the top candidates from a float16 copy of the
#: full ones. 1M continuous (rank-24 latent, 0.990 of the variance in 32 dimensions), one
#: thread: recall@10 0.951 at 0.169 ms p50 (efSearch 64), where the IVF layout needed
#: 0.91 ms for 0.974 and HNSW on all 512 dimensions 0.71 ms for 0.955; built in 186 CPU-s.
#: Data whose variance is spread out (the clustered benchmark; CLIP vectors of a varied
#: library) keeps the layouts above.
REDUCED_LAYOUT = "PCA{r},HNSW32,Refine(SQfp16)"
REDUCED_DIMS = (16, 32, 64, 128)
REDUCE_MIN_ENERGY = 0.97
#: Rows of the sample whose spectrum decides that.
SPECTRUM_SAMPLE = 50_000
#: Candidates re-scored per result behind a projected graph: at 1M continuous, efSearch
#: 64, factors 2, 4 and 8 gave the same recall (0.951) at 0.169, 0.174 and 0.200 ms.
GRAPH_RERANK_FACTOR = 2
#: Large collections: IVF with an HNSW coarse quantizer over 4-bit fast-scan PQ codes
#: (dim/4 sub-quantizers, dim/8 bytes per vector), the candidates re-scored exactly from a
#: float16 copy (``Refine``). Fast-scan codes are cheap to scan, so many lists can be probed.
IVF_REFINE_LAYOUT = "IVF{nlist}_HNSW32,PQ{m}x4fs,Refine(SQfp16)"
#: Candidates re-scored per result: by FAISS from the float16 copy (``Refine``; 1M
#: continuous, nprobe 128: recall@10 0.950 with 8, 0.956 with 32), and from the exact
#: vectors in the database for the shorter memory-budget codes.
RERANK_FACTOR = 8
EXACT_RERANK_FACTOR = 16
#: Tuning doubles the factor up to this when probing every list does not reach the target.
MAX_RERANK_FACTOR = 128
#: OPQ rotation training (FAISS defaults 50 iterations on 65k points took 210 CPU-s at
#: d=512 for a 30k collection; the rotation converges in a few iterations).
OPQ_NITER = 8
OPQ_TRAIN_POINTS = 32_768
#: Fewest vectors per list worth training an IVF layout on.
IVF_MIN_PER_LIST = 64


def ivf_nlist(n: int) -> int:
    """Number of IVF lists for ``n`` vectors: a power of two near 2 * sqrt(n) (2048 at 1M)."""
    return max(16, 2 ** round(math.log2(max(2 * math.sqrt(max(n, 1)), 1))))


def hnsw_build_cpu_s(n: int, dim: int) -> float:
    """Estimated CPU seconds to build an HNSW32 graph over ``n`` vectors of ``dim``."""
    return (HNSW_BUILD_S_FIXED + HNSW_BUILD_S_PER_DIM * dim) * n * (max(n, 1) / 1e6) ** 0.24


def reduced_dim(sample: np.ndarray) -> int | None:
    """The fewest of :data:`REDUCED_DIMS` (at most a quarter of the vectors' dimensions)
    keeping :data:`REDUCE_MIN_ENERGY` of ``sample``'s variance, or ``None``."""
    x = np.asarray(sample[:SPECTRUM_SAMPLE], dtype=np.float32)
    if len(x) < 2 * max(REDUCED_DIMS):
        return None
    x = x - x.mean(axis=0)
    spectrum = np.linalg.eigvalsh((x.T @ x).astype(np.float64))[::-1]
    kept = np.cumsum(spectrum) / max(spectrum.sum(), 1e-30)
    return next((r for r in REDUCED_DIMS
                 if r <= x.shape[1] // 4 and kept[r - 1] >= REDUCE_MIN_ENERGY), None)


def layout_bytes(layout: str, n: int, dim: int) -> int:
    """Estimated in-memory size of ``n`` vectors of ``dim`` in ``layout`` (factory strings
    made of PCA, Flat, SQ8/SQfp16, HNSW, IVF, PQ, OPQ and Refine parts), id map included."""
    per, fixed, stored, width = 8.0, 0.0, False, dim  # 8: our slot -> id map
    parts = re.split(r"[,_](?![^(]*\))", layout.strip())
    for pos, part in enumerate(parts):
        refine = part.startswith("Refine(")  # a copy of the full vectors beside the index
        part = part.removeprefix("Refine(").removesuffix(")")
        size = dim if refine else width
        if match := re.fullmatch(r"PCAR?(\d+)", part):
            width = int(match[1])
            fixed += dim * width * 4
        elif match := re.fullmatch(r"HNSW(\d*)", part):
            if not (pos and parts[pos - 1].startswith("IVF")):  # not IVF's coarse quantizer
                per += 2 * int(match[1] or 32) * 4 * 1.1  # level-0 links (+ ~10 % upper levels)
        elif match := re.fullmatch(r"IVF(\d+)", part):
            per += 8  # the id stored in each list entry
            fixed += int(match[1]) * width * 4 * 2  # centroids, and again in their HNSW
        elif match := re.fullmatch(r"OPQ\d+(?:_\d+)?", part):
            fixed += dim * dim * 4
        elif match := re.fullmatch(r"PQ(\d+)(?:x(\d+))?(?:fsr?)?", part):
            per += int(match[1]) * int(match[2] or 8) / 8
            stored = stored or not refine
        elif part in ("Flat", "SQfp16", "SQ8"):
            per += {"Flat": 4, "SQfp16": 2, "SQ8": 1}[part] * size
            stored = stored or not refine
    if not stored:  # e.g. "HNSW32" alone keeps float32 vectors
        per += 4 * width
    return int(per * n + fixed)


def compressed_layouts(n: int, dim: int) -> list[str]:
    """Layouts for a memory budget, largest (most accurate) first: IVF over fast-scan PQ
    codes, with an OPQ rotation once codes get short (it spreads the variance that PQ's
    sub-vectors would otherwise split unevenly). Results are re-ranked from exact vectors
    kept outside the index (the database) when the caller supplies them."""
    if n < 4 * IVF_MIN_PER_LIST:
        return []
    # Small collections get fewer lists, so that each still trains on enough points.
    nlist = min(ivf_nlist(n), 2 ** int(math.log2(n / IVF_MIN_PER_LIST)))
    out = []
    for m in (dim // 2, dim // 4, dim // 8, dim // 16, dim // 32):
        if m < 4 or dim % m:
            continue
        base = f"IVF{nlist}_HNSW32,PQ{m}x4fs"
        out.append(base if m >= dim // 4 else f"OPQ{m}_{dim},{base}")
    return out


def choose_layout(n: int, dim: int, max_memory: int | None = None,
                  build_budget_s: float | None = None, reduced: int | None = None) -> str:
    """Return the FAISS factory string for a collection of ``n`` vectors of ``dim`` floats.

    Exact ``"Flat"`` while a brute-force scan is cheap (``n * dim <= FLAT_MAX_FLOATS``);
    above, an HNSW graph while its estimated build fits ``build_budget_s`` CPU seconds
    (default :data:`BUILD_BUDGET_CPU_S`): :data:`APPROX_LAYOUT`, or with ``reduced``
    (dimensions that keep the data's variance, see :func:`reduced_dim`)
    :data:`REDUCED_LAYOUT`; else the faster-building :data:`IVF_REFINE_LAYOUT`. With
    ``max_memory`` (bytes, like autofaiss's ``max_index_memory_usage``) the first of those
    that fits, else the most accurate compressed layout that fits; :class:`ValueError`
    when none does.
    """
    if n < 0 or dim <= 0:
        raise ValueError(f"bad collection shape n={n} dim={dim}")
    budget = BUILD_BUDGET_CPU_S if build_budget_s is None else build_budget_s
    nlist = ivf_nlist(n)
    ivf_ok = n >= IVF_MIN_PER_LIST * nlist
    options = []
    if n * dim <= FLAT_MAX_FLOATS:
        options.append("Flat")
    graph, graph_dim = (REDUCED_LAYOUT.format(r=reduced), reduced) if reduced else (APPROX_LAYOUT, dim)
    if hnsw_build_cpu_s(n, graph_dim) <= budget or not ivf_ok:
        options.append(graph)
    if ivf_ok and dim % 4 == 0:
        options.append(IVF_REFINE_LAYOUT.format(nlist=nlist, m=dim // 4))
    if max_memory is None:
        return options[0]
    options += compressed_layouts(n, dim)
    for layout in options:
        if layout_bytes(layout, n, dim) <= max_memory:
            return layout
    smallest = min(options, key=lambda lay: layout_bytes(lay, n, dim))
    raise ValueError(f"no layout fits {n:,} vectors of dim {dim} in {_megabytes(max_memory)} "
                     f"(the smallest, {smallest}, needs ~{_megabytes(layout_bytes(smallest, n, dim))})")


def _megabytes(size: float) -> str:
    return f"{size / 1e6:,.{0 if size >= 1e7 else 2}f} MB"


def _is_exact(layout: str) -> bool:
    return layout.strip() == "Flat"


# --- file format ---------------------------------------------------------------------------

_MAGIC = b"MMSVEC01"
_FORMAT_VERSION = 1
# magic, version, dim, generation, faiss_len, meta_len, json_len,
# faiss_crc (whole payload), sample_crc (sampled blocks), meta_crc, footer_crc
_FOOTER = struct.Struct("<8sIIqQQQIIII")
assert _FOOTER.size == 64
_SAMPLE_BLOCKS = 64
_SAMPLE_BLOCK_SIZE = 4096
_READ_CHUNK = 1 << 24


def _write_bytes(f: BinaryIO, data: bytes) -> None:
    """Single choke point for every byte of a vector file (tests inject failures here)."""
    f.write(data)


def _sample_offsets(length: int) -> list[int]:
    """Offsets of the blocks checked on every load: cheap, yet catches torn or zeroed files."""
    if length <= _SAMPLE_BLOCKS * _SAMPLE_BLOCK_SIZE:
        return list(range(0, length, _SAMPLE_BLOCK_SIZE))
    last = length - _SAMPLE_BLOCK_SIZE
    return [round(i * last / (_SAMPLE_BLOCKS - 1)) for i in range(_SAMPLE_BLOCKS)]


def _sample_crc(f: BinaryIO, length: int) -> int:
    crc = 0
    for off in _sample_offsets(length):
        f.seek(off)
        crc = zlib.crc32(f.read(min(_SAMPLE_BLOCK_SIZE, length - off)), crc)
    return crc


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not possible on every platform/filesystem.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- the index -----------------------------------------------------------------------------


class VectorIndex:
    """Inner-product index over L2-normalised vectors, keyed by int64 row ids.

    Attributes:
        dim: vector dimension.
        layout: FAISS factory string in use (``"Flat"``, ``"HNSW32"``, ...).
        params: search-time parameters (``efSearch`` for HNSW, ``nprobe`` for IVF,
            ``rerank`` candidates re-scored per result on compressed layouts); saved with
            the file and restored on load. May be changed by the caller.
        tuning: how :meth:`build` chose ``params`` (target and measured recall@10, queries,
            seconds, memory budget); empty for exact layouts. Saved with the file.
    """

    dim: int
    layout: str
    params: dict[str, int]
    tuning: dict[str, Any]

    def __init__(self, index: faiss.Index, layout: str, slot_ids: np.ndarray,
                 dead: np.ndarray | None = None, params: dict[str, int] | None = None,
                 mmapped: bool = False, tuning: dict[str, Any] | None = None) -> None:
        """Wrap a FAISS index whose labels are slots. Use :meth:`build` or :meth:`load`."""
        self._index = index
        self.dim = int(index.d)
        self.layout = layout
        self._kind = _kind_of(index)
        self._slot_ids = np.ascontiguousarray(slot_ids, dtype=np.int64)
        self._dead = (np.zeros(len(self._slot_ids), dtype=bool) if dead is None
                      else np.ascontiguousarray(dead, dtype=bool))
        self._n_dead = int(self._dead.sum())
        self.params = dict(params) if params is not None else _default_params(index)
        self.tuning = dict(tuning or {})
        # A memory-mapped index is read-only: FAISS aborts the process on a resize, so it is
        # copied into owned memory before the first mutation.
        self._mmapped = mmapped
        self._lookup: tuple[np.ndarray, np.ndarray] | None = None
        self._live_bitmap: np.ndarray | None = None

    # -- construction -------------------------------------------------------------------

    @classmethod
    def build(cls, ids: np.ndarray, vectors: np.ndarray, dim: int,
              layout: str | None = None, *, max_memory: int | None = None,
              cross_queries: np.ndarray | None = None,
              target_recall: float | None = None) -> "VectorIndex":
        """Build an index over ``vectors`` (one row per id), then tune it.

        ``layout=None`` picks :func:`choose_layout` for the collection size and the memory
        budget ``max_memory`` (bytes). Layouts that need training (SQ, IVF, PQ) are trained
        on a fixed-seed sample of ``vectors``. Approximate layouts are then tuned: the
        smallest efSearch / nprobe (and re-rank depth) reaching ``target_recall`` (default
        :data:`TARGET_RECALL`) for a sample of ``vectors`` held out of the index until the
        tuning is done, and for ``cross_queries`` (vectors of the other modality, which
        search across the modality gap); see :attr:`tuning`.
        """
        ids, vectors = _check_batch(ids, vectors, dim)
        if len(np.unique(ids)) != len(ids):
            raise ValueError("duplicate ids in build()")
        if layout is None:
            # The spectrum only matters where a graph may be chosen.
            big = len(ids) * dim > FLAT_MAX_FLOATS
            reduced = reduced_dim(_sample(vectors, SPECTRUM_SAMPLE)) if big else None
            layout = choose_layout(len(ids), dim, max_memory, reduced=reduced)
        try:
            index = faiss.index_factory(dim, layout, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise ValueError(f"bad FAISS layout {layout!r}: {_first_line(exc)}") from None
        kind = _kind_of(index)  # rejects layouts we cannot filter/remove on
        if kind == "hnsw":
            _graph(index).hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        for opq in _transforms(index):
            if isinstance(opq, faiss.OPQMatrix):  # FAISS defaults: 210 CPU-s at d=512
                opq.niter, opq.max_train_points = OPQ_NITER, OPQ_TRAIN_POINTS
        if not index.is_trained:
            if len(ids) == 0:
                raise ValueError(f"layout {layout!r} needs training data; got no vectors")
            size = TRAIN_SAMPLE
            if kind == "ivf":  # k-means cost grows with the sample; ~64 points a list suffice
                size = min(size, max(IVF_MIN_PER_LIST * faiss.extract_index_ivf(index).nlist, 50_000))
            sample = _sample(vectors, size)
            try:
                for pca in _transforms(index):
                    if isinstance(pca, faiss.PCAMatrix):
                        # Project without centring: FAISS subtracts the mean, which would
                        # add a term per item to every inner product; uncentred, <Pq, Px>
                        # is <q, x> up to a constant per query and the residual's share.
                        # (Trained here, so the rest of the chain trains on what it gets.)
                        pca.train(sample)
                        faiss.copy_array_to_vector(np.zeros(pca.d_out, dtype=np.float32), pca.b)
                index.train(sample)
            except RuntimeError as exc:
                raise ValueError(f"cannot train {layout!r} on {len(sample)} vectors: "
                                 f"{_first_line(exc)}") from None
        if kind == "codes" or len(ids) < 2:
            if len(ids):
                index.add(vectors)
            return cls(index, layout, ids)
        # Approximate: hold a sample out, add the rest, tune with the sample as queries, then
        # add it. Stored vectors queried while in the index would overstate recall (a graph
        # node's own links are its neighbours), so the sample plays the future queries.
        rng = np.random.default_rng(TRAIN_SEED)
        held = np.sort(rng.choice(len(ids), min(TUNE_QUERIES, len(ids) // 10 or 1), replace=False))
        out = np.zeros(len(ids), dtype=bool)
        out[held] = True
        for start in range(0, len(ids), _ADD_CHUNK):  # chunked: no second copy of the vectors
            part = slice(start, start + _ADD_CHUNK)
            index.add(np.ascontiguousarray(vectors[part][~out[part]]))
        order = np.concatenate([np.flatnonzero(~out), held])  # slot -> row of ``vectors``
        built = cls(index, layout, ids[order[:len(ids) - len(held)]])
        built._tune(vectors, order, held, cross_queries, target_recall)
        if max_memory is not None:
            built.tuning["max_memory"] = int(max_memory)
        index.add(vectors[held])
        built._slot_ids = ids[order]
        built._dead = np.zeros(len(ids), dtype=bool)
        built._invalidate()
        return built

    def _tune(self, vectors: np.ndarray, order: np.ndarray, held: np.ndarray,
              cross_queries: np.ndarray | None, target_recall: float | None) -> None:
        """Pick the smallest efSearch (HNSW) or nprobe (IVF) reaching ``target_recall``.

        The index holds ``vectors[order[:len(self)]]``; the rows ``held`` out of it, plus
        ``cross_queries`` (other-modality vectors, capped to :data:`TUNE_QUERIES`), are the
        queries. Recall@10 is measured against exact search of the indexed rows (compressed
        layouts re-ranked with the exact vectors, as a search with ``exact`` is). The
        outcome goes to :attr:`params` and :attr:`tuning`.
        """
        target = TARGET_RECALL if target_recall is None else float(target_recall)
        if not 0 < target <= 1:
            raise ValueError(f"target recall must be in (0, 1], got {target}")
        started = time.perf_counter()
        rng = np.random.default_rng(TRAIN_SEED)
        cross = np.zeros((0, self.dim), np.float32)
        if cross_queries is not None and len(cross_queries):
            cross = np.ascontiguousarray(cross_queries, dtype=np.float32).reshape(-1, self.dim)
            if len(cross) > TUNE_QUERIES:
                cross = cross[np.sort(rng.choice(len(cross), TUNE_QUERIES, replace=False))]
        q = np.concatenate([vectors[held], cross])
        k = min(TUNE_K, len(self))
        # Exact top-k over the indexed rows: a few extra, minus the held-out rows.
        _, pos = faiss.knn(q, vectors, min(k + len(held), len(vectors)),
                           metric=faiss.METRIC_INNER_PRODUCT)
        slot_of = np.full(len(vectors), -1, dtype=np.int64)
        slot_of[order[:len(self)]] = np.arange(len(self))
        truth = _first_slots(slot_of[pos], k)  # held-out rows have no slot (-1)
        knob = "efSearch" if self._kind == "hnsw" else "nprobe"
        limit = MAX_EF_SEARCH if knob == "efSearch" else self._nlist()
        tried = [c for c in (EF_CANDIDATES if knob == "efSearch" else NPROBE_CANDIDATES)
                 if c < limit] + [limit]
        fetch = None
        if self.params.get("rerank") and not self._refined():
            def fetch(slots: np.ndarray) -> np.ndarray:
                return vectors[order[slots]]
        while True:
            lo, hi, best = 0, len(tried) - 1, (tried[-1], 0.0)
            while lo <= hi:  # recall grows with the knob: bisect for the smallest that suffices
                mid = (lo + hi) // 2
                self.params[knob] = tried[mid]
                got = _recall(self._search_slots(q, k, self._search_params(None), fetch)[1], truth)
                if got >= target or mid == len(tried) - 1:
                    best = (tried[mid], got)
                if got >= target:
                    hi = mid - 1
                else:
                    lo = mid + 1
            # Short codes may misorder the true neighbours out of the re-ranked candidates
            # however many lists are probed: then widen the candidate pool.
            rerank = self.params.get("rerank", 0)
            if best[1] >= target or not rerank or rerank * 2 > MAX_RERANK_FACTOR:
                break
            self.params["rerank"] = rerank * 2
        self.params[knob] = best[0]
        self.tuning = {"target_recall": target, "recall": round(best[1], 4),
                       "queries": len(held), "cross_queries": len(cross), "n": len(vectors),
                       "seconds": round(time.perf_counter() - started, 1)}

    def describe(self) -> dict[str, Any]:
        """Layout, search parameters and tuning outcome, for ``info``."""
        return {"layout": self.layout, "params": dict(self.params), "tuning": dict(self.tuning),
                "vectors": len(self), "tombstones": self._n_dead}

    # -- size and contents ----------------------------------------------------------------

    def __len__(self) -> int:
        """Number of live vectors (tombstoned ones excluded)."""
        return len(self._slot_ids) - self._n_dead

    def ids(self) -> np.ndarray:
        """Live ids, ascending (a copy), for syncing against SQLite."""
        return np.sort(self._slot_ids[~self._dead]) if self._n_dead else np.sort(self._slot_ids)

    @property
    def tombstones(self) -> int:
        """Removed vectors still occupying slots (graph/IVF layouts only)."""
        return self._n_dead

    # -- mutation -------------------------------------------------------------------------

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors; an id that is already present is replaced by its new vector."""
        ids, vectors = _check_batch(ids, vectors, self.dim)
        if len(ids) == 0:
            return
        if len(np.unique(ids)) != len(ids):
            raise ValueError("duplicate ids in add()")
        self.remove(ids)  # replace semantics; unknown ids are ignored
        self._materialize()
        self._index.add(vectors)
        self._slot_ids = np.concatenate([self._slot_ids, ids])
        self._dead = np.concatenate([self._dead, np.zeros(len(ids), dtype=bool)])
        self._invalidate()

    def remove(self, ids: np.ndarray) -> None:
        """Remove ids (unknown ones are ignored). Works for every layout.

        Exact layouts are compacted at once; graph/IVF layouts keep a tombstone per removed
        slot, filtered at search time, until :meth:`needs_rebuild` asks for a rebuild.
        """
        slots = np.unique(self._slots_of(np.asarray(ids, dtype=np.int64).reshape(-1)))
        if len(slots) == 0:
            return
        if self._kind == "codes":
            self._materialize()
            removed = self._index.remove_ids(faiss.IDSelectorBatch(slots))
            if removed != len(slots):  # would desynchronise the slot map
                raise RuntimeError(f"FAISS removed {removed} of {len(slots)} vectors")
            # IndexFlatCodes.remove_ids keeps the order of the survivors, like np.delete.
            self._slot_ids = np.delete(self._slot_ids, slots)
            self._dead = np.delete(self._dead, slots)
        else:
            self._dead[slots] = True
            self._n_dead += len(slots)
        self._invalidate()

    def needs_rebuild(self, keep_layout: bool = False) -> bool:
        """True when a rebuild from SQLite would give a better index.

        That is when the collection outgrew an exact layout, grew
        :data:`GROWTH_REBUILD_FACTOR` times over since an approximate one was tuned, shrank
        well below the threshold of an approximate one, or too many slots are tombstones.
        With `keep_layout` (a layout the user chose), only tombstones count.
        """
        n = len(self)
        if keep_layout:
            return self._n_dead > TOMBSTONE_REBUILD_FRACTION * max(len(self._slot_ids), 1)
        if _is_exact(self.layout) and not _is_exact(choose_layout(n, self.dim)):
            return True
        if n > GROWTH_REBUILD_FACTOR * self.tuning.get("n", math.inf):
            return True
        if not _is_exact(self.layout) and n * self.dim <= FLAT_MAX_FLOATS * SHRINK_HYSTERESIS:
            return True
        return self._n_dead > TOMBSTONE_REBUILD_FRACTION * max(len(self._slot_ids), 1)

    # -- search ---------------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None, *,
               exact: Callable[[np.ndarray], np.ndarray] | None = None, min_score: float | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by inner product for each query.

        Returns ``(scores, ids)`` of shape ``[q, k]`` (float32, int64), best first, padded
        with ``-inf`` / ``-1`` when fewer than ``k`` items qualify. A single query may be
        passed as a 1-D array (the result is still ``[1, k]``). ``allowed`` restricts the
        result to those ids; at least ``min(k, |allowed ∩ index|)`` results are returned.
        ``exact(ids) -> vectors`` (rows in the order of ``ids``) gives the exact vectors kept
        outside the index: compressed layouts re-rank ``params["rerank"] * k`` candidates
        with them and score small ``allowed`` sets exactly; other layouts ignore it. Results
        scoring below ``min_score`` are left out (padding).
        """
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q.reshape(1, -1)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be [q, {self.dim}], got {np.shape(queries)}")
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        k = int(k)
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        labels = np.full((len(q), k), -1, dtype=np.int64)
        if len(q) == 0 or len(self) == 0:
            return scores, labels

        slots, m, bitmap = None, len(self), self._live_bitmap_or_none()
        gather = False
        fetch = None
        if exact is not None and self.params.get("rerank") and not self._refined():
            def fetch(s: np.ndarray) -> np.ndarray:
                return np.asarray(exact(self._slot_ids[s]), dtype=np.float32).reshape(len(s), -1)
        if allowed is not None:
            slots = self._slots_of(np.asarray(allowed, dtype=np.int64).reshape(-1))
            if len(slots) <= ALLOWED_GATHER_MAX:
                slots = np.unique(slots)
                m = len(slots)
                gather = self._kind == "hnsw" or fetch is not None or self._refined()
            if len(slots) == 0:
                return scores, labels
            if not gather:
                # Dedup through the mask: O(n), far cheaper than sorting a big id list.
                mask = np.zeros(len(self._slot_ids), dtype=bool)
                mask[slots] = True
                bitmap = np.packbits(mask, bitorder="little")
                m = int(np.count_nonzero(mask))

        if gather:
            d, i = self._gathered(q, k, slots, fetch)
        else:
            # Selector over slots: the allowed ones, or the live ones when there are tombstones.
            sel = None if bitmap is None else faiss.IDSelectorBitmap(len(self._slot_ids),
                                                                     faiss.swig_ptr(bitmap))
            if self._kind == "codes":
                d, i = self._index.search(q, k, params=faiss.SearchParameters(sel=sel))
            elif slots is not None and self._scan_is_better(k, m):
                d, i = self._exact(q, k, sel)
            else:
                params = self._search_params(sel, m / len(self._slot_ids), k)
                d, i = self._search_slots(q, k, params, fetch)
                short = np.flatnonzero((i >= 0).sum(axis=1) < min(k, m))
                if len(short):
                    # The beam did not reach enough allowed/live items (filter far from the
                    # query): score those rows exactly so they still get k results.
                    d[short], i[short] = self._exact(q[short], k, sel, fetch)

        valid = (i >= 0) if min_score is None else (i >= 0) & (d >= min_score)
        scores[valid] = d[valid]
        labels[valid] = self._slot_ids[i[valid]]
        return scores, labels

    def _scan_is_better(self, k: int, m: int) -> bool:
        """Cost model for a filtered query on a graph or IVF layout (constants: module top)."""
        n = len(self._slot_ids)
        scan = SCAN_NS_PER_SLOT * n + SCAN_NS_PER_ALLOWED * m
        if self._kind != "hnsw":
            # Widened IVF probes are cheap but rank allowed items scattered over far lists by
            # their short codes; a Refine layout's float16 copy can be scanned exactly instead.
            return self._refined() and scan <= IVF_EXACT_SCAN_NS
        ef = max(self.params.get("efSearch", HNSW_EF_SEARCH), k, HNSW_EF_SEARCH)
        beam = BEAM_NS_PER_EF * min(max(ef * n / m, ef), max(MAX_EF_SEARCH, k))
        return scan <= EXACT_PREFERENCE * beam

    def _search_params(self, sel: faiss.IDSelector | None, share: float = 1.0, k: int = 1,
                       nprobe: int | None = None) -> faiss.SearchParameters:
        """Search params from :attr:`params`, widened by 1/share so a filtered beam still
        holds ~ef allowed items (HNSW) or probes enough lists (IVF); ``nprobe`` overrides."""
        # A filter (share < 1) widens from at least the untuned defaults: a tuned beam of
        # 16 or a single probe, divided by the share, misses allowed items that lie far
        # apart (clustered data, 10 % allowed: recall@10 0.88 / 0.40 at 100k).
        filtered = share < 1
        refs: list[Any] = [sel]
        if self._kind == "hnsw":
            ef = max(self.params.get("efSearch", HNSW_EF_SEARCH), k, HNSW_EF_SEARCH if filtered else 0)
            ef = min(max(math.ceil(ef / share), ef), max(MAX_EF_SEARCH, k))
            # A projection passes these on to the graph unchanged.
            params = faiss.SearchParametersHNSW(efSearch=ef, sel=sel)
        else:
            ivf = faiss.extract_index_ivf(self._index)
            if nprobe is None:
                floor = math.ceil(ivf.nlist * IVF_PROBE_FRACTION) if filtered else 1
                nprobe = math.ceil(max(self.params.get("nprobe", 1), floor) / share)
            nprobe = max(1, min(ivf.nlist, nprobe))
            params = faiss.SearchParametersIVF(nprobe=nprobe, sel=sel)
            if isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW):
                # The coarse graph's beam bounds how many good lists it can name.
                quantizer = faiss.SearchParametersHNSW(efSearch=max(nprobe, 32))
                params.quantizer_params = quantizer
                refs.append(quantizer)
        if self._refined():
            refs.append(params)
            params = faiss.IndexRefineSearchParameters(
                k_factor=float(self.params.get("rerank", RERANK_FACTOR)), base_index_params=params)
        params.referenced = refs  # SWIG holds raw pointers: keep the parts alive
        return params

    def _search_slots(self, q: np.ndarray, k: int, params: faiss.SearchParameters,
                      fetch: Callable[[np.ndarray], np.ndarray] | None
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-k slots; with ``fetch`` (slots -> exact vectors), the top
        ``rerank * k`` candidates re-scored exactly."""
        if fetch is None:
            return self._index.search(q, k, params=params)
        d, i = self._index.search(q, k * self.params.get("rerank", RERANK_FACTOR), params=params)
        return _rescored(q, i, k, fetch)

    def _refined(self) -> bool:
        return isinstance(faiss.downcast_index(self._index), faiss.IndexRefine)

    def _flat_codes(self) -> faiss.Index:
        """The codes that can be decoded or scanned by slot: an HNSW graph's storage, or a
        Refine layout's float16 copy."""
        index = faiss.downcast_index(self._index)
        return faiss.downcast_index(index.refine_index if self._refined() else index.storage)

    def _nlist(self) -> int:
        return int(faiss.extract_index_ivf(self._index).nlist)

    def _gathered(self, q: np.ndarray, k: int, slots: np.ndarray,
                  fetch: Callable[[np.ndarray], np.ndarray] | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores of a few slots: decode (or ``fetch``) just those rows instead of
        scanning them all."""
        vecs = fetch(slots) if fetch is not None else self._flat_codes().reconstruct_batch(slots)
        scores = q @ vecs.T
        kk = min(k, len(slots))
        top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, axis=1),
                                                 axis=1, kind="stable"), axis=1)
        d = np.full((len(q), k), -np.inf, dtype=np.float32)
        i = np.full((len(q), k), -1, dtype=np.int64)
        d[:, :kk] = np.take_along_axis(scores, top, axis=1)
        i[:, :kk] = slots[top]
        return d, i

    def _exact(self, q: np.ndarray, k: int, sel: faiss.IDSelector | None,
               fetch: Callable[[np.ndarray], np.ndarray] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Brute-force scan of the stored codes, restricted by ``sel`` (a Refine layout: its
        float16 copy; other IVF layouts: every list, re-ranked like any of their searches)."""
        if self._kind == "hnsw" or self._refined():
            return self._flat_codes().search(q, k, params=faiss.SearchParameters(sel=sel))
        return self._search_slots(q, k, self._search_params(sel, nprobe=self._nlist()), fetch)

    # -- persistence ----------------------------------------------------------------------

    def save(self, path: Path, generation: int) -> None:
        """Write the index atomically to ``path``, recording the store's ``generation``.

        The data goes to a temporary file in the same directory, is fsynced, then renamed
        over ``path``: a crash at any moment leaves the old or the new file, never a mix.
        Readers holding the old file memory-mapped keep a consistent view.
        """
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        meta_json = json.dumps({
            "layout": self.layout,
            "params": self.params,
            "ntotal": len(self._slot_ids),
            "faiss_version": faiss.__version__,
            "tuning": self.tuning,
        }, sort_keys=True).encode()
        meta = (meta_json + self._slot_ids.astype("<i8").tobytes()
                + np.packbits(self._dead, bitorder="little").tobytes())
        try:
            with open(tmp, "w+b") as f:
                state = {"crc": 0, "len": 0, "error": None}

                def sink(chunk: bytes) -> None:
                    try:
                        _write_bytes(f, chunk)
                        state["crc"] = zlib.crc32(chunk, state["crc"])
                        state["len"] += len(chunk)
                    except BaseException as exc:  # FAISS would replace it by a vague error
                        state["error"] = exc
                        raise

                try:  # streamed (no 2nd in-memory copy), checksummed on the way
                    faiss.write_index(self._index, faiss.PyCallbackIOWriter(sink))
                except RuntimeError:
                    if state["error"] is not None:
                        raise state["error"] from None
                    raise
                faiss_len = state["len"]
                f.flush()
                sample = _sample_crc(f, faiss_len)
                f.seek(faiss_len)
                _write_bytes(f, meta)
                head = _FOOTER.pack(_MAGIC, _FORMAT_VERSION, self.dim, int(generation), faiss_len,
                                    len(meta), len(meta_json), state["crc"], sample,
                                    zlib.crc32(meta), 0)
                _write_bytes(f, head[:-4] + struct.pack("<I", zlib.crc32(head[:-4])))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)

    @classmethod
    def load(cls, path: Path, dim: int, *, mmap: bool = True,
             verify: bool = False) -> tuple["VectorIndex", int]:
        """Load a file written by :meth:`save`; return ``(index, generation)``.

        Raises :class:`VectorFileDamaged` when the file is missing, truncated, corrupt or was
        built for another ``dim``; ``IndexTooNew`` when a newer mmsearch wrote it. With ``mmap`` (default) the vectors stay in the page cache
        (``IO_FLAG_MMAP_IFC``), so a query process starts fast; the first mutation copies
        them into private memory. Every load checks the footer, the metadata checksum and a
        sample of the FAISS payload; ``verify=True`` also checksums the whole payload.
        """
        path = Path(path)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < _FOOTER.size:
                    raise VectorFileDamaged(f"{path}: too short to be a vector file")
                f.seek(size - _FOOTER.size)
                footer = f.read(_FOOTER.size)
                (magic, version, fdim, generation, faiss_len, meta_len, json_len, faiss_crc,
                 sample, meta_crc, footer_crc) = _FOOTER.unpack(footer)
                if magic != _MAGIC or zlib.crc32(footer[:-4]) != footer_crc:
                    raise VectorFileDamaged(f"{path}: not a vector file or truncated")
                if version > _FORMAT_VERSION:  # a cache a newer mmsearch wrote: never rebuilt over
                    raise IndexTooNew(f"{path} was written by a newer mmsearch (vector format {version}, "
                                      f"this version reads up to {_FORMAT_VERSION}): upgrade mmsearch to use it")
                if version != _FORMAT_VERSION:
                    raise VectorFileDamaged(f"{path}: unknown format version {version}")
                if fdim != dim:
                    raise VectorFileDamaged(f"{path}: built for dim {fdim}, expected {dim}")
                if faiss_len + meta_len + _FOOTER.size != size or json_len > meta_len:
                    raise VectorFileDamaged(f"{path}: size does not match its footer")
                f.seek(faiss_len)
                meta = f.read(meta_len)
                if len(meta) != meta_len or zlib.crc32(meta) != meta_crc:
                    raise VectorFileDamaged(f"{path}: metadata checksum mismatch")
                if _sample_crc(f, faiss_len) != sample:
                    raise VectorFileDamaged(f"{path}: index data checksum mismatch")
                if verify:
                    f.seek(0)
                    crc, left = 0, faiss_len
                    while left:
                        chunk = f.read(min(_READ_CHUNK, left))
                        if not chunk:
                            break
                        crc, left = zlib.crc32(chunk, crc), left - len(chunk)
                    if left or crc != faiss_crc:
                        raise VectorFileDamaged(f"{path}: index data checksum mismatch")
        except FileNotFoundError:
            raise VectorFileDamaged(f"{path}: no vector file") from None
        except OSError as exc:
            raise VectorFileDamaged(f"{path}: cannot read vector file: {exc}") from None

        try:
            info = json.loads(meta[:json_len])
            layout, params, ntotal = str(info["layout"]), dict(info["params"]), int(info["ntotal"])
            tuning = dict(info.get("tuning") or {})
        except (ValueError, KeyError, TypeError):
            raise VectorFileDamaged(f"{path}: unreadable metadata") from None
        if json_len + 8 * ntotal + (ntotal + 7) // 8 != meta_len:
            raise VectorFileDamaged(f"{path}: metadata size mismatch")
        slot_ids = np.frombuffer(meta, dtype="<i8", count=ntotal, offset=json_len).astype(np.int64)
        bits = np.frombuffer(meta, dtype=np.uint8, offset=json_len + 8 * ntotal)
        dead = np.unpackbits(bits, count=ntotal, bitorder="little").astype(bool)

        flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if mmap else 0
        try:
            index = faiss.read_index(str(path), flags)
        except RuntimeError as exc:
            raise VectorFileDamaged(f"{path}: FAISS cannot read it: {_first_line(exc)}") from None
        if (index.d != dim or index.ntotal != ntotal or not index.is_trained
                or index.metric_type != faiss.METRIC_INNER_PRODUCT):
            raise VectorFileDamaged(f"{path}: FAISS index does not match its metadata")
        try:
            return cls(index, layout, slot_ids, dead, {k: int(v) for k, v in params.items()},
                       mmapped=mmap, tuning=tuning), int(generation)
        except ValueError as exc:
            raise VectorFileDamaged(f"{path}: {exc}") from None

    # -- internals ------------------------------------------------------------------------

    def _materialize(self) -> None:
        if self._mmapped:
            self._index = faiss.deserialize_index(faiss.serialize_index(self._index))
            self._mmapped = False

    def _invalidate(self) -> None:
        self._lookup = None
        self._live_bitmap = None

    def _slots_of(self, ids: np.ndarray) -> np.ndarray:
        """Slots of the live entries among ``ids`` (unknown/removed ids dropped).

        Duplicated ids give duplicated slots. SQLite row ids are dense, so the map is a
        plain array indexed by id (O(1) per id, a few bytes per possible id); sparse ids
        fall back to a binary search over the sorted live ids.
        """
        if len(ids) == 0 or len(self) == 0:
            return np.empty(0, dtype=np.int64)
        if self._lookup is None:
            live = np.flatnonzero(~self._dead) if self._n_dead else np.arange(len(self._slot_ids))
            live_ids = self._slot_ids[live]
            lo, hi = int(live_ids.min()), int(live_ids.max())
            if lo >= 0 and hi < DENSE_LOOKUP_FACTOR * len(live) + 65_536:
                table = np.full(hi + 1, -1, dtype=np.int64)
                table[live_ids] = live
                self._lookup = (table, None)
            else:
                order = np.argsort(live_ids, kind="stable")
                self._lookup = (live_ids[order], live[order])
        first, second = self._lookup
        if second is None:  # dense table: slot = table[id]
            ids = ids[(ids >= 0) & (ids < len(first))]
            slots = first[ids]
            return slots[slots >= 0]
        pos = np.minimum(np.searchsorted(first, ids), len(first) - 1)
        return second[pos[first[pos] == ids]]

    def _live_bitmap_or_none(self) -> np.ndarray | None:
        if self._n_dead == 0:
            return None
        if self._live_bitmap is None:
            self._live_bitmap = np.packbits(~self._dead, bitorder="little")
        return self._live_bitmap


def _sample(vectors: np.ndarray, size: int) -> np.ndarray:
    """A fixed-seed sample of at most ``size`` rows (all of them when there are fewer), so a
    rebuild of the same data trains the same index."""
    if len(vectors) <= size:
        return vectors
    rng = np.random.default_rng(TRAIN_SEED)
    return vectors[np.sort(rng.choice(len(vectors), size, replace=False))]


def _base(index: faiss.Index) -> faiss.Index:
    """The index searched first: ``index`` itself, or what its Refine stage re-scores."""
    index = faiss.downcast_index(index)
    return faiss.downcast_index(index.base_index) if isinstance(index, faiss.IndexRefine) else index


def _transforms(index: faiss.Index) -> list[faiss.VectorTransform]:
    """The transforms (PCA, OPQ) applied before the base index, in order."""
    base = _base(index)
    if not isinstance(base, faiss.IndexPreTransform):
        return []
    return [faiss.downcast_VectorTransform(base.chain.at(i)) for i in range(base.chain.size())]


def _graph(index: faiss.Index) -> faiss.IndexHNSW | None:
    """The HNSW graph of a graph layout (also behind a projection and a Refine stage)."""
    base = _base(index)
    if isinstance(base, faiss.IndexPreTransform):
        base = faiss.downcast_index(base.index)
    return base if isinstance(base, faiss.IndexHNSW) else None


def _kind_of(index: faiss.Index) -> str:
    """Classify a FAISS index: 'codes' (flat scan, compactable), 'hnsw' (also behind a
    projection and a Refine stage) or 'ivf' (also behind an OPQ/PCA transform or a Refine
    stage)."""
    if _graph(index) is not None:
        return "hnsw"
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexFlatCodes):
        return "codes"
    if isinstance(index, (faiss.IndexIVF, faiss.IndexPreTransform, faiss.IndexRefine)):
        try:
            faiss.extract_index_ivf(index)
            return "ivf"
        except RuntimeError:
            pass
    raise ValueError(f"unsupported FAISS layout {type(index).__name__}: "
                     "use Flat/SQ*, HNSW* or IVF* (optionally after OPQ, or with Refine)")


def _default_params(index: faiss.Index) -> dict[str, int]:
    kind = _kind_of(index)
    refined = isinstance(faiss.downcast_index(index), faiss.IndexRefine)
    if kind == "hnsw":
        params = {"efSearch": HNSW_EF_SEARCH}
        if refined:  # a graph over projected vectors: candidates re-scored from the copy
            params["rerank"] = GRAPH_RERANK_FACTOR
        return params
    if kind == "ivf":
        ivf = faiss.extract_index_ivf(index)
        params = {"nprobe": max(1, min(ivf.nlist, math.ceil(ivf.nlist * IVF_PROBE_FRACTION)))}
        # Lossy codes (PQ): re-rank candidates, from the Refine copy or from exact vectors.
        if refined:
            params["rerank"] = RERANK_FACTOR
        elif isinstance(faiss.downcast_index(ivf), (faiss.IndexIVFPQ, faiss.IndexIVFFastScan)):
            params["rerank"] = EXACT_RERANK_FACTOR
        return params
    return {}


def _rescored(q: np.ndarray, cand: np.ndarray, k: int,
              fetch: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Re-score candidate slots ``cand`` [q, c] (-1 = none) with exact vectors; top ``k``."""
    d = np.full((len(q), k), -np.inf, dtype=np.float32)
    i = np.full((len(q), k), -1, dtype=np.int64)
    valid = cand >= 0
    uniq, inverse = np.unique(cand[valid], return_inverse=True)
    if len(uniq) == 0:
        return d, i
    vecs = fetch(uniq)
    scores = np.full(cand.shape, -np.inf, dtype=np.float32)
    rows = np.nonzero(valid)[0]
    scores[valid] = np.einsum("ij,ij->i", q[rows], vecs[inverse])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(scores, order, axis=1)
    kk = top.shape[1]
    d[:, :kk], i[:, :kk] = top, np.where(np.isfinite(top), np.take_along_axis(cand, order, axis=1), -1)
    return d, i


def _first_slots(found: np.ndarray, k: int) -> np.ndarray:
    """First ``k`` slots (>= 0) of each row of ``found``, padded with -1."""
    out = np.full((len(found), k), -1, dtype=np.int64)
    for r, row in enumerate(found):
        row = row[row >= 0][:k]
        out[r, :len(row)] = row
    return out


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Share of ``truth`` (-1 = no item) that ``found`` holds, over all rows."""
    hits = sum(len(np.intersect1d(f[f >= 0], t[t >= 0])) for f, t in zip(found, truth))
    return hits / max(int((truth >= 0).sum()), 1)


def _check_batch(ids: np.ndarray, vectors: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.size == 0 and len(ids) == 0:
        return ids, vectors.reshape(0, dim)
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise ValueError(f"vectors must be [n, {dim}], got {vectors.shape}")
    if len(ids) != len(vectors):
        raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
    return ids, vectors


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__

"""Near-duplicate images: groups of stored vectors whose cosine similarity reaches a threshold.

The automatic FAISS layouts (HNSW) have no range search, so pairs are found by an exact,
blocked matrix product over the stored vectors (tiles of TILE_ROWS × TILE_COLS scores, upper
triangle only, so memory stays bounded at any index size) and joined into groups by a
vectorized union-find. Groups are reported, never acted on: nothing is deleted or moved.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import BadQuery

if TYPE_CHECKING:
    from .stores import Storage

#: Default cosine similarity from which two images count as near-duplicates.
DEFAULT_THRESHOLD = 0.95

#: Rows and columns of one tile of the score matrix (64 MB of float32 scores).
TILE_ROWS = 2048
TILE_COLS = 8192


def similar_pairs(vectors: np.ndarray, threshold: float) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Row-index pairs (i < j) whose inner product is at least `threshold`, one tile at a time."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n = len(vectors)
    for r0 in range(0, n, TILE_ROWS):
        rows = vectors[r0 : r0 + TILE_ROWS]
        for c0 in range(r0, n, TILE_COLS):
            scores = rows @ vectors[c0 : c0 + TILE_COLS].T
            i, j = np.nonzero(scores >= threshold)
            i, j = i + r0, j + c0
            upper = i < j  # each pair once, and never an item with itself
            if upper.any():
                yield i[upper], j[upper]


def _roots(parent: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    """The root of each node (following parent links until they stop changing)."""
    roots = parent[nodes]
    while True:
        up = parent[roots]
        if np.array_equal(up, roots):
            return roots
        roots = up


def union(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Join the sets of each pair (a[k], b[k]) in the union-find forest `parent` (in place).

    Each round hooks the larger of two differing roots under the smaller; np.minimum.at settles
    several pairs hooking the same root, and the rounds repeat until every pair shares a root.
    """
    while len(a):
        ra, rb = _roots(parent, a), _roots(parent, b)
        differ = ra != rb
        a, b, ra, rb = a[differ], b[differ], ra[differ], rb[differ]
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))


def group_rows(vectors: np.ndarray, threshold: float) -> list[np.ndarray]:
    """Row indices of each group of two or more rows linked by similarities ≥ `threshold`
    (transitively: a chain of near-duplicates is one group), in order of their first row."""
    parent = np.arange(len(vectors), dtype=np.int64)
    for a, b in similar_pairs(vectors, threshold):
        union(parent, a, b)
        parent[:] = _roots(parent, parent)  # path compression: later lookups take one step
    roots = _roots(parent, np.arange(len(vectors)))
    order = np.argsort(roots, kind="stable")
    bounds = np.flatnonzero(np.diff(roots[order])) + 1
    return [g for g in np.split(order, bounds) if len(g) > 1]


@dataclass(frozen=True)
class Member:
    """One image of a duplicate group; `copy_of` names a larger member with the same content, if any."""

    id: int
    path: str
    width: int | None
    height: int | None
    sha256: str
    copy_of: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"path": self.path, "width": self.width, "height": self.height, "copy_of": self.copy_of,
                "id": self.id}


@dataclass(frozen=True)
class Group:
    """Near-identical images, largest (most pixels) first."""

    members: list[Member] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: members, with exact copies marked by `copy_of`."""
        return {"members": [m.to_dict() for m in self.members],
                "exact_copies": sum(m.copy_of is not None for m in self.members)}


def image_size(path: str) -> tuple[int | None, int | None]:
    """(width, height) as shown, as the index stores it (`images.read_metadata`: the header only, no pixels
    decoded); None if unreadable."""
    from .images import read_metadata

    try:
        meta = read_metadata(path)
    except Exception:  # noqa: BLE001 - a file gone or damaged since indexing still belongs to its group
        return None, None
    return meta.width, meta.height


def describe(rows: Sequence[tuple[int, str, str, int | None, int | None]]) -> Group:
    """A group from (id, path, sha256, width, height) rows: ordered by resolution (then path), exact
    copies marked. A size not stored (a file of an index built before 0003) is read from its header."""
    sized = [(i, path, sha, *((w, h) if w is not None and h is not None else image_size(path)))
             for i, path, sha, w, h in rows]
    sized.sort(key=lambda r: (-((r[3] or 0) * (r[4] or 0)), r[1]))
    first: dict[str, str] = {}
    members = []
    for i, path, sha, width, height in sized:
        members.append(Member(i, path, width, height, sha, first.get(sha)))
        first.setdefault(sha, path)
    return Group(members)


def find_duplicates(storage: Storage, threshold: float = DEFAULT_THRESHOLD, model: str | None = None) -> list[Group]:
    """Groups of near-identical images in the index (cosine ≥ `threshold` under the model of key
    `model`, None: the default), biggest group first.

    Reads the stored vectors (the database, not the approximate FAISS layout) and the stored pixel
    sizes; a file is opened (its header only) only where its size is not stored. Reports only:
    nothing is changed.
    """
    if not 0.0 < threshold <= 1.0:  # NaN fails this too
        raise BadQuery(f"threshold must be a cosine similarity in (0, 1], not {threshold}")
    if storage.manifest() is None:
        return []
    chunks = list(storage.reader.vectors("image", model=model))
    if not chunks:
        return []
    ids = np.concatenate([c[0] for c in chunks])
    vectors = np.concatenate([c[1] for c in chunks])
    groups = [ids[rows] for rows in group_rows(vectors, threshold - 1e-6)]  # float32 rounding of exact copies
    members = np.concatenate(groups) if groups else np.zeros(0, np.int64)
    files, sizes = storage.reader.item_files(members), storage.reader.image_sizes(members)
    out = [describe([(int(i), *files[int(i)], *sizes.get(int(i), (None, None))) for i in group if int(i) in files])
           for group in groups]
    out = [g for g in out if len(g.members) > 1]
    out.sort(key=lambda g: (-len(g.members), g.members[0].path))
    return out

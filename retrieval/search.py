"""Queries: text, image or vector in; ranked items (cosine similarity) out.

Works on an index's `Storage` (the vector sets to search, the metadata store for the rows)
and the embedding functions it is handed; it knows nothing of where those come from.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import BadQuery, EmptyIndex

if TYPE_CHECKING:
    from PIL import Image

    from .stores import Storage

#: Text → unit vector (the caller's choice of encoder and cache), and images → unit vectors.
EmbedText = Callable[[str], np.ndarray]
EmbedImages = Callable[[Sequence["Image.Image"]], np.ndarray]

#: --target value → item kinds searched.
TARGETS = {"images": ("image",), "texts": ("text",), "all": ("image", "text")}


@dataclass(frozen=True)
class Result:
    """One ranked item; `score` is the cosine similarity to the query."""

    rank: int
    score: float
    kind: str
    path: str
    text: str | None = None
    line: int | None = None
    id: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (texts carry `text` and `line`, images neither)."""
        data = asdict(self)
        if self.kind == "image":
            data.pop("text")
            data.pop("line")
        return data


def query_vector(query: str | Path | Image.Image | np.ndarray, dim: int, embed_text: EmbedText,
                 embed_images: EmbedImages) -> tuple[np.ndarray, str]:
    """The unit query vector (of the index's dimension `dim`), and the default target ('images'
    for text, 'texts' for an image)."""
    if isinstance(query, np.ndarray):
        vec = np.asarray(query, dtype=np.float32).reshape(-1)
        if vec.shape[0] != dim:
            raise BadQuery(f"query vector has dimension {vec.shape[0]}, the index {dim}")
        norm = float(np.linalg.norm(vec))
        if not np.isfinite(norm) or norm == 0:
            raise BadQuery("query vector is zero or not finite")
        return vec / norm, "all"
    if isinstance(query, str):
        if not query.strip():
            raise BadQuery("empty query text")
        return embed_text(query), "images"
    if isinstance(query, Path):
        from .images import describe_error, open_image

        try:
            image = open_image(str(query))
        except FileNotFoundError:
            raise BadQuery(f"query image not found: {query}") from None
        except Exception as exc:  # noqa: BLE001 - any decoder error means an unusable query image
            raise BadQuery(f"cannot read query image {query}: {describe_error(exc)}") from None
        return embed_images([image])[0], "texts"
    return embed_images([query])[0], "texts"


def search(storage: Storage, query: str | Path | Image.Image | np.ndarray, *, embed_text: EmbedText,
           embed_images: EmbedImages, k: int = 10, target: str | None = None, min_score: float | None = None,
           under: str | Path | None = None) -> list[Result]:
    """Rank the index's items against a text, image (Path or PIL image) or vector query.

    `embed_text` and `embed_images` turn a query into a vector with the index's model.
    `target` is 'images', 'texts' or 'all' (default: the other modality); `under` keeps only
    items whose file lies in that folder, still returning `k` when enough exist.
    """
    if k < 1:
        raise BadQuery("k must be at least 1")
    if target is not None and target not in TARGETS:
        raise BadQuery(f"unknown target {target!r}: use images, texts or all")
    if min_score is not None and not -1.0 <= min_score <= 1.0:  # NaN fails this too
        raise BadQuery(f"min-score must be a cosine similarity between -1 and 1, not {min_score}")
    manifest = storage.manifest()
    present = storage.reader.kinds() if manifest is not None else set()
    if manifest is None or not present:
        raise EmptyIndex(f"index {storage.location} is empty: run `mmsearch index PATH` first")
    vec, default_target = query_vector(query, manifest.dim, embed_text, embed_images)
    kinds = [kind for kind in TARGETS[target or default_target] if kind in present]
    if not kinds:
        wanted = target or default_target
        counts = storage.reader.counts()
        raise EmptyIndex(f"the index holds no {wanted} to search ({counts.get('image', 0)} images, "
                         f"{counts.get('text', 0)} texts): try --target all")
    folder = os.path.abspath(os.path.expanduser(str(under))) if under else None
    found: list[tuple[float, Any]] = []
    for kind in kinds:
        found.extend(_search_kind(storage, kind, vec, k, folder))
    found.sort(key=lambda pair: -pair[0])
    results = []
    for score, row in found:
        if min_score is not None and score < min_score:
            break
        if len(results) == k:
            break
        results.append(Result(len(results) + 1, round(score, 6), row.kind, row.path,
                              row.text, row.line if row.kind == "text" else None, row.id))
    return results


def _search_kind(storage: Storage, kind: str, vec: np.ndarray, k: int, folder: str | None) -> list[tuple[float, Any]]:
    index = storage.vector_set(kind)
    allowed = storage.reader.ids_under(folder, kind) if folder else None
    if allowed is not None and not len(allowed):
        return []
    fetch = k
    while True:
        scores, ids = index.search(vec[None, :], fetch, allowed)
        pairs = [(float(s), int(i)) for s, i in zip(scores[0], ids[0]) if i >= 0]
        rows = storage.reader.items(i for _, i in pairs)
        # The store is the truth: an id the cache still holds but the store dropped is skipped.
        hits = [(s, rows[i]) for s, i in pairs if i in rows]
        if len(hits) >= k or len(pairs) < fetch:
            return hits[:k]
        fetch *= 4

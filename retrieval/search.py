"""Queries: text, image or vector in; ranked items (cosine similarity) out.

Works on a `Searcher`: an index's `Storage` (the vector sets to search, the metadata store for
the rows) and the embedding functions it is handed; it knows nothing of where those come from.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .calibrate import AUTO_RELEVANCE, Calibration, load_sample, sample_path
from .compose import exclusion, query_of
from .errors import BadQuery, EmptyIndex
from .filters import Filters, parse_filters

if TYPE_CHECKING:
    from PIL import Image

    from .stores import Storage

#: Text → unit vector (the caller's choice of encoder and cache), and images → unit vectors.
EmbedText = Callable[[str], np.ndarray]
EmbedImages = Callable[[Sequence["Image.Image"]], np.ndarray]

#: --target value → item kinds searched.
TARGETS = {"images": ("image",), "texts": ("text",), "all": ("image", "text")}


@dataclass(frozen=True)
class Searcher:
    """What a query needs: the index's storage, the model searched (its key; None: the index's default)
    and that model's embedding functions."""

    storage: Storage
    embed_text: EmbedText
    embed_images: EmbedImages
    model: str | None = None


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
    #: Standard deviations above the query's mean score over the index (see `calibrate`).
    relevance: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (texts carry `text` and `line`, images neither)."""
        data = asdict(self)
        if self.kind == "image":
            data.pop("text")
            data.pop("line")
        return data


def query_vector(searcher: Searcher, query: str | Path | Image.Image | np.ndarray) -> tuple[np.ndarray, str]:
    """The unit query vector, and the default target ('images' for text, 'texts' for an image)."""
    if isinstance(query, np.ndarray):
        vec = np.asarray(query, dtype=np.float32).reshape(-1)
        manifest = searcher.storage.manifest(searcher.model)
        dim = manifest.dim if manifest else len(vec)
        if vec.shape[0] != dim:
            raise BadQuery(f"query vector has dimension {vec.shape[0]}, the index {dim}")
        norm = float(np.linalg.norm(vec))
        if not np.isfinite(norm) or norm == 0:
            raise BadQuery("query vector is zero or not finite")
        return vec / norm, "all"
    if isinstance(query, str):
        if not query.strip():
            raise BadQuery("empty query text")
        return searcher.embed_text(query), "images"
    if isinstance(query, Path):
        from .images import describe_error, open_image

        try:
            image = open_image(str(query))
        except FileNotFoundError:
            raise BadQuery(f"query image not found: {query}") from None
        except Exception as exc:  # noqa: BLE001 - any decoder error means an unusable query image
            raise BadQuery(f"cannot read query image {query}: {describe_error(exc)}") from None
        return searcher.embed_images([image])[0], "texts"
    return searcher.embed_images([query])[0], "texts"


def search(searcher: Searcher, query: Any, *, k: int = 10, target: str | None = None,
           min_score: float | str | None = None, under: str | Path | None = None, add: Sequence[str] = (),
           subtract: Sequence[str] = (), exclude: Sequence[str] = (), within: float | None = None,
           collapse: float | None = None, after: str | None = None, before: str | None = None,
           camera: str | None = None, ext: str | Sequence[str] | None = None,
           min_size: str | None = None) -> list[Result]:
    """Rank the index's items against a text, image (Path or PIL image) or vector query.

    `query` may also be a list of texts and images: with `add` and `subtract` ("text" or
    "text::weight") they make one vector, normalize(mean(images) + Σ w·texts + Σ w·add − Σ w·subtract)
    (see `compose`). `exclude`: drop every item that matches one of these texts better than the
    query, still returning `k` when `k` pass. `target` is 'images', 'texts' or 'all' (default: images
    for a query with text, else the other modality); `under` keeps only items whose file lies in
    that folder, still returning `k` when enough exist. Cut-offs: `min_score` a cosine, or 'auto'
    (relevance at least `calibrate.AUTO_RELEVANCE`); `within` keeps results scoring at most that
    much below the best one. `collapse`: hide a result whose cosine to one ranked above reaches it.
    Filters on what indexing read of each file (see `filters.parse_filters`): `after`/`before` (ISO
    dates, on the capture time), `camera`, `ext` ("jpg,png"), `min_size` ("800x600"); like `under`
    they restrict the search itself, so `k` results come back whenever `k` items pass.
    """
    if k < 1:
        raise BadQuery("k must be at least 1")
    if target is not None and target not in TARGETS:
        raise BadQuery(f"unknown target {target!r}: use images, texts or all")
    auto = isinstance(min_score, str)
    if auto and min_score != "auto":
        raise BadQuery(f"min-score must be a number or 'auto', not {min_score!r}")
    if not auto and min_score is not None and not -1.0 <= min_score <= 1.0:  # NaN fails this too
        raise BadQuery(f"min-score must be a cosine similarity between -1 and 1, not {min_score}")
    if within is not None and not 0.0 <= within <= 2.0:
        raise BadQuery(f"within must be a score difference between 0 and 2, not {within}")
    if collapse is not None and not 0.0 < collapse <= 1.0:
        raise BadQuery(f"collapse threshold must be a cosine similarity in (0, 1], not {collapse}")
    filters = parse_filters(after=after, before=before, camera=camera, ext=ext, min_size=min_size)
    storage = searcher.storage
    present = storage.reader.kinds() if storage.manifest() is not None else set()
    if not present:
        raise storage.empty_index_error()
    vec, default_target = query_of(searcher, query, add, subtract)
    kinds = [kind for kind in TARGETS[target or default_target] if kind in present]
    if not kinds:
        wanted = target or default_target
        counts = storage.reader.counts()
        raise EmptyIndex(f"the index holds no {wanted} to search ({counts.get('image', 0)} images, "
                         f"{counts.get('text', 0)} texts): try --target all")
    folder = os.path.abspath(os.path.expanduser(str(under))) if under else None
    found: list[tuple[float, Any, float]] = []
    for kind in kinds:
        key = storage.key(kind, searcher.model)
        calibration = Calibration(load_sample(storage.reader, sample_path(storage.cache_dir, key.name(storage.model())),
                                              kind, searcher.model), vec)
        keep = exclusion(searcher, kind, vec, exclude, collapse, k)
        found.extend((score, row, calibration.relevance(score))
                     for score, row in _search_kind(storage, kind, vec, k, folder, keep, filters, searcher.model))
    found.sort(key=lambda hit: -hit[0])
    floor = max(min_score if not auto and min_score is not None else -math.inf,
                found[0][0] - within if found and within is not None else -math.inf)
    results = []
    for score, row, relevance in found:
        if score < floor or len(results) == k:
            break
        if auto and relevance < AUTO_RELEVANCE:
            continue  # relevance is per kind: with --target all it need not fall with the score
        results.append(Result(len(results) + 1, round(score, 6), row.kind, row.path, row.text,
                              row.line if row.kind == "text" else None, row.id, round(relevance, 3)))
    return results


def _stored(storage: Storage, kind: str, ids: np.ndarray, model: str | None = None) -> np.ndarray:
    """Exact vectors of `ids` (of model `model`) from the metadata store, in that order (zeros for ids
    it lacks), for layouts that re-rank compressed candidates with them."""
    manifest = storage.manifest(model)
    out = np.zeros((len(ids), manifest.dim if manifest else 0), dtype=np.float32)
    order = np.argsort(ids)
    for got, vecs in storage.reader.vectors(kind, ids, model):
        out[order[np.searchsorted(ids, got, sorter=order)]] = vecs
    return out


def _search_kind(storage: Storage, kind: str, vec: np.ndarray, k: int, folder: str | None,
                 keep: Callable[[list[tuple[float, Any]]], list[tuple[float, Any]]] | None = None,
                 filters: Filters | None = None, model: str | None = None) -> list[tuple[float, Any]]:
    index = storage.vector_set(kind, model)
    if filters:
        allowed = storage.reader.ids_filtered(kind, folder, filters)
    else:
        allowed = storage.reader.ids_under(folder, kind) if folder else None
    if allowed is not None and not len(allowed):
        return []
    fetch = k
    while True:
        scores, ids = index.search(vec[None, :], fetch, allowed,
                                    exact=lambda want: _stored(storage, kind, want, model))
        pairs = [(float(s), int(i)) for s, i in zip(scores[0], ids[0]) if i >= 0]
        rows = storage.reader.items(i for _, i in pairs)
        # The store is the truth: an id the cache still holds but the store dropped is skipped.
        hits = [(s, rows[i]) for s, i in pairs if i in rows]
        if keep is not None:  # --not / --collapse: fetch more until k pass or the index is exhausted
            hits = keep(hits)
        if len(hits) >= k or len(pairs) < fetch:
            return hits[:k]
        fetch *= 4

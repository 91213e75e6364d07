"""Combined queries: several texts and images turned into one query vector by weighted vector arithmetic.

The formula (every `e(·)` is a unit-length embedding, every weight `w` defaults to 1):

    q = normalize( mean(e(image_1), …, e(image_m)) + Σ w_t·e(text_t) + Σ w_a·e(add_a) − Σ w_s·e(subtract_s) )

The images of a query count as one part (their mean), so several images are averaged and an
image with a text ("this picture, but in winter") moves the picture towards the text. A text's
weight is written as a trailing `::WEIGHT` ("sunset::0.5"); it is parsed only when a number
follows, so "a::b" stays the text "a::b". With no add/subtract parts the result is the plain
query's own vector.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import BadQuery

if TYPE_CHECKING:
    from .search import Searcher
    from .stores import MetadataReader

#: "text::number" at the end of a query part; the number is any float literal.
_WEIGHTED = re.compile(r"^(?P<text>.*?)::(?P<weight>[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*$", re.DOTALL)


def parse_weight(part: str) -> tuple[str, float]:
    """Split "text::0.5" into ("text", 0.5); a part without a trailing number has weight 1.

    BadQuery for an empty text or a weight that is not finite.
    """
    match = _WEIGHTED.match(part)
    text, weight = (match["text"], float(match["weight"])) if match else (part, 1.0)
    if not text.strip():
        raise BadQuery(f"empty query text in {part!r}")
    if not math.isfinite(weight):
        raise BadQuery(f"query weight must be a finite number, not {match['weight'] if match else weight}")
    return text, weight


def combine(add: Sequence[tuple[np.ndarray, float]], subtract: Sequence[tuple[np.ndarray, float]] = ()) -> np.ndarray:
    """normalize(Σ w·add − Σ w·subtract) over (vector, weight) pairs: the unit query vector.

    BadQuery when the parts cancel out (a zero vector has no direction to search in).
    """
    if not add:
        raise BadQuery("a query needs a text or an image to add to")
    vec = np.zeros(len(add[0][0]), dtype=np.float64)
    for part, weight in add:
        vec += weight * np.asarray(part, dtype=np.float64)
    for part, weight in subtract:
        vec -= weight * np.asarray(part, dtype=np.float64)
    norm = float(np.linalg.norm(vec))
    if not math.isfinite(norm) or norm < 1e-6:
        raise BadQuery("the query parts cancel out (their weighted sum is zero): change a weight or a part")
    return (vec / norm).astype(np.float32)


def weighted_texts(parts: Sequence[str], embed: Callable[[str], np.ndarray]) -> list[tuple[np.ndarray, float]]:
    """(unit embedding, weight) of each "text[::weight]" part, each embedded by `embed` (cached per text)."""
    out = []
    for part in parts:
        text, weight = parse_weight(part)
        out.append((embed(text), weight))
    return out


def mean_vector(vectors: Sequence[np.ndarray]) -> np.ndarray:
    """The mean of unit vectors (several query images count as one part)."""
    return np.mean(np.stack([np.asarray(v, dtype=np.float32) for v in vectors]), axis=0)


def query_of(searcher: Searcher, query: Any, add: Sequence[str] = (),
             subtract: Sequence[str] = ()) -> tuple[np.ndarray, str]:
    """The unit query vector of a query (a text, image, vector, or a list of texts and images combined
    with `add`/`subtract` by the module's formula), and its default target.

    Texts target images; images alone (and vectors alone) keep `search.query_vector`'s default.
    """
    from .search import query_vector

    parts = list(query) if isinstance(query, (list, tuple)) else [query]
    if not parts:
        raise BadQuery("empty query: give a text, an image or both")
    if len(parts) == 1 and not isinstance(parts[0], str) and not add and not subtract:
        return query_vector(searcher, parts[0])  # one image or vector: the plain query
    embed = functools.partial(_text_vector, searcher)
    texts = weighted_texts([p for p in parts if isinstance(p, str)], embed)
    images = [query_vector(searcher, p) for p in parts if not isinstance(p, str)]
    pictured = [(mean_vector([vec for vec, _ in images]), 1.0)] if images else []
    vec = combine([*pictured, *texts, *weighted_texts(add, embed)], weighted_texts(subtract, embed))
    return vec, "images" if texts else images[0][1]


def _text_vector(searcher: Searcher, text: str) -> np.ndarray:
    from .search import query_vector

    return query_vector(searcher, text)[0]


def exclusion(searcher: Searcher, kind: str, query: np.ndarray, avoid: Sequence[str], collapse: float | None,
              k: int) -> Callable[[list[tuple[float, Any]]], list[tuple[float, Any]]] | None:
    """A filter over ranked (score, row) hits, or None when nothing is to be filtered.

    It drops a hit whose stored vector is closer to one of the `avoid` texts than to `query`
    (cos(item, avoid) > cos(item, query)) and, with `collapse`, a hit whose cosine to a hit kept
    before it reaches `collapse` (one result per group of near-duplicates); it stops at `k` kept.
    """
    if not avoid and collapse is None:
        return None
    avoided = np.stack([_text_vector(searcher, text) for text in avoid]) if avoid else None

    def keep(hits: list[tuple[float, Any]]) -> list[tuple[float, Any]]:
        vectors = item_vectors(searcher.storage.reader, kind, [row.id for _, row in hits], searcher.model)
        kept: list[tuple[float, Any]] = []
        shown: list[np.ndarray] = []
        for hit in hits:
            vec = vectors[hit[1].id]
            if avoided is not None and float(np.max(avoided @ vec)) > float(vec @ query):
                continue
            if collapse is not None and shown and float(np.max(np.stack(shown) @ vec)) >= collapse:
                continue
            kept.append(hit)
            shown.append(vec)
            if len(kept) == k:
                break
        return kept

    return keep


def item_vectors(reader: MetadataReader, kind: str, ids: Sequence[int], model: str | None = None) -> dict[int, np.ndarray]:
    """Stored vectors of these item ids under `model` (None: the default), by id (read from the database, the truth)."""
    out: dict[int, np.ndarray] = {}
    for chunk_ids, vecs in reader.vectors(kind, np.asarray(ids, dtype=np.int64), model):
        out.update(zip(chunk_ids.tolist(), vecs))
    return out

"""Queries: text, image or vector in; ranked items (cosine similarity) out.

Works on a `Searcher`: an index's `Storage` (the vector sets to search, the metadata store for
the rows) and the embedding functions it is handed; it knows nothing of where those come from.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .calibrate import AUTO_RELEVANCE, Calibration, load_sample, sample_path
from .compose import exclusion, item_vectors, query_of
from .errors import BadQuery, EmptyIndex
from .filters import Filters, parse_filters
from .records import ItemRow
from .words import fuse, query_terms, ranks

if TYPE_CHECKING:
    from PIL import Image

    from .stores import MetadataReader, Storage

#: Text → unit vector (the caller's choice of encoder and cache), and images → unit vectors.
EmbedText = Callable[[str], np.ndarray]
EmbedImages = Callable[[Sequence["Image.Image"]], np.ndarray]
#: A filter over ranked (score, row) hits (`compose.exclusion`).
Keep = Callable[[list[tuple[float, Any]]], list[tuple[float, Any]]]

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
    #: Where each ranking run placed it, from 1 ("semantic": by cosine, "words": by its words); None: not in it.
    ranks: dict[str, int | None] = field(default_factory=dict)
    #: Its full-text score where the words ranking holds it (higher is better; SQLite: −bm25).
    words_score: float | None = None
    #: Its reciprocal rank fusion score, in a hybrid ranking (see `words`).
    fused: float | None = None
    #: Its capture time, the camera's local time (ISO; with its UTC offset where known), with sort='date'.
    taken: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (texts carry `text` and `line`, images neither; the words and date fields
        only where they apply)."""
        data = asdict(self)
        if self.kind == "image":
            data.pop("text")
            data.pop("line")
        for name in ("words_score", "fused", "taken"):
            if data[name] is None:
                data.pop(name)
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
           min_size: str | None = None, mode: str = "hybrid", words: str | None = None,
           sort: str = "score") -> list[Result]:
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

    `mode`: 'hybrid' fuses the meaning ranking with the ranking of the items whose words (name,
    folders, EXIF, OCR text; see `words`) match the query's by reciprocal rank fusion, and is the
    meaning ranking alone when no words match; 'semantic' and 'words' use one ranking. Everything
    else applies in every mode: the cut-offs to each result's cosine, filters and `under` to both
    rankings, `exclude` and `collapse` to the results. `words`: the text matched against the words (default: the query's texts). `sort`:
    'score' (the ranking) or 'date' (the results by capture time, oldest first, undated last).
    Every result's `score` is its cosine; `ranks` says where each ranking placed it.
    """
    if k < 1:
        raise BadQuery("k must be at least 1")
    if target is not None and target not in TARGETS:
        raise BadQuery(f"unknown target {target!r}: use images, texts or all")
    if mode not in MODES:
        raise BadQuery(f"unknown mode {mode!r}: use {', '.join(MODES)}")
    if sort not in SORTS:
        raise BadQuery(f"unknown sort {sort!r}: use {' or '.join(SORTS)}")
    auto = isinstance(min_score, str)
    if auto and min_score != "auto":
        raise BadQuery(f"min-score must be a number or 'auto', not {min_score!r}")
    if not auto and min_score is not None and not -1.0 <= min_score <= 1.0:  # NaN fails this too
        raise BadQuery(f"min-score must be a cosine similarity between -1 and 1, not {min_score}")
    if within is not None and not 0.0 <= within <= 2.0:
        raise BadQuery(f"within must be a score difference between 0 and 2, not {within}")
    if collapse is not None and not 0.0 < collapse <= 1.0:
        raise BadQuery(f"collapse threshold must be a cosine similarity in (0, 1], not {collapse}")
    text = words if words is not None else " ".join(p for p in (query if isinstance(query, (list, tuple)) else [query])
                                                    if isinstance(p, str))
    if mode == "words" and not query_terms(text):
        raise BadQuery("a words-only query needs a text with letters or digits")
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
    ranking = _Ranking(searcher, kinds, vec, text,
                       folder=os.path.abspath(os.path.expanduser(str(under))) if under else None,
                       filters=filters, min_score=min_score, within=within, exclude=exclude, collapse=collapse)
    if mode == "semantic" or (mode == "hybrid" and not ranking.words(max(k, FUSION_DEPTH))):
        results = [Result(n, round(score, 6), row.kind, row.path, row.text, row.line if row.kind == "text" else None,
                          row.id, round(relevance, 3), {"semantic": n})
                   for n, (score, row, relevance) in enumerate(ranking.semantic(k, keep=True), 1)]
    else:
        results = ranking.fused(k, mode)
    return by_date(storage.reader, results) if sort == "date" else results


#: How a query may rank: fused, by meaning alone, by words alone.
MODES = ("hybrid", "semantic", "words")
#: How results are ordered: by the ranking, or by capture time.
SORTS = ("score", "date")
#: Candidates each ranking contributes to a fusion, at least (more when k is larger).
FUSION_DEPTH = 50


class _Ranking:
    """The two rankings of one query (by meaning: `vec`; by words: `text`) under its filters, and their fusion."""

    def __init__(self, searcher: Searcher, kinds: Sequence[str], vec: np.ndarray, text: str, *, folder: str | None,
                 filters: Filters, min_score: float | str | None, within: float | None, exclude: Sequence[str],
                 collapse: float | None) -> None:
        self.searcher, self.kinds, self.vec, self.text, self.folder = searcher, kinds, vec, text, folder
        self.filters = filters
        self.min_score, self.within, self.exclude, self.collapse = min_score, within, exclude, collapse
        storage = searcher.storage
        self.calibrations = {kind: Calibration(load_sample(
            storage.reader, sample_path(storage, kind, searcher.model), kind, searcher.model), vec) for kind in kinds}
        self._matched: dict[int, list[tuple[float, int, str]]] = {}
        self._terms: list[str] | None = None
        self._exclusions: dict[tuple[str, int], Keep | None] = {}

    def semantic(self, n: int, keep: bool) -> list[tuple[float, ItemRow, float]]:
        """The best `n` items by cosine (score, row, relevance), cut-offs applied; with `keep`, `exclude`
        and `collapse` too (k still returned when k pass)."""
        found: list[tuple[float, ItemRow, float]] = []
        for kind in self.kinds:
            kept = self._exclusion(kind, n) if keep else None
            found.extend((score, row, self.calibrations[kind].relevance(score)) for score, row in
                         _search_kind(self.searcher.storage, kind, self.vec, n, self.folder, kept, self.filters,
                                      self.searcher.model, None if self.min_score == "auto" else self.min_score))
        found.sort(key=lambda hit: -hit[0])
        floor = self._floor(found[0][0] if found else None)
        out = []
        for score, row, relevance in found:
            if score < floor or len(out) == n:
                break
            if self._passes(score, relevance, floor):
                out.append((score, row, relevance))
        return out

    def _exclusion(self, kind: str, k: int) -> Keep | None:
        """`exclusion` of `kind` stopping at `k` kept, built once: building it embeds every `exclude` text,
        and each widening pass of `fused` asks for it again."""
        if (kind, k) not in self._exclusions:
            self._exclusions[(kind, k)] = exclusion(self.searcher, kind, self.vec, self.exclude, self.collapse, k)
        return self._exclusions[(kind, k)]

    def _floor(self, best: float | None) -> float:
        """The lowest cosine `min_score` and `within` (below the `best` cosine) let through."""
        return max(self.min_score if isinstance(self.min_score, float | int) else -math.inf,
                   best - self.within if best is not None and self.within is not None else -math.inf)

    def _passes(self, score: float, relevance: float, floor: float) -> bool:
        """Whether a result with this cosine and relevance passes the cut-offs."""
        # Relevance is per kind: with --target all it need not fall with the score.
        return score >= floor and not (self.min_score == "auto" and relevance < AUTO_RELEVANCE)

    def words(self, n: int) -> list[tuple[float, int, str]]:
        """The best `n` items whose words match the query's text: (words score, id, kind), best first;
        asked once per `n` — a hybrid query first asks whether any match, then fuses the same list."""
        if n not in self._matched:
            reader = self.searcher.storage.reader
            if self._terms is None:  # each word counted once for the query, whatever its kinds and depths
                self._terms = reader.rare_terms(self.text)
            found = []
            for kind in self.kinds:
                ids, scores = reader.match_terms(self._terms, kind, n, self.folder, self.filters)
                found.extend((float(s), int(i), kind) for i, s in zip(ids, scores))
            found.sort(key=lambda hit: -hit[0])  # bm25 over one full-text index: comparable across kinds
            self._matched[n] = found[:n]
        return self._matched[n]

    def fused(self, k: int, mode: str) -> list[Result]:
        """The top `k` of the words ranking ('words') or of its fusion with the meaning ranking ('hybrid')."""
        reader = self.searcher.storage.reader
        depth = max(k, FUSION_DEPTH)
        # Rows and cosines of items only the words ranking holds, kept across widening passes: each read once.
        read: dict[int, ItemRow] = {}
        measured: dict[int, float] = {}
        while True:
            meaning = self.semantic(depth, keep=False) if mode == "hybrid" else []
            matched = self.words(depth)
            semantic_rank = {row.id: n for n, (_, row, _) in enumerate(meaning, 1)}
            words_score = {item: round(score, 6) for score, item, _ in matched}
            words_rank = dict(zip(words_score, ranks(list(words_score.values()))))
            rows = {row.id: row for _, row, _ in meaning}
            read.update(reader.items(i for i in words_rank if i not in rows and i not in read))
            rows.update((i, read[i]) for i in words_rank if i not in rows and i in read)
            cosine = {row.id: score for score, row, _ in meaning}
            for kind in self.kinds:
                missing = [i for i, row in rows.items() if row.kind == kind and i not in cosine and i not in measured]
                measured.update((i, float(v @ self.vec))
                                for i, v in item_vectors(reader, kind, missing, self.searcher.model).items())
            cosine.update((i, measured[i]) for i in rows if i not in cosine and i in measured)
            floor = self._floor(max(cosine.values(), default=None))
            passing = {i for i, row in rows.items()
                       if self._passes(cosine[i], self.calibrations[row.kind].relevance(cosine[i]), floor)}
            # Equal fused scores (a words match and a meaning match both ranked first) go by cosine.
            order = sorted(((item, score) for item, score in fuse([semantic_rank, words_rank]) if item in passing),
                           key=lambda pair: (-round(pair[1], 12), -cosine[pair[0]]))
            kept = self._kept([(cosine[item], rows[item]) for item, _ in order], k)
            if len(kept) >= k or (len(meaning) < depth and len(matched) < depth):
                break
            depth *= 4
        results = []
        for item, fused in order:
            if item not in kept:
                continue
            row, n = rows[item], len(results) + 1
            placed = {"semantic": semantic_rank.get(item), "words": words_rank.get(item)}
            results.append(Result(n, round(cosine[item], 6), row.kind, row.path, row.text,
                                  row.line if row.kind == "text" else None, item,
                                  round(self.calibrations[row.kind].relevance(cosine[item]), 3),
                                  placed if mode == "hybrid" else {"words": placed["words"]},
                                  words_score.get(item),
                                  round(fused, 6) if mode == "hybrid" else None))
            if n == k:
                break
        return results

    def _kept(self, hits: list[tuple[float, ItemRow]], k: int) -> set[int]:
        """Ids of the ranked `hits` that pass `exclude` and `collapse` (per kind, in order; all without them)."""
        kept: set[int] = set()
        for kind in self.kinds:
            ranked = [hit for hit in hits if hit[1].kind == kind]
            keep = self._exclusion(kind, k)
            kept.update(row.id for _, row in (keep(ranked) if keep is not None else ranked))
        return kept


def by_date(reader: MetadataReader, results: Sequence[Result]) -> list[Result]:
    """`results` ordered by capture time, oldest first (items without one last, in their order),
    renumbered, each with its capture time as the camera's local time (`taken`)."""
    times = reader.capture_times(r.id for r in results)

    def when(result: Result) -> tuple[float | None, int | None]:
        return times.get(result.id, (None, None))

    ordered = sorted(results, key=lambda r: (when(r)[0] is None, when(r)[0] or 0.0))
    return [replace(r, rank=n, taken=local_time(*when(r))) for n, r in enumerate(ordered, 1)]


def local_time(taken_at: float | None, offset: int | None) -> str | None:
    """ISO capture time as the camera's clock showed it, with its UTC offset where known."""
    if taken_at is None:
        return None
    if offset is None:  # the camera's clock as written, stored as if UTC
        return datetime.fromtimestamp(taken_at, timezone.utc).replace(tzinfo=None).isoformat()
    return datetime.fromtimestamp(taken_at, timezone(timedelta(seconds=offset))).isoformat()


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
                 keep: Keep | None = None,
                 filters: Filters | None = None, model: str | None = None,
                 min_score: float | None = None) -> list[tuple[float, Any]]:
    index = storage.vector_set(kind, model)
    if filters:
        allowed = storage.reader.ids_filtered(kind, folder, filters)
    else:
        allowed = storage.reader.ids_under(folder, kind) if folder else None
    if allowed is not None and not len(allowed):
        return []
    fetch = k
    while True:
        scores, ids = index.search(vec[None, :], fetch, allowed, exact=lambda want: _stored(storage, kind, want, model),
                                   min_score=min_score)  # a cosine cut-off, applied by the vector store
        pairs = [(float(s), int(i)) for s, i in zip(scores[0], ids[0]) if i >= 0]
        rows = storage.reader.items(i for _, i in pairs)
        # The store is the truth: an id the cache still holds but the store dropped is skipped.
        hits = [(s, rows[i]) for s, i in pairs if i in rows]
        if keep is not None:  # --not / --collapse: fetch more until k pass or the index is exhausted
            hits = keep(hits)
        if len(hits) >= k or len(pairs) < fetch:
            return hits[:k]
        fetch *= 4

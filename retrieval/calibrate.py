"""Relevance: a query's scores made comparable across models and queries.

A raw cosine means little on its own (0.2 is a good match for one CLIP model and a poor one for
another), so each result is also given a *relevance*: how many standard deviations its score lies
above the query's mean score over the index,

    relevance = (score − mean(S)) / std(S),   S = the query's scores against a fixed sample of stored vectors.

The sample (at most SAMPLE_SIZE vectors per kind) is chosen deterministically by a hash of the
item ids, so adding items changes it little, and it is cached next to the vector caches
(`sample-KIND.npz`, `sample-MODEL-KIND.npz` for a model other than the index's default, keyed by
the database generation): a query costs one small matrix product,
never a scan of every item. `min_score="auto"` keeps the results whose relevance is at least
AUTO_RELEVANCE, so a query that matches nothing in particular prints nothing.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .config import write_cache_file

if TYPE_CHECKING:
    from .stores import MetadataReader, Storage

#: Vectors per kind in the calibration sample.
SAMPLE_SIZE = 2000

#: `min_score="auto"` keeps results at least this many standard deviations above the query's mean
#: score (chosen on the generated shapes set: benchmarks/RESULTS.md, "Relevance cut-off").
AUTO_RELEVANCE = 2.0

#: Fibonacci hashing constant: spreads consecutive ids over the whole 64-bit range.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def sample_ids(ids: np.ndarray, size: int = SAMPLE_SIZE) -> np.ndarray:
    """At most `size` of `ids`, chosen by a fixed hash of each id (so the choice is deterministic,
    and an item added later enters the sample only by displacing one), ascending."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) <= size:
        return np.sort(ids)
    with np.errstate(over="ignore"):  # the multiplication wraps around on purpose
        keys = ids.astype(np.uint64) * _GOLDEN
    return np.sort(ids[np.argpartition(keys, size - 1)[:size]])


def sample_path(storage: Storage, kind: str, model: str | None = None) -> Path:
    """The cache file of the sample of one kind and model (None: the default), named after its vector set."""
    return storage.cache_dir / f"sample-{storage.key(kind, model).name(storage.model())}.npz"


def load_sample(reader: MetadataReader, path: Path, kind: str, model: str | None = None) -> np.ndarray:
    """The calibration sample of one kind and model (None: the default) ([n, dim] float32), from its
    cache file `path` or the database."""
    generation = reader.generation(model)
    try:
        with np.load(path, allow_pickle=False) as cached:
            if int(cached["generation"]) == generation:
                return cached["vectors"]
    except (OSError, ValueError, KeyError):
        pass  # no cache yet, or a damaged one: rebuilt below
    chunks = [vecs for _, vecs in reader.vectors(kind, sample_ids(reader.item_ids(kind, model)), model)]
    vectors = np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)
    data = io.BytesIO()
    np.savez(data, generation=np.int64(generation), vectors=vectors)
    write_cache_file(path, data.getvalue())  # skipped where the index is read-only
    return vectors


class Calibration:
    """The score distribution of one query over a sample: turns scores into relevance."""

    def __init__(self, sample: np.ndarray, query: np.ndarray) -> None:
        scores = sample @ query if len(sample) else np.zeros(1, np.float32)
        self.mean = float(np.mean(scores))
        # A sample of identical vectors has no spread: any score differs by "infinitely" many sds.
        self.std = max(float(np.std(scores)), 1e-6)

    def relevance(self, score: float) -> float:
        """Standard deviations `score` lies above the query's mean score over the index."""
        return (score - self.mean) / self.std

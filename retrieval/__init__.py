"""mmsearch's library: cross-modal image-text retrieval with CLIP, FAISS and SQLite.

    import retrieval
    with retrieval.open_index("my-index", model="shapes-mini") as index:
        index.add(["photos/", "captions.txt"])
        for hit in index.search("a red circle", k=5):
            print(hit.rank, hit.score, hit.path)

Importing this package does not import torch; the model loads on first use.
"""

from .collection import Collection, open_index
from .errors import (
    BadQuery,
    EmptyIndex,
    IndexInUse,
    IndexNotFound,
    IndexReadOnly,
    MMSearchError,
    ModelMismatch,
    ModelUnavailable,
    NothingToIndex,
    PathNotFound,
    UnsupportedFile,
)
from .indexer import IndexReport, Removal
from .search import Result

__all__ = [
    "BadQuery",
    "Collection",
    "EmptyIndex",
    "IndexInUse",
    "IndexNotFound",
    "IndexReadOnly",
    "IndexReport",
    "MMSearchError",
    "ModelMismatch",
    "ModelUnavailable",
    "NothingToIndex",
    "PathNotFound",
    "Removal",
    "Result",
    "UnsupportedFile",
    "open_index",
]

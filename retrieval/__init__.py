"""mmsearch's library: cross-modal image-text retrieval with CLIP, FAISS and SQLite.

    import retrieval
    with retrieval.open_index("my-index", model="shapes-mini") as index:
        index.add(["photos/", "captions.txt"])
        for hit in index.search("a red circle", k=5):
            print(hit.rank, hit.score, hit.path)

Importing this package does not import torch; the model loads on first use.
"""

from .collection import Collection, open_index
from .config import DEMO_MODEL, demo_path
from .errors import (
    BadQuery,
    DeviceUnavailable,
    EmptyIndex,
    IndexDamaged,
    IndexInUse,
    IndexNotFound,
    IndexReadOnly,
    IndexTooNew,
    MMSearchError,
    ModelInUse,
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
    "DEMO_MODEL",
    "DeviceUnavailable",
    "EmptyIndex",
    "IndexDamaged",
    "IndexInUse",
    "IndexNotFound",
    "IndexReadOnly",
    "IndexReport",
    "IndexTooNew",
    "MMSearchError",
    "ModelInUse",
    "ModelMismatch",
    "ModelUnavailable",
    "NothingToIndex",
    "PathNotFound",
    "Removal",
    "Result",
    "UnsupportedFile",
    "demo_path",
    "open_index",
]

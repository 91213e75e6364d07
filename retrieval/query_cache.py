"""Embeddings of recent text queries, kept next to the index so a repeated query skips the model."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np

from .config import write_cache_file

#: Files kept; beyond this the least recently written are dropped.
MAX_ENTRIES = 2000


class QueryCache:
    """One .npy file per (model, query text) in `<index>/query-cache/`; every failure is a miss."""

    def __init__(self, directory: Path, model_identity: str) -> None:
        self.directory = directory
        self.model_identity = model_identity

    def _path(self, text: str) -> Path:
        key = hashlib.sha256(f"{self.model_identity}\n{text}".encode()).hexdigest()
        return self.directory / f"{key[:32]}.npy"

    def get(self, text: str) -> np.ndarray | None:
        """The cached unit vector of `text`, or None."""
        try:
            return np.load(self._path(text), allow_pickle=False)
        except (OSError, ValueError):
            return None

    def put(self, text: str, vector: np.ndarray) -> None:
        """Remember `vector` for `text` (atomically); silently skipped where the index is read-only."""
        data = io.BytesIO()
        np.save(data, np.asarray(vector, dtype=np.float32), allow_pickle=False)
        write_cache_file(self._path(text), data.getvalue())
        try:
            self._prune()
        except OSError:
            return

    def _prune(self) -> None:
        entries = list(self.directory.glob("*.npy"))
        if len(entries) <= MAX_ENTRIES:
            return
        entries.sort(key=lambda p: p.stat().st_mtime)
        for path in entries[: len(entries) - MAX_ENTRIES]:
            path.unlink(missing_ok=True)

"""Plain records exchanged between the store, its reader, the indexer and search (no database code)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass(frozen=True)
class ModelManifest:
    """Which model built an index: vectors of two models must never be mixed."""

    name: str
    pretrained: str | None
    checkpoint_sha256: str | None
    dim: int

    def identity(self) -> tuple[str, str | None, int]:
        """What must match: a local checkpoint is identified by content, a hub tag by name."""
        return (self.name, self.checkpoint_sha256 or self.pretrained, self.dim)

    def describe(self) -> str:
        """Human-readable model description for errors and `info`."""
        weights = self.pretrained or "random"
        if self.checkpoint_sha256:
            weights = f"{weights} (sha256 {self.checkpoint_sha256[:12]})"
        return f"{self.name} / {weights}, dim {self.dim}"


@dataclass(frozen=True)
class FileRow:
    """A file as last indexed."""

    id: int
    path: str
    kind: str
    size: int
    mtime: float
    sha256: str


@dataclass
class NewFile:
    """A file to insert (or replace) with the items embedded from it."""

    path: str
    kind: str
    size: int
    mtime: float
    sha256: str
    lines: list[int] = field(default_factory=list)
    texts: list[str | None] = field(default_factory=list)
    vectors: np.ndarray | None = None


@dataclass(frozen=True)
class ItemRow:
    """What a search result shows about an item."""

    id: int
    kind: str
    path: str
    line: int
    text: str | None


@dataclass(frozen=True)
class RootOptions:
    """How a root is scanned, stored with it so a bare re-scan does the same."""

    exclude: tuple[str, ...] = ()
    include_hidden: bool = False
    text_field: str | None = None

    def to_json(self) -> str:
        """The stored form (the `options` column of `roots`)."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | None) -> RootOptions:
        """Options as stored; the defaults for a root indexed before options were stored."""
        if not raw:
            return cls()
        data = json.loads(raw)
        return cls(tuple(data.get("exclude", ())), bool(data.get("include_hidden", False)), data.get("text_field"))


@dataclass(frozen=True)
class FileMetadata:
    """What the search filters read of an image file (see `schema.FILES`)."""

    taken_at: float
    taken_offset: int | None
    camera: str | None
    width: int
    height: int


@dataclass(frozen=True)
class WordSource:
    """An item whose searchable words are to be made, or whose image is to be read by OCR (see `words`)."""

    item_id: int
    kind: str
    path: str
    text: str | None
    camera: str | None
    taken_at: float | None
    taken_offset: int | None
    #: The words stored (None: to be made) and the OCR text stored (None: not read yet).
    words: str | None
    ocr: str | None

"""Where an index lives, which model to use by default, and which files count as what.

Knows nothing of torch or click: every value here is plain data so that the CLI's
help and the query path stay fast.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"

#: The repo's bundled data: the demo corpus and the `shapes-mini` model (config + checkpoint).
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "index_data"

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
TEXT_EXTENSIONS = frozenset({".txt", ".jsonl", ".json", ".csv"})
#: Record fields tried, in order, when `--text-field` is not given.
DEFAULT_TEXT_FIELDS = ("text", "caption")

#: The prune rule: a re-scan that would remove more than this share of a root's indexed files AND
#: more than PRUNE_MAX_FILES of them keeps them (an unmounted drive lists as an empty folder)
#: unless told to prune. Per index: `Store.set_setting("prune_max_share", "0.5")`; env
#: MMSEARCH_PRUNE_MAX_SHARE / MMSEARCH_PRUNE_MAX_FILES.
PRUNE_MAX_SHARE = 0.20
PRUNE_MAX_FILES = 10

#: What an item can be: one image, or one text (a line or record of a corpus).
KINDS = ("image", "text")

DB_NAME = "mmsearch.db"
LOCK_NAME = "lock"


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value else Path.home() / fallback


def default_index_dir() -> Path:
    """`MMSEARCH_INDEX`, else `$XDG_DATA_HOME/mmsearch` (default `~/.local/share/mmsearch`)."""
    env = os.environ.get("MMSEARCH_INDEX")
    if env:
        return Path(env).expanduser()
    return _xdg("XDG_DATA_HOME", ".local/share") / "mmsearch"


def cache_dir() -> Path:
    """Per-user cache (exported model towers): `$XDG_CACHE_HOME/mmsearch`."""
    env = os.environ.get("MMSEARCH_CACHE")
    if env:
        return Path(env).expanduser()
    return _xdg("XDG_CACHE_HOME", ".cache") / "mmsearch"


def default_model() -> tuple[str, str | None]:
    """The model asked for when no flag is given: env `MMSEARCH_MODEL` / `MMSEARCH_PRETRAINED`, else ViT-B-32."""
    name = os.environ.get("MMSEARCH_MODEL") or DEFAULT_MODEL
    pretrained = os.environ.get("MMSEARCH_PRETRAINED")
    if pretrained is None and name == DEFAULT_MODEL:
        pretrained = DEFAULT_PRETRAINED
    return name, pretrained


def kind_of(path: Path) -> str | None:
    """'image', 'text' or None, from the extension (case-insensitive)."""
    ext = path.suffix.lower()
    if ext in IMAGE_EXTENSIONS:
        return "image"
    if ext in TEXT_EXTENSIONS:
        return "text"
    return None

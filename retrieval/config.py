"""Where an index lives, which model to use by default, and which files count as what.

Knows nothing of torch or click: every value here is plain data so that the CLI's
help and the query path stay fast.
"""

from __future__ import annotations

import os
import tempfile
from importlib import resources
from importlib.util import find_spec
from pathlib import Path

DEFAULT_MODEL = "ViT-B-32"

#: The weights `--model ARCH` means when no `--pretrained` is given (open_clip has no notion of a
#: default tag). Well-known, widely used tags; every one is in open_clip's
#: `list_pretrained_tags_by_model` (tests/test_trust.py checks). Any other architecture needs an
#: explicit `--pretrained`: random weights are never implied.
DEFAULT_TAGS = {
    "ViT-B-32": "laion2b_s34b_b79k",
    "ViT-B-32-256": "datacomp_s34b_b86k",
    "ViT-B-16": "laion2b_s34b_b88k",
    "ViT-L-14": "laion2b_s32b_b82k",
    "ViT-L-14-336": "openai",
    "ViT-H-14": "laion2b_s32b_b79k",
    "ViT-g-14": "laion2b_s34b_b88k",
    "ViT-bigG-14": "laion2b_s39b_b160k",
    "RN50": "openai",
    "convnext_base_w": "laion2b_s13b_b82k",
    "ViT-B-16-SigLIP": "webli",
    "ViT-SO400M-14-SigLIP": "webli",
    "MobileCLIP-S2": "datacompdr",
}
DEFAULT_PRETRAINED = DEFAULT_TAGS[DEFAULT_MODEL]

#: The fix named when an optional back end (PostgreSQL, Milvus, Ray) is not installed.
CLUSTER_EXTRA = "pip install 'mmsearch[cluster]'"


def _bundled_dir() -> Path:
    """Where the bundled model and demo are: the package data `retrieval.bundled`, else index_data/.

    Installs (a wheel, `pip install .`, an editable install) map the repo's index_data/ to the
    package `retrieval.bundled`; a source checkout used without installing has only index_data/.
    """
    try:
        return Path(str(resources.files("retrieval.bundled")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "index_data"


#: The bundled data: the demo corpus and the `shapes-mini` model (config + checkpoint).
BUNDLED_DIR = _bundled_dir()
#: The model the demo corpus was made for.
DEMO_MODEL = "shapes-mini"

#: pillow-heif (the optional extra `mmsearch[heif]`) is installed: HEIC/HEIF photos can be read.
#: Found without importing it (about 30 ms), so `import retrieval` stays fast; `images` registers it.
HEIF_READABLE = find_spec("pillow_heif") is not None
#: Pillow decodes AVIF where it was built with libavif (its wheels since 11.2): `PIL._avif` exists.
AVIF_READABLE = find_spec("PIL._avif") is not None

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
                             | ({".avif"} if AVIF_READABLE else set())
                             | ({".heic", ".heif"} if HEIF_READABLE else set()))
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


def write_cache_file(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all; a cache that cannot be written is simply skipped."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except OSError:
        return


def default_model() -> tuple[str, str | None]:
    """The model asked for when no flag is given: env `MMSEARCH_MODEL` / `MMSEARCH_PRETRAINED`, else ViT-B-32.

    Without `MMSEARCH_PRETRAINED` the weights are the architecture's `DEFAULT_TAGS` entry (None
    when it has none, which `encoder.resolve_model` refuses).
    """
    name = os.environ.get("MMSEARCH_MODEL") or DEFAULT_MODEL
    return name, os.environ.get("MMSEARCH_PRETRAINED") or DEFAULT_TAGS.get(name)


def demo_path() -> Path:
    """The bundled demo corpus: 50 images of colored shapes and a `captions.txt` (index it with `DEMO_MODEL`)."""
    return BUNDLED_DIR / "demo"


def kind_of(path: Path) -> str | None:
    """'image', 'text' or None, from the extension (case-insensitive)."""
    ext = path.suffix.lower()
    if ext in IMAGE_EXTENSIONS:
        return "image"
    if ext in TEXT_EXTENSIONS:
        return "text"
    return None

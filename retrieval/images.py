"""Opening images safely and turning them into model-sized pixels, without torch.

Runs in decode worker processes: read the file once, hash it, decode (JPEG straight to a
reduced size where that is exact enough), apply EXIF orientation, convert every mode to
correct RGB, then resize and crop exactly as open_clip's preprocess does.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

#: Larger images are refused as decompression bombs (a 12000x9000 photo, 108 MP, passes).
MAX_PIXELS = 180_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


@dataclass(frozen=True)
class Geometry:
    """How a model wants its pixels: square side, resize mode ('shortest' or 'squash')."""

    size: int
    resize_mode: str = "shortest"


@dataclass
class Decoded:
    """A file read for embedding: its identity and pixels, or why it failed."""

    path: str
    size: int
    mtime: float
    sha256: str
    pixels: np.ndarray | None  # uint8 [size, size, 3]
    error: str | None = None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: alpha over white, 16-bit scaled, palette expanded."""
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT_MODES or img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        # 16-bit data spans 0..65535: scale it instead of clipping it to white.
        if img.mode in _SIXTEEN_BIT_MODES or arr.max(initial=0) > 255:
            arr = arr / 257.0
        return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    return img.convert("RGB")


def open_image(source: str | Path | bytes, draft: int | None = None) -> Image.Image:
    """Decode an image (first frame) to upright RGB; `draft` lets JPEG decode at reduced size.

    Raises OSError/ValueError (and PIL's errors) for unreadable data; `describe_error` makes them readable.
    """
    fp = io.BytesIO(source) if isinstance(source, bytes) else source
    with warnings.catch_warnings():
        # Large-but-allowed images warn; MAX_PIXELS is our limit and we check it ourselves.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(fp)
        width, height = img.size
        if width * height > MAX_PIXELS:
            raise ValueError(f"image is {width}x{height}, over the {MAX_PIXELS // 1_000_000} MP limit")
        if draft and img.format == "JPEG":
            # libjpeg's DCT scaling decodes at 1/2, 1/4 or 1/8 size, never below `draft` per side.
            img.draft(img.mode, (draft, draft))
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)


def fit(img: Image.Image, geometry: Geometry) -> np.ndarray:
    """Resize and crop like open_clip's preprocess (bicubic); returns uint8 [size, size, 3]."""
    size = geometry.size
    width, height = img.size
    if geometry.resize_mode == "squash":
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    else:
        # torchvision Resize(int): the short side becomes `size`, the long side is truncated.
        if width <= height:
            new = (size, int(size * height / width))
        else:
            new = (int(size * width / height), size)
        if new != (width, height):
            img = img.resize(new, Image.Resampling.BICUBIC)
        width, height = img.size
        top = int(round((height - size) / 2.0))
        left = int(round((width - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8)


def describe_error(exc: BaseException) -> str:
    """A one-line reason for a file that could not be decoded."""
    if isinstance(exc, Image.DecompressionBombError):
        return "image too large (decompression bomb guard)"
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not a readable image"
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, ValueError) else text


def file_identity(path: str) -> tuple[int, float]:
    """(size, mtime) of a file as the incremental scan compares them."""
    st = os.stat(path)
    return st.st_size, st.st_mtime


def decode_file(path: str, geometry: Geometry, draft: bool = True) -> Decoded:
    """Read, hash and decode one file for the model; never raises for bad data."""
    try:
        size, mtime = file_identity(path)
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        return Decoded(path, 0, 0.0, "", None, f"cannot read: {exc.strerror or exc}")
    digest = hashlib.sha256(data).hexdigest()
    if not data:
        return Decoded(path, size, mtime, digest, None, "empty file")
    try:
        img = open_image(data, draft=geometry.size if draft else None)
        return Decoded(path, size, mtime, digest, fit(img, geometry))
    except Exception as exc:  # noqa: BLE001 - any decoder failure means "skip this file"
        return Decoded(path, size, mtime, digest, None, describe_error(exc))


def decode_many(paths: list[str], geometry: Geometry, workers: int, draft: bool = True) -> Iterator[Decoded]:
    """Decode files in order, in `workers` processes (0: in this process).

    Worker processes are spawned, not forked, so they never inherit torch's thread pools,
    and import only this module (PIL + numpy).
    """
    job = partial(decode_file, geometry=geometry, draft=draft)
    if workers <= 0 or len(paths) < 2 * workers:
        yield from map(job, paths)
        return
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers) as pool:
        # Small chunks keep results flowing in order while every worker stays busy.
        yield from pool.imap(job, paths, chunksize=4)

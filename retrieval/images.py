"""Opening images safely and turning them into model-sized pixels, without torch.

Runs in decode worker processes (or a decode thread): read the file once, hash it, decode (JPEG straight to a
reduced size where that is exact enough), apply EXIF orientation, convert every mode to
correct RGB, then resize and crop exactly as open_clip's preprocess does.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from queue import Queue

import numpy as np
from PIL import Image, ImageOps

from .config import HEIF_READABLE
from .records import FileMetadata

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
    #: Plain JPEGs come back undecoded (`Decoded.jpeg`), to be decoded on the model's device
    #: (`gpu_decode`); other files are decoded here as always.
    jpeg_to_device: bool = False


@dataclass
class Decoded:
    """A file read for embedding: its identity and pixels, or why it failed."""

    path: str
    size: int
    mtime: float
    sha256: str
    pixels: np.ndarray | None  # uint8 [size, size, 3]
    error: str | None = None
    seconds: float = 0.0  # time spent reading, hashing and decoding it (in whichever process did)
    jpeg: bytes | None = None  # the file's bytes, left for the device to decode (`Geometry.jpeg_to_device`)
    orientation: int = 1  # its EXIF orientation (1-8), applied after that decode


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
        img = _open(fp)
        width, height = img.size
        if width * height > MAX_PIXELS:
            raise ValueError(f"image is {width}x{height}, over the {MAX_PIXELS // 1_000_000} MP limit")
        if draft and img.format == "JPEG":
            # libjpeg's DCT scaling decodes at 1/2, 1/4 or 1/8 size, never below `draft` per side.
            img.draft(img.mode, (draft, draft))
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)


def _open(fp: str | Path | io.BytesIO) -> Image.Image:
    """PIL's lazy open (header only), trying pillow-heif where PIL cannot identify the file."""
    try:
        return Image.open(fp)
    except Image.UnidentifiedImageError:
        if not _register_heif():
            raise
        if isinstance(fp, io.BytesIO):
            fp.seek(0)
        return Image.open(fp)


_heif_tried = False


def _register_heif() -> bool:
    """Teach PIL HEIC/HEIF (pillow-heif), once per process, on the first file PIL cannot identify.

    Lazy so that processes that never meet such a file (most; decode workers included) skip the
    ~30 ms import. True when the opener was registered now, so the caller tries the file again.
    """
    global _heif_tried
    if _heif_tried or not HEIF_READABLE:
        return False
    _heif_tried = True
    import pillow_heif

    pillow_heif.register_heif_opener()
    return True


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


#: EXIF tags: DateTimeOriginal, OffsetTimeOriginal (both in the Exif IFD), Make, Model.
_EXIF_IFD, _TAKEN, _OFFSET, _MAKE, _MODEL = 0x8769, 36867, 36881, 271, 272


def read_metadata(path: str, sidecar_time: float | None = None) -> FileMetadata:
    """Capture time, camera and pixel size (as shown, EXIF orientation applied) of an image, from its
    header only (no pixels decoded).

    The capture time is EXIF DateTimeOriginal, read as UTC shifted by OffsetTimeOriginal where that
    is present and as the camera's local time otherwise; without an EXIF date, `sidecar_time` (epoch
    seconds, as a Google Photos sidecar gives it) or else the file's mtime, each with this machine's
    UTC offset at that time. Raises OSError or a decoder error for unreadable files.
    """
    from datetime import datetime, timezone

    with _open(path) as img:
        width, height = img.size
        exif = img.getexif()
        if exif.get(0x0112) in (5, 6, 7, 8):  # turned a quarter: the size as shown, as decoding does
            width, height = height, width
        ifd = exif.get_ifd(_EXIF_IFD)
        taken = ifd.get(_TAKEN) or exif.get(_TAKEN)
        offset_text = ifd.get(_OFFSET)
        camera = " ".join(str(exif.get(t, "")).strip("\x00 ") for t in (_MAKE, _MODEL)).strip() or None
    try:
        wall = datetime.strptime(str(taken).strip("\x00 "), "%Y:%m:%d %H:%M:%S").replace(tzinfo=timezone.utc)
    except (TypeError, ValueError):
        instant = os.stat(path).st_mtime if sidecar_time is None else sidecar_time
        return FileMetadata(instant, time.localtime(instant).tm_gmtoff, camera, width, height)
    offset = _offset_seconds(str(offset_text)) if offset_text else None
    return FileMetadata(wall.timestamp() - (offset or 0), offset, camera, width, height)


def _offset_seconds(text: str) -> int | None:
    """'+02:00' → 7200; None for anything else."""
    text = text.strip("\x00 ")
    if len(text) != 6 or text[0] not in "+-" or text[3] != ":" or not (text[1:3] + text[4:]).isdigit():
        return None
    seconds = int(text[1:3]) * 3600 + int(text[4:]) * 60
    return -seconds if text[0] == "-" else seconds


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
    start = time.perf_counter()
    decoded = _decode_file(path, geometry, draft)
    decoded.seconds = time.perf_counter() - start
    return decoded


def _decode_file(path: str, geometry: Geometry, draft: bool) -> Decoded:
    try:
        size, mtime = file_identity(path)
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        return Decoded(path, 0, 0.0, "", None, f"cannot read: {exc.strerror or exc}")
    digest = hashlib.sha256(data).hexdigest()  # of the bytes we decode: the file is read once
    if not data:
        return Decoded(path, size, mtime, digest, None, "empty file")
    if geometry.jpeg_to_device and (orientation := device_jpeg_orientation(data)) is not None:
        return Decoded(path, size, mtime, digest, None, jpeg=data, orientation=orientation)
    pixels, error = decode_data(data, geometry, draft)
    return Decoded(path, size, mtime, digest, pixels, error)


def decode_data(data: bytes, geometry: Geometry, draft: bool = True) -> tuple[np.ndarray | None, str | None]:
    """(pixels, None) for the model, or (None, why not); never raises for bad data."""
    try:
        return fit(open_image(data, draft=geometry.size if draft else None), geometry), None
    except Exception as exc:  # noqa: BLE001 - any decoder failure means "skip this file"
        return None, describe_error(exc)


def device_jpeg_orientation(data: bytes) -> int | None:
    """The EXIF orientation (1-8) of a JPEG that nvJPEG can take: 8-bit RGB or grayscale, within
    MAX_PIXELS; None for anything else (CMYK, other formats, unreadable headers), decoded by PIL.

    Reads the header only, not the pixels.
    """
    if not data.startswith(b"\xff\xd8\xff"):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # over MAX_PIXELS: PIL's path refuses it
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if img.format != "JPEG" or img.mode not in ("RGB", "L") or width * height > MAX_PIXELS:
                    return None
                orientation = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a header PIL cannot parse: leave the file to PIL's full decode and its error
        return None
    return orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else 1


def _decode_chunk(paths: list[str], geometry: Geometry, draft: bool) -> list[Decoded]:
    return [decode_file(p, geometry, draft) for p in paths]


#: Files per task sent to a decode process: small, so results come back in order and steadily.
CHUNK = 4


def decode_many(paths: list[str], geometry: Geometry, workers: int, draft: bool = True,
                ahead: int = 256) -> Iterator[Decoded]:
    """Decode files in order, at most `ahead` files ahead of the consumer.

    `workers` > 0: in that many processes, spawned, not forked, so they never inherit
    torch's thread pools, and import only this module (PIL + numpy). A worker that dies (a
    decoder crash, the OOM killer) costs a restart, not the run: see `_decode_in_processes`.
    0: in one thread of this process, which overlaps with the model (PIL's decoders, resize
    and hashlib release the GIL). The look-ahead bound keeps memory flat when the model is
    the slower side (a decoded 224 px image is 150 KB).
    """
    ahead = max(ahead, 1)
    if workers <= 0 or len(paths) < 2 * workers:
        yield from _decode_in_thread(paths, geometry, draft, ahead)
        return
    chunks = [paths[i : i + CHUNK] for i in range(0, len(paths), CHUNK)]
    yield from _decode_in_processes(chunks, geometry, draft, workers, window=max(2 * workers, -(-ahead // CHUNK)))


def _process_pool(workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def _decode_in_processes(chunks: list[list[str]], geometry: Geometry, draft: bool, workers: int,
                         window: int) -> Iterator[Decoded]:
    """Decode chunks in a process pool, `window` chunks in flight, results in order.

    When a worker dies the pool breaks and every unfinished chunk fails with it. The oldest
    one (it was running) is then decoded file by file, each in a process of its own, so a
    file that kills its decoder is reported as a failure; the rest go to a new pool. A file
    that crashes its decoder thus costs at most `workers` restarts, and never hangs the run.
    """
    pool = _process_pool(workers)
    try:
        pending: deque[tuple[list[str], Future]] = deque()
        todo = iter(chunks)

        def submit(chunk: list[str]) -> None:
            future: Future
            try:
                future = pool.submit(_decode_chunk, chunk, geometry, draft)
            except BrokenProcessPool as exc:  # broke since the last result: dealt with in this chunk's turn
                future = Future()
                future.set_exception(exc)
            pending.append((chunk, future))

        for chunk in todo:
            submit(chunk)
            if len(pending) >= window:
                break
        while pending:
            chunk, future = pending.popleft()
            try:
                done = future.result()
            except BrokenProcessPool:
                done = [_decode_alone(path, geometry, draft) for path in chunk]
                pool.shutdown(wait=True, cancel_futures=True)
                pool = _process_pool(workers)
                retry = [c for c, _ in pending]
                pending.clear()
                for c in retry:
                    submit(c)
            nxt = next(todo, None)
            if nxt is not None:
                submit(nxt)
            yield from done
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _decode_alone(path: str, geometry: Geometry, draft: bool) -> Decoded:
    """Decode one file in a process of its own; a crash there becomes this file's failure."""
    with _process_pool(1) as pool:
        try:
            return pool.submit(decode_file, path, geometry, draft).result()
        except BrokenProcessPool:
            try:
                size, mtime = file_identity(path)
            except OSError:
                size, mtime = 0, 0.0
            return Decoded(path, size, mtime, "", None, "the image decoder crashed on this file")


_END = object()


def _decode_in_thread(paths: list[str], geometry: Geometry, draft: bool, ahead: int) -> Iterator[Decoded]:
    if len(paths) <= 1:
        yield from (decode_file(p, geometry, draft) for p in paths)
        return
    results: Queue = Queue(maxsize=ahead)
    stop = threading.Event()

    def produce() -> None:
        try:
            for path in paths:
                if stop.is_set():
                    return
                results.put(decode_file(path, geometry, draft))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            results.put(exc)
        finally:
            results.put(_END)

    thread = threading.Thread(target=produce, name="mmsearch-decode", daemon=True)
    thread.start()
    try:
        while (item := results.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            while not results.empty():
                results.get_nowait()
            thread.join(timeout=0.05)

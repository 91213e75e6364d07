"""Text read from images (OCR), for the words half of a hybrid query: the optional `mmsearch[ocr]` extra.

The engine is Tesseract (Debian's `tesseract-ocr` and `tesseract-ocr-eng`) through pytesseract: the
wrapper is a small pure-Python package and the engine a system package with its English model, both
offline. rapidocr-onnxruntime also works offline (its wheel carries its ONNX models) but pulls in
opencv-python, shapely and pyclipper, and its models are trained for Chinese first.

Indexing reads every new image once, where the engine is installed (`available`), unless told not
to (`index --no-ocr`, env MMSEARCH_OCR=off). Imported only where used.
"""

from __future__ import annotations

import os
import re
import shutil

from .errors import MMSearchError

#: Environment variable choosing OCR at index time: auto (on where the engine is installed), on or off.
ENV = "MMSEARCH_OCR"
#: Longest side an image is read at: text a photo shows legibly survives, and a 24-megapixel photo
#: does not cost Tesseract seconds.
MAX_SIDE = 2000


class OcrUnavailable(MMSearchError):
    """OCR was asked for and the engine is not installed."""


def available() -> bool:
    """Whether pytesseract and the tesseract program are installed."""
    try:
        import pytesseract
    except ImportError:
        return False
    return shutil.which(pytesseract.pytesseract.tesseract_cmd) is not None


def wanted(ocr: bool | None) -> bool:
    """Whether this run reads text from images: `ocr` if given (True needs the engine: OcrUnavailable),
    else env MMSEARCH_OCR (auto, on, off), auto meaning where the engine is installed."""
    choice = {True: "on", False: "off"}.get(ocr) if ocr is not None else os.environ.get(ENV, "auto").lower()
    if choice not in ("auto", "on", "off"):
        raise MMSearchError(f"{ENV} must be auto, on or off, not {choice!r}")
    if choice == "off":
        return False
    if available():
        return True
    if choice == "on":
        raise OcrUnavailable("OCR needs the ocr extra and Tesseract: pip install 'mmsearch[ocr]' and "
                             "apt-get install tesseract-ocr tesseract-ocr-eng (or index with --no-ocr)")
    return False


def read_text(path: str) -> str:
    """The words Tesseract reads in an image (English), on one line; '' when it finds none.

    Raises OSError or a decoder error for an unreadable file."""
    import pytesseract

    from .images import open_image

    image = open_image(path, draft=MAX_SIDE)
    if max(image.size) > MAX_SIDE:
        image.thumbnail((MAX_SIDE, MAX_SIDE))
    return re.sub(r"\s+", " ", pytesseract.image_to_string(image, lang="eng")).strip()

"""Showing indexed items: an item's file (reachable only by its id), thumbnails, a results page.

Used by `mmsearch serve` and `mmsearch query --html`. A file is opened only from the path its row
records, and only while its size and mtime still match the row: a path never comes from a request,
and a file swapped or edited since indexing (a symlink pointed elsewhere, say) is not shown.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .config import cache_dir, write_cache_file
from .errors import MMSearchError

if TYPE_CHECKING:
    from .collection import Collection
    from .records import FileRow, ItemRow
    from .search import Result
    from .stores import MetadataReader

#: Long side of a thumbnail, in pixels.
THUMB_SIZE = 256
THUMB_QUALITY = 85
#: A cached thumbnail's name: item id and the first 24 hex digits of its file's sha256.
THUMB_NAME = re.compile(r"(\d+)-([0-9a-f]{24})\.jpg")


class ItemNotFound(MMSearchError):
    """No item has this id, or it has nothing to show (a text has no image)."""


class FileChanged(MMSearchError):
    """The item's file is gone or differs from what was indexed."""


@dataclass(frozen=True)
class ItemFile:
    """An indexed image's row and file, opened and checked against the row."""

    item: ItemRow
    file: FileRow
    data: bytes


def item_row(collection: Collection, item_id: int) -> ItemRow:
    """The row of one item (ItemNotFound if there is none)."""
    row = collection.reader.items([item_id]).get(item_id)
    if row is None:
        raise ItemNotFound(f"no item {item_id} in this index")
    return row


def image_rows(collection: Collection, item_id: int) -> tuple[ItemRow, FileRow]:
    """The item and file rows of an image item (ItemNotFound for an unknown id or a text)."""
    item = item_row(collection, item_id)
    if item.kind != "image":
        raise ItemNotFound(f"item {item_id} is a text: it has no image")
    row = collection.reader.file(item.path)
    if row is None:
        raise ItemNotFound(f"no item {item_id} in this index")
    return item, row


def image_file(collection: Collection, item_id: int) -> ItemFile:
    """The bytes of an indexed image, read only while the file still matches its row.

    The file is opened first and its size and mtime taken from the open descriptor, so what is
    checked is what is read, even if the path is swapped in between.
    """
    item, row = image_rows(collection, item_id)
    try:
        with open(item.path, "rb") as fh:
            st = os.fstat(fh.fileno())
            if (st.st_size, st.st_mtime) != (row.size, row.mtime):
                raise FileChanged(f"the file of item {item_id} changed since it was indexed; re-index it")
            data = fh.read(row.size + 1)
    except OSError:
        raise FileChanged(f"the file of item {item_id} cannot be read any more") from None
    if len(data) != row.size:
        raise FileChanged(f"the file of item {item_id} changed since it was indexed; re-index it")
    return ItemFile(item, row, data)


def make_thumbnail(data: bytes, size: int = THUMB_SIZE) -> bytes:
    """A JPEG of an image, upright (EXIF orientation applied), long side at most `size` px."""
    from PIL import Image

    from .images import open_image

    img = open_image(data, draft=size)
    img.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=THUMB_QUALITY, optimize=True)
    return out.getvalue()


class Thumbnails:
    """Thumbnails cached on disk, keyed by item id and file hash (a changed file gets a new one).

    Kept in `<index>/thumbs/`, or in the per-user cache directory when the index is read-only.
    """

    def __init__(self, collection: Collection) -> None:
        self.collection = collection
        index_dir = collection.directory
        if os.access(index_dir, os.W_OK):
            self.directory = index_dir / "thumbs"
        else:
            digest = hashlib.sha256(str(index_dir).encode()).hexdigest()[:16]
            self.directory = cache_dir() / "thumbs" / digest

    def get(self, item_id: int) -> bytes:
        """The JPEG thumbnail of an image item (ItemNotFound, FileChanged, or BadQuery if undecodable)."""
        _, row = image_rows(self.collection, item_id)
        cached = self.directory / f"{item_id}-{row.sha256[:24]}.jpg"
        try:
            return cached.read_bytes()
        except OSError:
            pass
        source = image_file(self.collection, item_id)
        try:
            thumb = make_thumbnail(source.data)
        except Exception as exc:  # noqa: BLE001 - any decoder error: the file cannot be shown
            from .images import describe_error

            raise FileChanged(f"item {item_id} cannot be decoded: {describe_error(exc)}") from None
        write_cache_file(cached, thumb)
        return thumb

    def prune(self) -> int:
        """Delete the cached thumbnails of items gone from the index or whose file changed since (see
        `prune_thumbnails`); returns how many were deleted."""
        return prune_thumbnails(self.directory, self.collection.reader)


def prune_thumbnails(directory: Path, reader: MetadataReader) -> int:
    """Delete the thumbnails in `directory` (named as `Thumbnails` names them) whose item is gone or
    whose file's hash is not the one they were made of; returns how many were deleted.

    One listing of the folder and one lookup of its item ids: for after a change that removed items
    (a remove, a re-scan that found files gone or changed), never on a query. Only regular files of
    the thumbnail name pattern in `directory` itself are touched.
    """
    try:
        entries = [(entry, match) for entry in os.scandir(directory)
                   if (match := THUMB_NAME.fullmatch(entry.name)) and entry.is_file(follow_symlinks=False)]
    except OSError:  # no thumbnail made yet, or not readable: nothing to prune
        return 0
    current = reader.item_files({int(m.group(1)) for _, m in entries})
    deleted = 0
    for entry, match in entries:
        item = current.get(int(match.group(1)))
        if item is None or not item[1].startswith(match.group(2)):
            try:
                os.unlink(entry.path)
                deleted += 1
            except OSError:  # deleted meanwhile, or not ours to delete: left
                continue
    return deleted


def results_html(query: str, results: Sequence[Result], thumbnails: Thumbnails) -> str:
    """A self-contained HTML page of results: thumbnails as data URIs, every name and text escaped."""
    cards = []
    for r in results:
        name = html.escape(Path(r.path).name)
        score = f"{r.score:.3f}"
        if r.kind == "text":
            cards.append(f'<figure class="text"><blockquote>{html.escape(r.text or "")}</blockquote>'
                         f"<figcaption>{score} · {name}:{r.line}</figcaption></figure>")
            continue
        try:
            uri = "data:image/jpeg;base64," + base64.b64encode(thumbnails.get(r.id)).decode()
            img = f'<img src="{uri}" alt="{name}">'
        except MMSearchError as exc:
            img = f'<div class="missing">{html.escape(str(exc))}</div>'
        cards.append(f'<figure>{img}<figcaption>{score} · <span title="{html.escape(r.path)}">{name}'
                     f"</span></figcaption></figure>")
    title = html.escape(query)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<title>mmsearch: {title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; }}
main {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(200px, 1fr)); gap: 1rem; }}
figure {{ margin: 0; }} img {{ max-width: 100%; display: block; }}
figcaption {{ font-size: .85rem; overflow-wrap: anywhere; }}
blockquote {{ margin: 0; padding: .5rem; border-left: 3px solid #888; }}
</style></head>
<body><h1>{title}</h1><main>
{chr(10).join(cards) or "<p>no results</p>"}
</main></body></html>
"""

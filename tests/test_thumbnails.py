"""Cached thumbnails go with their items: removed, deleted and re-scanned, or changed files leave none behind."""

from __future__ import annotations

import os
from pathlib import Path

import retrieval
from conftest import run_mmsearch, solid_image
from retrieval.gallery import Thumbnails


def _thumbs(index: Path) -> set[str]:
    return {p.name for p in (index / "thumbs").iterdir()}


def _ids(idx: retrieval.Collection) -> dict[str, int]:
    return {Path(r.path).name: r.id for r in idx.search("a square", k=20, target="images")}


def _folder(tmp_path: Path) -> Path:
    photos = tmp_path / "photos"
    for name, color in [("red.png", (255, 0, 0)), ("green.png", (0, 255, 0)), ("blue.png", (0, 0, 255)),
                        ("yellow.png", (255, 255, 0))]:
        solid_image(photos / name, color, (60, 60))
    return photos


def test_thumbnails_of_removed_deleted_and_changed_files_are_deleted(tmp_path: Path) -> None:
    photos, index = _folder(tmp_path), tmp_path / "idx"
    with retrieval.open_index(index, model="shapes-mini") as idx:
        idx.add([photos])
        thumbs, ids = Thumbnails(idx), _ids(idx)
        made = {name: thumbs.get(item) for name, item in ids.items()}
        before = _thumbs(index)
        assert len(before) == 4
        (index / "thumbs" / "notes.txt").write_text("not a thumbnail")  # never touched

        idx.remove([photos / "red.png"])
        assert _thumbs(index) == before - {n for n in before if n.startswith(f"{ids['red.png']}-")} | {"notes.txt"}

        (photos / "green.png").unlink()
        solid_image(photos / "blue.png", (0, 0, 128), (80, 60))  # changed content: a new hash
        report = idx.add()
        assert (report.removed, report.updated) == (1, 1)
        left = _thumbs(index)
        assert left == {n for n in before if n.startswith(f"{ids['yellow.png']}-")} | {"notes.txt"}
        assert (index / "thumbs" / next(n for n in left if n.endswith(".jpg"))).read_bytes() == made["yellow.png"]
        new_blue = _ids(idx)["blue.png"]
        assert thumbs.get(new_blue) and len(_thumbs(index)) == 3  # made again, of the new content


def test_a_moved_file_keeps_its_thumbnail_and_reindex_prunes_strays(tmp_path: Path) -> None:
    photos, index = _folder(tmp_path), tmp_path / "idx"
    with retrieval.open_index(index, model="shapes-mini") as idx:
        idx.add([photos])
        thumbs, ids = Thumbnails(idx), _ids(idx)
        for item in ids.values():
            thumbs.get(item)
        (photos / "red.png").rename(photos / "crimson.png")
        os.utime(photos / "yellow.png", (1, 1))  # touched, same content
        assert idx.add().renamed == 1
        assert len(_thumbs(index)) == 4
        stray = index / "thumbs" / f"{max(ids.values()) + 100}-{'0' * 24}.jpg"  # left by an older version
        stray.write_bytes(b"x")
    assert run_mmsearch("reindex", "--index", index).returncode == 0
    assert not stray.exists() and len(_thumbs(index)) == 4

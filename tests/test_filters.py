"""Search filters stored at index time (migration 0003) and applied inside the search.

Capture date (EXIF DateTimeOriginal with OffsetTimeOriginal, else the camera's local time, else the
mtime), camera, extension and pixel size restrict the vector search to the items that pass, so a
filtered query returns k passing items even when the unfiltered top-k holds none. The previous
release's index (tests/data/index-v2) migrates, and its next scan reads the metadata without
re-embedding anything.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import retrieval
from retrieval.config import BUNDLED_DIR
from retrieval.encoder import Encoder
from retrieval.errors import BadQuery
from retrieval.filters import parse_filters

from conftest import immutable_reader, invoke, release_index_copy, solid_image

FIXTURE = Path(__file__).parent / "data" / "index-v2"


def exif_bytes(taken: str | None = None, offset: str | None = None, make: str | None = None,
               model: str | None = None) -> bytes:
    """EXIF with DateTimeOriginal/OffsetTimeOriginal (Exif IFD) and Make/Model (IFD0), as a camera writes them."""
    exif = Image.Exif()
    if make:
        exif[271] = make
    if model:
        exif[272] = model
    ifd = exif.get_ifd(0x8769)
    if taken:
        ifd[36867] = taken
    if offset:
        ifd[36881] = offset
    return exif.tobytes()


@pytest.fixture
def library(tmp_path: Path) -> Path:
    """Twelve red circles (no EXIF), three blue squares from a Pixel, three dated images, one turned."""
    root = tmp_path / "photos"
    for i in range(12):
        solid_image(root / f"red_{i:02}.jpg", (230, 20 + i, 20), size=(64, 64))
    for i in range(3):
        solid_image(root / f"pixel_{i}.jpg", (20, 20, 230 - i), size=(1000, 800),
                    exif=exif_bytes("2023:07:01 12:00:00", make="Google", model="Pixel 7"))
    # 01:00 at +02:00 is 2023-12-31T23:00Z; 00:30 with no offset is the camera's clock as written.
    solid_image(root / "offset.jpg", (20, 200, 20), exif=exif_bytes("2024:01:01 01:00:00", "+02:00", "Canon", "EOS R6"))
    solid_image(root / "local.jpg", (200, 200, 20), exif=exif_bytes("2024:01:01 00:30:00", make="Canon", model="EOS R6"))
    # Stored 600x900 but turned a quarter (EXIF orientation 6): shown 900x600.
    turned = Image.Exif()
    turned[0x0112] = 6
    solid_image(root / "turned.jpeg", (20, 230, 230), size=(600, 900), exif=turned.tobytes())
    old = solid_image(root / "scan.png", (120, 20, 200))
    when = datetime(2001, 6, 1, 12, tzinfo=timezone.utc).timestamp()
    os.utime(old, (when, when))
    index = tmp_path / "index"
    with retrieval.open_index(index, model="shapes-mini") as idx:
        assert idx.add([root], workers=0).added == 19
    return index


def paths(hits) -> list[str]:
    return [Path(h.path).name for h in hits]


def test_a_filter_returns_k_passing_items_when_the_unfiltered_top_k_holds_none(library) -> None:
    with retrieval.open_index(library, create=False) as idx:
        assert not any(n.startswith("pixel") for n in paths(idx.search("a red circle", k=3)))
        assert sorted(paths(idx.search("a red circle", k=3, camera="PIXEL"))) == ["pixel_0.jpg", "pixel_1.jpg", "pixel_2.jpg"]
        assert sorted(paths(idx.search("a red circle", k=3, min_size="1000x800"))) == ["pixel_0.jpg", "pixel_1.jpg", "pixel_2.jpg"]
        assert paths(idx.search("a red circle", k=3, ext="png")) == ["scan.png"]
        # The size as shown: the turned image is 900 wide (its stored 600x900 would pass 600x900); jpg is jpeg.
        assert sorted(paths(idx.search("a red circle", k=10, ext="jpg", min_size="900x600")))[-1] == "turned.jpeg"
        assert len(idx.search("a red circle", k=10, min_size="900x600")) == 4
        assert idx.search("a red circle", k=10, min_size="600x900") == []
        assert set(paths(idx.search("a red circle", k=5, camera="canon"))) == {"offset.jpg", "local.jpg"}
        # Combined with each other and with --under: every condition holds.
        assert paths(idx.search("a red circle", k=5, camera="pixel", ext="png")) == []
        assert len(idx.search("a red circle", k=5, camera="pixel", ext="jpg,png", under=library.parent / "photos")) == 3
        assert idx.search("a red circle", k=5, camera="pixel", under=library.parent / "elsewhere") == []


def test_dates_are_capture_times_with_their_offset_else_local_else_mtime(library) -> None:
    with retrieval.open_index(library, create=False) as idx:
        def taken(**bounds: str) -> set[str]:
            return set(paths(idx.search("a red circle", k=50, **bounds)))

        # An instant (with an offset): the +02:00 photo was taken on 2023-12-31 in UTC.
        assert taken(after="2024-01-01T00:00+00:00", before="2024-06-01T00:00Z") == {"local.jpg"}
        assert taken(before="2024-01-01T00:00Z", after="2023-12-31T22:00Z") == {"offset.jpg"}
        # A plain date: each photo's own local time, so both were taken on New Year's Day.
        assert taken(after="2024-01-01", before="2024-01-02") == {"offset.jpg", "local.jpg"}
        assert taken(after="2023-07-01", before="2023-07-02") == {"pixel_0.jpg", "pixel_1.jpg", "pixel_2.jpg"}
        # No EXIF date: the file's mtime (the red circles were written today, the scan in 2001).
        assert taken(before="2002-01-01") == {"scan.png"}
        assert len(taken(after="2025-01-01")) == 13


@pytest.mark.parametrize("option", [["--after", "yesterday"], ["--before", "2024-13-01"], ["--min-size", "800"],
                                    ["--ext", ","], ["--camera", " "],
                                    ["--after", "2024-02-01", "--before", "2024-01-01"]])
def test_bad_filter_values_are_one_line_errors(runner, library, option) -> None:
    result = invoke(runner, "query", "a red circle", "--index", str(library), *option)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and option[0] in result.output
    with pytest.raises(BadQuery):
        parse_filters(**{name[2:].replace("-", "_"): value for name, value in zip(option[::2], option[1::2])})


def test_cli_filters_and_json(runner, library) -> None:
    result = invoke(runner, "query", "a red circle", "--index", str(library), "-k", "2", "--camera", "pixel",
                    "--min-size", "1000x800", "--json")
    assert result.exit_code == 0, result.output
    assert [Path(r["path"]).name[:5] for r in json.loads(result.stdout)] == ["pixel", "pixel"]


# --- the previous release's index (schema 0002) ---------------------------------------------

def v2_copy(tmp_path: Path) -> Path:
    """A copy of the previous release's index, its model's checkpoint pointed at this checkout's."""
    return release_index_copy("index-v2", tmp_path)


def restore_sources(index: Path) -> None:
    """Put the fixture's files back where it recorded them, unchanged (same content, size and mtime)."""
    db = sqlite3.connect(f"file:{index / 'mmsearch.db'}?mode=ro", uri=True)
    rows = db.execute("SELECT path, mtime FROM files").fetchall()
    db.close()
    captions = "\n".join(["a red circle", "a blue square", "a green circle", "a black star"]) + "\n"
    for path, mtime in rows:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.suffix == ".txt":
            target.write_text(captions)
        else:
            shutil.copy(BUNDLED_DIR / "demo" / target.name, target)
        os.utime(target, (mtime, mtime))


def test_previous_release_index_migrates_and_its_rescan_reads_metadata_without_embedding(tmp_path, monkeypatch) -> None:
    expected = json.loads((FIXTURE / "expected.json").read_text())
    index = v2_copy(tmp_path)
    with retrieval.open_index(index, create=False) as idx:
        hits = idx.search(np.asarray(expected["vector"], np.float32), k=10, target="all")
        assert [h.path for h in hits] == expected["paths"]
        assert idx.search("a red circle", k=5, min_size="1x1") == []  # not read yet: nothing passes
        assert len(idx.search("a red circle", k=10, ext="jpg")) == 4  # the path is known already
    db = sqlite3.connect(index / "mmsearch.db")
    assert "0003_file_metadata" in {r[0] for r in db.execute("SELECT name FROM migrations")}
    db.close()

    restore_sources(index)
    calls = []
    for name in ("embed_pixels", "embed_texts"):
        original = getattr(Encoder, name)
        monkeypatch.setattr(Encoder, name, lambda self, x, *a, _o=original, _n=name, **kw: calls.append(_n) or _o(self, x, *a, **kw))
    with retrieval.open_index(index, create=False) as idx:
        report = idx.add(workers=0)
        assert (report.added, report.unchanged) == (0, 7)
        assert calls == []  # the metadata came in, nothing was embedded again
        big = idx.search("a red circle", k=10, min_size="1x1")
        assert len(big) == 6
        assert idx.info()["images"] == 6 and idx.info()["texts"] == 4


def test_read_only_previous_release_index_answers_and_says_what_filters_need(tmp_path) -> None:
    index = v2_copy(tmp_path)
    reader = immutable_reader(index)
    assert len(reader.ids_filtered("image", None, parse_filters(ext="png"))) == 2
    with pytest.raises(BadQuery, match="run `mmsearch index` on it once"):
        reader.ids_filtered("image", None, parse_filters(camera="canon"))
    assert reader.files_without_metadata() == []  # no column yet: nothing to fill from here
    reader.close()

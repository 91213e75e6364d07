"""A Google Photos Takeout folder: its .json sidecars and album metadata are photo metadata, not corpora."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

import retrieval
from conftest import run_mmsearch, solid_image
from retrieval.scan import sidecar_photo

#: 2019-07-14 10:20:30 UTC, as Takeout writes it (a string of epoch seconds).
TAKEN = 1563099630


def _sidecar(path: Path, title: str, taken: int | None = TAKEN) -> None:
    meta: dict[str, object] = {"title": title, "description": "", "imageViews": "3",
                               "creationTime": {"timestamp": "1600000000", "formatted": "Sep 13, 2020, 12:26:40 PM UTC"},
                               "geoData": {"latitude": 0.0, "longitude": 0.0, "altitude": 0.0}}
    if taken is not None:
        meta["photoTakenTime"] = {"timestamp": str(taken), "formatted": "Jul 14, 2019, 10:20:30 AM UTC"}
    path.write_text(json.dumps(meta, indent=2), encoding="utf-8")


@pytest.fixture
def takeout(tmp_path: Path) -> Path:
    """Takeout/Google Photos/<album>: photos without EXIF dates, sidecars of both namings, an album file,
    one photo with an EXIF date of its own, and a real corpus .json beside them."""
    album = tmp_path / "Takeout" / "Google Photos" / "Trip 2019"
    solid_image(album / "IMG_0001.jpg", (255, 0, 0))
    _sidecar(album / "IMG_0001.jpg.json", "IMG_0001.jpg")
    solid_image(album / "IMG_0002.png", (0, 0, 255))
    _sidecar(album / "IMG_0002.png.supplemental-metadata.json", "IMG_0002.png", TAKEN + 86400)
    solid_image(album / "IMG(1).jpg", (0, 255, 0))
    _sidecar(album / "IMG.jpg.supplemental-metad(1).json", "IMG.jpg", TAKEN + 2 * 86400)  # cut short, numbered
    exif = Image.Exif()
    exif[0x8769] = {0x9003: "2021:03:04 05:06:07"}  # DateTimeOriginal: it wins over the sidecar
    solid_image(album / "IMG_0003.jpg", (255, 255, 0), exif=exif)
    _sidecar(album / "IMG_0003.jpg.json", "IMG_0003.jpg")
    (album / "metadata.json").write_text(json.dumps(
        {"title": "Trip 2019", "description": "", "access": "protected",
         "date": {"timestamp": "1563000000", "formatted": "Jul 13, 2019"}}), encoding="utf-8")
    (album / "captions.json").write_text(json.dumps([{"text": "a red square"}, {"text": "a blue square"}]))
    return tmp_path / "Takeout"


def _taken(idx: retrieval.Collection) -> dict[str, float]:
    ids = {r.id: Path(r.path).name for r in idx.search("a square", k=50, target="images")}
    return {ids[i]: t for i, (t, _) in idx.reader.capture_times(ids).items()}


def test_sidecars_are_no_failures_and_give_capture_times(takeout: Path, tmp_path: Path) -> None:
    with retrieval.open_index(tmp_path / "idx", model="shapes-mini") as idx:
        report = idx.add([takeout])
        assert report.failures == [] and report.skipped == 0
        assert (report.added, report.texts, report.sidecars) == (5, 2, 5)  # 4 photos + the corpus; 4 sidecars + album
        assert "5 Google Photos metadata files read, not indexed" in report.summary()
        assert idx.reader.failures() == [] and idx.reader.ignored() == []
        taken = _taken(idx)
        assert taken == {"IMG_0001.jpg": TAKEN, "IMG_0002.png": TAKEN + 86400, "IMG(1).jpg": TAKEN + 2 * 86400,
                         "IMG_0003.jpg": pytest.approx(1614834367)}  # EXIF's own date (no offset: as written)
        texts = {r.text for r in idx.search("a square", k=10, target="texts")}
        assert texts == {"a red square", "a blue square"}  # the corpus .json still indexed
        assert idx.add().unchanged == 5  # a re-scan changes nothing


def test_date_filter_and_sort_use_the_sidecar_time(takeout: Path, tmp_path: Path) -> None:
    index = tmp_path / "idx"
    assert run_mmsearch("index", takeout, "--index", index, "--model", "shapes-mini").returncode == 0
    found = run_mmsearch("query", "a square", "--index", index, "--after", "2019-07-14", "--before", "2019-07-15",
                         "--json", "-k", "10")
    assert found.returncode == 0, found.stderr
    assert [Path(r["path"]).name for r in json.loads(found.stdout)] == ["IMG_0001.jpg"]
    info = run_mmsearch("info", "--index", index, "--failures")
    assert info.returncode == 0 and ".json" not in info.stdout


def test_an_index_of_older_runs_drops_its_sidecar_failures(takeout: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from retrieval import scan

    with retrieval.open_index(tmp_path / "idx", model="shapes-mini") as idx:
        monkeypatch.setattr(scan, "_read_sidecar", lambda path: None)  # as before sidecars were told apart
        assert len(idx.add([takeout]).failures) == 5
        monkeypatch.undo()
        idx.add()
        assert idx.reader.failures() == []


def test_a_json_object_that_is_no_sidecar_still_fails_with_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "notes"
    solid_image(folder / "a.png", (255, 0, 0))
    (folder / "settings.json").write_text('{"theme": "dark"}')
    (folder / "broken.json").write_text('{"title": "x", "photoTakenTime": ')
    with retrieval.open_index(tmp_path / "idx", model="shapes-mini") as idx:
        report = idx.add([folder])
        reasons = dict(report.failures)
        assert reasons[str(folder / "settings.json")] == "not a JSON array of records: it holds a JSON object"
        assert reasons[str(folder / "broken.json")].startswith("not a JSON array of records: Expecting value")
        assert report.sidecars == 0 and report.added == 1


def test_a_sidecar_named_alone_is_refused_as_a_corpus(takeout: Path, tmp_path: Path) -> None:
    sidecar = next(takeout.rglob("IMG_0001.jpg.json"))
    result = run_mmsearch("index", sidecar, "--index", tmp_path / "idx", "--model", "shapes-mini")
    assert "a Google Photos metadata file (Takeout sidecar), not a text corpus" in result.stderr


@pytest.mark.parametrize(("sidecar", "photo"), [
    ("IMG_1.jpg.json", "IMG_1.jpg"),
    ("IMG_1.jpg.supplemental-metadata.json", "IMG_1.jpg"),
    ("IMG_1.jpg.suppl.json", "IMG_1.jpg"),
    ("IMG_1.jpg(2).json", "IMG_1(2).jpg"),
    ("IMG_1.jpg.supplemental-metadata(2).json", "IMG_1(2).jpg"),
    ("PXL_20230101_123456789_a_very_long_name_cut_sh.json", "PXL_20230101_123456789_a_very_long_name_cut_sho.jpg"),
    ("VID_1.mp4.json", None),
    ("metadata.json", None),
])
def test_sidecar_names_find_their_photo(sidecar: str, photo: str | None) -> None:
    names = sorted(["IMG_1.jpg", "IMG_1(2).jpg", "VID_1.mp4", "PXL_20230101_123456789_a_very_long_name_cut_sho.jpg",
                    sidecar])
    assert sidecar_photo(sidecar, None, names) == photo
    assert sidecar_photo("renamed.json", "IMG_1.jpg", names) == "IMG_1.jpg"  # by its title

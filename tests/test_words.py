"""Words as well as meaning (issue 15): the words index (migration 0005), hybrid ranking by reciprocal rank
fusion, --semantic-only/--words-only, --sort date, OCR, and the previous release's index (tests/data/index-v3).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

import retrieval
from retrieval import ocr
from retrieval.config import BUNDLED_DIR
from retrieval.encoder import Encoder
from retrieval.local import LocalStorage
from retrieval.reader import StoreReader
from retrieval.words import RRF_K, fuse, item_words, query_terms, ranks, split_words

from conftest import REPO, immutable_reader, invoke, release_index_copy, run_mmsearch, solid_image
from test_filters import exif_bytes, restore_sources, v2_copy
from test_reliability import _read_only_runner

DEMO = BUNDLED_DIR / "demo"
V3 = Path(__file__).parent / "data" / "index-v3"
#: Demo images the trip photo is hidden among (none of their names holds the word "germany").
SHAPES = ["red_circle_01.jpg", "blue_star_01.webp", "green_cross_01.png", "yellow_star_01.jpg", "black_star_01.jpg",
          "purple_circle_01.webp", "white_circle_01.png", "orange_square_01.webp", "red_square_02.webp",
          "blue_circle_01.webp"]


def names(results) -> list[str]:
    return [Path(r.path if hasattr(r, "path") else r["path"]).name for r in results]


@pytest.fixture
def trip(tmp_path: Path) -> Path:
    """Ten demo shapes, and a red circle filed as germany_trip/IMG_001.jpg (nothing German in it)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in SHAPES:
        shutil.copy(DEMO / name, photos / name)
    (photos / "germany_trip").mkdir()
    shutil.copy(DEMO / "red_circle_02.jpg", photos / "germany_trip" / "IMG_001.jpg")
    index = tmp_path / "index"
    with retrieval.open_index(index, model="shapes-mini") as idx:
        assert idx.add([photos], workers=0).added == 11
    return index


# --- words and fusion, as functions ------------------------------------------------------------

def test_names_split_into_words() -> None:
    assert split_words("germany_trip-2019.IMG_001") == ["germany", "trip", "2019", "IMG", "001"]
    assert split_words("germanyTrip2019") == ["germanyTrip2019", "germany", "Trip", "2019"]
    assert split_words("HTMLParser") == ["HTMLParser", "HTML", "Parser"]
    words = item_words("image", "/home/me/Pictures/germany_trip/IMG_001.jpg", "/home/me/Pictures",
                       camera="Google Pixel 7", taken_at=1721064600.0, taken_offset=7200)  # 2024-07-15 19:30+02:00
    assert words == "Pictures germany trip IMG 001 jpg Google Pixel 7 2024 July"
    assert item_words("text", "/notes.txt", "/notes.txt", text="a red circle") == "a red circle"
    assert query_terms('"AND" (OR) NEAR/2 *') == ["and", "or", "near", "2"]
    assert query_terms("!?\" ' -- ()") == []


def test_reciprocal_rank_fusion_on_a_constructed_case() -> None:
    fused = fuse([{1: 1, 2: 2, 3: 3}, {3: 1, 4: 2}])
    # 3 is third by meaning and first by words: 1/63 + 1/61 beats 1's 1/61; 2 and 4 tie at 1/62 (first seen first).
    assert [item for item, _ in fused] == [3, 1, 2, 4]
    assert dict(fused) == pytest.approx({3: 1 / 63 + 1 / 61, 1: 1 / 61, 2: 1 / 62, 4: 1 / 62})
    assert fuse([{5: 1, 6: 2}], k=0) == [(5, 1.0), (6, 0.5)]
    # Equal words scores share a rank: two photos of one folder get the same boost.
    assert ranks([3.0, 2.0, 2.0, 1.0]) == [1, 2, 2, 4]
    assert [item for item, _ in fuse([{1: 1, 2: 2, 3: 3}, {3: 1, 2: 1}])] == [2, 3, 1]


# --- hybrid search ------------------------------------------------------------------------------

def test_a_folder_name_finds_what_the_picture_does_not_show(trip: Path) -> None:
    with retrieval.open_index(trip, create=False) as idx:
        semantic = idx.search("germany", k=11, mode="semantic")
        hybrid = idx.search("germany", k=11)
        words = idx.search("germany", k=11, mode="words")
    assert names(semantic)[0] != "IMG_001.jpg"  # CLIP (here shapes-mini) does not see Germany in a red circle
    assert names(hybrid)[0] == "IMG_001.jpg" and names(words) == ["IMG_001.jpg"]
    top = hybrid[0]
    by_meaning = names(semantic).index("IMG_001.jpg") + 1
    assert top.ranks == {"semantic": by_meaning, "words": 1}
    assert top.fused == pytest.approx(1 / (RRF_K + by_meaning) + 1 / (RRF_K + 1), abs=1e-6)
    assert top.score == pytest.approx(semantic[by_meaning - 1].score, abs=1e-6)  # the score is still the cosine
    # Every other result came by meaning alone, in the meaning ranking's order.
    assert [r.ranks for r in hybrid[1:]] == [{"semantic": n, "words": None} for n in range(1, 12) if n != by_meaning]
    fused = [r.fused for r in hybrid]
    assert fused == sorted(fused, reverse=True)
    assert words[0].ranks == {"words": 1} and words[0].words_score > 0 and words[0].fused is None


def test_no_matching_word_leaves_the_meaning_ranking_as_it_was(trip: Path) -> None:
    with retrieval.open_index(trip, create=False) as idx:
        semantic = idx.search("a photo of a beach", k=5, mode="semantic")
        assert idx.search("a photo of a beach", k=5) == semantic
        assert idx.search("a photo of a beach", k=5, mode="words") == []


def test_filters_and_under_apply_to_both_rankings(trip: Path, tmp_path: Path) -> None:
    with retrieval.open_index(trip, create=False) as idx:
        assert names(idx.search("germany", k=3, mode="words", ext="png")) == []
        assert names(idx.search("germany", k=3, mode="words", under=tmp_path / "photos" / "germany_trip")) == ["IMG_001.jpg"]
        assert names(idx.search("germany circle", k=20, mode="words", under=tmp_path / "elsewhere")) == []
        hybrid = idx.search("germany", k=3, ext="png")
        assert hybrid and all(n.endswith(".png") for n in names(hybrid))
        # --not and the cut-offs hold for what the words bring in too.
        assert "IMG_001.jpg" not in names(idx.search("germany", k=11, exclude=["a red circle"]))
        best = idx.search("germany", k=11, mode="semantic")[0].score
        assert all(r.score >= best - 0.01 for r in idx.search("germany", k=11, within=0.01))


@pytest.mark.parametrize("text", ['"', "AND", "germany AND", "OR NOT", "NEAR(a b)", "*", "a\"b", "text:germany",
                                  "^germany", "-", "(", "'", "germany)", "{ocr text}: x"])
def test_query_text_is_never_full_text_syntax(trip: Path, text: str) -> None:
    with retrieval.open_index(trip, create=False) as idx:
        idx.search(text, k=3)  # hybrid: no error, whatever the text
        if query_terms(text):
            idx.search(text, k=3, mode="words")
        else:
            with pytest.raises(retrieval.BadQuery, match="letters or digits"):
                idx.search(text, k=3, mode="words")
        assert len(idx.reader.match_words("germany)\"", "image", 5)[0]) == 1


def test_words_follow_renames_and_removals(trip: Path, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    (photos / "germany_trip").rename(photos / "zanzibar_2019")
    with retrieval.open_index(trip, create=False) as idx:
        report = idx.add(workers=0)
        assert report.renamed == 1 and report.added == 0
        assert names(idx.search("zanzibar", k=3, mode="words")) == ["IMG_001.jpg"]
        assert idx.search("germany", k=3, mode="words") == []
        idx.remove([photos / "zanzibar_2019"])
        assert idx.search("zanzibar", k=3, mode="words") == []
    db = sqlite3.connect(trip / "mmsearch.db")
    assert db.execute("SELECT count(*) FROM words").fetchone()[0] == 10
    assert db.execute("INSERT INTO words_fts(words_fts) VALUES ('integrity-check')").rowcount is not None
    db.close()


def test_texts_match_by_their_own_words(tmp_path: Path) -> None:
    with retrieval.open_index(tmp_path / "index", model="shapes-mini") as idx:
        idx.add_texts(["a red circle", "the zanzibar harbour", "a blue star"], source="notes")
        found = idx.search("Zanzibar", k=3, target="texts", mode="words")
    assert [r.text for r in found] == ["the zanzibar harbour"]


def test_a_query_counts_each_word_once_whatever_its_kinds(trip: Path, monkeypatch) -> None:
    """A word in half the items or more is left out (see `rare_terms`): one count per word for the
    query, not one per kind (a hybrid query's check for a match and its fusion share them too)."""
    with retrieval.open_index(trip, create=False) as idx:
        idx.add_texts(["a note from the germany trip", "a red circle"], source="notes")
        expected = sorted((round(float(s), 6), int(i)) for kind in ("image", "text")
                          for i, s in zip(*idx.reader.match_words("germany circle", kind, 50)))
        statements: list[str] = []
        all_rows = StoreReader._all
        monkeypatch.setattr(StoreReader, "_all", lambda self, sql, params=(): statements.append(sql) or all_rows(
            self, sql, params))
        words = idx.search("germany circle", k=50, target="all", mode="words")
        counted = [sql for sql in statements if sql.startswith("SELECT count(*) FROM words_fts")]
        assert len(counted) == 2  # "germany" and "circle", once each
        statements.clear()
        hybrid = idx.search("germany circle", k=13, target="all")
        assert len([sql for sql in statements if sql.startswith("SELECT count(*) FROM words_fts")]) == 2
    # The same matches and scores as asking each kind on its own (ties are ordered by cosine).
    assert sorted((r.words_score, r.id) for r in words) == expected
    assert [r.words_score for r in words] == sorted((r.words_score for r in words), reverse=True)
    assert {r.kind for r in words} == {"image", "text"} and len(hybrid) == 13


# --- --sort date ----------------------------------------------------------------------------------

def test_sort_date_orders_by_capture_time_undated_last(tmp_path: Path, runner) -> None:
    photos = tmp_path / "photos"
    dates = {"c.jpg": ("2023:05:01 08:00:00", "+02:00"), "a.jpg": ("2019:12:24 18:00:00", None),
             "b.jpg": ("2021:07:14 12:30:00", "-05:00")}
    for n, (name, (taken, offset)) in enumerate(dates.items()):
        solid_image(photos / name, (200, 20 * n, 20), size=(64, 64), exif=exif_bytes(taken, offset))
    (photos / "captions.txt").write_text("a red circle\na red square\n")
    index = tmp_path / "index"
    with retrieval.open_index(index, model="shapes-mini") as idx:
        idx.add([photos], workers=0)
        by_score = idx.search("a red circle", k=10, target="all")
        by_date = idx.search("a red circle", k=10, target="all", sort="date")
    assert sorted(r.id for r in by_score) == sorted(r.id for r in by_date)
    assert names(by_date)[:3] == ["a.jpg", "b.jpg", "c.jpg"]
    assert [r.taken for r in by_date[:3]] == ["2019-12-24T18:00:00", "2021-07-14T12:30:00-05:00",
                                            "2023-05-01T08:00:00+02:00"]
    assert [r.kind for r in by_date[3:]] == ["text", "text"] and by_date[3].taken is None
    assert [r.rank for r in by_date] == list(range(1, 6))
    result = invoke(runner, "query", "a red circle", "--index", index, "--sort", "date", "--json")
    assert names(json.loads(result.stdout)) == ["a.jpg", "b.jpg", "c.jpg"]
    table = invoke(runner, "query", "a red circle", "--index", index, "--sort", "date").stdout.splitlines()
    assert "2019-12-24 18:00" in table[0] and table[0].endswith("a.jpg")


# --- the command line and the HTTP API --------------------------------------------------------------

def test_cli_modes_and_json(trip: Path, runner) -> None:
    hybrid = invoke(runner, "query", "germany", "--index", trip, "-k", "3", "--json")
    data = json.loads(hybrid.stdout)
    assert names(data)[0] == "IMG_001.jpg" and data[0]["ranks"]["words"] == 1 and "fused" in data[0]
    words = json.loads(invoke(runner, "query", "germany", "--index", trip, "--words-only", "--json").stdout)
    assert names(words) == ["IMG_001.jpg"] and words[0]["ranks"] == {"words": 1}
    semantic = json.loads(invoke(runner, "query", "germany", "--index", trip, "--semantic-only", "--json").stdout)
    assert names(semantic)[0] != "IMG_001.jpg" and "fused" not in semantic[0]
    both = run_mmsearch("query", "germany", "--index", trip, "--semantic-only", "--words-only")
    assert both.returncode == 2 and "exclude each other" in both.stderr
    empty = run_mmsearch("query", "?!", "--index", trip, "--words-only")
    assert empty.returncode == 1 and empty.stderr.strip().splitlines() == [
        "Error: a words-only query needs a text with letters or digits"]
    assert "--words-only" in invoke(runner, "query", "--help").stdout


def test_http_api_modes(trip: Path) -> None:
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from retrieval.server import OPENAPI, create_app

    with retrieval.open_index(trip, create=False) as idx:
        client = TestClient(create_app(idx), base_url="http://127.0.0.1:8765")
        assert names(client.get("/api/search", params={"q": "germany", "k": 3}).json())[0] == "IMG_001.jpg"
        assert names(client.get("/api/search", params={"q": "germany", "mode": "words"}).json()) == ["IMG_001.jpg"]
        semantic = client.get("/api/search", params={"q": "germany", "mode": "semantic", "k": 3}).json()
        assert names(semantic)[0] != "IMG_001.jpg"
        dated = client.get("/api/search", params={"q": "germany", "sort": "date", "k": 3}).json()
        assert all("taken" in r for r in dated)
        assert client.get("/api/search", params={"q": "germany", "mode": "fuzzy"}).status_code == 400
        assert client.get("/api/search", params={"q": "germany", "sort": "name"}).status_code == 400
    names_listed = [p["name"] for p in OPENAPI["paths"]["/api/search"]["get"]["parameters"]]
    assert "mode" in names_listed and "sort" in names_listed


# --- OCR --------------------------------------------------------------------------------------------

needs_ocr = pytest.mark.skipif(not ocr.available(), reason="OCR engine (pytesseract + tesseract-ocr) not installed")


def text_image(path: Path, text: str) -> Path:
    """A white image with `text` in big black letters (Pillow's own scalable font)."""
    image = Image.new("RGB", (640, 200), "white")
    ImageDraw.Draw(image).text((20, 50), text, fill="black", font=ImageFont.load_default(size=64))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


@needs_ocr
def test_text_read_from_an_image_is_found_by_words(tmp_path: Path, runner, monkeypatch) -> None:
    photos = tmp_path / "scans"
    text_image(photos / "scan_001.png", "ZANZIBAR 2019")
    for name in SHAPES[:4]:  # a word found in half the items or more would tell nothing apart
        shutil.copy(DEMO / name, photos / name)
    index = tmp_path / "index"
    result = invoke(runner, "index", photos, "--index", index, "--model", "shapes-mini", "--no-ocr")
    assert result.exit_code == 0, result.output
    assert invoke(runner, "query", "zanzibar", "--index", index, "--words-only", "--json").stdout.strip() == "[]"
    # OCR asked for later: the images indexed before are read, nothing is embedded again.
    calls = []
    monkeypatch.setattr(Encoder, "embed_pixels", lambda *a, **kw: calls.append(1))
    assert invoke(runner, "index", "--index", index, "--ocr").exit_code == 0
    assert calls == []
    found = json.loads(invoke(runner, "query", "zanzibar", "--index", index, "--words-only", "--json").stdout)
    assert names(found) == ["scan_001.png"]
    db = sqlite3.connect(index / "mmsearch.db")
    assert dict(db.execute("SELECT f.path, w.ocr FROM words w JOIN items i ON i.id = w.item_id "
                           "JOIN files f ON f.id = i.file_id").fetchall())[str(photos / "scan_001.png")] == "ZANZIBAR 2019"
    db.close()


def test_ocr_asked_for_without_the_engine_is_a_one_line_error(tmp_path: Path, runner, monkeypatch) -> None:
    monkeypatch.setattr(ocr, "available", lambda: False)
    solid_image(tmp_path / "photos" / "a.png", (200, 20, 20))
    result = invoke(runner, "index", tmp_path / "photos", "--index", tmp_path / "index", "--model", "shapes-mini", "--ocr")
    assert result.exit_code == 1 and "ocr extra" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "index").exists()  # refused before anything was written
    monkeypatch.setenv("MMSEARCH_OCR", "auto")  # auto without the engine: indexed, no OCR
    assert invoke(runner, "index", tmp_path / "photos", "--index", tmp_path / "index", "--model", "shapes-mini").exit_code == 0


# --- what `info` says of words search ---------------------------------------------------------------

def test_info_counts_items_with_words_and_images_with_ocr_text(trip: Path, tmp_path: Path, runner,
                                                               monkeypatch) -> None:
    assert json.loads(invoke(runner, "info", "--index", trip, "--json").stdout)["words"] == {
        "items": 11, "ocr_read": 0, "ocr_text": 0}  # indexed without OCR (conftest)
    # OCR asked for later (its engine stood in for): every image is read, one scan holds text.
    monkeypatch.setattr(ocr, "available", lambda: True)
    monkeypatch.setattr(ocr, "read_text", lambda path: "ZANZIBAR 2019" if path.endswith("scan_001.png") else "")
    shutil.copy(DEMO / "white_circle_01.png", tmp_path / "photos" / "scan_001.png")
    with retrieval.open_index(trip, create=False) as idx:
        assert idx.add(workers=0, ocr=True).added == 1
        idx.add_texts(["the zanzibar harbour"], source="notes")
        assert names(idx.search("zanzibar", k=3, target="images", mode="words")) == ["scan_001.png"]
    data = json.loads(invoke(runner, "info", "--index", trip, "--json").stdout)
    assert data["words"] == {"items": 13, "ocr_read": 12, "ocr_text": 1}
    assert "words:    13 items (OCR: 12 images read, 1 with text)" in invoke(runner, "info", "--index", trip).stdout


# --- the previous release's index (schema 0003) -------------------------------------------------------

def v3_copy(tmp_path: Path) -> Path:
    """A copy of the previous release's index, its model's checkpoint pointed at this checkout's."""
    return release_index_copy("index-v3", tmp_path)


def test_previous_release_index_migrates_with_its_words_searchable_at_once(tmp_path: Path, monkeypatch) -> None:
    expected = json.loads((V3 / "expected.json").read_text())
    index = v3_copy(tmp_path)
    with retrieval.open_index(index, create=False) as idx:
        hits = idx.search(np.asarray(expected["vector"], np.float32), k=10, target="all")
        assert [h.path for h in hits] == expected["paths"]  # the answers are kept
        # The words come from what was stored, before any scan: file and folder names, the captions' texts.
        assert sorted(names(idx.search("circle", k=10, mode="words"))) == ["green_circle_01.png", "red_circle_01.jpg"]
        assert [r.text for r in idx.search("star", k=10, target="texts", mode="words")] == ["a black star"]
        # A word found in half the items or more (here the indexed folder's name) tells nothing apart.
        assert idx.search("photos", k=10, mode="words") == []
    db = sqlite3.connect(index / "mmsearch.db")
    assert "0005_words" in {r[0] for r in db.execute("SELECT name FROM migrations")}
    db.close()

    restore_sources(index)
    calls = []
    monkeypatch.setattr(Encoder, "embed_pixels", lambda *a, **kw: calls.append(1))
    with retrieval.open_index(index, create=False) as idx:
        report = idx.add(workers=0)
        assert (report.added, report.unchanged) == (0, 7) and calls == []
        assert sorted(names(idx.search("circle", k=10, mode="words"))) == ["green_circle_01.png", "red_circle_01.jpg"]


def test_read_only_previous_release_index_answers_and_is_left_unchanged(tmp_path: Path) -> None:
    expected = json.loads((V3 / "expected.json").read_text())
    index = v3_copy(tmp_path)
    before = {p.name: p.read_bytes() for p in index.iterdir()}  # the files the old release wrote
    reader = immutable_reader(index)
    assert reader.needs_migration()
    with retrieval.Collection(index, LocalStorage(index, reader)) as idx:
        hits = idx.search(np.asarray(expected["vector"], np.float32), k=10, target="all")
        assert [h.path for h in hits] == expected["paths"]
        assert names(idx.search("a red circle", k=3)) == names(idx.search("a red circle", k=3, mode="semantic"))
        assert idx.search("circle", k=3, mode="words") == []  # no words before 0005: nothing matches
        assert reader.words_todo(ocr=True) == []
        assert idx.info()["words"] is None and idx.info()["images"] == 6
    assert {name: (index / name).read_bytes() for name in before} == before


def test_info_on_a_read_only_previous_release_index_says_it_has_no_words(tmp_path: Path) -> None:
    index = v3_copy(tmp_path)
    before = {p.name: p.read_bytes() for p in index.iterdir()}
    prefix = _read_only_runner(index)
    if prefix is None:
        pytest.skip("no way to make a read-only directory here")
    try:
        cmd = [*prefix, sys.executable, str(REPO / "cli.py"), "info", "--index", str(index)]
        data = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=120)
        assert data.returncode == 0, data.stderr
        assert json.loads(data.stdout)["words"] is None and json.loads(data.stdout)["images"] == 6
        shown = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert shown.returncode == 0, shown.stderr
        assert "words:    - (index built before words search" in shown.stdout
    finally:
        index.chmod(0o755)
    assert {p.name: p.read_bytes() for p in index.iterdir()} == before


def test_an_index_without_image_metadata_gets_image_words_from_its_next_scan(tmp_path: Path) -> None:
    """The release before 0003 stored no EXIF: its images' words wait for the scan that reads it."""
    index = v2_copy(tmp_path)
    with retrieval.open_index(index, create=False) as idx:
        assert idx.search("circle", k=10, mode="words") == []
        assert [r.text for r in idx.search("star", k=10, target="texts", mode="words")] == ["a black star"]
    restore_sources(index)
    with retrieval.open_index(index, create=False) as idx:
        assert idx.add(workers=0).added == 0
        assert sorted(names(idx.search("circle", k=10, mode="words"))) == ["green_circle_01.png", "red_circle_01.jpg"]

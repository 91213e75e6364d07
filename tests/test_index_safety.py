"""Indexing never loses a user's entries by surprise, and says what it skipped (issue 12).

An index made by the previous release migrates (or, read-only, is read as it is); an empty
mount point or an unreadable folder keeps its entries; unsupported, hidden and excluded
files are told apart; text fields are stored per root.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import retrieval
from conftest import REPO, immutable_reader, invoke, solid_image
from retrieval.config import BUNDLED_DIR
from retrieval.records import RootOptions
from test_reliability import _read_only_runner, many_images

FIXTURE = REPO / "tests" / "data" / "index-v1"


def index_args(index: Path, model: str, *args: Path | str) -> list[str]:
    return ["index", *map(str, args), "--index", str(index), "--model", model, "--pretrained", "random", "--workers", "0"]


def info_json(runner, index: Path) -> dict:
    result = invoke(runner, "info", "--index", str(index), "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def indexed_paths(index: Path) -> set[str]:
    with retrieval.open_index(index, create=False) as idx:
        hits = idx.search(np.ones(idx.manifest.dim, np.float32), k=1000, target="all")
    return {h.path for h in hits}


def v1_copy(tmp_path: Path) -> Path:
    """A copy of the previous release's index, its model's checkpoint pointed at this checkout's."""
    index = tmp_path / "index-v1"
    shutil.copytree(FIXTURE, index)
    with sqlite3.connect(index / "mmsearch.db") as db:
        model = json.loads(db.execute("SELECT value FROM meta WHERE key = 'model'").fetchone()[0])
        model["pretrained"] = str(BUNDLED_DIR / "shapes-mini.pt")  # where this checkout keeps it
        db.execute("UPDATE meta SET value = ? WHERE key = 'model'", (json.dumps(model),))
    db.close()
    return index


def migrations(index: Path) -> set[str]:
    db = sqlite3.connect(f"file:{index / 'mmsearch.db'}?mode=ro&immutable=1", uri=True)
    try:
        return {row[0] for row in db.execute("SELECT name FROM migrations")}
    finally:
        db.close()


# --- the previous release's index -----------------------------------------------------------

def test_index_from_the_previous_release_migrates_and_keeps_everything(runner, tmp_path) -> None:
    from retrieval.reader import SCHEMA_VERSION

    expected = json.loads((FIXTURE / "expected.json").read_text())
    index = v1_copy(tmp_path)
    assert migrations(index) == {"0001_initial"}
    with retrieval.open_index(index, create=False) as idx:
        assert (idx.info()["images"], idx.info()["texts"], idx.info()["files"]) == (6, 4, 7)
        hits = idx.search(np.asarray(expected["vector"], np.float32), k=10, target="all")
        assert [h.path for h in hits] == expected["paths"] and [h.text for h in hits] == expected["texts"]
        assert set(idx.reader.root_options().values()) == {RootOptions()}  # the defaults: nothing excluded
    assert SCHEMA_VERSION in migrations(index)
    info = info_json(runner, index)
    assert info["ignored"] == 0 and len(info["root_options"]) == 2
    assert all(o == {"exclude": [], "include_hidden": False, "text_field": None} for o in info["root_options"].values())
    query = invoke(runner, "query", "a red circle", "--index", str(index), "--target", "all", "--json")
    assert query.exit_code == 0, query.output
    assert json.loads(query.stdout)[0]["path"] == expected["paths"][0]


def test_read_only_index_from_the_previous_release_answers_without_migrating(tmp_path) -> None:
    expected = json.loads((FIXTURE / "expected.json").read_text())
    index = v1_copy(tmp_path)
    before = {p.name: p.read_bytes() for p in index.iterdir()}
    # The library on an immutable connection: the new column and table are missing, reads fall back.
    reader = immutable_reader(index)
    assert reader.needs_migration()
    assert reader.ignored() == [] and set(reader.root_options()) == set(reader.roots()) and len(reader.roots()) == 2
    reader.close()
    prefix = _read_only_runner(index)
    if prefix is None:
        pytest.skip("no way to make a read-only directory here")
    cmd = [*prefix, sys.executable, str(REPO / "cli.py")]
    info = subprocess.run([*cmd, "info", "--json", "--index", str(index)], capture_output=True, text=True, timeout=120)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["images"] == 6 and json.loads(info.stdout)["ignored"] == 0
    query = subprocess.run([*cmd, "query", "a red circle", "--target", "all", "--json", "--index", str(index)],
                           capture_output=True, text=True, timeout=300)
    assert query.returncode == 0, query.stderr
    assert json.loads(query.stdout)[0]["path"] == expected["paths"][0]
    if os.geteuid() != 0:
        index.chmod(0o755)
    assert {p.name: p.read_bytes() for p in index.iterdir()} == before
    assert migrations(index) == {"0001_initial"}


# --- the prune rule -------------------------------------------------------------------------

def test_an_empty_mount_point_keeps_its_entries_until_pruned(runner, tmp_path, tiny_model) -> None:
    photos = many_images(tmp_path / "photos", 15)
    index = tmp_path / "idx"
    assert invoke(runner, *index_args(index, tiny_model, photos)).exit_code == 0
    shutil.move(photos, tmp_path / "photos-away")
    photos.mkdir()  # the drive is not mounted: its mount point lists as an empty folder
    rescan = invoke(runner, "index", "--index", str(index), "--workers", "0")
    assert rescan.exit_code == 0, rescan.output
    assert "removed 0" in rescan.stderr and "kept 15 missing" in rescan.stderr
    assert rescan.stderr.count("15 of its 15 indexed files (100 %) are missing") == 1
    assert info_json(runner, index)["images"] == 15
    shutil.rmtree(photos)
    shutil.move(tmp_path / "photos-away", photos)  # mounted again: nothing to embed
    back = invoke(runner, "index", "--index", str(index), "--workers", "0")
    assert "added 0, updated 0, renamed 0, removed 0, unchanged 15" in back.stderr
    for path in sorted(photos.iterdir())[:12]:
        path.unlink()
    pruned = invoke(runner, "index", "--index", str(index), "--workers", "0", "--prune")
    assert "removed 12" in pruned.stderr and "missing" not in pruned.stderr
    assert info_json(runner, index)["images"] == 3


def test_ordinary_deletions_below_either_threshold_are_removed(tmp_path, tiny_model) -> None:
    photos = many_images(tmp_path / "photos", 60)
    with retrieval.open_index(tmp_path / "idx", model=tiny_model, pretrained="random") as idx:
        idx.add([photos], workers=0)
        for path in sorted(photos.iterdir())[:11]:  # 11 files but 18 %: a folder cleaned up
            path.unlink()
        report = idx.add([photos], workers=0)
        assert (report.removed, report.kept, report.warnings) == (11, 0, [])
        for path in sorted(photos.iterdir())[:10]:  # 10 files (20 % of 49 is less): ordinary too
            path.unlink()
        assert idx.add([photos], workers=0).removed == 10
        idx.store.set_setting("prune_max_files", "3")  # stricter for this index
        idx.store.set_setting("prune_max_share", "0.05")
        for path in sorted(photos.iterdir())[:4]:
            path.unlink()
        report = idx.add([photos], workers=0)
        assert (report.removed, report.kept, len(report.warnings)) == (0, 4, 1)
        assert "4 of its 39 indexed files (10 %)" in report.warnings[0]
        report = idx.add([photos], workers=0, prune=True)
        assert (report.removed, report.kept) == (4, 0)
        assert len(idx.reader.item_ids("image")) == 35


# --- unreadable folders ---------------------------------------------------------------------

def test_entries_under_an_unreadable_folder_are_kept(runner, tmp_path, tiny_model, monkeypatch) -> None:
    photos = many_images(tmp_path / "photos", 4)
    sub = many_images(photos / "sub", 3)
    index = tmp_path / "idx"
    assert invoke(runner, *index_args(index, tiny_model, photos)).exit_code == 0
    real_scandir = os.scandir

    def scandir(path: str | os.PathLike = ".") -> object:
        if os.fspath(path) == str(sub):
            raise PermissionError(13, "Permission denied", str(sub))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    broken = invoke(runner, "index", "--index", str(index), "--workers", "0")
    assert broken.exit_code == 0 and "removed 0" in broken.stderr and "kept 3 missing" in broken.stderr
    assert f"skipped {sub}: cannot read folder: Permission denied" in broken.stderr
    assert len(indexed_paths(index)) == 7
    with retrieval.open_index(index, create=False) as idx:
        assert idx.failures() == [(str(sub), "cannot read folder: Permission denied")]
    monkeypatch.undo()
    fixed = invoke(runner, "index", "--index", str(index), "--workers", "0")
    assert "unchanged 7" in fixed.stderr
    assert info_json(runner, index)["failures"] == 0


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")
def test_a_folder_unreadable_for_real_keeps_its_entries(runner, tmp_path, tiny_model) -> None:
    photos = many_images(tmp_path / "photos", 4)
    sub = many_images(photos / "sub", 3)
    index = tmp_path / "idx"
    assert invoke(runner, *index_args(index, tiny_model, photos)).exit_code == 0
    sub.chmod(0)
    try:
        # Root without the capabilities that bypass file permissions: sub cannot be listed.
        result = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable,
                                 str(REPO / "cli.py"), "index", "--index", str(index), "--workers", "0"],
                                capture_output=True, text=True, timeout=300)
    finally:
        sub.chmod(0o755)
    assert result.returncode == 0, result.stderr
    assert "removed 0" in result.stderr and "cannot read folder" in result.stderr
    assert len(indexed_paths(index)) == 7


# --- unsupported, hidden and excluded files -------------------------------------------------

def test_unsupported_files_are_counted_and_listed_not_failed(runner, tmp_path, tiny_model) -> None:
    # Camera RAW (.nef) is never an image here; .heic would be one wherever pillow-heif is installed.
    photos = tmp_path / "photos"
    solid_image(photos / "a.png", (200, 0, 0))
    for name in ["b.nef", "sub/c.NEF", "d.cr2", "README", ".e.nef", "skip/f.nef", "._a.png"]:
        (photos / name).parent.mkdir(parents=True, exist_ok=True)
        (photos / name).write_bytes(b"\0" * 16)
    index = tmp_path / "idx"
    result = invoke(runner, *index_args(index, tiny_model, photos, "--exclude", "skip"))
    assert result.exit_code == 0, result.output
    assert "ignored 4 files of unsupported types: .nef 2, .cr2 1, (none) 1" in result.stderr
    assert "added 1," in result.stderr and "skipped 0" in result.stderr
    info = info_json(runner, index)
    assert (info["failures"], info["ignored"], info["ignored_types"]) == (0, 4, {".nef": 2, ".cr2": 1, "(none)": 1})
    assert info["ignored_files"] == sorted(str(photos / n) for n in ["b.nef", "sub/c.NEF", "d.cr2", "README"])
    text = invoke(runner, "info", "--index", str(index)).stdout
    assert "ignored (unsupported types, not indexed): 4: .nef 2, .cr2 1, (none) 1" in text
    assert f"ignored {photos / 'd.cr2'}" in text and "skipped " not in text
    (photos / "d.cr2").unlink()
    invoke(runner, "index", "--index", str(index), "--workers", "0")
    assert info_json(runner, index)["ignored_types"] == {".nef": 2, "(none)": 1}
    assert invoke(runner, "remove", str(photos), "--index", str(index)).exit_code == 0
    assert info_json(runner, index)["ignored"] == 0


def test_exclude_patterns_and_hidden_files_are_stored_per_root(runner, tmp_path, tiny_model) -> None:
    photos = tmp_path / "photos"
    names = ["a.png", ".b.png", "._a.png", ".thumbs/c.png", "raw/d.png", "sub/e.png", "sub/deep/f.tmp.png"]
    for i, name in enumerate(names):
        solid_image(photos / name, (20 * i, 100, 200 - 20 * i))
    index = tmp_path / "idx"
    first = invoke(runner, *index_args(index, tiny_model, photos, "--exclude", "raw", "--exclude", "**/*.tmp.png"))
    assert first.exit_code == 0, first.output
    assert indexed_paths(index) == {str(photos / "a.png"), str(photos / "sub/e.png")}
    assert info_json(runner, index)["root_options"][str(photos)]["exclude"] == ["raw", "**/*.tmp.png"]
    assert "exclude raw **/*.tmp.png" in invoke(runner, "info", "--index", str(index)).stdout
    solid_image(photos / "raw" / "new.png", (1, 2, 3))
    again = invoke(runner, "index", "--index", str(index), "--workers", "0")  # bare: the stored patterns hold
    assert "added 0," in again.stderr
    named = invoke(runner, "index", str(photos), "--index", str(index), "--workers", "0")  # named, no flags: same
    assert "added 0," in named.stderr
    # A new set replaces the old one; the hidden rule still holds; files newly excluded leave.
    invoke(runner, "index", str(photos), "--index", str(index), "--workers", "0", "--exclude", "sub")
    assert indexed_paths(index) == {str(photos / n) for n in ["a.png", "raw/d.png", "raw/new.png"]}
    hidden = invoke(runner, "index", str(photos), "--index", str(index), "--workers", "0", "--include-hidden")
    assert "added 3," in hidden.stderr
    assert {str(photos / n) for n in [".b.png", "._a.png", ".thumbs/c.png"]} <= indexed_paths(index)
    assert info_json(runner, index)["root_options"][str(photos)] == {
        "exclude": ["sub"], "include_hidden": True, "text_field": None}


@pytest.mark.parametrize("relative, patterns, include_hidden, left_out", [
    ("thumbs/a.jpg", ["**/thumbs"], False, True),      # `**/` also matches no folder at all
    ("2024/thumbs/a.jpg", ["**/thumbs"], False, True),  # a folder matched: everything in it
    ("thumbs2/a.jpg", ["thumbs"], False, False),        # whole names, not prefixes
    ("2024/a.CR2.jpg", ["*.cr2.jpg"], False, False),    # case-sensitive, like the file system
    ("2024/a.tmp.jpg", ["*.tmp.jpg"], False, True),     # `*` crosses folders
    ("2024/.git/a.jpg", [], False, True),               # a hidden folder
    ("2024/._a.jpg", ["nothing"], False, True),         # macOS resource forks; patterns keep the rule
    ("2024/._a.jpg", [], True, False),
])
def test_exclude_pattern_semantics(relative, patterns, include_hidden, left_out) -> None:
    from retrieval.scan import excluded

    assert excluded(relative, patterns, include_hidden) is left_out


def test_newly_excluded_files_leave_even_past_the_prune_rule(tmp_path, tiny_model) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    many_images(photos / "raw", 12)
    many_images(photos / "keep", 2)
    with retrieval.open_index(tmp_path / "idx", model=tiny_model, pretrained="random") as idx:
        idx.add([photos], workers=0)
        report = idx.add([photos], workers=0, exclude=["raw"])
        assert (report.removed, report.kept, report.warnings) == (12, 0, [])
        assert len(idx.reader.item_ids("image")) == 2
        report = idx.add([photos], workers=0, exclude=[])  # cleared: they come back
        assert report.added == 12


# --- text fields ----------------------------------------------------------------------------

def test_text_field_is_stored_per_root_and_a_change_rereads(runner, tmp_path, tiny_model) -> None:
    corpus = tmp_path / "coco.jsonl"
    records = [{"image_id": i, "captions": [f"caption {i}.{j}" for j in range(5)], "title": f"title {i}"} for i in range(3)]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in records))
    index = tmp_path / "idx"
    wrong = invoke(runner, *index_args(index, tiny_model, corpus))
    assert wrong.exit_code == 1
    assert "all 3 records skipped (no text in field 'text' or 'caption'); fields seen: captions, image_id, title" in wrong.stderr
    assert wrong.stderr.strip().splitlines()[-1] == f"Error: nothing indexed from {corpus}"
    listed = invoke(runner, *index_args(index, tiny_model, corpus, "--text-field", "captions"))
    assert listed.exit_code == 0 and "15 texts" in listed.stderr
    assert info_json(runner, index)["failures"] == 0  # the records skipped before are read now
    hits = json.loads(invoke(runner, "query", "caption 2.4", "--index", str(index), "--target", "texts",
                             "-k", "20", "--json").stdout)
    assert sorted((h["line"], h["text"]) for h in hits) == [(i + 1, f"caption {i}.{j}") for i in range(3) for j in range(5)]
    same = invoke(runner, "index", "--index", str(index), "--workers", "0")
    assert "unchanged 1" in same.stderr and "texts" not in same.stderr
    title = invoke(runner, "index", str(corpus), "--index", str(index), "--workers", "0", "--text-field", "title")
    assert "updated 1" in title.stderr and "3 texts" in title.stderr  # unchanged on disk, read again
    assert info_json(runner, index)["texts"] == 3


def test_json_arrays_are_corpora_and_every_path_empty_is_an_error(runner, tmp_path, tiny_model, photos) -> None:
    good = tmp_path / "array.json"
    good.write_text(json.dumps([{"caption": "a red circle"}, {"caption": ["a blue star", "a star"]}, {"id": 3}]))
    bad = tmp_path / "object.json"
    bad.write_text(json.dumps({"annotations": [{"caption": "x"}]}))
    index = tmp_path / "idx"
    both = invoke(runner, *index_args(index, tiny_model, good, bad))
    assert both.exit_code == 0, both.output  # one of the two yielded something
    assert "3 texts" in both.stderr and "not a JSON array of records: it holds a JSON object" in both.stderr
    with retrieval.open_index(index, create=False) as idx:
        failures = dict(idx.failures())
    assert failures == {str(bad): "not a JSON array of records: it holds a JSON object",
                        f"{good}:3": "no text in field 'text' or 'caption'"}
    alone = invoke(runner, *index_args(index, tiny_model, bad))
    assert alone.exit_code == 1 and "Traceback" not in alone.output
    empty = tmp_path / "empty"
    empty.mkdir()
    with_photos = invoke(runner, *index_args(index, tiny_model, empty, photos))
    assert with_photos.exit_code == 0
    nothing = invoke(runner, *index_args(index, tiny_model, empty))
    assert nothing.exit_code == 1 and f"nothing indexed from {empty}" in nothing.stderr


def test_bare_index_without_roots_says_so(runner, tmp_path, tiny_model, photos) -> None:
    missing = tmp_path / "never-made"
    first = invoke(runner, "index", "--index", str(missing))
    assert first.exit_code == 1 and "no index at" in first.stderr and not missing.exists()
    index = tmp_path / "idx"
    invoke(runner, *index_args(index, tiny_model, photos))
    invoke(runner, "remove", str(photos), "--index", str(index))
    bare = invoke(runner, "index", "--index", str(index))
    assert bare.exit_code == 1 and "added" not in bare.stderr
    assert bare.stderr.strip() == f"Error: index {index} has no folders to re-scan yet: run `mmsearch index PATH` first"


def test_a_path_named_twice_is_one_root(runner, tmp_path, tiny_model, photos) -> None:
    index = tmp_path / "idx"
    twice = invoke(runner, *index_args(index, tiny_model, photos, photos))
    assert twice.exit_code == 0, twice.output
    assert info_json(runner, index)["roots"] == [str(photos)]

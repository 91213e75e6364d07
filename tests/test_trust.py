"""Trust: no silent random weights, one-line refusals that write nothing, checked options and inputs."""

from __future__ import annotations

import json
import sqlite3
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

import retrieval
from conftest import REPO, invoke, run_mmsearch, solid_image


def build(runner, index: Path, model: str, *paths: Path) -> None:
    result = invoke(runner, "index", *paths, "--index", index, "--model", model, "--pretrained", "random", "--workers", "0")
    assert result.exit_code == 0, result.output


def one_line_error(result, message: str) -> None:
    """Exit 1, the message on one stderr line, no traceback (in-process, a traceback would have raised)."""
    assert result.exit_code == 1, result.output
    assert message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# --- no silent random weights -------------------------------------------------------------


def test_every_default_tag_is_one_open_clip_lists() -> None:
    import open_clip

    from retrieval.config import DEFAULT_TAGS

    for arch, tag in DEFAULT_TAGS.items():
        assert tag in open_clip.list_pretrained_tags_by_model(arch), (arch, tag)


def test_default_weights_resolve_from_a_static_table_without_torch() -> None:
    code = (
        "import os, sys\n"
        "os.environ['MMSEARCH_MODEL'] = 'ViT-B-32-256'\n"
        "from retrieval.config import default_model\n"
        "assert default_model() == ('ViT-B-32-256', 'datacomp_s34b_b86k'), default_model()\n"
        "os.environ['MMSEARCH_MODEL'] = 'RN101'\n"
        "assert default_model() == ('RN101', None)\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_an_architecture_without_pretrained_means_its_default_weights_not_random(runner, tmp_path, photos) -> None:
    index = tmp_path / "idx"
    # Offline, the default weights cannot be fetched: the run names them and stops (before: random weights, exit 0).
    result = invoke(runner, "index", photos, "--index", index, "--model", "ViT-B-32")
    one_line_error(result, "ViT-B-32/laion2b_s34b_b79k are not cached")
    assert not index.exists()


def test_an_architecture_outside_the_table_is_refused_with_its_tags(runner, tmp_path, photos) -> None:
    index = tmp_path / "idx"
    result = invoke(runner, "index", photos, "--index", index, "--model", "RN101")
    one_line_error(result, "no default weights for RN101 (open_clip knows openai, yfcc15m)")
    assert "--pretrained random" in result.stderr and "--pretrained /path/to/checkpoint" in result.stderr
    assert not index.exists()


def test_a_model_config_needs_explicit_weights(runner, tmp_path, tiny_model, photos) -> None:
    index = tmp_path / "idx"
    one_line_error(invoke(runner, "index", photos, "--index", index, "--model", tiny_model), "names no weights")
    assert not index.exists()
    with pytest.raises(retrieval.ModelUnavailable, match="names no weights"):
        with retrieval.open_index(index, model=tiny_model) as idx:
            idx.add([photos])
    assert not index.exists()
    with retrieval.open_index(index, model=tiny_model, pretrained="random") as idx:
        assert idx.add([photos]).added == 6
        assert idx.manifest.pretrained == "random"


# --- one-line refusals that write nothing ------------------------------------------------


def test_missing_path_leaves_no_index_folder(runner, tmp_path, tiny_model) -> None:
    index = tmp_path / "idx"
    result = invoke(runner, "index", tmp_path / "nope", "--index", index, "--model", tiny_model, "--pretrained", "random")
    one_line_error(result, "no such file or folder")
    assert not index.exists()


@pytest.mark.parametrize("which", ["text file", "other architecture"])
def test_a_checkpoint_that_does_not_fit_is_refused_before_anything_is_written(tmp_path, tiny_model, photos, which) -> None:
    index = tmp_path / "idx"
    checkpoint = REPO / ("README.md" if which == "text file" else "index_data/shapes-mini.pt")
    result = run_mmsearch("index", photos, "--index", index, "--model", tiny_model, "--pretrained", checkpoint)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert ("is not a model checkpoint" if which == "text file" else "cannot load") in result.stderr
    assert not index.exists()


@pytest.mark.parametrize("content", ["text", "other sqlite"])
def test_a_database_that_is_not_an_index_is_refused_and_left_alone(runner, tmp_path, tiny_model, photos, content) -> None:
    index = tmp_path / "idx"
    index.mkdir()
    db = index / "mmsearch.db"
    if content == "text":
        db.write_text("my notes, not a database\n" * 200)
    else:
        with sqlite3.connect(db) as conn:
            conn.execute("CREATE TABLE songs (title TEXT)")
        conn.close()
    before = snapshot(index)
    for argv in (["index", photos, "--model", tiny_model, "--pretrained", "random"], ["query", "a cat"], ["info"]):
        result = invoke(runner, *argv, "--index", index)
        one_line_error(result, "not a readable mmsearch database" if content == "text" else "not an mmsearch index")
    assert snapshot(index) == before


def test_an_index_from_a_newer_mmsearch_is_refused_never_rebuilt(runner, tmp_path, tiny_model, photos) -> None:
    index = tmp_path / "idx"
    build(runner, index, tiny_model, photos)
    # A newer vector-file format: queries, re-indexing and reindex refuse; the file stays as it is.
    vectors = index / "vectors-image.faiss"
    data = bytearray(vectors.read_bytes())
    footer = data[-64:]
    footer[8:12] = struct.pack("<I", 99)
    footer[-4:] = struct.pack("<I", zlib.crc32(bytes(footer[:-4])))
    data[-64:] = footer
    vectors.write_bytes(bytes(data))
    for argv in (["query", "a cat"], ["reindex"], ["index", photos]):
        one_line_error(invoke(runner, *argv, "--index", index), "written by a newer mmsearch (vector format 99")
    assert vectors.read_bytes() == bytes(data)
    # A migration this version does not know: every command refuses before touching the database.
    with sqlite3.connect(index / "mmsearch.db") as conn:
        conn.execute("INSERT INTO migrations (name, applied_at) VALUES ('9999_from_the_future', 0)")
    conn.close()
    before = snapshot(index)
    for argv in (["query", "a cat"], ["info"], ["reindex"], ["index", photos], ["remove", photos]):
        one_line_error(invoke(runner, *argv, "--index", index), "written by a newer mmsearch (schema 9999_from_the_future")
    assert snapshot(index) == before

"""Trust: no silent random weights, one-line refusals that write nothing, checked options and inputs."""

from __future__ import annotations

import json
import shutil
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
        one_line_error(result, "is damaged or not a database" if content == "text" else "not an mmsearch index")
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


# --- query options and library inputs ------------------------------------------------------


def test_query_options_are_checked(runner, tmp_path, tiny_model, photos) -> None:
    index = tmp_path / "idx"
    build(runner, index, tiny_model, photos)
    for value in ("1.5", "-2", "nan"):
        one_line_error(invoke(runner, "query", "a cat", "--min-score", value, "--index", index), "min-score must be")
    with retrieval.open_index(index, create=False) as idx, pytest.raises(retrieval.BadQuery):
        idx.search("a cat", min_score=float("nan"))
    # A query text that names an image file runs as text, with a hint on stderr (none with --quiet).
    photo = str(photos / "img0.jpg")
    hinted = invoke(runner, "query", photo, "--index", index)
    assert hinted.exit_code == 0 and len(hinted.stdout.splitlines()) == 6
    assert len(hinted.stderr.splitlines()) == 1 and "use --image" in hinted.stderr
    assert invoke(runner, "query", photo, "--index", index, "--quiet").stderr == ""
    assert "hint" not in invoke(runner, "query", "a cat", "--index", index).stderr


def test_cuda_without_a_gpu_is_the_same_error_for_every_query_kind(runner, tmp_path, tiny_model, photos) -> None:
    from retrieval.encoder import gpu_likely

    if gpu_likely():
        pytest.skip("this machine may have a GPU")
    index = tmp_path / "idx"
    build(runner, index, tiny_model, photos)
    assert invoke(runner, "query", "a cached text", "--index", index).exit_code == 0
    errors = set()
    for query in (["a new text"], ["a cached text"], ["--image", photos / "img1.png"]):
        result = invoke(runner, "query", *query, "--device", "cuda", "--index", index)
        one_line_error(result, "no NVIDIA GPU")
        errors.add(result.stderr)
    assert len(errors) == 1
    with pytest.raises(retrieval.DeviceUnavailable, match="no NVIDIA GPU"):
        retrieval.open_index(index, device="cuda")


def test_unknown_device_is_a_typed_error_at_open(tmp_path) -> None:
    with pytest.raises(retrieval.DeviceUnavailable, match="unknown device 'tpu'"):
        retrieval.open_index(tmp_path / "idx", device="tpu")
    assert issubclass(retrieval.DeviceUnavailable, retrieval.MMSearchError)
    assert not (tmp_path / "idx").exists()


def test_a_lone_string_is_refused_where_a_list_is_expected(tmp_path, tiny_model, photos) -> None:
    photo = photos / "img0.jpg"
    with retrieval.open_index(tmp_path / "idx", model=tiny_model, pretrained="random") as idx:
        calls = [lambda: idx.add(str(photos)), lambda: idx.add(photos), lambda: idx.remove("x"),
                 lambda: idx.add_texts("a cat", source="s"), lambda: idx.embed_texts("a cat"),
                 lambda: idx.embed_images(str(photo)), lambda: idx.embed_images(photo)]
        for call in calls:
            with pytest.raises(TypeError, match="takes a list, not a single"):
                call()
        assert not (tmp_path / "idx").exists()
        assert idx.embed_texts(["a cat"]).shape == (1, 32)
        assert idx.add([photos]).added == 6


# --- output and help -----------------------------------------------------------------------


def test_control_characters_in_file_names_print_escaped(runner, tmp_path, tiny_model) -> None:
    folder = tmp_path / "odd\nroot"
    shown = f"{tmp_path}/odd\\nroot"  # as the table shows it
    for i, name in enumerate(["new\nline.png", "esc\x1b[31mred.png", "plain.png"]):
        solid_image(folder / name, (40 * i, 200, 90))
    (folder / "bad\tname.jpg").write_bytes(b"not an image")
    index = tmp_path / "idx"
    built = invoke(runner, "index", folder, "--index", index, "--model", tiny_model, "--pretrained", "random", "--workers", "0")
    assert built.exit_code == 0 and f"skipped {shown}/bad\\tname.jpg: " in built.stderr
    table = invoke(runner, "query", "a cat", "--index", index).stdout
    assert len(table.splitlines()) == 3 and "\x1b" not in table
    assert f"{shown}/new\\nline.png" in table and f"{shown}/esc\\x1b[31mred.png" in table
    hits = json.loads(invoke(runner, "query", "a cat", "--index", index, "--json").stdout)
    assert str(folder / "new\nline.png") in {h["path"] for h in hits}  # JSON keeps the real name
    failures = invoke(runner, "info", "--failures", "--index", index).stdout
    assert f"skipped {shown}/bad\\tname.jpg: " in failures and "\t" not in failures
    # Errors and warnings that name such a file stay on one line too.
    one_line_error(invoke(runner, "index", folder / "gone\nfile.png", "--index", index), f"{shown}/gone\\nfile.png")
    shutil.move(folder, tmp_path / "away")
    rescan = invoke(runner, "index", "--index", index, "--workers", "0")
    assert rescan.exit_code == 0 and f"indexed root {shown} is missing" in rescan.stderr
    assert len(rescan.stderr.splitlines()) == 2  # the warning and the summary


def test_help_documents_every_option_variable_and_the_default_model(runner) -> None:
    import re

    import click

    from cli import cli
    from retrieval.config import DEFAULT_MODEL, DEFAULT_PRETRAINED

    for name, command in cli.commands.items():
        assert "--quiet" in {opt for p in command.params for opt in p.opts}, name
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help and param.help.strip(), (name, param.name)
            else:  # arguments have no help of their own: the command's text names them
                assert param.human_readable_name in command.help, (name, param.name)
    top = invoke(runner, "--help").stdout
    assert DEFAULT_MODEL in top and DEFAULT_PRETRAINED in top
    used = {v for p in [REPO / "cli.py", *(REPO / "retrieval").glob("*.py")]
            for v in re.findall(r"MMSEARCH_[A-Z_]+", p.read_text())}
    assert used and all(v in top for v in used), sorted(v for v in used if v not in top)


def test_shell_completion_shown_in_the_readme_works(runner) -> None:
    from cli import cli

    assert "_MMSEARCH_COMPLETE=bash_source mmsearch" in (REPO / "README.md").read_text()
    env = {"_MMSEARCH_COMPLETE": "bash_complete", "COMP_WORDS": "mmsearch query --mi", "COMP_CWORD": "2"}
    result = runner.invoke(cli, [], prog_name="mmsearch", env=env)
    assert result.exit_code == 0 and "--min-score" in result.stdout


# --- AVIF and HEIC ---------------------------------------------------------------------------


def _picture(size: tuple[int, int] = (96, 72)):
    from PIL import Image

    img = Image.new("RGB", size, (230, 40, 40))
    img.paste((30, 40, 220), (24, 18, 72, 54))
    return img


def test_avif_photos_are_indexed_where_pillow_decodes_them(tmp_path, tiny_model) -> None:
    from PIL import features

    from retrieval.config import IMAGE_EXTENSIONS

    assert (".avif" in IMAGE_EXTENSIONS) == features.check("avif")
    if not features.check("avif"):
        pytest.skip("this Pillow cannot decode AVIF")
    folder = tmp_path / "photos"
    folder.mkdir()
    _picture().save(folder / "photo.avif", quality=95)
    _picture().save(folder / "same.png")
    with retrieval.open_index(tmp_path / "idx", model=tiny_model, pretrained="random") as idx:
        report = idx.add([folder], workers=0)
        assert (report.added, report.skipped) == (2, 0), report.failures
        avif, png = idx.embed_images([folder / "photo.avif", folder / "same.png"])
    assert float(avif @ png) > 0.99  # the same picture, decoded (lossy AVIF vs PNG)


def test_heic_photos_are_indexed_with_pillow_heif_also_in_decode_processes(tmp_path, tiny_model) -> None:
    pillow_heif = pytest.importorskip("pillow_heif")
    import numpy as np

    from retrieval.config import IMAGE_EXTENSIONS
    from retrieval.images import Geometry, decode_many

    assert {".heic", ".heif"} <= IMAGE_EXTENSIONS
    folder = tmp_path / "iphone"
    folder.mkdir()
    for i in range(4):  # the worker processes never saw pillow-heif registered by this one
        pillow_heif.from_pillow(_picture((96 + 8 * i, 72))).save(folder / f"IMG_{i}.HEIC", quality=95)
    _picture().save(folder / "same.png")
    paths = sorted(str(p) for p in folder.glob("*.HEIC"))
    decoded = list(decode_many(paths, Geometry(32), workers=2))
    assert [d.error for d in decoded] == [None] * 4
    png = next(decode_many([str(folder / "same.png")], Geometry(32), workers=0)).pixels
    assert np.abs(decoded[0].pixels.astype(int) - png).mean() < 8
    with retrieval.open_index(tmp_path / "idx", model=tiny_model, pretrained="random") as idx:
        report = idx.add([folder], workers=0)
        assert (report.added, report.skipped) == (5, 0), report.failures


def test_a_damaged_database_is_one_line_for_readers_and_writers(runner, tmp_path, tiny_model, photos) -> None:
    from retrieval.store import Store

    index = tmp_path / "idx"
    build(runner, index, tiny_model, photos)
    invoke(runner, "reindex", "--index", index)  # checkpoints the WAL into the database file
    db = index / "mmsearch.db"
    data = bytearray(db.read_bytes())
    page = 16384
    assert len(data) > 2 * page
    for offset in range(page, len(data), page):  # the schema (page 1) survives, the tables do not
        data[offset : offset + 512] = b"\x07" * 512
    db.write_bytes(bytes(data))
    for argv in (["query", "a cat"], ["info"], ["index", photos], ["remove", photos]):
        one_line_error(invoke(runner, *argv, "--index", index), "is damaged or not a database")
    with pytest.raises(retrieval.IndexDamaged):  # the SQLAlchemy writer says the same
        Store.open(index).add_roots([str(tmp_path / "more")])

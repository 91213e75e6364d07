"""A real photo library: bad files, kills at any moment, damaged caches, concurrent use, read-only dirs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import retrieval
from conftest import REPO, run_mmsearch, solid_image


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims a huge size (a decompression bomb) with hardly any data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))  # noqa: E731
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def make_library(root: Path) -> tuple[set[str], set[str]]:
    """Generate the good and bad files of a messy library; returns (good image paths, bad paths)."""
    rng = np.random.default_rng(7)
    good: list[Path] = []
    bad: list[Path] = []
    pattern = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).resize((120, 90))
    good.append(root / "upright.jpg")
    pattern.save(good[-1], quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6
    good.append(root / "rotated.jpg")
    pattern.transpose(Image.Transpose.ROTATE_90).save(good[-1], exif=exif, quality=95)
    good.append(root / "cmyk.jpg")
    pattern.convert("CMYK").save(good[-1])
    good.append(root / "sixteen.png")
    Image.fromarray((np.asarray(pattern.convert("L"), dtype=np.uint16) * 257)).save(good[-1])
    good.append(root / "palette.png")
    pattern.convert("P").save(good[-1], transparency=0)
    good.append(root / "anim.gif")
    pattern.save(good[-1], save_all=True, append_images=[pattern.rotate(90)])
    good.append(root / "one.png")
    Image.new("RGB", (1, 1), (9, 9, 9)).save(good[-1])
    good.append(root / "gray.jpg")
    pattern.convert("L").save(good[-1])
    good.append(root / "huge.jpg")  # 108 MP: embedded, through JPEG draft decoding
    Image.new("RGB", (12000, 9000), (30, 90, 200)).save(good[-1], quality=50)
    for name in ["with space.png", "ünïcødé 写真.png", "new\nline.png"]:
        good.append(solid_image(root / "names" / name, (200, 10, 10)))

    bad.append(root / "zero.jpg")
    bad[-1].write_bytes(b"")
    full = (root / "upright.jpg").read_bytes()
    bad.append(root / "half.jpg")
    bad[-1].write_bytes(full[: len(full) // 2])
    png = bytearray((root / "one.png").read_bytes())
    png[29] ^= 0xFF  # inside IHDR's CRC
    bad.append(root / "crc.png")
    bad[-1].write_bytes(bytes(png))
    bad.append(root / "text.jpg")
    bad[-1].write_text("just some words")
    bad.append(root / "page.png")
    bad[-1].write_text("<!doctype html><html><body>saved web page</body></html>")
    bad.append(root / "bomb.png")
    png_header_only(bad[-1], 30000, 30000)
    bad.append(root / "dangling.jpg")
    os.symlink(root / "nowhere.jpg", bad[-1])
    os.symlink(root, root / "names" / "loop")  # a folder symlink loop: walked once
    return {str(p) for p in good}, {str(p) for p in bad}


def make_corpora(root: Path) -> tuple[int, set[str]]:
    """Text corpora with bad records; returns (good entries, bad record locations)."""
    root.mkdir()
    (root / "lines.txt").write_bytes(b"a red circle\n\n   \nbad \xff\xfe bytes\n" + b"x" * 100_000 + b"\nlast line\n")
    (root / "rows.csv").write_text("id,text\n1,a blue star\n2,\n3,green cross\n")
    (root / "recs.jsonl").write_text('{"text": "white square"}\n{"text": broken\n{"caption": "black circle"}\n')
    bad = {f"{root / 'lines.txt'}:4", f"{root / 'rows.csv'}:2", f"{root / 'recs.jsonl'}:2"}
    return 7, bad


def test_messy_library_indexes_every_good_file(tmp_path, tiny_model) -> None:
    library = tmp_path / "library"
    (library / "names").mkdir(parents=True)
    good, bad = make_library(library)
    n_texts, bad_records = make_corpora(tmp_path / "texts")
    index = tmp_path / "idx"
    failures_file = tmp_path / "failures.tsv"
    result = run_mmsearch("index", library, tmp_path / "texts", "--index", index, "--model", tiny_model,
                          "--pretrained", "random", "--failures", failures_file)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert f"skipped {len(bad) + len(bad_records)}" in result.stderr
    assert f"{n_texts} texts" in result.stderr and "1 truncated" in result.stderr

    with retrieval.open_index(index, create=False) as idx:
        indexed = {r.path for r in idx.search(np.ones(32, np.float32), k=100, target="images")}
        assert indexed == good
        recorded = dict(idx.failures())
        upright, rotated = idx.embed_images([library / "upright.jpg", library / "rotated.jpg"])
        assert float(upright @ rotated) > 0.99  # EXIF orientation applied before embedding
    assert set(recorded) == bad | bad_records
    assert recorded[str(library / "bomb.png")].startswith("image too large")
    assert recorded[str(library / "zero.jpg")] == "empty file"
    assert recorded[str(library / "dangling.jpg")] == "broken symlink"
    assert recorded[f"{tmp_path / 'texts' / 'lines.txt'}:4"] == "invalid UTF-8"
    assert "malformed JSON" in recorded[f"{tmp_path / 'texts' / 'recs.jsonl'}:2"]
    assert len(failures_file.read_text().splitlines()) >= len(bad) + len(bad_records)
    listed = run_mmsearch("info", "--index", index, "--failures")
    assert "bomb.png" in listed.stdout
    query = run_mmsearch("query", "a red circle", "--index", index, "--target", "all", "--json")
    assert query.returncode == 0 and len(json.loads(query.stdout)) == 10


KILLER = r"""
import os, signal, sys
sys.path.insert(0, {repo!r})
point, after = sys.argv[1], int(sys.argv[2])
calls = [0]
def boom():
    calls[0] += 1
    if calls[0] > after:
        os.kill(os.getpid(), signal.SIGKILL)
if point == "embed":  # a batch decoded and in the model: between two commits
    from retrieval.encoder import Encoder
    orig = Encoder.embed_pixels
    Encoder.embed_pixels = lambda self, px: (boom(), orig(self, px))[1]
elif point == "commit":  # inside a store transaction, rows written but not committed
    from retrieval.store import Store
    orig = Store._bump
    Store._bump = lambda self, conn: (boom(), orig(self, conn))[1]
elif point == "faiss":  # the vector file written to its temp name, not yet renamed
    real = os.replace
    os.replace = lambda a, b: (boom() if str(b).endswith(".faiss") else None, real(a, b))[1]
elif point == "slow":  # keep the index busy (for the concurrency test)
    import time
    from retrieval.encoder import Encoder
    orig = Encoder.embed_pixels
    Encoder.embed_pixels = lambda self, px: (time.sleep(0.4), orig(self, px))[1]
import cli
sys.argv = ["mmsearch", *sys.argv[3:]]
cli.main()
"""


def index_with_fault(point: str, after: int, *args: object, wait: bool = True) -> subprocess.Popen | subprocess.CompletedProcess:
    argv = [sys.executable, "-c", KILLER.format(repo=str(REPO)), point, str(after), "index", *map(str, args)]
    if wait:
        return subprocess.run(argv, capture_output=True, text=True, timeout=300)
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def many_images(root: Path, n: int) -> Path:
    rng = np.random.default_rng(3)
    root.mkdir(exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(root / f"p{i:03d}.png")
    return root


def assert_consistent(index: Path) -> dict[int, str]:
    """Rows and vectors agree and the index answers; returns the committed image ids."""
    with retrieval.open_index(index, create=False) as idx:
        rows = idx.reader.item_ids("image")
        assert np.array_equal(np.sort(idx.vectors("image").ids()), rows)
        hits = idx.search(np.ones(32, np.float32), k=len(rows) or 1, target="images") if len(rows) else []
        assert len(hits) == len(rows)
        return {h.id: h.path for h in hits}


@pytest.mark.parametrize("point, after, committed", [
    ("embed", 0, 0),    # early: before the first commit
    ("embed", 3, 24),   # mid-run: three batches committed, the fourth in the model
    ("commit", 2, 16),  # inside the third batch's transaction
    ("faiss", 0, 40),   # while writing the vector file at the end
])
def test_kill_loses_at_most_the_batch_in_flight(tmp_path, tiny_model, point, after, committed) -> None:
    photos = many_images(tmp_path / "photos", 40)
    index = tmp_path / "idx"
    common = [photos, "--index", index, "--model", tiny_model, "--pretrained", "random", "--batch-size", "8", "--workers", "0"]
    killed = index_with_fault(point, after, *common)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    if committed == 0 and not (index / "mmsearch.db").exists():
        before: dict[int, str] = {}
    else:
        before = assert_consistent(index)
    assert len(before) == committed
    resumed = run_mmsearch("index", *common)
    assert resumed.returncode == 0, resumed.stderr
    assert f"added {40 - committed}," in resumed.stderr
    after_ids = assert_consistent(index)
    assert len(after_ids) == 40
    assert all(after_ids.get(i) == p for i, p in before.items())  # committed items were not embedded again


def test_damaged_or_missing_vector_file_is_rebuilt(tmp_path, tiny_model) -> None:
    photos = many_images(tmp_path / "photos", 12)
    index = tmp_path / "idx"
    run_mmsearch("index", photos, "--index", index, "--model", tiny_model, "--pretrained", "random", "--workers", "0")
    first = json.loads(run_mmsearch("query", "x", "--index", index, "--json", "-k", "12").stdout)
    faiss_file = index / "vectors-image.faiss"
    faiss_file.write_bytes(faiss_file.read_bytes()[:100])
    damaged = run_mmsearch("query", "x", "--index", index, "--json", "-k", "12")
    assert damaged.returncode == 0 and "rebuilding" in damaged.stderr
    assert json.loads(damaged.stdout) == first
    faiss_file.unlink()
    missing = run_mmsearch("query", "x", "--index", index, "--json", "-k", "12")
    assert missing.returncode == 0 and json.loads(missing.stdout) == first


def test_concurrent_query_answers_and_second_index_is_refused(tmp_path, tiny_model) -> None:
    photos = many_images(tmp_path / "photos", 64)
    index = tmp_path / "idx"
    common = ["--index", index, "--model", tiny_model, "--pretrained", "random", "--batch-size", "4", "--workers", "0"]
    run_mmsearch("index", photos / "p000.png", *common)
    writer = index_with_fault("slow", 0, photos, *common, wait=False)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with retrieval.open_index(index, create=False) as idx:
                if len(idx.reader.item_ids("image")) > 4:
                    break
            time.sleep(0.2)
        assert writer.poll() is None, "the writer finished too early for this test"
        second = run_mmsearch("index", photos, *common)
        assert second.returncode == 1 and "in use" in second.stderr
        reader = run_mmsearch("query", "x", "--index", index, "--json", "-k", "3")
        assert reader.returncode == 0 and len(json.loads(reader.stdout)) == 3
    finally:
        out, err = writer.communicate(timeout=120)
    assert writer.returncode == 0, err
    assert len(assert_consistent(index)) == 64


def _read_only_runner(path: Path) -> list[str] | None:
    """A command prefix that runs with `path` on a read-only mount, or None where impossible."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        return []
    if shutil.which("unshare") and subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0:
        return ["unshare", "-rm", "sh", "-c", f'mount --bind -o ro "{path}" "{path}" && exec "$@"', "sh"]
    return None


def test_index_waits_for_a_busy_index_when_asked(tmp_path, tiny_model) -> None:
    import fcntl
    import threading

    photos = many_images(tmp_path / "photos", 3)
    index = tmp_path / "idx"
    common = ["--index", index, "--model", tiny_model, "--pretrained", "random", "--workers", "0"]
    assert run_mmsearch("index", photos / "p000.png", *common).returncode == 0
    fd = os.open(index / "lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another writer holds the index
    try:
        start = time.monotonic()
        refused = run_mmsearch("index", photos, *common, "--wait", "1")
        assert refused.returncode == 1 and "in use" in refused.stderr and time.monotonic() - start >= 1
        release = threading.Timer(2.0, fcntl.flock, (fd, fcntl.LOCK_UN))
        release.start()
        waited = run_mmsearch("index", photos, *common, "--wait", "60")
        release.join()
    finally:
        os.close(fd)
    assert waited.returncode == 0, waited.stderr
    assert "waiting up to 60 s" in waited.stderr and "added 2" in waited.stderr


def test_read_only_index_refuses_writes_and_keeps_answering(tmp_path, tiny_model) -> None:
    photos = many_images(tmp_path / "photos", 6)
    index = tmp_path / "idx"
    run_mmsearch("index", photos, "--index", index, "--model", tiny_model, "--pretrained", "random", "--workers", "0")
    solid_image(photos / "new.png", (1, 2, 3))
    before = {p.name: p.read_bytes() for p in index.iterdir() if p.is_file()}
    prefix = _read_only_runner(index)
    if prefix is None:
        pytest.skip("no way to make a read-only directory here")
    cmd = [*prefix, sys.executable, str(REPO / "cli.py")]
    env = {**os.environ}
    write = subprocess.run([*cmd, "index", str(photos), "--index", str(index)], capture_output=True, text=True, env=env, timeout=120)
    assert write.returncode == 1 and "read-only" in write.stderr, write.stderr
    assert "Traceback" not in write.stderr
    read = subprocess.run([*cmd, "query", "x", "--index", str(index), "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert read.returncode == 0, read.stderr
    assert len(json.loads(read.stdout)) == 6
    if os.geteuid() != 0:
        index.chmod(0o755)
    assert {p.name: p.read_bytes() for p in index.iterdir() if p.is_file()} == before


def test_index_from_an_older_schema_is_migrated_when_opened(tmp_path, tiny_model) -> None:
    """A query on an index whose schema lacks the newest migration migrates it first, losing nothing."""
    import sqlite3

    from retrieval.reader import SCHEMA_VERSION

    photos = tmp_path / "photos"
    for i, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        solid_image(photos / f"{i}.png", color)
    index = tmp_path / "idx"
    assert run_mmsearch("index", str(photos), "--index", str(index), "--model", tiny_model, "--pretrained", "random").returncode == 0
    with sqlite3.connect(index / "mmsearch.db") as db:
        db.execute("DELETE FROM migrations WHERE name = ?", (SCHEMA_VERSION,))
    with retrieval.open_index(index, create=False) as idx:
        assert not idx.reader.needs_migration()
        assert len(idx.search("a red square", k=5)) == 3

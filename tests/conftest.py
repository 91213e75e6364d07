"""Shared fixtures: a tiny random open_clip model built from a config, generated images, CLI runners."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from PIL import Image

REPO = Path(__file__).resolve().parent.parent

# Reading the text in every indexed image (where Tesseract is installed) would slow the whole suite:
# OCR is off unless a test turns it on (tests/test_words.py). Set here, so module-scoped indexes see it.
os.environ["MMSEARCH_OCR"] = "off"

#: A tiny CLIP (ViT 2x64, text 2x64, 32 px): random weights, seeded, built in well under a second.
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ONNX export cache for the whole run (exports are keyed by model identity)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _offline_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_cache: Path) -> None:
    """No test may reach a model hub or touch the user's index or cache."""
    monkeypatch.setenv("MMSEARCH_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("MMSEARCH_CACHE", str(model_cache))
    monkeypatch.setenv("MMSEARCH_INDEX", str(tmp_path / "default-index"))
    monkeypatch.delenv("MMSEARCH_MODEL", raising=False)
    monkeypatch.delenv("MMSEARCH_PRETRAINED", raising=False)
    monkeypatch.delenv("MMSEARCH_DB", raising=False)
    monkeypatch.delenv("MMSEARCH_VECTORS", raising=False)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of the tiny model's open_clip config (use with pretrained='random')."""
    path = tmp_path_factory.mktemp("models") / "tiny-clip.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return str(path)


def release_index_copy(name: str, tmp_path: Path) -> Path:
    """A copy of the index a previous release made (`tests/data/NAME`), its model's checkpoint pointed
    at this checkout's bundled one."""
    import shutil

    from retrieval.config import BUNDLED_DIR

    index = tmp_path / name
    shutil.copytree(Path(__file__).parent / "data" / name, index)
    with sqlite3.connect(index / "mmsearch.db") as db:
        model = json.loads(db.execute("SELECT value FROM meta WHERE key = 'model'").fetchone()[0])
        model["pretrained"] = str(BUNDLED_DIR / "shapes-mini.pt")
        db.execute("UPDATE meta SET value = ? WHERE key = 'model'", (json.dumps(model),))
    db.close()
    return index


def immutable_reader(index: Path):
    """The library's reader of an index directory's database opened read-only and immutable (as on a
    read-only medium): nothing can be written or migrated through it."""
    from retrieval.reader import StoreReader

    return StoreReader(sqlite3.connect(f"file:{index / 'mmsearch.db'}?mode=ro&immutable=1", uri=True), index)


def solid_image(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (48, 40), **save: object) -> Path:
    """Write an image with a colored square on a contrasting background."""
    img = Image.new("RGB", size, tuple(255 - c for c in color))
    w, h = size
    img.paste(color, (w // 4, h // 4, 3 * w // 4, 3 * h // 4))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **save)
    return path


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """A small folder of distinct images in several formats, one in a subfolder."""
    root = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for i, ext in enumerate(["jpg", "png", "webp", "JPG", "bmp", "gif"]):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        solid_image(root / ("sub" if i == 5 else "") / f"img{i}.{ext}", color)
    (root / "notes.md").write_text("not indexed")
    return root


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def invoke(runner: CliRunner, *args: str) -> Result:
    """Run the mmsearch CLI in-process."""
    from cli import cli

    return runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)


def run_mmsearch(*args: str, env: dict[str, str] | None = None, timeout: float = 120,
                 **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run `mmsearch` in a fresh process (for exit codes, stderr, timing and kills)."""
    return subprocess.run([sys.executable, str(REPO / "cli.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})}, **kwargs)


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(index: Path, *args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """`mmsearch serve` in a subprocess on a free loopback port; returns it and its base URL once it answers."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / "cli.py"), "serve", "--index", str(index), "--port", str(port),
                             *args], stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    line = proc.stderr.readline()  # "serving ... at http://127.0.0.1:PORT/"
    if f":{port}/" not in line:
        proc.kill()
        raise AssertionError(f"server did not start: {line}{proc.stderr.read()}")
    return proc, f"http://127.0.0.1:{port}"


def stop_server(proc: subprocess.Popen) -> None:
    """Stop a server from `start_server` (SIGTERM: uvicorn shuts down cleanly)."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    proc.stderr.close()


#: A file name that is also HTML: the gallery must show it as text.
EVIL_NAME = "<img src=x onerror=alert(1)>.png"


@pytest.fixture(scope="session")
def gallery_index(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Path:
    """The demo corpus plus an image named like an HTML tag, indexed with shapes-mini once per run."""
    import shutil

    import retrieval

    root = tmp_path_factory.mktemp("gallery")
    shutil.copytree(REPO / "index_data" / "demo", root / "demo")
    solid_image(root / "demo" / EVIL_NAME, (200, 30, 30), (90, 60))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMSEARCH_CACHE", str(model_cache))
        mp.setenv("MMSEARCH_OFFLINE", "1")
        with retrieval.open_index(root / "index", model="shapes-mini") as idx:
            idx.add([root / "demo"])
    return root / "index"



@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL cluster for the run (see `pg_cluster`), durability off. Yields the
    server's URL without a database; skips (with the reason) where PostgreSQL or psycopg is missing."""
    from pg_cluster import Unavailable, cluster

    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'mmsearch[cluster]')")
    try:
        with cluster(durable=False) as url:
            yield url
    except Unavailable as exc:
        pytest.skip(str(exc))

@pytest.fixture
def pg_db(postgres: str, request: pytest.FixtureRequest) -> str:
    """The URL of a new, empty database on the test cluster, for one test."""
    import psycopg

    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name.lower())[:50] + f"_{os.getpid()}"
    with psycopg.connect(postgres.replace("+psycopg", "") + "/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{postgres}/{name}"

"""A clean install anywhere: the wheel carries the bundled model and demo, and `mmsearch demo` needs no repo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import retrieval
from conftest import REPO, run_mmsearch

pytestmark = pytest.mark.skipif(not (REPO / "index_data" / "shapes-mini.pt").exists(), reason="bundled model not built")

#: What a wheel is built from: the repo's top level, without build leftovers or caches.
SOURCES = ("pyproject.toml", "README.md", "cli.py", "retrieval", "index_data")
DEMO_FILES = sorted(p.name for p in (REPO / "index_data" / "demo").iterdir())


def test_demo_path_is_the_bundled_corpus() -> None:
    demo = retrieval.demo_path()
    assert sorted(p.name for p in demo.iterdir()) == DEMO_FILES
    assert len([n for n in DEMO_FILES if n.startswith("red_circle_")]) >= 1


def test_demo_command_indexes_into_a_temporary_index(tmp_path: Path) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    done = run_mmsearch("demo", "--query", "a blue star", "-k", "2", cwd=tmp_path,
                        env={"TMPDIR": str(tmpdir), "MMSEARCH_INDEX": str(tmp_path / "not-this")})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and all("blue_star_" in line for line in lines), done.stdout
    assert "added 51" in done.stderr and "60 texts" in done.stderr
    assert list(tmpdir.glob("mmsearch-demo-*")) == [], "the temporary index was left behind"
    assert [p.name for p in tmp_path.iterdir()] == ["tmp"], "the demo wrote into the working directory"
    assert not (tmp_path / "not-this").exists(), "the demo wrote into the user's index"


def test_demo_command_keeps_the_index_it_is_given(tmp_path: Path) -> None:
    index = tmp_path / "demo-index"
    first = run_mmsearch("demo", "--index", index, "-k", "1")
    assert first.returncode == 0, first.stderr
    assert "red_circle_" in first.stdout
    again = run_mmsearch("query", "a green square", "--index", index, "-k", "1", "--json")
    assert again.returncode == 0, again.stderr
    assert Path(json.loads(again.stdout)[0]["path"]).name.startswith("green_square_")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel `pip wheel .` builds from a clean copy of the repo (no network, no build isolation)."""
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(REPO / name, src / name)
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(dist), str(src)], check=True, capture_output=True, timeout=300)
    (built,) = dist.glob("mmsearch-*.whl")
    return built


def test_wheel_holds_the_model_and_demo_but_not_the_scripts(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    bundled = sorted(n.removeprefix("retrieval/bundled/") for n in names if n.startswith("retrieval/bundled/"))
    assert bundled == sorted(["__init__.py", "shapes-mini.json", "shapes-mini.pt", *(f"demo/{n}" for n in DEMO_FILES)])
    assert not [n for n in names if n.startswith("index_data/")]
    assert not [n for n in names if n.endswith(("train_shapes_mini.py", "make_demo.py", "shapes.py", "build_hooks.py"))]


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding only the wheel, that sees this venv's packages (torch, click, ...) through a .pth.

    The .pth names this venv's site-packages as plain paths: their own .pth files, such as the editable
    install's finder that maps `retrieval` to a checkout, are not run, so `retrieval` comes from the wheel.
    """
    env_dir = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    python = env_dir / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, capture_output=True, timeout=300)
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(purelib) / "test-venv-packages.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))
    return env_dir


def in_venv(venv: Path, cwd: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_installed_wheel_runs_from_any_directory(venv: Path, tmp_path: Path) -> None:
    work = tmp_path / "elsewhere"
    work.mkdir()
    probe = in_venv(venv, work, venv / "bin" / "python", "-c",
                    "import json, sysconfig, retrieval; print(json.dumps([retrieval.__file__, str(retrieval.demo_path()),"
                    " sysconfig.get_paths()['purelib']]))")
    assert probe.returncode == 0, probe.stderr
    module, demo, purelib = map(Path, json.loads(probe.stdout))
    assert module == Path(purelib) / "retrieval" / "__init__.py", "retrieval was not imported from the wheel"
    assert demo == Path(purelib) / "retrieval" / "bundled" / "demo"
    assert not (Path(purelib) / "index_data").exists()

    mmsearch = venv / "bin" / "mmsearch"
    index = tmp_path / "idx"
    done = in_venv(venv, work, mmsearch, "index", demo, "--model", "shapes-mini", "--index", index)
    assert done.returncode == 0, done.stderr
    assert "added 51" in done.stderr
    found = in_venv(venv, work, mmsearch, "query", "a red circle", "--index", index, "-k", "3", "--json")
    assert found.returncode == 0, found.stderr
    top = json.loads(found.stdout)[0]["path"]
    assert Path(top).parent == demo and Path(top).name.startswith("red_circle_")

    shown = in_venv(venv, work, mmsearch, "demo", "--query", "a yellow triangle", "-k", "1")
    assert shown.returncode == 0, shown.stderr
    assert f"{demo}/yellow_triangle_" in shown.stdout
    assert list(work.iterdir()) == [], "running from a directory wrote into it"


def test_installed_wheel_has_no_top_level_cli_module(venv: Path, tmp_path: Path) -> None:
    probe = in_venv(venv, tmp_path, venv / "bin" / "python", "-c",
                    "import importlib.util as u; print(u.find_spec('cli') is None, u.find_spec('index_data') is None)")
    assert probe.stdout.split() == ["True", "True"], probe.stderr

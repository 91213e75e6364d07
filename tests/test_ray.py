"""Image ingest on Ray Data (`index --ray`, `add(ray=...)`) against the local path, on a local `ray.init(num_cpus=2)`.

Compared item by item with the local path; a worker killed mid-ingest (Ray restarts it and retries
its batch) and a driver killed mid-way (re-run) leave exactly one row per file. Skipped without Ray.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import retrieval
from retrieval.errors import ClusterUnavailable

from conftest import REPO, invoke, solid_image

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from retrieval.ray_ingest import Embedder, RayIngest  # noqa: E402 - only with Ray installed


@pytest.fixture(scope="module", autouse=True)
def ray_session() -> object:
    """One local Ray for the module: 2 CPUs, no dashboard, loopback only, its files in a temp dir.

    Its workers import this checkout's `retrieval` (py_modules), as `RayIngest` arranges when it starts Ray.
    """
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=temp,
             log_to_driver=False, logging_level="ERROR",
             runtime_env={"py_modules": [str(REPO / "retrieval")]})
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """The bundled demo corpus (50 images, captions) plus one broken image and one empty file."""
    root = tmp_path / "corpus"
    shutil.copytree(retrieval.demo_path(), root)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "empty.png").write_bytes(b"")
    return root


def _rows(index: Path) -> tuple[dict[str, np.ndarray], list[tuple[str, str]], list[str]]:
    """(image vectors by path, failures, every file path with repeats) as stored in an index."""
    with retrieval.open_index(index, create=False) as idx:
        vectors = {}
        for ids, vecs in idx.reader.vectors("image"):
            rows = idx.reader.items(ids.tolist())
            vectors.update((rows[int(i)].path, v) for i, v in zip(ids, vecs))
        failures = sorted(idx.failures())
    db = sqlite3.connect(index / "mmsearch.db")
    try:
        files = [path for (path,) in db.execute("SELECT path FROM files")]  # repeats would show here
    finally:
        db.close()
    return vectors, failures, files


def _assert_same(local: Path, clustered: Path) -> None:
    """Same files, same failures, each image's vector within cosine 0.99, one row per file."""
    mine, my_failures, my_files = _rows(clustered)
    theirs, their_failures, their_files = _rows(local)
    assert sorted(my_files) == sorted(their_files) and len(set(my_files)) == len(my_files)
    assert my_failures == their_failures
    assert mine.keys() == theirs.keys()
    worst = min(float(mine[p] @ theirs[p]) for p in mine)
    assert worst >= 0.99, worst


def _index_local(corpus: Path, index: Path) -> retrieval.IndexReport:
    with retrieval.open_index(index, model="shapes-mini") as idx:
        return idx.add([corpus])


def test_ray_ingest_matches_the_local_path_and_a_rerun_adds_nothing(tmp_path: Path, corpus: Path) -> None:
    local = _index_local(corpus, tmp_path / "local")
    seen: list[int] = []
    totals: list[int] = []
    with retrieval.open_index(tmp_path / "ray", model="shapes-mini") as idx:
        report = idx.add([corpus], ray="local", batch_size=16, progress=seen.append, on_total=totals.append)
    assert (report.added, report.skipped, report.texts) == (local.added, local.skipped, local.texts) == (51, 2, 60)
    assert sorted(report.failures) == sorted(local.failures)
    assert sum(seen) == totals[0] == 53  # 52 image files and the captions, as the local path reports them
    _assert_same(tmp_path / "local", tmp_path / "ray")
    with retrieval.open_index(tmp_path / "ray") as idx:
        again = idx.add([corpus], ray="local")
        assert idx.search("a red circle", k=1)[0].path.endswith("red_circle_01.jpg")
    # the two failed files are tried again, as by the local path; nothing is added twice
    assert (again.added, again.updated, again.unchanged) == (0, 0, 51)
    _assert_same(tmp_path / "local", tmp_path / "ray")


class DiesOnce(Embedder):
    """An embedding actor whose process exits on its first batch, once per `marker` file."""

    marker = ""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not os.path.exists(self.marker):
            Path(self.marker).touch()
            os._exit(1)  # the worker process dies mid-batch, as a crash or the OOM killer does
        return super().__call__(batch)


def test_a_worker_killed_mid_ingest_is_retried_without_loss_or_doubles(tmp_path: Path, corpus: Path) -> None:
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    _index_local(corpus, tmp_path / "local")
    DiesOnce.marker = str(tmp_path / "died")
    with retrieval.open_index(tmp_path / "ray", model="shapes-mini") as idx:
        report = idx.add([corpus], ray=RayIngest("local", embedder=DiesOnce), batch_size=8)
    assert os.path.exists(DiesOnce.marker)  # it did die
    assert report.added == 51
    _assert_same(tmp_path / "local", tmp_path / "ray")


class CannotLoad(Embedder):
    """An embedding actor whose model cannot load on its node."""

    def __init__(self, spec: object, device: str) -> None:
        raise retrieval.ModelUnavailable("weights not found on this node")


def test_a_model_that_cannot_load_on_the_workers_is_a_one_line_error(tmp_path: Path, corpus: Path) -> None:
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with retrieval.open_index(tmp_path / "ray", model="shapes-mini") as idx:
        with pytest.raises(ClusterUnavailable, match="weights not found on this node") as caught:
            idx.add([corpus], ray=RayIngest("local", embedder=CannotLoad))
        assert "\n" not in str(caught.value)
        assert idx.info()["texts"] == 0 and idx.info()["images"] == 0


SLOW_DRIVER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[1])
    from retrieval import stores
    commit = stores.Storage.commit
    def slow(self, **changes):  # each committed batch then stays visible for a while
        result = commit(self, **changes)
        time.sleep(0.3)
        return result
    stores.Storage.commit = slow
    from retrieval.cli import main
    sys.argv = ["mmsearch", *sys.argv[2:]]
    main()
""")


def test_a_driver_killed_mid_way_resumes_with_one_row_per_file(tmp_path: Path, corpus: Path) -> None:
    _index_local(corpus, tmp_path / "local")
    index = tmp_path / "ray"
    # The driver joins this module's Ray (`--ray auto`), as a driver joins a running cluster.
    address = ray.get_runtime_context().gcs_address
    proc = subprocess.Popen([sys.executable, "-c", SLOW_DRIVER, str(REPO), "index", str(corpus), "--index", str(index),
                             "--model", "shapes-mini", "--ray", "auto", "--batch-size", "4"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "RAY_ADDRESS": address})
    committed = 0
    deadline = time.monotonic() + 120
    while committed < 8 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
        if (index / "mmsearch.db").exists():
            try:
                committed = len(_rows(index)[0])
            except (sqlite3.OperationalError, retrieval.MMSearchError):  # the database is being created
                pass
    assert proc.poll() is None, proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)  # the driver dies; the cluster outlives it
    proc.wait()
    proc.stderr.close()
    kept = len(_rows(index)[0])
    assert 8 <= kept < 50
    with retrieval.open_index(index) as idx:
        report = idx.add([corpus], ray="local")
    assert report.added == 51 - kept  # the rest of the images, and the captions
    _assert_same(tmp_path / "local", index)


def test_an_address_that_does_not_answer_is_refused_fast_and_leaves_nothing(tmp_path: Path, corpus: Path,
                                                                             runner: object) -> None:
    start = time.monotonic()
    result = invoke(runner, "index", str(corpus), "--index", str(tmp_path / "idx"), "--model", "shapes-mini",
                    "--ray", "ray://127.0.0.1:9")
    assert result.exit_code == 1
    assert "no Ray cluster answers at ray://127.0.0.1:9" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert time.monotonic() - start < 15
    assert not (tmp_path / "idx").exists()
    with pytest.raises(ClusterUnavailable, match="bad Ray address"):
        retrieval.open_index(tmp_path / "idx", model="shapes-mini").add([corpus], ray="head:10001")


def test_without_ray_the_error_names_the_extra(tmp_path: Path, corpus: Path, runner: object,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray.data", None)  # as if Ray Data were not installed
    monkeypatch.setenv("MMSEARCH_RAY", "local")
    result = invoke(runner, "index", str(corpus), "--index", str(tmp_path / "idx"), "--model", "shapes-mini")
    assert result.exit_code == 1
    assert "pip install 'mmsearch[cluster]'" in result.output
    assert not (tmp_path / "idx").exists()


@pytest.mark.cluster
def test_a_thousand_generated_images_match_the_local_path(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    root = tmp_path / "generated"
    for i in range(1000):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        size = (int(rng.integers(40, 200)), int(rng.integers(40, 200)))
        solid_image(root / f"d{i % 10}" / f"img{i:04d}.{('jpg', 'png', 'webp')[i % 3]}", color, size)
    _index_local(root, tmp_path / "local")
    with retrieval.open_index(tmp_path / "ray", model="shapes-mini") as idx:
        report = idx.add([root], ray="local")
    assert report.added == 1000
    _assert_same(tmp_path / "local", tmp_path / "ray")


#: The one line Ray 2.60's C++ core prints on the driver's stderr for every Ray Data actor pool (Ray Data
#: hands its actors their function through the object store; ray-project/ray#57733): see README, "Ingest on a Ray cluster".
RAY_ACTOR_ARGS_LINE = "has constructor arguments in the object store and max_restarts > 0"


@pytest.mark.cluster
def test_the_cli_with_a_local_ray_prints_only_its_own_lines(tmp_path: Path) -> None:
    """`mmsearch index --ray local` (a Ray started for the run, ~15 s): stdout empty, stderr mmsearch's
    summary and at most Ray's one known line; no Ray start-up, progress or worker output."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("red_circle_01.jpg", "blue_square_01.jpg", "black_cross_01.png"):
        shutil.copy(retrieval.demo_path() / name, photos / name)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"MMSEARCH_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(REPO / "cli.py"), "index", str(photos), "--index", str(tmp_path / "i"),
                           "--model", "shapes-mini", "--ray", "local"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    ours = [line for line in lines if RAY_ACTOR_ARGS_LINE not in line]
    assert len(ours) == 1 and ours[0].startswith("added 3, updated 0"), lines
    assert len(lines) - len(ours) <= 1, lines


def test_the_default_path_never_imports_ray(tmp_path: Path) -> None:
    code = (
        "import sys, retrieval, cli\n"
        "from click.testing import CliRunner\n"
        "assert CliRunner().invoke(cli.cli, ['--help']).exit_code == 0\n"
        f"r = CliRunner().invoke(cli.cli, ['index', {str(retrieval.demo_path())!r}, '--index', {str(tmp_path / 'i')!r},"
        " '--model', 'shapes-mini'])\n"
        "assert r.exit_code == 0, r.output\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]

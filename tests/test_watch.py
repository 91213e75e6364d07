"""`mmsearch watch`: new, changed and deleted files reach the index; bursts batch; half-written
files wait; polling works; a vanished folder loses nothing."""

from __future__ import annotations

import errno
import io
import logging
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

import retrieval
from retrieval.watch import Watcher
from conftest import REPO, solid_image

pytest.importorskip("watchdog")

SETTLE = 0.3


def colors(n: int) -> list[tuple[int, int, int]]:
    return [((37 * i) % 256, (91 * i + 40) % 256, (53 * i + 200) % 256) for i in range(n)]


class Run:
    """A Watcher running in a thread; `batches` records (roots, report) of each re-scan."""

    def __init__(self, idx: retrieval.Collection, root: Path, **options: object) -> None:
        self.batches: list = []
        self.changed = threading.Condition()
        self.stop = threading.Event()
        self.watcher = Watcher(idx, [str(root)], settle=SETTLE, interval=0.1, on_batch=self._done, **options)
        self.thread = threading.Thread(target=self.watcher.run, args=(self.stop,))

    def _done(self, roots: list[str], report: object) -> None:
        with self.changed:
            self.batches.append((roots, report))
            self.changed.notify_all()

    def wait_batches(self, n: int, timeout: float = 8.0) -> list:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.batches) >= n, timeout), f"{len(self.batches)} batches"
        return self.batches

    def __enter__(self) -> Run:
        self.thread.start()
        self.wait_batches(1)  # the catch-up scan of a (re)appearing root
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive()


@pytest.fixture()
def indexed(tmp_path, tiny_model):
    photos = tmp_path / "photos"
    for i, color in enumerate(colors(12)):
        solid_image(photos / f"p{i:02d}.png", color)
    with retrieval.open_index(tmp_path / "idx", model=tiny_model, pretrained="random") as idx:
        idx.add([photos], workers=0)
        yield idx, photos


def indexed_paths(idx: retrieval.Collection, photos: Path) -> set[str]:
    return {Path(p).name for p in idx.reader.files_under(str(photos))}


def test_new_changed_and_deleted_files_reach_the_index(indexed) -> None:
    idx, photos = indexed
    with Run(idx, photos) as run:
        new = solid_image(photos / "new.png", (10, 200, 30), size=(64, 64))
        run.wait_batches(2)
        assert "new.png" in indexed_paths(idx, photos)
        assert idx.search(new, k=1, target="images")[0].path == str(new)  # a query finds it

        before = idx.reader.file(str(photos / "p00.png")).sha256
        solid_image(photos / "p00.png", (250, 250, 0), size=(50, 30))
        run.wait_batches(3)
        assert run.batches[2][1].updated == 1
        assert idx.reader.file(str(photos / "p00.png")).sha256 != before

        (photos / "p01.png").unlink()
        run.wait_batches(4)
        assert run.batches[3][1].removed == 1
        assert "p01.png" not in indexed_paths(idx, photos)


def test_a_burst_is_indexed_in_few_batches(indexed) -> None:
    idx, photos = indexed
    with Run(idx, photos) as run:
        for i, color in enumerate(colors(20)):
            solid_image(photos / "burst" / f"b{i:02d}.png", color)
        run.wait_batches(2)
        time.sleep(3 * SETTLE)  # any further batch would come now
        added = sum(report.added for _, report in run.batches[1:])
        assert added == 20 and len(run.batches) - 1 <= 2


def test_a_file_still_being_written_waits_until_it_is_stable(indexed) -> None:
    idx, photos = indexed
    buffer = io.BytesIO()
    Image.new("RGB", (256, 256), (200, 10, 90)).save(buffer, format="BMP")
    data = buffer.getvalue()
    with Run(idx, photos) as run:
        with open(photos / "slow.bmp", "wb") as out:
            for start in range(0, len(data), len(data) // 8):  # 8 chunks, SETTLE/2 apart: 1.2 s of copying
                out.write(data[start:start + len(data) // 8])
                out.flush()
                time.sleep(SETTLE / 2)
                assert len(run.batches) == 1, "indexed while still being written"
        run.wait_batches(2)
    assert run.batches[1][1].added == 1 and not run.batches[1][1].failures
    row = idx.reader.file(str(photos / "slow.bmp"))
    assert row is not None and row.size == len(data)


def test_stability_is_checked_by_stat_not_only_by_events(indexed) -> None:
    """A write the observer never reports (a network mount) still has to hold still for --settle s."""
    idx, photos = indexed
    watcher = Watcher(idx, [str(photos)], settle=SETTLE, interval=0.1)
    path = photos / "quiet.png"
    solid_image(path, (1, 2, 3))
    watcher.mark(str(path))
    time.sleep(SETTLE * 1.2)
    with open(path, "ab") as out:  # grew since it was seen, without an event
        out.write(b"\0" * 10)
    assert watcher._ready() == []
    time.sleep(SETTLE * 1.2)
    assert watcher._ready() == [str(photos)]


def test_polling_mode_indexes_new_files(indexed) -> None:
    idx, photos = indexed
    with Run(idx, photos, poll=True) as run:
        solid_image(photos / "polled.png", (0, 0, 250))
        run.wait_batches(2)
    assert run.watcher.poll and "polled.png" in indexed_paths(idx, photos)


def test_inotify_out_of_watches_falls_back_to_polling(indexed, caplog) -> None:
    from watchdog.observers.polling import PollingObserver

    class NoWatches:
        def start(self) -> None:
            pass

        def schedule(self, *args: object, **kwargs: object) -> None:
            raise OSError(errno.ENOSPC, "inotify watch limit reached")

        def stop(self) -> None:
            pass

        def join(self, timeout: float) -> None:
            pass

    idx, photos = indexed
    factory = lambda poll: PollingObserver(timeout=0.1) if poll else NoWatches()  # noqa: E731
    with caplog.at_level(logging.WARNING, "mmsearch"), Run(idx, photos, observer_factory=factory) as run:
        solid_image(photos / "fallback.png", (90, 90, 250))
        run.wait_batches(2)
    assert run.watcher.poll and "polling" in caplog.text
    assert "fallback.png" in indexed_paths(idx, photos)


def test_emptied_or_vanished_folder_loses_nothing_and_is_picked_up_again(indexed, caplog, tmp_path) -> None:
    idx, photos = indexed
    saved = tmp_path / "saved"
    with caplog.at_level(logging.WARNING, "mmsearch"), Run(idx, photos) as run:
        shutil.copytree(photos, saved)
        for path in photos.iterdir():  # an unmounted mount point: an empty folder
            path.unlink()
        run.wait_batches(2)
        assert run.batches[1][1].kept == 12 and len(indexed_paths(idx, photos)) == 12

        photos.rmdir()  # the folder itself is gone
        time.sleep(1.0)
        assert "missing" in caplog.text and len(indexed_paths(idx, photos)) == 12
        assert run.thread.is_alive()

        shutil.copytree(saved, photos)  # remounted, with one new photo
        solid_image(photos / "back.png", (5, 250, 250))
        run.wait_batches(3)
    assert indexed_paths(idx, photos) == {f"p{i:02d}.png" for i in range(12)} | {"back.png"}


def test_another_writer_is_waited_for(indexed, caplog) -> None:
    idx, photos = indexed
    with (caplog.at_level(logging.WARNING, "mmsearch"), retrieval.open_index(idx.directory, create=False) as other,
          Run(idx, photos) as run):
        with other.writing():  # another process indexing
            solid_image(photos / "later.png", (120, 0, 120))
            time.sleep(4 * SETTLE)
            assert len(run.batches) == 1 and "retrying" in caplog.text
        run.wait_batches(2)
    assert "later.png" in indexed_paths(idx, photos)


def test_max_batches_bounds_the_loop(indexed) -> None:
    idx, photos = indexed
    start = time.monotonic()
    assert Watcher(idx, [str(photos)], settle=0.1, interval=0.05).run(max_batches=1) == 1
    assert time.monotonic() - start < 10


def test_cli_watch_indexes_a_new_file_and_stops_on_sigterm(indexed) -> None:
    idx, photos = indexed
    proc = subprocess.Popen([sys.executable, str(REPO / "cli.py"), "watch", "--index", str(idx.directory),
                             "--settle", "0.3", "--interval", "0.1"], stderr=subprocess.PIPE, text=True)
    deadline = threading.Timer(20, proc.kill)  # a readline never blocks the suite for long
    deadline.start()
    try:
        lines = [proc.stderr.readline(), proc.stderr.readline()]  # "watching ...", the catch-up batch
        solid_image(photos / "cli.png", (33, 66, 99))
        lines.append(proc.stderr.readline())
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=15)[1]
    finally:
        deadline.cancel()
        proc.kill()
    assert lines[0].startswith("watching ") and str(photos) in lines[0]
    assert "added 1," in lines[2], lines
    assert proc.returncode == 0 and rest.strip().endswith("stopped; everything committed is kept")
    assert "cli.png" in indexed_paths(idx, photos)

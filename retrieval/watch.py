"""Keep an index current: watch its folders and index what changes (`mmsearch watch`).

Events (watchdog's inotify observer, or its polling one where inotify is unavailable, out of
watches, or blind: network and FUSE mounts) only mark a root as changed. After `settle`
seconds without events, and once every changed file has kept its size and mtime for `settle`
seconds (a photo still being copied is not indexed half-written), the root is re-scanned with
`Collection.add`: incremental, so only new and changed files are embedded, and deletions go
through the prune rule (an unmounted drive never wipes the index). watchdog is imported here only.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from stat import S_ISREG
from typing import Any

from .collection import Collection
from .errors import IndexInUse, MMSearchError, NothingToIndex
from .indexer import IndexReport
from .reader import is_under

log = logging.getLogger("mmsearch")

#: OSError numbers of an inotify observer that cannot watch (no inotify, watch or instance limit reached).
INOTIFY_FAILURES = {errno.ENOSPC, errno.EMFILE, errno.ENOSYS, errno.ENOTSUP}

Stat = tuple[int, int] | None


def _stat(path: str) -> Stat:
    """(size, mtime_ns) of a file; None when it is gone (or not a file)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns) if S_ISREG(st.st_mode) else None


class Watcher:
    """Index a collection's `roots` (absolute folders) again whenever files under them change.

    `on_batch(roots, report)` is called after each re-scan. `poll=True` uses watchdog's
    PollingObserver (every `interval` s) instead of inotify; `observer_factory(poll)` replaces
    watchdog's observers (tests).
    """

    def __init__(self, collection: Collection, roots: Sequence[str], *, settle: float = 2.0, interval: float = 1.0,
                 poll: bool = False, on_batch: Callable[[list[str], IndexReport], None] | None = None,
                 observer_factory: Callable[[bool], Any] | None = None) -> None:
        self.collection = collection
        self.roots = [os.path.abspath(r) for r in roots]
        self.settle = settle
        self.interval = interval
        self.poll = poll
        self.on_batch = on_batch
        self._factory = observer_factory or _watchdog_observer(interval)
        self._index_dir = os.path.abspath(collection.directory)
        self._lock = threading.Lock()
        self._pending: dict[str, set[str]] = {}  # root -> changed paths, filled by the observer's thread
        self._last_event = 0.0
        self._seen: dict[str, tuple[Stat, float]] = {}  # path -> (stat, when first seen with it)
        self._watched: set[str] = set()
        self._missing: set[str] = set()  # roots warned about
        self._observer: Any = None

    # --- events (the observer's thread) -------------------------------------------------------

    def dispatch(self, event: Any) -> None:
        """Note a watchdog event (called by the observer for every change under a root)."""
        for path in (getattr(event, "src_path", ""), getattr(event, "dest_path", "")):
            path = os.fsdecode(path) if path else ""
            if path and not is_under(path, self._index_dir):  # an index kept inside a root changes itself
                self.mark(path)

    def mark(self, path: str) -> None:
        """Note that `path` changed (a file or folder under one of the roots)."""
        path = os.path.abspath(path)
        stat, now = _stat(path), time.monotonic()
        with self._lock:
            for root in self.roots:
                if is_under(path, root):
                    self._pending.setdefault(root, set()).add(path)
                    self._last_event = now
                    if self._seen.get(path, (False,))[0] != stat:
                        self._seen[path] = (stat, now)

    # --- observers ----------------------------------------------------------------------------

    def _start_observer(self) -> None:
        try:
            self._observer = self._factory(self.poll)
            self._observer.start()
            for root in list(self._watched):
                self._observer.schedule(self, root, recursive=True)
        except OSError as exc:
            if self.poll or exc.errno not in INOTIFY_FAILURES:
                raise
            log.warning("inotify cannot watch here (%s): polling every %g s instead", exc.strerror or exc, self.interval)
            self._stop_observer()
            self.poll = True
            self._start_observer()

    def _stop_observer(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    def _check_roots(self) -> None:
        """Watch roots that (re)appeared, forget those that vanished (unmounted): a warning, and keep waiting."""
        for root in self.roots:
            present = os.path.isdir(root) and os.access(root, os.R_OK)
            if present and root not in self._watched:
                self._watched.add(root)
                self._missing.discard(root)
                if self._observer is None:
                    self._start_observer()
                else:
                    try:
                        self._observer.schedule(self, root, recursive=True)
                    except OSError as exc:
                        if self.poll or exc.errno not in INOTIFY_FAILURES:
                            raise
                        self._stop_observer()  # restarts as a poller with every root
                        self._start_observer()
                self.mark(root)  # index what changed while it was away
            elif not present and root not in self._missing:
                self._missing.add(root)
                log.warning("%s is missing or unreadable (unmounted?): its index entries are kept; "
                            "waiting for it to come back", root)
                with self._lock:
                    self._pending.pop(root, None)
                if root in self._watched:
                    self._watched.discard(root)
                    self._stop_observer()  # watchdog cannot unwatch a deleted folder cleanly: start afresh
                    if self._watched:
                        self._start_observer()

    # --- batches ------------------------------------------------------------------------------

    def _stable(self, paths: set[str], now: float) -> bool:
        """Whether every path kept its size and mtime for `settle` seconds (stat now vs. stat before)."""
        stable = True
        for path in paths:
            stat = _stat(path)
            seen = self._seen.get(path)
            if seen is None or seen[0] != stat:
                self._seen[path] = (stat, now)
                stable = False
            elif now - seen[1] < self.settle:
                stable = False
        return stable

    def _ready(self) -> list[str]:
        """Roots quiet for `settle` s whose changed files are all stable; they leave the pending set."""
        now = time.monotonic()
        with self._lock:
            if not self._pending or now - self._last_event < self.settle:
                return []
            ready = [root for root, paths in self._pending.items() if self._stable(paths, now)]
            for root in ready:
                for path in self._pending.pop(root):
                    self._seen.pop(path, None)
        return ready

    def _index(self, roots: list[str]) -> bool:
        """Re-scan `roots`; False (and they stay pending) while another process holds the write lock."""
        try:
            report = self.collection.add(roots)
        except IndexInUse as exc:
            log.warning("%s; retrying", exc)
            with self._lock:
                for root in roots:
                    self._pending.setdefault(root, set()).add(root)
            return False
        except NothingToIndex:
            return True
        if self.on_batch:
            self.on_batch(roots, report)
        return True

    def run(self, stop_event: threading.Event | None = None, max_batches: int | None = None) -> int:
        """Watch until `stop_event` is set (or `max_batches` re-scans are done); returns the batches done.

        Each batch commits as it goes: stopping (Ctrl-C, SIGTERM) keeps everything committed.
        """
        stop = stop_event or threading.Event()
        batches = 0
        try:
            while not stop.is_set() and (max_batches is None or batches < max_batches):
                self._check_roots()
                roots = [r for r in self._ready() if r in self._watched]
                if roots and self._index(roots):
                    batches += 1
                    continue
                stop.wait(min(self.interval, self.settle / 2) or 0.05)
        finally:
            self._stop_observer()
        return batches


def _watchdog_observer(interval: float) -> Callable[[bool], Any]:
    """watchdog's native observer (inotify on Linux), or its PollingObserver for `poll`."""

    def make(poll: bool) -> Any:
        try:
            from watchdog.observers import Observer
            from watchdog.observers.polling import PollingObserver
        except ImportError:
            raise MMSearchError("watching needs watchdog: pip install 'mmsearch[watch]'") from None
        return PollingObserver(timeout=interval) if poll else Observer()

    return make


def watch_roots(collection: Collection, paths: Sequence[str] = ()) -> list[str]:
    """The absolute folders to watch: `paths`, else every root the index holds (NothingToIndex if none)."""
    roots = ([os.path.abspath(os.path.expanduser(str(p))) for p in paths]
             or [r for r in collection.storage.reader.roots() if not os.path.isfile(r)])  # folders, not corpora
    if not roots:
        raise NothingToIndex(f"index {collection.directory} has no folders to watch yet: run `mmsearch index PATH` first")
    return roots

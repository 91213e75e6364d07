"""The incremental indexing pipeline: scan → diff against the store → embed in batches → commit.

Each batch is one metadata-store transaction followed by the matching vector-store update
(`Storage.commit`), so a crash loses at most the batch in flight. Files are recognized by size + mtime, then by
content hash: a renamed file keeps its vectors, and a file whose root folder is missing
(an unmounted drive) is never removed. Nor is a file under a folder that cannot be listed,
nor (the prune rule) a large share of a root's files gone at once, unless told to prune.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

# The encoder, image and GPU decoding modules (PIL) load where files are hashed or decoded:
# `import retrieval` imports this module, and a query needs none of them.
from .config import PRUNE_MAX_FILES, PRUNE_MAX_SHARE, kind_of
from .errors import MMSearchError, NothingToIndex, PathNotFound, UnsupportedFile
from .reader import is_under, root_of
from .scan import Candidate, excluded, read_corpus, scan, type_counts
from .records import FileRow, NewFile, RootOptions

if TYPE_CHECKING:
    from .encoder import Encoder
    from .images import Decoded
    from .stores import MetadataReader, Storage

log = logging.getLogger("mmsearch")


class ImageEmbedder(Protocol):
    """Embeds image files and commits them in batches (`commit_images`), as `_embed_images` does."""

    def __call__(self, storage: Storage, encoder: Encoder, images: list[str], changed: set[str],
                 report: IndexReport, *, batch_size: int, workers: int, draft: bool,
                 progress: Callable[[int], None] | None) -> None: ...


#: Seconds between atomic saves of the vector cache during a long run.
SAVE_EVERY = 60.0
#: Images in the first batch; each next batch doubles, up to `batch_size`. Until the first batch is
#: full the model waits (and its session is built only then): a small one lets the model start while
#: the decoders work ahead, instead of after a whole batch is decoded (75 photos: ~0.3 s of 2.6 s).
FIRST_BATCH = 8


@dataclass
class IndexReport:
    """What an `index` run did."""

    added: int = 0
    updated: int = 0
    renamed: int = 0
    removed: int = 0
    unchanged: int = 0
    skipped: int = 0
    truncated: int = 0
    texts: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    missing_roots: list[str] = field(default_factory=list)
    #: Files missing from disk whose entries were kept: under a folder that could not be
    #: listed, or held back by the prune rule (see `warnings`).
    kept: int = 0
    #: Files skipped for their type (not failures): .heic, .cr2, no extension, ...
    ignored: list[str] = field(default_factory=list)
    #: Google Photos metadata files (Takeout .json sidecars) read for capture times, not indexed.
    sidecars: int = 0
    #: What was logged as a warning during the run, one line each.
    warnings: list[str] = field(default_factory=list)
    #: Paths named for this run (as given) from which the index now holds nothing.
    empty_paths: list[str] = field(default_factory=list)
    #: Number of paths named for this run (0 for a re-scan of the known roots).
    named_paths: int = 0
    #: Images whose text was read by OCR in this run (see `fill_words`); its seconds are timings["ocr"].
    ocr: int = 0
    #: Seconds spent on images: "images" (wall time of the image loop), "decode" (reading, hashing
    #: and decoding, summed over the decoders working in parallel with the rest), "wait_decode" (the
    #: loop waiting for decoded images), "embed" (batch stacking, host→device copy, model, copy
    #: back), "database" (commits + vector-cache updates), and where JPEGs are decoded on the GPU
    #: (`gpu_decode`), "device_decode" (that decode, with the CPU retries of files it rejects).
    timings: dict[str, float] = field(default_factory=dict)
    #: Items given a vector of one of the index's other models (`fill_vectors`), by model key.
    filled: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for the end of `mmsearch index`."""
        line = (f"added {self.added}, updated {self.updated}, renamed {self.renamed}, "
                f"removed {self.removed}, unchanged {self.unchanged}, skipped {self.skipped}")
        if self.texts:
            line += f"; {self.texts} texts"
        if self.truncated:
            line += f", {self.truncated} truncated to the model's context"
        if self.kept:
            line += f"; kept {self.kept} missing"
        for model, n in self.filled.items():
            line += f"; {n} items embedded with model {model}"
        if self.ocr:
            line += f"; read the text in {self.ocr} images ({self.timings.get('ocr', 0.0):.1f} s)"
        if self.sidecars:
            line += f"; {self.sidecars} Google Photos metadata files read, not indexed"
        ignored = self.ignored_summary()
        return f"{line}\n{ignored}" if ignored else line

    def ignored_summary(self) -> str | None:
        """'ignored 4 files of unsupported types: .heic 2, .cr2 1, (none) 1', or None."""
        if not self.ignored:
            return None
        by_type = type_counts(self.ignored)
        return (f"ignored {len(self.ignored)} files of unsupported types: "
                + ", ".join(f"{ext} {n}" for ext, n in by_type.items()))

    @property
    def nothing_indexed(self) -> bool:
        """Paths were named and the index holds nothing from any of them (the CLI then exits 1)."""
        return self.named_paths > 0 and len(self.empty_paths) == self.named_paths

    def warn(self, message: str) -> None:
        """Log a warning and keep it in the report."""
        log.warning("%s", message)
        self.warnings.append(message)


@dataclass
class Plan:
    """The diff of what is on disk against what the store holds."""

    new: list[Candidate] = field(default_factory=list)
    changed: list[Candidate] = field(default_factory=list)
    moved: list[tuple[int, str, int, float]] = field(default_factory=list)
    gone: list[FileRow] = field(default_factory=list)
    unchanged: int = 0
    #: Folders that could not be listed and files that could not be looked at.
    unreadable: list[str] = field(default_factory=list)
    #: The text field of each corpus to read, from its root's options.
    text_fields: dict[str, str | None] = field(default_factory=dict)
    #: Google Photos metadata files found (see `scan.google_metadata`).
    sidecars: list[str] = field(default_factory=list)
    #: Capture times from those files, by photo path (for photos without an EXIF date).
    taken: dict[str, float] = field(default_factory=dict)


def _resolve_roots(storage: Storage, paths: Sequence[str], report: IndexReport) -> list[str]:
    if not paths:
        roots = []
        known = storage.reader.roots()
        if not known:
            raise NothingToIndex(f"index {storage.location} has no folders to re-scan yet: "
                                 "run `mmsearch index PATH` first")
        for root in known:
            if os.path.exists(root) and os.access(root, os.R_OK):
                roots.append(root)
            else:
                report.missing_roots.append(root)
                log.warning("indexed root %s is missing or unreadable (unmounted?): kept as it was", root)
        return roots
    return check_paths(paths)


def check_paths(paths: Sequence[str]) -> list[str]:
    """The absolute roots of paths given to index; PathNotFound/UnsupportedFile before anything changes."""
    roots = []
    for raw in paths:
        root = os.path.abspath(os.path.expanduser(raw))
        if not os.path.exists(root):
            raise PathNotFound(f"no such file or folder: {raw}")
        if not os.access(root, os.R_OK):
            raise PathNotFound(f"cannot read: {raw}")
        if os.path.isfile(root) and kind_of(Path(root)) is None:
            raise UnsupportedFile(f"not an image or a text corpus (.txt, .jsonl, .json, .csv): {raw}")
        roots.append(root)
    return roots


def root_options(stored: dict[str, RootOptions], roots: Sequence[str], exclude: Sequence[str] | None,
                 include_hidden: bool | None, text_field: str | None) -> dict[str, RootOptions]:
    """How to scan each root (sorted, so a nested root comes after the one holding it).

    Each option given replaces the `stored` one (of the root, or for a new root, of the root
    holding it); an option not given (None) keeps it. Empty patterns and an empty field are dropped.
    """
    options = {}
    for root in sorted(set(roots)):
        holder = root_of(root, stored)
        base = stored[holder] if holder is not None else RootOptions()
        options[root] = RootOptions(
            base.exclude if exclude is None else tuple(p for p in exclude if p),
            base.include_hidden if include_hidden is None else include_hidden,
            base.text_field if text_field is None else (text_field or None),
        )
    return options


def prune_limits(reader: MetadataReader) -> tuple[float, int]:
    """(share, files) of the prune rule: the index's setting, else env MMSEARCH_PRUNE_MAX_SHARE / MMSEARCH_PRUNE_MAX_FILES, else config."""
    share = reader.setting("prune_max_share") or os.environ.get("MMSEARCH_PRUNE_MAX_SHARE") or PRUNE_MAX_SHARE
    files = reader.setting("prune_max_files") or os.environ.get("MMSEARCH_PRUNE_MAX_FILES") or PRUNE_MAX_FILES
    try:
        return float(share), int(files)
    except ValueError:
        raise MMSearchError(f"bad prune setting: share {share!r} (a fraction), files {files!r} (a count)") from None


def plan(reader: MetadataReader, options: dict[str, RootOptions], stored: dict[str, RootOptions],
         report: IndexReport, *, limits: tuple[float, int] | None = None) -> Plan:
    """Compare the files under the roots with the store: new, changed, moved, gone, unchanged.

    `options` are how to scan each root now, `stored` how each was scanned before (a changed
    text field re-reads the corpora). Entries under what could not be read are kept; so is a
    root's share of gone files past the prune rule's `limits` (share, files; None: no limit).
    Files left out by a root's exclude patterns go.
    """
    result = Plan()
    found: dict[str, Candidate] = {}
    known: dict[str, FileRow] = {}
    known_per_root: dict[str, int] = {}
    reread: set[str] = set()  # corpora to read again: their root's text field changed
    for root, opts in options.items():
        scanned = scan(root, opts.exclude, opts.include_hidden)
        report.failures.extend(scanned.failures)
        report.ignored.extend(scanned.ignored)
        result.unreadable.extend(scanned.unreadable)
        result.sidecars.extend(scanned.sidecars)
        result.taken.update(scanned.taken)
        found.update((c.path, c) for c in scanned.candidates)
        for cand in scanned.candidates:
            if cand.kind == "text":
                result.text_fields[cand.path] = opts.text_field
        field_changed = root in stored and stored[root].text_field != opts.text_field
        if field_changed:
            reread.update(c.path for c in scanned.candidates if Path(c.path).suffix.lower() != ".txt" and c.kind == "text")
        under = reader.files_under(root)
        known_per_root[root] = len(under)
        known.update(under)
    for path, cand in found.items():
        row = known.get(path)
        if row is None:
            result.new.append(cand)
        elif path in reread:
            result.changed.append(cand)
        elif (row.size, row.mtime) == (cand.size, cand.mtime):
            result.unchanged += 1
        elif row.size == cand.size and sha256_file_safe(path) == row.sha256:
            result.moved.append((row.id, path, cand.size, cand.mtime))  # touched, same content
            result.unchanged += 1
        else:
            result.changed.append(cand)
    gone = [row for path, row in known.items() if path not in found]
    # A rename keeps size and content: hash only new files whose size matches a vanished one.
    by_key = {(row.size, row.sha256): row for row in gone}
    sizes = {row.size for row in gone}
    still_new = []
    for cand in result.new:
        row = by_key.pop((cand.size, sha256_file_safe(cand.path)), None) if cand.size in sizes else None
        if row is not None and row.kind == cand.kind:
            result.moved.append((row.id, cand.path, cand.size, cand.mtime))
            report.renamed += 1
        else:
            still_new.append(cand)
    result.new = still_new
    moved_ids = {m[0] for m in result.moved}
    gone = [row for row in gone if row.id not in moved_ids]
    report.ignored = list(dict.fromkeys(report.ignored))  # a nested root's files are seen twice
    result.sidecars = list(dict.fromkeys(result.sidecars))
    report.sidecars = len(result.sidecars)
    result.gone = _apply_prune_rule(gone, options, known_per_root, result.unreadable, report, limits)
    return result


def _apply_prune_rule(gone: list[FileRow], options: dict[str, RootOptions], known_per_root: dict[str, int],
                      unreadable: list[str], report: IndexReport, limits: tuple[float, int] | None) -> list[FileRow]:
    """The gone files to remove: not those under an unreadable folder, and not those of a root
    losing more than `limits` allow (the prune rule); files newly excluded always go."""
    remove: list[FileRow] = []
    missing: dict[str, list[FileRow]] = {}
    for row in gone:
        if any(is_under(row.path, folder) for folder in unreadable):
            report.kept += 1
            continue
        root = root_of(row.path, options)  # never None: each gone file was read from under one of the roots
        opts = options[root]
        if row.path != root and excluded(os.path.relpath(row.path, root), opts.exclude, include_hidden=True):
            remove.append(row)  # left out by the user's patterns: their explicit choice
        else:
            missing.setdefault(root, []).append(row)
    for root, rows in missing.items():
        total = known_per_root[root]
        if limits is not None and len(rows) > limits[0] * total and len(rows) > limits[1]:
            report.kept += len(rows)
            report.warn(f"{root}: {len(rows)} of its {total} indexed files ({100 * len(rows) / total:.0f} %) are "
                        f"missing now (an unmounted drive?): kept; remove them with `mmsearch index --prune` "
                        "or `mmsearch remove`")
        else:
            remove.extend(rows)
    return remove


def sha256_file_safe(path: str) -> str:
    """Content hash, or '' when the file cannot be read (it then counts as changed)."""
    from .encoder import sha256_file

    try:
        return sha256_file(Path(path))
    except OSError:
        return ""


def index_paths(storage: Storage, claim_model: Callable[[], Encoder], paths: Sequence[str], *, text_field: str | None = None,
                exclude: Sequence[str] | None = None, include_hidden: bool | None = None, prune: bool = False,
                batch_size: int = 64, workers: int | None = None, draft: bool = True, ocr: bool | None = None,
                progress: Callable[[int], None] | None = None,
                on_total: Callable[[int], None] | None = None,
                embed_images: ImageEmbedder | None = None) -> IndexReport:
    """Index files and folders into `storage` incrementally; see the module docstring.

    `claim_model()` loads the index's encoder and records it as the index's model (or refuses
    it); it is called only once the paths and settings are checked.

    `exclude` (fnmatch patterns on the path below the root, see `scan.excluded`),
    `include_hidden` and `text_field` are stored per root: None keeps the stored value, a value
    replaces it for the roots scanned. Hidden files are skipped unless `include_hidden`.
    `prune` removes gone files even past the prune rule (config.PRUNE_MAX_SHARE/FILES).
    `ocr`: read the text in images for words search (True: OcrUnavailable without the engine; None:
    env MMSEARCH_OCR, else where the engine is installed; see `fill_words`).
    `progress(n)` is called as n more files are done; `on_total(n)` once with the number to embed.
    `embed_images`: what embeds and commits the images to index (default: decode processes or a
    thread and the encoder here; `ray_ingest.RayIngest.embed_images` spreads them over a Ray cluster).
    Raises PathNotFound/UnsupportedFile for bad paths, NothingToIndex for no paths and no
    known roots, before changing anything.
    """
    from .ocr import wanted

    report = IndexReport(named_paths=len(paths))
    roots = _resolve_roots(storage, paths, report)
    reader = storage.reader
    stored = reader.root_options()
    options = root_options(stored, roots, exclude, include_hidden, text_field)
    limits = None if prune else prune_limits(reader)  # a bad setting fails before anything changes
    ocr = wanted(ocr)  # so does OCR asked for and not installed
    encoder = claim_model()
    work = plan(reader, options, stored, report, limits=limits)
    report.unchanged = work.unchanged
    report.skipped = len(report.failures)
    storage.writer.add_roots(roots, options)  # already absolute; known roots keep theirs until the end
    sidecars = set(work.sidecars)  # failed as text corpora before they were told apart: not failures now
    readable_again = [path for root in options for path, reason in reader.failures(under=root)
                      if (reason.startswith("cannot read folder") and path not in work.unreadable) or path in sidecars]
    if work.moved or work.gone or report.failures or readable_again:
        storage.commit(removed_files=[row.id for row in work.gone], moved=work.moved,
                       failures=report.failures, cleared_failures=readable_again)
        report.removed = len(work.gone)
    storage.writer.replace_ignored(list(options), report.ignored, keep_under=work.unreadable)
    todo = work.new + work.changed
    changed = {c.path for c in work.changed}
    if on_total:
        on_total(len(todo))
    images = [c.path for c in todo if c.kind == "image"]
    texts = [c.path for c in todo if c.kind == "text"]
    if workers is None:
        workers = default_workers()
    if images:
        (embed_images or _embed_images)(storage, encoder, images, changed, report, batch_size=batch_size,
                                        workers=workers, draft=draft, progress=progress)
    for path in texts:
        _index_corpus(storage, encoder, path, work.text_fields.get(path), path in changed, report)
        if progress:
            progress(1)
    fill_metadata(storage, work.taken)
    fill_words(storage, ocr, report)
    # Stored last: a run cut short re-reads, next time, the corpora a changed text field affects.
    storage.writer.set_root_options({root: opts for root, opts in options.items() if stored.get(root) != opts})
    report.empty_paths = [raw for raw, root in zip(paths, roots) if not reader.has_items(root)]
    return report


def fill_metadata(storage: Storage, taken: dict[str, float] | None = None) -> int:
    """Read capture time, camera and pixel size (see `images.read_metadata`) of the image files that
    lack them: those just added, and every file of an index built before migration 0003, whose next
    scan fills them in without re-embedding anything. `taken`: capture times by path (from Google
    Photos metadata files) for images without an EXIF date. Returns how many were read."""
    from .images import read_metadata

    taken = taken or {}
    rows = []
    for file_id, path in storage.reader.files_without_metadata():
        try:
            rows.append((file_id, read_metadata(path, taken.get(path))))
        except Exception:  # noqa: BLE001 - gone or unreadable since it was embedded: left empty, tried next scan
            continue
    storage.writer.set_file_metadata(rows)
    return len(rows)


#: Items whose OCR text is committed together.
WORDS_BATCH = 64


def fill_words(storage: Storage, ocr: bool, report: IndexReport | None = None) -> int:
    """Make the searchable words (see `words.item_words`) of the items that lack them: those just
    added, a renamed file's, and those of an index built before migration 0005 whose metadata it
    lacked; nothing is embedded. With `ocr` (as resolved by `ocr.wanted`), also read the text of every
    image not read yet (an index's older images too, once OCR is installed or asked for). Returns how
    many items got words; the images read and the time it took go to `report.ocr` and
    `report.timings["ocr"]`."""
    from .words import item_words

    todo = storage.reader.words_todo(ocr)
    if not todo:
        return 0
    roots = storage.reader.roots()
    start = time.perf_counter()
    rows: list[tuple[int, str, str | None]] = []
    for number, src in enumerate(todo, 1):
        text = src.ocr
        if ocr and src.kind == "image" and text is None:
            from .ocr import read_text  # only where text is read

            try:
                text = read_text(src.path)
            except Exception:  # noqa: BLE001 - gone or unreadable since it was embedded: tried next scan
                text = None
            if report is not None:
                report.ocr += 1
        words = src.words if src.words is not None else item_words(
            src.kind, src.path, root_of(src.path, roots), src.text, src.camera, src.taken_at, src.taken_offset)
        rows.append((src.item_id, words, text))
        if ocr and number % WORDS_BATCH == 0:  # OCR takes a while: an interrupted run keeps what was read
            storage.writer.set_words(rows)
            rows = []
    storage.writer.set_words(rows)
    if ocr and report is not None:
        report.timings["ocr"] = report.timings.get("ocr", 0.0) + time.perf_counter() - start
    return len(todo)


@dataclass
class Removal:
    """What `remove` took out of an index."""

    files: int = 0
    items: int = 0
    roots: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the end of `mmsearch remove`."""
        line = f"removed {self.files} files ({self.items} items)"
        return line + (f"; no longer re-scanned: {', '.join(self.roots)}" if self.roots else "")


def remove_paths(storage: Storage, paths: Sequence[str]) -> Removal:
    """Take files and folders out of the index, whether or not they still exist on disk.

    Every file at or below each path goes, with its items; roots at or below it are no
    longer re-scanned. PathNotFound, before anything changes, for a path with nothing indexed.
    """
    folders = [os.path.abspath(os.path.expanduser(p)) for p in paths]
    files: dict[str, FileRow] = {}
    roots: list[str] = []
    for raw, folder in zip(paths, folders):
        found, found_roots = storage.reader.files_under(folder), storage.reader.roots(under=folder)
        if not found and not found_roots:
            raise PathNotFound(f"nothing indexed at {raw}")
        files.update(found)
        roots.extend(found_roots)
    failures = [path for folder in folders for path, _ in storage.reader.failures(under=folder)]
    gone = storage.commit(removed_files=[row.id for row in files.values()],
                          cleared_failures=failures, forgotten_roots=roots)
    storage.writer.replace_ignored(folders, [])
    kept_roots = storage.reader.roots()
    for folder in folders:
        for root in kept_roots:
            if is_under(folder, root) and os.path.exists(folder):  # folder itself was forgotten above
                log.warning("%s lies in the indexed folder %s: its next re-scan adds it again", folder, root)
    return Removal(len(files), sum(len(v) for v in gone.values()), sorted(set(roots)))


def default_workers() -> int:
    """Decode processes when none are asked for: cores - 1 (the model keeps the rest busy), 0 on 2 cores or fewer.

    On 2 cores one decode process fights the model's threads for a core; a decode thread in
    this process (workers=0) overlaps with the model without that cost.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if cores <= 2 else min(cores - 1, 16)


def _embed_images(storage: Storage, encoder: Encoder, images: list[str], changed: set[str], report: IndexReport,
                  *, batch_size: int, workers: int, draft: bool, progress: Callable[[int], None] | None) -> None:
    """Embed and commit images batch by batch while the decoders work ahead; fills `report.timings`.

    Each batch is committed in one transaction, then mirrored into the vector cache, before the
    next batch enters the model: a kill at any moment loses at most the batch in the model (and
    the decoded images waiting behind it). The decoders keep working during the commit.
    """
    from .gpu_decode import for_encoder
    from .images import decode_many

    timings = report.timings
    for key in ("decode", "wait_decode", "embed", "database"):
        timings.setdefault(key, 0.0)
    last_save = time.monotonic()
    started = time.perf_counter()
    on_device = for_encoder(encoder)  # JPEGs decoded in batches on the GPU (see gpu_decode), or None
    geometry = on_device.geometry if on_device else encoder.geometry

    def flush(batch: list) -> None:
        if on_device:
            start = time.perf_counter()
            on_device.finish(batch, draft)
            timings["device_decode"] = timings.get("device_decode", 0.0) + time.perf_counter() - start
        ok = [d for d in batch if d.pixels is not None]
        vectors = np.zeros((0, encoder.dim), np.float32)
        if ok:
            start = time.perf_counter()
            pixels = [d.pixels for d in ok]
            vectors = encoder.embed_pixels(on_device.stack(pixels) if on_device else np.stack(pixels))
            timings["embed"] += time.perf_counter() - start
        commit_images(storage, ok, vectors, [d for d in batch if d.pixels is None], changed, report)
        if progress:
            progress(len(batch))

    decoded_stream = decode_many(images, geometry, workers, draft, ahead=max(2 * batch_size, 64))
    size = min(batch_size, FIRST_BATCH)
    try:
        batch: list = []
        while True:
            start = time.perf_counter()
            decoded = next(decoded_stream, None)
            timings["wait_decode"] += time.perf_counter() - start
            if decoded is None:
                break
            timings["decode"] += decoded.seconds
            batch.append(decoded)
            if len(batch) >= size:
                flush(batch)
                batch = []
                size = min(batch_size, 2 * size)
                if time.monotonic() - last_save > SAVE_EVERY:
                    storage.vectors.save()
                    last_save = time.monotonic()
        if batch:
            flush(batch)
    finally:
        decoded_stream.close()  # stops the decoders
    timings["images"] = time.perf_counter() - started


def commit_images(storage: Storage, ok: Sequence[Decoded], vectors: np.ndarray, bad: Sequence[Decoded],
                  changed: set[str], report: IndexReport) -> None:
    """Commit one batch of images: `ok` with their `vectors` (row by row), `bad` as failures (their
    `error`); counts them in `report` (`changed` paths as updated) and in its "database" timing.

    Keyed by path: an image committed again replaces its earlier entry, never doubles it.
    """
    added = [NewFile(d.path, "image", d.size, d.mtime, d.sha256, [0], [None], vectors[i : i + 1])
             for i, d in enumerate(ok)]
    failures = [(d.path, d.error or "unreadable") for d in bad]
    start = time.perf_counter()
    storage.commit(added=added, failures=failures, cleared_failures=[d.path for d in ok])
    report.timings["database"] = report.timings.get("database", 0.0) + time.perf_counter() - start
    for d in ok:
        if d.path in changed:
            report.updated += 1
        else:
            report.added += 1
    report.skipped += len(failures)
    report.failures.extend(failures)


def _index_corpus(storage: Storage, encoder: Encoder, path: str, text_field: str | None, changed: bool, report: IndexReport) -> None:
    """Read and embed one corpus, replacing what it yielded before; a corpus that cannot be read,
    or of which every record is skipped, is reported and what it yielded before stays."""
    from .encoder import sha256_file

    try:
        st = os.stat(path)
        sha = sha256_file(Path(path))
        corpus = read_corpus(path, text_field)
    except (OSError, UnsupportedFile) as exc:
        bad_file = [(path, f"cannot read: {exc.strerror}" if isinstance(exc, OSError) else str(exc))]
        storage.commit(failures=bad_file)
        report.failures.extend(bad_file)
        report.skipped += 1
        return
    entries, bad = corpus.entries, corpus.failures
    if not entries and bad:
        seen = f"; fields seen: {', '.join(sorted(corpus.fields_seen))}" if corpus.fields_seen else ""
        report.warn(f"{path}: all {len(bad)} records skipped ({bad[0][1]}){seen}")
        storage.commit(failures=bad)
        report.failures.extend(bad)
        report.skipped += len(bad)
        return
    texts = [e.text for e in entries]
    _commit_texts(storage, encoder, NewFile(path, "text", st.st_size, st.st_mtime, sha), [e.line for e in entries], texts, bad,
                  report)
    if changed:
        report.updated += 1
    else:
        report.added += 1


def _commit_texts(storage: Storage, encoder: Encoder, file: NewFile, lines: list[int], texts: list[str],
                  bad: list[tuple[str, str]], report: IndexReport) -> None:
    file.lines, file.texts = lines, list(texts)
    file.vectors = encoder.embed_texts(texts) if texts else np.zeros((0, encoder.dim), np.float32)
    report.truncated += sum(1 for t in texts if encoder.count_tokens(t) > encoder.context_length)
    report.texts += len(texts)
    report.skipped += len(bad)
    report.failures.extend(bad)
    # The records that failed when the corpus was read before (path:line) go with the old version.
    stale = [p for p, _ in storage.reader.failures(under=os.path.dirname(file.path)) if p.startswith(f"{file.path}:")]
    storage.commit(added=[file], failures=bad, cleared_failures=[file.path, *stale])


def index_texts(storage: Storage, claim_model: Callable[[], Encoder], texts: list[str], source: str) -> IndexReport:
    """Index texts given directly (no file), stored under `source`; replaces earlier texts of `source`.

    `claim_model()` loads the index's encoder and records it as the index's model."""
    report = IndexReport()
    encoder = claim_model()
    sha = hashlib.sha256("\n".join(texts).encode()).hexdigest()
    kept = [(n, t) for n, t in enumerate(texts, start=1) if t.strip()]
    _commit_texts(storage, encoder, NewFile(source, "text", 0, 0.0, sha), [n for n, _ in kept], [t for _, t in kept], [], report)
    fill_words(storage, False)
    report.added = 1
    return report


def fill_vectors(storage: Storage, model: str, encoder: Callable[[], Encoder], report: IndexReport, *,
                 batch_size: int = 64, workers: int | None = None, draft: bool = True) -> int:
    """Embed with the index's model of key `model` every item that has no vector of it (all of them
    for a model just added; the files added since by the default model, for one added before), one
    transaction per batch, so a run cut short resumes where it stopped. `encoder()` is called only
    when there is something to embed. Returns how many items got a vector (also in `report.filled`).

    Texts are embedded from the stored text; images from their file, read again (decoded for this
    model's geometry). An image changed or unreadable since it was indexed is left without one and
    counted in a warning: its next re-scan re-embeds it with every model.
    """
    from .images import decode_many

    missing = storage.reader.missing_vectors(model)
    if not missing:
        return 0
    enc = encoder()
    done = 0
    texts = [(item, text or "") for item, kind, _, text, _, _ in missing if kind == "text"]
    for start in range(0, len(texts), 256):
        part = texts[start : start + 256]
        storage.add_vectors(model, "text", np.array([i for i, _ in part], np.int64), enc.embed_texts([t for _, t in part]))
        done += len(part)
    images = {path: (item, size, mtime) for item, kind, path, _, size, mtime in missing if kind == "image"}
    stale = 0
    batch: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        storage.add_vectors(model, "image", np.array([i for i, _ in batch], np.int64),
                            enc.embed_pixels(np.stack([p for _, p in batch])))
        batch.clear()

    decoded_stream = decode_many(list(images), enc.geometry, default_workers() if workers is None else workers, draft)
    try:
        for decoded in decoded_stream:
            item, size, mtime = images[decoded.path]
            if decoded.pixels is None or (decoded.size, decoded.mtime) != (size, mtime):
                stale += 1  # its stored vectors are of the content indexed then: never mix in another
                continue
            batch.append((item, decoded.pixels))
            done += 1
            if len(batch) >= batch_size:
                flush()
        if batch:
            flush()
    finally:
        decoded_stream.close()
    if stale:
        report.warn(f"{stale} images changed or unreadable since they were indexed have no vectors of model {model} "
                    "yet: the re-scan that re-embeds them adds them")
    report.filled[model] = report.filled.get(model, 0) + done
    return done

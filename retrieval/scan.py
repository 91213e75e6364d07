"""Finding files to index and reading text corpora. Knows nothing of models or storage."""

from __future__ import annotations

import bisect
import csv
import fnmatch
import io
import itertools
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .config import DEFAULT_TEXT_FIELDS, kind_of
from .errors import UnsupportedFile


@dataclass(frozen=True)
class Candidate:
    """A file found on disk, as the incremental diff compares it."""

    path: str
    kind: str
    size: int
    mtime: float


@dataclass
class ScanResult:
    """Files found under one root, and what could not be looked at (path, reason).

    `unreadable`: folders that could not be listed and files that could not be looked at:
    what the index holds there must be kept. `ignored`: files skipped for their type.
    `sidecars`: Google Photos metadata files skipped (see `google_metadata`); `taken`: the capture
    time (epoch seconds) their `photoTakenTime` gives, by the path of their photo.
    """

    candidates: list[Candidate]
    failures: list[tuple[str, str]]
    unreadable: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    sidecars: list[str] = field(default_factory=list)
    taken: dict[str, float] = field(default_factory=dict)


def excluded(relative: str, patterns: Sequence[str], include_hidden: bool) -> bool:
    """Whether a path relative to its root is left out: hidden (a part starts with '.') or matched.

    Each pattern is matched (fnmatch, case-sensitive; `*` also crosses '/', and a leading `**/`
    also matches no folder at all) against the path and each folder above it, so a pattern
    naming a folder leaves out everything in it.
    """
    parts = relative.split(os.sep)
    return any(_left_out(os.sep.join(parts[: i + 1]), patterns, include_hidden) for i in range(len(parts)))


def _left_out(relative: str, patterns: Sequence[str], include_hidden: bool) -> bool:
    """Whether this one path is left out, the folders above it being let in."""
    hidden = not include_hidden and os.path.basename(relative).startswith(".")
    return hidden or any(_matches(relative, pattern) for pattern in patterns)


def type_counts(paths: Iterable[str]) -> dict[str, int]:
    """Files per extension ('(none)' for none), most first, then by name with '(none)' last."""
    counts = Counter(Path(p).suffix.lower() or "(none)" for p in paths)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0] == "(none)", kv[0])))


def _matches(relative: str, pattern: str) -> bool:
    if fnmatch.fnmatchcase(relative, pattern):
        return True
    return pattern.startswith("**/") and _matches(relative, pattern[3:])


def _candidate(path: str, kind: str, result: ScanResult) -> Candidate | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        result.failures.append((path, "broken symlink" if os.path.islink(path) else "file vanished"))
        return None
    except OSError as exc:
        result.failures.append((path, f"cannot stat: {exc.strerror}"))
        result.unreadable.append(path)  # there but not readable now (an I/O error): keep what was indexed
        return None
    return Candidate(path, kind, st.st_size, st.st_mtime)


def scan(root: str, exclude: Sequence[str] = (), include_hidden: bool = False) -> ScanResult:
    """Every image and text corpus at or under `root` (absolute), recursively.

    Below the root, hidden files and folders (unless `include_hidden`) and paths matching an
    `exclude` pattern (see `excluded`) are left out; other files of no known type are listed
    as ignored. Google Photos metadata files (.json) are no candidates: they give their photos'
    capture times (`ScanResult.taken`). Symlinked folders are followed once: a folder already
    visited (same device and inode) is skipped, so symlink loops end. A folder that cannot be listed is a failure and
    is listed as unreadable.
    """
    result = ScanResult([], [])
    if not os.path.isdir(root):
        kind = kind_of(Path(root))
        found = _candidate(root, kind, result) if kind else None
        result.candidates = [found] if found else []
        return result
    seen: set[tuple[int, int]] = set()

    def on_error(exc: OSError) -> None:
        folder = exc.filename or root
        result.failures.append((folder, f"cannot read folder: {exc.strerror}"))
        result.unreadable.append(folder)

    below = len(root.rstrip(os.sep)) + 1  # os.walk's paths all start with the root and a separator

    def skip(path: str) -> bool:
        return _left_out(path[below:], exclude, include_hidden)  # its folders were let in already

    for folder, dirs, files in os.walk(root, followlinks=True, onerror=on_error):
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if not skip(os.path.join(folder, d)))
        names = sorted(files)
        for name in names:
            path = os.path.join(folder, name)
            if skip(path):
                continue
            kind = kind_of(Path(name))
            if kind is None:
                result.ignored.append(path)
            elif name.lower().endswith(".json") and (meta := _read_sidecar(path)) is not None:
                result.sidecars.append(path)
                photo = sidecar_photo(name, meta.get("title"), names)
                taken = _taken_time(meta)
                if photo and taken is not None:
                    result.taken[os.path.join(folder, photo)] = taken
            elif found := _candidate(path, kind, result):
                result.candidates.append(found)
    return result


#: Keys of a Google Photos Takeout sidecar (`IMG_1.jpg.json`, `IMG_1.jpg.supplemental-metadata.json`)
#: or album `metadata.json`, each of which also has a "title" (an old album file: only "albumData").
GOOGLE_KEYS = frozenset({"photoTakenTime", "creationTime", "photoLastModifiedTime", "geoData", "geoDataExif",
                         "imageViews", "url", "googlePhotosOrigin", "people", "description", "access", "date"})
#: Sidecars are a few KB; a larger .json is not read to find out (it is a corpus, or fails as one).
SIDECAR_MAX_BYTES = 1 << 20


def google_metadata(value: object) -> bool:
    """Whether parsed JSON is a Google Photos Takeout metadata file (a photo's sidecar or an album's)."""
    if not isinstance(value, dict):
        return False
    return "albumData" in value or ("title" in value and not GOOGLE_KEYS.isdisjoint(value))


def _read_sidecar(path: str) -> dict | None:
    """The content of a Google Photos metadata file, or None for anything else (left to be read as
    a corpus, which reports what is wrong with it). A corpus array is told by its first byte."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(64)
            if not data.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{"):
                return None
            data += fh.read(SIDECAR_MAX_BYTES)
    except OSError:
        return None
    if len(data) > SIDECAR_MAX_BYTES:
        return None
    try:
        value = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if google_metadata(value) else None


def _taken_time(meta: dict) -> float | None:
    """`photoTakenTime.timestamp` (epoch seconds, a string in Takeout), or None."""
    taken = meta.get("photoTakenTime")
    try:
        seconds = float(taken["timestamp"]) if isinstance(taken, dict) else None
    except (KeyError, TypeError, ValueError):
        return None
    return seconds if seconds and seconds > 0 else None


#: A name's duplicate number as Takeout writes it: `IMG.jpg(1).json` is the sidecar of `IMG(1).jpg`.
_NUMBERED = re.compile(r"(.*)\((\d+)\)")
#: Takeout cuts a file name to this many characters (with ".json"): a longer name's end is lost.
_TAKEOUT_NAME_MAX = 46


def sidecar_photo(name: str, title: object, names: Sequence[str]) -> str | None:
    """The name, among `names` (its folder's files, sorted), of the image a Takeout sidecar `name` describes.

    `IMG.jpg.json`, `IMG.jpg.supplemental-metadata.json` (or that suffix cut short, as Takeout cuts
    long names) and `IMG.jpg(1).json` / `IMG.jpg.supplemental-metadata(1).json` (for `IMG(1).jpg`);
    else the sidecar's `title`; else, for a name cut short, the one image whose name starts with
    what is left. None when no image matches (an album's metadata.json, a video's sidecar).
    """
    base = name[: -len(".json")]
    numbered = _NUMBERED.fullmatch(base)
    if numbered:
        base = numbered.group(1)
    head, dot, tail = base.rpartition(".")
    if dot and tail and "supplemental-metadata".startswith(tail.lower()) and Path(head).suffix:
        base = head
    if numbered:
        stem, ext = os.path.splitext(base)
        base = f"{stem}({numbered.group(2)}){ext}"
    wanted = [base] + ([title] if isinstance(title, str) and not numbered else [])
    for photo in wanted:
        at = bisect.bisect_left(names, photo)
        if at < len(names) and names[at] == photo and kind_of(Path(photo)) == "image":
            return photo
    if len(name) < _TAKEOUT_NAME_MAX:
        return None
    at = bisect.bisect_left(names, base)  # names starting with `base` follow it, in order
    following = (names[i] for i in range(at, len(names)))
    cut = [n for n in itertools.takewhile(lambda n: n.startswith(base), following) if kind_of(Path(n)) == "image"]
    return cut[0] if len(cut) == 1 else None


@dataclass(frozen=True)
class TextEntry:
    """One text to embed, with where it came from (1-based line or record number)."""

    line: int
    text: str


def _decode_lines(data: bytes, path: str, failures: list[tuple[str, str]]) -> Iterator[tuple[int, str]]:
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError:
            failures.append((f"{path}:{number}", "invalid UTF-8"))
            continue
        if number == 1:
            line = line.lstrip("\ufeff")
        if line.strip():
            yield number, line


def _texts(record: dict, fields: Sequence[str]) -> list[str]:
    """The text(s) of a record: the first field holding a non-empty string, or a list with some."""
    for name in fields:
        value = record.get(name)
        values = value if isinstance(value, list) else [value]
        texts = [v for v in values if isinstance(v, str) and v.strip()]
        if texts:
            return texts
    return []


_JSON_TYPES = {dict: "object", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


@dataclass
class Corpus:
    """What a text corpus yielded: entries to embed, bad lines/records (path:line, reason), and
    the field names seen in records that had no text (to tell a user which field to ask for)."""

    entries: list[TextEntry] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    fields_seen: set[str] = field(default_factory=set)


def read_corpus(path: str, text_field: str | None = None) -> Corpus:
    """Entries of a .txt (one per non-empty line), .jsonl, .json (an array) or .csv file (records).

    Records use `text_field`, or by default the first of 'text', 'caption'; a field holding a
    list of strings yields one entry per string, all with the record's number. A bad line or
    record is skipped and returned as (path:line, reason); the rest is read.
    Raises OSError if the file cannot be read at all, UnsupportedFile for a .json file that is
    not an array of records.
    """
    fields = (text_field,) if text_field else DEFAULT_TEXT_FIELDS
    wanted = " or ".join(repr(f) for f in fields)
    corpus = Corpus()
    data = Path(path).read_bytes()
    ext = Path(path).suffix.lower()

    def add(number: int, record: object) -> None:
        texts = _texts(record, fields) if isinstance(record, dict) else []
        if not texts:
            corpus.failures.append((f"{path}:{number}", f"no text in field {wanted}"))
            if isinstance(record, dict):
                corpus.fields_seen.update(str(k) for k in record if k is not None)  # None: CSV's extra cells
        elif any("\ufffd" in t for t in texts) and ext == ".csv":
            corpus.failures.append((f"{path}:{number}", "invalid UTF-8"))
        else:
            corpus.entries.extend(TextEntry(number, t) for t in texts)

    if ext == ".txt":
        corpus.entries = [TextEntry(n, line) for n, line in _decode_lines(data, path, corpus.failures)]
    elif ext == ".jsonl":
        for number, line in _decode_lines(data, path, corpus.failures):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                corpus.failures.append((f"{path}:{number}", f"malformed JSON ({exc.msg})"))
                continue
            add(number, record)
    elif ext == ".json":
        try:
            records = json.loads(data.decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UnsupportedFile(f"not a JSON array of records: {exc}") from None
        if google_metadata(records):
            raise UnsupportedFile("a Google Photos metadata file (Takeout sidecar), not a text corpus")
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            held = "an array of non-objects" if isinstance(records, list) else f"a JSON {_JSON_TYPES[type(records)]}"
            raise UnsupportedFile(f"not a JSON array of records: it holds {held}")
        for number, record in enumerate(records, start=1):
            add(number, record)
    else:
        # Quoted CSV fields may span lines, so decode the whole file; bad bytes mark their record.
        reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig", errors="replace"), newline=""))
        for number, record in enumerate(reader, start=1):
            add(number, record)
    return corpus

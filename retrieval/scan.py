"""Finding files to index and reading text corpora. Knows nothing of models or storage."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .config import DEFAULT_TEXT_FIELDS, kind_of


@dataclass(frozen=True)
class Candidate:
    """A file found on disk, as the incremental diff compares it."""

    path: str
    kind: str
    size: int
    mtime: float


@dataclass
class ScanResult:
    """Files found under one root, and what could not be looked at (path, reason)."""

    candidates: list[Candidate]
    failures: list[tuple[str, str]]


def _candidate(path: str, kind: str, failures: list[tuple[str, str]]) -> Candidate | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        failures.append((path, "broken symlink" if os.path.islink(path) else "file vanished"))
        return None
    except OSError as exc:
        failures.append((path, f"cannot stat: {exc.strerror}"))
        return None
    return Candidate(path, kind, st.st_size, st.st_mtime)


def scan(root: str) -> ScanResult:
    """Every image and text corpus at or under `root` (absolute), recursively.

    Symlinked folders are followed once: a folder already visited (same device and inode)
    is skipped, so symlink loops end.
    """
    failures: list[tuple[str, str]] = []
    if not os.path.isdir(root):
        kind = kind_of(Path(root))
        found = _candidate(root, kind, failures) if kind else None
        return ScanResult([found] if found else [], failures)
    candidates: list[Candidate] = []
    seen: set[tuple[int, int]] = set()

    def on_error(exc: OSError) -> None:
        failures.append((exc.filename or root, f"cannot read folder: {exc.strerror}"))

    for folder, dirs, files in os.walk(root, followlinks=True, onerror=on_error):
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs.sort()
        for name in sorted(files):
            kind = kind_of(Path(name))
            if kind:
                found = _candidate(os.path.join(folder, name), kind, failures)
                if found:
                    candidates.append(found)
    return ScanResult(candidates, failures)


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


def _field(record: dict, fields: Sequence[str]) -> str | None:
    for name in fields:
        value = record.get(name)
        if isinstance(value, str) and value.strip():
            return value
    return None


def read_corpus(path: str, text_field: str | None = None) -> tuple[list[TextEntry], list[tuple[str, str]]]:
    """Entries of a .txt (one per non-empty line), .jsonl or .csv (one per record) file.

    Records use `text_field`, or by default the first of 'text', 'caption'. A bad line or
    record is skipped and returned as (path:line, reason); the rest is read.
    Raises OSError if the file cannot be read at all.
    """
    fields = (text_field,) if text_field else DEFAULT_TEXT_FIELDS
    wanted = " or ".join(repr(f) for f in fields)
    failures: list[tuple[str, str]] = []
    entries: list[TextEntry] = []
    data = Path(path).read_bytes()
    ext = Path(path).suffix.lower()
    if ext == ".txt":
        entries = [TextEntry(n, line) for n, line in _decode_lines(data, path, failures)]
    elif ext == ".jsonl":
        for number, line in _decode_lines(data, path, failures):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                failures.append((f"{path}:{number}", f"malformed JSON ({exc.msg})"))
                continue
            text = _field(record, fields) if isinstance(record, dict) else None
            if text is None:
                failures.append((f"{path}:{number}", f"no text in field {wanted}"))
            else:
                entries.append(TextEntry(number, text))
    else:
        # Quoted CSV fields may span lines, so decode the whole file; bad bytes mark their record.
        reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig", errors="replace"), newline=""))
        for number, record in enumerate(reader, start=1):
            text = _field(record, fields)
            if text is None:
                failures.append((f"{path}:{number}", f"no text in field {wanted}"))
            elif "\ufffd" in text:
                failures.append((f"{path}:{number}", "invalid UTF-8"))
            else:
                entries.append(TextEntry(number, text))
    return entries, failures

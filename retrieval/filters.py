"""Search filters on what was read of each file at index time: capture date, camera, extension, size.

A query turns them into one SQL condition on `schema.FILES`; the matching item ids are the
allowed set the vector search is restricted to (as `--under` is), so k results come back
whenever k items pass, however few do. No SQLAlchemy: a query imports this module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone

from .errors import BadQuery
from .schema import ANY_ROW, FILES


@dataclass(frozen=True)
class Filters:
    """Parsed filters; each None (or empty) when not asked for."""

    #: (epoch seconds, whether the bound carried a UTC offset) of the inclusive lower bound.
    after: tuple[float, bool] | None = None
    #: Same, exclusive upper bound.
    before: tuple[float, bool] | None = None
    camera: str | None = None
    exts: tuple[str, ...] = ()
    min_size: tuple[int, int] | None = None

    def sql(self) -> tuple[str, list[object]]:
        """One SQL condition on the files table (and its parameters), 'a AND b ...'; portable SQL
        (LIKE, not SQLite's instr or negative substr) that PostgreSQL runs too."""
        conds: list[str] = []
        params: list[object] = []
        taken, offset = FILES.cols("taken_at"), FILES.cols("taken_offset")
        for bound, op in ((self.after, ">="), (self.before, "<")):
            if bound is not None:
                value, aware = bound
                # A bound with an offset is an instant (UTC); one without is a wall-clock time, compared
                # with each photo's local time (the camera's clock as written when its offset is unknown).
                column = taken if aware else f"({taken} + COALESCE({offset}, 0))"
                conds.append(f"{column} {op} ?")
                params.append(value)
        if self.camera is not None:
            conds.append(f"lower({FILES.cols('camera')}) LIKE ? ESCAPE '\\'")
            params.append("%" + re.sub(r"([\\%_])", r"\\\1", self.camera.lower()) + "%")
        if self.exts:
            path = f"lower({FILES.cols('path')})"
            conds.append("(" + " OR ".join(f"{path} LIKE ?" for _ in self.exts) + ")")
            params.extend(f"%.{ext}" for ext in self.exts)  # alphanumeric: no wildcards
        if self.min_size is not None:
            conds.append(f"{FILES.cols('width')} >= ? AND {FILES.cols('height')} >= ?")
            params.extend(self.min_size)
        return " AND ".join(conds) or ANY_ROW, params

    def __bool__(self) -> bool:
        return self != Filters()


def _instant(name: str, value: str) -> tuple[float, bool]:
    """An ISO date or date-time as (epoch seconds, has an offset); a naive one is read as UTC wall time."""
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise BadQuery(f"--{name} must be an ISO date or date-time (2024-05-31, 2024-05-31T18:00, "
                       f"2024-05-31T18:00+02:00), not {value!r}") from None
    aware = moment.tzinfo is not None
    return (moment if aware else moment.replace(tzinfo=timezone.utc)).timestamp(), aware


def parse_filters(*, after: str | None = None, before: str | None = None, camera: str | None = None,
                  ext: str | list[str] | tuple[str, ...] | None = None, min_size: str | None = None) -> Filters:
    """Check and parse filter values (BadQuery for a bad one).

    `after`/`before`: ISO dates or date-times (`before` excludes its bound); `camera`: a
    case-insensitive part of the EXIF make and model; `ext`: extensions, "jpg,png" or a list
    (jpg and jpeg, tif and tiff, are one); `min_size`: "WIDTHxHEIGHT", both at least that.
    """
    lower = _instant("after", after) if after is not None else None
    upper = _instant("before", before) if before is not None else None
    if lower and upper and lower[1] == upper[1] and lower[0] >= upper[0]:
        raise BadQuery(f"--after {after} is not before --before {before}: nothing can match")
    if camera is not None and not camera.strip():
        raise BadQuery("--camera must not be empty")
    exts: tuple[str, ...] = ()
    if ext is not None:
        names = ext.split(",") if isinstance(ext, str) else list(ext)
        exts = tuple(dict.fromkeys(n.strip().lower().lstrip(".") for n in names))
        if not exts or any(not e or not e.isalnum() for e in exts):
            raise BadQuery(f"--ext must be extensions separated by commas (jpg,png), not {ext!r}")
        for a, b in (("jpg", "jpeg"), ("jpeg", "jpg"), ("tif", "tiff"), ("tiff", "tif")):
            if a in exts and b not in exts:
                exts += (b,)
    size = None
    if min_size is not None:
        width, sep, height = min_size.lower().partition("x")
        if not sep or not width.isdigit() or not height.isdigit():
            raise BadQuery(f"--min-size must be WIDTHxHEIGHT in pixels (800x600), not {min_size!r}")
        size = (int(width), int(height))
    return Filters(lower, upper, camera.strip() if camera is not None else None, exts, size)

"""Words as well as meaning: the searchable words of an item, and the fusion of two rankings.

CLIP misses what a photo's name, folders, EXIF or the text inside it say (a folder named after
a trip). Each item therefore also gets a line of words (stored by the metadata store, which keeps
a full-text index over them: SQLite FTS5 in the embedded store):

- an image: its file name and the names of its folders below the indexed root (the root's own name
  included), each split at `_ - .`, camelCase and digit boundaries ("germanyTrip2019" also gives
  "germany Trip 2019"); its EXIF camera; its capture year and month name ("2024 July"; capture time as
  the date filters read it: EXIF, else the file's mtime); and, with OCR on, the text read from it;
- a text item: its own text.

A hybrid query fuses the meaning ranking (cosine) and the words ranking (bm25) by reciprocal
rank fusion (Cormack et al., 2009): an item's fused score is

    rrf(d) = Σ_r 1 / (RRF_K + rank_r(d))

over the rankings r that hold it (rank 1 is the best; items with equal words scores share a rank),
with RRF_K = 60. No SQLAlchemy here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone

#: The k constant of reciprocal rank fusion: larger values flatten the advantage of the top ranks.
RRF_K = 60

#: Runs of letters and digits (underscore is a separator, as in file names).
_TOKEN = re.compile(r"[^\W_]+")

_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December")


def _pieces(token: str) -> list[str]:
    """`token` split at camelCase and letter/digit boundaries: "IMGFile2019" → IMG, File, 2019."""
    out, start = [], 0
    for i in range(1, len(token)):
        a, b, after = token[i - 1], token[i], token[i + 1 : i + 2]
        if a.isdigit() != b.isdigit() or (a.islower() and b.isupper()) or (a.isupper() and b.isupper() and after.islower()):
            out.append(token[start:i])
            start = i
    out.append(token[start:])
    return out


def split_words(text: str) -> list[str]:
    """The words of a name or query: its letter/digit runs, each followed by its camelCase and digit
    pieces when it has several ("germany_tripDay2" → germany, tripDay2, trip, Day, 2)."""
    out: list[str] = []
    for token in _TOKEN.findall(text):
        pieces = _pieces(token)
        out.extend([token, *pieces] if len(pieces) > 1 else [token])
    return out


def item_words(kind: str, path: str, root: str | None, text: str | None = None, camera: str | None = None,
               taken_at: float | None = None, taken_offset: int | None = None) -> str:
    """The searchable words of one item (see the module docstring); `root` is the indexed folder or
    file the path was found under (None: only the file's own name)."""
    if kind != "image":
        return text or ""
    base = os.path.dirname(root.rstrip(os.sep)) if root else os.path.dirname(path)
    names = os.path.relpath(path, base).split(os.sep) if base else [os.path.basename(path)]
    words = [w for name in names for w in split_words(name)]
    if camera:
        words.extend(split_words(camera))
    if taken_at is not None:
        # The photo's local time, as the date filters compare it (the camera's clock when its offset is unknown).
        local = datetime.fromtimestamp(taken_at + (taken_offset or 0), timezone.utc)
        words.extend([str(local.year), _MONTHS[local.month - 1]])
    return " ".join(words)


def query_terms(text: str) -> list[str]:
    """The distinct lower-cased words of a query text, for a full-text match of any of them; none for
    a text of punctuation only. Every term is letters and digits, so no query syntax gets through."""
    return list(dict.fromkeys(w.lower() for w in split_words(text)))


def ranks(scores: Sequence[float]) -> list[int]:
    """Competition ranks of scores sorted best first ("1224"): equal scores share the best rank, so
    the photos of one folder, which match its name equally, are boosted equally."""
    out: list[int] = []
    for n, score in enumerate(scores):
        out.append(out[-1] if n and score == scores[n - 1] else n + 1)
    return out


def fuse(rankings: Sequence[Mapping[int, int]], k: int = RRF_K) -> list[tuple[int, float]]:
    """Reciprocal rank fusion of rankings ({id: rank}, rank 1 the best): (id, Σ 1/(k + rank)) best first.

    Ties keep the order of first appearance (the first ranking's order first).
    """
    scores: dict[int, float] = {}
    for ranking in rankings:
        for item, rank in ranking.items():
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda pair: -pair[1])

"""A torch-free CLIP BPE tokenizer, id-for-id identical to open_clip's default ``SimpleTokenizer``.

The query path must not import torch (``import torch, open_clip`` alone costs about 4 s), so text
queries are tokenized here and encoded by the ONNX text tower (``retrieval.onnx_runtime``).

What is replicated exactly from ``open_clip.tokenizer.SimpleTokenizer`` (clean='lower', no reduction):
- cleaning: ``ftfy.fix_text`` -> ``html.unescape`` twice -> strip -> whitespace collapse -> ``lower()``;
- the pre-tokenizer regex (special tokens first, contractions, letter runs, single digits, other runs;
  ``re.IGNORECASE``) and the byte -> unicode mapping;
- BPE with the first 49152-256-2 merges of ``bpe_simple_vocab_16e6.txt.gz``; the literal strings
  ``<start_of_text>`` / ``<end_of_text>`` in a text map to the special ids, as in open_clip;
- framing ``[SOT] + tokens + [EOT]``, zero padding, and truncation to ``context_length`` with the
  last kept position overwritten by EOT.

Differences that do not change any id:
- BPE merges the lowest-ranked pair, leftmost first, with a heap over a linked list: O(n log n)
  per word instead of open_clip's O(n) per merge step (a 20,000-letter word takes open_clip about
  7 s). The result is the same because in this vocabulary a merged symbol only ever takes part in
  later (higher-ranked) merges, so all occurrences of the current best pair are merged, left to
  right, before any other pair (``tests/test_onnx.py`` checks that property on the file).
- ``__call__`` stops tokenizing a text once it has enough tokens to fill ``context_length``.
- bpe() results are kept in a bounded ``functools.lru_cache`` (open_clip's dict grows without bound).

Only numpy, ftfy, regex and the standard library are imported.
"""

from __future__ import annotations

import gzip
import heapq
import html
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator

import ftfy
import numpy as np
import regex as re

VOCAB_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
DEFAULT_CONTEXT_LENGTH = 77
SOT_TEXT = "<start_of_text>"
EOT_TEXT = "<end_of_text>"
_N_MERGES = 49152 - 256 - 2  # open_clip keeps merges[1 : 49152-256-2+1]
_BPE_CACHE_SIZE = 1 << 16

__all__ = ["ClipTokenizer", "default_vocab_path", "VOCAB_FILENAME", "DEFAULT_CONTEXT_LENGTH"]


def default_vocab_path() -> Path:
    """Path of the BPE vocabulary shipped inside the installed open_clip package.

    Located with ``importlib.util.find_spec`` so that neither open_clip nor torch is imported.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip is not installed; cannot locate " + VOCAB_FILENAME)
    for location in spec.submodule_search_locations:
        path = Path(location) / VOCAB_FILENAME
        if path.is_file():
            return path
    raise FileNotFoundError(f"{VOCAB_FILENAME} not found in the open_clip package")


def bytes_to_unicode() -> dict[int, str]:
    """open_clip's reversible byte -> printable unicode character table."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clean_text(text: str) -> str:
    """open_clip's 'lower' cleaning: ftfy, double html unescape, whitespace collapse, lower case."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    text = text.strip()
    text = " ".join(text.split()).strip()
    return text.lower()


def load_merges(vocab_path: Path) -> list[tuple[str, ...]]:
    """The merges open_clip uses, in rank order."""
    # only the first ~1/5 of the file is used: stop decompressing once those lines are read
    chunks: list[bytes] = []
    chunk = b""
    newlines = 0
    with gzip.open(vocab_path) as fh:
        while newlines <= _N_MERGES:
            chunk = fh.read(1 << 18)
            if not chunk:
                break
            chunks.append(chunk)
            newlines += chunk.count(b"\n")
    data = b"".join(chunks)
    if chunk:  # stopped early: drop the partial last line (it may end inside a UTF-8 sequence)
        data = data[: data.rfind(b"\n") + 1]
    lines = data.decode("utf-8").split("\n", _N_MERGES + 1)
    return [tuple(line.split()) for line in lines[1 : _N_MERGES + 1]]


class ClipTokenizer:
    """Tokenize texts to int64 ids exactly as ``open_clip.get_tokenizer(name)(texts)`` does.

    >>> tok = ClipTokenizer(default_vocab_path(), context_length=77)
    >>> ids = tok(["a photo of a dog"])          # np.ndarray [1, 77] int64
    >>> tok.count_tokens("a photo of a dog")      # 7: SOT + 5 + EOT; > context_length => truncated
    """

    def __init__(self, vocab_path: Path, context_length: int = DEFAULT_CONTEXT_LENGTH):
        if int(context_length) < 2:
            raise ValueError(f"context_length must be >= 2, got {context_length}")
        self.vocab_path = Path(vocab_path)
        self.context_length = int(context_length)
        self.byte_encoder = bytes_to_unicode()
        merges = load_merges(self.vocab_path)
        if len(merges) != _N_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"{self.vocab_path} is not a CLIP BPE vocabulary ({len(merges)} merges)")
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab]
        vocab.extend("".join(m) for m in merges)
        special_tokens = [SOT_TEXT, EOT_TEXT]
        vocab.extend(special_tokens)
        self.encoder: dict[str, int] = dict(zip(vocab, range(len(vocab))))
        self.bpe_ranks: dict[tuple[str, str], int] = dict(zip(merges, range(len(merges))))
        self.vocab_size = len(self.encoder)
        self.sot_token_id = self.encoder[SOT_TEXT]
        self.eot_token_id = self.encoder[EOT_TEXT]
        self._special = {t: (self.encoder[t],) for t in special_tokens}
        self.pat = re.compile(
            "|".join(special_tokens) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            re.IGNORECASE,
        )
        self._byte_table = [self.byte_encoder[b] for b in range(256)]
        self.token_ids = lru_cache(maxsize=_BPE_CACHE_SIZE)(self._token_ids)

    # -- BPE ---------------------------------------------------------------------------------
    def bpe(self, token: str) -> list[str]:
        """BPE symbols of one pre-token (already byte-encoded), the last one ending in '</w>'."""
        if token in self._special:
            return [token]
        symbols = list(token[:-1]) + [token[-1] + "</w>"]
        n = len(symbols)
        if n == 1:
            return symbols
        ranks = self.bpe_ranks
        nxt = list(range(1, n + 1))  # n == end
        prv = list(range(-1, n - 1))
        alive = [True] * n
        heap = []
        for i in range(n - 1):
            r = ranks.get((symbols[i], symbols[i + 1]))
            if r is not None:
                heap.append((r, i))
        heapq.heapify(heap)
        while heap:
            r, i = heapq.heappop(heap)
            if not alive[i]:
                continue
            j = nxt[i]
            if j >= n or ranks.get((symbols[i], symbols[j])) != r:
                continue  # stale entry: a neighbour was merged since it was pushed
            # merge j into i
            symbols[i] = symbols[i] + symbols[j]
            alive[j] = False
            k = nxt[j]
            nxt[i] = k
            if k < n:
                prv[k] = i
            p = prv[i]
            if p >= 0:
                rp = ranks.get((symbols[p], symbols[i]))
                if rp is not None:
                    heapq.heappush(heap, (rp, p))
            if k < n:
                rk = ranks.get((symbols[i], symbols[k]))
                if rk is not None:
                    heapq.heappush(heap, (rk, i))
        out = []
        i = 0
        while i < n:
            out.append(symbols[i])
            i = nxt[i]
        return out

    def _token_ids(self, token: str) -> tuple[int, ...]:
        special = self._special.get(token)
        if special is not None:
            return special
        enc = self.encoder
        return tuple(enc[s] for s in self.bpe(token))

    # -- encoding ----------------------------------------------------------------------------
    def _iter_ids(self, cleaned: str) -> Iterator[tuple[int, ...]]:
        table = self._byte_table
        for match in self.pat.finditer(cleaned):
            piece = match.group()
            yield self.token_ids("".join(table[b] for b in piece.encode("utf-8")))

    def encode(self, text: str, limit: int | None = None) -> list[int]:
        """BPE ids of ``text`` without SOT/EOT; stops once at least ``limit`` ids are collected."""
        ids: list[int] = []
        for part in self._iter_ids(clean_text(text)):
            ids.extend(part)
            if limit is not None and len(ids) >= limit:
                break
        return ids

    def count_tokens(self, text: str) -> int:
        """Number of tokens including SOT and EOT; a text is truncated when this exceeds context_length."""
        return len(self.encode(text)) + 2

    def __call__(self, texts: str | Iterable[str]) -> np.ndarray:
        """int64 array [len(texts), context_length], same ids as open_clip's tokenizer."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        ctx = self.context_length
        result = np.zeros((len(texts), ctx), dtype=np.int64)
        for row, text in enumerate(texts):
            # ctx-1 body ids are enough to know whether [SOT]+body+[EOT] overflows ctx
            body = self.encode(text, limit=ctx - 1)
            tokens = [self.sot_token_id] + body + [self.eot_token_id]
            if len(tokens) > ctx:
                tokens = tokens[:ctx]
                tokens[-1] = self.eot_token_id
            result[row, : len(tokens)] = tokens
        return result

    def decode(self, ids: Iterable[int]) -> str:
        """Readable text of one row of ids (for messages): SOT is skipped, decoding stops at EOT."""
        if not hasattr(self, "_decoder"):
            self._decoder = {v: k for k, v in self.encoder.items()}
            self._byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        symbols = []
        for i in ids:
            i = int(i)
            if i == self.sot_token_id:
                continue
            if i == self.eot_token_id:
                break
            symbols.append(self._decoder[i])
        text = "".join(symbols).replace("</w>", self.byte_encoder[ord(" ")])
        return bytearray(self._byte_decoder[c] for c in text).decode("utf-8", errors="replace").strip()

"""Run the CLIP towers with onnxruntime: a query path that never imports torch, faster indexing on CPU.

``OnnxEncoder(export_dir)`` reads a folder written by ``retrieval.onnx_export.export_towers`` with
onnxruntime + numpy + ``retrieval.tokenizer`` only: this module never imports torch, open_clip or
onnx. Each tower's session is created on first use, so a text query never loads the visual tower.

Export folder layout (``FORMAT`` 1)::

    <out_dir>/
      export.json                   context_length, image_size, embed_dim, opset, towers, versions
      text.onnx   text.onnx.data    graph + weights in one external file
      visual.onnx visual.onnx.data
      visual-int8.onnx visual-int8.onnx.data   int8 weights, only where its gate passed (export.json "int8")
      bpe_simple_vocab_16e6.txt.gz  the tokenizer vocabulary

Start-up of a query process is what this is for, so the graphs are stored the way onnxruntime
loads fastest: weights in an external file (mapped, not parsed out of the protobuf: ViT-B-32 text
session 0.95 s -> 0.45 s) and already optimized by onnxruntime's hardware-independent fusions
(``ORT_ENABLE_EXTENDED``, saved through ``optimized_model_filepath``), so the text session loads
them with the optimizer off (another ~0.15 s). Such a graph uses onnxruntime contrib ops; when
the installed onnxruntime is not the one that optimized it, it is loaded with ``ORT_ENABLE_ALL``.
A query process (``embed_texts`` of <= 4 texts) also skips weight pre-packing (~0.15 s).

The text graph takes int64 ids ``[n, L]`` with ``L <= context_length`` when ``export.json`` says
``"dynamic_length": true``: with a causal mask and EOT (argmax) pooling, positions after the last
EOT of a batch cannot change the output, so ``OnnxEncoder`` cuts the padding before running the
graph (a short query runs several times faster than at the full 77 positions; batches of captions
too). Models without a causal mask or with another pooling are exported at the fixed length.

Importing this module does not import torch, open_clip or onnxruntime (the latter is imported on
first session creation).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from .errors import ModelUnavailable

if TYPE_CHECKING:  # imported where first used: indexing images needs no tokenizer (ftfy, regex: ~0.03 s)
    from .tokenizer import ClipTokenizer

__all__ = ["OnnxEncoder", "FORMAT", "OPSET", "META_FILE"]

FORMAT = 1
OPSET = 17
META_FILE = "export.json"
TOWERS = ("text", "visual")
INT8_TOWER = "visual-int8"  # the visual tower with int8 weights, where its gate passed (see onnx_export)
PRECISIONS = ("fp32", "int8")
_FILES = {"text": "text.onnx", "visual": "visual.onnx", INT8_TOWER: "visual-int8.onnx"}
_INPUTS = {"text": "tokens", "visual": "pixels"}
_OUTPUT = "embedding"
_TEXT_CHUNK = 64  # texts per onnxruntime call
_PIXEL_CHUNK = 64  # images per onnxruntime call
_FEW_TEXTS = 4  # up to this many texts per call: a query; the text session skips weight pre-packing


def _session_options(ort, *, level: str, threads: int | None, prepack: bool):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    opts.intra_op_num_threads = int(threads) if threads else 0  # 0: one per physical core
    opts.log_severity_level = 3  # errors only
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    return opts


def _load_options(ort, tower: str, *, optimized_by: str | None, threads: int | None, prepack: bool):
    """Options to run an exported tower.

    The text graph was optimized at export by this onnxruntime version: run it as saved
    (no optimizer pass, ~0.15 s less per process start). The visual tower keeps ORT_ENABLE_ALL,
    whose layout passes can speed up convolutions (ResNet towers); its start-up matters less.
    After an onnxruntime upgrade, everything is optimized again at load time.
    """
    level = "disable" if tower == "text" and optimized_by == ort.__version__ else "all"
    return _session_options(ort, level=level, threads=threads, prepack=prepack)


# ----------------------------------------------------------------------------------------------
# inference (torch-free)
# ----------------------------------------------------------------------------------------------
def _row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return num / np.maximum(den, 1e-30)


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    """As torch.nn.functional.normalize(x, dim=-1): x / max(||x||, 1e-12), float32."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32, copy=False)


def _trim_tokens(ids: np.ndarray) -> np.ndarray:
    """Drop the all-zero padding columns after the last non-padding position of the batch."""
    nonzero = np.flatnonzero(ids.any(axis=0))
    length = int(nonzero[-1]) + 1 if nonzero.size else 1
    return np.ascontiguousarray(ids[:, :length])


class OnnxEncoder:
    """Embed texts and preprocessed images with an ``export_towers`` folder, without torch.

    >>> enc = OnnxEncoder(Path("~/.cache/mmsearch/onnx/ViT-B-32-openai").expanduser())
    >>> enc.embed_texts(["a dog on a beach"]).shape   # (1, enc.dim), rows L2-normalized

    ``precision``: "fp32", or "int8" for the export's int8 visual tower (text stays fp32), which
    exists only where its gate passed: otherwise ModelUnavailable says what the gate measured.
    """

    def __init__(self, export_dir: Path, threads: int | None = None, precision: str = "fp32"):
        self.export_dir = Path(export_dir)
        self.threads = threads
        meta_path = self.export_dir / META_FILE
        if not self.export_dir.is_dir():
            raise ModelUnavailable(f"no ONNX export at {self.export_dir}")
        try:
            meta = json.loads(meta_path.read_text())
        except FileNotFoundError:
            raise ModelUnavailable(f"incomplete ONNX export at {self.export_dir}: {META_FILE} is missing") from None
        except (OSError, ValueError) as exc:
            raise ModelUnavailable(f"unreadable {meta_path}: {exc}") from exc
        try:
            if meta.get("format") != FORMAT:
                raise ModelUnavailable(
                    f"ONNX export at {self.export_dir} has format {meta.get('format')!r}, expected {FORMAT}:"
                    " export it again"
                )
            self.dim = int(meta["embed_dim"])
            self.context_length = int(meta["context_length"])
            self.image_size = int(meta["image_size"])
            towers = dict(meta["towers"])
            vocab_name = meta["tokenizer"]["file"]
        except ModelUnavailable:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ModelUnavailable(f"damaged {meta_path}: {exc!r}") from exc
        self.meta: dict = meta
        self._towers: dict[str, dict] = {}
        for tower, info in towers.items():
            if tower not in _FILES:
                continue
            try:
                sizes = {str(k): int(v) for k, v in dict(info["bytes"]).items()}
                file = str(info["file"])
            except (KeyError, TypeError, ValueError) as exc:
                raise ModelUnavailable(f"damaged {meta_path} ({tower}): {exc!r}") from exc
            for name, size in sizes.items():
                path = self.export_dir / name
                try:
                    actual = path.stat().st_size
                except OSError:
                    raise ModelUnavailable(f"damaged ONNX export: {path} is missing") from None
                if actual != size:
                    raise ModelUnavailable(
                        f"damaged ONNX export: {path} has {actual} bytes, export.json says {size}"
                    )
            self._towers[tower] = dict(info, path=self.export_dir / file)
        if not self._towers:
            raise ModelUnavailable(f"damaged {meta_path}: no tower listed")
        self._vocab_path = self.export_dir / vocab_name
        if "text" in self._towers and not self._vocab_path.is_file():
            raise ModelUnavailable(f"damaged ONNX export: {self._vocab_path} is missing")
        self.precision = "fp32"
        self.set_precision(precision)
        self._sessions: dict[str, Any] = {}
        self._prepacked: dict[str, bool] = {}
        self._tokenizer: ClipTokenizer | None = None

    # -- introspection ---------------------------------------------------------------------
    @property
    def towers(self) -> tuple[str, ...]:
        return tuple(t for t in TOWERS if t in self._towers)

    @property
    def int8_gate(self) -> dict | None:
        """The int8 gate's outcome recorded at export (min_cosine, threshold, probes, kept, reason)."""
        gate = self.meta.get("int8")
        return gate if isinstance(gate, dict) else None

    def set_precision(self, precision: str) -> None:
        """Run images through the fp32 or the int8 visual tower from now on (ModelUnavailable: no int8 one)."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if precision == "int8" and INT8_TOWER not in self._towers:
            raise ModelUnavailable(f"no int8 image tower for this model: {self.int8_refusal()}")
        self.precision = precision

    def int8_refusal(self) -> str:
        """Why this export has no int8 visual tower, in words."""
        gate = self.int8_gate
        if gate is None:
            return "its export predates int8 towers"
        return str(gate.get("reason") or "its int8 tower is missing")

    @property
    def tokenizer(self) -> ClipTokenizer:
        if self._tokenizer is None:
            if "text" not in self._towers:
                raise ModelUnavailable(f"the ONNX export at {self.export_dir} has no text tower")
            from .tokenizer import ClipTokenizer

            try:
                self._tokenizer = ClipTokenizer(self._vocab_path, self.context_length)
            except (OSError, ValueError, EOFError) as exc:
                raise ModelUnavailable(f"damaged tokenizer vocabulary {self._vocab_path}: {exc}") from exc
        return self._tokenizer

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` including SOT/EOT; more than ``context_length`` means truncated."""
        return self.tokenizer.count_tokens(text)

    # -- sessions ----------------------------------------------------------------------------
    def _session(self, tower: str, *, bulk: bool = True):
        """The tower's session, created on first use.

        ``bulk=False`` (a few texts, e.g. one query) creates it without weight pre-packing: that
        starts about 0.15 s sooner (ViT-B-32 text, 2 cores) and runs a short query about 0.02 s
        slower. A later bulk call replaces such a session by a pre-packed one (faster batches).
        """
        sess = self._sessions.get(tower)
        if sess is not None and (not bulk or self._prepacked.get(tower, True)):
            return sess
        info = self._towers.get(tower)
        if info is None:
            raise ModelUnavailable(f"the ONNX export at {self.export_dir} has no {tower} tower")
        import onnxruntime as ort

        optimized_by = (info.get("optimized_by") or {}).get("onnxruntime")
        opts = _load_options(ort, tower, optimized_by=optimized_by, threads=self.threads, prepack=bulk)
        try:
            sess = ort.InferenceSession(str(info["path"]), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelUnavailable(f"cannot load ONNX {tower} tower {info['path']}: {exc}") from exc
        self._sessions[tower] = sess
        self._prepacked[tower] = bulk
        return sess

    # -- embedding ---------------------------------------------------------------------------
    def embed_tokens(self, ids: np.ndarray) -> np.ndarray:
        """L2-normalized float32 [n, dim] for int64 token ids [n, context_length] (from ``tokenizer``)."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[1] != self.context_length:
            raise ValueError(f"token ids must be [n, {self.context_length}], got {ids.shape}")
        if ids.shape[0] == 0:
            return np.zeros((0, self.dim), np.float32)
        sess = self._session("text", bulk=ids.shape[0] > _FEW_TEXTS)
        trim = bool(self._towers["text"].get("dynamic_length"))
        out = np.empty((ids.shape[0], self.dim), np.float32)
        if trim:
            # similar lengths together, so that each call cuts as much padding as possible
            last = np.where(ids != 0, np.arange(ids.shape[1])[None, :], 0).max(axis=1)
            order = np.argsort(last, kind="stable")
        else:
            order = np.arange(ids.shape[0])
        for start in range(0, len(order), _TEXT_CHUNK):
            rows = order[start : start + _TEXT_CHUNK]
            batch = ids[rows]
            if trim:
                batch = _trim_tokens(batch)
            out[rows] = sess.run([_OUTPUT], {_INPUTS["text"]: np.ascontiguousarray(batch)})[0]
        return _l2_normalize(out)

    def embed_texts(self, texts: Iterable[str]) -> np.ndarray:
        """L2-normalized float32 [n, dim] text embeddings (same tokens as open_clip's tokenizer)."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return self.embed_tokens(self.tokenizer(texts))

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """L2-normalized float32 [n, dim] for preprocessed images: float32 [n, 3, S, S], S = image_size."""
        pixels = np.asarray(pixels)
        size = self.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (3, size, size):
            raise ValueError(f"pixels must be [n, 3, {size}, {size}], got {pixels.shape}")
        if pixels.shape[0] == 0:
            return np.zeros((0, self.dim), np.float32)
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        int8 = self.precision == "int8"
        sess = self._session(INT8_TOWER if int8 else "visual")
        # Dynamic int8 quantizes each MatMul's input with one scale for the whole call: one image per
        # call, so that an image's vector does not depend on the images beside it in a batch.
        chunk = 1 if int8 else _PIXEL_CHUNK
        parts = [
            sess.run([_OUTPUT], {_INPUTS["visual"]: pixels[i : i + chunk]})[0]
            for i in range(0, pixels.shape[0], chunk)
        ]
        return _l2_normalize(np.concatenate(parts) if len(parts) > 1 else parts[0])

    def close(self) -> None:
        """Drop the sessions (frees their memory); they are created again on next use."""
        self._sessions.clear()
        self._prepacked.clear()

    def __repr__(self) -> str:
        return (
            f"OnnxEncoder({str(self.export_dir)!r}, dim={self.dim}, towers={self.towers}, "
            f"loaded={tuple(self._sessions)})"
        )

"""An index as one object: its storage (metadata store, vector store, write lock) and its model.

This is the library's entry point (`retrieval.open_index`); the storage back end is picked by
`backends.open_storage` (an index directory: SQLite + FAISS files; a database URL; another
vector store), called only here. It hands the
indexer and search what they need — the storage, the encoder, options — and they never
call back into it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .calibrate import sample_path
from .config import KINDS, default_index_dir, default_model
from .backends import open_storage
from .errors import ModelInUse, ModelMismatch, ModelUnavailable
from .scan import type_counts
from .records import ModelManifest
from .stores import CONFIG_SETTING, MAX_MEMORY_SETTING, MetadataReader, MetadataWriter, Storage

if TYPE_CHECKING:
    from PIL import Image

    from .dupes import Group
    from .encoder import Encoder, ModelSource
    from .indexer import IndexReport, Removal
    from .ray_ingest import RayIngest
    from .search import Result
    from .stores import VectorSet

#: Setting (Store.set_setting) holding the image tower's precision: requested, used, int8 gate.
PRECISION_SETTING = "encoder:precision"


class Collection:
    """An open index: add files or texts, search by text, image or vector, embed."""

    def __init__(self, directory: Path, storage: Storage, model: str | None = None,
                 pretrained: str | None = None, device: str = "auto", backend: str | None = None,
                 wait: float = 0.0, precision: str | None = None) -> None:
        #: The index directory; for an index in a database (a URL), its per-user cache directory.
        self.directory = directory
        #: The index's stores and write lock (the back end, chosen in `open`).
        self.storage = storage
        self.device = device
        #: Seconds a write waits for another process's write to finish before IndexInUse.
        self.wait = wait
        #: 'auto' (onnxruntime on CPU, torch on CUDA), 'torch' or 'onnx'; env MMSEARCH_BACKEND.
        self.backend = backend or os.environ.get("MMSEARCH_BACKEND", "auto")
        self._requested = (model, pretrained)
        #: Image tower precision asked for (auto|fp32|int8); None: the index's recorded choice, else auto.
        self.precision = precision
        self._encoder: Encoder | None = None
        self._query_encoders: dict[str | None, Encoder] = {}  # by model key, None: the default
        #: Encoders of the index's other models (`add_model`), by model key.
        self._encoders: dict[str, Encoder] = {}
        # Threads of one process (a web server) share this object: the model loads once.
        self._loading = threading.RLock()

    # --- opening ----------------------------------------------------------------------------

    @classmethod
    def open(cls, directory: str | Path | None = None, *, model: str | None = None,
             pretrained: str | None = None, device: str = "auto", backend: str | None = None,
             create: bool = True, wait: float = 0.0, precision: str | None = None,
             db: str | None = None, vectors: str | None = None) -> Collection:
        """Open the index at `directory` (default: MMSEARCH_INDEX or the per-user data dir), or in the
        database `db` (an SQLAlchemy URL, `postgresql+psycopg://USER@HOST/DB` or `sqlite:///PATH`;
        default with no `directory`: MMSEARCH_DB), not both; `vectors` (default MMSEARCH_VECTORS):
        a Milvus URI (`milvus://HOST:PORT`, `http(s)://…`, a milvus-lite `PATH.db`) holding the
        searchable vectors instead of FAISS files.

        `model`/`pretrained` name the model for a new index; on an existing one they must
        match the recorded model (ModelMismatch) or may be left out. `wait`: seconds a write
        (add, reindex) waits for another process's write to finish before IndexInUse.
        `device`: 'auto', 'cpu', 'cuda' or 'cuda:N' (DeviceUnavailable otherwise, or without a GPU).
        `precision`: of the
        image tower, auto (on CPU int8 where the model's int8 gate passed and int8 ran faster, else fp32;
        fp16 on CUDA), fp32 or int8; kept with the index for later runs.
        A new index (`create`) is created on disk by its first write, once its inputs are checked.
        """
        if device not in ("auto", "cpu"):  # the usual two need no check (nor the encoder module)
            from .encoder import check_device

            check_device(device)
        if directory is None and db is None:
            db = os.environ.get("MMSEARCH_DB") or None
        path = Path(directory).expanduser().resolve() if directory else None if db else default_index_dir()
        storage = open_storage(path, db=db, vectors=vectors or os.environ.get("MMSEARCH_VECTORS") or None,
                               create=create)
        return cls(path or storage.cache_dir, storage, model, pretrained, device, backend, wait, precision)

    @property
    def reader(self) -> MetadataReader:
        """Reads of the metadata store; a new index is created here, on its first use."""
        return self.storage.reader

    @property
    def store(self) -> MetadataWriter:
        """Writes of the metadata store (SQLAlchemy), opened on first use."""
        return self.storage.writer

    def close(self) -> None:
        """Release the database; vectors not yet saved are synced from it next time."""
        self.storage.close()

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- model ------------------------------------------------------------------------------

    @property
    def manifest(self) -> ModelManifest | None:
        """The model that built this index (None while it is empty and new)."""
        return self.storage.manifest()

    def _checked_request(self, manifest: ModelManifest) -> ModelSource | None:
        """Refuse a model asked for that is not the index's; the resolved weights if some were named."""
        from .encoder import model_key, resolve_model

        name, pretrained = self._requested
        if name is not None and model_key(name) != manifest.name:
            raise ModelMismatch(f"this index was built with {manifest.describe()}, not {name}; "
                                "use the same model or another --index (or add it with --add-model)")
        if pretrained is None:
            return None
        source = resolve_model(manifest.name, pretrained)
        if (source.sha256 or source.pretrained) != (manifest.checkpoint_sha256 or manifest.pretrained):
            raise ModelMismatch(f"this index was built with {manifest.describe()}, not weights {pretrained}; "
                                "use the same model or another --index")
        return source

    def _new_model(self) -> tuple[str, str | None]:
        """(name, pretrained) of the model for a new index: the one asked for, else the default."""
        name, pretrained = self._requested
        if name is None:
            name, default_pretrained = default_model()
            pretrained = pretrained or default_pretrained
        return name, pretrained

    def _source(self) -> ModelSource:
        """The model to use: the recorded one (checked against any model asked for), or the one asked for."""
        from .encoder import resolve_model

        manifest = self.manifest
        if manifest is None:
            return resolve_model(*self._new_model())
        source = self._checked_request(manifest)
        if source is not None:
            return source
        return self._source_of(manifest)

    @staticmethod
    def _source_of(manifest: ModelManifest) -> ModelSource:
        """The recorded model `manifest` to load (ModelUnavailable when its checkpoint file is gone)."""
        from .encoder import resolve_model

        if manifest.checkpoint_sha256 and manifest.pretrained and not Path(manifest.pretrained).is_file():
            raise ModelUnavailable(f"the checkpoint this index was built with is missing: {manifest.pretrained}")
        return resolve_model(manifest.name, manifest.pretrained)

    def _on_cpu(self) -> bool:
        """Whether the model runs on a CPU (there its ONNX export is used, without torch)."""
        from .encoder import gpu_likely

        return self.device == "cpu" or (self.device == "auto" and not gpu_likely())

    @property
    def encoder(self) -> Encoder:
        """The encoder of this index's model, loaded on first use.

        On a CPU, a model exported to ONNX before loads without torch, for a new index too.
        """
        if self._encoder is not None:
            return self._encoder
        with self._loading:
            if self._encoder is None:
                from .encoder import find_export, load_source

                manifest = self.manifest
                cpu = self._on_cpu()
                encoder = None
                if manifest is not None and cpu and self.backend != "torch":
                    self._checked_request(manifest)
                    encoder = self._export(manifest)
                elif cpu and self.backend != "torch":
                    encoder = find_export(*self._new_model())
                if encoder is None:
                    encoder = load_source(self._source(), self.device, self.backend)
                encoder.set_precision(self._requested_precision(self.precision_setting()))
                self._encoder = encoder
        return self._encoder

    def _export(self, manifest: ModelManifest, model: str | None = None) -> Encoder | None:
        """The ONNX export (no torch) of the index's model of key `model` (None: the default), None
        where it was never exported."""
        from .encoder import load_export  # not for a cached query

        return load_export(manifest, self.reader.setting(self._config_setting(model)))

    def _config_setting(self, model: str | None) -> str:
        """The setting holding a config-file model's content key (CONFIG_SETTING for the default, as before)."""
        return CONFIG_SETTING if model is None or model == self.storage.model() else f"{CONFIG_SETTING}:{model}"

    def models(self) -> dict[str, ModelManifest]:
        """Every model of the index by key (the name of its vector sets), the default first."""
        return self.storage.models()

    def model_of(self, model: str | None) -> str | None:
        """The key of the index's model `model` (a name as given to --model, or a key from `models`);
        None for the default (and for None). ModelMismatch for a model the index does not have, or a
        name that fits several (give the key)."""
        if model is None:
            return None
        models = self.storage.models()
        if not models:
            raise self.storage.empty_index_error()
        if model in models:
            key = model
        else:
            from .encoder import model_key as recorded_name  # how the index records a name (a config by path)

            matches = [k for k, m in models.items() if m.name == recorded_name(model)]
            if len(matches) != 1:
                known = "; ".join(f"{m.describe()} (key {k})" for k, m in models.items())
                raise ModelMismatch(f"{'several models of this index are' if matches else 'this index has no model'} "
                                    f"{model}: use one of its models by name or key: {known}")
            key = matches[0]
        return None if key == self.storage.model() else key

    def _encoder_of(self, model: str | None) -> Encoder:
        """The encoder of the index's model of key `model` (None: the default), loaded once."""
        if model is None or model == self.storage.model():
            return self.encoder
        with self._loading:
            if model not in self._encoders:
                from .encoder import load_source

                manifest = self.storage.manifest(model)
                if manifest is None:
                    raise ModelMismatch(f"this index has no model {model}")
                encoder = self._export(manifest, model) if self._on_cpu() and self.backend != "torch" else None
                if encoder is None:
                    encoder = load_source(self._source_of(manifest), self.device, self.backend)
                encoder.set_precision(self._requested_precision(self.precision_setting()))
                self._encoders[model] = encoder
            return self._encoders[model]

    def precision_setting(self) -> dict[str, Any]:
        """The precision recorded by the last `add`: requested, used, and the int8 gate's outcome."""
        raw = self.reader.setting(PRECISION_SETTING)
        try:
            value = json.loads(raw) if raw else {}
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}

    def _requested_precision(self, stored: dict[str, Any]) -> str:
        """The precision asked for: this run's, else the one `stored` with the index, else auto."""
        return self.precision or stored.get("requested") or "auto"

    def embed_query_text(self, text: str, model: str | None = None) -> np.ndarray:
        """The unit vector of one query text under the model of key `model` (None: the default): from
        the query cache (keyed by the model's identity), else the fastest encoder at hand.

        Even beside a GPU, a single query runs on the ONNX text tower: no torch import, no CUDA start.
        """
        from .query_cache import QueryCache

        manifest = self.storage.manifest(model)
        cache = QueryCache(self.storage.cache_dir / "query-cache", repr(manifest.identity())) if manifest else None
        vector = cache.get(text) if cache else None
        if vector is None:
            with self._loading:
                if model not in self._query_encoders:
                    # A loaded encoder is used as it is; the ONNX export is loaded only without one.
                    loaded = self._encoder if model is None else self._encoders.get(model)
                    exported = (self._export(manifest, model)
                                if loaded is None and manifest and self.backend != "torch" else None)
                    self._query_encoders[model] = loaded or exported or self._encoder_of(model)
            vector = self._query_encoders[model].embed_texts([text])[0]
            if cache:
                cache.put(text, vector)
        return vector

    def embed_texts(self, texts: Sequence[str], model: str | None = None) -> np.ndarray:
        """L2-normalized float32 [n, dim] embeddings of texts with this index's model (or its model `model`)."""
        texts = _listed(texts, "embed_texts")
        return self._encoder_of(self.model_of(model)).embed_texts(texts)

    def embed_images(self, images: Sequence[Image.Image | str | Path], model: str | None = None) -> np.ndarray:
        """L2-normalized float32 [n, dim] embeddings of PIL images or image files (with the model `model`)."""
        images = _listed(images, "embed_images")
        return self._encoder_of(self.model_of(model)).embed_images(images)

    # --- writing ----------------------------------------------------------------------------

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the index's write lock (waiting up to `self.wait` s for another process) and save on exit."""
        with self.storage.writing(self.wait):
            yield

    def claim_model(self) -> Encoder:
        """Load the encoder and record (or check) it as this index's model."""
        from .encoder import export_name

        encoder = self.encoder
        self.storage.claim_model(encoder.manifest)
        name = encoder.manifest.name
        if name.lower().endswith(".json") and self.reader.setting(CONFIG_SETTING) is None:
            self.store.set_setting(CONFIG_SETTING, export_name(name))  # the config's content, as built
        stored = self.precision_setting()
        setting = {"requested": self._requested_precision(stored),
                   "used": encoder.precision, "int8_gate": encoder.int8_gate}
        if setting != stored:
            self.store.set_setting(PRECISION_SETTING, json.dumps(setting, sort_keys=True))
        return encoder

    def load_vectors(self) -> None:
        """Load every vector set (a server warms up with it)."""
        self.storage.load_vectors()

    def add(self, paths: Sequence[str | Path] = (), **options: Any) -> IndexReport:
        """Index image files/folders and text corpora (incremental); see `indexer.index_paths`.

        With no paths, re-scans every root indexed before. Options include `prune=True`, `ocr=True/False`,
        `exclude=[patterns]`, `include_hidden=True` and `text_field=NAME` (the last three are
        stored with each root; None keeps what is stored), and `ray=ADDRESS` ('local', 'auto',
        'ray://HOST:PORT', or a `ray_ingest.RayIngest`) to embed the images on Ray Data. A new
        index is created only once the paths exist and its model loads. New files are embedded
        with the default model (on Ray, if asked), then with each other model of the index
        (`add_model`, here).
        """
        from .indexer import check_paths, index_paths
        from .ocr import wanted

        paths = [str(p) for p in _listed(paths, "add")]
        max_memory = options.pop("max_memory", None)
        ingest = _ray_ingest(options.pop("ray", None))  # refused here, before anything is written
        if ingest is not None:
            options["embed_images"] = ingest.embed_images
        options["ocr"] = wanted(options.get("ocr"))  # OCR asked for and not installed: refused before any write
        if not self.storage.exists:
            check_paths(paths)
            self.encoder  # noqa: B018 - a model that cannot load leaves no index behind
        with self.writing(), ingest or contextlib.nullcontext():
            if max_memory is not None:
                self.storage.set_memory_budget(max_memory)
            report = index_paths(self.storage, self.claim_model, paths, **options)
            self._fill_models(report, options.get("workers"))
            if report.removed or report.updated:  # their items went: so go their thumbnails
                self.prune_thumbnails()
            return report

    def _fill_models(self, report: IndexReport, workers: int | None = None) -> None:
        """Give every item a vector of each model of the index besides the default (see `indexer.fill_vectors`)."""
        from .indexer import fill_vectors

        for model in list(self.storage.models())[1:]:
            fill_vectors(self.storage, model, functools.partial(self._encoder_of, model), report, workers=workers)

    def add_model(self, model: str, pretrained: str | None = None, *, workers: int | None = None) -> IndexReport:
        """Add another model to the index: every item gets a vector of it (its own vector sets; the
        default model's are untouched), and later `add` runs embed new files with it too.

        `model`/`pretrained` as for a new index. Run again, it embeds only what still lacks a vector of
        it (a run cut short resumes). EmptyIndex on an index without a model yet (index it first);
        ModelUnavailable as for a new index. `report.filled` says how many items were embedded.
        """
        from .encoder import export_name, find_export, load_source, resolve_model
        from .indexer import IndexReport, fill_vectors

        if self.storage.model() is None:
            raise self.storage.empty_index_error()
        encoder = find_export(model, pretrained) if self._on_cpu() and self.backend != "torch" else None
        if encoder is None:
            encoder = load_source(resolve_model(model, pretrained), self.device, self.backend)
        encoder.set_precision(self._requested_precision(self.precision_setting()))
        report = IndexReport()
        with self.writing():
            key = self.storage.add_model(encoder.manifest)
            setting = self._config_setting(key)
            if model.lower().endswith(".json") and self.reader.setting(setting) is None:
                self.store.set_setting(setting, export_name(model))  # the config's content, as built
            if key != self.storage.model():
                self._encoders.setdefault(key, encoder)
                fill_vectors(self.storage, key, lambda: encoder, report, workers=workers)
        return report

    def remove_model(self, model: str) -> int:
        """Remove one of the index's models: its vectors and vector sets (the other models' are untouched).

        ModelInUse for the default model (it embeds new files first and answers plain queries);
        ModelMismatch for a model the index does not have. Returns how many vectors were removed.
        """
        key = self.model_of(model)
        if key is None:
            raise ModelInUse(f"{model} is this index's default model (its first): it cannot be removed; "
                             "remove the other models, or build a new index with another model")
        with self.writing():
            removed = self.storage.remove_model(key)
            self.store.set_setting(self._config_setting(key), None)
        for kind in KINDS:
            sample_path(self.storage, kind, key).unlink(missing_ok=True)
        self._encoders.pop(key, None)
        self._query_encoders.pop(key, None)
        return removed

    def remove(self, paths: Sequence[str | Path]) -> Removal:
        """Take files and folders (and what was indexed from them) out of the index; see `indexer.remove_paths`."""
        from .indexer import remove_paths

        paths = [str(p) for p in _listed(paths, "remove")]
        with self.writing():
            removal = remove_paths(self.storage, paths)
            self.prune_thumbnails()
            return removal

    def prune_thumbnails(self) -> int:
        """Delete the cached thumbnails of items gone or changed (see `gallery.prune_thumbnails`); run
        by `add` when files went or changed, `remove` and `reindex`. Returns how many were deleted."""
        from .gallery import Thumbnails

        return Thumbnails(self).prune()

    def add_texts(self, texts: Sequence[str], source: str) -> IndexReport:
        """Index texts that live in no file, under the name `source` (replacing earlier ones)."""
        from .indexer import index_texts

        texts = _listed(texts, "add_texts")
        if not self.storage.exists:
            self.encoder  # noqa: B018 - a model that cannot load leaves no index behind
        with self.writing():
            report = index_texts(self.storage, self.claim_model, texts, source)
            self._fill_models(report)
            return report

    def reindex(self, layout: str | None = None, max_memory: int | None = None) -> dict[str, str]:
        """Rebuild (and re-tune) every vector set from the metadata store.

        A FAISS `layout` given is kept by later runs; None goes back to the automatic choice.
        `max_memory` (bytes, kept by later runs; 0 clears it; None keeps the stored one) has
        the automatic choice pick a layout that fits, compressed if need be. Returns the layout of
        each set, by its name (the kind for the default model, `KEY-kind` for another model).
        """
        with self.writing():
            if max_memory is not None:
                self.storage.set_memory_budget(max_memory)
            built = self.storage.vectors.rebuild(self.storage.keys(), layout)
            self.prune_thumbnails()
        return {key.name(self.storage.model()): index.layout for key, index in built.items()}

    def vectors(self, kind: str, model: str | None = None) -> VectorSet:
        """The searchable vectors of one kind (of the index's model `model`), up to date with the metadata store."""
        return self.storage.vector_set(kind, self.model_of(model))

    def refresh(self) -> list[str]:
        """Take up the vectors another process (`mmsearch index`) saved since they were loaded
        (see `VectorStore.refresh`); returns the names of the sets swapped."""
        if self.storage.model() is None:
            return []
        return [key.name(self.storage.model()) for key in self.storage.vectors.refresh()]

    # --- searching --------------------------------------------------------------------------

    def search(self, query: str | Path | Image.Image | np.ndarray | Sequence[str | Path | Image.Image],
               model: str | None = None, **options: Any) -> list[Result]:
        """Search by text, image (path or PIL image), vector, or a list of texts and images combined.

        Options include `k`, `target`, `under`, `add`/`subtract` (texts, "text::weight"), `exclude`
        (texts), `min_score` (a cosine or 'auto'), `within`, `collapse`, the filters `after`, `before`,
        `camera`, `ext`, `min_size`, `mode` ('hybrid': meaning and words fused, 'semantic', 'words') and
        `sort` ('score' or 'date'); see `search.search`. `model`: which of the index's models embeds the
        query and whose vectors are searched (a name or key, see `model_of`; default: the first).
        """
        from .search import Searcher, search

        key = self.model_of(model)
        return search(Searcher(self.storage, functools.partial(self.embed_query_text, model=key),
                               functools.partial(self.embed_images, model=key), key), query, **options)

    def duplicates(self, threshold: float | None = None, model: str | None = None) -> list[Group]:
        """Groups of near-identical images (cosine ≥ threshold, default 0.95, under the index's model
        `model`, default the first); reports only; see `dupes`."""
        from .dupes import DEFAULT_THRESHOLD, find_duplicates

        return find_duplicates(self.storage, DEFAULT_THRESHOLD if threshold is None else threshold,
                               self.model_of(model))

    def info(self) -> dict[str, Any]:
        """Index path, model (the default), every model with its vectors per kind, counts per kind, the
        words search's counts (`words`: items with words, images read by OCR and those with text found;
        None on an index built before it), FAISS layouts, roots and how each is scanned, files ignored
        for their type (count, and per type), and size on disk."""
        counts = self.reader.counts()
        ignored = self.reader.ignored()
        manifest = self.manifest
        size = self.storage.size_bytes()
        layouts, vectors = {}, {}
        if manifest is not None:
            for kind in KINDS:
                if counts.get(kind):
                    layouts[kind] = self.vectors(kind).layout
                    vectors[kind] = self.vectors(kind).describe()
        return {
            "index": self.storage.location,
            "backends": self.storage.backends(),
            "model": None if manifest is None else {
                "name": manifest.name, "pretrained": manifest.pretrained,
                "checkpoint_sha256": manifest.checkpoint_sha256, "dim": manifest.dim,
            },
            "models": self._models_info(),
            "images": counts.get("image", 0),
            "texts": counts.get("text", 0),
            "files": counts["files"],
            "failures": counts["failures"],
            "words": self.reader.word_counts(),
            "layouts": layouts,
            "precision": self.precision_setting() or None,
            "vector_index": vectors,
            "max_memory": int(self.reader.setting(MAX_MEMORY_SETTING) or 0) or None,
            "roots": self.reader.roots(),
            "root_options": {root: asdict(opts) for root, opts in self.reader.root_options().items()},
            "ignored": len(ignored),
            "ignored_types": type_counts(ignored),
            "ignored_files": ignored,
            "size_bytes": size,
        }

    def _models_info(self) -> list[dict[str, Any]]:
        """Each model of the index (the default first): key, manifest, vectors per kind (`images`,
        `texts`) and the layout of each of its vector sets."""
        counts = self.reader.model_counts() if self.storage.exists else {}
        out = []
        for key, manifest in self.storage.models().items():
            have = counts.get(key, {})
            out.append({"key": key, "default": key == self.storage.model(), **asdict(manifest),
                        "images": have.get("image", 0), "texts": have.get("text", 0),
                        "layouts": {kind: self.storage.vector_set(kind, key).layout for kind in KINDS if have.get(kind)}})
        return out

    def failures(self) -> list[tuple[str, str]]:
        """(path, reason) of every file or record skipped and not indexed since."""
        return self.reader.failures()

    def ignored(self) -> list[str]:
        """Files skipped for their type (not failures) at the last scan of their root."""
        return self.reader.ignored()


def open_index(directory: str | Path | None = None, **options: Any) -> Collection:
    """Open (or create) an index; see `Collection.open`."""
    return Collection.open(directory, **options)


def _ray_ingest(ray: Any) -> RayIngest | None:
    """The checked Ray executor of `add(ray=...)`: None for no Ray, else one for the address or the
    `RayIngest` given (ClusterUnavailable when Ray is missing or the address does not answer)."""
    if not ray:
        return None
    from .ray_ingest import RayIngest

    ingest = ray if isinstance(ray, RayIngest) else RayIngest(str(ray))
    ingest.check()
    return ingest


def _listed(values: Any, method: str) -> list[Any]:
    """`values` as a list; a lone str or path is refused (TypeError), never split into characters."""
    if isinstance(values, (str, bytes, os.PathLike)):
        raise TypeError(f"{method}() takes a list, not a single {type(values).__name__}: "
                        f"pass [{values!r}] for one item")
    return list(values)


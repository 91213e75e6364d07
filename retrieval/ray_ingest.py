"""Image ingest on Ray Data: the same incremental indexing, with decoding and the model spread over a cluster.

The driver (this process) scans and plans exactly as a local run does (`indexer.index_paths`: what
is new or changed, the prune rule, failures) and holds the index's write lock; only the images to
embed go through Ray::

    paths ─► read bytes + hash ─► decode + preprocess   (CPU tasks, num_cpus=0.5)
          ─► embed                                       (actor pool: one per GPU, else one CPU actor per node;
                                                          the model loaded once per actor)
          ─► the driver commits each batch              (`indexer.commit_images` through `Storage.commit`)

A batch is committed as it comes back, keyed by file path: a task Ray retries (its actor died and
was restarted) replaces, never doubles, what it produced, and a driver killed mid-way keeps every
committed batch, so the next run embeds only what is left. Text corpora are embedded on the driver,
as in a local run, and so are the vectors of an index's other models (`Collection.add_model`). Workers run the driver's own `retrieval` package (shipped as a Ray `py_modules`
runtime environment where this process starts or joins Ray) with the driver's export cache and
offline settings (`_WORKER_ENV`).

Only imported when asked for (`index --ray`, `Collection.add(ray=...)`): `import retrieval` never imports Ray.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numpy as np

from .config import CLUSTER_EXTRA
from .errors import ClusterUnavailable
from .images import Decoded, Geometry, decode_file
from .indexer import SAVE_EVERY, IndexReport, commit_images
from .records import ModelManifest
from .stores import CONFIG_SETTING

if TYPE_CHECKING:
    from .encoder import Encoder
    from .stores import Storage

log = logging.getLogger("mmsearch")

#: Logical CPUs a decode task takes: two run beside an embedding actor on a 2-core machine.
DECODE_CPUS = 0.5
#: Files per decode task call.
DECODE_BATCH = 16
#: Seconds a `ray://` address has to accept a connection before the run is refused.
CONNECT_TIMEOUT = 5.0
#: Environment the workers get from the driver: where exports are cached, the offline switches,
#: the engine asked for, and the model hub's settings (HF_*); not the rest (MMSEARCH_TOKEN is a secret).
_WORKER_ENV = ("MMSEARCH_CACHE", "MMSEARCH_OFFLINE", "MMSEARCH_BACKEND", "XDG_CACHE_HOME")


@dataclass(frozen=True)
class ModelSpec:
    """What an embedding actor needs to load the driver's model by itself (picklable)."""

    manifest: ModelManifest
    config_key: str | None  # the `export_name` the index recorded for a config-file model
    backend: str
    precision: str

    def load(self, device: str) -> Encoder:
        """The encoder on `device` ('cpu' or 'cuda'): the ONNX export on a CPU where there is one."""
        from .encoder import load_export, load_source, resolve_model

        encoder = load_export(self.manifest, self.config_key) if device == "cpu" and self.backend != "torch" else None
        if encoder is None:
            encoder = load_source(resolve_model(self.manifest.name, self.manifest.pretrained), device, self.backend)
        if encoder.manifest.identity() != self.manifest.identity():
            raise ClusterUnavailable(f"a Ray worker loaded {encoder.manifest.describe()}, not the index's "
                                     f"{self.manifest.describe()}")
        encoder.set_precision(self.precision)
        return encoder


class Embedder:
    """The embedding actor: loads the model once, then embeds batches of decoded pixels.

    A batch holds the columns of `_read_and_decode`; rows that failed to decode get a zero vector.
    """

    def __init__(self, spec: ModelSpec, device: str) -> None:
        self.encoder = spec.load(device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["ok"].astype(bool)
        vectors = np.zeros((len(ok), self.encoder.dim), np.float32)
        if ok.any():
            vectors[ok] = self.encoder.embed_pixels(np.ascontiguousarray(batch["pixels"][ok]))
        return {"path": batch["path"], "size": batch["size"], "mtime": batch["mtime"], "sha256": batch["sha256"],
                "error": batch["error"], "ok": ok, "vector": vectors}


def _read_and_decode(batch: dict[str, np.ndarray], geometry: Geometry, draft: bool) -> dict[str, np.ndarray]:
    """Read, hash and decode a batch of files (a CPU task): identity, pixels (zeros where it failed), error."""
    rows = []
    pixels = np.zeros((len(batch["path"]), geometry.size, geometry.size, 3), np.uint8)
    for i, path in enumerate(batch["path"]):
        decoded = decode_file(str(path), geometry, draft)  # the Ray path's geometry never sends JPEGs to a device
        if decoded.pixels is not None:
            pixels[i] = decoded.pixels
        rows.append(decoded)
    return {"path": np.array([d.path for d in rows], dtype=object),
            "size": np.array([d.size for d in rows], np.int64),
            "mtime": np.array([d.mtime for d in rows], np.float64),
            "sha256": np.array([d.sha256 for d in rows], dtype=object),
            "error": np.array([d.error or "" for d in rows], dtype=object),
            "ok": np.array([d.pixels is not None for d in rows]),
            "pixels": pixels}


def _worker_env() -> dict[str, Any]:
    """A runtime environment giving workers the driver's variables that decide which model loads how."""
    return {"env_vars": {k: v for k, v in os.environ.items() if k in _WORKER_ENV or k.startswith("HF_")}}


def _check_reachable(address: str) -> None:
    """Refuse, within CONNECT_TIMEOUT, a `ray://host:port` that does not accept connections."""
    parts = urlsplit(address)
    try:
        port = parts.port or 10001
    except ValueError:  # a port that is not a number
        port = None
    if not parts.hostname or port is None:
        raise ClusterUnavailable(f"bad Ray address {address!r}: use ray://HOST:PORT, auto or local")
    try:
        socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT).close()
    except OSError as exc:
        raise ClusterUnavailable(f"no Ray cluster answers at {address} ({exc.strerror or exc}): "
                                 "is `ray start --head` running there, with the client port open?") from None


class RayIngest:
    """Embeds the images of an `index` run on a Ray cluster; see the module docstring.

    `address`: 'local' (start Ray on this machine for this run), 'auto' (the cluster already running
    on this machine, as `ray start` left it, or RAY_ADDRESS), or 'ray://HOST:PORT' (a remote cluster's
    client port). When Ray is already initialized in this process (a library caller's own
    `ray.init`), that session is used as it is and left running. `actors`: embedding actors
    (default: one per GPU, else one per node); `embedder`: the actor class (a subclass of `Embedder`).
    """

    def __init__(self, address: str = "local", *, actors: int | None = None,
                 embedder: type[Embedder] = Embedder) -> None:
        self.address = address
        self.actors = actors
        self.embedder = embedder
        self._started = False  # Ray was initialized here, so `close` shuts it down

    def check(self) -> None:
        """Refuse, fast and before anything is written, a missing Ray, a bad address, a `ray://`
        address that does not answer or, for 'auto', no cluster running (ClusterUnavailable). A
        local Ray starts only when there are images to embed (`start`): a re-scan that finds
        nothing new costs no start-up."""
        try:
            import ray.data  # noqa: F401 - Ray Data, not only Ray core
        except ImportError:
            raise ClusterUnavailable(f"--ray needs Ray Data: {CLUSTER_EXTRA}") from None
        if self.address.startswith("ray://"):
            _check_reachable(self.address)
        elif self.address == "auto":
            self.start()  # connecting to a running cluster is quick, and the only sure check
        elif self.address != "local":
            raise ClusterUnavailable(f"bad Ray address {self.address!r}: use ray://HOST:PORT, auto or local")

    def start(self) -> None:
        """Connect to (or start) Ray, unless this process already did (ClusterUnavailable when it cannot)."""
        import ray

        if ray.is_initialized():
            return
        # The workers run this very `retrieval` (a checkout, or another version than the cluster's).
        env = {"py_modules": [str(Path(__file__).resolve().parent)], **_worker_env()}
        try:
            ray.init(address=self.address, include_dashboard=False, logging_level=logging.ERROR,
                     log_to_driver=False, runtime_env=env)
        except (ConnectionError, RuntimeError, ValueError) as exc:  # no cluster, a version mismatch, ...
            hint = " (start one with `ray start --head`, or use --ray local)" if self.address == "auto" else ""
            raise ClusterUnavailable(f"cannot connect to Ray at {self.address}: {exc}{hint}") from None
        self._started = True

    def __enter__(self) -> RayIngest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Shut Ray down if `start` initialized it."""
        if self._started:
            import ray

            ray.shutdown()
            self._started = False

    def embed_images(self, storage: Storage, encoder: Encoder, images: list[str], changed: set[str],
                     report: IndexReport, *, batch_size: int, workers: int, draft: bool,
                     progress: Callable[[int], None] | None) -> None:
        """Embed `images` on the cluster and commit them here batch by batch (`indexer.ImageEmbedder`).

        `workers` (local decode processes) has no meaning here: Ray schedules the decode tasks.
        """
        import ray
        import ray.data

        self.start()
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the caller shows progress
        context.print_on_execution_start = False
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        # A CPU for the actor, but never so much that no decode task fits beside it (a 1-CPU Ray).
        actor_cpus = max(DECODE_CPUS, min(1.0, resources.get("CPU", 1.0) - 1.0))
        device = "cuda" if gpus else "cpu"
        actors = self.actors or gpus or max(1, sum(1 for node in ray.nodes()
                                                   if node.get("Alive") and node["Resources"].get("CPU")))
        spec = ModelSpec(encoder.manifest, storage.reader.setting(CONFIG_SETTING),
                         "torch" if encoder.backend == "torch" and not gpus else "auto",
                         encoder.precision if encoder.precision in ("fp32", "int8") and not gpus else "auto")
        env = _worker_env()  # the driver's now, also where Ray was initialized by the caller
        geometry = Geometry(encoder.geometry.size, encoder.geometry.resize_mode)  # decoded on CPUs, never on a device
        data = ray.data.from_items([{"path": p} for p in images],
                                   override_num_blocks=max(1, min(len(images) // DECODE_BATCH, 1000)))
        decoded = data.map_batches(_read_and_decode, fn_kwargs={"geometry": geometry, "draft": draft},
                                   batch_size=DECODE_BATCH, num_cpus=DECODE_CPUS, runtime_env=env)
        # An actor that dies is restarted and its batch retried (Ray Data's actor pool default).
        embedded = decoded.map_batches(
            self.embedder, fn_constructor_kwargs={"spec": spec, "device": device}, batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=1 if gpus else 0, num_cpus=actor_cpus,
            runtime_env=env)
        started = time.perf_counter()
        try:
            self._commit_all(embedded, storage, encoder, changed, report, batch_size=batch_size, progress=progress)
        except ray.exceptions.RayError as exc:  # a worker's error (a model that cannot load, ...): committed work stays
            reason = next((line for line in str(exc).splitlines()[::-1] if line.strip()), type(exc).__name__)
            raise ClusterUnavailable(f"the Ray run failed: {reason.strip()}") from None
        report.timings["images"] = time.perf_counter() - started

    def _commit_all(self, embedded: Any, storage: Storage, encoder: Encoder, changed: set[str], report: IndexReport,
                    *, batch_size: int, progress: Callable[[int], None] | None) -> None:
        """Commit the embedded batches as they come back (see the module docstring)."""
        last_save = time.monotonic()
        done: set[str] = set()  # a row Ray hands back twice is committed once
        for batch in embedded.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=1):
            ok, bad, vectors = [], [], []
            for i, path in enumerate(batch["path"]):
                if path in done:
                    continue
                done.add(path)
                row = Decoded(str(path), int(batch["size"][i]), float(batch["mtime"][i]), str(batch["sha256"][i]),
                              None, str(batch["error"][i]) or None)
                if batch["ok"][i]:
                    ok.append(row)
                    vectors.append(batch["vector"][i])
                else:
                    bad.append(row)
            stacked = np.stack(vectors) if vectors else np.zeros((0, encoder.dim), np.float32)
            commit_images(storage, ok, stacked.astype(np.float32), bad, changed, report)
            if progress:
                progress(len(ok) + len(bad))
            if time.monotonic() - last_save > SAVE_EVERY:
                storage.vectors.save()
                last_save = time.monotonic()

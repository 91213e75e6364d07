"""CLIP encoders: resolving a model offline-safely and embedding texts and pixels.

`resolve_model` finds weights without torch (bundled config, local checkpoint, or the hub
cache) and fails in seconds with a fix when they cannot be had. `load_encoder` builds the
open_clip model; torch is imported only there. Knows nothing of SQLite, FAISS or click.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import BUNDLED_DIR, DEFAULT_TAGS, cache_dir, write_cache_file
from .errors import DeviceUnavailable, ModelUnavailable
from .images import Geometry, fit, open_image, to_rgb
from .records import ModelManifest

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger("mmsearch")

#: Image tower precisions to ask for: auto = int8 on CPU where it passed its gate and ran faster, fp16 on CUDA.
PRECISIONS = ("auto", "fp32", "int8")
#: Values of --pretrained that mean "no weights": a seeded random init, for benchmarks.
RANDOM_WEIGHTS = ("random", "none")
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
_HUB_HOST = ("huggingface.co", 443)


@dataclass(frozen=True)
class ModelSource:
    """Where a model's config and weights come from, resolved without torch."""

    name: str  # as recorded in the index: an open_clip name, a bundled name, or a config file path
    arch: str  # the name open_clip knows the architecture by
    pretrained: str | None  # hub tag, absolute checkpoint path, or "random"
    checkpoint: Path | None  # a local file to load, when there is one
    sha256: str | None
    config: Path | None  # an open_clip model config shipped outside open_clip (bundled models)
    hub_cfg: dict[str, Any] | None = None  # open_clip's pretrained config, for a tag


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's content, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cached_sha256(path: Path) -> str:
    """`sha256_file` of a checkpoint, remembered in the per-user cache by (path, size, mtime, inode).

    A 600 MB checkpoint then costs a stat, not a 1-2 s read, on every run; a file changed in place
    gets a new mtime and is hashed again.
    """
    path = Path(path).resolve()
    st = path.stat()
    stamp = [str(path), st.st_size, st.st_mtime_ns, st.st_ino]
    record = cache_dir() / "sha256" / f"{hashlib.sha256(str(path).encode()).hexdigest()[:32]}.json"
    try:
        saved = json.loads(record.read_text())
        if saved["file"] == stamp and isinstance(saved["sha256"], str):
            return saved["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = sha256_file(path)
    # a cache: any failure to write it only means hashing again next time
    write_cache_file(record, json.dumps({"file": stamp, "sha256": digest}).encode())
    return digest


def bundled_models() -> list[str]:
    """Names of the models shipped in index_data/ (an open_clip config + a checkpoint each)."""
    return sorted(p.stem for p in BUNDLED_DIR.glob("*.json") if (BUNDLED_DIR / f"{p.stem}.pt").exists())


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.startswith(".") or value.lower().endswith(_CHECKPOINT_SUFFIXES)


def _hub_cached_file(hub_cfg: dict[str, Any]) -> Path | None:
    """The locally cached weights of an open_clip tag, or None (never touches the network)."""
    if hub_cfg.get("hf_hub"):
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None
        # open_clip writes 'org/repo/' (default file names) or 'org/repo/file.bin'.
        repo, filename = os.path.split(hub_cfg["hf_hub"])
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        for fname in names:
            found = try_to_load_from_cache(repo, fname)
            if isinstance(found, str):
                return Path(found)
    if hub_cfg.get("url"):
        target = Path("~/.cache/clip").expanduser() / os.path.basename(hub_cfg["url"])
        if target.exists():
            return target
    return None


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") or os.environ.get("MMSEARCH_OFFLINE"):
        return False
    try:
        socket.create_connection(_HUB_HOST, timeout=timeout).close()
        return True
    except OSError:
        return False


def model_key(name: str) -> str:
    """The name an index records for a model: config files by absolute path, others as given."""
    return str(Path(name).expanduser().resolve()) if name.lower().endswith(".json") else name


def _default_weights(name: str, config: Path | None) -> str:
    """The tag `name` means without --pretrained (config.DEFAULT_TAGS); ModelUnavailable where there is none.

    Random weights are never implied: they make an index that looks fine and finds nothing.
    """
    fix = "pass --pretrained TAG, --pretrained /path/to/checkpoint, or --pretrained random for random weights"
    if config is not None:
        raise ModelUnavailable(f"model config {name} names no weights: {fix}")
    tag = DEFAULT_TAGS.get(name)
    if tag is None:
        import open_clip

        tags = open_clip.list_pretrained_tags_by_model(name)
        listed = f"open_clip knows {', '.join(tags)}" if tags else "open_clip knows no weights for it"
        raise ModelUnavailable(f"no default weights for {name} ({listed}): {fix}")
    return tag


def _check_checkpoint(path: Path) -> None:
    """Refuse a file that is no checkpoint open_clip reads (torch zip or pickle, safetensors, numpy), by its first bytes."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError as exc:
        raise ModelUnavailable(f"cannot read checkpoint {path}: {exc.strerror}") from None
    zip_or_pickle = head.startswith((b"PK\x03\x04", b"\x80", b"\x93NUMPY"))
    safetensors = len(head) == 9 and head[8:9] == b"{"  # 8-byte header length, then a JSON header
    if not (zip_or_pickle or safetensors):
        raise ModelUnavailable(f"{path} is not a model checkpoint (a PyTorch .pt/.bin, .safetensors or .npz file)")


def resolve_model(name: str, pretrained: str | None) -> ModelSource:
    """Find a model's config and weights; raise ModelUnavailable (fast, with a fix) if impossible.

    `name` is an open_clip architecture, a model bundled in index_data/, or the path of an
    open_clip model config (.json) for a custom architecture. `pretrained` None means a bundled
    model's own checkpoint or an architecture's `DEFAULT_TAGS` entry; a config file, or an
    architecture not in that table, then needs an explicit tag, checkpoint or 'random'.
    """
    config: Path | None = None
    if name.lower().endswith(".json"):
        config = Path(model_key(name))
        if not config.is_file():
            raise ModelUnavailable(f"model config not found: {name}")
        name = str(config)
    elif (BUNDLED_DIR / f"{name}.json").exists():
        config = BUNDLED_DIR / f"{name}.json"
        if pretrained is None:
            pretrained = str(BUNDLED_DIR / f"{name}.pt")
    arch = config.stem if config else name
    if config is None:
        import open_clip

        if name not in open_clip.list_models():
            raise ModelUnavailable(
                f"unknown model {name!r}: use an open_clip architecture such as ViT-B-32, "
                f"or a bundled model ({', '.join(bundled_models()) or 'none installed'})"
            )
    if pretrained is None:
        pretrained = _default_weights(name, config)
    if pretrained.lower() in RANDOM_WEIGHTS:
        return ModelSource(name, arch, "random", None, None, config)
    if _looks_like_path(pretrained) or Path(pretrained).exists():
        path = Path(pretrained).expanduser().resolve()
        if not path.is_file():
            raise ModelUnavailable(f"checkpoint not found: {path}")
        _check_checkpoint(path)
        return ModelSource(name, arch, str(path), path, cached_sha256(path), config)
    import open_clip

    hub_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not hub_cfg:
        raise ModelUnavailable(
            f"unknown pretrained tag {pretrained!r} for {name}; pass an open_clip tag or a local checkpoint file"
        )
    cached = _hub_cached_file(hub_cfg)
    if cached is None and not _hub_reachable():
        raise ModelUnavailable(
            f"weights for {name}/{pretrained} are not cached and the model hub cannot be reached: "
            "run once with internet access, or pass --pretrained /path/to/checkpoint "
            "(or try the bundled --model shapes-mini)"
        )
    return ModelSource(name, arch, pretrained, cached, None, config, hub_cfg)


def gpu_likely() -> bool:
    """Whether an NVIDIA GPU may be present, without importing torch (device nodes or driver)."""
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version")


def check_device(device: str) -> None:
    """Refuse an unknown device, or CUDA where no NVIDIA GPU can be present, without importing torch.

    Checked when an index is opened, so every query kind (text, cached text, image) fails the same way.
    """
    if device in ("auto", "cpu"):
        return
    if not isinstance(device, str) or not re.fullmatch(r"cuda(:\d+)?", device):
        raise DeviceUnavailable(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")
    if not gpu_likely():
        raise DeviceUnavailable(f"--device {device} asked for, but this machine has no NVIDIA GPU (use --device cpu)")


def pick_device(device: str) -> str:
    """'auto' → 'cuda' when torch sees a GPU, else 'cpu'; 'cuda' without one is an error."""
    if device == "cpu":
        return device
    if device != "auto" and not device.startswith("cuda"):
        raise ModelUnavailable(f"unknown device {device!r}: use auto, cpu or cuda")
    if device == "auto" and not gpu_likely():
        return "cpu"
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise ModelUnavailable("--device cuda asked for, but torch sees no CUDA GPU (use --device cpu)")
    return device


def export_name(name: str, recorded: str | None = None) -> str:
    """The architecture part of an ONNX export's identity: a model config file (.json) by its content
    (a copy or a moved file finds the same export), anything else by name.

    `recorded`: the key an index recorded when it was built (`Collection.claim_model`), used as is, so
    the index keeps its model when its config file is moved or edited. A config file that cannot be
    read, with nothing recorded, keeps its path (exports made before content keys).
    """
    if not name.lower().endswith(".json"):
        return name
    if recorded:
        return recorded
    try:
        return "config-sha256:" + hashlib.sha256(Path(name).read_bytes()).hexdigest()
    except OSError:
        return name


def export_dir(name: str, weights: str | None, recorded: str | None = None) -> Path:
    """Where the ONNX export of a model lives in the per-user cache, keyed by its identity."""
    ident = export_name(name, recorded)
    digest = hashlib.sha256(f"{ident}\n{weights}".encode()).hexdigest()[:20]
    return cache_dir() / "onnx" / f"{'config' if ident != name else Path(name).stem}-{digest}"


class Encoder:
    """One model, ready to embed texts and images as L2-normalized float32 arrays.

    Runs on torch (CUDA with fp16 autocast, or CPU when no ONNX export can be made) or on
    an onnxruntime export of the same model (CPU: about twice torch's speed, no torch import).
    """

    def __init__(self, manifest: ModelManifest, geometry: Geometry, mean: Sequence[float], std: Sequence[float],
                 device: str, *, model: Any = None, tokenizer: Any = None, onnx: Any = None) -> None:
        self.manifest = manifest
        self.geometry = geometry
        self.device = device
        self.model = model
        self.tokenizer = tokenizer
        self.onnx = onnx
        self.context_length: int = int(onnx.context_length if onnx is not None else tokenizer.context_length)
        #: Image tower precision: 'fp32' or 'int8' (onnxruntime on CPU), 'fp16' (autocast on CUDA) or 'fp32'.
        self.precision = "fp16" if device.startswith("cuda") else "fp32"
        self._norm = (list(mean), list(std))
        self._mean = np.asarray(mean, np.float32).reshape(1, 3, 1, 1) * 255.0
        self._std = np.asarray(std, np.float32).reshape(1, 3, 1, 1) * 255.0
        self._torch_norm: tuple[Any, Any] | None = None

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return self.manifest.dim

    @property
    def backend(self) -> str:
        """'onnxruntime' or 'torch'."""
        return "onnxruntime" if self.onnx is not None else "torch"

    @property
    def int8_gate(self) -> dict | None:
        """The outcome of the int8 gate of this model's ONNX export (None: no export, or never run)."""
        return self.onnx.int8_gate if self.onnx is not None else None

    def set_precision(self, requested: str) -> None:
        """Pick the image tower's precision: 'auto' (on CPU int8 where its gate passed and it ran faster
        than fp32 at export, else fp32; fp16 on CUDA), 'fp32' or 'int8'. A forced int8 that the gate
        refused raises ModelUnavailable with the measure.

        An ONNX export made before int8 towers is given one now (no torch needed).
        """
        if requested not in PRECISIONS:
            raise ModelUnavailable(f"unknown precision {requested!r}: use {', '.join(PRECISIONS)}")
        if self.onnx is None:
            if requested == "int8":
                raise ModelUnavailable("--precision int8 runs on the CPU through the model's ONNX export, "
                                       f"which is not in use here ({self.backend} on {self.device})")
            self.precision = "fp32" if requested == "fp32" or not self.device.startswith("cuda") else "fp16"
            return
        if requested != "fp32" and self.onnx.int8_gate is None:
            self._add_int8()
        if requested == "auto":  # int8 where it is faithful (the gate) and faster (measured at export)
            gate = self.onnx.int8_gate or {}
            requested = "int8" if gate.get("kept") and gate.get("speedup", 1.0) >= 1.0 else "fp32"
        self.onnx.set_precision(requested)  # ModelUnavailable, with the gate's measure, for a refused int8
        self.precision = requested

    def _add_int8(self) -> None:
        from .onnx_export import add_int8
        from .onnx_runtime import OnnxEncoder

        folder = self.onnx.export_dir
        log.info("adding an int8 image tower to the ONNX export in %s (once)", folder)
        try:
            add_int8(folder, *self._norm)
            self.onnx = OnnxEncoder(folder, self.onnx.threads)
        except (OSError, ValueError, KeyError, ModelUnavailable) as exc:
            log.warning("cannot add an int8 image tower to %s (%s): using fp32", folder, exc)

    def _autocast(self) -> Any:
        import torch

        if self.device.startswith("cuda") and self.precision == "fp16":
            return torch.autocast("cuda", dtype=torch.float16)
        return torch.autocast("cpu", enabled=False)

    def embed_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Embed texts (truncated to the model's context); returns float32 [n, dim], unit norm."""
        if self.onnx is not None:
            return self.onnx.embed_texts(list(texts)).reshape(-1, self.dim)
        import torch

        out = [np.zeros((0, self.dim), np.float32)]
        with torch.inference_mode(), self._autocast():
            for start in range(0, len(texts), batch_size):
                tokens = self.tokenizer(list(texts[start : start + batch_size])).to(self.device)
                out.append(self.model.encode_text(tokens, normalize=True).float().cpu().numpy())
        return np.concatenate(out)

    def embed_pixels(self, pixels: np.ndarray | Any) -> np.ndarray:
        """Embed uint8 [n, size, size, 3] pixels (from `images.fit`, or a torch tensor from `gpu_decode`
        on the torch backend); returns float32 [n, dim], unit norm."""
        if self.onnx is not None:
            x = (pixels.transpose(0, 3, 1, 2).astype(np.float32) - self._mean) / self._std
            return self.onnx.embed_pixels(np.ascontiguousarray(x))
        import torch

        if self._torch_norm is None:
            self._torch_norm = (torch.from_numpy(self._mean).to(self.device), torch.from_numpy(self._std).to(self.device))
        mean, std = self._torch_norm
        batch = pixels if isinstance(pixels, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(pixels))
        if self.device.startswith("cuda") and batch.device.type == "cpu":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        with torch.inference_mode(), self._autocast():
            x = (batch.permute(0, 3, 1, 2).float() - mean) / std
            return self.model.encode_image(x, normalize=True).float().cpu().numpy()

    def embed_images(self, images: Sequence[Image.Image | str | Path], batch_size: int = 64) -> np.ndarray:
        """Embed PIL images or image files; returns float32 [n, dim], unit norm.

        Raises OSError/ValueError for an unreadable file; the indexer uses `images.decode_file` instead.
        """
        out = [np.zeros((0, self.dim), np.float32)]
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            pixels = [fit(open_image(im) if isinstance(im, (str, Path)) else to_rgb(im), self.geometry) for im in chunk]
            out.append(self.embed_pixels(np.stack(pixels)))
        return np.concatenate(out)

    def count_tokens(self, text: str) -> int:
        """BPE tokens including start/end markers; above `context_length` the text is truncated."""
        if self.onnx is not None:
            return self.onnx.count_tokens(text)
        encode = getattr(self.tokenizer, "encode", None)
        return len(encode(text)) + 2 if encode else 0


def load_encoder(name: str, pretrained: str | None, device: str = "auto", backend: str = "auto") -> Encoder:
    """Resolve and load an open_clip model; raises ModelUnavailable with a fix when it can't."""
    return load_source(resolve_model(name, pretrained), device, backend)


def load_export(manifest: ModelManifest, config_key: str | None = None) -> Encoder | None:
    """The model of an index from its ONNX export, without torch; None when there is no usable export.

    `config_key`: the `export_name` the index recorded for a config-file model.
    """
    return _open_export(manifest.name, manifest.pretrained, manifest.checkpoint_sha256, manifest.dim, config_key)


def find_export(name: str, pretrained: str | None) -> Encoder | None:
    """The model asked for, from its cached ONNX export, without importing torch or open_clip.

    For a new index: the export is looked up by the identity `resolve_model` would give (the name,
    or a config file's content; the tag, or a checkpoint's cached sha256). An export exists only for
    a model that resolved and loaded before, so finding one settles that the model is valid. None
    (resolve and load the model as usual) when there is no export, or when telling the weights
    apart would need open_clip (an architecture without --pretrained).
    """
    if name.lower().endswith(".json"):
        if not Path(model_key(name)).is_file():
            return None
    elif pretrained is None and (BUNDLED_DIR / f"{name}.json").exists():
        pretrained = str(BUNDLED_DIR / f"{name}.pt")
    if pretrained is None:
        return None
    sha256 = None
    if pretrained.lower() in RANDOM_WEIGHTS:
        pretrained = "random"
    elif _looks_like_path(pretrained) or Path(pretrained).exists():
        path = Path(pretrained).expanduser().resolve()
        if not path.is_file():
            return None
        pretrained, sha256 = str(path), cached_sha256(path)
    return _open_export(model_key(name), pretrained, sha256, None)


def _open_export(name: str, pretrained: str | None, sha256: str | None, dim: int | None,
                 config_key: str | None = None) -> Encoder | None:
    """The export of model `name` with these weights (and `dim`, when known), or None."""
    from .onnx_runtime import OnnxEncoder

    weights = sha256 or pretrained
    ident = export_name(name, config_key)
    folder = export_dir(name, weights, ident)
    if not (folder / "export.json").exists():
        return None
    try:
        onnx = OnnxEncoder(folder)
        meta = onnx.meta["model"]
        # exports made before content keys record the model's name and weights only
        recorded = meta.get("identity") or [meta["name"], meta["checkpoint_sha256"] or meta["pretrained"]]
        geometry = Geometry(onnx.image_size, meta["resize_mode"])
        mean, std, exported_dim = meta["mean"], meta["std"], int(meta["dim"])
    except (ModelUnavailable, KeyError, TypeError, ValueError) as exc:
        log.warning("ignoring the ONNX export at %s (%s)", folder, exc)
        return None
    if list(recorded) != [ident, weights] or dim not in (None, exported_dim):
        return None
    manifest = ModelManifest(name, pretrained, sha256, exported_dim)
    return Encoder(manifest, geometry, mean, std, "cpu", onnx=onnx)


def load_source(source: ModelSource, device: str = "auto", backend: str = "auto") -> Encoder:
    """Build a resolved model (imports torch and open_clip); on CPU, run it through its ONNX export.

    `backend`: 'auto' (onnxruntime on CPU when the model exports, else torch), 'torch' or 'onnx'.
    """
    import open_clip
    import torch

    device = pick_device(device)
    if source.config is not None:
        open_clip.add_model_config(source.config)
    kwargs: dict[str, Any] = {}
    if source.hub_cfg:
        kwargs = {"image_mean": source.hub_cfg.get("mean"), "image_std": source.hub_cfg.get("std")}
    if source.pretrained == "random":
        torch.manual_seed(0)  # the same random weights in every process, so index and query agree
        weights = None
    else:
        weights = str(source.checkpoint) if source.checkpoint else source.pretrained
    try:
        # open_clip warns on the root logger when asked for random weights, which is deliberate here.
        logging.disable(logging.WARNING if weights is None else logging.NOTSET)
        model, _, _ = open_clip.create_model_and_transforms(source.arch, pretrained=weights, device="cpu", **kwargs)
    except (RuntimeError, OSError, ValueError, KeyError, AssertionError, pickle.UnpicklingError) as exc:
        # open_clip asserts on some shape mismatches (a checkpoint of another architecture)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelUnavailable(f"cannot load {source.arch} weights {weights}: {reason}") from None
    finally:
        logging.disable(logging.NOTSET)
    model = model.eval()
    tokenizer = open_clip.get_tokenizer(source.arch)
    cfg = model.visual.preprocess_cfg
    size = cfg["size"][0] if isinstance(cfg["size"], (tuple, list)) else cfg["size"]
    geometry = Geometry(int(size), "squash" if cfg.get("resize_mode") == "squash" else "shortest")
    with torch.inference_mode():
        dim = int(model.encode_text(tokenizer(["a"])).shape[-1])
    manifest = ModelManifest(source.name, source.pretrained, source.sha256, dim)
    if device == "cpu" and backend != "torch":
        onnx = _export(model, manifest, geometry, cfg, tokenizer.context_length, required=backend == "onnx")
        if onnx is not None:
            return Encoder(manifest, geometry, cfg["mean"], cfg["std"], device, onnx=onnx)
    return Encoder(manifest, geometry, cfg["mean"], cfg["std"], device, model=model.to(device), tokenizer=tokenizer)


def _export(model: Any, manifest: ModelManifest, geometry: Geometry, cfg: dict[str, Any],
            context_length: int, required: bool) -> Any:
    """The model's ONNX export (made once, cached per model); None (torch is used) if it can't be made."""
    from .onnx_export import export_towers
    from .onnx_runtime import OnnxEncoder

    found = load_export(manifest)
    if found is not None:
        return found.onnx
    folder = export_dir(manifest.name, manifest.checkpoint_sha256 or manifest.pretrained)
    meta = {"name": manifest.name, "pretrained": manifest.pretrained, "checkpoint_sha256": manifest.checkpoint_sha256,
            "identity": [export_name(manifest.name), manifest.checkpoint_sha256 or manifest.pretrained],
            "dim": manifest.dim, "mean": list(cfg["mean"]), "std": list(cfg["std"]), "resize_mode": geometry.resize_mode}
    log.info("exporting %s to ONNX for fast CPU inference (once, into %s)", Path(manifest.name).name, folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        export_towers(model, folder, context_length=context_length, image_size=geometry.size, meta=meta,
                      mean=cfg["mean"], std=cfg["std"])
        return OnnxEncoder(folder)
    except (ModelUnavailable, OSError) as exc:
        if required:
            raise ModelUnavailable(f"cannot export {manifest.name} to ONNX: {exc}") from None
        log.warning("cannot export %s to ONNX (%s): using torch on the CPU", manifest.name, exc)
        return None

"""JPEG decoding on the model's device (nvJPEG on CUDA), for the indexer's image loop.

At thousands of images per second a GPU outruns any number of CPU cores decoding JPEGs, so on
CUDA the decoders only read and hash plain JPEGs (`Geometry.jpeg_to_device`, with the EXIF
orientation read from the header) and each batch is decoded here, in one
`torchvision.io.decode_jpeg(..., device="cuda")` call, then turned upright, resized and cropped on
the GPU exactly as `images.fit` does on the CPU. Everything else stays on the CPU path: other
formats and CMYK JPEGs are decoded by the workers as before, and a JPEG that nvJPEG rejects
(progressive on some GPUs, damaged) is decoded again by PIL here; one that fails both is a
failure like any other.

The functions take any torch device, so the same code runs (and is tested) on the CPU, where
torchvision's libjpeg decoder stands in for nvJPEG. torch and torchvision are imported only
when a `DeviceJpegDecoder` is made.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .errors import MMSearchError
from .images import Decoded, Geometry, decode_data

if TYPE_CHECKING:
    import torch

    from .encoder import Encoder

log = logging.getLogger("mmsearch")

#: auto: JPEGs decoded on the GPU when the model runs on CUDA; off: never; on: also for a model on
#: the CPU (torchvision's CPU decoder; slower than PIL's draft mode, for tests and measurements).
SETTING = "MMSEARCH_GPU_DECODE"

#: Images resized in one call: their float32 copies (240 MB for 16 photos of 1280x960) stay small beside the model.
RESIZE_CHUNK = 16


def for_encoder(encoder: Encoder) -> DeviceJpegDecoder | None:
    """The decoder to use with `encoder` (per MMSEARCH_GPU_DECODE), or None for the CPU path."""
    setting = os.environ.get(SETTING, "auto").strip().lower() or "auto"
    if setting not in ("auto", "on", "off"):
        raise MMSearchError(f"bad {SETTING}={setting!r}: use auto, on or off")
    on_cuda = encoder.device.startswith("cuda") and encoder.backend == "torch"
    if setting == "off" or (setting == "auto" and not on_cuda):
        return None
    try:
        import torchvision.io  # noqa: F401 - only to see that it is there
    except ImportError:
        log.warning("torchvision is not installed: JPEGs are decoded on the CPU")
        return None
    # An onnxruntime model takes numpy pixels: decode on the CPU and hand them over as such.
    return DeviceJpegDecoder(encoder.device if encoder.backend == "torch" else "cpu", encoder.geometry,
                             as_numpy=encoder.backend != "torch")


def orient(x: torch.Tensor, orientation: int) -> torch.Tensor:
    """Turn [..., H, W] pixels upright for an EXIF orientation (1-8), as `PIL.ImageOps.exif_transpose`."""
    import torch

    if orientation == 2:
        return x.flip(-1)
    if orientation == 3:
        return x.flip(-2, -1)
    if orientation == 4:
        return x.flip(-2)
    if orientation == 5:
        return x.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(x, -1, (-2, -1))  # 90° clockwise
    if orientation == 7:
        return x.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return torch.rot90(x, 1, (-2, -1))  # 90° counter-clockwise
    return x


def fit_tensor(x: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """Resize and crop uint8 [n, 3, H, W] like `images.fit` (bicubic, antialiased like PIL); uint8 [n, size, size, 3]."""
    import torch
    from torch.nn.functional import interpolate

    size = geometry.size
    height, width = x.shape[-2:]
    if geometry.resize_mode == "squash":
        new = (size, size)
    elif width <= height:
        new = (int(size * height / width), size)
    else:
        new = (size, int(size * width / height))
    if new != (height, width):
        x = interpolate(x.float(), size=new, mode="bicubic", antialias=True, align_corners=False)
        x = x.round_().clamp_(0, 255).to(torch.uint8)  # bicubic overshoots; PIL rounds and clips too
    top = int(round((new[0] - size) / 2.0))
    left = int(round((new[1] - size) / 2.0))
    return x[..., top : top + size, left : left + size].permute(0, 2, 3, 1)


class DeviceJpegDecoder:
    """Decodes the JPEGs the workers left undecoded, a batch at a time, on one device."""

    def __init__(self, device: str, geometry: Geometry, *, as_numpy: bool = False) -> None:
        import torch

        self.device = torch.device(device)
        self.geometry = Geometry(geometry.size, geometry.resize_mode, jpeg_to_device=True)
        self.as_numpy = as_numpy
        self.working = True  # False once the device decoder failed on a whole batch: the rest go to the CPU

    def finish(self, batch: Sequence[Decoded], draft: bool = True) -> None:
        """Give every undecoded JPEG of `batch` its pixels (a device tensor) or its error, in place.

        `draft` is for the CPU retry of a file the device rejects, as in `images.decode_file`.
        """
        todo = [d for d in batch if d.jpeg is not None]
        if not todo:
            return
        images = self._decode([d.jpeg for d in todo]) if self.working else [None] * len(todo)
        if len(todo) >= 8 and all(im is None for im in images) and self.working:
            self.working = False
            log.warning("the %s's JPEG decoder failed on a whole batch: decoding JPEGs with PIL from now on",
                        self.device.type.upper())
        groups: dict[tuple[int, int, int], list[int]] = {}  # same shape and orientation: one resize call
        for i, (d, im) in enumerate(zip(todo, images)):
            if im is None:
                d.pixels, d.error = decode_data(d.jpeg, self.geometry, draft)  # type: ignore[arg-type]
            else:
                groups.setdefault((*im.shape[-2:], d.orientation), []).append(i)
        import torch

        for (_, _, orientation), members in groups.items():
            for start in range(0, len(members), RESIZE_CHUNK):
                chunk = members[start : start + RESIZE_CHUNK]
                stacked = torch.stack([images[i] for i in chunk])  # type: ignore[misc]
                fitted = fit_tensor(orient(stacked, orientation), self.geometry)
                for i, pixels in zip(chunk, fitted):
                    todo[i].pixels = pixels  # type: ignore[assignment]
        for d in todo:
            d.jpeg = None

    def stack(self, pixels: Sequence[Any]) -> Any:
        """One batch for `Encoder.embed_pixels` from device tensors and CPU-decoded numpy arrays."""
        import torch

        batch = torch.stack([p.to(self.device) if isinstance(p, torch.Tensor) else
                             torch.tensor(p, device=self.device) for p in pixels])
        return batch.cpu().numpy() if self.as_numpy else batch

    def _decode(self, datas: list[bytes]) -> list[Any]:
        """uint8 [3, H, W] device tensors, None where the device decoder rejects the file."""
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only bytes: decode_jpeg only reads them
            # torchvision 0.29 deprecates its decoders for TorchCodec's; they still work, and are what is here.
            warnings.simplefilter("ignore", DeprecationWarning)
            tensors = [torch.frombuffer(data, dtype=torch.uint8) for data in datas]
            try:
                return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device))
            except RuntimeError:
                pass  # one bad file fails the whole call: find it file by file
            images: list[Any] = []
            for tensor in tensors:
                try:
                    images.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    images.append(None)
            return images


"""The fast indexing path embeds photos like the reference open_clip path does.

Fast: `images.decode_file` (JPEG draft decoding at reduced size + our `fit`) -> `Encoder.embed_pixels`
(onnxruntime on CPU, fp32 or the gated int8 image tower). Reference: PIL.Image.open -> the model's own open_clip preprocess ->
`model.encode_image` in torch. Photo-like JPEGs of 640x480 and more, so draft decoding really
decodes at 1/2 to 1/8 scale.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from conftest import TINY_CONFIG
from retrieval.encoder import load_encoder
from retrieval.onnx_export import INT8_MIN_COSINE
from retrieval.images import Geometry, decode_file, decode_many, open_image

#: (width, height) of the test photos: landscape, portrait, odd aspect ratios.
SIZES = [(640, 480), (480, 640), (800, 600), (1280, 960), (1024, 683), (700, 1000), (960, 720), (640, 640)]


def photo(seed: int, width: int, height: int) -> Image.Image:
    """Photo-like content: smooth color fields, a gradient, soft-edged shapes and sensor grain."""
    rng = np.random.default_rng(seed)

    def field(cell: int, amp: float) -> np.ndarray:
        small = rng.normal(0, amp, (max(2, height // cell), max(2, width // cell), 3)).astype(np.float32)
        return np.stack([np.asarray(Image.fromarray(small[..., c], "F").resize((width, height), Image.Resampling.BICUBIC))
                         for c in range(3)], -1)

    arr = (rng.uniform(40, 210, 3) + np.linspace(-1, 1, height)[:, None, None] * rng.normal(0, 40, 3)
           + field(max(width, height) // 8, 35) + field(16, 10))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x, y, s = int(rng.integers(0, width)), int(rng.integers(0, height)), int(rng.integers(width // 16, width // 3))
        draw.ellipse((x - s, y - s // 2, x + s, y + s // 2), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    img = img.filter(ImageFilter.GaussianBlur(1.0))
    arr = np.asarray(img, np.float32) + rng.normal(0, 4, (height, width, 1))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def photo_paths(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for i in range(16):
        path = folder / f"photo{i:02d}.jpg"
        photo(i, *SIZES[i % len(SIZES)]).save(path, quality=90)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def tiny_224(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny model at 224 px (ViT-B-32 geometry: patch 32), still built in well under a second."""
    cfg = json.loads(json.dumps(TINY_CONFIG))
    cfg["vision_cfg"].update(image_size=224, patch_size=32)
    path = tmp_path_factory.mktemp("models") / "tiny-clip-224.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def reference_pixels(path: str, geometry: Geometry) -> np.ndarray:
    """torchvision's Resize + CenterCrop (what open_clip's preprocess does) on the fully decoded image."""
    from torchvision import transforms as T

    size = geometry.size
    resize = T.Resize(size if geometry.resize_mode == "shortest" else (size, size), interpolation=T.InterpolationMode.BICUBIC)
    return np.asarray(T.CenterCrop(size)(resize(Image.open(path).convert("RGB"))), dtype=np.float32)


@pytest.mark.parametrize("geometry", [Geometry(224), Geometry(256), Geometry(32), Geometry(224, "squash")],
                         ids=["224", "256", "32", "224-squash"])
def test_draft_decoded_pixels_are_close_to_the_reference_preprocess(photo_paths, geometry) -> None:
    reduced = 0
    for path in photo_paths[: len(SIZES)]:
        full_size = Image.open(path).size
        reduced += open_image(Path(path).read_bytes(), draft=geometry.size).size < full_size
        fast = decode_file(path, geometry, draft=True).pixels.astype(np.float32)
        ref = reference_pixels(path, geometry)
        err = np.abs(fast - ref)
        psnr = 10 * np.log10(255.0**2 / max(float(np.mean(err**2)), 1e-12))
        assert err.mean() < 1.5 and psnr > 38, f"{path} {full_size}: mean |diff| {err.mean():.2f}, PSNR {psnr:.1f} dB"
    assert reduced >= len(SIZES) // 2, "draft decoding did not kick in: the test photos are too small"


def _reference_embeddings(config: str, paths: list[str]) -> np.ndarray:
    import torch
    from open_clip.transform import PreprocessCfg, image_transform_v2

    model = load_encoder(config, "random", "cpu", backend="torch").model
    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    with torch.inference_mode():
        batch = torch.stack([preprocess(Image.open(p)) for p in paths])
        return model.encode_image(batch, normalize=True).float().numpy()


#: Least cosine of a stored vector to the open_clip reference, per image tower precision.
BOUND = {"fp32": 0.995, "int8": 0.99}


@pytest.mark.parametrize("precision", ["fp32", "int8"])
@pytest.mark.parametrize("size", [32, 224])
def test_fast_path_embeddings_match_open_clip_reference(photo_paths, tiny_model, tiny_224, size, precision) -> None:
    config = tiny_model if size == 32 else tiny_224
    encoder = load_encoder(config, "random", "cpu")  # the indexing path: onnxruntime on CPU
    assert encoder.geometry.size == size
    decoded = list(decode_many(photo_paths, encoder.geometry, workers=0))
    assert [d.path for d in decoded] == photo_paths
    pixels = np.stack([d.pixels for d in decoded])
    fp32 = encoder.embed_pixels(pixels)
    encoder.set_precision(precision)
    assert encoder.precision == precision  # the tiny models pass the int8 gate: int8 is really in use
    fast = encoder.embed_pixels(pixels)
    ref = _reference_embeddings(config, photo_paths)

    if precision == "int8":
        assert encoder.int8_gate["kept"] and encoder.int8_gate["min_cosine"] >= INT8_MIN_COSINE
        to_fp32 = np.sum(fast * fp32, axis=1)
        assert to_fp32.min() >= INT8_MIN_COSINE and to_fp32.min() < 1 - 1e-6, to_fp32  # close, and not fp32
    self_cos = np.sum(fast * ref, axis=1)
    assert self_cos.min() >= BOUND[precision], self_cos
    # A random model maps different photos close together: the error must also be small next to that.
    cross = ref @ ref.T
    nearest_other = (1 - cross[~np.eye(len(ref), dtype=bool)]).min()
    assert (1 - self_cos).max() < 0.1 * nearest_other, (1 - self_cos.min(), nearest_other)
    # Searching with each photo: the fast index returns what the reference index returns.
    top_ref = np.argsort(-cross, axis=1, kind="stable")[:, :10]
    top_fast = np.argsort(-(ref @ fast.T), axis=1, kind="stable")[:, :10]
    assert (top_fast[:, 0] == np.arange(len(ref))).all()
    overlap = [len(set(a) & set(b)) for a, b in zip(top_ref, top_fast)]
    assert min(overlap) >= 9 and np.mean(overlap) >= 9.5, overlap


def test_decoders_agree_and_stop_cleanly(photo_paths) -> None:
    geometry = Geometry(32)
    paths = [*photo_paths[:6], "/nonexistent/missing.jpg"]
    single = [decode_file(p, geometry) for p in paths]
    for workers, ahead in [(0, 2), (2, 4)]:  # a decode thread, then two decode processes
        got = list(decode_many(paths, geometry, workers, ahead=ahead))
        assert [d.path for d in got] == paths
        assert [d.sha256 for d in got] == [d.sha256 for d in single]
        assert all(np.array_equal(a.pixels, b.pixels) for a, b in zip(got[:-1], single[:-1]))
        assert got[-1].pixels is None and got[-1].error.startswith("cannot read")
        assert all(d.seconds > 0 for d in got[:-1])
    before = threading.active_count()
    stream = decode_many(photo_paths, geometry, 0, ahead=1)
    next(stream)
    stream.close()  # the consumer stops early: the decode thread must end, not block on a full queue
    assert threading.active_count() == before

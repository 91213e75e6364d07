"""Decoding: every image mode becomes correct RGB, EXIF is applied, bad data is a reason, not a crash."""

from __future__ import annotations

import io
import multiprocessing
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval.images import Geometry, decode_file, decode_many, fit, open_image, to_rgb

GEOM = Geometry(32)


def test_sixteen_bit_gray_is_scaled_not_clipped(tmp_path: Path) -> None:
    arr = np.full((20, 20), 32768, dtype=np.uint16)  # mid-gray in 16 bits
    path = tmp_path / "g16.png"
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = np.asarray(open_image(str(path)))
    assert rgb.shape == (20, 20, 3) and abs(int(rgb[0, 0, 0]) - 128) <= 1


def test_alpha_and_palette_transparency_go_over_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    rgba.putpixel((5, 5), (0, 0, 255, 255))
    assert np.asarray(to_rgb(rgba))[0, 0].tolist() == [255, 255, 255]
    assert np.asarray(to_rgb(rgba))[5, 5].tolist() == [0, 0, 255]
    pal = rgba.convert("P")
    pal.info["transparency"] = pal.getpixel((0, 0))
    path = tmp_path / "pal.png"
    pal.save(path, transparency=pal.getpixel((0, 0)))
    out = np.asarray(open_image(str(path)))
    assert out[0, 0].tolist() == [255, 255, 255] and out[5, 5].tolist() == [0, 0, 255]


@pytest.mark.parametrize("mode", ["L", "1", "CMYK", "LA", "I", "F", "P"])
def test_every_mode_becomes_rgb(mode: str) -> None:
    img = Image.new("RGB", (8, 6), (200, 100, 50)).convert(mode)
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (8, 6)


def test_cmyk_jpeg_colors_survive(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("RGB", (16, 16), (220, 30, 30)).convert("CMYK").save(path, quality=95)
    r, g, b = np.asarray(open_image(str(path)))[8, 8].tolist()
    assert r > 180 and g < 80 and b < 80


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    upright = Image.new("RGB", (40, 20), (0, 0, 0))
    upright.paste((255, 255, 255), (0, 0, 20, 20))  # white on the left half
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera stores for orientation 6
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rot.jpg"
    stored.save(path, exif=exif, quality=95)
    out = open_image(str(path))
    assert out.size == (40, 20)
    assert np.asarray(out)[10, 5].mean() > 200 and np.asarray(out)[10, 35].mean() < 50


def test_animated_gif_uses_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (10, 10), c) for c in [(255, 0, 0), (0, 0, 255)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    r, g, b = np.asarray(open_image(str(path)))[5, 5].tolist()
    assert r > 200 and b < 50


def test_fit_matches_open_clip_preprocess_geometry() -> None:
    torch = pytest.importorskip("torch")
    from torchvision import transforms as T

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (37, 91, 3), dtype=np.uint8))
    ref = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.PILToTensor()])(img)
    ours = torch.from_numpy(np.array(fit(img, GEOM))).permute(2, 0, 1)
    assert torch.equal(ref, ours)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"hello, I am text", "not a readable image"),
        (b"<html><body>saved page</body></html>", "not a readable image"),
    ],
)
def test_bad_bytes_give_a_reason(tmp_path: Path, data: bytes, reason: str) -> None:
    path = tmp_path / "bad.jpg"
    path.write_bytes(data)
    decoded = decode_file(str(path), GEOM)
    assert decoded.pixels is None and reason in decoded.error


def test_truncated_jpeg_and_bomb_are_refused(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    half = tmp_path / "half.jpg"
    half.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    assert decode_file(str(half), GEOM).pixels is None
    bomb = tmp_path / "bomb.png"
    Image.new("1", (30000, 30000)).save(bomb)  # tiny file, 900 MP header
    decoded = decode_file(str(bomb), GEOM)
    assert decoded.pixels is None and "too large" in decoded.error


def test_decode_file_records_identity(tmp_path: Path) -> None:
    path = tmp_path / "ok.png"
    Image.new("RGB", (50, 30), (1, 2, 3)).save(path)
    decoded = decode_file(str(path), GEOM)
    assert decoded.error is None and decoded.pixels.shape == (32, 32, 3)
    assert decoded.size == path.stat().st_size and len(decoded.sha256) == 64


def test_decode_workers_killed_mid_run_cost_a_restart_not_the_run(tmp_path) -> None:
    """A decode process that dies (OOM killer, a crashing decoder) must not hang or drop files."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(48):
        path = tmp_path / f"{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    geometry = Geometry(32)
    got, kills = [], 0
    for decoded in decode_many(paths, geometry, workers=2, ahead=8):
        got.append(decoded)
        if len(got) in (3, 20):
            for child in multiprocessing.active_children():
                os.kill(child.pid, signal.SIGKILL)
                kills += 1
    assert kills >= 2
    assert [d.path for d in got] == paths
    assert all(d.error is None for d in got), [d.error for d in got if d.error]
    for decoded in got:
        np.testing.assert_array_equal(decoded.pixels, decode_file(decoded.path, geometry).pixels)


def _decode_or_die(path: str, geometry: Geometry, draft: bool = True):
    """Stands in for a native decoder that crashes on one file (runs in a decode process)."""
    if path.endswith("13.png"):
        os._exit(139)
    return decode_file(path, geometry, draft)


def _decode_chunk_or_die(paths: list[str], geometry: Geometry, draft: bool):
    return [_decode_or_die(p, geometry, draft) for p in paths]


def test_a_file_that_crashes_its_decoder_is_skipped_with_a_reason(tmp_path, monkeypatch) -> None:
    import retrieval.images as images

    # Decode processes import these by name from this module, which the spawned children can import.
    monkeypatch.setattr(images, "_decode_chunk", _decode_chunk_or_die)
    monkeypatch.setattr(images, "decode_file", _decode_or_die)
    paths = []
    for i in range(24):
        paths.append(str(tmp_path / f"{i:02d}.png"))
        Image.new("RGB", (40, 30), (i * 10, 0, 0)).save(paths[-1])
    got = list(decode_many(paths, Geometry(32), workers=2, ahead=8))
    assert [d.path for d in got] == paths
    failed = {Path(d.path).name: d.error for d in got if d.error}
    assert failed == {"13.png": "the image decoder crashed on this file"}
    assert all(d.pixels is not None for d in got if not d.error)

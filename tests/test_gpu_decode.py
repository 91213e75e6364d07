"""JPEG decoding on the model's device (`retrieval.gpu_decode`), checked on the CPU.

The device functions take any torch device, so these tests run them with device="cpu"
(torchvision's libjpeg standing in for nvJPEG) against today's PIL path: same pixels within a
few levels, same orientation, the same embeddings, and the CPU fallbacks. The one test that
needs CUDA is marked `gpu` and skips without it.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval import open_index
from retrieval.errors import MMSearchError
from retrieval.gpu_decode import RESIZE_CHUNK, SETTING, DeviceJpegDecoder, for_encoder
from retrieval.images import Decoded, Geometry, decode_data, decode_file, fit, open_image

GEOMETRIES = [Geometry(32), Geometry(32, "squash"), Geometry(224)]
SIZES = [(160, 120), (97, 203), (100, 100), (20, 30)]  # landscape, portrait, square, smaller than the model


def jpeg_bytes(width: int, height: int, orientation: int = 1, seed: int = 0, mode: str = "RGB") -> bytes:
    """A smooth random JPEG, with an EXIF orientation tag when `orientation` is not 1."""
    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 255, (height // 8 + 1, width // 8 + 1, 3)).astype(np.uint8)
    img = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC).convert(mode)
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    out = io.BytesIO()
    img.save(out, "JPEG", quality=95, exif=exif)
    return out.getvalue()


def device_pixels(data: bytes, geometry: Geometry, orientation: int) -> np.ndarray:
    decoded = Decoded("x.jpg", len(data), 0.0, "", None, jpeg=data, orientation=orientation)
    DeviceJpegDecoder("cpu", geometry).finish([decoded], draft=False)
    assert decoded.error is None and decoded.jpeg is None
    return decoded.pixels.numpy()


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"{g.size}-{g.resize_mode}")
@pytest.mark.parametrize("orientation", range(1, 9))
def test_pixels_match_pil_for_every_orientation(geometry: Geometry, orientation: int) -> None:
    for width, height in SIZES:
        data = jpeg_bytes(width, height, orientation, seed=orientation)
        want = fit(open_image(data), geometry).astype(int)  # PIL: full decode, exif_transpose, bicubic
        got = device_pixels(data, geometry, orientation).astype(int)
        assert got.shape == want.shape == (geometry.size, geometry.size, 3)
        diff = np.abs(got - want)
        # Rotated the wrong way, the same image differs by tens of levels on average.
        assert diff.mean() < 0.5 and diff.max() <= 4, (width, height, diff.mean(), diff.max())


def test_a_large_batch_keeps_each_file_its_own_pixels() -> None:
    geometry = Geometry(32)
    datas = [jpeg_bytes(64, 48, orientation=1 + i % 2, seed=100 + i) for i in range(2 * RESIZE_CHUNK + 3)]
    batch = [Decoded(f"{i}.jpg", 0, 0.0, "", None, jpeg=d, orientation=1 + i % 2) for i, d in enumerate(datas)]
    DeviceJpegDecoder("cpu", geometry).finish(batch, draft=False)  # groups of one shape, resized in chunks
    for d, data in zip(batch, datas):
        assert np.abs(d.pixels.numpy().astype(int) - fit(open_image(data), geometry)).mean() < 0.5, d.path


def test_workers_leave_plain_jpegs_undecoded_and_decode_the_rest(tmp_path: Path) -> None:
    geometry = Geometry(32, jpeg_to_device=True)
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes(80, 60, orientation=6))
    (tmp_path / "gray.jpg").write_bytes(jpeg_bytes(80, 60, mode="L"))
    (tmp_path / "cmyk.jpg").write_bytes(jpeg_bytes(80, 60, mode="CMYK"))
    Image.open(io.BytesIO(jpeg_bytes(80, 60))).save(tmp_path / "b.png")
    plain = decode_file(str(tmp_path / "a.jpg"), geometry)
    assert plain.pixels is None and plain.jpeg == (tmp_path / "a.jpg").read_bytes() and plain.orientation == 6
    assert plain.sha256 and plain.error is None
    assert decode_file(str(tmp_path / "gray.jpg"), geometry).jpeg is not None
    for name in ("cmyk.jpg", "b.png"):  # PIL's conversions (CMYK) and formats: decoded in the worker as before
        other = decode_file(str(tmp_path / name), geometry)
        assert other.jpeg is None and other.pixels is not None and other.pixels.shape == (32, 32, 3)
    # Without the flag, nothing changes.
    assert decode_file(str(tmp_path / "a.jpg"), Geometry(32)).pixels is not None


def test_rejected_jpeg_is_retried_on_the_cpu_and_a_corrupt_one_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.io

    geometry = Geometry(32)
    good, rejected = jpeg_bytes(64, 48, seed=1), jpeg_bytes(64, 48, seed=2, orientation=3)
    corrupt = good[:200] + b"\x00garbage" * 50  # a JPEG header, then nothing any decoder can read
    real = torchvision.io.decode_jpeg

    def picky(data, **kwargs):  # a device decoder that rejects one file (as nvJPEG some progressive ones)
        inputs = data if isinstance(data, list) else [data]
        if any(bytes(t.numpy()) == rejected for t in inputs):
            raise RuntimeError("nvjpeg: unsupported")
        return real(data, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", picky)
    batch = [Decoded(f"{i}.jpg", 0, 0.0, "", None, jpeg=d, orientation=o)
             for i, (d, o) in enumerate([(good, 1), (rejected, 3), (corrupt, 1)])]
    decoder = DeviceJpegDecoder("cpu", geometry)
    decoder.finish(batch, draft=False)
    assert decoder.working
    assert np.abs(batch[0].pixels.numpy().astype(int) - fit(open_image(good), geometry)).max() <= 4
    assert isinstance(batch[1].pixels, np.ndarray)  # decoded by PIL, upright
    np.testing.assert_array_equal(batch[1].pixels, decode_data(rejected, geometry, draft=False)[0])
    assert batch[2].pixels is None and batch[2].error
    assert all(d.jpeg is None for d in batch)
    stacked = decoder.stack([d.pixels for d in batch[:2]])
    assert tuple(stacked.shape) == (2, 32, 32, 3)


def test_a_device_decoder_failing_every_file_hands_over_to_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.io

    def broken(data, **kwargs):
        raise RuntimeError("nvjpeg: no decoder")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", broken)
    decoder = DeviceJpegDecoder("cpu", Geometry(32))
    batch = [Decoded(f"{i}.jpg", 0, 0.0, "", None, jpeg=jpeg_bytes(40, 30, seed=i)) for i in range(8)]
    decoder.finish(batch)
    assert not decoder.working and all(isinstance(d.pixels, np.ndarray) for d in batch)


def _vectors_by_path(directory: Path) -> dict[str, np.ndarray]:
    with open_index(directory) as idx:
        reader = idx.reader
        out = {}
        for ids, vecs in reader.vectors("image"):
            rows = reader.items(ids.tolist())
            out.update((Path(rows[int(i)].path).name, v) for i, v in zip(ids, vecs))
        return out


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_index_with_device_decoding_matches_the_cpu_path(tmp_path: Path, tiny_model: str, backend: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(10):
        w, h = SIZES[i % len(SIZES)]
        (folder / f"p{i}.jpg").write_bytes(jpeg_bytes(w * 4, h * 4, orientation=1 + i % 8, seed=i))
    (folder / "cmyk.jpg").write_bytes(jpeg_bytes(200, 150, mode="CMYK", seed=20))
    Image.open(io.BytesIO(jpeg_bytes(120, 90, seed=21))).save(folder / "q.png")
    (folder / "broken.jpg").write_bytes(jpeg_bytes(120, 90)[:200] + b"\x00garbage" * 50)
    stored, reports = {}, {}
    for setting in ("off", "on"):
        monkeypatch.setenv(SETTING, setting)
        with open_index(tmp_path / setting, model=tiny_model, pretrained="random", device="cpu", backend=backend) as idx:
            assert (for_encoder(idx.encoder) is not None) == (setting == "on")
            reports[setting] = idx.add([folder], batch_size=4, workers=0)
        stored[setting] = _vectors_by_path(tmp_path / setting)
    assert "device_decode" in reports["on"].timings and "device_decode" not in reports["off"].timings
    for report in reports.values():
        assert report.added == 12 and [Path(p).name for p, _ in report.failures] == ["broken.jpg"]
    assert stored["on"].keys() == stored["off"].keys() and len(stored["on"]) == 12
    for name, vec in stored["on"].items():
        cosine = float(vec @ stored["off"][name])  # the CPU path: PIL draft decode + fit
        assert cosine >= 0.99, (name, cosine)


def test_default_is_the_cpu_path_on_a_cpu(tmp_path: Path, tiny_model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SETTING, raising=False)
    with open_index(tmp_path / "i", model=tiny_model, pretrained="random", device="cpu", backend="torch") as idx:
        assert for_encoder(idx.encoder) is None
        monkeypatch.setenv(SETTING, "sometimes")
        with pytest.raises(MMSearchError, match="MMSEARCH_GPU_DECODE"):
            for_encoder(idx.encoder)


@pytest.mark.gpu
def test_nvjpeg_matches_the_cpu_path(tiny_model: str, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    datas = [jpeg_bytes(1280, 960, orientation=o, seed=o) for o in range(1, 9)]

    def on_gpu(decoder: DeviceJpegDecoder) -> list[Decoded]:
        batch = [Decoded(f"{i}.jpg", 0, 0.0, "", None, jpeg=d, orientation=i + 1) for i, d in enumerate(datas)]
        decoder.finish(batch, draft=False)
        assert decoder.working and all(d.pixels.device.type == "cuda" for d in batch)
        return batch

    for d, data in zip(on_gpu(DeviceJpegDecoder("cuda", Geometry(224))), datas):
        want = fit(open_image(data), Geometry(224)).astype(int)
        assert np.abs(d.pixels.cpu().numpy().astype(int) - want).mean() < 1.0  # nvJPEG's IDCT differs slightly
    with open_index(tmp_path / "i", model=tiny_model, pretrained="random", device="cuda") as idx:
        on_device = for_encoder(idx.encoder)  # the default on CUDA
        assert on_device is not None
        batch = on_device.stack([d.pixels for d in on_gpu(on_device)])
        vectors = idx.encoder.embed_pixels(batch)
        reference = idx.encoder.embed_pixels(np.stack([fit(open_image(d), idx.encoder.geometry) for d in datas]))
    assert (np.sum(vectors * reference, axis=1) >= 0.99).all()

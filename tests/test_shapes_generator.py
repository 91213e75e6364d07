"""Fast checks of the synthetic shapes generator (no model, no torch)."""

from __future__ import annotations

import numpy as np
import pytest

from index_data.shapes import (
    COLORS,
    MAX_SIDE,
    MIN_SIDE,
    PROMPTS,
    SHAPES,
    caption,
    render,
    render_with_info,
    sample,
    sample_with_caption,
)


def test_vocabulary() -> None:
    assert len(COLORS) == 8 and len(SHAPES) == 5
    assert len(PROMPTS) == 40 == len(set(PROMPTS))
    assert PROMPTS[0] == "a red circle"
    assert "a blue star" in PROMPTS


def test_render_is_deterministic_for_a_seed() -> None:
    a = render("red", "circle", np.random.default_rng(3))
    b = render("red", "circle", np.random.default_rng(3))
    c = render("red", "circle", np.random.default_rng(4))
    assert a.mode == "RGB"
    assert a.size == b.size and a.tobytes() == b.tobytes()
    assert a.size != c.size or a.tobytes() != c.tobytes()


def test_sizes_within_range_and_varied_aspect() -> None:
    rng = np.random.default_rng(0)
    sizes = [sample(rng)[0].size for _ in range(40)]
    for w, h in sizes:
        assert MIN_SIDE <= w <= MAX_SIDE and MIN_SIDE <= h <= MAX_SIDE
    assert any(w > 1.5 * h for w, h in sizes) and any(h > 1.5 * w for w, h in sizes)


def test_explicit_size_is_respected() -> None:
    img = render("blue", "star", np.random.default_rng(1), size=(100, 60))
    assert img.size == (100, 60)


def test_shape_color_is_present_and_background_contrasts() -> None:
    rng = np.random.default_rng(5)
    for color, rgb in COLORS.items():
        img, info = render_with_info(color, "square", rng, size=(128, 128))
        assert 0.2 <= info["scale"] <= 0.8
        arr = np.asarray(img).astype(int)
        cx, cy = (int(v) for v in info["center"])
        # the shape's center pixel has (about) the jittered shape color
        assert np.abs(arr[cy, cx] - np.array(info["rgb"])).max() <= 2
        assert np.abs(np.array(info["rgb"]) - np.array(rgb)).max() <= 25
        # a corner pixel (background) is far from the shape color
        corner = arr[0, 0] if info["background_kind"] != "noise" else arr[:4, :4].reshape(-1, 3).mean(0)
        assert np.linalg.norm(corner - np.array(info["rgb"])) > 100


def test_all_40_combinations_reachable() -> None:
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(600):
        _, color, shape = sample(rng)
        seen.add((color, shape))
    assert len(seen) == 40


def test_captions_mention_color_and_shape() -> None:
    rng = np.random.default_rng(0)
    templates = set()
    for color in COLORS:
        for shape in SHAPES:
            for _ in range(5):
                text = caption(color, shape, rng, scale=float(rng.uniform(0.2, 0.8)), background="gray")
                words = text.rstrip(".").split()
                assert color in words and shape in words
                assert " a orange" not in f" {text}"
                templates.add(text.replace(color, "C").replace(shape, "S"))
    assert len(templates) >= 10


def test_sample_with_caption_is_consistent() -> None:
    rng = np.random.default_rng(9)
    for _ in range(10):
        img, color, shape, text = sample_with_caption(rng)
        assert color in text and shape in text
        assert img.mode == "RGB"


def test_unknown_names_rejected() -> None:
    with pytest.raises(ValueError):
        render("pink", "circle", np.random.default_rng(0))
    with pytest.raises(ValueError):
        caption("red", "hexagon", np.random.default_rng(0))

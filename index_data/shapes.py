"""Synthetic "colored shapes" world used to train and evaluate the bundled
``shapes-mini`` CLIP model and to build the demo corpus.

Every image shows exactly one shape (circle, square, triangle, five-pointed
star or plus-sign cross) in one of eight colors, at a random size (20-80 % of
the image's shorter side), position and rotation, on a solid or noisy
background whose color is kept far from the shape's color. Images have a
random size between 64 and 512 px per side, so any aspect ratio occurs; the
shape is always placed inside the central square of the image, which is what
a "resize shortest side + center crop" preprocess (the one open_clip uses)
keeps.

Only numpy and pillow are needed. Everything is driven by an explicit
``numpy.random.Generator``, so a given seed always produces the same images
and captions.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "COLORS",
    "SHAPES",
    "PROMPTS",
    "MIN_SIDE",
    "MAX_SIDE",
    "render",
    "render_with_info",
    "caption",
    "sample",
    "sample_with_caption",
]

#: Canonical RGB value of each color name (each channel is jittered by up to
#: +/- ``COLOR_JITTER`` when rendering).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "orange": (245, 140, 20),
    "purple": (140, 40, 180),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}

#: Shape names, in a fixed order.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")

#: The 40 evaluation captions, one per (color, shape) pair, colors outer.
PROMPTS: list[str] = [f"a {c} {s}" for c in COLORS for s in SHAPES]

#: Smallest / largest image side produced by :func:`render` when no size is given.
MIN_SIDE: int = 64
MAX_SIDE: int = 512

#: Maximum per-channel jitter applied to the canonical color.
COLOR_JITTER: int = 25

#: Minimum Euclidean RGB distance between the shape color and the background
#: (mean) color.
MIN_CONTRAST: float = 150.0

#: Relative size range of the shape (its bounding extent as a fraction of the
#: image's shorter side).
MIN_SCALE: float = 0.2
MAX_SCALE: float = 0.8

_SUPERSAMPLE = 2  # draw at 2x and downsample the shape mask for smooth edges

# Caption templates. "{c}" = color, "{s}" = shape, "{z}" = size word
# ("small"/"large"), "{b}" = background word ("gray", "dark", "noisy", ...).
_TEMPLATES_PLAIN: tuple[str, ...] = (
    "a {c} {s}",
    "{c} {s}",
    "a {c} {s}.",
    "the {c} {s}",
    "a photo of a {c} {s}",
    "a picture of a {c} {s}",
    "an image of a {c} {s}",
    "a drawing of a {c} {s}",
    "a {s} that is {c}",
    "a {c} colored {s}",
    "a single {c} {s}",
    "one {c} {s}",
    "there is a {c} {s}",
    "a simple {c} {s} shape",
    "a {c} {s} icon",
    "{c} {s} shape",
    "a close-up of a {c} {s}",
)
_TEMPLATES_SIZE: tuple[str, ...] = (
    "a {z} {c} {s}",
    "a photo of a {z} {c} {s}",
    "a {z} {s} in {c}",
)
_TEMPLATES_BG: tuple[str, ...] = (
    "a {c} {s} on a {b} background",
    "a picture of a {c} {s} on a {b} background",
    "a {c} {s} against a {b} background",
)
_TEMPLATES_BOTH: tuple[str, ...] = (
    "a {z} {c} {s} on a {b} background",
)


def _check(color: str, shape: str) -> None:
    if color not in COLORS:
        raise ValueError(f"unknown color {color!r}; expected one of {list(COLORS)}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {list(SHAPES)}")


def _fix_articles(text: str) -> str:
    """Turn "a orange" / "a image" into "an orange" / ... (only the word "a")."""
    words = text.split(" ")
    for i in range(len(words) - 1):
        if words[i] in ("a", "A") and words[i + 1][:1].lower() in "aeiou" and words[i + 1]:
            words[i] = "an" if words[i] == "a" else "An"
    return " ".join(words)


def _shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of ``shape`` centered at (cx, cy), circumradius ``r``, rotated by ``angle`` rad."""
    if shape == "square":
        base = [(math.cos(a), math.sin(a)) for a in (math.pi / 4 + k * math.pi / 2 for k in range(4))]
    elif shape == "triangle":
        base = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
    elif shape == "star":
        base = []
        inner = 0.4
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rr = 1.0 if k % 2 == 0 else inner
            base.append((rr * math.cos(a), rr * math.sin(a)))
    elif shape == "cross":
        t = 0.3  # half arm thickness, relative to the half-extent of an arm
        # plus sign with arm half-length 1/sqrt(1 + t^2) so the circumradius is 1
        h = 1.0 / math.sqrt(1.0 + t * t)
        w = t * h
        base = [(w, -h), (w, -w), (h, -w), (h, w), (w, w), (w, h),
                (-w, h), (-w, w), (-h, w), (-h, -w), (-w, -w), (-w, -h)]
    else:  # pragma: no cover - guarded by _check
        raise ValueError(shape)
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in base]


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int) -> np.ndarray:
    delta = rng.integers(-amount, amount + 1, size=3)
    return np.clip(np.asarray(rgb, dtype=np.int64) + delta, 0, 255)


def _pick_background(shape_rgb: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, str, str]:
    """Choose a background mean color far from ``shape_rgb``.

    Returns (rgb, kind, word) where kind is "solid", "gray" or "noise" and
    word is a caption-friendly description ("plain", "gray", "noisy", ...).
    """
    kind = ("solid", "gray", "noise")[int(rng.integers(0, 3))]
    for _ in range(1000):
        if kind == "gray":
            g = int(rng.integers(40, 216))
            bg = np.array([g, g, g], dtype=np.int64)
        else:
            bg = rng.integers(0, 256, size=3)
        if float(np.linalg.norm(bg - shape_rgb)) >= MIN_CONTRAST:
            break
    else:  # pragma: no cover - practically unreachable
        bg = 255 - shape_rgb
    if kind == "gray":
        word = "gray"
    elif kind == "noise":
        word = ("noisy", "textured", "grainy")[int(rng.integers(0, 3))]
    else:
        lum = 0.299 * bg[0] + 0.587 * bg[1] + 0.114 * bg[2]
        word = "dark" if lum < 70 else "light" if lum > 190 else "plain"
    return bg, kind, word


def render_with_info(
    color: str,
    shape: str,
    rng: np.random.Generator,
    size: tuple[int, int] | None = None,
) -> tuple[Image.Image, dict[str, Any]]:
    """Render one image and also return how it was drawn.

    Args:
        color: a key of :data:`COLORS`.
        shape: one of :data:`SHAPES`.
        rng: source of all randomness (size, placement, rotation, jitter, background).
        size: ``(width, height)`` in pixels; random in [MIN_SIDE, MAX_SIDE] per side if None.

    Returns:
        ``(image, info)`` where image is an RGB ``PIL.Image.Image`` and info is a dict with
        ``scale`` (shape extent / shorter side), ``background`` (caption word such as
        ``"gray"``), ``background_kind`` (``"solid"``, ``"gray"`` or ``"noise"``),
        ``rgb`` (the jittered shape color) and ``center`` (pixel coordinates).
    """
    _check(color, shape)
    if size is None:
        w = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
        h = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    else:
        w, h = int(size[0]), int(size[1])
        if w < 1 or h < 1:
            raise ValueError(f"size must be positive, got {size!r}")
    side = min(w, h)
    rgb = _jitter(COLORS[color], rng, COLOR_JITTER)
    bg, kind, word = _pick_background(rgb, rng)

    # Background.
    if kind == "noise":
        sigma = float(rng.uniform(8.0, 25.0))
        arr = bg[None, None, :] + rng.normal(0.0, sigma, size=(h, w, 3))
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    else:
        arr = np.empty((h, w, 3), dtype=np.uint8)
        arr[...] = bg.astype(np.uint8)

    # Shape geometry: extent = scale * side is the shape's diameter (2 * circumradius).
    scale = float(rng.uniform(MIN_SCALE, MAX_SCALE))
    r = scale * side / 2.0
    # Place it inside the central side x side square (what center-crop keeps).
    x0 = (w - side) / 2.0
    y0 = (h - side) / 2.0
    cx = x0 + float(rng.uniform(r, side - r))
    cy = y0 + float(rng.uniform(r, side - r))
    angle = float(rng.uniform(0.0, 2.0 * math.pi))

    # Anti-aliased mask: draw at 2x on a local canvas, then downsample.
    ss = _SUPERSAMPLE
    bx0, by0 = max(int(math.floor(cx - r)) - 1, 0), max(int(math.floor(cy - r)) - 1, 0)
    bx1, by1 = min(int(math.ceil(cx + r)) + 2, w), min(int(math.ceil(cy + r)) + 2, h)
    mask = Image.new("L", ((bx1 - bx0) * ss, (by1 - by0) * ss), 0)
    draw = ImageDraw.Draw(mask)
    lcx, lcy = (cx - bx0) * ss, (cy - by0) * ss
    if shape == "circle":
        draw.ellipse([lcx - r * ss, lcy - r * ss, lcx + r * ss, lcy + r * ss], fill=255)
    else:
        draw.polygon(_shape_polygon(shape, lcx, lcy, r * ss, angle), fill=255)
    mask = mask.resize((bx1 - bx0, by1 - by0), Image.BILINEAR)
    alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
    patch = arr[by0:by1, bx0:bx1].astype(np.float32)
    arr[by0:by1, bx0:bx1] = np.clip(
        patch * (1.0 - alpha) + rgb.astype(np.float32)[None, None, :] * alpha + 0.5, 0, 255
    ).astype(np.uint8)

    info = {
        "scale": scale,
        "background": word,
        "background_kind": kind,
        "rgb": tuple(int(v) for v in rgb),
        "center": (cx, cy),
    }
    return Image.fromarray(arr, mode="RGB"), info


def render(
    color: str,
    shape: str,
    rng: np.random.Generator,
    size: tuple[int, int] | None = None,
) -> Image.Image:
    """Render one RGB image of a ``color`` ``shape``.

    Args:
        color: a key of :data:`COLORS`.
        shape: one of :data:`SHAPES`.
        rng: source of all randomness.
        size: ``(width, height)``; random in [64, 512] per side (any aspect ratio) if None.

    Returns:
        An RGB ``PIL.Image.Image`` of the requested (or random) size.
    """
    return render_with_info(color, shape, rng, size)[0]


def caption(
    color: str,
    shape: str,
    rng: np.random.Generator,
    scale: float | None = None,
    background: str | None = None,
) -> str:
    """A caption for a ``color`` ``shape`` drawn from varied templates.

    Every caption contains the color word and the shape word. When ``scale``
    (shape extent / image side, see :func:`render_with_info`) is given, some
    templates add "small" or "large"; when ``background`` (a word such as
    "gray" or "noisy") is given, some mention the background. Without them
    only color+shape templates are used, so the caption never states a
    falsehood about the image.

    Args:
        color: a key of :data:`COLORS`.
        shape: one of :data:`SHAPES`.
        rng: picks the template.
        scale: optional relative size of the shape.
        background: optional background description word.

    Returns:
        The caption text, e.g. ``"a photo of a blue star"``.
    """
    _check(color, shape)
    size_word = None
    if scale is not None:
        if scale < 0.4:
            size_word = "small"
        elif scale > 0.6:
            size_word = ("large", "big")[int(rng.integers(0, 2))]
    templates: list[str] = list(_TEMPLATES_PLAIN)
    if size_word is not None:
        templates += list(_TEMPLATES_SIZE)
    if background is not None:
        templates += list(_TEMPLATES_BG)
    if size_word is not None and background is not None:
        templates += list(_TEMPLATES_BOTH)
    t = templates[int(rng.integers(0, len(templates)))]
    return _fix_articles(t.format(c=color, s=shape, z=size_word or "", b=background or ""))


def sample_with_caption(
    rng: np.random.Generator, size: tuple[int, int] | None = None
) -> tuple[Image.Image, str, str, str]:
    """Draw a uniformly random (color, shape), render it and caption it truthfully.

    Returns:
        ``(image, color, shape, caption)``.
    """
    color = list(COLORS)[int(rng.integers(0, len(COLORS)))]
    shape = SHAPES[int(rng.integers(0, len(SHAPES)))]
    img, info = render_with_info(color, shape, rng, size)
    text = caption(color, shape, rng, scale=info["scale"], background=info["background"])
    return img, color, shape, text


def sample(rng: np.random.Generator) -> tuple[Image.Image, str, str]:
    """Draw a uniformly random (color, shape) and render it at a random size.

    Returns:
        ``(image, color, shape)``.
    """
    color = list(COLORS)[int(rng.integers(0, len(COLORS)))]
    shape = SHAPES[int(rng.integers(0, len(SHAPES)))]
    return render(color, shape, rng), color, shape

"""Write the demo corpus ``index_data/demo/`` from the synthetic shapes world.

Run from the repository root::

    .venv/bin/python index_data/make_demo.py

Produces 50 images in mixed formats (jpg, png, webp) and sizes (64-384 px per
side, any aspect ratio), named after what they show (``red_circle_01.jpg``,
``blue_star_01.webp``, ...), always including at least one red circle and one
blue star, plus ``captions.txt`` with 60 distinct captions (one per line):
"a red circle", "a photo of a blue star", one caption for each of the other
38 (color, shape) pairs, then random pairs, all from varied templates.
Seed 2024 (not used by training, seeds 0/1, nor by the benchmark, seed 777).
Deterministic: running it again rewrites identical files. Total size is kept
under 2 MB.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from index_data.shapes import COLORS, SHAPES, caption, render  # noqa: E402

SEED = 2024
N_IMAGES = 50
N_CAPTIONS = 60
MAX_SIDE_DEMO = 384  # keeps the corpus small (PNG of noisy backgrounds is large)
MAX_TOTAL_BYTES = 2_000_000
FORMATS = ("jpg", "png", "webp")
BACKGROUND_WORDS = ("gray", "dark", "light", "plain", "noisy")


def _save(img, path: Path) -> None:
    ext = path.suffix.lower()
    if ext == ".jpg":
        img.save(path, format="JPEG", quality=85)
    elif ext == ".png":
        img.save(path, format="PNG", optimize=True)
    elif ext == ".webp":
        img.save(path, format="WEBP", quality=80, method=4)
    else:  # pragma: no cover
        raise ValueError(ext)


def make_demo(out_dir: Path, seed: int = SEED) -> list[Path]:
    """(Re)create ``out_dir`` with the demo images and captions.txt; return the written paths."""
    rng = np.random.default_rng(seed)
    colors = list(COLORS)
    combos: list[tuple[str, str]] = [("red", "circle"), ("blue", "star")]
    while len(combos) < N_IMAGES:
        combos.append((colors[int(rng.integers(0, len(colors)))], SHAPES[int(rng.integers(0, len(SHAPES)))]))

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    written: list[Path] = []
    counts: Counter[tuple[str, str]] = Counter()
    for color, shape in combos:
        counts[(color, shape)] += 1
        w = int(rng.integers(64, MAX_SIDE_DEMO + 1))
        h = int(rng.integers(64, MAX_SIDE_DEMO + 1))
        img = render(color, shape, rng, size=(w, h))
        ext = FORMATS[int(rng.integers(0, len(FORMATS)))]
        path = out_dir / f"{color}_{shape}_{counts[(color, shape)]:02d}.{ext}"
        _save(img, path)
        written.append(path)

    # Every (color, shape) pair gets at least one caption, so each demo image has
    # a fitting caption; the rest are extra random pairs. Varied templates throughout.
    lines: list[str] = ["a red circle", "a photo of a blue star"]
    seen = set(lines)
    pairs = [(c, s) for c in colors for s in SHAPES if (c, s) not in (("red", "circle"), ("blue", "star"))]
    pairs = [pairs[int(i)] for i in rng.permutation(len(pairs))]
    while len(lines) < N_CAPTIONS:
        if pairs:
            color, shape = pairs[0]
        else:
            color = colors[int(rng.integers(0, len(colors)))]
            shape = SHAPES[int(rng.integers(0, len(SHAPES)))]
        extra = int(rng.integers(0, 4))  # 0: plain, 1: with size, 2: with background, 3: both
        scale = float(rng.uniform(0.2, 0.8)) if extra in (1, 3) else None
        bg = BACKGROUND_WORDS[int(rng.integers(0, len(BACKGROUND_WORDS)))] if extra in (2, 3) else None
        text = caption(color, shape, rng, scale=scale, background=bg)
        if text not in seen:
            seen.add(text)
            lines.append(text)
            if pairs and pairs[0] == (color, shape):
                pairs.pop(0)
    cap_path = out_dir / "captions.txt"
    cap_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    written.append(cap_path)

    total = sum(p.stat().st_size for p in written)
    if total > MAX_TOTAL_BYTES:
        raise RuntimeError(f"demo corpus is {total} bytes, over the {MAX_TOTAL_BYTES} limit")
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write the shapes demo corpus.")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "index_data" / "demo")
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args(argv)
    paths = make_demo(args.out_dir, args.seed)
    total = sum(p.stat().st_size for p in paths)
    by_ext = Counter(p.suffix for p in paths)
    print(f"wrote {len(paths) - 1} images + captions.txt to {args.out_dir} "
          f"({total / 1e6:.2f} MB; {dict(by_ext)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

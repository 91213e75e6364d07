"""What `--min-score auto` keeps on a generated shapes set, for present and out-of-domain queries.

Run from the repository root::

    .venv/bin/python benchmarks/bench_relevance.py [--images 400] [--keep DIR]

Renders `--images` shapes (seed 777, class i % 40, 96x96 JPEG) with `index_data.shapes`, indexes
them with the bundled shapes-mini model, and for each of the 40 prompts ("a blue star", ...) and a
few queries the model cannot know ("a photo of a cat", ...) prints how many results
`search(text, k=N, min_score="auto")` returns, how many of them show the named color and shape
(precision) and how many of those the set holds (recall), plus the top raw score and relevance.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import retrieval  # noqa: E402
from index_data.shapes import COLORS, PROMPTS, SHAPES, render  # noqa: E402

OUT_OF_DOMAIN = ["a photo of a cat", "a dog on a beach", "an airplane", "a bowl of soup", "qwerty zxcv"]


def make_shapes(folder: Path, n: int, seed: int = 777) -> None:
    """`n` images, class i % 40, named COLOR_SHAPE_NNNN.jpg."""
    rng = np.random.default_rng(seed)
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    for i in range(n):
        color, shape = pairs[i % len(pairs)]
        render(color, shape, rng, size=(96, 96)).save(folder / f"{color}_{shape}_{i:04d}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--keep", type=Path, help="build the set and index here (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        where = args.keep or Path(tmp)
        (where / "shapes").mkdir(parents=True, exist_ok=True)
        make_shapes(where / "shapes", args.images)
        with retrieval.open_index(where / "index", model=retrieval.DEMO_MODEL) as idx:
            idx.add([where / "shapes"])
            kept, precise, recalled = [], [], []
            for prompt in PROMPTS:
                hits = idx.search(prompt, k=args.images, min_score="auto")
                name = "_".join(prompt.split()[1:]) + "_"
                right = sum(Path(h.path).name.startswith(name) for h in hits)
                kept.append(len(hits))
                precise.append(right / len(hits) if hits else 1.0)
                recalled.append(right / (args.images // 40))
            print(f"{args.images} images, 40 present queries: results kept mean {np.mean(kept):.1f} "
                  f"(min {min(kept)}, max {max(kept)}), precision mean {np.mean(precise):.3f}, "
                  f"recall mean {np.mean(recalled):.3f}")
            for text in ["a blue star", *OUT_OF_DOMAIN]:
                top = idx.search(text, k=1)[0]
                hits = idx.search(text, k=args.images, min_score="auto")
                print(f"{text!r:20} kept {len(hits):3d} of {args.images}; top score {top.score:.3f}, "
                      f"top relevance {top.relevance:.2f}")


if __name__ == "__main__":
    main()

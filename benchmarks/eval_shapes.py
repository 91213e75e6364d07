"""Evaluate the bundled ``shapes-mini`` CLIP model on fresh synthetic images.

Run from the repository root::

    .venv/bin/python benchmarks/eval_shapes.py

The model is loaded exactly the way a user would load a local open_clip
checkpoint::

    open_clip.add_model_config("index_data/shapes-mini.json")
    open_clip.create_model_and_transforms("shapes-mini", pretrained="index_data/shapes-mini.pt")
    open_clip.get_tokenizer("shapes-mini")

Held-out set: 500 images from ``index_data.shapes`` with seed 777 (training
uses seeds 0 and 1, the demo corpus 2024). Classes are balanced: image i has
(color, shape) number i % 40, so every class has 12 or 13 images; size,
aspect ratio, placement, rotation, color jitter and background are random.
Images go through the model's own preprocess (resize shortest side + center
crop to 64 px).

Metrics, against the 40 prompts ``PROMPTS = ["a red circle", ..., "a black cross"]``:

* zero-shot accuracy (= image->text R@1): fraction of the 500 images whose most
  similar prompt is the one naming their color and shape;
* text->image R@1: fraction of the 40 prompts whose top-ranked image among the
  500 shows that color and shape;
* also, for diagnosis: color-only and shape-only accuracy of the zero-shot
  prediction, and text->image precision@10 (mean over prompts).

Target: >= 0.95 for both R@1 metrics. Exit status 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import open_clip  # noqa: E402

from index_data.shapes import COLORS, PROMPTS, SHAPES, render  # noqa: E402

SEED = 777
N_IMAGES = 500
TARGET = 0.95
MODEL_NAME = "shapes-mini"
COMMAND = ".venv/bin/python benchmarks/eval_shapes.py"


def load_model(index_dir: Path):
    """Load shapes-mini through the standard open_clip local-checkpoint path."""
    open_clip.add_model_config(str(index_dir / f"{MODEL_NAME}.json"))
    model, _, preprocess = open_clip.create_model_and_transforms(
        MODEL_NAME, pretrained=str(index_dir / f"{MODEL_NAME}.pt"))
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    model.eval()
    return model, preprocess, tokenizer


def held_out_images(n: int = N_IMAGES, seed: int = SEED):
    """Balanced held-out set: returns (list of PIL images, class ids as np.ndarray)."""
    rng = np.random.default_rng(seed)
    colors = list(COLORS)
    images, labels = [], []
    for i in range(n):
        k = i % len(PROMPTS)
        color, shape = colors[k // len(SHAPES)], SHAPES[k % len(SHAPES)]
        assert PROMPTS[k] == f"a {color} {shape}"
        images.append(render(color, shape, rng))
        labels.append(k)
    return images, np.asarray(labels)


@torch.no_grad()
def evaluate(index_dir: Path, n: int = N_IMAGES, seed: int = SEED) -> dict[str, float]:
    """Compute the metrics described in the module docstring."""
    model, preprocess, tokenizer = load_model(index_dir)
    images, labels = held_out_images(n, seed)
    y = torch.from_numpy(labels)
    txt = F.normalize(model.encode_text(tokenizer(PROMPTS)), dim=-1)
    feats = []
    for i in range(0, n, 100):
        x = torch.stack([preprocess(im) for im in images[i:i + 100]])
        feats.append(F.normalize(model.encode_image(x), dim=-1))
    img = torch.cat(feats)
    sim = img @ txt.T  # (n, 40)

    pred = sim.argmax(dim=1)
    n_shapes = len(SHAPES)
    top_img = sim.argmax(dim=0)  # (40,) best image per prompt
    top10 = sim.topk(10, dim=0).indices  # (10, 40)
    prompt_ids = torch.arange(len(PROMPTS))
    return {
        "zero_shot_acc": (pred == y).float().mean().item(),
        "t2i_r1": (y[top_img] == prompt_ids).float().mean().item(),
        "color_acc": (pred // n_shapes == y // n_shapes).float().mean().item(),
        "shape_acc": (pred % n_shapes == y % n_shapes).float().mean().item(),
        "t2i_p10": (y[top10] == prompt_ids[None, :]).float().mean().item(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Evaluate shapes-mini on fresh synthetic images.")
    ap.add_argument("--index-dir", type=Path, default=ROOT / "index_data")
    ap.add_argument("--n", type=int, default=N_IMAGES)
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

    t0 = time.time()
    m = evaluate(args.index_dir, args.n, args.seed)
    el = time.time() - t0
    rows = [
        ("zero-shot accuracy (image->text R@1, 40 prompts)", m["zero_shot_acc"], TARGET),
        ("text->image R@1 (40 prompts vs images)", m["t2i_r1"], TARGET),
        ("  color correct (zero-shot prediction)", m["color_acc"], None),
        ("  shape correct (zero-shot prediction)", m["shape_acc"], None),
        ("  text->image precision@10", m["t2i_p10"], None),
    ]
    print(f"command: {COMMAND}" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip())
    print(f"model: {MODEL_NAME} from {args.index_dir}; {args.n} held-out images, seed {args.seed}; {el:.1f}s")
    print()
    print(f"| {'metric':<50} | {'value':>6} | {'target':>6} |")
    print(f"|{'-' * 52}|{'-' * 8}|{'-' * 8}|")
    ok = True
    for name, val, tgt in rows:
        t = f">={tgt:.2f}" if tgt is not None else ""
        print(f"| {name:<50} | {val:6.3f} | {t:>6} |")
        if tgt is not None and val < tgt:
            ok = False
    print()
    print("PASS" if ok else "FAIL: below target")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Train the bundled ``shapes-mini`` CLIP model on synthetic colored shapes.

Run from the repository root::

    .venv/bin/python index_data/train_shapes_mini.py

It writes ``index_data/shapes-mini.json`` (an open_clip model config) and
``index_data/shapes-mini.pt`` (the state dict, stored in fp16), which load
through the standard open_clip path for local checkpoints::

    open_clip.add_model_config("index_data/shapes-mini.json")
    model, _, preprocess = open_clip.create_model_and_transforms(
        "shapes-mini", pretrained="index_data/shapes-mini.pt")
    tokenizer = open_clip.get_tokenizer("shapes-mini")

Recipe: a small open_clip ``ModifiedResNet`` vision tower (layers [1,1,1,1],
width 32, 64 px input) and a 2-layer, width-48 text transformer (context 16),
embed_dim 64. 20,000 training images are generated once at random sizes
(64-512 px per side, any aspect ratio) and converted with the model's own
preprocess (resize shortest side to 64 + center crop); captions are drawn
afresh from varied templates at every step. Loss: CLIP contrastive loss where
every pair in the batch with the same (color, shape) counts as a positive (soft
targets). AdamW, lr 2e-3, linear warm-up + cosine decay, batch 128, 1,200 steps.

Seeds: training data uses ``--seed`` (default 0); the held-out check set uses
``--seed + 1`` (1). The demo corpus (make_demo.py) uses 2024 and the benchmark
(benchmarks/eval_shapes.py) uses 777, so none overlap.

Everything is seeded (torch, numpy) and ``torch.use_deterministic_algorithms``
is on with a fixed thread count (``--threads``, default 1), so re-running on the
same machine reproduces the checkpoint byte for byte (the script prints its
SHA-256). A different thread count gives different (equally good) weights.
One thread is used because the CPU is usually shared: with other jobs running,
2 threads were 1.5-3x slower per step than 1 on the 2-core machine.

Note: ``create_model_and_transforms`` returns the model in *training* mode;
the vision tower has BatchNorm, so call ``model.eval()`` before encoding, or
embeddings depend on what else is in the batch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
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

from index_data.shapes import COLORS, PROMPTS, SHAPES, caption, render_with_info  # noqa: E402

MODEL_NAME = "shapes-mini"

MODEL_CFG: dict = {
    "embed_dim": 64,
    "vision_cfg": {
        "image_size": 64,
        "layers": [1, 1, 1, 1],
        "width": 32,
        "patch_size": None,
    },
    "text_cfg": {
        "context_length": 16,
        "vocab_size": 49408,
        "width": 48,
        "heads": 4,
        "layers": 2,
    },
    "custom_text": False,
}

COLOR_NAMES = list(COLORS)


def _generate(n: int, seed: int, preprocess) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Render ``n`` random images (image i uses its own child seed of ``seed``).

    Returns uint8 images (n, 64, 64, 3) after the model's resize + center crop,
    the class id (color * len(SHAPES) + shape), the relative shape scale, and the
    background word of each image (for truthful captions).
    """
    # Everything in the preprocess up to (not including) ToTensor/Normalize acts
    # on the PIL image; the rest is done on tensors later, identically.
    pil_steps = preprocess.transforms[:-2]
    seqs = np.random.SeedSequence(seed).spawn(n)
    images = np.empty((n, 64, 64, 3), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    scales = np.empty(n, dtype=np.float32)
    bgs: list[str] = []
    for i, ss in enumerate(seqs):
        rng = np.random.default_rng(ss)
        ci = int(rng.integers(0, len(COLOR_NAMES)))
        si = int(rng.integers(0, len(SHAPES)))
        img, info = render_with_info(COLOR_NAMES[ci], SHAPES[si], rng)
        for t in pil_steps:
            img = t(img)
        images[i] = np.asarray(img, dtype=np.uint8)
        labels[i] = ci * len(SHAPES) + si
        scales[i] = info["scale"]
        bgs.append(info["background"])
    return images, labels, scales, bgs


def _to_tensor(images: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - mean) / std


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, x: torch.Tensor, labels: torch.Tensor, batch: int = 250) -> float:
    """Fraction of images whose most similar of the 40 PROMPTS is their own (color, shape)."""
    model.eval()
    txt = F.normalize(model.encode_text(tokenizer(PROMPTS)), dim=-1)
    correct = 0
    for i in range(0, len(x), batch):
        img = F.normalize(model.encode_image(x[i:i + batch]), dim=-1)
        correct += int(((img @ txt.T).argmax(dim=1) == labels[i:i + batch]).sum())
    return correct / len(x)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.ndim < 2 or "embedding" in name or "logit_scale" in name or ".bn" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", type=Path, default=ROOT / "index_data", help="where to write the .json and .pt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=20_000)
    ap.add_argument("--n-heldout", type=int, default=500)
    ap.add_argument("--steps", type=int, default=1_200)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads, fixed for reproducibility (1 is also the fastest when the CPU is shared)")
    ap.add_argument("--eval-every", type=int, default=250)
    args = ap.parse_args(argv)

    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = args.out_dir / f"{MODEL_NAME}.json"
    ckpt_path = args.out_dir / f"{MODEL_NAME}.pt"
    cfg_path.write_text(json.dumps(MODEL_CFG, indent=4) + "\n")
    open_clip.add_model_config(str(cfg_path))

    model, _, preprocess = open_clip.create_model_and_transforms(MODEL_NAME, pretrained=None)
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    norm = preprocess.transforms[-1]
    mean = torch.tensor(norm.mean).view(1, 3, 1, 1)
    std = torch.tensor(norm.std).view(1, 3, 1, 1)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {MODEL_NAME}: {n_params / 1e6:.2f}M parameters; preprocess: {preprocess}", flush=True)

    t0 = time.time()
    tr_img, tr_lab, tr_scale, tr_bg = _generate(args.n_train, args.seed, preprocess)
    ho_img, ho_lab, _, _ = _generate(args.n_heldout, args.seed + 1, preprocess)
    print(f"generated {args.n_train} train + {args.n_heldout} held-out images in {time.time() - t0:.1f}s", flush=True)

    # channels_last makes the oneDNN convolutions of the ResNet tower ~1.5-2x faster on CPU.
    model = model.to(memory_format=torch.channels_last)
    x_train = _to_tensor(tr_img, mean, std).contiguous(memory_format=torch.channels_last)
    y_train = torch.from_numpy(tr_lab)
    x_ho = _to_tensor(ho_img, mean, std)
    y_ho = torch.from_numpy(ho_lab)
    del tr_img, ho_img

    opt = torch.optim.AdamW(_param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        p = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * 0.5 * (1.0 + math.cos(math.pi * p))

    cap_rng = np.random.default_rng([args.seed, 12345])
    gen = torch.Generator().manual_seed(args.seed)
    perm = torch.randperm(args.n_train, generator=gen)
    pos = 0
    t_train = time.time()
    for step in range(args.steps):
        if pos + args.batch > args.n_train:
            perm = torch.randperm(args.n_train, generator=gen)
            pos = 0
        idx = perm[pos:pos + args.batch]
        pos += args.batch
        labels = y_train[idx]
        texts = [
            caption(COLOR_NAMES[int(lab) // len(SHAPES)], SHAPES[int(lab) % len(SHAPES)], cap_rng,
                    scale=float(tr_scale[j]), background=tr_bg[j])
            for j, lab in zip(idx.tolist(), labels)
        ]
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        model.train()
        x = x_train[idx].contiguous(memory_format=torch.channels_last)
        img_f, txt_f, logit_scale = model(x, tokenizer(texts))
        logits = logit_scale * img_f @ txt_f.T
        same = (labels[:, None] == labels[None, :]).float()
        target = same / same.sum(dim=1, keepdim=True)  # symmetric: same class => same row sum
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 50 == 0 or step == args.steps - 1:
            el = time.time() - t_train
            print(f"step {step:5d}/{args.steps} loss {loss.item():.4f} lr {lr_at(step):.2e} "
                  f"scale {logit_scale.item():.1f} [{el:.0f}s, {el / (step + 1):.2f}s/step]", flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            print(f"  held-out zero-shot accuracy @ {step + 1}: {zero_shot_accuracy(model, tokenizer, x_ho, y_ho):.3f}",
                  flush=True)

    model.eval()
    acc_fp32 = zero_shot_accuracy(model, tokenizer, x_ho, y_ho)
    state = {k: (v.detach().half() if v.is_floating_point() else v.detach()).contiguous()
             for k, v in model.state_dict().items()}
    torch.save(state, ckpt_path)
    digest = hashlib.sha256(ckpt_path.read_bytes()).hexdigest()

    # Reload through the standard open_clip path and check again (fp16 -> fp32 weights).
    m2, _, _ = open_clip.create_model_and_transforms(MODEL_NAME, pretrained=str(ckpt_path))
    acc_reload = zero_shot_accuracy(m2, tokenizer, x_ho, y_ho)
    print(f"training time {time.time() - t_train:.0f}s, total wall time {time.time() - t_start:.0f}s", flush=True)
    print(f"wrote {cfg_path} and {ckpt_path} ({os.path.getsize(ckpt_path) / 1e6:.2f} MB, sha256 {digest})")
    print(f"final held-out zero-shot accuracy ({args.n_heldout} images, seed {args.seed + 1}): "
          f"{acc_fp32:.3f} (fp32 in memory), {acc_reload:.3f} (reloaded fp16 checkpoint)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The int8 image tower on the CPU: its gate, its speed, and what saving ORT_ENABLE_ALL graphs would bring.

    .venv/bin/python benchmarks/bench_int8.py [--models shapes-mini,ViT-B-32,ViT-B-32-256] [--cache DIR]
        [--rounds 4] [--sessions 5] [--json out.json]

For each model (bundled shapes-mini with its trained checkpoint; open_clip architectures with seeded random
weights), loaded through `retrieval.encoder.load_encoder(..., "cpu")` with MMSEARCH_CACHE=--cache (a fresh
folder exports the model, quantizes its image tower and runs the gate, as a user's first run does):

1. the gate's outcome from export.json (min cosine of the 32 probe images, int8 vs fp32, kept or why not);
2. model-alone images/s on 64 random normalized images, alternating, --rounds times (median): fp32 batches of
   64, int8 one image per call (what OnnxEncoder does) and, for comparison, int8 batches of 8 and 64; and the
   min cosine between int8 run batched (64) and one image per call (why OnnxEncoder runs one per call);
3. shapes-mini only: eval_shapes.py's 500 held-out images (seed 777) through the library (`embed_images`),
   fp32 vs int8: zero-shot accuracy, text->image R@1, and the min cosine int8 vs fp32;
4. --sessions N: image-tower session start in fresh processes (median of N, alternating), the saved
   EXTENDED graph loaded with ORT_ENABLE_ALL (what OnnxEncoder does) against a graph saved after
   ORT_ENABLE_ALL loaded with optimizations off, for fp32 and int8: does keeping ENABLE_ALL's output pay?
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_index import loadavg, log  # noqa: E402

SESSION_CODE = """
import sys, time
import numpy as np
import onnxruntime as ort
sys.path.insert(0, {repo!r})
from retrieval.onnx_runtime import _session_options
path, level, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
t0 = time.perf_counter()
sess = ort.InferenceSession(path, _session_options(ort, level=level, threads=None, prepack=True),
                            providers=["CPUExecutionProvider"])
t1 = time.perf_counter()
sess.run(None, {{"pixels": np.zeros((1, 3, size, size), np.float32)}})
print(t1 - t0, time.perf_counter() - t1)
"""


def speeds(encoder, rounds: int) -> dict:
    import numpy as np

    from retrieval.onnx_runtime import _row_cosine

    onnx = encoder.onnx
    size = onnx.image_size
    x = np.random.default_rng(0).normal(size=(64, 3, size, size)).astype(np.float32)
    sessions = {"fp32": onnx._session("visual"), "int8": onnx._session("visual-int8")}
    variants = {"fp32 batch 64": ("fp32", 64), "int8 1 per call": ("int8", 1), "int8 batch 8": ("int8", 8),
                "int8 batch 64": ("int8", 64)}
    runs: dict[str, list[float]] = {k: [] for k in variants}
    outputs = {}
    for _ in range(rounds):
        for name, (precision, chunk) in variants.items():
            t0 = time.perf_counter()
            out = [sessions[precision].run(None, {"pixels": x[i : i + chunk]})[0] for i in range(0, 64, chunk)]
            runs[name].append(64 / (time.perf_counter() - t0))
            outputs[name] = np.concatenate(out)
    result = {name: statistics.median(v) for name, v in runs.items()}
    result["min cosine int8 batched vs 1 per call"] = float(
        _row_cosine(outputs["int8 batch 64"], outputs["int8 1 per call"]).min())
    result["min cosine int8 (1 per call) vs fp32"] = float(
        _row_cosine(outputs["int8 1 per call"], outputs["fp32 batch 64"]).min())
    return result


def shapes_held_out(encoder) -> dict:
    import numpy as np

    from eval_shapes import PROMPTS, held_out_images

    images, labels = held_out_images()
    text = encoder.embed_texts(PROMPTS)
    out, vectors = {}, {}
    for precision in ("fp32", "int8"):
        encoder.set_precision(precision)
        vectors[precision] = encoder.embed_images(images)
        sim = vectors[precision] @ text.T
        out[precision] = {"zero_shot": float((sim.argmax(1) == labels).mean()),
                          "t2i_r1": float((labels[sim.argmax(0)] == np.arange(len(PROMPTS))).mean())}
    out["min cosine int8 vs fp32"] = float(np.sum(vectors["fp32"] * vectors["int8"], axis=1).min())
    return out


def session_starts(folder: Path, size: int, n: int) -> dict:
    """Median session start + first run, in fresh processes, of the saved graphs vs ENABLE_ALL copies."""
    import onnxruntime as ort

    from retrieval.onnx_runtime import _session_options

    work = Path(tempfile.mkdtemp(prefix="bench-int8-sessions-"))
    variants = {}
    for tower in ("visual", "visual-int8"):
        saved = work / f"{tower}-all.onnx"
        opts = _session_options(ort, level="all", threads=None, prepack=True)
        opts.optimized_model_filepath = str(saved)
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", saved.name + ".data")
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(folder / f"{tower}.onnx"), opts, providers=["CPUExecutionProvider"])
        variants[f"{tower}: saved EXTENDED graph, ENABLE_ALL at load (as now)"] = (folder / f"{tower}.onnx", "all")
        variants[f"{tower}: ENABLE_ALL graph saved, optimizer off at load"] = (saved, "disable")
    code = SESSION_CODE.format(repo=str(REPO))
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    for r in range(n):
        for name, (path, level) in variants.items() if r % 2 == 0 else reversed(list(variants.items())):
            done = subprocess.run([sys.executable, "-c", code, str(path), level, str(size)],
                                  capture_output=True, text=True, check=True)
            times[name].append(tuple(float(v) for v in done.stdout.split()))
    return {name: {"session_s": statistics.median(t[0] for t in v), "first_run_s": statistics.median(t[1] for t in v)}
            for name, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="shapes-mini,ViT-B-32,ViT-B-32-256")
    ap.add_argument("--cache", type=Path, help="MMSEARCH_CACHE (default: a new temporary folder: exports made here)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--sessions", type=int, default=0, help="fresh-process session starts per variant (0: skip)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    os.environ["MMSEARCH_CACHE"] = str(args.cache or tempfile.mkdtemp(prefix="bench-int8-cache-"))
    os.environ.setdefault("MMSEARCH_OFFLINE", "1")
    from retrieval.encoder import load_encoder

    results = {"load_start": loadavg(), "command": " ".join([Path(sys.executable).name, *sys.argv]), "models": {}}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        t0 = time.perf_counter()
        encoder = load_encoder(name, None if name == "shapes-mini" else "random", "cpu")
        entry: dict = {"load_or_export_s": time.perf_counter() - t0, "gate": encoder.int8_gate}
        log(f"{name}: gate {json.dumps(encoder.int8_gate)}")
        if (encoder.int8_gate or {}).get("kept"):
            entry["images_per_s"] = speeds(encoder, args.rounds)
            if name == "shapes-mini":
                entry["held_out_500"] = shapes_held_out(encoder)
            if args.sessions:
                entry["session_start"] = session_starts(encoder.onnx.export_dir, encoder.onnx.image_size, args.sessions)
        results["models"][name] = entry
        print(json.dumps({name: entry}, indent=1), flush=True)
    results["load_end"] = loadavg()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

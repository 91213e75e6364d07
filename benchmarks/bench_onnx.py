"""Measure the ONNX (onnxruntime) path against torch, for benchmarks/RESULTS-onnx.md.

    .venv/bin/python benchmarks/bench_onnx.py [--dir /tmp/mmsearch-onnx-bench] [--repeat 3] [--quant]
                                              [--threads 2,1] [--skip query,session,throughput]

Random-weight open_clip models (no download): ViT-B-32 (text + visual, 224 px) and ViT-B-32-256
(visual, 256 px), exported once into --dir with retrieval.onnx_export.export_towers.

1. query start: fresh processes, alternating, --repeat times each (median reported):
   onnx  = import retrieval.onnx_runtime + OnnxEncoder + embed_texts(one query)
   torch = import torch, open_clip + create_model + tokenize + encode_text
2. text session start variants (fresh processes, alternating): the standard ONNX graph with
   weights inline vs in an external data file, weight pre-packing on/off, and the graph saved
   already optimized by onnxruntime (optimized_model_filepath, what export_towers ships) loaded
   with optimizations off ("second start").
3. throughput in one process, alternating torch / onnxruntime, batch 32 random normalized pixels:
   visual ViT-B-32 224 px and ViT-B-32-256 256 px; text ViT-B-32 batch 64 short captions;
   cosine of each row to torch, for each --threads count (torch.set_num_threads and onnxruntime
   intra-op threads alike). --quant adds int8 dynamic quantization (onnxruntime.quantization).

Prints a summary and writes --json (default <dir>/results.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_index import loadavg, log  # noqa: E402  (one copy of the benchmark helpers)

QUERY = "a photo of a dog playing in the snow"
CAPTIONS = [
    "a photo of a dog", "two cats sleeping on a red sofa", "a plate of pasta with tomato sauce",
    "a man riding a bicycle down a busy street", "sunset over the mountains", "a red circle",
    "children playing football in a park", "an old car parked in front of a house",
]




# ------------------------------------------------------------------------------------------
# exports
# ------------------------------------------------------------------------------------------
def ensure_exports(base: Path) -> dict:
    """Export ViT-B-32 (text+visual) and ViT-B-32-256 (visual) once; seed 0 random weights."""
    out = {}
    todo = [("ViT-B-32", 224, ("text", "visual")), ("ViT-B-32-256", 256, ("visual",))]
    for arch, size, towers in todo:
        d = base / arch
        if (d / "export.json").is_file():
            meta = json.loads((d / "export.json").read_text())
            out[arch] = {"dir": str(d), "export_s": meta.get("bench_export_s"), "cached": True}
            continue
        import open_clip
        import torch

        from retrieval.onnx_export import export_towers

        torch.manual_seed(0)
        model = open_clip.create_model(arch, pretrained=None).eval()
        log(f"exporting {arch} {towers} ...")
        t0 = time.perf_counter()
        export_towers(model, d, context_length=77, image_size=size, towers=towers,
                      meta={"arch": arch, "pretrained": None, "seed": 0})
        dt = time.perf_counter() - t0
        meta = json.loads((d / "export.json").read_text())
        meta["bench_export_s"] = round(dt, 1)
        (d / "export.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        out[arch] = {"dir": str(d), "export_s": round(dt, 1), "cached": False}
    for arch in out:
        d = Path(out[arch]["dir"])
        out[arch]["files_mb"] = {p.name: round(p.stat().st_size / 1e6, 1) for p in sorted(d.iterdir())}
        meta = json.loads((d / "export.json").read_text())
        out[arch]["export_seconds_per_tower"] = {t: v.get("export_seconds") for t, v in meta["towers"].items()}
        out[arch]["min_cosine_at_export"] = {t: v.get("min_cosine_vs_torch") for t, v in meta["towers"].items()}
    return out


# ------------------------------------------------------------------------------------------
# 1. query start in fresh processes
# ------------------------------------------------------------------------------------------
ONNX_QUERY = """
import time, json, sys
t0 = time.perf_counter()
from pathlib import Path
import retrieval  # the package __init__ (store, sqlalchemy, ...) is not part of this module
tp = time.perf_counter()
from retrieval.onnx_runtime import OnnxEncoder
t1 = time.perf_counter()
enc = OnnxEncoder(Path({dir!r}))
tok = enc.tokenizer
ta = time.perf_counter()
v = enc.embed_texts([{q!r}])
t2 = time.perf_counter()
print(json.dumps({{"import_retrieval_pkg": tp - t0, "import_onnx_runtime": t1 - tp,
                  "tokenizer_load": ta - t1, "ort_import_session_embed": t2 - ta,
                  "import": t1 - t0, "load_and_embed": t2 - t1, "torch_loaded": "torch" in sys.modules}}))
"""

TORCH_QUERY = """
import time, json
t0 = time.perf_counter()
import torch, open_clip
t1 = time.perf_counter()
torch.manual_seed(0)
model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
tok = open_clip.get_tokenizer("ViT-B-32")
t2 = time.perf_counter()
with torch.no_grad():
    v = model.encode_text(tok([{q!r}]), normalize=True)
t3 = time.perf_counter()
print(json.dumps({{"import": t1 - t0, "create_model": t2 - t1, "embed": t3 - t2}}))
"""


def run_child(code: str) -> tuple[float, dict]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return wall, json.loads(proc.stdout.strip().splitlines()[-1])


def bench_query_start(export_dir: Path, repeat: int) -> dict:
    runs = {"onnx": [], "torch": [], "python_startup_only": []}
    for i in range(repeat):
        for kind, tmpl in (("onnx", ONNX_QUERY), ("torch", TORCH_QUERY),
                           ("python_startup_only", "import json; print(json.dumps({{}}))")):
            wall, parts = run_child(tmpl.format(dir=str(export_dir), q=QUERY))
            parts["wall"] = wall
            runs[kind].append(parts)
            log(f"query start {kind} #{i + 1}: wall {wall:.2f} s {parts}")
    return {k: _medians(v) | {"runs_wall": [round(r["wall"], 3) for r in v]} for k, v in runs.items()}


def _medians(rows: list[dict]) -> dict:
    keys = [k for k in rows[0] if isinstance(rows[0][k], float)]
    out = {k: round(statistics.median(r[k] for r in rows), 3) for k in keys}
    for k in rows[0]:
        if not isinstance(rows[0][k], float):
            out[k] = rows[0][k]
    return out


# ------------------------------------------------------------------------------------------
# 2. text session start variants
# ------------------------------------------------------------------------------------------
SESSION_CHILD = """
import time, json
t0 = time.perf_counter()
import numpy as np, onnxruntime as ort
t1 = time.perf_counter()
so = ort.SessionOptions()
so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, {level!r})
so.inter_op_num_threads = 1
so.log_severity_level = 3
for k, v in {entries!r}.items():
    so.add_session_config_entry(k, v)
if {save!r}:
    so.optimized_model_filepath = {save!r}
s = ort.InferenceSession({path!r}, so, providers=["CPUExecutionProvider"])
t2 = time.perf_counter()
ids = np.array([[49406, 320, 1125, 539, 320, 1929, 49407]], np.int64)  # "a photo of a dog"
s.run(None, {{s.get_inputs()[0].name: ids}})
t3 = time.perf_counter()
s.run(None, {{s.get_inputs()[0].name: ids}})
t4 = time.perf_counter()
print(json.dumps({{"import_ort": t1 - t0, "session": t2 - t1, "first_run": t3 - t2, "second_run": t4 - t3}}))
"""


def _standard_text_graph(work: Path) -> Path:
    """The text tower as torch exports it (standard ONNX ops, weights inline), before the
    onnxruntime optimization that export_towers applies: the baseline for the start-up variants."""
    raw = work / "text.standard-inline.onnx"
    if raw.exists():
        return raw
    import open_clip
    import torch

    from retrieval import onnx_export as ob

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    text_tower, _, attention = ob._make_towers()
    wrapper = text_tower(model, True).eval()
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 1929, 49407]] * 2)
    torch.backends.mha.set_fastpath_enabled(False)
    with torch.no_grad(), ob._quiet_export(), ob._swapped_attention(model, attention, True):
        torch.onnx.export(wrapper, (ids,), str(raw), input_names=["tokens"], output_names=["embedding"],
                          dynamic_axes={"tokens": {0: "n", 1: "length"}, "embedding": {0: "n"}},
                          opset_version=17, dynamo=False)
    return raw


def bench_session_variants(export_dir: Path, work: Path, repeat: int) -> dict:
    import onnx

    work.mkdir(parents=True, exist_ok=True)
    inline = _standard_text_graph(work)
    external = work / "text.standard-external.onnx"
    if not external.exists():
        onnx.save_model(onnx.load(str(inline)), str(external), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=external.name + ".data", size_threshold=1024)
    shipped = export_dir / "text.onnx"  # what export_towers writes: ORT-optimized (EXTENDED) + external data
    # what it costs a first process to optimize and save (export_towers pays it once, at export)
    opt = work / "text.saved-by-first-process.onnx"
    for f in (opt, work / (opt.name + ".data")):
        if f.exists():
            f.unlink()
    opt_entries = {
        "session.optimized_model_external_initializers_file_name": opt.name + ".data",
        "session.optimized_model_external_initializers_min_size_in_bytes": "1024",
    }
    _, first = run_child(SESSION_CHILD.format(level="ORT_ENABLE_EXTENDED", entries=opt_entries, save=str(opt),
                                              path=str(external)))
    nopp = {"session.disable_prepacking": "1"}
    variants = {
        "standard graph, weights inline, ENABLE_ALL, prepack": ("ORT_ENABLE_ALL", {}, inline),
        "standard graph, external data, ENABLE_ALL, prepack": ("ORT_ENABLE_ALL", {}, external),
        "standard graph, external data, ENABLE_ALL, no prepack": ("ORT_ENABLE_ALL", nopp, external),
        "saved optimized graph (as exported), DISABLE_ALL, prepack": ("ORT_DISABLE_ALL", {}, shipped),
        "saved optimized graph (as exported), DISABLE_ALL, no prepack [query path]":
            ("ORT_DISABLE_ALL", nopp, shipped),
        "saved optimized graph (as exported), ENABLE_ALL, no prepack": ("ORT_ENABLE_ALL", nopp, shipped),
    }
    runs: dict[str, list] = {k: [] for k in variants}
    for i in range(repeat):
        for name, (level, entries, path) in variants.items():
            _, parts = run_child(SESSION_CHILD.format(level=level, entries=entries, save="", path=str(path)))
            runs[name].append(parts)
        log(f"session variants round {i + 1}/{repeat} done (load {loadavg()})")
    out = {k: _medians(v) for k, v in runs.items()}
    for v in out.values():
        v["session_plus_first_run"] = round(v["session"] + v["first_run"], 3)
    out["first process that optimizes and saves (EXTENDED)"] = {k: round(v, 3) for k, v in first.items()}
    out["_files_mb"] = {p.name: round(p.stat().st_size / 1e6, 1) for p in sorted(work.iterdir())}
    return out


# ------------------------------------------------------------------------------------------
# 3. throughput
# ------------------------------------------------------------------------------------------
def _timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bench_throughput(exports: dict, repeat: int, quant: bool, work: Path, threads: list[int]) -> dict:
    results: dict = {}
    for n in threads:
        results[f"threads={n}"] = _bench_throughput(exports, repeat, quant and n == threads[0], work, n)
    return results


def _bench_throughput(exports: dict, repeat: int, quant: bool, work: Path, threads: int) -> dict:
    import open_clip
    import torch

    from retrieval.onnx_runtime import OnnxEncoder

    torch.set_num_threads(threads)
    results = {"torch_threads": torch.get_num_threads(), "onnxruntime_intra_op_threads": threads}
    for arch, size in (("ViT-B-32", 224), ("ViT-B-32-256", 256)):
        torch.manual_seed(0)
        model = open_clip.create_model(arch, pretrained=None).eval()
        enc = OnnxEncoder(Path(exports[arch]["dir"]), threads=threads)
        pixels = torch.randn(32, 3, size, size, generator=torch.Generator().manual_seed(1))
        px = pixels.numpy()
        with torch.no_grad():
            ref = model.encode_image(pixels, normalize=True).numpy()
        got = enc.embed_pixels(px)  # warm-up + session creation
        cos = (ref * got).sum(axis=1)
        t_torch, t_ort = [], []
        for _ in range(repeat):  # alternate so that background load hits both alike
            with torch.no_grad():
                t_torch += _timed(lambda: model.encode_image(pixels, normalize=True), 1)
            t_ort += _timed(lambda: enc.embed_pixels(px), 1)
        row = {
            "batch": 32, "size": size,
            "torch_fp32_img_s": round(32 / statistics.median(t_torch), 1),
            "onnxruntime_img_s": round(32 / statistics.median(t_ort), 1),
            "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
            "torch_batch_s": [round(t, 2) for t in t_torch], "ort_batch_s": [round(t, 2) for t in t_ort],
        }
        if quant:
            row |= _bench_int8(Path(exports[arch]["dir"]), "visual", px, ref, repeat, work / arch)
        results[f"visual {arch}"] = row
        log(f"threads={threads} visual {arch}: {row}")

        if arch == "ViT-B-32":
            texts = (CAPTIONS * 8)[:64]
            tok = open_clip.get_tokenizer(arch)
            ids = tok(texts)
            with torch.no_grad():
                tref = model.encode_text(ids, normalize=True).numpy()
            tgot = enc.embed_texts(texts)  # warm-up (bulk: pre-packed session)
            tcos = (tref * tgot).sum(axis=1)
            tt, to = [], []
            for _ in range(repeat):
                with torch.no_grad():
                    tt += _timed(lambda: model.encode_text(tok(texts), normalize=True), 1)
                to += _timed(lambda: enc.embed_texts(texts), 1)
            qt, qo = [], []
            with torch.no_grad():
                model.encode_text(tok([QUERY]))
            enc.embed_texts([QUERY])
            for _ in range(5):
                with torch.no_grad():
                    qt += _timed(lambda: model.encode_text(tok([QUERY]), normalize=True), 1)
                qo += _timed(lambda: enc.embed_texts([QUERY]), 1)
            trow = {
                "batch": 64, "tokens_incl_sot_eot": int((ids != 0).sum(1).max()),
                "torch_fp32_texts_s": round(64 / statistics.median(tt), 1),
                "onnxruntime_texts_s": round(64 / statistics.median(to), 1),
                "one_query_torch_ms": round(1000 * statistics.median(qt), 1),
                "one_query_onnxruntime_ms": round(1000 * statistics.median(qo), 1),
                "cosine_min": float(tcos.min()),
            }
            if quant:
                trow |= _bench_int8(Path(exports[arch]["dir"]), "text", enc.tokenizer(texts), tref, repeat,
                                    work / arch)
            results["text ViT-B-32"] = trow
            log(f"threads={threads} text {arch}: {trow}")
        del model, enc
    return results


def _bench_int8(export_dir: Path, tower: str, inputs, ref, repeat: int, work: Path) -> dict:
    """int8 dynamic quantization (weights int8, activations quantized on the fly)."""
    import numpy as np
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    work.mkdir(parents=True, exist_ok=True)
    q = work / f"{tower}.int8.onnx"
    if not q.exists():
        t0 = time.perf_counter()
        import onnx

        try:  # the exported graph holds onnxruntime contrib ops: tell the quantizer their type
            quantize_dynamic(str(export_dir / f"{tower}.onnx"), str(q), weight_type=QuantType.QInt8,
                             use_external_data_format=True,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        except Exception as exc:  # report, do not abort the whole run
            log(f"int8 quantization of {tower} failed: {exc}")
            return {"int8_error": str(exc).splitlines()[0][:200]}
        log(f"quantized {tower} in {time.perf_counter() - t0:.1f} s")
    sess = ort.InferenceSession(str(q), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    if tower == "text":
        nz = np.flatnonzero(inputs.any(axis=0))
        inputs = inputs[:, : int(nz[-1]) + 1]
    out = sess.run(None, {name: inputs})[0]
    out = out / np.linalg.norm(out, axis=1, keepdims=True)
    cos = (out * ref).sum(axis=1)
    ts = _timed(lambda: sess.run(None, {name: inputs}), repeat)
    n = inputs.shape[0]
    return {
        "int8_per_s": round(n / statistics.median(ts), 1),
        "int8_cosine_min": float(cos.min()),
        "int8_mb": round(sum(p.stat().st_size for p in work.glob(f"{tower}.int8.onnx*")) / 1e6, 1),
    }


# ------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/mmsearch-onnx-bench"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quant", action="store_true", help="also measure int8 dynamic quantization")
    ap.add_argument("--threads", default="2,1",
                    help="comma list of thread counts for the throughput section (torch and onnxruntime alike)")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: query,session,throughput")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    import numpy
    import onnxruntime

    report: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs, {platform.python_version()}",
        "versions": {"onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__},
        "loadavg_start": loadavg(),
    }
    path = args.json or (args.dir / "results.json")
    args.dir.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        path.write_text(json.dumps(report, indent=2) + "\n")

    report["exports"] = ensure_exports(args.dir)
    save()
    b32 = Path(report["exports"]["ViT-B-32"]["dir"])
    if "query" not in skip:
        report["query_start"] = bench_query_start(b32, args.repeat)
        save()
    if "session" not in skip:
        report["text_session_start"] = bench_session_variants(b32, args.dir / "variants", max(args.repeat, 5))
        save()
    if "throughput" not in skip:
        report["throughput"] = bench_throughput(report["exports"], args.repeat, args.quant, args.dir / "quant",
                                                [int(t) for t in args.threads.split(",")])
    report["loadavg_end"] = loadavg()
    save()
    print(json.dumps(report, indent=2))
    log(f"wrote {path}")


if __name__ == "__main__":
    main()

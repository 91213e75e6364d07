"""Indexing speed, side by side in one run: the naive open_clip loop, `mmsearch index`, and rclip.

    .venv/bin/python benchmarks/bench_index.py [--n 200] [--device auto|cpu|cuda] [--model ViT-B-32[,ViT-B-32-256]]
        [--batch-size 64] [--workers auto|0,1,2] [--backend auto|torch|onnx[,...]] [--repeat 1]
        [--gpu-decode auto|on|off[,...]] [--unique U] [--naive-n N]
        [--rclip .peers/rclip/venv/bin/rclip] [--json out.json]
    .venv/bin/python benchmarks/bench_index.py --whole-process --n 75 --model ViT-B-32-256 --precision auto,fp32 \\
        --repeat 4 --rclip .peers/rclip/venv/bin/rclip

Photos: --n photo-like JPEGs (smooth noise, gradients, blurred shapes, grain; --photo-size 1280x960,
quality 90, about 350 KB each), generated once, deterministically, into a cache outside git
(--cache, default $MMSEARCH_BENCH_DIR or ~/.cache/mmsearch-bench); each run indexes a folder of
hard links holding exactly --n of them (cycling over --unique distinct ones, when given: a GPU
needs thousands, slow to generate), read once beforehand so every contender finds them in
the page cache. Random weights everywhere (no download): only the timings mean anything.

Contenders, for each --model, in turn (--repeat rounds, alternating; medians reported):
  naive    PIL.Image.open -> the model's own open_clip `preprocess` -> torch.stack -> .to(device)
           -> encode_image, one batch at a time, no workers (fp16 autocast on cuda, like mmsearch,
           so the ratio measures the ingest pipeline, not the precision).
  mmsearch retrieval.open_index(tmpdir, model=..., pretrained="random", device=..., backend=...)
           .add([folder], workers=..., batch_size=...), i.e. `mmsearch index`, once per --workers value
           and --backend (auto: onnxruntime on cpu, torch fp16 on cuda) and --precision. The model is loaded (on cpu,
           exported to ONNX once, into the user cache) before the clock starts, as for naive; the scan,
           decoder start, database and vector cache are timed. Breakdown from IndexReport.timings.
           --gpu-decode sets MMSEARCH_GPU_DECODE for it (retrieval/gpu_decode.py): auto = JPEGs decoded
           in batches by nvJPEG on cuda, by PIL on cpu; on = torchvision's decoder on the model's device
           (on cpu too: to show it is no default there); off = PIL in the decoders.
  rclip    (--rclip BIN, optional) a fresh rclip index of the same folder (its own ViT-B-32-256 via
           onnxruntime), in a private RCLIP_DATADIR linking the model files: the time of
           `rclip -t 5 QUERY` with an empty database, minus a query-only run (`-n`) on the built
           index, so rclip's start and model load are not counted either.

--whole-process: whole `mmsearch index` processes, start to exit, alternated with whole `rclip` processes
(a fresh index each time, same folder, --repeat rounds, ABBA order), each started by this script and timed
from spawn to exit, its peak resident memory taken from the kernel (wait4 rusage, ru_maxrss). mmsearch runs
`python cli.py index FOLDER --index NEW --model M --pretrained random --device cpu -q --no-ocr --precision P`
for each --precision value (auto,fp32); --no-ocr because rclip reads no text in images, while mmsearch's
default (MMSEARCH_OCR=auto) runs Tesseract on every image where it is installed. Its ONNX export is made
once beforehand (untimed), in --model-cache, as a user's second run finds it. rclip runs `rclip -t 5 QUERY`
on an empty database: it indexes, then answers one query (rclip cannot index without querying). After the
runs, every vector stored by the last mmsearch index of each precision is compared with the open_clip
reference (PIL decode + the model's own preprocess + encode_image in torch, same seeded random weights):
min cosine reported.

Where the time goes: naive = decode+preprocess / host->device / model (synchronized per batch);
mmsearch = decode (summed over the decoders, which run beside the model) / waiting for decoders /
embed (stack + transfer + model; split with a separate transfer measurement) / database (commit +
vector cache) / other (scan, diff, decoder start). "model only" is images/s of the encoder alone on
ready pixels: the ceiling for this machine.

On the GPU `device` machine (an H200 with 16 cores; torch with CUDA is there, nothing can be downloaded there):
  0. see what it lacks (one short run): python -V; python -c "import torch; print(torch.__version__)"; \\
       for m in torch torchvision open_clip faiss ftfy regex onnxruntime sqlalchemy click tqdm timm \\
       huggingface_hub safetensors PIL numpy; do python -c "import $m" 2>/dev/null || echo "missing $m"; done
  1. here, fetch wheels for its Python version (3.11 below) into the git-ignored .whl/ (carry limit 64 MiB):
       .venv/bin/pip download --no-deps --only-binary=:all: --python-version 3.11 -d .whl \\
           open_clip_torch faiss-cpu ftfy wcwidth regex onnxruntime   # + any other module step 0 found missing
     (torchvision, if missing: the release made for its torch, e.g. torchvision==0.29.1 for torch 2.14.1;
     PyPI's Linux wheels are CUDA builds, with nvJPEG)
  2. one command, run with carry=[".whl"], for issue 13's bar (ViT-B-32, 1280x960 JPEGs, >= 4,000 img/s and
     >= 5x the naive loop in the same run; the last line printed says whether it is met):
       pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \\
       PYTHONPATH=/tmp/site:. python benchmarks/bench_index.py --device cuda --model ViT-B-32 \\
           --n 8000 --unique 1000 --naive-n 1000 --batch-size 256 --workers 4,15 --gpu-decode on,off \\
           --repeat 2 --cache /tmp/bench --json $OUT/bench_index.json
     (generating 1000 photos takes about 30 s on 16 cores, the naive loop about 25 s per round at
     PIL's full-size decode; rclip is a CPU program, leave it out there. --model ViT-B-32,ViT-B-32-256
     times both towers.)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

QUERY = "a dog"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def loadavg() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


# ------------------------------------------------------------------------------------------
# photos
# ------------------------------------------------------------------------------------------
def make_photo(index: int, width: int, height: int):
    """A deterministic photo-like RGB image: smooth color fields, a gradient, blurred shapes, grain."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(1000 + index)
    w, h = (width, height) if index % 5 else (height, width)  # every fifth one in portrait

    def field(cell: int, amp: float) -> np.ndarray:
        small = rng.normal(0, amp, (max(2, h // cell), max(2, w // cell), 3)).astype(np.float32)
        planes = [np.asarray(Image.fromarray(small[..., c], "F").resize((w, h), Image.Resampling.BICUBIC))
                  for c in range(3)]
        return np.stack(planes, -1)

    base = rng.uniform(40, 210, 3).astype(np.float32)
    gradient = np.linspace(-1, 1, h, dtype=np.float32)[:, None, None] * rng.normal(0, 40, 3).astype(np.float32)
    img = Image.fromarray(np.clip(base + gradient + field(160, 35) + field(24, 12), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 12))):
        x0, y0, s = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(w // 20, w // 3))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse((x0 - s, y0 - s // 2, x0 + s, y0 + s // 2), fill=color)
        else:
            angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 7))))
            draw.polygon([(int(x0 + s * np.cos(a)), int(y0 + s * np.sin(a))) for a in angles], fill=color)
    img = img.filter(ImageFilter.GaussianBlur(1.2))
    grain = rng.normal(0, 5, (h, w, 1)).astype(np.float32) + field(3, 6)
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + grain, 0, 255).astype(np.uint8))


def _write_photo(job: tuple[int, int, int, int, str]) -> None:
    index, width, height, quality, path = job
    tmp = f"{path}.{os.getpid()}.tmp"
    make_photo(index, width, height).save(tmp, "JPEG", quality=quality)
    os.replace(tmp, path)


def ensure_photos(cache: Path, n: int, width: int, height: int, quality: int, unique: int | None = None) -> Path:
    """The folder holding n photos: hard links into the generated pool, to photos 0..n-1, or
    cycling over photos 0..unique-1 (decoding costs the same; generating them does not)."""
    pool = cache / f"photos-{width}x{height}-q{quality}"
    pool.mkdir(parents=True, exist_ok=True)
    unique = min(unique or n, n)
    names = [f"p{i:05d}.jpg" for i in range(n)]
    jobs = [(i, width, height, quality, str(pool / names[i])) for i in range(unique) if not (pool / names[i]).exists()]
    if jobs:
        log(f"generating {len(jobs)} photos {width}x{height} q{quality} into {pool} ...")
        t0 = time.perf_counter()
        procs = max(1, min(len(jobs), os.cpu_count() or 1))
        with multiprocessing.get_context("spawn").Pool(procs) as pool_:
            pool_.map(_write_photo, jobs, chunksize=4)
        log(f"  {time.perf_counter() - t0:.1f} s")
    folder = cache / (f"set-{width}x{height}-q{quality}-n{n}" + (f"-u{unique}" if unique < n else ""))
    if not folder.is_dir() or sorted(os.listdir(folder)) != names:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for i, name in enumerate(names):
            source = pool / names[i % unique]
            try:
                os.link(source, folder / name)
            except OSError:
                shutil.copy2(source, folder / name)
    for name in names:  # into the page cache: every contender reads warm files
        (folder / name).read_bytes()
    return folder


# ------------------------------------------------------------------------------------------
# contenders
# ------------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def load_naive(model_name: str, device: str):
    import open_clip
    import torch

    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None, device="cpu")
    return model.to(device).eval(), preprocess


def run_naive(model, preprocess, files: list[str], device: str, batch_size: int) -> dict:
    """The loop everyone writes first: PIL open -> preprocess -> encode_image, batch by batch."""
    import torch
    from PIL import Image

    autocast = torch.autocast("cuda", dtype=torch.float16) if device.startswith("cuda") else torch.autocast("cpu", enabled=False)
    t = {"decode": 0.0, "transfer": 0.0, "model": 0.0}
    out = []
    start = time.perf_counter()
    with torch.inference_mode(), autocast:
        for i in range(0, len(files), batch_size):
            t0 = time.perf_counter()
            batch = torch.stack([preprocess(Image.open(f)) for f in files[i : i + batch_size]])
            t1 = time.perf_counter()
            batch = batch.to(device)
            sync(device)
            t2 = time.perf_counter()
            out.append(model.encode_image(batch, normalize=True).float().cpu())
            t3 = time.perf_counter()
            t["decode"] += t1 - t0
            t["transfer"] += t2 - t1
            t["model"] += t3 - t2
    total = time.perf_counter() - start
    assert sum(len(o) for o in out) == len(files)
    return {"seconds": total, "ips": len(files) / total, "breakdown": t}


def run_mmsearch(model_name: str, folder: Path, device: str, batch_size: int, workers: int | None, n: int,
                 backend: str, precision: str = "auto", gpu_decode: str = "auto") -> dict:
    import retrieval
    from retrieval.gpu_decode import SETTING

    os.environ[SETTING] = gpu_decode
    with tempfile.TemporaryDirectory(prefix="mmsearch-bench-index-") as tmp:
        with retrieval.open_index(tmp, model=model_name, pretrained="random", device=device, backend=backend,
                                  precision=precision) as idx:
            encoder = idx.encoder  # loaded (and on CPU exported to ONNX, once) before the clock starts, as for naive
            start = time.perf_counter()
            report = idx.add([folder], workers=workers, batch_size=batch_size, ocr=False)  # rclip reads no text either
            total = time.perf_counter() - start
            images = idx.info()["images"]
    assert report.added == n and images == n, (report.summary(), images)
    return {"seconds": total, "ips": n / total, "breakdown": dict(report.timings), "encoder": encoder}


def model_only(encoder, batch_size: int, device: str, rounds: int = 2) -> dict:
    """Images/s of encoder.embed_pixels on ready uint8 pixels, and the host->device copy alone."""
    import numpy as np
    import torch

    size = encoder.geometry.size
    pixels = np.random.default_rng(0).integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
    encoder.embed_pixels(pixels[:2])  # warm
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        encoder.embed_pixels(pixels)
        times.append(time.perf_counter() - t0)
    transfer = 0.0
    if device.startswith("cuda"):
        tt = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            torch.from_numpy(pixels).pin_memory().to(device, non_blocking=True)
            torch.cuda.synchronize()
            tt.append(time.perf_counter() - t0)
        transfer = statistics.median(tt) / batch_size
    per_image = statistics.median(times) / batch_size
    return {"ips": 1.0 / per_image, "s_per_image": per_image, "transfer_s_per_image": transfer}


def rclip_datadir(rclip_bin: Path, data: Path | None) -> Path:
    return data.expanduser().absolute() if data else rclip_bin.parent.parent.parent / "data"


def run_rclip(rclip_bin: Path, data: Path, folder: Path, n: int) -> dict:
    """A fresh rclip index of `folder` (net of rclip's start + model load + one query)."""
    with tempfile.TemporaryDirectory(prefix="rclip-bench-") as tmp:
        for entry in data.iterdir():  # the model files, not the database
            if entry.is_dir():
                os.symlink(entry, Path(tmp) / entry.name)
        env = {**os.environ, "RCLIP_DATADIR": tmp, "HF_HUB_OFFLINE": "1"}
        cmd = [str(rclip_bin), "-t", "5", QUERY]

        def timed(args: list[str]) -> float:
            t0 = time.perf_counter()
            done = subprocess.run(args, cwd=folder, env=env, capture_output=True, text=True)
            dt = time.perf_counter() - t0
            if done.returncode != 0:
                raise RuntimeError(f"rclip failed ({done.returncode}): {done.stderr[-2000:]}")
            return dt

        full = timed(cmd)
        query_only = timed([str(rclip_bin), "-n", "-t", "5", QUERY])
    net = max(full - query_only, 1e-9)
    return {"seconds": net, "ips": n / net, "breakdown": {"index_run": full, "query_only_run": query_only}}


# ------------------------------------------------------------------------------------------
# whole processes
# ------------------------------------------------------------------------------------------
def run_process(cmd: list[str], cwd: Path, env: dict[str, str]) -> dict:
    """Run one process to its exit: wall seconds, peak RSS (MB) and CPU seconds from the kernel."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # wait4 gives this child's own rusage (its peak RSS), not the sum over all children so far
    out, err = "", ""

    def drain() -> None:
        nonlocal out, err
        out, err = proc.stdout.read(), proc.stderr.read()

    reader = threading.Thread(target=drain)
    reader.start()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    reader.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed ({proc.returncode}): {err[-2000:]}")
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024, "cpu_s": usage.ru_utime + usage.ru_stime}


def mmsearch_cmd(folder: Path, index: Path, model: str, precision: str) -> list[str]:
    return [sys.executable, str(REPO / "cli.py"), "index", str(folder), "--index", str(index), "--model", model,
            "--pretrained", "random", "--device", "cpu", "-q", "--no-ocr", "--precision", precision]


def reference_min_cosine(index: Path, model: str) -> dict:
    """Min cosine of the stored image vectors to open_clip's own pipeline on the same files."""
    import numpy as np
    import torch
    from PIL import Image

    import retrieval

    with retrieval.open_index(index, create=False) as idx:
        ids, vecs = (np.concatenate(parts) for parts in zip(*idx.reader.vectors("image")))
        paths = [idx.reader.items(ids.tolist())[int(i)].path for i in ids]
        precision = idx.info()["precision"]
    model_, preprocess = load_naive(model, "cpu")
    ref = []
    with torch.inference_mode():
        for start in range(0, len(paths), 32):
            batch = torch.stack([preprocess(Image.open(p)) for p in paths[start : start + 32]])
            ref.append(model_.encode_image(batch, normalize=True).float().numpy())
    cos = np.sum(np.concatenate(ref) * vecs, axis=1)
    return {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()), "n": len(paths), "precision": precision}


def whole_process(args: argparse.Namespace, folder: Path) -> None:
    """--whole-process: see the module docstring."""
    model = args.model.split(",")[0]
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    cache = args.model_cache.expanduser().absolute()
    env = {**os.environ, "MMSEARCH_CACHE": str(cache), "MMSEARCH_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    work = Path(tempfile.mkdtemp(prefix="bench-whole-"))
    try:
        log(f"export (untimed, once) of {model} into {cache} ...")
        warm = run_process(mmsearch_cmd(folder, work / "warm", model, "auto"), REPO, env)
        log(f"  first run, export included: {warm['seconds']:.1f} s")
        contenders = [(f"mmsearch[{p}]", p) for p in precisions]
        if args.rclip:
            contenders.append(("rclip", None))
        runs: dict[str, list[dict]] = {}
        last_index: dict[str, Path] = {}
        for r in range(args.repeat):
            for name, precision in contenders if r % 2 == 0 else contenders[::-1]:
                target = work / f"{name}-{r}"
                if precision is None:
                    data = target / "rclip-data"
                    data.mkdir(parents=True)
                    for entry in rclip_datadir(args.rclip, args.rclip_data).iterdir():
                        if entry.is_dir():
                            os.symlink(entry, data / entry.name)
                    res = run_process([str(args.rclip), "-t", "5", QUERY], folder,
                                      {**env, "RCLIP_DATADIR": str(data)})
                else:
                    res = run_process(mmsearch_cmd(folder, target, model, precision), REPO, env)
                    last_index[name] = target
                res["round"], res["load"] = r, loadavg()
                runs.setdefault(name, []).append(res)
                log(f"  [{r}] {name:16s} {res['seconds']:6.2f} s  peak RSS {res['peak_rss_mb']:6.0f} MB  "
                    f"CPU {res['cpu_s']:5.1f} s  (load {res['load']})")
        fidelity = {name: reference_min_cosine(path, model) for name, path in last_index.items()}
        print(f"\n{model}: fresh index of {args.n} photos, whole process (start-up and model load included, "
              f"export cached, mmsearch with --no-ocr); medians over {args.repeat} rounds; ratios: median of per-round ratios to rclip")
        print(f"{'contender':16s} {'wall s':>7s} {'x rclip':>8s} {'peak RSS MB':>11s} {'x rclip':>8s} {'CPU s':>6s}  "
              "stored vectors vs open_clip")
        base = {r["round"]: r for r in runs.get("rclip", [])}
        for name, rs in runs.items():
            def ratio(key: str) -> str:
                vals = [x[key] / base[x["round"]][key] for x in rs if x["round"] in base]
                return f"{statistics.median(vals):.2f}" if vals else "-"

            fid = fidelity.get(name)
            shown = "-" if fid is None else f"min cos {fid['min_cosine']:.5f} over {fid['n']} ({fid['precision']['used']})"
            print(f"{name:16s} {statistics.median(x['seconds'] for x in rs):7.2f} {ratio('seconds'):>8s} "
                  f"{statistics.median(x['peak_rss_mb'] for x in rs):11.0f} {ratio('peak_rss_mb'):>8s} "
                  f"{statistics.median(x['cpu_s'] for x in rs):6.1f}  {shown}")
        if args.json:
            args.json.write_text(json.dumps({"env": {"load_end": loadavg(), "command": " ".join(sys.argv), "n": args.n,
                                                      "model": model}, "runs": runs, "fidelity": fidelity}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------
def parse_workers(value: str) -> list[int | None]:
    return [None if w.strip() == "auto" else int(w) for w in value.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="number of photos")
    ap.add_argument("--device", default="auto", help="auto|cpu|cuda")
    ap.add_argument("--model", default="ViT-B-32", help="comma-separated open_clip architectures (random weights)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", default="auto", help="comma-separated decode worker counts for mmsearch (auto: its default)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of all contenders, alternating (medians reported)")
    ap.add_argument("--rclip", type=Path, help="rclip executable (see ../shared/peers/rclip/setup) to time it too")
    ap.add_argument("--rclip-data", type=Path, help="its RCLIP_DATADIR with the model files (default: BIN/../../../data)")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--backend", default="auto",
                    help="comma-separated mmsearch backends: auto (onnxruntime on cpu, torch on cuda), torch, onnx;"
                         " all --workers values run with the first, the others with the first --workers value only")
    ap.add_argument("--gpu-decode", default="auto",
                    help="comma-separated MMSEARCH_GPU_DECODE values for mmsearch: auto (JPEGs decoded on the GPU on"
                         " cuda, by PIL on cpu), on (torchvision's decoder on the model's device, cpu included), off"
                         " (PIL); the first --backend and --precision run every --workers x --gpu-decode pair")
    ap.add_argument("--unique", type=int, help="generate only this many distinct photos; the --n files cycle over them")
    ap.add_argument("--naive-n", type=int, help="the naive loop embeds only the first NAIVE_N photos (its img/s is per image)")
    ap.add_argument("--photo-size", default="1280x960")
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("MMSEARCH_BENCH_DIR", "~/.cache/mmsearch-bench")).expanduser())
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--whole-process", action="store_true",
                    help="time whole `mmsearch index` and `rclip` processes, start to exit (see above)")
    ap.add_argument("--precision", default="auto", help="comma-separated mmsearch precisions (auto, fp32, int8)")
    ap.add_argument("--model-cache", type=Path, default=Path(tempfile.gettempdir()) / "mmsearch-bench-model-cache",
                    help="--whole-process: MMSEARCH_CACHE of the mmsearch processes (their ONNX exports)")
    args = ap.parse_args()

    width, height = (int(x) for x in args.photo_size.lower().split("x"))
    folder = ensure_photos(args.cache, args.n, width, height, args.quality, args.unique)
    if args.rclip:
        args.rclip = args.rclip.expanduser().absolute()
    if args.whole_process:
        log(json.dumps({"n": args.n, "load_start": loadavg(), "command": " ".join(sys.argv)}))
        whole_process(args, folder)
        return
    files = sorted(str(p) for p in folder.iterdir())
    mean_kb = sum(os.path.getsize(f) for f in files) / len(files) / 1024

    import torch

    from retrieval.encoder import pick_device
    from retrieval.indexer import default_workers

    device = pick_device(args.device)
    workers_list = parse_workers(args.workers)
    models = [m.strip() for m in args.model.split(",") if m.strip()]
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    decodes = [d.strip() for d in args.gpu_decode.split(",") if d.strip()]
    naive_files = files[: args.naive_n or len(files)]
    env = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, torch {torch.__version__}"
                   f", {torch.get_num_threads()} torch threads",
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
        "device": device, "n": args.n, "unique": args.unique or args.n, "naive_n": len(naive_files),
        "photos": f"{width}x{height} q{args.quality}, {mean_kb:.0f} KB mean",
        "batch_size": args.batch_size, "default_workers": default_workers(), "load_start": loadavg(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    log(json.dumps(env))
    results: dict = {"env": env, "models": {}}
    rclip_data = rclip_datadir(args.rclip, args.rclip_data) if args.rclip else None

    for model_name in models:
        runs: dict[str, list[dict]] = {}
        log(f"== {model_name} on {device}, {args.n} photos, batch {args.batch_size}")
        naive = None if args.skip_naive else load_naive(model_name, device)
        encoders: dict = {}
        if naive:  # warm-up (first-call allocations), untimed
            run_naive(*naive, files[: min(len(files), 4)], device, args.batch_size)
        contenders = []  # (name, run()) in the order of even rounds; odd rounds run them reversed
        if naive:
            contenders.append(("naive", lambda: run_naive(*naive, naive_files, device, args.batch_size)))
        combos = [(b, p) for b in backends for p in precisions]
        for ci, (backend, precision) in enumerate(combos):
            for w in workers_list if ci == 0 else workers_list[:1]:  # other combinations: first --workers only
                for dec in decodes if ci == 0 else decodes[:1]:
                    name = f"mmsearch[{backend}-{precision}] workers={'auto=' + str(default_workers()) if w is None else w}"
                    name += f" gpu-decode={dec}" if len(decodes) > 1 or dec != "auto" else ""
                    contenders.append((name, lambda w=w, backend=backend, precision=precision, dec=dec: run_mmsearch(
                        model_name, folder, device, args.batch_size, w, args.n, backend, precision, dec)))
        if args.rclip and model_name == "ViT-B-32-256":
            contenders.append(("rclip", lambda: run_rclip(args.rclip, rclip_data, folder, args.n)))
        for r in range(args.repeat):
            for name, run in contenders if r % 2 == 0 else contenders[::-1]:  # ABBA: cancels a drifting load
                res = run()
                encoder = res.pop("encoder", None)
                if encoder is not None:
                    picked = f"{encoder.backend}-{encoder.precision}"  # auto -> what it picked
                    name = f"mmsearch[{picked}{name[name.index(']'):]}"
                    encoders[picked] = encoder
                res["round"], res["load"] = r, loadavg()
                runs.setdefault(name, []).append(res)
                log(f"  [{r}] {name:34s} {res['ips']:7.1f} img/s  (load {res['load']})")
        ceilings = {f"mmsearch[{b}]": model_only(e, args.batch_size, device) for b, e in encoders.items()}
        del naive, encoders
        results["models"][model_name] = {"runs": runs, "model_only": ceilings}
        print_table(model_name, runs, ceilings, args.n)
        if device.startswith("cuda"):
            print_gpu_bar(runs)
    results["env"]["load_end"] = loadavg()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=float))
        log(f"wrote {args.json}")


def median_run(runs: list[dict]) -> dict:
    """The run of median speed (the lower middle one for an even count)."""
    ordered = sorted(runs, key=lambda r: r["ips"])
    return ordered[(len(ordered) - 1) // 2]


def round_ratio(runs: list[dict], base: list[dict] | None) -> str:
    """Median over rounds of (this img/s / base img/s in the same round)."""
    if not base:
        return "-"
    by_round = {b["round"]: b["ips"] for b in base}
    ratios = [r["ips"] / by_round[r["round"]] for r in runs if r["round"] in by_round]
    return f"{statistics.median(ratios):.2f}" if ratios else "-"


def print_table(model_name: str, runs: dict[str, list[dict]], ceilings: dict[str, dict | None], n: int) -> None:
    print(f"\n{model_name}: {n} photos; img/s: median run; x naive, x rclip: median of the per-round ratios")
    w = max([34, *map(len, runs)])
    print(f"{'contender':{w}s} {'img/s':>6s} {'x naive':>7s} {'x rclip':>7s}  {'all runs (img/s)':24s} where the time goes (s)")
    for name, rs in runs.items():
        m = median_run(rs)
        every = ", ".join(f"{r['ips']:.1f}" for r in rs)
        print(f"{name:{w}s} {m['ips']:6.1f} {round_ratio(rs, runs.get('naive')):>7s} {round_ratio(rs, runs.get('rclip')):>7s}"
              f"  {every:24s} {describe(name, m, ceilings.get(name.split()[0]))}")
    for key, ceiling in ceilings.items():
        if ceiling:
            print(f"{key + ' model only':{w}s} {ceiling['ips']:6.1f}                  embed_pixels on ready pixels "
                  "(measured after the runs)"
                  + (f", host->device {ceiling['transfer_s_per_image'] * 1e3:.2f} ms/img" if ceiling["transfer_s_per_image"] else ""))
    sys.stdout.flush()


#: Issue 13's bar for the GPU path (ViT-B-32, 1280x960 JPEGs): images/s, and times the naive loop in the same run.
GPU_BAR = (4000.0, 5.0)


def print_gpu_bar(runs: dict[str, list[dict]]) -> None:
    """Whether the fastest mmsearch contender meets GPU_BAR."""
    mine = {name: median_run(rs)["ips"] for name, rs in runs.items() if name.startswith("mmsearch")}
    if not mine:
        return
    best = max(mine, key=mine.__getitem__)
    ratio = round_ratio(runs[best], runs.get("naive"))
    met = mine[best] >= GPU_BAR[0] and ratio != "-" and float(ratio) >= GPU_BAR[1]
    print(f"GPU bar (>= {GPU_BAR[0]:.0f} img/s and >= {GPU_BAR[1]:.0f}x naive): {best}: {mine[best]:.0f} img/s, "
          f"{ratio}x naive -> {'met' if met else 'NOT met'}")


def describe(name: str, run: dict, ceiling: dict | None) -> str:
    b = run["breakdown"]
    total = run["seconds"]
    if name == "naive":
        return (f"total {total:.1f}: decode+preprocess {b['decode']:.1f}, transfer {b['transfer']:.1f}, "
                f"model {b['model']:.1f}; model alone {run['ips'] * total / max(b['model'], 1e-9):.1f} img/s")
    if name.startswith("mmsearch"):
        embed = b.get("embed", 0.0)
        n = run["ips"] * total
        transfer = 0.0
        if ceiling and ceiling["transfer_s_per_image"]:
            transfer = min(embed, ceiling["transfer_s_per_image"] * n)
        device_decode = b.get("device_decode", 0.0)
        other = total - b.get("wait_decode", 0) - embed - b.get("database", 0) - device_decode
        return (f"total {total:.1f}: decode {b.get('decode', 0):.1f} (in the decoders, overlapped), waiting for "
                f"decode {b.get('wait_decode', 0):.1f}, "
                + (f"JPEG decode on the device {device_decode:.1f}, " if "device_decode" in b else "")
                + f"transfer {transfer:.1f}, model {embed - transfer:.1f}, "
                f"database {b.get('database', 0):.1f}, other {other:.1f}; model alone {n / max(embed - transfer, 1e-9):.1f} img/s")
    return f"index run {b['index_run']:.1f} - query-only run {b['query_only_run']:.1f}"


if __name__ == "__main__":
    main()

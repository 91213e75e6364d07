"""Beyond one machine, measured on this one: each --part times one cluster back end against the embedded default.

    .venv/bin/python benchmarks/bench_cluster.py --part ingest [--n 100,400] [--model ViT-B-32] [--repeat 3]
        [--batch-size 64] [--photo-size 1280x960] [--unique 32] [--json out.json]

--part ingest: images/s of `mmsearch index` (the local path: a decode thread or processes and the
model in one process) against `mmsearch index --ray local` (Ray Data: read + decode tasks, an
embedding actor, the driver committing; Ray started by the run and shut down at its end), as whole
processes, start to exit, each into a fresh index of the same photo-like JPEGs (bench_index.py's,
--unique distinct ones cycled over --n files, read once beforehand so both find them in the page
cache), the two alternated in ABBA order over --repeat rounds; random weights, the model's ONNX
export made once beforehand (untimed). Two folder sizes separate Ray's fixed cost (start-up,
actor and model load) from its per-image rate: marginal images/s = (n2 - n1) / (t2 - t1). CPU s: all
processes of the run (each is started in a session of its own, which Ray's processes inherit), so a
pipeline that spreads over more processes is not credited for taking more of a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_index import ensure_photos, loadavg, log  # noqa: E402 - the same photos


def _session_cpu(session: int, seen: dict[int, float]) -> None:
    """Record the CPU seconds (user + system) of every process of `session` now alive, into `seen` by pid."""
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session:  # field 6 of stat: the session id
            seen[int(entry)] = max(seen.get(int(entry), 0.0), (int(fields[11]) + int(fields[12])) / tick)


def run_session(cmd: list[str], cwd: Path, env: dict[str, str]) -> dict:
    """Run one process in a session of its own to its exit: wall seconds, and the CPU seconds of every
    process of that session (Ray's raylet, workers and actors too), sampled every 0.1 s (a process's
    last 0.1 s before it exits can be missed)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    seen: dict[int, float] = {}
    while proc.poll() is None:
        _session_cpu(proc.pid, seen)
        time.sleep(0.1)
    seconds = time.perf_counter() - t0
    err = proc.stderr.read()
    proc.stderr.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed ({proc.returncode}): {err[-2000:]}")
    _session_cpu(proc.pid, seen)  # what the session left behind (Ray processes still exiting)
    return {"seconds": seconds, "cpu_s": sum(seen.values()), "processes": len(seen)}


def index_cmd(folder: Path, index: Path, args: argparse.Namespace, ray: bool) -> list[str]:
    """A whole `mmsearch index` of `folder` into a new `index`, locally or on a local Ray."""
    return [sys.executable, str(REPO / "cli.py"), "index", str(folder), "--index", str(index), "--model", args.model,
            "--pretrained", "random", "--device", "cpu", "-q", "--batch-size", str(args.batch_size),
            *(["--ray", "local"] if ray else [])]


def part_ingest(args: argparse.Namespace) -> dict:
    """--part ingest: see the module docstring."""
    width, height = (int(v) for v in args.photo_size.split("x"))
    sizes = sorted(int(n) for n in args.n.split(","))
    folders = {n: ensure_photos(args.cache, n, width, height, 90, args.unique) for n in sizes}
    env = {**os.environ, "MMSEARCH_CACHE": str(args.model_cache), "MMSEARCH_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    work = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    contenders = [("local", False), ("ray", True)]
    runs: dict[str, dict[int, list[dict]]] = {name: {n: [] for n in sizes} for name, _ in contenders}
    try:
        log(f"export (untimed, once) of {args.model} into {args.model_cache} ...")
        run_session(index_cmd(folders[sizes[0]], work / "warm", args, ray=False), REPO, env)
        for r in range(args.repeat):
            for n in sizes:
                for name, ray in contenders if r % 2 == 0 else contenders[::-1]:
                    res = run_session(index_cmd(folders[n], work / f"{name}-{n}-{r}", args, ray), REPO, env)
                    res.update(round=r, load=loadavg(), images_per_s=n / res["seconds"])
                    runs[name][n].append(res)
                    log(f"  [{r}] {name:5s} n={n:5d} {res['seconds']:6.2f} s  {res['images_per_s']:6.1f} img/s  "
                        f"CPU {res['cpu_s']:6.1f} s in {res['processes']} processes  (load {res['load']})")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{args.model} (random weights, ONNX on the CPU), {width}x{height} JPEGs, whole `mmsearch index` "
          f"processes, medians over {args.repeat} rounds, {os.cpu_count()} cores ({platform.processor() or platform.machine()})")
    print(f"{'path':6s} " + " ".join(f"{f'n={n} s':>9s} {'img/s':>6s} {'CPU s':>6s}" for n in sizes)
          + "  marginal img/s  fixed s")
    summary = {}
    for name, by_n in runs.items():
        wall = {n: statistics.median(x["seconds"] for x in rs) for n, rs in by_n.items()}
        cpu = {n: statistics.median(x["cpu_s"] for x in rs) for n, rs in by_n.items()}
        marginal = fixed = None
        if len(sizes) > 1:
            lo, hi = sizes[0], sizes[-1]
            marginal = (hi - lo) / (wall[hi] - wall[lo]) if wall[hi] > wall[lo] else float("inf")
            fixed = wall[lo] - lo / marginal
        summary[name] = {"wall_s": wall, "cpu_s": cpu, "marginal_images_per_s": marginal, "fixed_s": fixed}
        cells = " ".join(f"{wall[n]:9.2f} {n / wall[n]:6.1f} {cpu[n]:6.1f}" for n in sizes)
        extra = f"  {marginal:14.1f}  {fixed:7.2f}" if marginal is not None else ""
        print(f"{name:6s} {cells}{extra}")
    ratio = {n: summary["local"]["wall_s"][n] / summary["ray"]["wall_s"][n] for n in sizes}
    print("ray / local images/s: " + ", ".join(f"n={n}: {v:.2f}x" for n, v in ratio.items()))
    return {"runs": runs, "summary": summary, "ratio": ratio}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", required=True, choices=["ingest"], help="which comparison to run")
    ap.add_argument("--n", default="100,400", help="comma-separated folder sizes (two give Ray's fixed cost)")
    ap.add_argument("--model", default="ViT-B-32", help="open_clip architecture (random weights)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3, help="rounds, alternating the contenders (medians reported)")
    ap.add_argument("--photo-size", default="1280x960")
    ap.add_argument("--unique", type=int, default=32, help="distinct photos generated; the files cycle over them")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("MMSEARCH_BENCH_DIR", "~/.cache/mmsearch-bench")).expanduser())
    ap.add_argument("--model-cache", type=Path, default=Path(tempfile.gettempdir()) / "mmsearch-bench-model-cache",
                    help="MMSEARCH_CACHE of the mmsearch processes (their ONNX exports)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_start = loadavg()
    result = {"ingest": part_ingest}[args.part](args)
    print(f"{started}, load average {load_start} at the start, {loadavg()} at the end; command: "
          f"{' '.join(sys.argv)}")
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "started": started, "load_start": load_start,
                                         "load_end": loadavg(), **result}, indent=1, default=str))


if __name__ == "__main__":
    main()

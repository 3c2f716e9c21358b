"""The Ray engine and the local engine's worker processes against one process: the same corpus, the
same bytes, wall time with 1 and 2 workers.

Compiles the first --mb megabytes of the Gutenberg books (../shared/data/gutenberg, one document
per book, as benchmarks/compile_throughput.py cuts them) with the embedded default model (or --model), once per
engine: `--engine local` in this process on --threads torch threads, `--engine local --workers N`
(worker processes of one thread each, --local-workers), then `--engine ray` on a local Ray cluster
this script starts (`ray.init(num_cpus=...)`) with 1 and 2 encoder actors of one CPU each
(`--no-ray`: without Ray).
Prints wall seconds, references/s, the ratio to the local engine, the share of the driver's wall
time spent waiting for encoded batches, and whether every kb file is byte-identical to the local
engine's (run.json, the run log, aside).

    python benchmarks/ray_engine.py --mb 1
    python benchmarks/ray_engine.py --mb 1 --threads 2 --local-workers 2 --no-ray   # 1 MB, 2 cores
    python benchmarks/ray_engine.py --mb 1 --address 10.0.0.1:6379 --workers 1 2 8   # a real cluster

On one machine the actors share its cores with the driver, so 2 workers on 2 cores measure the
engine's overhead and scaling, not a cluster's speed.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from compile_throughput import book_texts  # noqa: E402  (same directory)
from m3compile.config import CompileConfig  # noqa: E402
from m3compile.pipeline import compile_kb  # noqa: E402


def files(kb: Path) -> dict:
    return {p.relative_to(kb).as_posix(): p.read_bytes() for p in kb.rglob("*")
            if p.is_file() and p.name not in ("run.json", ".m3.lock")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=1.0)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the local engine")
    ap.add_argument("--address", default=None, help="an existing cluster (default: a local one of --cpus)")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local cluster")
    ap.add_argument("--local-workers", type=int, nargs="*", default=[2], help="worker processes of the local engine")
    ap.add_argument("--no-ray", action="store_true", help="the local engine only")
    ap.add_argument("--model", default=None, help="a checkpoint (default: the embedded reader)")
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="m3ray-") as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        for name, text in book_texts(a.mb).items():
            (corpus / f"{name}.txt").write_text(text, encoding="utf-8")
        cfg = CompileConfig(corpus=str(corpus), model=a.model)
        t0 = time.perf_counter()
        local = compile_kb(cfg, Path(tmp) / "local")
        base = time.perf_counter() - t0
        n = local.manifest.counts["references"]
        rows.append({"engine": "local", "workers": "-", "wall_s": round(base, 1), "refs_per_s": round(n / base, 1),
                     "vs_local": 1.0, "waiting_share": None, "same_bytes": True})
        runs = [("local", w, replace(cfg, workers=w), "encode (waiting for workers)") for w in a.local_workers]
        cluster_s = None
        if not a.no_ray:
            import ray

            t0 = time.perf_counter()
            ray.init(address=a.address, num_cpus=None if a.address else a.cpus, include_dashboard=False,
                     log_to_driver=False, logging_level="ERROR")
            cluster_s = time.perf_counter() - t0
            runs += [("ray", w, replace(cfg, engine="ray", workers=w), "encode (waiting for ray)") for w in a.workers]
        for engine, w, wcfg, waiting in runs:
            kb = Path(tmp) / f"{engine}-{w}"
            t0 = time.perf_counter()
            compile_kb(wcfg, kb)
            wall = time.perf_counter() - t0
            run = json.loads((kb / "run.json").read_text())
            rows.append({"engine": engine, "workers": w, "wall_s": round(wall, 1), "refs_per_s": round(n / wall, 1),
                         "vs_local": round(base / wall, 2),
                         "waiting_share": round(run["stage_seconds"].get(waiting, 0.0) / wall, 3),
                         "same_bytes": files(kb) == files(Path(tmp) / "local")})
        if not a.no_ray:
            ray.shutdown()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    started = "" if cluster_s is None else f"; Ray cluster started in {cluster_s:.1f} s (not in the walls below)"
    print(f"{a.mb} MB of Gutenberg, {n} references, embedded model, {cores} cores; local engine in one process "
          f"on {a.threads} thread(s), worker processes of 1 thread{started}")
    print("| engine | workers | wall s | references/s | speed vs local | driver waiting for batches | same bytes |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        share = "-" if r["waiting_share"] is None else f"{100 * r['waiting_share']:.0f} %"
        print(f"| {r['engine']} | {r['workers']} | {r['wall_s']} | {r['refs_per_s']} | {r['vs_local']}x | {share} | "
              f"{'yes' if r['same_bytes'] else 'NO'} |")
    return 0 if all(r["same_bytes"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

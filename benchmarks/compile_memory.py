"""Peak memory of `m3 compile` against corpus size (issue 16: "peak RSS flat within ±15 %").

Builds corpora of --mb megabytes from ../shared/data/gutenberg (text between the Project
Gutenberg START/END markers, the books taken in turn, one document per book and copy), plus, with
--single-line, the same text as one single-line document. Each is compiled from nothing by
`python -m m3compile compile CORPUS -o KB` (the embedded default model) in a child process of its
own; its peak resident set size comes from the kernel (os.wait4's rusage), not from sampling. On
Linux a child's rusage peak starts from this process's own peak (subprocess starts it by vfork,
and exec keeps the high-water mark of the memory it leaves), so this process holds nothing big:
the corpora are written by a spawned process of their own. With `-- --workers N` the figure is
the largest process's peak, not the sum of the workers'. It
prints per corpus: references, peak RSS, wall seconds, references/s, and the RSS as a ratio to the
smallest corpus of the run.

    python benchmarks/compile_memory.py --mb 0.25 1 4 --single-line 1

Books are repeated (copy N gets its own document name) past the ~13 MB the folder holds, so a
larger corpus repeats text; each copy is still a separate document and its references are planned,
encoded and written like any other (a content key already on disk is copied, not encoded).
"""

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA  # noqa: E402


def books() -> list[str]:
    out = []
    for p in sorted((DATA / "gutenberg").glob("pg*.txt")):
        text = p.read_text(encoding="utf-8-sig").replace("\r\n", "\n")
        start = text.find("\n", text.find("*** START OF")) + 1
        end = text.find("*** END OF")
        out.append(text[start:end if end > 0 else None])
    return out


def write_corpus(root: Path, mb: float, single_line: bool) -> int:
    """`mb` megabytes of book text under root; returns the bytes written."""
    budget, texts, parts, n = int(mb * 2**20), books(), [], 0
    while n < budget:
        for i, t in enumerate(texts):
            piece = t[:budget - n]
            parts.append((f"book{i}-copy{len(parts) // len(texts)}", piece))
            n += len(piece.encode("utf-8"))
            if n >= budget:
                break
    root.mkdir(parents=True)
    if single_line:
        text = " ".join(" ".join(t.split()) for _, t in parts)
        (root / "one-line.txt").write_text(text, encoding="utf-8")
        return len(text.encode("utf-8"))
    for name, t in parts:
        (root / f"{name}.txt").write_text(t, encoding="utf-8")
    return sum(len(t.encode("utf-8")) for _, t in parts)


def compile_rss(corpus: Path, kb: Path, threads: int, extra: list[str]) -> tuple[float, float]:
    """(peak RSS in MB, wall seconds) of one compile in a child process."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "m3compile", "compile", str(corpus), "-o", str(kb), *extra],
                            env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"compile of {corpus} failed with exit code {proc.returncode}")
    return usage.ru_maxrss / 1024, wall  # ru_maxrss is in KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, nargs="+", default=[0.25, 1, 4])
    ap.add_argument("--single-line", type=float, nargs="*", default=[], help="also these sizes as one line")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, help="keep corpora and kbs here (default: a temporary directory)")
    ap.add_argument("extra", nargs="*", help="more `m3 compile` options, after --")
    a = ap.parse_args()
    if not (DATA / "gutenberg").is_dir():
        sys.exit(f"{DATA} lacks gutenberg: this benchmark needs ../shared/data")
    with tempfile.TemporaryDirectory() as tmp:
        work = a.work or Path(tmp)
        runs = [(mb, False) for mb in a.mb] + [(mb, True) for mb in a.single_line]
        rows = []
        for mb, one in runs:
            name = f"{mb:g}mb" + ("-line" if one else "")
            corpus, kb = work / f"corpus-{name}", work / f"kb-{name}"
            if not corpus.exists():  # in a process of its own: see the docstring
                writer = multiprocessing.get_context("spawn").Process(target=write_corpus, args=(corpus, mb, one))
                writer.start()
                writer.join()
                if writer.exitcode != 0:
                    sys.exit(f"writing the corpus {corpus} failed (exit code {writer.exitcode})")
            # from nothing: a kb left by an earlier run is up to date (nothing measured), or of other
            # settings, which a compile into it keeps where the options after -- leave them out
            shutil.rmtree(kb, ignore_errors=True)
            rss, wall = compile_rss(corpus, kb, a.threads, a.extra)
            # counted from the manifest, not by opening the kb: a child's peak RSS includes what it
            # shared with this process between fork and exec, so this process must stay small (a
            # 100 MB kb's references table read here made the next compile's peak read 1.2 GB)
            n_refs = json.loads((kb / "manifest.json").read_text())["counts"]["references"]
            rows.append((name, n_refs, rss, wall))
            print(f"{name:>10}: {n_refs:>8} references  peak RSS {rss:7.0f} MB  {wall:6.1f} s  "
                  f"{n_refs / wall:6.0f} refs/s", flush=True)
        base = min(rows, key=lambda r: r[1])
        print(f"\nCPU: {_cpu()}; torch threads {a.threads}")
        print(f"{'corpus':>10} {'refs':>8} {'peak RSS MB':>11} {'vs ' + base[0]:>12} {'refs/s':>8} {'KB/ref above base':>18}")
        for name, n, rss, wall in rows:
            slope = (rss - base[2]) * 1024 / (n - base[1]) if n > base[1] else float("nan")
            print(f"{name:>10} {n:>8} {rss:>11.0f} {rss / base[2]:>11.2f}x {n / wall:>8.0f} {slope:>18.2f}")


def _cpu() -> str:
    try:
        flags = next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    return ", ".join(f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in flags) or "no avx2"


if __name__ == "__main__":
    main()

"""Whether a memory depends on the batch it was encoded in: kbs of the 110M shape compiled at several
--batch-size, incrementally (one book added to a kb of the others), resumed after a SIGKILL, and
with 1 and 2 torch threads, compared reference by reference against one fresh compile.

Uses compile_throughput.py's random-weight Llama (12 x 768, SwiGLU 2048) and a tokenizer trained on
the books. Since 2026-12-06 (model.PackedRows: every matmul on exactly 2,048 rows) every row but
the thread count's prints 0 differing memories; the code before differed on a CPU with AMX (README,
"A memory no longer depends on its batch"). bf16 on a CPU with AMX also depends on the thread count,
which is not fixed (a BLAS property), only stated.

    python benchmarks/batch_invariance.py [--mb 0.3] [--dtypes bfloat16,float32]    # ~3 min
"""

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from compile_throughput import ARGS, DATA, book_texts, cpu_flags, train_tokenizer  # noqa: E402  (same directory)
from m3compile.kb import open_kb  # noqa: E402
from m3compile.model import Transformer, save_checkpoint  # noqa: E402


def memories(kb: Path) -> dict[str, tuple]:
    """Each reference's memory by content key: (keys, values, positions)."""
    base = open_kb(kb)
    rows = base.references().select(["ref_id", "ref_key"]).to_pylist()
    return {r["ref_key"]: tuple(getattr(base.memory(r["ref_id"]), f) for f in ("keys", "values", "positions"))
            for r in rows}


def differing(a: dict, b: dict) -> int:
    assert a.keys() == b.keys(), "the kbs hold other references"
    return sum(not all(torch.equal(x, y) for x, y in zip(a[k], b[k])) for k in a)


def compile_cli(corpus: Path, kb: Path, model: Path, dtype: str, *extra: str, threads: int | None = None,
                kill_after: float | None = None) -> None:
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    cmd = [sys.executable, "-m", "m3compile", "compile", str(corpus), "-o", str(kb), "--model", str(model),
           "--dtype", dtype, *extra]
    if kill_after is None:
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        return
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (kb / ".m3.lock").unlink(missing_ok=True)  # the killed holder's lock


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=0.3, help="megabytes of book text")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--kill-after", type=float, default=9.0, help="seconds before the SIGKILL of the resumed run")
    a = ap.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA} is absent: this benchmark needs ../shared/data/gutenberg")
    with tempfile.TemporaryDirectory(prefix="m3inv-") as tmp:
        work = Path(tmp)
        corpus, model = work / "corpus", work / "model"
        corpus.mkdir()
        texts = book_texts(a.mb)
        for name, text in texts.items():
            (corpus / f"{name}.txt").write_text(text)
        save_checkpoint(Transformer(ARGS).init_weights(seed=0), model, bos_id=1, eos_id=2)
        train_tokenizer(list(texts.values()), model)
        held = sorted(corpus.iterdir())[1]
        print(f"{a.mb} MB of {len(texts)} books, the 110M shape; torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads; {cpu_flags()}")
        print("\n| dtype | compiled how | memories differing from a fresh compile |\n|---|---|---|")
        for dtype in a.dtypes.split(","):
            fresh = work / f"fresh-{dtype}"
            compile_cli(corpus, fresh, model, dtype)
            want = memories(fresh)
            for bs in ("5", "40"):
                kb = work / f"bs{bs}-{dtype}"
                compile_cli(corpus, kb, model, dtype, "--batch-size", bs)
                print(f"| {dtype} | `--batch-size {bs}` | {differing(memories(kb), want)} of {len(want)} |", flush=True)
            kb = work / f"inc-{dtype}"
            aside = work / held.name
            shutil.move(held, aside)
            compile_cli(corpus, kb, model, dtype)
            shutil.move(aside, held)
            compile_cli(corpus, kb, model, dtype)
            print(f"| {dtype} | incrementally, {held.name} added to a kb of the other books | "
                  f"{differing(memories(kb), want)} of {len(want)} |", flush=True)
            kb = work / f"kill-{dtype}"
            compile_cli(corpus, kb, model, dtype, "--checkpoint-seconds", "1", kill_after=a.kill_after)
            compile_cli(corpus, kb, model, dtype)
            print(f"| {dtype} | killed after {a.kill_after:g} s, then resumed | {differing(memories(kb), want)} of "
                  f"{len(want)} |", flush=True)
            for threads in (1, 2):
                kb = work / f"t{threads}-{dtype}"
                compile_cli(corpus, kb, model, dtype, threads=threads)
                print(f"| {dtype} | `OMP_NUM_THREADS={threads}` | {differing(memories(kb), want)} of {len(want)} |",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The bf16 write recipe inside real compiles: today's against the one before 0.2.0, in one process.

A bf16 model's selection computes q.k as a bf16 matmul rounded to bf16 (sparsify.token_scores) and
its attention takes torch's bf16 softmax (model.Attention) since 0.2.0; before, both were float32.
`encode_speed.py --shape 110m --dtype bfloat16` times them in a loop of encodes alone, where the
softmax measured 1.00x; this compiles compile_throughput.py's 0.25 MB corpus with its random-weight
125M-parameter model again and again, rotating the recipes so that each round runs them in
another order, and prints the encode+select seconds of run.json and the wall time per recipe:

  now           today's code
  f32-logits    the selection's q.k in float32 (as before 0.2.0)
  f32-softmax   the attention's softmax in float32 and a cast to bf16 (as before 0.2.0)
  0.1.0         both

    OMP_NUM_THREADS=2 python benchmarks/bf16_recipe.py --rounds 4
"""

import argparse
import json
import shutil
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

import m3compile.sparsify as sparsify
from m3compile.config import CompileConfig
from m3compile.kb import open_kb
from m3compile.model import Transformer, save_checkpoint
from m3compile.pipeline import compile_kb

from compile_throughput import ARGS, book_texts, cpu_flags, train_tokenizer


@contextmanager
def recipe(name: str):
    scores, softmax = sparsify.token_scores, F.softmax

    def f32_softmax(x, dim, dtype=None):
        if x.dtype == torch.bfloat16 and dtype is None:
            return softmax(x, dim, dtype=torch.float32).to(x.dtype)
        return softmax(x, dim, dtype=dtype)

    if name in ("f32-logits", "0.1.0"):
        sparsify.token_scores = lambda q_pre, k_pre, mask: scores(q_pre.float(), k_pre.float(), mask)
    if name in ("f32-softmax", "0.1.0"):
        F.softmax = f32_softmax
    try:
        yield
    finally:
        sparsify.token_scores, F.softmax = scores, softmax


def kept_in_common(a, b) -> tuple[int, int]:
    """Kept tokens two memories of the same references share, per layer and head, and their count.

    a, b: sequences of (L, H, K) position tensors."""
    same = sum(len(set(p[l, h].tolist()) & set(q[l, h].tolist())) for p, q in zip(a, b)
               for l in range(p.shape[0]) for h in range(p.shape[1]))
    return same, sum(p.numel() for p in a)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=0.25)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    names = ["now", "f32-logits", "f32-softmax", "0.1.0"]
    with tempfile.TemporaryDirectory(prefix="m3bf16-") as tmp:
        work = Path(tmp)
        (work / "corpus").mkdir()
        texts = book_texts(a.mb)
        for name, text in texts.items():
            (work / "corpus" / f"{name}.txt").write_text(text)
        save_checkpoint(Transformer(ARGS).init_weights(seed=0), work / "model", bos_id=1, eos_id=2)
        train_tokenizer(list(texts.values()), work / "model")
        print(f"{a.mb} MB of {len(texts)} books, 125M random-weight model, bf16, {a.threads} threads; {cpu_flags()}")
        cfg = CompileConfig(corpus=str(work / "corpus"), model=str(work / "model"), dtype="bfloat16", quant="int8",
                            batch_size=16)
        times = {n: [] for n in names}
        for r in range(a.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                out = work / f"kb-{name}"
                shutil.rmtree(out, ignore_errors=True)
                with recipe(name):
                    t = time.perf_counter()
                    compile_kb(cfg, out)
                    wall = time.perf_counter() - t
                enc = json.loads((out / "run.json").read_text())["stage_seconds"]["encode+select"]
                times[name].append((wall, enc))
        now, old = open_kb(work / "kb-now"), open_kb(work / "kb-0.1.0")
        same, total = kept_in_common([now.memory(i).positions for i in range(len(now.references()))],
                                     [old.memory(i).positions for i in range(len(old.references()))])
        print("\n| recipe | encode+select s, median | wall s, median | encode+select against now, median of rounds |")
        print("|---|---|---|---|")
        for name in names:
            ratio = statistics.median(e / n[1] for (_, e), n in zip(times[name], times["now"]))
            print(f"| {name} | {statistics.median(e for _, e in times[name]):.2f} | "
                  f"{statistics.median(w for w, _ in times[name]):.2f} | {ratio:.2f}x |")
        print(f"kept tokens that today's kb shares with the 0.1.0 recipe's: {100 * same / total:.2f} % of {total}")


if __name__ == "__main__":
    main()

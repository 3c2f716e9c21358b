"""Where the 110M shape's encode+select time goes: torch.profiler over one batch of the compile.

Builds compile_throughput.py's random-weight Llama (12 x 768, 12 heads on 4 kv heads, SwiGLU 2048)
in bf16, encodes --batch references of 128 random tokens behind a 4-token write prefix through the
first half of the layers (as `m3 compile` does: spec.memorize = encode.encode_batch +
sparsify.select_topk), and prints the wall time of each part and the share of profiled CPU time per
operator. aten::mm is the dense projections (the FLOPs MFU counts); bmm is attention and the
selection's logits. Random weights: which tokens win is meaningless, the cost is the real one.

    OMP_NUM_THREADS=2 python benchmarks/encode_profile.py
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

PROFILED = 3  # batches under the profiler

sys.path.insert(0, str(Path(__file__).parent))
from compile_throughput import ARGS, cpu_flags  # noqa: E402  (same directory)
from m3compile.encode import encode_batch  # noqa: E402
from m3compile.model import Transformer, keep_freed_memory  # noqa: E402
from m3compile.sparsify import select_topk  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16, help="references a batch (the compile's 2,048 tokens / 128)")
    ap.add_argument("--rounds", type=int, default=10, help="timed rounds (after 2 warm-ups)")
    ap.add_argument("--top-k", type=int, default=8)
    a = ap.parse_args()
    keep_freed_memory()  # as load_checkpoint does in a compile
    torch.manual_seed(0)
    model = Transformer(ARGS).to(torch.bfloat16).eval()
    T = 128
    g = torch.Generator().manual_seed(1)
    refs = [torch.randint(3, ARGS.vocab_size, (T - (7 if b == 3 else 0),), generator=g).tolist() for b in range(a.batch)]
    prefix, layers = [1, 500, 600, 700], list(range(ARGS.n_layers // 2))

    def once():
        t0 = time.perf_counter()
        batch = encode_batch(model, refs, prefix, layers, pad_to=T)
        t1 = time.perf_counter()
        select_topk(batch, a.top_k)
        return t1 - t0, time.perf_counter() - t1

    enc, sel = [], []
    with torch.inference_mode():
        once(), once()
        for _ in range(a.rounds):
            e, s = once()
            enc.append(e)
            sel.append(s)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(PROFILED):
                once()
    e, s = statistics.median(enc), statistics.median(sel)
    print(f"110M shape, bf16, {a.batch} references of {T} tokens, {torch.get_num_threads()} threads; {cpu_flags()}")
    print(f"encode {1e3 * e:.1f} ms, select {1e3 * s:.1f} ms (medians of {a.rounds}): selection {100 * s / (e + s):.1f} % "
          "of encode+select")
    rows = sorted(prof.key_averages(), key=lambda r: r.self_cpu_time_total, reverse=True)
    total = sum(r.self_cpu_time_total for r in rows)
    print("\n| operator | share of profiled CPU time | calls a batch | ms a batch |\n|---|---|---|---|")
    for r in rows[:25]:
        print(f"| {r.key} | {100 * r.self_cpu_time_total / total:.1f} % | {r.count / PROFILED:g} | "
              f"{r.self_cpu_time_total / PROFILED / 1e3:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

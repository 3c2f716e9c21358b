"""Encode+select speed of one model, alternating recipes in one run (a shared machine drifts by
±30 % between runs, so only ratios measured side by side mean anything).

Recipes, each over the same real references (the first --refs of the Gutenberg books, cut with the
model's own memory settings) and each giving the same kept tokens:

  before   the write prefix inside every sequence (41 positions a reference for the embedded
           reader), selection scores as an einsum to (B, H, R, T, T) and torch.logsumexp, batches
           of 16: the encoder before the prefill change
  now@B    spec.memorize as a compile runs it, batches of B references (the prefix's key-values
           computed once and kept on the model, scores keys x queries reduced in place)
  f32-logits@B  (--dtype bfloat16 only) now@B with the selection's q.k in float32, as before the
           bf16 logits; its kept tokens may differ from now@B's at near-ties (the count is printed)
  f32-softmax@B  (--dtype bfloat16 only) now@B with the attention's softmax in float32 and a cast
           to bf16, as before the bf16 softmax
  torch-bf16@B  (--dtype bfloat16 only) now@B with torch's own bf16 products: on a CPU without bf16
           units now@B runs them in float32 (model.CPU_BF16_UNITS), here torch emulates them; on a
           CPU with units the two are the same

--shape 110m runs compile_throughput.py's random-weight 125M-parameter Llama (12 x 768, 4 kv
heads) at the paper's settings (128-token references, the first 6 layers, top-8) over --refs
references of 96-128 random tokens (45 % full), behind a 4-token prefix, instead of --model.

    OMP_NUM_THREADS=2 python benchmarks/encode_speed.py --threads 2 --rounds 6 --sizes 16 32 64 128
    OMP_NUM_THREADS=2 python benchmarks/encode_speed.py --dtype bfloat16 --sizes 64
    OMP_NUM_THREADS=2 python benchmarks/encode_speed.py --shape 110m --dtype bfloat16 --refs 96 --sizes 16 --rounds 4
    OMP_NUM_THREADS=2 python benchmarks/encode_speed.py --shape 110m --dtype bfloat16 --refs 64 --sizes 16 --rounds 2
"""

import argparse
import random
import statistics
import time
from pathlib import Path

import torch

import m3compile.sparsify as sparsify
from m3compile.chunk import chunk_documents
from m3compile.config import read_model_memory
from m3compile.corpus import Document
from m3compile.encode import EncodedBatch
from m3compile.model import LayerKV, Transformer, load_checkpoint
from m3compile.sparsify import select_topk
from m3compile.spec import MemorySpec, memorize
from m3compile.tokenizer import write_prefix

from bf16_recipe import kept_in_common, recipe
from common import DATA
from compile_throughput import ARGS

EMBEDDED = Path(__file__).resolve().parents[1] / "m3compile" / "embedded" / "reader"


def einsum_scores(q_pre, k_pre, mask):
    """The selection scores as computed before (same values up to float rounding)."""
    B, N, T, D = q_pre.shape
    H = k_pre.shape[1]
    q = q_pre.float().view(B, H, N // H, T, D)
    logits = torch.einsum("bhrid,bhjd->bhrij", q, k_pre.float()) * D**-0.5
    logits = logits.masked_fill(~mask[:, None, None, :, None], torch.finfo(torch.float32).min)
    return logits.flatten(2, 3).logsumexp(dim=2).masked_fill(~mask[:, None, :], float("-inf"))


def before(model, refs, prefix, layers, width, top_k):
    """The prefix in every sequence, einsum scores."""
    p, B = len(prefix), len(refs)
    ids = torch.zeros(B, p + width, dtype=torch.long)
    ids[:, :p] = torch.tensor(prefix)
    mask = torch.zeros(B, p + width, dtype=torch.bool)
    mask[:, :p] = True
    for b, t in enumerate(refs):
        ids[b, p:p + len(t)] = torch.tensor(t)
        mask[b, p:p + len(t)] = True
    out = model.forward_kv(ids, layers, attention_mask=mask, positions=torch.arange(p + width).expand(B, -1))
    kv = {l: LayerKV(*(t[:, :, p:] for t in v)) for l, v in out.items()}
    now, sparsify.token_scores = sparsify.token_scores, einsum_scores
    try:
        return select_topk(EncodedBatch(kv, mask[:, p:], tuple(len(t) for t in refs)), top_k)
    finally:
        sparsify.token_scores = now


def as_before(name: str, model, refs, spec):
    """memorize with one part of the bf16 recipe as before 0.2.0 (bf16_recipe.recipe's names)."""
    with recipe(name):
        return memorize(model, refs, spec)


def torch_bf16(model, refs, spec):
    """memorize with torch's own bf16 products (no float32 ones where the CPU lacks bf16 units)."""
    import m3compile.model as model_module

    kept, model_module.CPU_BF16_UNITS = model_module.CPU_BF16_UNITS, True
    try:
        return memorize(model, refs, spec)
    finally:
        model_module.CPU_BF16_UNITS = kept


def shape_110m(dtype: str, n: int):
    """compile_throughput.py's model, random references of 96-128 tokens and a 4-token prefix."""
    model = Transformer(ARGS).init_weights(seed=0).to(getattr(torch, dtype)).eval()
    rng = random.Random(1)
    refs = [[rng.randrange(3, ARGS.vocab_size) for _ in range(128 if rng.random() < 0.45 else rng.randint(96, 127))]
            for _ in range(n)]
    return model, refs, [1, 500, 600, 700], list(range(ARGS.n_layers // 2)), 8, 128, "sentence", 0.5, "110M shape"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=EMBEDDED)
    ap.add_argument("--shape", choices=["110m"], help="a random-weight model of this shape instead of --model")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--refs", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64, 128])
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.shape:
        model, refs, prefix, layers, top_k, width, boundary, min_fill, label = shape_110m(a.dtype, a.refs)
        mem_prefix = ""
    else:
        ck = load_checkpoint(a.model, dtype=getattr(torch, a.dtype))
        mem = read_model_memory(a.model)
        if mem is None:
            raise SystemExit(f"{a.model} has no m3-memory.json: this benchmark reads a model at its own memory settings")
        model, label = ck.model, a.model.name
        width, layers, top_k = mem["max_tokens"], mem["memory_layers"], mem["top_k"]
        boundary, min_fill, mem_prefix = mem["boundary"], mem["min_fill"], mem["prefix"]
        prefix = write_prefix(ck.tokenizer, mem["prefix"])
        docs = (Document(p.stem, p.name, p.read_text(encoding="utf-8-sig"))
                for p in sorted((DATA / "gutenberg").glob("pg*.txt")))
        refs = []
        for r in chunk_documents(docs, ck.tokenizer, width, boundary, min_fill):
            refs.append(list(r.token_ids))
            if len(refs) == a.refs:
                break
    spec = MemorySpec(model_config_sha256="", model_weights_sha256=(), tokenizer_sha256="", n_layers=model.args.n_layers,
                      n_kv_heads=model.args.n_kv_heads, head_dim=model.args.head_dim, width=width,
                      boundary=boundary, min_fill=min_fill, chunk_rule_version=0, prefix=mem_prefix,
                      prefix_ids=tuple(prefix), memory_layers=tuple(layers), top_k=top_k, quant="none", dtype=a.dtype)
    recipes = {"before@16": lambda b: before(model, b, prefix, layers, width, top_k)}
    recipes.update({f"now@{s}": (lambda b: memorize(model, b, spec)) for s in a.sizes})
    size = {"before@16": 16, **{f"now@{s}": s for s in a.sizes}}
    if a.dtype == "bfloat16":
        for old in ("f32-logits", "f32-softmax"):
            recipes.update({f"{old}@{s}": (lambda b, old=old: as_before(old, model, b, spec)) for s in a.sizes})
            size.update({f"{old}@{s}": s for s in a.sizes})
        recipes.update({f"torch-bf16@{s}": (lambda b: torch_bf16(model, b, spec)) for s in a.sizes})
        size.update({f"torch-bf16@{s}": s for s in a.sizes})
        with torch.inference_mode():
            x, y = as_before("f32-logits", model, refs[:256], spec), memorize(model, refs[:256], spec)
        kept, total = kept_in_common([u.positions for u in x], [v.positions for v in y])
        print(f"kept tokens that bf16 logits share with float32 logits ({min(256, len(refs))} references): "
              f"{100 * kept / total:.2f} %")
    with torch.inference_mode():
        x, y = recipes["before@16"](refs[:64]), memorize(model, refs[:64], spec)
    same = all(torch.equal(u.positions, v.positions) for u, v in zip(x, y))
    diff = max((u.keys.float() - v.keys.float()).abs().max().item() for u, v in zip(x, y))
    print(f"{label}: {len(refs)} references of width {width}, prefix {len(prefix)} tokens, layers {layers}, "
          f"top-{top_k}, {a.dtype}, {a.threads} threads; same kept tokens as before: {same}, "
          f"largest key difference {diff:.1e}")
    times = {k: [] for k in recipes}
    for _ in range(a.rounds):
        for name, f in recipes.items():
            t = time.perf_counter()
            with torch.inference_mode():
                for s in range(0, len(refs), size[name]):
                    f(refs[s:s + size[name]])
            times[name].append(len(refs) / (time.perf_counter() - t))
    base = times["before@16"]
    print("\n| recipe | references/s, median of rounds | best round | vs before, median of per-round ratios |")
    print("|---|---|---|---|")
    for name, v in times.items():
        ratio = statistics.median(x / b for x, b in zip(v, base))
        print(f"| {name} | {statistics.median(v):.0f} | {max(v):.0f} | {ratio:.2f}x |")
    for s in a.sizes if a.dtype == "bfloat16" else ():
        for old in ("f32-logits", "f32-softmax", "torch-bf16"):
            ratio = statistics.median(x / b for x, b in zip(times[f"now@{s}"], times[f"{old}@{s}"]))
            print(f"now@{s} against {old}@{s}, median of per-round ratios: {ratio:.2f}x")


if __name__ == "__main__":
    main()

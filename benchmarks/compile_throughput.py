"""Compile throughput baseline: a realistic-shape random-weight Llama over real books.

Compiles the first --mb megabytes of ../shared/data/gutenberg (text between the Project Gutenberg
START/END markers, one document per book) with a random-weight Llama of GPT-2-small shape
(12 layers x 768, 12 heads, 4 kv heads, SwiGLU 2048, 32k vocab: ~110M parameters) in bfloat16
and float32, and prints references/s, tokens/s, the share of wall time per stage, and the
model-FLOPs utilisation

    MFU = write-FLOPs per reference (paper App. A.2) x references / wall seconds / matmul peak

with the peak measured by this script on this machine: bf16's where the CPU has bf16 units (AMX,
AVX512-BF16). Where it has none torch emulates bf16 matmuls (~0.3-1.3 GFLOP/s on an AVX2 EPYC) and
m3's bf16 products run in float32 (model.linear), so the peak is float32's, and the transformers
pipeline runs in float32 where bf16 is asked (emulated, it would be a strawman). The tokenizer is a 32k byte-level BPE
trained here on the same books (no hub download). Random weights: selection is meaningless but
the cost is the real one.

    python benchmarks/compile_throughput.py --mb 1
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import DATA as SHARED  # noqa: E402  (same directory)
from m3compile.config import CompileConfig  # noqa: E402
from m3compile.kb import open_kb  # noqa: E402
from m3compile.model import ModelArgs, Transformer, bf16_units, save_checkpoint  # noqa: E402
from m3compile.pipeline import compile_kb  # noqa: E402

DATA = SHARED / "gutenberg"  # $M3_SHARED_DATA, else ../shared/data (common.py)
ARGS = ModelArgs(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=4, head_dim=64,
                 hidden_dim=2048, max_seq_len=2048)


def book_texts(mb: float) -> dict[str, str]:
    budget = int(mb * 2**20)
    out = {}
    books = list(DATA.glob("pg*.txt"))
    if not books:  # a ZeroDivisionError before
        sys.exit(f"no pg*.txt in {DATA}: this benchmark reads the shared Gutenberg books (../shared/data, "
                 "or set M3_SHARED_DATA)")
    per_book = budget // len(books)
    for p in sorted(DATA.glob("pg*.txt")):
        text = p.read_text(encoding="utf-8-sig").replace("\r\n", "\n")
        start = text.find("\n", text.find("*** START OF")) + 1
        end = text.find("*** END OF")
        out[p.stem] = text[start:end if end > 0 else None][:per_book]
    return out


def train_tokenizer(texts: list[str], path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=ARGS.vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5, trials: int = 7) -> float:
    """The best of `trials` timings: on a shared machine one timing read 207 GFLOP/s where the
    best of seven read 371 (2026-12-03), and a low peak inflates every MFU printed beside it."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(trials):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 * reps / best


def write_flops(l_ref: float, args: ModelArgs, l_mem: int) -> float:
    """Paper App. A.2 write cost of one reference, with this model's dims (W = FFN width).

    The paper's count, as the MFU of issue 16 is defined: it includes the last memory layer's
    attention and output projection, which the compiler skips (it needs only that layer's q/k/v,
    model.forward_kv): ~2 % of the count at the 110M shape (l_ref 128: 88M of 4.38G multiply-adds),
    so the MFU printed is ~2 % (relative) above one of the FLOPs computed."""
    d, dh, hkv, w = args.dim, args.head_dim, args.n_kv_heads, args.hidden_dim
    return 2 * (l_mem * (l_ref * (2 * d * d + 2 * d * dh * hkv) + 2 * (l_ref**2 / 2) * d)
                + (l_mem - 1) * l_ref * 3 * d * w + l_mem * l_ref**2 * d)


def projection_ratio(args: ModelArgs, memory_layers: list[int]) -> float:
    """Multiply-adds per token of the transformers pipeline's projections (every layer, the LM head)
    over the compiler's (the layers below the last memory layer, and that layer's q/k/v)."""
    d, kv, w = args.dim, args.head_dim * args.n_kv_heads, args.hidden_dim
    qkv, layer = d * d + 2 * d * kv, 2 * d * d + 2 * d * kv + 3 * d * w
    return (args.n_layers * layer + d * args.vocab_size) / (max(memory_layers) * layer + qkv)


def cpu_flags() -> tuple[str, bool]:
    """Which bf16 matmul units the CPU has (Linux /proc/cpuinfo): AMX, AVX512-BF16, or neither, and
    whether it has any (an unreadable cpuinfo counts as none, as model.CPU_BF16_UNITS counts it)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return "CPU flags unknown", False
    names, units = {"amx_bf16": "AMX", "avx512_bf16": "AVX512-BF16"}, bf16_units(text)
    have = [names[u] for u in units if u in names]
    return (("bf16 units: " + ", ".join(have)) if have else "no AMX or AVX512-BF16"), bool(units)


@torch.no_grad()
def transformers_pipeline(model_dir: Path, refs: list[list[int]], prefix: list[int], layers: list[int], top_k: int,
                          dtype: str, batch_size: int) -> float:
    """The obvious pipeline, for comparison: transformers' LlamaForCausalLM (eager attention, every
    layer run, `output_attentions`), each reference behind the same prefix, the top-k tokens per
    memory layer and kv head by attention received (summed over the group's heads and all query
    positions), their cached keys and values gathered. No quantization, compression or writing.
    Returns the wall seconds."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), attn_implementation="eager").eval()
    n_kv = hf.config.num_key_value_heads
    p = len(prefix)
    t = time.perf_counter()
    for s in range(0, len(refs), batch_size):
        batch = refs[s:s + batch_size]
        T = p + max(len(r) for r in batch)
        ids = torch.zeros(len(batch), T, dtype=torch.long)
        mask = torch.zeros(len(batch), T, dtype=torch.long)
        for b, r in enumerate(batch):
            ids[b, :p + len(r)] = torch.tensor(prefix + r)
            mask[b, :p + len(r)] = 1
        out = hf(input_ids=ids, attention_mask=mask, output_attentions=True, use_cache=True)
        cache = out.past_key_values
        for l in layers:
            att = out.attentions[l].float()  # (B, N, T, T)
            B, N = att.shape[:2]
            got = att.masked_fill(~mask.bool()[:, None, :, None], 0).sum(2)  # (B, N, T) attention received
            got = got.view(B, n_kv, N // n_kv, T).sum(2)[:, :, p:]  # (B, H, T - p)
            got = got.masked_fill(~mask.bool()[:, None, p:], -1)
            idx = got.topk(min(top_k, T - p), dim=-1).indices + p  # (B, H, K)
            k, v = (cache.layers[l].keys, cache.layers[l].values) if hasattr(cache, "layers") else cache[l]
            g = idx[..., None].expand(-1, -1, -1, k.shape[-1])
            k.gather(2, g), v.gather(2, g)  # (B, H, K, D)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=1.0, help="megabytes of book text to compile")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="references a forward pass of the compile (default: the compile's, as many as hold "
                         "2,048 tokens); the transformers pipeline takes this many, or 16 (2,048 / 128)")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the plain transformers pipeline (needs transformers, the [test] extra)")
    opts = ap.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA} is absent: this benchmark needs ../shared/data/gutenberg")
    with tempfile.TemporaryDirectory(prefix="m3bench-") as tmp:
        work = Path(tmp)
        corpus = work / "corpus"
        corpus.mkdir()
        texts = book_texts(opts.mb)
        for name, text in texts.items():
            (corpus / f"{name}.txt").write_text(text)
        model_dir = work / "model"
        t = time.perf_counter()
        save_checkpoint(Transformer(ARGS).init_weights(seed=0), model_dir, bos_id=1, eos_id=2)
        train_tokenizer(list(texts.values()), model_dir)
        print(f"setup (model {sum(p.numel() for p in Transformer(ARGS).parameters()) / 1e6:.0f}M params, "
              f"tokenizer) {time.perf_counter() - t:.1f}s; corpus {opts.mb} MB of {len(texts)} books; "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        flags, units = cpu_flags()
        # emulated, a 2048-wide bf16 matmul takes about a minute: one 512-wide one tells the same
        bf16 = matmul_peak(torch.bfloat16) if units else matmul_peak(torch.bfloat16, n=512, reps=1, trials=2)
        fp32 = matmul_peak(torch.float32)
        peak, peak_name = (bf16, "bf16") if units else (fp32, "fp32")
        print(f"measured matmul peak: bf16 {bf16 / 1e9:.0f} GFLOP/s, fp32 {fp32 / 1e9:.0f} GFLOP/s; {flags}")
        if not units:
            print("no bf16 units: torch emulates bf16 matmuls here, m3's bf16 products run in float32 (model.linear); "
                  "MFU is against the fp32 peak, and the transformers pipeline runs in float32 where bf16 is asked")
        rows, baselines = [], []
        for dtype in opts.dtypes.split(","):
            cfg = CompileConfig(corpus=str(corpus), model=str(model_dir), dtype=dtype, quant="int8",
                                batch_size=opts.batch_size)
            t = time.perf_counter()
            m = compile_kb(cfg, work / f"kb-{dtype}").manifest
            wall = time.perf_counter() - t
            run = json.loads((work / f"kb-{dtype}" / "run.json").read_text())
            n, toks = m.counts["references"], m.counts["tokens"]
            memory_layers = list(m.write["memory_layers"])  # the same for every dtype
            flops = write_flops(toks / n, ARGS, len(memory_layers)) * n
            stages = run["stage_seconds"]
            own = fp32 if dtype == "float32" else peak  # each dtype's own matmul peak
            rows.append((dtype, n, toks, wall, n / wall, toks / wall, flops / wall / peak,
                         {k: v / wall for k, v in stages.items()}, flops / wall / own))
            if opts.baseline:
                kb = open_kb(work / f"kb-{dtype}")
                refs = kb.references().select(["token_ids"]).to_pydict()["token_ids"]
                hf_dtype = dtype if units else "float32"
                hf_wall = transformers_pipeline(model_dir, refs, list(kb.spec.prefix_ids), list(kb.spec.memory_layers),
                                                kb.spec.top_k, hf_dtype, opts.batch_size or 16)
                baselines.append((f"{dtype} (pipeline in {hf_dtype})" if hf_dtype != dtype else dtype, n / hf_wall,
                                  flops / hf_wall / peak, hf_wall / wall))
        print(f"\n| dtype | refs | tokens | wall s | refs/s | tokens/s | MFU (vs {peak_name} peak) | MFU (vs its dtype's peak) |")
        print("|---|---|---|---|---|---|---|---|")
        for dtype, n, toks, wall, rps, tps, mfu, _, mfu_own in rows:
            print(f"| {dtype} | {n} | {toks} | {wall:.1f} | {rps:.1f} | {tps:.0f} | {100 * mfu:.1f} % | {100 * mfu_own:.1f} % |")
        print("\nshare of wall time per stage:")
        for dtype, *_, shares, _ in rows:
            print(f"  {dtype}: " + ", ".join(f"{k} {100 * v:.1f} %" for k, v in sorted(shares.items())))
        if baselines:
            print("\nthe plain transformers pipeline on the same references, same run (selection only: no quantization,"
                  " compression or writing):")
            for dtype, rps, mfu, ratio in baselines:
                print(f"  {dtype}: {rps:.1f} refs/s, MFU {100 * mfu:.1f} %; m3 compile is {ratio:.2f}x as fast "
                      "(the pipeline runs after the compile, in its process: with the malloc settings of "
                      "model.keep_freed_memory)")
            print(f"  (the MFU above counts the compiler's FLOPs; per token the pipeline's projections are "
                  f"{projection_ratio(ARGS, memory_layers):.1f}x the compiler's: every layer and the LM head against the "
                  "layers up to the last memory layer's q/k/v)")
        if len(rows) == 2:
            print(f"\nbf16 / fp32 throughput ratio: {rows[0][4] / rows[1][4]:.2f}x")


if __name__ == "__main__":
    main()

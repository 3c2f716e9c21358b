"""Bits per element against attention-output error for every memory quantizer, on real memories.

Compiles a memory reader (--model; default: the embedded one) over examples/corpus and examples/reader/corpus (quant
none, so the float32 memories are exact), trains each VQ candidate's codebooks on each kb's own
memories, and for int8, int4, the paper's quantizer scaled to the head dim (vq-paper; the exact
`OPQ20_80,Residual2x14,PQ8x10` needs D = 80, which no model here has) and every candidate prints:
  bits/elt    stored payload (codes, positions, frame header) + codebooks, per key/value element;
              "zstd" is the same with the compressed frames actually written; "asym" leaves out
              the codebooks (a kb large enough to amortise them)
  attn err    ||o - ô|| / ||o|| with o = softmax(q·K^T/√D)·V over each chunk's memories (the 5
              references of its own document nearest it, as `m3 eval --oracle`), q the model's
              real post-RoPE queries of the text tokens reading them, per query head; "own" =
              codebooks trained on this kb, "held-out" = trained on the next kb in --corpora
  k/v err     ||x - x̂|| / ||x|| of the keys and values themselves (own kb)
  enc/dec     vectors/s of one codec (layer 0 keys) on one thread; train s per kb

    python benchmarks/quant_frontier.py --plot /tmp/frontier.png
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from common import pyplot, stories260k, tinystories  # noqa: E402  (same directory)
from m3compile.config import CompileConfig, default_model_dir, read_model_memory
from m3compile.corpus import CorpusReport, iter_documents
from m3compile.errors import M3Error
from m3compile.evaluate import _doc_refs, oracle_refs
from m3compile.kb import load_kb_model, open_kb
from m3compile.model import apply_rope
from m3compile.pack import decode_payload, encode_payload, payload_nbytes
from m3compile.pipeline import compile_kb
from m3compile.quantize import get_scheme
from m3compile.reader import ChunkMemory, ReadLayout, text_logits
from m3compile.codebooks import resolve_quant
from m3compile.vq import (ENCODERS, _lookup, GridEncoder, TableDecoder, VQScheme, build_codec, collect_samples, resolve,
                         train_codecs)

ROOT = Path(__file__).resolve().parents[1]
CORPORA = ("examples/corpus", "examples/reader/corpus")
# label -> quant name for get_scheme, or (preset or vq:<factory>, group override or None)
CANDIDATES = {  # codec group in brackets
    "int8": "int8", "int4": "int4",
    "vq-paper [all]": ("vq-paper", None),
    "vq [layer]": ("vq", None),  # vq-grid: vq-pq8-4bit's codecs through the grid encoder
    "vq-pq8-4bit [layer]": ("vq-pq8-4bit", None),  # the same codecs, FAISS's exact encoder
    "vq-pq4-4bit [layer]": ("vq-pq4-4bit", None),
    "vq-pq4-2bit [layer]": ("vq-pq4-2bit", None),
    "vq-pq4 [layer]": ("vq-pq4", None),
    "vq-pq4 [head]": ("vq-pq4", "head"),
    "vq-pq4 [role]": ("vq-pq4", "role"),
    "vq-pq4-half [layer]": ("vq-pq4-half", None),
    "vq-rq4 [role]": ("vq-rq4", None),
    "vq-rq4 [layer]": ("vq-rq4", "layer"),
    "vq-pq8 [layer]": ("vq-pq8", None),
    "vq-pq8 [head]": ("vq-pq8", "head"),
    "vq-rq8 [layer]": ("vq-rq8", None),
    "PQ D/4 x5 [layer]": ("vq:PQ{q}x5", None),
    "PQ D/4 x6 [layer]": ("vq:PQ{q}x6", None),  # vq-paper's code bytes at D = 32
    "PQ D/4 x8 [layer]": ("vq:PQ{q}x8", None),
    # 4-bit scalar quantizer, per-dim ranges trained on the kb: no lookup to decode
    "vq:SQ4 [layer]": ("vq:SQ4", None),
    "vq:SQ4 [head]": ("vq:SQ4", "head"),
}
PAPER = "OPQ20_80,Residual2x14,PQ8x10"  # the paper's exact quantizer (§4.2), D = 80


def load_kb(corpus: Path, out: Path, model: Path, settings: dict):
    cfg = CompileConfig(corpus=str(corpus), model=str(model), quant="none").with_model_memory(settings)
    compile_kb(cfg, out)
    kb = open_kb(out)
    mems = [kb.memory(i) for i in range(len(kb))]
    docs = list(iter_documents(corpus, CorpusReport()))
    return kb, mems, docs


def prepare(corpora: list[Path], model: Path, settings: dict, tmp: Path) -> list:
    """Per corpus: (name, kb, memories, chunk queries, exact {ref_id: (keys, values)})."""
    kbs = []
    tmp.mkdir(parents=True, exist_ok=True)
    for i, corpus in enumerate(corpora):
        kb, mems, docs = load_kb(corpus, tmp / f"kb{i}", model, settings)
        ck = load_kb_model(kb)
        exact = {m.ref_id: (m.keys, m.values) for m in mems}
        kbs.append((corpus, kb, mems, chunk_queries(kb, ck, mems, docs), exact))
    return kbs


@torch.no_grad()
def chunk_queries(kb, ck, mems, docs):
    """[(ref ids, {layer index: (N, T, D) post-RoPE queries of the chunk's text tokens})]."""
    tok, model = ck.tokenizer, ck.model
    layout = ReadLayout.from_manifest(kb.manifest, tok.bos_id)
    by_doc, _ = _doc_refs(kb)
    captured, hooks = {}, []
    for li, layer in enumerate(layout.memory_layers):
        def hook(mod, args, output, li=li):
            captured[li] = apply_rope(output[1].q_pre, args[1], args[2])[0]  # (N, T, D)
        hooks.append(model.layers[layer].attention.register_forward_hook(hook))
    out = []
    try:
        for doc in docs:
            ids = tok.encode(doc.text)
            if not ids or doc.doc_id not in by_doc:
                continue
            starts = range(0, len(ids), layout.chunk_tokens)
            refs = [oracle_refs(by_doc[doc.doc_id], s, layout.refs_per_chunk) for s in starts]
            chunks = [ChunkMemory.gather([mems[r] for r in rs], layout.memory_layers) for rs in refs]
            text_logits(model, layout, ids, chunks)
            owner = torch.tensor(layout.chunk_of(len(ids)))  # (T,)
            for c, rs in enumerate(refs):
                out.append((rs, {li: q[:, owner == c] for li, q in captured.items()}))  # (N, Tc, D)
    finally:
        for h in hooks:
            h.remove()
    return out


def attention_error(queries, ref_kv, ref_kv_hat) -> float:
    """sqrt(sum ||o - ô||^2 / sum ||o||^2) over chunks, memory layers, query heads and tokens."""
    num = den = 0.0
    for rs, qs in queries:
        for li, q in qs.items():
            k = torch.cat([ref_kv[r][0][li] for r in rs], 1)  # (H, M, D)
            v = torch.cat([ref_kv[r][1][li] for r in rs], 1)  # (H, M, D)
            kh = torch.cat([ref_kv_hat[r][0][li] for r in rs], 1)  # (H, M, D)
            vh = torch.cat([ref_kv_hat[r][1][li] for r in rs], 1)  # (H, M, D)
            rep = q.shape[0] // k.shape[0]
            o = _attend(q, k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0))  # (N, T, D)
            oh = _attend(q, kh.repeat_interleave(rep, 0), vh.repeat_interleave(rep, 0))  # (N, T, D)
            num += float(((o - oh) ** 2).sum())
            den += float((o**2).sum())
    return (num / den) ** 0.5


def _attend(q, k, v):
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5  # (N, T, M)
    return torch.softmax(s, -1) @ v  # (N, T, D)


def build(label, spec, mems, d, seed):
    """The scheme for a candidate, trained on `mems` when it is VQ; (scheme, codebook bytes, train s)."""
    if isinstance(spec, str):
        return get_scheme(spec, head_dim=d), 0, 0.0
    name, group = spec
    name = name.format(q=d // 4, e=d // 8)
    factory, default_group = resolve(name, d)
    t = time.perf_counter()
    cb = train_codecs(collect_samples(mems, max_vectors=1 << 30), factory, seed, group or default_group,
                      encoder=ENCODERS.get(resolve_quant(name, d), "faiss"))
    return VQScheme(cb, name=f"vq:{factory}"), cb.nbytes(), time.perf_counter() - t


def run_scheme(scheme, mems):
    """Each reference through encode_payload/decode_payload: frames, (keys, values) dequantized, sizes."""
    kv_hat, stored, disk, elems, sq = {}, 0, 0, 0, {"k": [0.0, 0.0], "v": [0.0, 0.0]}
    for m in mems:
        L, H, K, D = m.keys.shape
        frame, _ = encode_payload(m.keys, m.values, m.positions.numpy(), scheme)
        mx = payload_nbytes(scheme, L, H, K, D)
        kh, vh, _ = decode_payload(frame, scheme, mx)
        kv_hat[m.ref_id] = (kh, vh)
        stored, disk, elems = stored + mx, disk + len(frame), elems + 2 * L * H * K * D
        for role, x, xh in (("k", m.keys, kh), ("v", m.values, vh)):
            sq[role][0] += float(((x - xh) ** 2).sum())
            sq[role][1] += float((x**2).sum())
    rel = {r: (a / b) ** 0.5 for r, (a, b) in sq.items()}
    return kv_hat, stored, disk, elems, rel


def _rate(fn, n):
    reps, t0 = 0, time.perf_counter()
    while True:
        fn()
        reps += 1
        if time.perf_counter() - t0 > 0.3:
            return n * reps / (time.perf_counter() - t0)


def speed(scheme, x: np.ndarray) -> tuple[float, float]:
    """(encode, decode) vectors/s of layer-0 key vectors x (N, D), one thread."""
    rate = _rate
    if isinstance(scheme, VQScheme):
        cb = scheme.codebooks
        codes = cb.encode(0, "k", x)  # (N, C)
        return rate(lambda: cb.encode(0, "k", x), len(x)), rate(lambda: cb.decode(0, "k", codes), len(x))
    xt = torch.from_numpy(x)[None, None]  # (1, 1, N, D)
    q, _ = scheme.quantize(xt)
    return rate(lambda: scheme.quantize(xt), len(x)), rate(lambda: scheme.dequantize(q), len(x))


def measure(kbs: list, labels: list[str], seed: int) -> list[dict]:
    """One row per candidate: bits, attention errors (own and held-out codebooks), speeds."""
    d = kbs[0][2][0].keys.shape[-1]
    x0 = np.concatenate([m.keys[0].reshape(-1, d).numpy() for m in kbs[1][2]])  # (N, D) layer-0 keys
    rows = []
    for label in labels:
        acc = dict(stored=0, disk=0, elems=0, cb=0, train=0.0, own=[], held=[], k=[], v=[])
        try:
            schemes = [build(label, CANDIDATES[label], mems, d, seed) for _, _, mems, _, _ in kbs]
        except M3Error as e:
            print(f"skip {label}: {e}", flush=True)
            continue
        for i, (corpus, kb, mems, queries, exact) in enumerate(kbs):
            for j, (scheme, cb_bytes, train_s) in enumerate(schemes):
                # held-out: the codebooks of the next kb
                if j != i and (j != (i + 1) % len(kbs) or not isinstance(scheme, VQScheme)):
                    continue
                kv_hat, stored, disk, elems, rel = run_scheme(scheme, mems)
                err = attention_error(queries, exact, kv_hat)
                if j == i:
                    acc["own"].append(err)
                    acc["k"].append(rel["k"])
                    acc["v"].append(rel["v"])
                    acc["stored"] += stored
                    acc["disk"] += disk
                    acc["elems"] += elems
                    acc["cb"] += cb_bytes
                    acc["train"] += train_s
                else:
                    acc["held"].append(err)
        enc, dec = speed(schemes[1][0], x0)
        e = acc["elems"]
        rows.append(dict(label=label, name=schemes[0][0].name, bits=8 * (acc["stored"] + acc["cb"]) / e,
                         zstd=8 * (acc["disk"] + acc["cb"]) / e, asym=8 * acc["stored"] / e,
                         own=float(np.mean(acc["own"])),
                         held=float(np.mean(acc["held"])) if acc["held"] else float(np.mean(acc["own"])),
                         k=float(np.mean(acc["k"])), v=float(np.mean(acc["v"])), enc=enc, dec=dec,
                         train=acc["train"] / len(kbs), cb=acc["cb"] / len(kbs)))
        r = rows[-1]
        print(f"done {label}: {r['bits']:.3f} b/e, attn {r['own']:.4f}/{r['held']:.4f}, enc {r['enc']:.3g}/s, "
              f"dec {r['dec']:.3g}/s", flush=True)
    return rows


def table(rows: list[dict], title: str) -> None:
    print(f"\n{title}; attention error mean over the kbs; speeds on one thread\n")
    print("| quantizer | scheme | bits/elt stored | zstd | asym | attn err own | attn err held-out | k err | v err "
          "| encode vec/s | decode vec/s | codebooks B/kb | train s/kb |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | `{r['name']}` | {r['bits']:.3f} | {r['zstd']:.3f} | {r['asym']:.3f} | {r['own']:.4f} "
              f"| {r['held']:.4f} | {r['k']:.4f} | {r['v']:.4f} | {r['enc']:.3g} | {r['dec']:.3g} | {r['cb']:.0f} "
              f"| {r['train']:.1f} |")
    paper = next((r for r in rows if r["label"].startswith("vq-paper")), None)
    if paper:
        print("\nvs vq-paper: " + "; ".join(f"{r['label']} encode {r['enc'] / paper['enc']:.0f}x, decode "
                                            f"{r['dec'] / paper['dec']:.1f}x" for r in rows if r is not paper))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plot", type=Path, default=None, help="write the frontier as a PNG here")
    ap.add_argument("--only", default="", help="comma-separated candidate labels (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", type=Path, default=default_model_dir(),
                    help="a checkpoint with m3-memory.json (default: the embedded reader)")
    ap.add_argument("--corpora", default=",".join(CORPORA),
                    help="comma-separated corpus dirs (relative to the repo or absolute), at least two")
    ap.add_argument("--stories", type=int, default=0,
                    help="also stories260K (D = 8) over two kbs of N TinyStories stories each (0: skip)")
    opts = ap.parse_args()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    labels = [c for c in CANDIDATES if not opts.only or c in opts.only.split(",")]
    corpora = [ROOT / c for c in opts.corpora.split(",")]
    assert len(corpora) >= 2, "held-out errors need two kbs"
    with tempfile.TemporaryDirectory(prefix="m3frontier-") as tmp:
        kbs = prepare(corpora, opts.model, read_model_memory(opts.model), Path(tmp) / "reader")
        rows = measure(kbs, labels, opts.seed)
        d = kbs[0][2][0].keys.shape[-1]
        table(rows, f"{opts.model.name} (D={d}), kbs {', '.join(opts.corpora.split(','))}: "
                    f"{sum(len(k[2]) for k in kbs)} references")
        if opts.stories:
            work = Path(tmp) / "stories"
            model = stories260k(work)
            stories = tinystories(2 * opts.stories)
            work.mkdir(parents=True, exist_ok=True)
            paths = []
            for i in range(2):
                paths.append(work / f"stories{i}.jsonl")
                part = stories[i * opts.stories:(i + 1) * opts.stories]
                paths[-1].write_text("".join(json.dumps({"id": f"s{i}-{j:04d}", "text": t}) + "\n"
                                             for j, t in enumerate(part)))
            skbs = prepare(paths, model, {"top_k": 8}, work)
            table(measure(skbs, labels, opts.seed),
                  f"stories260K (D={skbs[0][2][0].keys.shape[-1]}, top-8, default memory layers), two kbs of "
                  f"{opts.stories} TinyStories stories: {sum(len(k[2]) for k in skbs)} references")
    speed80(rows)
    if opts.plot:
        plot(rows, opts.plot, d)


def _numpy_rate(decode, codes: np.ndarray) -> float:
    """Vectors/s of a TableDecoder's numpy path (its C lookups switched off for the timing)."""
    TableDecoder.native = False
    try:
        return _rate(lambda: decode(codes), len(codes))
    finally:
        TableDecoder.native = True


def _quick_paper(factory: str, d: int):
    """The paper's quantizer (OPQ, a 2x14-bit multi-index, PQ) untrained, with 2 OPQ and multi-index
    k-means iterations and 4 PQ ones: for speed only, which does not depend on how well it fits."""
    paper = faiss.index_factory(d, factory)
    pt = faiss.downcast_index(paper)
    faiss.downcast_VectorTransform(pt.chain.at(0)).niter = 2
    two = faiss.downcast_index(pt.index)
    two.q1.cp.niter, two.pq.cp.niter = 2, 4
    return paper


def speed80(rows):
    """The paper's exact quantizer at its own D = 80 against each VQ preset at D = 80, speed only:
    no model here has D = 80, so both are trained on Gaussian vectors (the paper's with 2 k-means
    iterations: speed does not depend on how well its centroids fit)."""
    x = np.random.default_rng(0).normal(size=(20000, 80)).astype(np.float32)  # (N, 80)
    paper = _quick_paper(PAPER, 80)
    t = time.perf_counter()
    paper.train(x)
    print(f"\nD = 80, Gaussian vectors, one thread: `{PAPER}` trained in {time.perf_counter() - t:.0f} s (2 iterations), "
          f"{paper.sa_code_size()} bytes")
    print("| codec at D = 80 | bytes | encode vec/s | decode vec/s | encode vs paper | decode vs paper |\n|---|---|---|---|---|---|")
    base = None
    for name in ["vq-paper", "vq", "vq-pq8-4bit", "vq-pq4-4bit", "vq-pq4-2bit", "vq-pq4", "vq-pq8", "vq-pq4-half",
                 "vq-rq4", "vq-rq8"]:
        factory = resolve(name, 80)[0]
        codec = paper if factory == PAPER else build_codec(factory, 80)
        if codec is not paper:
            codec.train(x[:8192])
        xs = x[:2000] if codec is paper else x
        # encoded as Codebooks.encode encodes in a kb: the grid for vq-grid (the default), else FAISS
        encode = GridEncoder(codec) if ENCODERS.get(resolve_quant(name, 80)) == "grid" else codec.sa_encode
        codes = encode(xs)  # (N, C)
        enc = _rate(lambda: encode(xs), len(xs))
        # decoded as Codebooks.decode decodes in a kb: the table lookup for plain PQ, else FAISS
        decode = TableDecoder.of(codec) or codec.sa_decode
        dec = _rate(lambda: decode(codes), len(codes))
        base = base or (enc, dec)
        print(f"| {name} `{factory}` | {codec.sa_code_size()} | {enc:.3g} | {dec:.3g} | {enc / base[0]:.0f}x | "
              f"{dec / base[1]:.1f}x |")
        if name == "vq":  # kept for the two-thread timing below
            vq_decode, vq_codes = decode, codes
        if name == "vq" and _lookup is not None:  # the same codes through numpy's take (no compiled lookups)
            slow = _numpy_rate(decode, codes)
            print(f"| {name} `{factory}`, numpy's take | {codec.sa_code_size()} | | {slow:.3g} | | {slow / base[1]:.1f}x |")
    # what any decoder of float32 vectors must at least do: write N x 80 floats (its table and
    # codes are small and stay in cache). Filling fresh memory bounds it; a copy, which also reads
    # as many bytes as it writes, is slower and no bound
    out = np.empty_like(x)
    fill = _rate(lambda: np.full(x.shape, 1.0, np.float32), len(x))
    copy = _rate(lambda: np.copyto(out, x), len(x))
    print(f"\nThe decoded bytes alone: writing the {len(x)} float32 vectors into fresh memory runs at {fill:.3g} "
          f"vectors/s ({fill / base[1]:.1f}x the paper's decode, {fill * 80 * 4 / 1e9:.1f} GB/s): no float32 decoder "
          f"at D = 80 beats it. Copying them (read and write) runs at {copy:.3g} ({copy / base[1]:.1f}x)")
    # the same two decoders on two threads each (FAISS's OpenMP; TableDecoder cuts a large batch into
    # one part a FAISS thread): the figures for the paper's quantizer were on two threads
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(2)
    try:
        paper_codes = np.tile(paper.sa_encode(x[:2000]), (10, 1))  # (N, 14)
        p2 = _rate(lambda: paper.sa_decode(paper_codes), len(paper_codes))
        v2 = _rate(lambda: vq_decode(vq_codes), len(vq_codes))
        print(f"\nTwo threads each (faiss.omp_set_num_threads(2)), D = 80: the paper's decoder {p2:.3g} vectors/s, "
              f"vq {v2:.3g}: {v2 / p2:.1f}x")
    finally:
        faiss.omp_set_num_threads(threads)
    decode32()


def decode32():
    """Decode speed at the embedded reader's D = 32: `vq` against vq-paper's quantizer scaled to it
    (paper_factory), trained as in speed80 on Gaussian vectors, one thread, 20,000 vectors a call."""
    x = np.random.default_rng(0).normal(size=(20000, 32)).astype(np.float32)  # (N, 32)
    rates = {}
    for name in ("vq-paper", "vq"):
        factory = resolve(name, 32)[0]
        codec = _quick_paper(factory, 32) if name == "vq-paper" else build_codec(factory, 32)
        codec.train(x)
        codes = codec.sa_encode(x)  # (N, C)
        decode = TableDecoder.of(codec) or codec.sa_decode
        rates[f"{name} `{factory}`"] = _rate(lambda: decode(codes), len(codes))
        if name == "vq" and _lookup is not None:
            rates[f"{name} `{factory}`, numpy's take"] = _numpy_rate(decode, codes)
    base = next(iter(rates.values()))
    print("\nD = 32 (the embedded reader's), decode vec/s: " + "; ".join(f"{k} {v:.3g} ({v / base:.1f}x)" for k, v in rates.items()))


def plot(rows, path: Path, d: int):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        ax.scatter(r["zstd"], r["held"], color="C3" if "paper" in r["label"] else "C0")
        ax.scatter(r["asym"], r["held"], color="C2", marker="x")
        ax.annotate(r["label"], (r["zstd"], r["held"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axvline(1.4, color="grey", ls=":", lw=1)
    ax.axvline(1.0, color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bits per element: dot = on disk (zstd frames + codebooks), x = stored payload without codebooks")
    ax.set_ylabel("attention-output relative error (held-out codebooks)")
    ax.set_title(f"memory quantizers, embedded reader D={d}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

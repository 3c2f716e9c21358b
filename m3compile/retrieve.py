"""Retriever: ranked references for a query text, from the indexes `build_indexes` wrote.

Modes (formats/index.md): "bm25" (lexical), "dense" (cosine over the embedder's unit vectors in
FAISS), "hybrid" (both, the default when a dense index exists). A kb with document indexes
(format_version 2) scores each reference with its document's context: the weighted sum of its own
and its document's normalized scores, so a reference of a relevant document outranks a lexically
similar one of an irrelevant document, whatever the reference width. Older kbs rank references
alone, and fuse hybrid rankings by reciprocal rank.
Indexes are loaded once per Retriever; the embedder on first dense use, and it must be the one the
manifest records (same file digests), or the dense scores would be meaningless.

The optional leakage filter drops a reference whose overlap with the query (paper Eq. 6, §3.6)
exceeds a threshold: overlap(t, r) = N / |r|, N the longest common subsequence of t and r whose
matched positions in t span at most 2|r|. The paper uses 2/3 at evaluation and 0.9 in training.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from m3compile import index as ix
from m3compile.config import check_min_relative_score
from m3compile.errors import REPAIR_HINT, M3Error, damaged_file

try:  # overlap's count in C (m3compile/_overlap.c), built by setup.py where a compiler is
    from m3compile import _overlap
except ImportError:  # no compiler at install: the Python loop below, the same numbers
    _overlap = None

MODES = ("bm25", "dense", "hybrid")
QUERY_BLOCK = 512  # queries scored together by retrieve_many (bounds its memory; rankings are per query)


class Hit(NamedTuple):
    ref_id: int
    score: float  # version 1: BM25 score, cosine, or fused reciprocal-rank score; 2: weighted context score


# ---- Eq. 6 ---------------------------------------------------------------------------------------

def overlap(query_tokens: Sequence[int], ref_tokens: Sequence[int]) -> float:
    """Paper Eq. 6: the share of the reference found, in order, inside a short span of the query.

    Exact. A common subsequence whose positions in t span at most 2|r| lies inside the window of
    W = 2|r| + 1 query tokens that starts at its first match, and every common subsequence of such
    a window spans at most 2|r|; so N = max over window starts a of LCS(t[a:a+W], r). Windows that
    start after |t| - W are suffixes of the last full window and cannot do better. Each window's
    LCS is the bit-parallel DP of Allison & Dix (1986) / Hyyrö (2004): one bit per reference
    position, a column of the classic DP table per query token, in O(|t|·|r|/wordsize).
    Cost: max(1, |t| - W + 1) windows × min(|t|, W) steps; a 64-token query against a 128-token
    reference is one window of 64 steps.

    In C where m3compile._overlap was built (64 reference positions a machine word: 4.0 against
    45 us a check on a training run's chunks, benchmarks/overlap_filter.py), else _overlap_python:
    the same N.

    Args:
        query_tokens: t, token ids of the query.
        ref_tokens: r, token ids of the reference.
    Returns:
        N / |r| in [0, 1]; 0.0 for an empty reference.
    Example:
        >>> overlap([9, 1, 2, 9, 3], [1, 2, 3])
        1.0
    """
    if _overlap is None:
        return _overlap_python(query_tokens, ref_tokens)
    t = query_tokens if isinstance(query_tokens, (list, tuple)) else list(query_tokens)
    r = ref_tokens if isinstance(ref_tokens, (list, tuple)) else list(ref_tokens)
    if not r:
        return 0.0
    try:
        return _overlap.lcs_in_windows(t, r) / len(r)
    except (TypeError, OverflowError):  # tokens that are not 64-bit ints: the loop compares any values
        return _overlap_python(t, r)


def _overlap_python(query_tokens: Sequence[int], ref_tokens: Sequence[int]) -> float:
    """overlap() in Python: the reference of the C count (one Python int of |r| bits a column)."""
    t, n = list(query_tokens), len(ref_tokens)
    if n == 0 or not t:
        return 0.0
    match: dict[int, int] = {}  # token -> bit mask of its positions in r
    for j, tok in enumerate(ref_tokens):
        match[tok] = match.get(tok, 0) | (1 << j)
    full = (1 << n) - 1
    w = min(len(t), 2 * n + 1)
    best = 0
    for a in range(len(t) - w + 1):
        v = full  # zero bits count the LCS so far
        for tok in t[a:a + w]:
            u = v & match.get(tok, 0)
            v = ((v + u) | (v - u)) & full
        best = max(best, n - v.bit_count())
        if best == n:
            break
    return best / n


# ---- the retriever -------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Dense:
    index: object  # faiss.Index
    model: object  # SentenceTransformer
    query_prompt: str | None
    doc_index: object  # faiss.Index over documents (ids: document rows), or None


def _load_faiss(path: Path, section: dict, kb_dir: Path, files: dict | None = None):
    """The FAISS index `section` names, read only once its bytes are the ones the manifest's `files`
    records (when it has them): FAISS's reader is not made for damaged input (it may crash the
    process rather than raise)."""
    import faiss

    file = path / section["file"]
    entry = (files or {}).get(file.relative_to(kb_dir).as_posix()) if file.is_relative_to(kb_dir) else None
    if entry is not None:
        from m3compile.store import sha256_file

        try:
            digest = sha256_file(file)
        except OSError as e:
            raise M3Error(f"cannot read {file} ({e.strerror or e}); {REPAIR_HINT.format(kb=kb_dir)}") from None
        if digest != entry.get("sha256"):
            raise M3Error(f"{file} is not the index the manifest records (sha256 differs); the kb is damaged: "
                          f"{REPAIR_HINT.format(kb=kb_dir)}")
    with damaged_file(file, kb_dir):
        index = faiss.read_index(str(file))
    if section.get("search_params"):
        faiss.ParameterSpace().set_index_parameters(index, section["search_params"])
    return index


def _top(scores: np.ndarray, ids: np.ndarray, depth: int) -> np.ndarray:
    """Positions of the `depth` best positive scores, best first, ties to the lower id; exact, and
    O(R) rather than a sort of every match."""
    hit = np.flatnonzero(scores > 0)
    if len(hit) > depth:
        cut = np.partition(scores[hit], len(hit) - depth)[len(hit) - depth]
        hit = hit[scores[hit] >= cut]  # every tie at the cut stays, for the id order below
    return hit[np.lexsort((ids[hit], -scores[hit]))][:depth]


def _minmax(x: np.ndarray) -> np.ndarray:
    # the worst of a method's top list scores 0, like a reference the method did not return
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.ones_like(x)


REF_TOKEN_BYTES = 1 << 26  # references' token ids the overlap filter keeps between queries, as arrays


class Retriever:
    """Loaded indexes of one kb. Use `Retriever.open(kb_dir)`."""

    def __init__(self, kb_dir: Path, section: dict, embedder: str | None = None, device: str = "cpu"):
        import bm25s

        self.path = Path(kb_dir)  # the generation directory (open() adds it)
        self._kb_dir = self.path.parent if self.path.name.startswith("gen-") else self.path  # for messages
        if section.get("format") != ix.FORMAT:
            raise M3Error(f"{self.path}: the manifest has no {ix.FORMAT} retrieval section; recompile the kb "
                          "with this m3compile")
        if section["format_version"] > ix.FORMAT_VERSION_DOCS:
            raise M3Error(f"{self.path}: retrieval index format_version {section['format_version']} is newer than "
                          f"this m3compile reads ({ix.FORMAT_VERSION_DOCS}); upgrade m3compile")
        self.section = section
        self.mode = section["mode"]
        b = section["bm25"]
        if not (self.path / b["dir"] / "params.index.json").is_file():
            raise M3Error(f"{self.path / b['dir']} is missing or incomplete; the kb is damaged: "
                          f"{REPAIR_HINT.format(kb=self._kb_dir)}")
        with damaged_file(self.path / b["dir"], self._kb_dir):
            self._bm25 = bm25s.BM25.load(str(self.path / b["dir"]), show_progress=False)
        self._bm25_ids = self._corpus_ids(b["dir"], int(self._bm25.scores["num_docs"]),
                                          lambda rows: np.array([r["ref_id"] for r in rows], dtype=np.int64))  # (R,)
        self._tokens = b["tokenizer"]
        self._docs = section.get("documents")  # absent: a version-1 kb, references ranked alone
        if self._docs is not None:
            d = self._docs["bm25"]
            if not (self.path / d["dir"] / "params.index.json").is_file():
                raise M3Error(f"{self.path / d['dir']} is missing or incomplete; the kb is damaged: "
                              f"{REPAIR_HINT.format(kb=self._kb_dir)}")
            with damaged_file(self.path / d["dir"], self._kb_dir):
                self._doc_bm25 = bm25s.BM25.load(str(self.path / d["dir"]), show_progress=False)
            self._by_id = np.argsort(self._bm25_ids)  # (R,) bm25 rows in ref_id order

            def doc_of_row(rows):  # (R,) the document row of each bm25 row; every one in exactly one
                out = np.full(len(self._bm25_ids), -1, dtype=np.int64)
                for j, row in enumerate(rows):
                    at = self._rows(np.asarray(row["ref_ids"], dtype=np.int64), strict=False)
                    if at is None or (out[at] >= 0).any() or len(np.unique(at)) != len(at):
                        raise ValueError(f"document row {j} names references the reference index does not hold once")
                    out[at] = j
                if (out < 0).any():
                    raise ValueError(f"{int((out < 0).sum())} references are in no document row")
                return out

            self._doc_of_row = self._corpus_ids(d["dir"], int(self._doc_bm25.scores["num_docs"]), doc_of_row)
        self._embedder_path = embedder
        self._device = device
        self._files: dict | None = None  # the manifest's files (open sets them)
        self._dense: _Dense | None = None
        self._ref_groups = None  # the overlap filter's token ids (references.TokenGroups), once it runs
        self._tokenizer = None

    @classmethod
    def open(cls, kb_dir: str | Path, manifest: dict | None = None, embedder: str | None = None,
             device: str = "cpu") -> "Retriever":
        """Load a kb's retrieval indexes.

        Args:
            kb_dir: the kb directory.
            manifest: its manifest, a dict or Manifest (read from kb_dir when None); its "retrieval",
                "generation" and "files" are used.
            embedder: where the embedder lives now, if not at the path the manifest records; its
                files must be the same.
            device: torch device for the embedder.
        Returns:
            A Retriever; `retrieve` and `retrieve_many` query it.
        Example:
            >>> r = Retriever.open("kb/"); r.retrieve("what do cats eat", k=3)
            [Hit(ref_id=12, score=1.5), ...]
        """
        if manifest is None:
            from m3compile.manifest import read_manifest

            manifest = read_manifest(Path(kb_dir))
        if not isinstance(manifest, dict):  # a Manifest
            manifest = manifest.to_dict()
        if "retrieval" not in manifest:
            raise M3Error(f"{kb_dir} has no retrieval index (its manifest has no 'retrieval' section); "
                          "recompile it with this m3compile")
        # the index files live in the kb's current generation directory
        r = cls(Path(kb_dir) / manifest.get("generation", ""), manifest["retrieval"], embedder, device)
        r._files = manifest.get("files")  # checksums the dense indexes are checked against before FAISS reads them
        return r

    # -- dense ---------------------------------------------------------------------------------------

    def _load_dense(self) -> _Dense:
        if self._dense is not None:
            return self._dense
        d = self.section["dense"]
        if d is None:
            raise M3Error(f"{self.path} has no dense index (compiled without --embedder); use mode 'bm25' "
                          "or recompile with --embedder DIR")
        e = d["embedder"]
        path = Path(self._embedder_path or e["path"])
        if not path.is_absolute() and not self._embedder_path and (self.path.parent / path).is_dir():
            path = self.path.parent / path  # recorded relative to the kb directory
        if not path.is_dir() and not self._embedder_path and e.get("name") in ix.EMBEDDERS:
            path = Path(ix.resolve_embedder(e["name"]))  # a named embedder may have moved with its package
        if not path.is_dir():
            raise M3Error(f"embedder {path} (recorded in the kb's manifest) is not there; pass the directory "
                          "of the same model as embedder")
        found = ix.embedder_identity(path)
        if found["sha256"] != e["sha256"]:
            changed = sorted(set(found["files"].items()) ^ set(e["files"].items()))
            raise M3Error(f"embedder {path} is not the one this kb was compiled with ({e['path']}; files differ: "
                          f"{', '.join(sorted({k for k, _ in changed})[:3])}); query with that same model")
        docs = (self._docs or {}).get("dense")
        model = ix.load_embedder(path, self._device)
        self._dense = _Dense(_load_faiss(self.path, d, self._kb_dir, self._files), model, e.get("query_prompt"),
                             _load_faiss(self.path, docs, self._kb_dir, self._files) if docs else None)
        return self._dense

    def _dense_ranked(self, texts: list[str], depth: int) -> list[list[Hit]]:
        dense = self._load_dense()
        q = ix.embed(dense.model, texts, dense.query_prompt)  # (Q, E)
        depth = min(depth, dense.index.ntotal)
        scores, ids = dense.index.search(q, depth)  # (Q, depth)
        return [[Hit(int(i), float(s)) for s, i in zip(srow, irow) if i >= 0] for srow, irow in zip(scores, ids)]

    # -- lexical -------------------------------------------------------------------------------------

    def _bm25_scores(self, index, texts: list[str]) -> list[np.ndarray]:
        out = []
        for tokens in ix.bm25_tokenize(texts, self._tokens):
            ids = index.get_tokens_ids(tokens)
            # only stop words or unseen words: nothing matches lexically
            out.append(index.get_scores_from_ids(ids) if ids else np.zeros(index.scores["num_docs"], np.float32))
        return out

    def _bm25_ranked(self, texts: list[str], depth: int) -> list[list[Hit]]:
        out = []
        for scores in self._bm25_scores(self._bm25, texts):  # (R,) each
            top = _top(scores, self._bm25_ids, depth)  # score desc, ref_id asc
            out.append([Hit(int(self._bm25_ids[i]), float(scores[i])) for i in top])
        return out

    # -- document context (format_version 2) ---------------------------------------------------------

    def _corpus_ids(self, name: str, n: int, parse):
        """parse(the rows saved beside the index `name`, which must be its `n` documents), or one
        error naming the file: a corpus.jsonl cut short at a line still parses, and its rows would
        map scores to the wrong references."""
        path = self.path / name / "corpus.jsonl"
        rows = ix.read_corpus(self.path / name)
        try:
            if len(rows) != n:
                raise ValueError(f"{len(rows)} rows for an index of {n}")
            return parse(rows)
        except (KeyError, TypeError, ValueError) as e:
            raise M3Error(f"{path} does not match its index ({e}); the kb is damaged: "
                          f"{REPAIR_HINT.format(kb=self._kb_dir)}") from None

    def _rows(self, ref_ids: np.ndarray, strict: bool = True) -> np.ndarray | None:
        """The bm25 rows of these ref ids; one the index lacks: an assertion (strict: the dense
        indexes' ids were checked against it when written), else None."""
        at = np.searchsorted(self._bm25_ids, ref_ids, sorter=self._by_id)
        pos = self._by_id[np.minimum(at, len(self._by_id) - 1)] if len(self._by_id) else at
        if len(ref_ids) and not (len(self._by_id) and (self._bm25_ids[pos] == ref_ids).all()):
            assert not strict, "a dense index returned an id the bm25 index lacks"
            return None
        return pos

    def _context_ranked(self, texts: list[str], depth: int, mode: str) -> list[list[Hit]]:
        """Score every reference: Σ weights[m] · normalized score m of the reference or of its document."""
        f = self.section["fusion"]
        w = f["weights"]
        use = {"bm25": ("bm25",), "dense": ("dense",), "hybrid": ("bm25", "dense")}[mode]
        n_docs = self._docs["count"]
        totals = [np.zeros(len(self._bm25_ids), dtype=np.float64) for _ in texts]  # (R,) each
        if "bm25" in use:
            for total, s, sd in zip(totals, self._bm25_scores(self._bm25, texts),
                                    self._bm25_scores(self._doc_bm25, texts)):  # (R,), (N,)
                if s.max() > 0:
                    total += w["bm25"] * s / s.max()
                if sd.max() > 0:
                    total += w["bm25_doc"] * (sd / sd.max())[self._doc_of_row]
        if "dense" in use:
            dense = self._load_dense()
            q = ix.embed(dense.model, texts, dense.query_prompt)  # (Q, E)
            # the lists are f["depth"] long whatever k is, so a reference's score does not depend on k
            scores, ids = dense.index.search(q, min(f["depth"], dense.index.ntotal))  # (Q, depth)
            for total, srow, irow in zip(totals, scores, ids):
                keep = irow >= 0
                total[self._rows(irow[keep])] += w["dense"] * _minmax(srow[keep])
            if dense.doc_index is not None:
                scores, ids = dense.doc_index.search(q, min(f["depth"], n_docs))  # (Q, depth)
                for total, srow, irow in zip(totals, scores, ids):
                    keep = irow >= 0
                    add = np.zeros(n_docs)  # (N,)
                    add[irow[keep]] = w["dense_doc"] * _minmax(srow[keep])
                    total += add[self._doc_of_row]
        return [[Hit(int(self._bm25_ids[i]), float(t[i])) for i in _top(t, self._bm25_ids, depth)] for t in totals]

    # -- fusion --------------------------------------------------------------------------------------

    def _ranked_blocks(self, texts: list[str], depth: int, mode: str) -> Iterator[list[Hit]]:
        """_ranked of each text, QUERY_BLOCK queries at a time: scoring holds (queries x documents)
        matrices, which for a training run's 10^5 chunks over a 10^4-document kb took 24 GB."""
        for s in range(0, len(texts), QUERY_BLOCK):
            yield from self._ranked(texts[s:s + QUERY_BLOCK], depth, mode)

    def _ranked(self, texts: list[str], depth: int, mode: str) -> list[list[Hit]]:
        if self._docs is not None:
            return self._context_ranked(texts, depth, mode)
        if mode == "bm25":
            return self._bm25_ranked(texts, depth)
        if mode == "dense":
            return self._dense_ranked(texts, depth)
        f = self.section["fusion"] or ix.FUSION
        # ranks within each method's top f["depth"] (formats/index.md), whatever k is: deeper lists
        # would add 1/(rrf_k + rank) past it, and a reference's score would depend on k
        return [fuse({"bm25": b, "dense": d}, f["rrf_k"], f["weights"])[:depth]
                for b, d in zip(self._bm25_ranked(texts, f["depth"]), self._dense_ranked(texts, f["depth"]))]

    # -- overlap filter ------------------------------------------------------------------------------

    def _reference_tokens(self, ref_ids) -> dict[int, list[int]]:
        """Token ids of these references: the row groups holding them (4,096 rows each) are read and
        kept as arrays, up to REF_TOKEN_BYTES (every reference's ids as Python lists were ~1.6 KB a
        reference: `m3 eval` and `m3 train` filter every chunk)."""
        from m3compile import references as refs_file

        if self._ref_groups is None:
            self._ref_groups = refs_file.TokenGroups(self.path / refs_file.FILE_NAME, REF_TOKEN_BYTES)
        return self._ref_groups.require(ref_ids, self._kb_dir)

    def _query_tokens(self, text: str) -> list[int]:
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            path = self.path / "tokenizer.json"
            if not path.is_file():
                raise M3Error(f"{self.path} has no tokenizer.json, which the overlap filter needs; pass "
                              "query_tokens or recompile the kb")
            with damaged_file(path, self._kb_dir):
                self._tokenizer = Tokenizer.from_file(str(path))
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    # -- public --------------------------------------------------------------------------------------

    def retrieve_many(self, texts: Sequence[str], k: int, mode: str | None = None, max_overlap: float | None = None,
                      query_tokens: Sequence[Sequence[int]] | None = None,
                      min_relative_score: float = 0.0) -> list[list[Hit]]:
        """Top-k references for each text, best first (ties: lower ref_id first).

        Args:
            texts: query texts.
            k: hits per query at most (fewer when fewer references match, e.g. a stop-word-only
                query in bm25 mode gets none).
            mode: "bm25", "dense" or "hybrid"; None = the kb's default (manifest retrieval.mode).
            max_overlap: drop references whose Eq. 6 overlap with the query exceeds this (paper:
                2/3 at evaluation, 0.9 in training); None = no filter.
            query_tokens: the queries' token ids under the kb's tokenizer, for the filter; None =
                tokenize the texts with the kb's tokenizer.json.
            min_relative_score: drop hits scoring under this fraction of the query's best hit (after
                the Eq. 6 filter); 0 keeps all k. A reader reads retrieved memories whatever their
                score, and a small model copies a fact of the same kind from a weakly matching
                reference of another entity (examples/README.md, "A floor under the retrieval
                score"); the embedded reader's m3-memory.json sets 0.7 (formats/model-memory.md).
        Returns:
            One list of Hit(ref_id, score) per text.
        Example:
            >>> r.retrieve_many(["cats", "dogs"], k=2, mode="bm25")
            [[Hit(ref_id=3, score=1.5), Hit(ref_id=0, score=1.27)], [Hit(ref_id=5, score=1.48)]]
        """
        if isinstance(texts, str):  # list("cats") would be four one-letter queries
            raise M3Error("retrieve_many takes a list of query strings; for one, use retrieve(text) or [text]")
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise M3Error(f"a query is a string, not {next(t for t in texts if not isinstance(t, str))!r}")
        mode = mode or self.mode
        if mode not in MODES:
            raise M3Error(f"retrieval mode {mode!r} is not one of {', '.join(MODES)}")
        if isinstance(k, bool) or not hasattr(k, "__index__") or k < 1:  # ints and numpy integers
            raise M3Error(f"{k!r} references asked for (query -k, eval/generate --refs): ask for at least 1 "
                          "(generate --no-memory reads none)")
        if check_min_relative_score(min_relative_score) > 0:
            return [_above(hits, min_relative_score)
                    for hits in self.retrieve_many(texts, k, mode, max_overlap, query_tokens)]
        if max_overlap is not None and not 0 <= max_overlap <= 1:
            raise M3Error(f"--max-overlap {max_overlap} must be a fraction in [0, 1] (the paper drops references "
                          "overlapping more than 2/3 at evaluation, 0.9 in training)")
        if max_overlap is None or max_overlap >= 1:  # an overlap is at most 1: nothing to drop
            return list(self._ranked_blocks(texts, k, mode))
        if query_tokens is None:
            query_tokens = [self._query_tokens(t) for t in texts]
        if len(query_tokens) != len(texts):
            raise M3Error(f"query_tokens holds {len(query_tokens)} token lists for {len(texts)} queries: give one a query")
        depth = 2 * k + 8  # a few spares: most queries leak into no reference at all
        out = []
        for text, qt, ranked in zip(texts, query_tokens, self._ranked_blocks(texts, depth, mode)):
            d = depth
            while True:  # widen this query's candidates until k survive or the kb runs out
                refs = self._reference_tokens([h.ref_id for h in ranked])
                kept = [h for h in ranked if overlap(qt, refs[h.ref_id]) <= max_overlap]
                if len(kept) >= k or len(ranked) < d or d >= self.section["count"]:
                    break
                d *= 4
                ranked = self._ranked([text], d, mode)[0]
            out.append(kept[:k])
        return out

    def retrieve(self, text: str, k: int, mode: str | None = None, max_overlap: float | None = None,
                 query_tokens: Sequence[int] | None = None, min_relative_score: float = 0.0) -> list[Hit]:
        """Top-k references for one text; see `retrieve_many`."""
        qt = None if query_tokens is None else [query_tokens]
        return self.retrieve_many([text], k, mode, max_overlap, qt, min_relative_score)[0]


def _above(hits: list[Hit], fraction: float) -> list[Hit]:
    """The hits scoring at least `fraction` of the first (best) one's score; all of them where that
    score is not positive (a v1 kb's dense cosines can be), which gives no ratio to compare."""
    if not hits or hits[0].score <= 0:
        return hits
    return [h for h in hits if h.score >= fraction * hits[0].score]


def fuse(rankings: dict[str, list[Hit]], rrf_k: int, weights: dict[str, float]) -> list[Hit]:
    """Weighted reciprocal-rank fusion: score(d) = Σ_m weights[m] / (rrf_k + rank_m(d)), ranks from 1.

    A reference absent from one ranking gets nothing from it. Ties go to the lower ref_id.
    """
    score: dict[int, float] = {}
    for name, hits in rankings.items():
        for rank, h in enumerate(hits, start=1):
            score[h.ref_id] = score.get(h.ref_id, 0.0) + weights[name] / (rrf_k + rank)
    return [Hit(i, s) for i, s in sorted(score.items(), key=lambda kv: (-kv[1], kv[0]))]


"""Stage 2: cut each document's tokens into references of at most `max_tokens` tokens.

The paper tokenizes its knowledge base with the model's tokenizer and cuts it into 128-token
references (Memory³ §3.1, §4.4), consecutive and non-overlapping. `boundary="fixed"` reproduces
that exactly; `boundary="sentence"` may end a reference earlier, at the last paragraph, sentence or
word end that keeps it at least `min_fill` full, so a memory holds whole sentences where it can.
The rule, and how character spans follow token offsets, are specified in formats/chunking.md.

A reference's token ids are a slice of the whole document's encoding, never a re-encoding of its
text: BPE merges at a cut could otherwise change the tokens. That encoding is made in windows
(`encode_windows`), so a document of any length is chunked in bounded memory (issue 16) with the
ids and offsets of a whole-document encoding.
"""

import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from m3compile.corpus import Document
from m3compile.errors import M3Error

CHUNK_RULE_VERSION = 1  # bump when a change moves any cut; record it beside boundary and min_fill
BOUNDARIES = ("fixed", "sentence")  # "fixed": the paper's windows; "sentence": see formats/chunking.md
SENTENCE_END = ".!?。！？"  # a sentence ends with one of these ...
CLOSERS = "\"')]}»”’」』"  # ... optionally followed by closing quotes or brackets
WIDE_SENTENCE_END = "。！？"  # full-width ends need no whitespace after them (CJK has none)
SCAN_CHARS = 256  # how far back a boundary test looks through whitespace and closers
NONE, WORD, SENTENCE, PARAGRAPH = 0, 1, 2, 3  # kinds of break at a cut, weakest first
ENCODE_WINDOW = 1 << 16  # characters of a document encoded at a time (grows where no seam agrees)
SEAM_CHARS = 512  # a window's cut lies between 2 and 1 seams before its end
SEAM_TRIES = 4  # cut candidates tried in a window before it grows
ENCODE_GROUP = 4  # windows encoded a tokenizer call (on the tokenizer's threads)


@dataclass(frozen=True)
class Reference:
    doc_id: str  # the document it was cut from
    source: str  # that document's file, relative to the corpus root
    index: int  # 0-based position within the document
    char_start: int  # text == document.text[char_start:char_end]
    char_end: int
    token_ids: tuple[int, ...]  # (T,) with 1 <= T <= max_tokens; no special tokens
    text: str


def chunk_documents(
    docs: Iterable[Document],
    tokenizer,
    max_tokens: int = 128,
    boundary: str = "sentence",
    min_fill: float = 0.75,
) -> Iterator[Reference]:
    """Cut documents into references, one document in memory at a time.

    Args:
        docs: documents, e.g. from `corpus.iter_documents`.
        tokenizer: has `encode_with_offsets(text) -> (ids, [(start, end), ...])`.
        max_tokens: the most tokens in one reference (the paper's 128).
        boundary: "sentence" (default) ends a reference at the last paragraph break, else the last
            sentence end, else the last word end, among the cuts that leave it at least
            `min_fill * max_tokens` tokens; "fixed" always cuts at `max_tokens` (the paper's
            windows). formats/chunking.md has the exact rule.
        min_fill: the least fraction of `max_tokens` a non-final "sentence" reference holds.
    Returns:
        An iterator of `Reference`; per document their token ids concatenate to the document's
        encoding and their texts to the document's text.
    Example:
        >>> refs = list(chunk_documents(iter_documents(root, report), tok, boundary="fixed"))
    """
    if boundary not in BOUNDARIES:
        raise M3Error(f"unknown chunk boundary {boundary!r}; use one of {', '.join(BOUNDARIES)}")
    if max_tokens < 1:
        raise M3Error(f"max_tokens is {max_tokens}; a reference needs at least 1 token")
    if not 0.0 < min_fill <= 1.0:
        raise M3Error(f"min_fill is {min_fill}; use a fraction in (0, 1], e.g. 0.75")
    min_tokens = max(1, math.ceil(min_fill * max_tokens))
    for group in _short_runs(docs, ENCODE_WINDOW):
        if len(group) == 1:
            yield from _chunk_one(group[0], tokenizer, max_tokens, boundary, min_tokens)
            continue
        # short documents are encoded together on the tokenizer's threads (one window each)
        for doc, (ids, offsets) in zip(group, _encode_many(tokenizer, [d.text for d in group]), strict=True):
            yield from _chunk_one(doc, tokenizer, max_tokens, boundary, min_tokens, iter([(list(ids), _spans(offsets))]))


def _short_runs(docs: Iterable[Document], window: int) -> Iterator[list[Document]]:
    """The documents in order, in runs of consecutive ones of at most `window` characters (at most
    ENCODE_GROUP windows' worth of text a run); a longer document is a run of its own."""
    run, size = [], 0
    for doc in docs:
        n = len(doc.text)
        if run and (n > window or size + n > ENCODE_GROUP * window):
            yield run
            run, size = [], 0
        run.append(doc)
        size += n
        if n > window:
            yield run
            run, size = [], 0
    if run:
        yield run


def encode_windows(text: str, tokenizer, window: int | None = None,
                   seam: int | None = None) -> Iterator[tuple[list[int], np.ndarray]]:
    """A document's encoding, in consecutive pieces of at most `window` characters: concatenated,
    the pieces' ids and (document) offsets, (n, 2) arrays, are `tokenizer.encode_with_offsets(text)`'s.

    The text is encoded in windows that start every `window - seam` characters, each with two
    seams of context on both sides, ENCODE_GROUP windows a call (a tokenizer with
    `encode_batch_with_offsets`, as ours, runs them on its threads without the GIL: chunking 1 MB
    of books took 0.96-1.06 s instead of 1.51-1.95 s on 2 cores). Two neighbouring windows are
    joined at a token start c up to a
    seam before the second window's base that splits no character and where both encodings
    agree, ids and offsets, from c to a seam past that base: the tokenizer then looks across c in
    neither direction (a pre-tokenizer split: whitespace, punctuation), so each side's tokens are
    the whole document's. Where no candidate agrees, the rest of the document is encoded one
    window after the other (`_sequential_windows`), which grows a window until a cut agrees.
    """
    window, seam = window or ENCODE_WINDOW, seam or SEAM_CHARS
    n = len(text)
    if n <= window:  # one window
        yield from _sequential_windows(text, tokenizer, 0, window, seam)
        return
    bases = range(0, n, window - seam)  # the last window reaches the text's end
    prev, first, cut = None, 0, 0  # the window before, its first token not yet given out, where that token starts
    cut_lo = 0  # where the encoding that agreed at `cut` began: its left context is the one checked there
    for g in range(0, len(bases), ENCODE_GROUP):
        group = bases[g:g + ENCODE_GROUP]
        spans = [(max(0, b - 2 * seam), min(n, b + window - seam + 2 * seam)) for b in group]
        for b, (lo, _), (ids, offsets) in zip(group, spans, _encode_many(tokenizer, [text[a:z] for a, z in spans])):
            piece = (list(ids), _spans(offsets) + lo)
            if prev is None:  # the first window starts at the text's start: all its tokens count
                prev = piece
                continue
            joint = _join(prev, piece, b, seam)
            if joint is None:
                # from the last cut, with the left context its join was checked with: another one
                # (the seam) may split the text before it otherwise (digits grouped in threes from
                # where the context starts), and the tokens from the cut on would not be the document's
                yield from _sequential_windows(text, tokenizer, cut, window, seam, context=cut - cut_lo)
                return
            j, k = joint
            yield prev[0][first:j], prev[1][first:j]
            prev, first, cut, cut_lo = piece, k, piece[1][k][0], lo
    yield prev[0][first:], prev[1][first:]


def _join(prev, piece, base: int, seam: int) -> tuple[int, int] | None:
    """Where two neighbouring windows agree: (j, k), token j of `prev` and token k of `piece`
    starting at the same clean cut c in [base - seam, base], with equal ids and offsets from there
    to base + seam; None if no candidate (SEAM_TRIES from the right) agrees."""
    (pi, po), (ni, no) = prev, piece
    ps, ns = po[:, 0], no[:, 0]
    _, clean, _ = _cuts(po, int(ps[0]) if len(ps) else 0)
    candidates = np.flatnonzero(clean & (ps >= base - seam) & (ps <= base))
    for j in candidates[candidates > 0][::-1][:SEAM_TRIES].tolist():
        c = int(ps[j])
        at = np.flatnonzero(ns == c)
        if not len(at) or at[0] == 0 or no[at[0] - 1, 1] > c:  # no token of `piece` starts there, or one straddles it
            continue
        k = int(at[0])
        jj = j + int(np.count_nonzero(ps[j:] < base + seam))
        kk = k + int(np.count_nonzero(ns[k:] < base + seam))
        if pi[j:jj] == ni[k:kk] and np.array_equal(po[j:jj], no[k:kk]):
            return j, k
    return None


def _spans(offsets) -> np.ndarray:
    """(n, 2) int64 array of a tokenizer's (start, end) offsets."""
    return np.fromiter(itertools.chain.from_iterable(offsets), dtype=np.int64, count=2 * len(offsets)).reshape(-1, 2)


def _encode_many(tokenizer, texts: list[str]) -> list:
    """encode_with_offsets of each text: in one batch call where the tokenizer has one."""
    batch = getattr(tokenizer, "encode_batch_with_offsets", None)
    return batch(texts) if batch is not None else [tokenizer.encode_with_offsets(t) for t in texts]


def _sequential_windows(text: str, tokenizer, base: int, window: int, seam: int, context: int | None = None):
    """The encoding of text[base:] (base 0 or a cut where the tokenizer looks across in neither
    direction), one window after another.

    Each window text[base:base+window] is encoded with `seam` characters of the text before it as
    left context (the first window with `context` characters, the context `base` was checked
    with, where given; the tokens starting before `base` are dropped), and a cut is sought at a token
    start between 2 and 1 seams before the window's end that splits no character: the window's
    tokens from the cut on must equal, ids and offsets, those of text[cut:base+window] encoded
    with its own left context. Where they agree, the tokenizer does not look across the cut, so
    the tokens before it are the whole document's; the next window starts at the cut. Where no
    candidate agrees, the window doubles, up to the rest of the document: exact, but no longer
    bounded (formats/chunking.md).
    """
    n, w = len(text), window
    ctx = seam if context is None else context
    while n - base > w:
        ids, offsets = _stable(_encode_from(text, base, base + w, ctx, tokenizer), base, ctx)
        _, clean, _ = _cuts(offsets, base)
        candidates = [j for j, (a, _) in enumerate(offsets)
                      if j > 0 and clean[j] and base + w - 2 * seam <= a <= base + w - seam]
        for j in candidates[::-1][:SEAM_TRIES]:
            c = offsets[j][0]
            if _encode_from(text, c, base + w, seam, tokenizer) == (ids[j:], offsets[j:]):
                yield ids[:j], _spans(offsets[:j])
                base, w, ctx = c, window, seam  # the next window: the context this cut was checked with
                break
        else:
            w *= 2
    ids, offsets = _stable(_encode_from(text, base, n, ctx, tokenizer), base, ctx)
    yield ids, _spans(offsets)


def _encode_from(text: str, base: int, end: int, context: int, tokenizer):
    """The tokens of text[base - context:end] that start at or after `base`, with document
    offsets; None if a token of that encoding straddles `base` (no seam agrees there)."""
    lo = max(0, base - context)
    ids, offsets = tokenizer.encode_with_offsets(text[lo:end])
    k = 0
    while k < len(offsets) and offsets[k][0] + lo < base:
        k += 1
    if k > 0 and offsets[k - 1][1] + lo > base:
        return None
    return list(ids[k:]), [(a + lo, b + lo) for a, b in offsets[k:]]


def _stable(encoded, base: int, seam: int) -> tuple[list[int], list[tuple[int, int]]]:
    # a window starts at 0 or at a cut its predecessor agreed on, with the same left context: a
    # token across it means a tokenizer that looks further right than a seam; never drop tokens
    if encoded is None:
        raise M3Error(f"the tokenizer's encoding around character {base} of a document changes with text "
                      f"more than {seam} characters away, so it cannot be encoded in windows; "
                      "please report this tokenizer to m3compile")
    return encoded


def _cuts(offsets: list[tuple[int, int]], furthest: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """For each token e: the char position of a cut before it, whether that cut is clean, and the
    furthest end after the last token.

    The cut before token e sits at max(start of token e, furthest end of the tokens before it),
    `furthest` being that of the tokens before these. Byte-fallback pieces of one character all
    carry that character's span, and a SentencePiece prefix "▁" carries the first character's
    span; a cut among them moves to after the shared character, so spans stay contiguous and
    non-overlapping. The cut is clean when token e starts at or after that furthest end, i.e. when
    it splits no character. Every token before a cut is in an earlier reference, so the furthest
    end is a running maximum over the document and the cuts do not depend on where references end:
    _chunk_one takes a whole encoded piece's cuts in one numpy pass instead of a Python loop per
    reference (1 MB of books: 1.5 against 1.6 s of reading and chunking, the same references).
    """
    spans = offsets if isinstance(offsets, np.ndarray) else _spans(offsets)  # (n, 2)
    starts, ends = spans[:, 0], spans[:, 1]
    before = np.maximum.accumulate(np.concatenate(([furthest], ends)))  # before[i]: max(furthest, ends[:i])
    return np.maximum(starts, before[:-1]), starts >= before[:-1], int(before[-1])


def _chunk_one(doc: Document, tokenizer, max_tokens: int, boundary: str, min_tokens: int, pieces=None):
    # the document's tokens stream in from encode_windows (or `pieces`, its encoding made with
    # others'); the buffer holds those not yet cut (ids[head:]), about a window's worth, with each
    # token's cut position and cleanness
    text, pieces = doc.text, pieces if pieces is not None else encode_windows(doc.text, tokenizer)
    ids, pos, clean, head, done = [], np.empty(0, np.int64), np.empty(0, bool), 0, False
    furthest, char_start, index = 0, 0, 0  # furthest: the furthest end of the tokens streamed in
    while True:
        while not done and len(ids) - head <= max_tokens:
            piece = next(pieces, None)
            if piece is None:
                done = True
            else:
                p, c, furthest = _cuts(piece[1], furthest)
                ids, pos, clean = ids[head:] + piece[0], np.concatenate((pos[head:], p)), np.concatenate((clean[head:], c))
                head = 0
        left = len(ids) - head
        if left == 0:
            return
        last = done and left <= max_tokens  # this reference ends the document
        # the cuts before tokens head..head+max_tokens: a reference that is not the last ends at one
        end = left if last else _pick_cut(text, pos[head:head + max_tokens + 1].tolist(),
                                           clean[head:head + max_tokens + 1].tolist(), 0, max_tokens, min_tokens,
                                           boundary)
        # the first reference starts at 0 and the last ends at the text's end, so text that no
        # token covers (leading or trailing whitespace some tokenizers drop) is kept too
        char_end = len(text) if last else int(pos[head + end])
        assert char_start <= char_end, (doc.doc_id, index, char_start, char_end)
        yield Reference(
            doc.doc_id, doc.source, index, char_start, char_end, tuple(ids[head:head + end]), text[char_start:char_end]
        )
        head, char_start, index = head + end, char_end, index + 1


def _pick_cut(text, pos, clean, start: int, hard: int, min_tokens: int, boundary: str) -> int:
    # hard = start + max_tokens < T: the window is full and must end somewhere in (start, hard]
    if boundary == "fixed":
        return hard  # the paper's window, even where it splits a byte-fallback character
    best = {}  # kind -> the largest cut of that kind in reach
    for e in range(hard, start + min_tokens - 1, -1):
        if clean[e]:
            kind = _boundary_kind(text, pos[e])
            if kind == PARAGRAPH:
                return e
            best.setdefault(kind, e)
    for kind in (SENTENCE, WORD):
        if kind in best:
            return best[kind]
    # no break in reach (e.g. one 100-token word): the longest window that splits no character
    for e in range(hard, start, -1):
        if clean[e]:
            return e
    return hard


def _boundary_kind(text: str, c: int) -> int:
    """The strongest break that ends just before char c: PARAGRAPH, SENTENCE, WORD or NONE."""
    # the whitespace run right before c
    i, newlines, floor = c, 0, max(0, c - SCAN_CHARS)
    while i > floor and text[i - 1].isspace():
        i -= 1
        newlines += text[i] == "\n"
    if newlines >= 2:
        return PARAGRAPH
    # sentence and word ends need whitespace on one side of the cut (or the text's end there)
    spaced = i < c or c == len(text) or text[c].isspace()
    while i > floor and text[i - 1] in CLOSERS:
        i -= 1
    if i > 0 and text[i - 1] in SENTENCE_END and (spaced or text[i - 1] in WIDE_SENTENCE_END):
        return SENTENCE
    return WORD if spaced else NONE

import json
import math
import re
from itertools import accumulate

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from m3compile.chunk import Reference, chunk_documents
from m3compile.corpus import CorpusReport, Document, iter_documents
from m3compile.errors import M3Error
from m3compile.tokenizer import Tokenizer

from conftest import SHARED_DATA as DATA  # noqa: E402

TRAIN = """It rained all morning. We stayed in and read old books by the fire.

The sun came out at last, so we went for a long walk. "Look!" said Anna. "A heron (a grey one)."
Mr. Smith waved from the café; the price was 3.50 euros. Was it? Yes!

Once upon a time, there was a little girl named Lily. She loved to play outside in the park.
One day, she saw a big, red ball. She ran to it and kicked it high into the sky.
"""

# the test document: accents, CJK (no spaces, full-width stops), emoji, tabs, runs of spaces and
# blank lines, so byte fallback, ▁ prefixes and uncovered whitespace all meet the cuts
DOC = (
    (TRAIN * 3)
    + "Übermäßig naïve façade.  Twice  spaced.\tTabbed.\n\n\n日本語の文です。二つ目の文！三つ目？🙂🙂 end 🚀.\n"
    + TRAIN
)


def _sp_pieces(vocab_size: int, texts: list[str]) -> tuple[dict, list]:
    # SentencePiece-like pieces (never crossing a ▁ word start, no newline piece), laid out as
    # Llama-2's vocab: <unk> <s> </s>, the 256 byte tokens, then the pieces
    t = HFTokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace("▁", prepend_scheme="first"), pre_tokenizers.Punctuation("isolated")]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=60, show_progress=False
    )
    t.train_from_iterator(texts, trainer)
    model = json.loads(t.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]):
        if "\n" not in piece:
            vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return vocab, [m for m in merges if "\n" not in m[0] + m[1]]


def llama2_legacy(texts: list[str], vocab_size: int = 400) -> HFTokenizer:
    """Llama-2's tokenizer.json layout: byte-fallback BPE, normalizer Prepend(▁) + Replace(' ', ▁)."""
    vocab, merges = _sp_pieces(vocab_size, texts)
    tok = HFTokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tok


def llama_metaspace(texts: list[str]) -> HFTokenizer:
    """Newer SentencePiece conversions: a Metaspace pre-tokenizer instead of the normalizer."""
    vocab, merges = _sp_pieces(400, texts)
    tok = HFTokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace("▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Metaspace("▁", prepend_scheme="first", split=False)
    return tok


def byte_level(texts: list[str]) -> HFTokenizer:
    """GPT-2 / Llama-3 style byte-level BPE."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, initial_alphabet=alphabet, show_progress=False))
    return tok


def word_level(texts: list[str]) -> HFTokenizer:
    """Words and punctuation; whitespace belongs to no token, so offsets have gaps."""
    tok = HFTokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[UNK]"], show_progress=False))
    return tok


def _save(tmp_path_factory, name: str, hf: HFTokenizer) -> Tokenizer:
    d = tmp_path_factory.mktemp(name)
    hf.save(str(d / "tokenizer.json"))
    return Tokenizer.from_dir(d)


@pytest.fixture(scope="module", params=["llama2_legacy", "llama_metaspace", "byte_level", "word_level"])
def tok(request, tmp_path_factory):
    return _save(tmp_path_factory, request.param, globals()[request.param]([TRAIN]))


@pytest.fixture(scope="module")
def words(tmp_path_factory):
    return _save(tmp_path_factory, "words", word_level([TRAIN]))


# --- an independent chunker, written from formats/chunking.md with regexes, for parity ---

_CLOSE = r"[\"')\]}»”’」』]*"


def _kind(text: str, c: int) -> int:
    # the look-back skips at most 256 characters of whitespace and closers, then reads the
    # character before them (unbounded, a cut after 300 spaces was a sentence end here and a word
    # break in the spec and the code: the parity tests never covered long whitespace)
    floor = max(0, c - 256)
    ws = re.search(r"\s*$", text[floor:c]).group()
    if ws.count("\n") >= 2:
        return 3
    spaced = bool(ws) or c == len(text) or text[c].isspace()
    i = c - len(ws)
    i -= len(re.search(_CLOSE + r"$", text[floor:i]).group())
    end = text[i - 1] if i > 0 else ""
    if end and end in ".!?。！？" and (spaced or end in "。！？"):
        return 2
    return 1 if spaced else 0


def _expected_cuts(text, offsets, max_tokens, boundary, min_fill):
    n, cuts, start = len(offsets), [], 0
    # a cut before token e is clean when token e starts at or after every earlier token's end
    furthest = list(accumulate((end for _, end in offsets), max, initial=0))  # furthest[e]: max end before e
    clean = [e == n or offsets[e][0] >= furthest[e] for e in range(n + 1)]
    char = [max(offsets[e][0], furthest[e]) for e in range(n)]
    while start < n:
        hard = min(start + max_tokens, n)
        end = hard
        if hard < n and boundary == "sentence":
            lo = start + math.ceil(min_fill * max_tokens)
            cands = [(_kind(text, char[e]), e) for e in range(lo, hard + 1) if clean[e]]
            cands = [(k, e) for k, e in cands if k > 0]
            if cands:  # the strongest kind, and the latest cut of that kind
                end = max(cands)[1]
            else:
                end = max([e for e in range(start + 1, hard + 1) if clean[e]], default=hard)
        cuts.append((start, end))
        start = end
    return cuts


def _check_invariants(doc, refs, tok, max_tokens):
    ids, offsets = tok.encode_with_offsets(doc.text)
    assert [r.index for r in refs] == list(range(len(refs)))
    assert all(r.doc_id == doc.doc_id and r.source == doc.source for r in refs)
    assert all(1 <= len(r.token_ids) <= max_tokens for r in refs)
    assert [t for r in refs for t in r.token_ids] == ids
    assert "".join(r.text for r in refs) == doc.text
    assert refs[0].char_start == 0 and refs[-1].char_end == len(doc.text)
    for a, b in zip(refs, refs[1:]):
        assert a.char_end == b.char_start, (a, b)
    assert all(r.text == doc.text[r.char_start : r.char_end] for r in refs)


@pytest.mark.parametrize("max_tokens", [4, 16, 128])
@pytest.mark.parametrize("boundary", ["fixed", "sentence"])
def test_invariants_and_parity(tok, max_tokens, boundary):
    doc = Document("d", "d.txt", DOC)
    refs = list(chunk_documents([doc], tok, max_tokens=max_tokens, boundary=boundary))
    _check_invariants(doc, refs, tok, max_tokens)
    ids, offsets = tok.encode_with_offsets(doc.text)
    starts = [0]
    for r in refs:
        starts.append(starts[-1] + len(r.token_ids))
    assert list(zip(starts, starts[1:])) == _expected_cuts(doc.text, offsets, max_tokens, boundary, 0.75)
    if boundary == "fixed":
        assert [list(r.token_ids) for r in refs] == [ids[i : i + max_tokens] for i in range(0, len(ids), max_tokens)]


@pytest.mark.parametrize("max_tokens", [16, 128])
def test_sentence_mode_fill_and_clean_spans(tok, max_tokens):
    doc = Document("d", "d.txt", DOC)
    refs = list(chunk_documents([doc], tok, max_tokens=max_tokens, boundary="sentence", min_fill=0.75))
    assert all(len(r.token_ids) >= math.ceil(0.75 * max_tokens) for r in refs[:-1])
    # no character is split: every token's span lies inside its reference's span
    _, offsets = tok.encode_with_offsets(doc.text)
    i = 0
    for r in refs:
        for start, end in offsets[i : i + len(r.token_ids)]:
            assert r.char_start <= start and end <= r.char_end, (r, start, end)
        i += len(r.token_ids)


def test_llama_legacy_prefix_and_byte_fallback(tmp_path_factory):
    tok = _save(tmp_path_factory, "legacy", llama2_legacy([TRAIN]))
    doc = Document("d", "d.txt", "🙂 café\n\nok")
    ids, offsets = tok.encode_with_offsets(doc.text)
    assert offsets[0] == (0, 1) and offsets[1][0] == 0  # the prepended ▁ overlaps the emoji's bytes
    for max_tokens in range(1, len(ids) + 1):
        refs = list(chunk_documents([doc], tok, max_tokens=max_tokens, boundary="fixed"))
        _check_invariants(doc, refs, tok, max_tokens)
    # in sentence mode references decode back to their own text (SentencePiece drops one leading space)
    refs = list(chunk_documents([Document("d", "d.txt", DOC)], tok, max_tokens=16))
    assert all(tok.decode(r.token_ids) == r.text.removeprefix(" ") for r in refs)


def test_worked_example(words):
    # the example in formats/chunking.md
    text = "It rained. We stayed in and read.\n\nThe sun came out at last, so we went for a long walk."
    doc = Document("ex", "ex.txt", text)
    sentence = [(r.text, len(r.token_ids)) for r in chunk_documents([doc], words, max_tokens=10)]
    assert sentence == [
        ("It rained. We stayed in and read.\n\n", 9),
        ("The sun came out at last, so we went ", 10),
        ("for a long walk.", 5),
    ]
    fixed = [(r.text, len(r.token_ids)) for r in chunk_documents([doc], words, max_tokens=10, boundary="fixed")]
    assert fixed == [
        ("It rained. We stayed in and read.\n\nThe ", 10),
        ("sun came out at last, so we went for ", 10),
        ("a long walk.", 4),
    ]


def test_references_never_span_documents(words):
    docs = [Document(f"d{i}", "x.jsonl", "Short one. " * (i + 1)) for i in range(5)]
    refs = list(chunk_documents(docs, words, max_tokens=7))
    for doc in docs:
        own = [r for r in refs if r.doc_id == doc.doc_id]
        _check_invariants(doc, own, words, 7)
    assert [r.doc_id for r in refs] == sorted(r.doc_id for r in refs)
    assert isinstance(refs[0], Reference) and isinstance(refs[0].token_ids, tuple)


def test_bad_options(words):
    docs = [Document("d", "d.txt", "text")]
    for kwargs, match in [
        ({"boundary": "word"}, "unknown chunk boundary"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_fill": 0.0}, "min_fill"),
        ({"min_fill": 1.5}, "min_fill"),
    ]:
        with pytest.raises(M3Error, match=match):
            list(chunk_documents(docs, words, **kwargs))


BOOK = DATA / "gutenberg" / "pg1342.txt"


@pytest.mark.skipif(not BOOK.is_file(), reason="shared data absent: no gutenberg/pg1342.txt")  # ~3.5 s
def test_gutenberg_fill_rate(tmp_path_factory):
    (doc,) = iter_documents(BOOK, CorpusReport())
    tok = _save(tmp_path_factory, "pg", llama2_legacy([doc.text], vocab_size=8000))
    refs = list(chunk_documents([doc], tok, max_tokens=128, boundary="sentence", min_fill=0.75))
    _check_invariants(doc, refs, tok, 128)
    fills = [len(r.token_ids) / 128 for r in refs[:-1]]
    assert min(fills) >= 0.75
    # formats/chunking.md: sentence mode keeps non-final references >= 88 % full on average on books
    assert sum(fills) / len(fills) >= 0.88, sum(fills) / len(fills)
    fixed = sum(1 for _ in chunk_documents([doc], tok, max_tokens=128, boundary="fixed"))
    assert len(refs) <= 1.15 * fixed, (len(refs), fixed)


def test_stories260k_llama_tokenizer(stories260k):
    # the real Llama-2 SentencePiece vocabulary of stories260K (512 pieces, byte fallback), converted
    tok = Tokenizer.from_dir(stories260k)
    text = (DATA / "tinystories-val" / "tinystories_val_first1000.txt").read_text(encoding="utf-8")[:60_000]
    doc = Document("ts", "ts.txt", text + "\nÜber 日本語。🙂 done.")
    for boundary in ("fixed", "sentence"):
        refs = list(chunk_documents([doc], tok, max_tokens=128, boundary=boundary))
        _check_invariants(doc, refs, tok, 128)
    assert all(tok.decode(r.token_ids) == r.text.removeprefix(" ") for r in refs)
    assert all(len(r.token_ids) >= 96 for r in refs[:-1])


@pytest.mark.parametrize("boundary", ["fixed", "sentence"])
def test_windowed_encoding_is_the_whole_documents(tok, boundary, monkeypatch):
    """issue 16: a document is encoded in windows (bounded memory for a single-line 50 MB file).
    With windows of a few hundred characters, the references must be those of a whole-document
    encoding (the independent chunker above), for every tokenizer family."""
    import m3compile.chunk as chunk

    doc = Document("d", "d.txt", DOC * 4 + " ".join(DOC.split()) * 3)  # paragraphs, then one long line
    ids, offsets = tok.encode_with_offsets(doc.text)
    pieces = list(chunk.encode_windows(doc.text, tok, window=300, seam=40))
    assert [t for p, _ in pieces for t in p] == ids
    assert [tuple(o) for _, p in pieces for o in p.tolist()] == [tuple(o) for o in offsets]
    monkeypatch.setattr(chunk, "ENCODE_WINDOW", 300)
    monkeypatch.setattr(chunk, "SEAM_CHARS", 40)
    refs = list(chunk_documents([doc], tok, max_tokens=16, boundary=boundary))
    _check_invariants(doc, refs, tok, 16)
    starts = list(accumulate((len(r.token_ids) for r in refs), initial=0))
    assert list(zip(starts, starts[1:])) == _expected_cuts(doc.text, offsets, 16, boundary, 0.75)


def test_long_whitespace_runs_cut_as_the_spec_says(tok):
    # runs of 250-300 spaces and newlines around sentence ends: the look-back bound (256) decides
    # between sentence, paragraph and word cuts there
    text = "".join(f"Line {i} ends here.{' ' * (250 + 7 * (i % 8))}" + ("\n" * (i % 3)) + f"word{i} and more words "
                   for i in range(40))
    doc = Document("d", "d.txt", text)
    ids, offsets = tok.encode_with_offsets(text)
    refs = list(chunk_documents([doc], tok, max_tokens=16, boundary="sentence"))
    _check_invariants(doc, refs, tok, 16)
    starts = list(accumulate((len(r.token_ids) for r in refs), initial=0))
    assert list(zip(starts, starts[1:])) == _expected_cuts(text, offsets, 16, "sentence", 0.75)


def test_a_fallback_after_a_join_keeps_the_context_the_join_checked():
    # Llama-3 groups a run of digits in threes from where the run starts: where a window's left
    # context starts decides its tokens. After a join at cut c (checked with the context its window
    # had), a refused join re-encoded from c with a seam of context instead, which split the digits
    # before c otherwise: an M3Error on a valid document here, and with a BPE of Llama-3's rules at
    # the default window sizes, other token ids than the whole document's, silently
    import random

    from tokenizers import Regex

    vocab = {"<unk>": 0, " ": 1, "x": 2, ".": 3}
    for n in (1, 2, 3):
        for i in range(10 ** n):
            vocab.setdefault(f"{i:0{n}d}", len(vocab))
    hf = HFTokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"\p{N}{1,3}|[^\p{N}]"), "isolated")
    import m3compile.chunk as chunk

    digits = Tokenizer(hf=hf, bos_id=None, eos_id=None)
    rng = random.Random(0)
    for pre in range(12):
        text = ("x" * pre + "".join(rng.choice("0123456789") for _ in range(3000)) + ". "
                + "".join(rng.choice("0123456789 ") for _ in range(3000)))
        ids, offsets = digits.encode_with_offsets(text)
        pieces = list(chunk.encode_windows(text, digits, window=300, seam=40))
        assert [t for p, _ in pieces for t in p] == ids, pre
        assert [tuple(o) for _, p in pieces for o in p.tolist()] == [tuple(o) for o in offsets], pre


def test_windows_stay_bounded_for_every_tokenizer_family(tok):
    """With the left context, every family (Llama-2 legacy and Metaspace prefixes included) finds a
    seam in every window: no piece is longer than a window, on paragraphs and on one long line."""
    import m3compile.chunk as chunk

    for text in (DOC * 20, " ".join((DOC * 20).split())):
        pieces = list(chunk.encode_windows(text, tok, window=300, seam=40))
        assert len(pieces) > len(text) // 300 - 1
        assert max(p[-1][1] - p[0][0] for _, p in pieces if len(p)) <= 300


def test_windows_joined_one_after_another_where_neighbours_disagree(tok, monkeypatch):
    """Windows are encoded several at a time and joined where two neighbours agree; where they do
    not, the rest of the document is encoded one window after another from the last join. Both
    paths give the whole document's encoding: here the third join is refused."""
    import m3compile.chunk as chunk

    text = " ".join((DOC * 20).split())
    ids, offsets = tok.encode_with_offsets(text)
    joins, sequential = [], []
    real_join, real_sequential = chunk._join, chunk._sequential_windows

    def join(prev, piece, base, seam):
        joins.append(base)
        return None if len(joins) == 3 else real_join(prev, piece, base, seam)

    def one_at_a_time(text, tokenizer, base, window, seam, context=None):
        sequential.append((base, context))
        return real_sequential(text, tokenizer, base, window, seam, context)

    monkeypatch.setattr(chunk, "_join", join)
    monkeypatch.setattr(chunk, "_sequential_windows", one_at_a_time)
    pieces = list(chunk.encode_windows(text, tok, window=300, seam=40))
    # from the second join's cut, with the left context that join checked (its window's: 1-2 seams)
    assert len(joins) == 3 and len(sequential) == 1 and sequential[0][0] > 0 and 40 <= sequential[0][1] <= 80
    assert [t for p, _ in pieces for t in p] == ids
    assert [tuple(o) for _, p in pieces for o in p.tolist()] == [tuple(o) for o in offsets]
    assert max(p[-1][1] - p[0][0] for _, p in pieces if len(p)) <= 300


def test_short_documents_encoded_together_are_each_their_own(tok, monkeypatch):
    """Runs of short documents are encoded in one batch call; each document's references must be
    those it gets alone, and a long document between them is cut in windows as before."""
    import m3compile.chunk as chunk

    monkeypatch.setattr(chunk, "ENCODE_WINDOW", 300)
    monkeypatch.setattr(chunk, "SEAM_CHARS", 40)
    docs = [Document(f"d{i}", f"d{i}.txt", DOC[: 40 + 20 * i]) for i in range(12)]
    docs.insert(5, Document("long", "long.txt", DOC * 5))
    runs = [[d.doc_id for d in run] for run in chunk._short_runs(docs, 300)]
    assert ["long"] in runs and max(len(r) for r in runs) > 2, runs
    together = list(chunk_documents(docs, tok, max_tokens=16))
    alone = [r for d in docs for r in chunk_documents([d], tok, max_tokens=16)]
    assert together == alone


def test_cuts_are_the_per_token_rule_for_any_split():
    """_chunk_one takes each encoded piece's cuts at once (chunk._cuts, a running maximum in
    numpy); they must be the per-token rule of formats/chunking.md, written here as the loop the
    chunker used per reference, for any split of the token stream, with spans that share
    characters (byte fallback) and tokens that cover nothing."""
    import random

    from m3compile.chunk import _cuts

    def per_token(offsets, furthest=0):
        pos, clean = [], []
        for start, end in offsets:
            pos.append(max(start, furthest))
            clean.append(start >= furthest)
            furthest = max(furthest, end)
        return pos, clean, furthest

    rng = random.Random(3)
    for _ in range(200):
        offsets, c = [], 0
        for _ in range(rng.randint(1, 60)):
            kind = rng.random()
            if kind < 0.2 and offsets:  # another byte of the previous character
                offsets.append(offsets[-1])
            elif kind < 0.3:  # a token that covers nothing (a dropped prefix)
                offsets.append((c, c))
            else:
                start = c + rng.randint(0, 2)
                c = start + rng.randint(1, 5)
                offsets.append((start, c))
        whole_pos, whole_clean, whole_last = per_token(offsets)
        split = rng.randint(0, len(offsets))
        pos_a, clean_a, furthest = _cuts(offsets[:split], 0)
        pos_b, clean_b, last = _cuts(offsets[split:], furthest)
        assert pos_a.tolist() + pos_b.tolist() == whole_pos
        assert clean_a.tolist() + clean_b.tolist() == whole_clean
        assert last == whole_last


def test_a_tokenizer_saved_with_padding_truncation_or_special_tokens_cuts_text_as_text(tmp_path):
    # a tokenizer.json saved with padding and truncation on padded a short document to its batch
    # neighbours' length (references of pad ids, and other references than alone) and cut a long
    # one short; "</s>" written in a document became the control token. The text is cut as text
    hf = llama2_legacy([TRAIN])
    (tmp_path / "plain").mkdir()
    hf.save(str(tmp_path / "plain" / "tokenizer.json"))
    plain = Tokenizer.from_dir(tmp_path / "plain")
    hf.enable_padding(pad_id=0, pad_token="<unk>")
    hf.enable_truncation(max_length=8)
    hf.save(str(tmp_path / "tokenizer.json"))
    saved = json.loads((tmp_path / "tokenizer.json").read_text())
    assert saved["padding"] is not None and saved["truncation"] is not None
    tok = Tokenizer.from_dir(tmp_path)
    docs = [Document("short", "s.txt", "Once upon a time."), Document("long", "l.txt", TRAIN * 2),
            Document("eos", "e.txt", "The tag </s> and <s> are text here.")]
    together = list(chunk_documents(docs, tok, max_tokens=16))
    assert together == [r for d in docs for r in chunk_documents([d], tok, max_tokens=16)]
    assert together == list(chunk_documents(docs, plain, max_tokens=16))
    for d in docs:
        refs = [r for r in together if r.doc_id == d.doc_id]
        assert "".join(r.text for r in refs) == d.text
        assert [i for r in refs for i in r.token_ids] == tok.encode(d.text)
    eos = [i for r in together if r.doc_id == "eos" for i in r.token_ids]
    assert tok.eos_id not in eos and tok.bos_id not in eos and tok.decode(eos) == "The tag </s> and <s> are text here."

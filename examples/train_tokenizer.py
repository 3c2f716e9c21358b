"""Train the example model's tokenizer: a Llama-style BPE on the example encyclopedia.

Llama layout (as Hugging Face's converted Llama tokenizers): ids 0/1/2 are `<unk>`, `<s>`, `</s>`,
ids 3..258 the byte tokens `<0x00>`..`<0xFF>` (byte_fallback, so no text is ever `<unk>`), then the
learned pieces. Spaces become `▁` and a `▁` is prepended to the first word (Metaspace, scheme
"first"); punctuation and newlines are split off, and digits are split one by one as SentencePiece's
`split_digits` does for Llama, so every year and count is spelled out digit by digit.
`decode(encode(x)) == x` for any text that does not start with a space.

The `tokenizers` BPE trainer has no notion of byte tokens, so this trains a plain BPE and then
lays out the vocabulary itself: specials, bytes, then the trained pieces in the trainer's order.

    python examples/train_tokenizer.py                       # -> examples/tokenizer/
    python examples/train_tokenizer.py --vocab-size 2048 --out /tmp/tok
"""

import argparse
import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

HERE = Path(__file__).resolve().parent
SPECIALS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 as in Llama
BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))  # ids 3..258
ALPHABET = ["▁", "\n"] + [chr(c) for c in range(33, 127)]  # base pieces, space is ▁
DEFAULT_VOCAB_SIZE = 1024  # total, specials and bytes included
MAX_LENGTH = 2048  # model_max_length written to tokenizer_config.json


def training_texts(corpus_dir: Path, facts_dir: Path | None, entities=None) -> list[str]:
    """Articles (sorted by file name), then restatement texts in file order; all entities or `entities`."""
    paths = sorted(Path(corpus_dir).glob("*.md"))
    texts = [p.read_text(encoding="utf-8") for p in paths if entities is None or p.stem in entities]
    assert texts, f"no .md articles in {corpus_dir}"
    if facts_dir is not None:
        for line in (Path(facts_dir) / "restatements.jsonl").read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            if entities is None or r["entity"] in entities:
                texts.append(r["text"])
    return texts


def _pre_tokenizer():
    # newlines and punctuation are their own pre-tokens, so a name or a year never shares a piece
    # with the full stop after it and a fact's answer starts and ends on piece boundaries
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="isolated"),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
        pre_tokenizers.Punctuation(behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
    ])


def train(texts: list[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """A byte-fallback BPE tokenizer with at most `vocab_size` tokens.

    Fewer when pairs seen at least twice run out, as on the 24-article default corpus.
    """
    n_fixed = len(SPECIALS) + len(BYTE_TOKENS)
    assert vocab_size > n_fixed + 64, vocab_size
    plain = Tokenizer(models.BPE())
    plain.pre_tokenizer = _pre_tokenizer()
    # every printable ASCII character is a piece even if the training text lacks it (a "?" that
    # only questions use); anything else falls back to bytes
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - n_fixed, min_frequency=2, show_progress=False,
                                  special_tokens=[], initial_alphabet=ALPHABET)
    plain.train_from_iterator(texts, trainer=trainer)
    learned = json.loads(plain.to_str())["model"]
    pieces = sorted(learned["vocab"], key=learned["vocab"].get)  # the trainer's id order
    assert not set(pieces) & set(SPECIALS + BYTE_TOKENS), "a learned piece collides with a reserved token"
    vocab = {tok: i for i, tok in enumerate(SPECIALS + BYTE_TOKENS + tuple(pieces))}
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                               fuse_unk=True))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.pre_tokenizer = _pre_tokenizer()
    # the decoder of Hugging Face's Llama tokenizers: ▁ -> space, bytes -> text, drop the prepended space
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return tok


def tokenizer_config() -> dict:
    # PreTrainedTokenizerFast loads tokenizer.json as is; LlamaTokenizerFast would rebuild parts of it
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
            "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
            "clean_up_tokenization_spaces": False, "model_max_length": MAX_LENGTH}


def save(tok: Tokenizer, out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2, sort_keys=True) + "\n")
    return out_dir


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus-dir", type=Path, default=HERE / "corpus")
    ap.add_argument("--facts-dir", type=Path, default=HERE / "facts")
    ap.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    ap.add_argument("--out", type=Path, default=HERE / "tokenizer")
    ap.add_argument("--entities-file", type=Path, help="train only on these entity ids, one per line")
    a = ap.parse_args(argv)
    entities = None
    if a.entities_file:
        entities = {ln.strip() for ln in a.entities_file.read_text().splitlines() if ln.strip()}
    texts = training_texts(a.corpus_dir, a.facts_dir, entities)
    tok = train(texts, a.vocab_size)
    bad = [t for t in texts if tok.decode(tok.encode(t, add_special_tokens=False).ids) != t]
    assert not bad, f"{len(bad)} texts do not round-trip, e.g. {bad[0][:80]!r}"
    save(tok, a.out)
    n_tokens = sum(len(tok.encode(t, add_special_tokens=False).ids) for t in texts)
    print(f"vocab {tok.get_vocab_size()} -> {a.out}; {len(texts)} texts, {sum(map(len, texts))} chars, "
          f"{n_tokens} tokens")


if __name__ == "__main__":
    main()

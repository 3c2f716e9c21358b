"""Shared fixtures: the real third-party data beside the repo, the converted stories260K model,
and tiny random Hugging Face checkpoints made on the spot."""

import json
import os
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("M3_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def shared(name: str) -> Path:
    """Path of a dataset under ../shared/data, or skip the test with the reason."""
    p = SHARED_DATA / name
    if not p.exists():
        pytest.skip(f"{p} is absent: this test needs the project's shared data (../shared/data/{name})")
    return p


def tinystories(n: int) -> list[str]:
    text = (shared("tinystories-val") / "tinystories_val_first1000.txt").read_text(encoding="utf-8")
    stories = [s.strip() for s in text.split("<|endoftext|>")]
    return [s for s in stories if s][:n]


@pytest.fixture(scope="session")
def stories260k(tmp_path_factory) -> Path:
    """stories260K (llama2.c, trained on TinyStories) converted to a Hugging Face directory."""
    from m3compile.llama2c import ensure_converted

    return ensure_converted(shared("stories260k"), tmp_path_factory.mktemp("stories260k"))


def write_word_tokenizer(path: Path, vocab_size: int) -> None:
    """A real tokenizers WordLevel tokenizer.json with <unk>/<s>/</s> = 0/1/2 and words w3..wN."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))

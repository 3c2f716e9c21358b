"""The runtime on a real trained model: stories260K (llama2.c, TinyStories) converted to HF format."""

import math

import pytest

from conftest import tinystories
from m3compile.lm import generate, token_nll
from m3compile.model import load_checkpoint

pytestmark = pytest.mark.slow


def test_perplexity_on_tinystories_validation(stories260k):
    ck = load_checkpoint(stories260k)
    stories = tinystories(200)
    assert len(stories) == 200
    seqs = [([ck.tokenizer.bos_id] + ck.tokenizer.encode(s))[:512] for s in stories]
    first100, rest = token_nll(ck.model, seqs[:100]), token_nll(ck.model, seqs[100:])
    ppl = math.exp((first100[0] + rest[0]) / (first100[1] + rest[1]))
    # published validation loss 1.297 (ppl 3.66); SOURCE.md measured 1.2752 on the first 100
    assert ppl < 4.5, ppl
    assert first100[1] == 32997 and abs(first100[0] / first100[1] - 1.2752) < 0.001, first100


def test_greedy_generation_is_the_reference_story(stories260k):
    ck = load_checkpoint(stories260k)
    prompt = [ck.tokenizer.bos_id] + ck.tokenizer.encode("Once upon a time")
    text = ck.tokenizer.decode(generate(ck.model, prompt, max_new_tokens=40))
    # llama2.c's own greedy decode of this model (doc/stories260K.md, SOURCE.md), after the prompt
    expect = ", there was a little girl named Lily. She loved to play outside in the park. One day, she saw a big"
    assert ("Once upon a time" + text).startswith("Once upon a time" + expect), text
    words = "".join(c if c.isalpha() else " " for c in text.lower()).split()
    known = set(" ".join(tinystories(1000)).lower().replace(".", " ").replace(",", " ").split())
    assert len(words) >= 20 and all(w in known for w in words), words


def test_tokenizer_round_trips_the_stories(stories260k):
    tok = load_checkpoint(stories260k).tokenizer
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    for s in tinystories(200):
        assert tok.decode(tok.encode(s)) == s

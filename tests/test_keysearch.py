"""KeySearch (m3compile/keysearch.py): the kb's memory keys searched with the model's own queries.

A tiny random Llama (GQA: 4 query heads, 2 kv heads) compiles a 3-document corpus; the scores are
checked against the reader's attention logits computed head by head, and the "pre" keys against
the model's pre-RoPE keys of each reference.
"""

import numpy as np
import pytest
import torch

from m3compile.errors import M3Error


@pytest.fixture(scope="module")
def tiny_kb(tmp_path_factory):
    pytest.importorskip("transformers", reason="transformers builds the tiny test checkpoint")
    from conftest import make_checkpoint
    from m3compile.config import CompileConfig
    from m3compile.kb import load_kb_model, open_kb
    from m3compile.pipeline import compile_kb

    root = tmp_path_factory.mktemp("keys")
    make_checkpoint(root / "model", "LlamaForCausalLM", {})
    (root / "corpus").mkdir()
    for i, words in enumerate(["w5 w6 w7 w8 w9 w10", "w30 w31 w32 w33", "w60 w61 w62 w63 w64"]):
        (root / "corpus" / f"d{i}.txt").write_text(words)
    compile_kb(CompileConfig(corpus=str(root / "corpus"), model=str(root / "model"), max_tokens=8, top_k=3),
               root / "kb")
    kb = open_kb(root / "kb")
    return kb, load_kb_model(kb)


def test_post_scores_are_the_readers_attention_logits(tiny_kb):
    from m3compile.keysearch import KeySearch
    from m3compile.model import apply_rope, rope_cos_sin

    kb, ck = tiny_kb
    ks = KeySearch(kb, ck, rope="post")
    text = "w31 w32 w7"
    ids = ck.tokenizer.encode(text)
    tokens = torch.tensor([ks.layout.head + ids])  # (1, T0)
    pos = torch.tensor([ks.layout.positions(len(ids))])  # (1, T0)
    kv = ck.model.forward_kv(tokens, ks.layers, positions=pos)
    cos, sin = rope_cos_sin(ck.model.inv_freq, pos, torch.float32)
    n_rep = ck.args.n_heads // ck.args.n_kv_heads
    got = ks.scores(text)
    for i, ref_id in enumerate(ks.ref_ids):
        m = kb.memory(int(ref_id))
        best = []
        for li, layer in enumerate(ks.layers):
            q = apply_rope(kv[layer].q_pre, cos, sin)[0, :, -len(ids):]  # (N, T, D)
            for n in range(ck.args.n_heads):
                logits = q[n] @ m.keys[li, n // n_rep].T / ck.args.head_dim ** 0.5  # (T, K)
                best += logits.max(-1).values.tolist()
        assert got[i] == pytest.approx(np.mean(best), rel=1e-5, abs=1e-6), ref_id
    hits = ks.retrieve(text, 2)
    assert [h.ref_id for h in hits] == [int(ks.ref_ids[j]) for j in np.lexsort((ks.ref_ids, -got))[:2]]
    assert hits[0].score >= hits[1].score


def test_pre_keys_are_the_references_own_pre_rope_keys(tiny_kb):
    from m3compile.encode import encode_batch
    from m3compile.keysearch import KeySearch

    kb, ck = tiny_kb
    ks = KeySearch(kb, ck, rope="pre")
    refs = kb.references().select(["ref_id", "token_ids", "quant_max_err"]).to_pylist()
    enc = encode_batch(ck.model, [r["token_ids"] for r in refs], kb.spec.prefix_ids, ks.layers)
    for b, r in enumerate(refs):
        m = kb.memory(r["ref_id"])
        i = int(np.flatnonzero(ks.ref_ids == r["ref_id"])[0])
        for li, layer in enumerate(ks.layers):
            k_pre = enc.kv[layer].k_pre[b]  # (H, T, D)
            want = torch.gather(k_pre, 1, m.positions[li][..., None].expand(-1, -1, k_pre.shape[-1]))  # (H, K, D)
            # int8 keys: the rotation back mixes each pair's quantization errors, at most √2 times the
            # reference's recorded max (0.05 before: ~30x that bound, a scale 5-10 % off passed)
            bound = 2 ** 0.5 * r["quant_max_err"] * (1 + 1e-3) + 1e-5
            torch.testing.assert_close(ks.keys[i, li, :, :want.shape[1]], want, atol=bound, rtol=0)
    assert ks.retrieve("", 3) and len(ks.retrieve("w60", 10)) == len(refs)
    with pytest.raises(M3Error, match="rope"):
        KeySearch(kb, ck, rope="sideways")


def test_scores_do_not_depend_on_the_batch_and_a_kb_too_large_is_one_error(tiny_kb, monkeypatch):
    # references are scored in batches sized by a byte budget (4096 a batch was ~8 GiB of scores
    # for a 7B shape); one reference a batch gives the same scores. Stacked keys that would pass
    # half of the machine's memory are refused before any is read (an out-of-memory kill before)
    from m3compile import keysearch
    from m3compile.keysearch import KeySearch

    kb, ck = tiny_kb
    ks = KeySearch(kb, ck)
    whole = ks.scores("w31 w32 w7 w60")
    monkeypatch.setattr(keysearch, "SCORE_BYTES", 1)
    assert np.array_equal(ks.scores("w31 w32 w7 w60"), whole)
    assert ks.keys.shape[0] == len(kb.references()) == 3
    # a string was searched a character at a time, and a bool k taken as 1, as Retriever refuses
    for bad, k in (("w31 w32", 2), (["w31"], True), ([b"w31"], 2)):
        with pytest.raises(M3Error, match="list of query strings|whole number|a query is a string"):
            ks.retrieve_many(bad, k)
    monkeypatch.setattr(keysearch, "_physical_memory", lambda: ks.keys.numel() * 4)  # the stack is all of it
    with pytest.raises(M3Error, match="--mode keys holds every stored key as float32.*use --mode bm25"):
        KeySearch(kb, ck)

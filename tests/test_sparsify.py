"""Encode + sparsify against an independent implementation of the paper's selection rule (§3.3)
computed in float64 from transformers' own projections and key-value cache."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CHECKPOINT_CASES, SHARED_DATA, make_checkpoint, reference_rule, shared
from m3compile.encode import encode_batch
from m3compile.model import load_checkpoint
from m3compile.sparsify import select_topk, token_scores
from m3compile.tokenizer import write_prefix

pytest.importorskip("transformers", reason="transformers is the test-only parity oracle")


@pytest.mark.parametrize("case", ["llama-gqa", "llama-bias", "mistral-head-dim", "qwen2-bias-tied", "llama3-rope"])
def test_selection_matches_independent_rule(tmp_path, case):
    arch, overrides = CHECKPOINT_CASES[case]
    ref = make_checkpoint(tmp_path, arch, overrides)
    ref.config._attn_implementation = "eager"
    ck = load_checkpoint(tmp_path)
    prefix = write_prefix(ck.tokenizer, "w7 w9")
    assert prefix == [1, 7, 9]
    g = torch.Generator().manual_seed(5)
    # distinct tokens within a reference, so no exact ties make the comparison ambiguous;
    # one reference shorter than k keeps all its tokens
    refs = [torch.randperm(117, generator=g)[:n].add(3).tolist() for n in (20, 13, 5)]
    layers = [0, 2]
    batch = encode_batch(ck.model, refs, prefix, layers)
    got = select_topk(batch, k=8)
    for toks, mem in zip(refs, got, strict=True):
        expect = reference_rule(ref, prefix, toks, layers, 8)
        kr = min(8, len(toks))
        assert mem.keys.shape == (2, ck.args.n_kv_heads, kr, ck.args.head_dim)
        assert mem.positions.shape == (2, ck.args.n_kv_heads, kr)
        for li, (kept, keys, values) in enumerate(expect):
            assert mem.positions[li].tolist() == kept.tolist()
            assert (mem.keys[li] - keys).abs().max() <= 1e-5
            assert (mem.values[li] - values).abs().max() <= 1e-5


def test_ties_go_to_lower_positions(tmp_path):
    make_checkpoint(tmp_path, "LlamaForCausalLM", {})
    ck = load_checkpoint(tmp_path)
    # at layer 0 a repeated token has identical pre-RoPE key and query: every score ties
    batch = encode_batch(ck.model, [[5] * 20], write_prefix(ck.tokenizer, ""), [0])
    mem = select_topk(batch, k=8)[0]
    assert mem.positions.tolist() == [[list(range(8))] * ck.args.n_kv_heads]


def test_prefix_and_padding_take_no_part(tmp_path):
    make_checkpoint(tmp_path, "LlamaForCausalLM", {})
    ck = load_checkpoint(tmp_path)
    prefix = write_prefix(ck.tokenizer, "w7 w9")
    short, long = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20], list(range(30, 70))
    alone = select_topk(encode_batch(ck.model, [short], prefix, [0, 1]), k=4)[0]
    padded = select_topk(encode_batch(ck.model, [long, short], prefix, [0, 1]), k=4)[1]
    # the same reference batched beside a longer one keeps the same tokens and the same vectors
    assert torch.equal(alone.positions, padded.positions)
    assert (alone.keys - padded.keys).abs().max() <= 1e-5
    # and never a prefix or padding position
    assert int(padded.positions.max()) < len(short)


def test_the_kept_prefix_cache_follows_the_weights(tmp_path):
    """Without autograd, the write prefix's key-values are kept on the model between batches
    (encode._prefix_cache): they must equal a fresh prefill, and an in-place weight update (an
    optimizer step between two evaluations in `m3 train`) must not leave them stale."""
    make_checkpoint(tmp_path, "LlamaForCausalLM", {})
    ck = load_checkpoint(tmp_path)
    prefix = write_prefix(ck.tokenizer, "w7 w9")
    refs = [[11, 12, 13, 14, 15, 16, 17, 18, 19, 20], list(range(30, 50))]

    def kept(grad: bool):
        with torch.set_grad_enabled(grad):
            return [m.keys.detach() for m in select_topk(encode_batch(ck.model, refs, prefix, [0, 1]), k=4)]

    first = kept(False)
    assert getattr(ck.model, "_m3_prefix_cache", None) is not None, "no cache was kept: the test tests nothing"
    assert all(torch.equal(a, b) for a, b in zip(first, kept(False)))  # from the cache
    assert all(torch.equal(a, b) for a, b in zip(first, kept(True)))  # computed afresh, with autograd
    with torch.no_grad():
        ck.model.layers[0].attention.wk.weight.mul_(1.5)  # in place, as an optimizer step
    after = kept(False)
    assert all(torch.equal(a, b) for a, b in zip(after, kept(True)))
    assert not all(torch.equal(a, b) for a, b in zip(first, after))


def test_encode_speed_benchmark_keeps_the_tokens_of_the_encoder_before(tmp_path):
    """benchmarks/encode_speed.py on real references of the books: the encoder now (prefix
    prefilled, keys x queries scores) keeps the same tokens as the recipe before it (prefix in
    every sequence, einsum scores), and the benchmark runs. Speed is not checked here."""
    shared("gutenberg")
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "encode_speed.py"
    proc = subprocess.run([sys.executable, str(bench), "--refs", "96", "--rounds", "1", "--sizes", "16", "32",
                           "--threads", "1"], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, M3_SHARED_DATA=str(SHARED_DATA)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "96 references of width 32" in proc.stdout and "same kept tokens as before: True" in proc.stdout
    assert "| now@32 |" in proc.stdout


def test_bf16_selection_ranks_as_float64_up_to_its_rounding():
    """A bf16 model's selection computes q.k as a bf16 matmul rounded to bf16 once (sparsify).
    Against the rule in float64 on the same bf16 q and k: every kept token outscores every
    dropped one but for swaps within the rounding's bound, and such swaps are rare."""
    g = torch.Generator().manual_seed(3)
    B, N, H, T, D, k = 6, 8, 2, 48, 32, 8
    q = (torch.randn(B, N, T, D, generator=g) * 0.6).bfloat16()
    kk = (torch.randn(B, H, T, D, generator=g) * 0.6).bfloat16()
    lengths = [48, 48, 30, 17, 48, 9]
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    got = token_scores(q, kk, mask)  # (B, H, T)
    R = N // H
    swaps = heads = 0
    for b, n in enumerate(lengths):
        for h in range(H):
            qs = q[b, h * R:(h + 1) * R, :n].double().reshape(R * n, D)  # the group's real queries
            logits = kk[b, h, :n].double() @ qs.T / D**0.5  # (keys, queries)
            exact = torch.logsumexp(logits, dim=1)  # (n,)
            bound = 2 * float(logits.abs().max()) * 2**-8  # bf16 rounds a logit by <= |x| 2^-9
            kept = set(torch.topk(got[b, h, :n], min(k, n)).indices.tolist())
            dropped = set(range(n)) - kept
            assert all(got[b, h, j] == float("-inf") for j in range(n, T))
            if dropped:
                assert min(exact[j] for j in kept) >= max(exact[j] for j in dropped) - bound
            swaps += kept != set(torch.topk(exact, min(k, n)).indices.tolist())
            heads += 1
    assert swaps <= heads // 10, (swaps, heads)

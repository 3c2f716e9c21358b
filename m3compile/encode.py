"""Encode stage: run each reference alone through the first memory layers (paper §3.1-3.2).

Input per reference = the write prefix (the paper's modified BOS `<s>Reference:`) + its tokens.
Prefix tokens sit at positions 0..p-1 and reference token j at position p+j; a batch is right-
padded and padding is masked. Only layers up to the last memory layer run (App. A.2). The
prefix's key-values, the same in every reference, are computed once (Transformer.prefill, kept on
the model while its weights are unchanged) and the references attend to them as a cache: the
result is that of the whole sequence up to float rounding.

Shape letters: B references in the batch, T reference tokens (prefix dropped), N query heads,
H kv heads, D head dim.
"""

import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from m3compile.model import KVCache, LayerKV, Transformer, kept_while_unchanged


@dataclass(frozen=True)
class EncodedBatch:
    kv: dict[int, LayerKV]  # layer -> q_pre (B, N, T, D), k_pre/k_post/v (B, H, T, D), prefix dropped
    mask: torch.Tensor  # (B, T) bool, True at real reference tokens
    n_tokens: tuple[int, ...]  # real tokens per reference


def encode_batch(model: Transformer, token_lists: Sequence[Sequence[int]], prefix_ids: Sequence[int],
                 layers: Sequence[int], pad_to: int | None = None) -> EncodedBatch:
    """Forward the references (each alone, behind the prefix) and keep the memory layers' q/k/v.

    pad_to fixes the padded width, and on the CPU every matmul outside attention runs on whole
    blocks of model.PackedRows.ROW_BLOCK rows: a reference's memory does not depend on which batch
    it was in (tests/test_model.py checks it bit for bit, float32 and bfloat16, at the embedded
    reader's widths and at 768/2048), so resumed and incremental compiles reproduce the bytes of a
    full one. Autograd
    follows the caller's grad mode: spec.memorize is the entry point that sets it.
    """
    p = len(prefix_ids)
    lengths = [len(t) for t in token_lists]
    assert min(lengths) > 0 and (pad_to is None or max(lengths) <= pad_to), (lengths, pad_to)
    B, T = len(token_lists), pad_to or max(lengths)
    ids = np.zeros((B, T), dtype=np.int64)  # (B, T)
    mask = np.arange(T)[None, :] < np.asarray(lengths)[:, None]  # (B, T)
    ids[mask] = np.fromiter(itertools.chain.from_iterable(token_lists), dtype=np.int64, count=sum(lengths))
    dev = model.device
    ids, mask = torch.from_numpy(ids).to(dev), torch.from_numpy(mask).to(dev)
    positions = (p + torch.arange(T, device=dev))[None]  # (1, T): reference token j at p + j in every row
    # the prefix's key-values are the same in every reference (attention is causal): computed once
    cache = _prefix_cache(model, prefix_ids, max(layers)).expand(B) if p else None
    kv = model.forward_kv(ids, layers, attention_mask=mask, positions=positions, cache=cache)
    return EncodedBatch(kv=kv, mask=mask, n_tokens=tuple(lengths))


def _prefix_cache(model: Transformer, prefix_ids: Sequence[int], last: int) -> KVCache:
    """The write prefix's key-values in layers 0..last (one row), kept on the model between batches
    while its weights are unchanged: a per-batch prefill cost as much as it saved at 16 references
    a batch. With autograd on (training) they are computed each time and carry gradients."""
    tokens = torch.tensor([list(prefix_ids)], device=model.device)
    if torch.is_grad_enabled():
        return _prefill(model, tokens, last)
    return kept_while_unchanged(model, "_m3_prefix_cache", model.parameters(), lambda: _prefill(model, tokens, last),
                                key=(tuple(prefix_ids), last))


def _prefill(model: Transformer, tokens: torch.Tensor, last: int) -> KVCache:
    """model.prefill on one CPU thread: a matmul of a few rows gives other bits on 2 threads than
    on 1 (measured), and memories must not depend on --cpus-per-worker or OMP_NUM_THREADS."""
    if model.device.type != "cpu":
        return model.prefill(tokens, last)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return model.prefill(tokens, last)
    finally:
        torch.set_num_threads(threads)

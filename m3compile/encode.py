"""Encode stage: run each reference alone through the first memory layers (paper §3.1-3.2).

Input per reference = the write prefix (the paper's modified BOS `<s>Reference:`) + its tokens.
Prefix tokens sit at positions 0..p-1 and reference token j at position p+j; a batch is right-
padded and padding is masked. Only layers up to the last memory layer run (App. A.2).

Shape letters: B references in the batch, T reference tokens (prefix dropped), N query heads,
H kv heads, D head dim.
"""

from dataclasses import dataclass
from typing import Sequence

import torch

from m3compile.model import LayerKV, Transformer
from m3compile.tokenizer import Tokenizer


def write_prefix(tokenizer: Tokenizer, prefix: str) -> list[int]:
    """BOS (if the tokenizer has one) followed by the tokens of `prefix` (paper §3.2)."""
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    return bos + (tokenizer.encode(prefix) if prefix else [])


@dataclass(frozen=True)
class EncodedBatch:
    kv: dict[int, LayerKV]  # layer -> q_pre (B, N, T, D), k_pre/k_post/v (B, H, T, D), prefix dropped
    mask: torch.Tensor  # (B, T) bool, True at real reference tokens
    n_tokens: tuple[int, ...]  # real tokens per reference


def encode_batch(model: Transformer, token_lists: Sequence[Sequence[int]], prefix_ids: Sequence[int],
                 layers: Sequence[int], pad_to: int | None = None) -> EncodedBatch:
    """Forward the references (each alone, behind the prefix) and keep the memory layers' q/k/v.

    pad_to fixes the padded width: with the same tensor shapes in every batch, a reference's
    memory does not depend on which batch it was in (measured bit-exact on CPU, float32 and
    bfloat16), so resumed and incremental compiles reproduce the bytes of a full one. Autograd
    follows the caller's grad mode: spec.memorize is the entry point that sets it.
    """
    p = len(prefix_ids)
    lengths = [len(t) for t in token_lists]
    assert min(lengths) > 0 and (pad_to is None or max(lengths) <= pad_to), (lengths, pad_to)
    B, T = len(token_lists), pad_to or max(lengths)
    ids = torch.zeros(B, p + T, dtype=torch.long)  # (B, p+T)
    ids[:, :p] = torch.tensor(list(prefix_ids), dtype=torch.long)
    mask = torch.zeros(B, p + T, dtype=torch.bool)  # (B, p+T)
    mask[:, :p] = True
    for b, toks in enumerate(token_lists):
        ids[b, p:p + len(toks)] = torch.tensor(list(toks), dtype=torch.long)
        mask[b, p:p + len(toks)] = True
    positions = torch.arange(p + T).expand(B, -1)  # (B, p+T)
    dev = model.device
    out = model.forward_kv(ids.to(dev), layers, attention_mask=mask.to(dev), positions=positions.to(dev))
    # drop the prefix: memories are made of reference tokens only
    kv = {l: LayerKV(*(t[:, :, p:] for t in v)) for l, v in out.items()}
    return EncodedBatch(kv=kv, mask=mask[:, p:].to(dev), n_tokens=tuple(lengths))

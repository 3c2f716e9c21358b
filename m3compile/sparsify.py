"""Sparsify stage: keep, per memory layer and kv head, the top-k reference tokens by attention
received (paper §3.3; ../shared/docs/memory3-paper.md §3.2 and §9.1-9.3).

score_j = logsumexp over the query heads h of kv head g's group and over all reference query
positions i of (q_i^h . k_j^g) / sqrt(D), with q and k taken *before* RoPE and *no* causal mask;
prefix and padding tokens are neither queries nor keys. log is monotonic, so this ranks exactly
like the paper's sum of exp, without overflow. q.k is float32, except in bf16 models, where the
matmul runs in bf16 and its result is rounded to bf16 once (`token_scores`). Ties go to the lower
j; kept tokens are returned in ascending j; a reference shorter than k keeps all its tokens. The
stored keys are the *post*-RoPE keys of the winners, with their values and their j.

Shape letters: B references, L memory layers, H kv heads, R query heads per kv head,
T reference tokens, K kept tokens, D head dim.
"""

from dataclasses import dataclass

import torch

from m3compile.encode import EncodedBatch
from m3compile.model import matmul


@dataclass(frozen=True)
class SparseKV:
    keys: torch.Tensor  # (L, H, K, D) post-RoPE keys of the kept tokens
    values: torch.Tensor  # (L, H, K, D)
    positions: torch.Tensor  # (L, H, K) int64, kept token index j in the reference, ascending


@torch.no_grad()
def token_scores(q_pre: torch.Tensor, k_pre: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Selection scores (B, H, T) from q_pre (B, N, T, D), k_pre (B, H, T, D), mask (B, T).

    Laid out keys x queries, (B, H, T, R*T), so that the sum over queries runs along contiguous
    memory, and reduced in place (max, subtract, exp, sum, log): 2x faster than an einsum to
    (B, H, R, T, T) and torch.logsumexp over a strided dimension (the selection was a fifth of
    the 110M shape's forward). No gradient: top-k is discrete."""
    B, N, T, D = q_pre.shape
    H = k_pre.shape[1]
    R = N // H
    # heads h*R..h*R+R-1 share kv head h, so a group's queries are R*T consecutive rows
    q = q_pre.reshape(B, H, R * T, D)  # (B, H, R*T, D)
    if q.dtype == torch.bfloat16:
        # bf16 models: the q.k matmul runs in bf16 (float32 accumulation, the products of bf16
        # values are exact), its result rounded to bf16 once; everything after it is float32. In
        # float32 it was half the selection (4.2 of 7.5 ms a layer at the 110M shape, 16 x 128
        # tokens, 2 AVX512-BF16 cores; 1.3 ms in bf16), and on a CPU with AMX the float32 matmul
        # runs at a tenth of the bf16 peak. 99.9 % of the kept tokens are those of float32 logits
        # (the 110M shape, random weights); the rest swap near-ties. CPU matmuls cannot write a
        # float32 result from bf16 inputs (out_dtype is CUDA-only in torch 2.13).
        # On a CPU without bf16 units model.matmul computes the same product in float32, rounded once.
        logits = matmul(k_pre, q.transpose(-1, -2)).float().mul_(D**-0.5)  # (B, H, T, R*T): key j, query (r, i)
    else:
        logits = (k_pre.float() @ q.float().transpose(-1, -2)).mul_(D**-0.5)  # (B, H, T, R*T)
    # padding queries drop out: adding 0 or -inf gives masked_fill_'s bits, and the broadcast add
    # took 0.4 ms a layer where masked_fill_ with a broadcast mask took 3.5-4.7 (110M shape, 16
    # references, 2 threads: it was a third of the selection)
    bias = torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, float("-inf")).repeat(1, R)  # (B, R*T)
    logits.add_(bias[:, None, None, :])
    top = logits.amax(dim=-1, keepdim=True)  # (B, H, T, 1): finite, every reference has a real query
    scores = logits.sub_(top).exp_().sum(dim=-1).log_().add_(top[..., 0])  # (B, H, T) logsumexp
    return scores.masked_fill_(~mask[:, None, :], float("-inf"))  # padding keys never win


def select_topk(batch: EncodedBatch, k: int) -> list[SparseKV]:
    """The sparse memory of every reference in the batch, on the CPU.

    Selection and gathering run once for the whole batch (a per-reference loop of small torch ops
    cost more than the forward of a small model); each reference's SparseKV is a view of the
    batch's (B, L, H, K, D) tensors. A reference shorter than k keeps all its tokens: padding
    keys score -inf, so they sort after every real token and are cut off below."""
    layers = sorted(batch.kv)
    T = batch.mask.shape[1]
    kk = min(k, T)
    keys, values, positions = [], [], []
    for l in layers:
        kv = batch.kv[l]
        scores = token_scores(kv.q_pre, kv.k_pre, batch.mask)  # (B, H, T)
        # stable descending sort: equal scores keep ascending j, so ties go to the lower j
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices  # (B, H, T)
        idx = order[..., :kk].sort(dim=-1).values  # (B, H, K) ascending j
        gather = idx[..., None].expand(-1, -1, -1, kv.k_post.shape[-1])  # (B, H, K, D)
        keys.append(kv.k_post.gather(2, gather))
        values.append(kv.v.gather(2, gather))
        positions.append(idx)
    keys = torch.stack(keys, 1).cpu()  # (B, L, H, K, D)
    values = torch.stack(values, 1).cpu()  # (B, L, H, K, D)
    positions = torch.stack(positions, 1).cpu()  # (B, L, H, K)
    out = []
    for b, n in enumerate(batch.n_tokens):
        if n >= kk:
            out.append(SparseKV(keys=keys[b], values=values[b], positions=positions[b]))
        else:  # all n real tokens win, in ascending j: positions 0..n-1 of every head
            assert bool((positions[b, ..., :n] == torch.arange(n)).all()), "a padding key outranked a real one"
            out.append(SparseKV(keys=keys[b, ..., :n, :].contiguous(), values=values[b, ..., :n, :].contiguous(),
                                positions=positions[b, ..., :n].contiguous()))
    return out

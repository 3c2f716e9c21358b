"""Sparsify stage: keep, per memory layer and kv head, the top-k reference tokens by attention
received (paper §3.3; ../shared/docs/memory3-paper.md §3.2 and §9.1-9.3).

score_j = logsumexp over the query heads h of kv head g's group and over all reference query
positions i of (q_i^h . k_j^g) / sqrt(D), with q and k taken *before* RoPE and *no* causal mask;
prefix and padding tokens are neither queries nor keys. log is monotonic, so this ranks exactly
like the paper's sum of exp, without overflow. Ties go to the lower j; kept tokens are returned
in ascending j; a reference shorter than k keeps all its tokens. The stored keys are the
*post*-RoPE keys of the winners, with their values and their j.

Shape letters: B references, L memory layers, H kv heads, R query heads per kv head,
T reference tokens, K kept tokens, D head dim.
"""

from dataclasses import dataclass

import torch

from m3compile.encode import EncodedBatch


@dataclass(frozen=True)
class SparseKV:
    keys: torch.Tensor  # (L, H, K, D) post-RoPE keys of the kept tokens
    values: torch.Tensor  # (L, H, K, D)
    positions: torch.Tensor  # (L, H, K) int64, kept token index j in the reference, ascending


def token_scores(q_pre: torch.Tensor, k_pre: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Selection scores (B, H, T) from q_pre (B, N, T, D), k_pre (B, H, T, D), mask (B, T)."""
    B, N, T, D = q_pre.shape
    H = k_pre.shape[1]
    # score in float32 whatever the model dtype, so the ranking does not depend on bf16 rounding
    q = q_pre.float().view(B, H, N // H, T, D)  # (B, H, R, T, D): heads h*R..h*R+R-1 share kv head h
    logits = torch.einsum("bhrid,bhjd->bhrij", q, k_pre.float()) * D**-0.5  # (B, H, R, T, T)
    neg = torch.finfo(torch.float32).min
    logits = logits.masked_fill(~mask[:, None, None, :, None], neg)  # padding queries drop out
    scores = logits.flatten(2, 3).logsumexp(dim=2)  # (B, H, T) over the R*T queries
    return scores.masked_fill(~mask[:, None, :], float("-inf"))  # padding keys never win


def select_topk(batch: EncodedBatch, k: int) -> list[SparseKV]:
    """The sparse memory of every reference in the batch, on the CPU."""
    layers = sorted(batch.kv)
    per_layer = []
    for l in layers:
        kv = batch.kv[l]
        scores = token_scores(kv.q_pre, kv.k_pre, batch.mask)  # (B, H, T)
        # stable descending sort: equal scores keep ascending j, so ties go to the lower j
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices  # (B, H, T)
        per_layer.append((order, kv.k_post, kv.v))
    out = []
    for b, n in enumerate(batch.n_tokens):
        kr = min(k, n)
        keys, values, positions = [], [], []
        for order, k_post, v in per_layer:
            idx = order[b, :, :kr].sort(dim=-1).values  # (H, K) ascending j
            gather = idx[..., None].expand(-1, -1, k_post.shape[-1])  # (H, K, D)
            keys.append(k_post[b].gather(1, gather))  # (H, K, D)
            values.append(v[b].gather(1, gather))  # (H, K, D)
            positions.append(idx)
        out.append(SparseKV(
            keys=torch.stack(keys).cpu(),  # (L, H, K, D)
            values=torch.stack(values).cpu(),  # (L, H, K, D)
            positions=torch.stack(positions).cpu(),  # (L, H, K)
        ))
    return out

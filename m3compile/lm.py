"""Language-model utilities over the runtime: token negative log-likelihood and generation.

Plain forward passes without memory; the read side (paper Eq. 4, reader.py) passes memories
through `Transformer.forward(..., extra=...)`. Generation decodes incrementally with a KVCache.

Shape letters: B sequences, T tokens, V vocab.
"""

from typing import Sequence

import torch
import torch.nn.functional as F

from m3compile.model import KVCache, Transformer


@torch.no_grad()
def token_nll(model: Transformer, token_lists: Sequence[Sequence[int]], batch_size: int = 16) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of every token after the first, and how many were predicted."""
    total, count = 0.0, 0
    for s in range(0, len(token_lists), batch_size):
        chunk = token_lists[s:s + batch_size]
        T = max(len(t) for t in chunk)
        ids = torch.zeros(len(chunk), T, dtype=torch.long)  # (B, T)
        mask = torch.zeros(len(chunk), T, dtype=torch.bool)  # (B, T)
        for b, toks in enumerate(chunk):
            ids[b, :len(toks)] = torch.tensor(list(toks))
            mask[b, :len(toks)] = True
        logits = model(ids.to(model.device), attention_mask=mask.to(model.device)).float()  # (B, T, V)
        targets = ids[:, 1:].to(model.device)  # (B, T-1)
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")  # (B, T-1)
        keep = mask[:, 1:].to(model.device)
        total += float(nll[keep].sum())
        count += int(keep.sum())
    return total, count


@torch.no_grad()
def generate(model: Transformer, prompt_ids: Sequence[int], max_new_tokens: int, temperature: float = 0.0,
             eos_id: int | None = None, seed: int = 0) -> list[int]:
    """Continue prompt_ids greedily (temperature 0) or by sampling; stop at eos_id. Returns new ids."""
    g = torch.Generator(device=model.device).manual_seed(seed)
    cache = KVCache()
    step = list(prompt_ids)
    new = []
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([step], device=model.device), cache=cache)[0, -1].float()  # (V,)
        nxt = sample(logits, temperature, g)
        if nxt == eos_id:
            break
        new.append(nxt)
        step = [nxt]
    return new


def sample(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> int:
    """Greedy at temperature 0, else a draw from softmax(logits / temperature)."""
    if temperature <= 0:
        return int(logits.argmax())
    return int(torch.multinomial(F.softmax(logits / temperature, dim=-1), 1, generator=generator))

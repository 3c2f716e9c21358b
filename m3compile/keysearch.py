"""KeySearch: the model's own memory keys as a retriever (Memory³ Remark on retrieval with the model
itself; ../shared/docs/memory3-paper.md). A mode beside bm25, dense and hybrid, needing no index: the
kb's stored keys are the index, and the query's own attention queries at the memory layers search it.

Score of reference r for a query text (multi-vector, MaxSim as in ColBERT, Khattab & Zaharia 2020):

    s(r) = mean over memory layers l, query heads n, query tokens t of
           max over r's kept tokens j of  q[l, n, t] · k[l, n // n_rep, j] / sqrt(D)

i.e. for each query vector the attention logit it would give the reference's best kept token,
averaged. rope="post" places the query exactly where the reader puts text (formats/reading.md:
after the write prefix, the memory interval and the BOS), so each logit is the one reading would
compute; rope="pre" compares pre-RoPE queries with the stored keys rotated back to no position,
the position-free score the write side's selection uses (formats/manifest.md `write.selection`).

Shape letters: R references, L memory layers, H kv heads, N query heads, T query tokens,
K kept tokens per reference (padded to the largest), D head dim.
"""

import os
from typing import Sequence

import numpy as np
import torch

from m3compile.errors import M3Error
from m3compile.references import int64_column, read_references
from m3compile.model import apply_rope, rope_cos_sin
from m3compile.reader import ReadLayout
from m3compile.retrieve import Hit

ROPES = ("post", "pre")
SCORE_BYTES = 1 << 28  # float32 scores of one batch of references (B·L·N·T·K), 256 MB at most
KEYS_SHARE = 0.5  # of the machine's memory, the most the stacked keys may take (else one M3Error)


class KeySearch:
    """A kb's memory keys, stacked once, searched with a checkpoint's queries.

    Args:
        kb: an open KnowledgeBase (m3compile.kb.open_kb).
        checkpoint: the model the kb was compiled with (m3compile.kb.load_kb_model(kb)).
        rope: "post" (the reader's positions, default) or "pre" (no positions).
        chunk_tokens: query tokens used at most (the reader retrieves per 64-token chunk).
    Example:
        >>> from m3compile import KeySearch, load_kb_model, open_kb
        >>> kb = open_kb("kb/"); ks = KeySearch(kb, load_kb_model(kb))
        >>> ks.retrieve("Who founded Brerrdale?", k=5)
        [Hit(ref_id=12, score=3.1), ...]
    """

    def __init__(self, kb, checkpoint, rope: str = "post", chunk_tokens: int = 64):
        if rope not in ROPES:
            raise M3Error(f"rope {rope!r} is not one of {', '.join(ROPES)}")
        self.ck, self.rope, self.chunk_tokens = checkpoint, rope, chunk_tokens
        self.layout = ReadLayout.from_spec(kb.spec, checkpoint.tokenizer.bos_id, chunk_tokens)
        w = kb.manifest.write
        if w.get("rope", "post") != "post":
            raise M3Error(f"{kb.path} stores {w.get('rope')}-RoPE keys; KeySearch reads post-RoPE keys only")
        # the ref id column alone, and each memory decoded into its slot of the stack as it is read
        # (a list of every Memory, values included, then a copy, peaked at ~3x the stack)
        self.ref_ids = int64_column(read_references(kb.references_path, ["ref_id"]).column("ref_id"))  # (R,)
        spec = kb.spec
        self.layers = tuple(spec.memory_layers)
        R, L, H, K, D = len(self.ref_ids), len(spec.memory_layers), spec.n_kv_heads, spec.top_k, spec.head_dim
        need, have = R * L * H * K * D * 4, _physical_memory()
        if have and need > KEYS_SHARE * have:
            raise M3Error(f"--mode keys holds every stored key as float32: {need / 2**30:.1f} GiB for {R:,} references, "
                          f"more than half of this machine's {have / 2**30:.1f} GiB; use --mode bm25 (or dense) on "
                          "this kb")
        self.keys = torch.zeros(R, L, H, K, D)  # (R, L, H, K, D)
        self.valid = torch.zeros(R, L, H, K, dtype=torch.bool)  # (R, L, H, K)
        for i, r in enumerate(self.ref_ids.tolist()):
            m = kb.memory(r)
            n = m.keys.shape[2]
            keys = m.keys if rope == "post" else self._unrotate(m.keys, m.positions + w["position_offset"])
            self.keys[i, :, :, :n] = keys
            self.valid[i, :, :, :n] = True

    def _unrotate(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # RoPE is a rotation: rotating by -pos undoes the rotation by pos
        cos, sin = rope_cos_sin(self.ck.model.inv_freq, positions.flatten(1), keys.dtype)  # (L, 1, H*K, D) each
        flat = keys.flatten(1, 2)[:, None]  # (L, 1, H*K, D)
        return apply_rope(flat, cos, -sin)[:, 0].view_as(keys)  # (L, H, K, D)

    @torch.no_grad()
    def _queries(self, text: str) -> torch.Tensor:
        ids = self.ck.tokenizer.encode(text)[-self.chunk_tokens:]  # the chunk's last tokens, like reading
        if not ids:
            return torch.zeros(len(self.layers), self.ck.args.n_heads, 0, self.ck.args.head_dim)
        tokens = torch.tensor([self.layout.head + ids])  # (1, T0)
        positions = torch.tensor([self.layout.positions(len(ids))])  # (1, T0)
        kv = self.ck.model.forward_kv(tokens, self.layers, positions=positions)
        q = torch.stack([kv[l].q_pre[0] for l in self.layers])  # (L, N, T0, D)
        if self.rope == "post":
            cos, sin = rope_cos_sin(self.ck.model.inv_freq, positions, q.dtype)  # (1, 1, T0, D) each
            q = apply_rope(q, cos, sin)  # (L, N, T0, D)
        return q[:, :, -len(ids):].float()  # (L, N, T, D): the text's tokens only

    @torch.no_grad()
    def scores(self, text: str) -> np.ndarray:
        """(R,) MaxSim score of every reference, in kb.references() order (self.ref_ids)."""
        q = self._queries(text)  # (L, N, T, D)
        L, N, T, D = q.shape
        if T == 0:
            return np.zeros(len(self.ref_ids), dtype=np.float32)
        H = self.keys.shape[2]
        q = q.reshape(L, H, N // H * T, D) * D**-0.5  # (L, H, G, D): the query vectors each kv head serves
        out = []
        batch = max(1, SCORE_BYTES // (4 * L * N * T * self.keys.shape[3]))
        for a in range(0, len(self.keys), batch):
            k, v = self.keys[a:a + batch], self.valid[a:a + batch]  # (B, L, H, K, D), (B, L, H, K)
            s = torch.einsum("lhgd,blhkd->blhgk", q, k)  # (B, L, H, G, K)
            s = s.masked_fill_(~v[:, :, :, None, :], float("-inf")).amax(-1)  # (B, L, H, G)
            out.append(s.flatten(1).mean(1))  # (B,)
        return torch.cat(out).numpy()

    def retrieve_many(self, texts: Sequence[str], k: int) -> list[list[Hit]]:
        """Top-k references per text, best first (ties: lower ref_id first)."""
        if isinstance(texts, str):  # a string would be one query a character
            raise M3Error("retrieve_many takes a list of query strings; for one, use retrieve(text) or [text]")
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise M3Error(f"a query is a string, not {next(t for t in texts if not isinstance(t, str))!r}")
        if isinstance(k, bool) or not hasattr(k, "__index__") or k < 1:
            raise M3Error(f"k={k!r} must be a whole number, at least 1")
        out = []
        for text in texts:
            s = self.scores(text)
            top = np.lexsort((self.ref_ids, -s))[:k]
            out.append([Hit(int(self.ref_ids[i]), float(s[i])) for i in top])
        return out

    def retrieve(self, text: str, k: int) -> list[Hit]:
        return self.retrieve_many([text], k)[0]


def _physical_memory() -> int:
    """Bytes of memory of this machine (0 where the platform does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 0

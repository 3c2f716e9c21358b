"""Perplexity with and without explicit memory, over the same predicted tokens (`m3 eval`).

Rows, each isolating one cost of the paper's format (§3.3):
  no_memory            the model alone (same layout: write prefix, BOS separator, text)
  sparse               the kb's memories: top-k tokens, kb memory layers, quantized as stored
  full_memory_layers   every token of the same references, unquantized, in the kb's memory layers
  full_all_layers      every token of the same references, unquantized, in all layers
Full memories are encoded on the fly with the model. Memories per 64-token chunk come from
retrieval with the chunk's own text, or with `oracle` from the evaluated document's own
references (the ones nearest the chunk), which separates retrieval quality from reading.
"""

import math
from dataclasses import dataclass
from typing import Callable, Iterable

from m3compile.config import CHUNK_TOKENS, REFS_PER_CHUNK
from m3compile.corpus import Document
from m3compile.errors import M3Error
from m3compile.kb import KnowledgeBase
from m3compile.model import Checkpoint
from m3compile.reader import ChunkMemory, ReadLayout, full_memories, text_nll

ROWS = ("no_memory", "sparse", "full_memory_layers", "full_all_layers")
RetrieveIds = Callable[[str, int], list[int]]  # (chunk text, k) -> ref ids, best first


@dataclass
class _RefInfo:
    ref_id: int
    index: int
    start: int  # first token of the reference in its document's encoding
    token_ids: list[int]


def _doc_refs(kb: KnowledgeBase) -> tuple[dict[str, list[_RefInfo]], dict[int, list[int]]]:
    t = kb.references().select(["ref_id", "doc_id", "index", "token_ids"]).to_pydict()
    by_doc: dict[str, list[_RefInfo]] = {}
    tokens = {}
    for rid, doc, idx, toks in zip(t["ref_id"], t["doc_id"], t["index"], t["token_ids"]):
        by_doc.setdefault(doc, []).append(_RefInfo(rid, idx, 0, toks))
        tokens[rid] = toks
    for refs in by_doc.values():
        refs.sort(key=lambda r: r.index)
        start = 0
        for r in refs:
            r.start, start = start, start + len(r.token_ids)
    return by_doc, tokens


def _not_in_kb(doc_id: str) -> M3Error:
    return M3Error(f"document {doc_id!r} is not in the kb: --oracle reads each document's own references, so "
                   "compile the kb from the texts being evaluated")


def oracle_refs(refs: list[_RefInfo], token_start: int, k: int) -> list[int]:
    """The k references of the document nearest the one holding token `token_start`."""
    home = next((i for i, r in enumerate(refs) if r.start <= token_start < r.start + len(r.token_ids)), len(refs) - 1)
    near = sorted(range(len(refs)), key=lambda i: (abs(i - home), i))[:k]
    return [refs[i].ref_id for i in sorted(near)]


def evaluate(kb: KnowledgeBase, ck: Checkpoint, docs: Iterable[Document], oracle: bool = False,
             retrieve: RetrieveIds | None = None, max_text_tokens: int | None = None,
             chunk_tokens: int = CHUNK_TOKENS, refs_per_chunk: int = REFS_PER_CHUNK,
             progress: Callable[[int], None] | None = None) -> dict:
    """Perplexity of each row over the documents' tokens.

    Args:
        kb: the knowledge base (its manifest gives prefix, layers, interval).
        ck: the model the kb was compiled with.
        docs: the texts to score; with `oracle` their doc_ids must be in the kb.
        oracle: use each document's own references instead of retrieval.
        retrieve: (chunk text, k) -> ref ids, when not oracle.
        max_text_tokens: score only the first N tokens of each document.
        progress: called with the number of documents scored so far.
    Returns:
        {"rows": {row: {"nll", "tokens", "ppl"}}, "improved_docs": {row: n}, "docs", ...}
    """
    if not oracle and retrieve is None:
        raise M3Error("evaluation needs retrieval or --oracle; this kb has no retrieval index to use")
    if max_text_tokens is not None and max_text_tokens < 1:
        raise M3Error(f"--max-text-tokens {max_text_tokens} must be at least 1 (leave it out to score whole texts)")
    if refs_per_chunk < 1:
        raise M3Error(f"--refs {refs_per_chunk} must be at least 1: the rows compare reading references with none")
    tok, model = ck.tokenizer, ck.model
    layout = ReadLayout.from_manifest(kb.manifest, tok.bos_id, chunk_tokens, refs_per_chunk)
    all_layers = ReadLayout.from_manifest(kb.manifest, tok.bos_id, chunk_tokens, refs_per_chunk,
                                          memory_layers=range(ck.args.n_layers))
    # a text is scored only as far as the model has positions for it (after the write prefix and the
    # memory interval): past them RoPE runs where the model never trained, for all four rows alike
    # (all_layers differs from layout in its memory layers only)
    room = layout.text_room(ck.args, "compile the kb with a smaller --max-tokens", scoring=True)[0]
    # --oracle needs every document's references; retrieval only the token ids of those it finds,
    # read a chunk's worth at a time (the whole table as Python lists, ~1.6 KB a reference on SciFact's kb)
    by_doc, ref_tokens = _doc_refs(kb) if oracle else ({}, None)
    if oracle:  # every text checked before any is scored (a missing last one threw the others' work away)
        docs = list(docs)
        absent = next((d.doc_id for d in docs if d.doc_id not in by_doc and d.text.strip()), None)
        if absent is not None:
            raise _not_in_kb(absent)
    full_cache: dict[int, object] = {}

    def full(ids):
        missing = [i for i in dict.fromkeys(ids) if i not in full_cache]
        if missing and ref_tokens is None:
            tokens = [r["token_ids"] for r in kb.reference_rows(missing, ["token_ids"])]
            if len(tokens) != len(missing):
                raise M3Error(f"a reference the retrieval index returned is not in {kb.references_path}; the kb is "
                              f"damaged: run `m3 verify --repair {kb.path}`")
        else:
            tokens = [ref_tokens[i] for i in missing]
        for m in full_memories(model, tokens, missing, kb.spec, all_layers.memory_layers) if missing else ():
            full_cache[m.ref_id] = m
        return [full_cache[i] for i in ids]

    limit = room if max_text_tokens is None else min(max_text_tokens, room)
    sums = {r: [0.0, 0] for r in ROWS}
    improved = {r: 0 for r in ROWS[1:]}
    n_docs = cut = 0
    for doc in docs:
        ids = tok.encode(doc.text)
        cut += len(ids) > room and (max_text_tokens is None or max_text_tokens > room)  # cut by the positions
        ids = ids[:limit]
        if not ids:
            continue
        if oracle and doc.doc_id not in by_doc:  # a text of whitespace with tokens: no reference holds it
            raise _not_in_kb(doc.doc_id)
        chunk_refs = []
        for start in range(0, len(ids), chunk_tokens):
            if oracle:
                chunk_refs.append(oracle_refs(by_doc[doc.doc_id], start, refs_per_chunk))
            else:
                chunk_refs.append(retrieve(tok.decode(ids[start:start + chunk_tokens]), refs_per_chunk))
        full([i for r in chunk_refs for i in r])  # the document's references in one forward: a pass costs a row block
        mems = {
            "no_memory": None,
            "sparse": [ChunkMemory.gather(kb.memories(r), layout.memory_layers) for r in chunk_refs],
            "full_memory_layers": [ChunkMemory.gather(full(r), layout.memory_layers) for r in chunk_refs],
            "full_all_layers": [ChunkMemory.gather(full(r), all_layers.memory_layers) for r in chunk_refs],
        }
        doc_nll = {}
        for row in ROWS:
            nll, n = text_nll(model, all_layers if row == "full_all_layers" else layout, ids, mems[row])
            sums[row][0] += nll
            sums[row][1] += n
            doc_nll[row] = nll
        for row in improved:
            improved[row] += doc_nll[row] < doc_nll["no_memory"]
        n_docs += 1
        if progress is not None:
            progress(n_docs)
        if len(full_cache) > 4096:  # bound memory on long runs; neighbouring docs rarely share refs
            full_cache.clear()
    if n_docs == 0:
        raise M3Error("no text to evaluate: the texts are empty")
    rows = {r: {"nll": s / n, "tokens": n, "ppl": math.exp(s / n)} for r, (s, n) in sums.items()}
    return {"rows": rows, "improved_docs": improved, "docs": n_docs, "oracle": oracle,
            "chunk_tokens": chunk_tokens, "refs_per_chunk": refs_per_chunk, "max_text_tokens": max_text_tokens,
            "position_limit": room, "texts_cut_at_position_limit": int(cut)}

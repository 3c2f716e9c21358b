"""Read side: a model that attends to retrieved explicit memories (paper Eq. 4, §3.1-3.2;
../shared/docs/memory3-paper.md §5; the layout is specified in formats/reading.md).

Sequence layout, with p = len(write prefix) and I = the kb's max_tokens (128):
  positions 0..p-1   the write prefix (the paper's modified BOS `<s>Reference:`), ordinary context
                     in every layer; it sees no memory (memories come after it)
  memories           memory layers only; each reference's kept keys keep the RoPE positions p+j
                     they were written at, so all memories share the interval [p, p+I) ("parallel
                     positions")
  position p+I       the ordinary BOS, now a separator; it belongs to the first chunk
  p+I+1, ...         the text
Text is read in chunks of 64 tokens; each chunk attends to its own memories only, under one
softmax with the context (no gate). Non-memory layers are unchanged.

Shape letters: T sequence tokens, M memory tokens, H kv heads, D head dim.
"""

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from m3compile.config import CHUNK_TOKENS, REFS_PER_CHUNK
from m3compile.errors import M3Error
from m3compile.kb import Memory
from m3compile.lm import sample
from m3compile.model import ExtraKV, KVCache, Transformer
from m3compile.spec import MemorySpec, memorize


@dataclass(frozen=True)
class ReadLayout:
    prefix_ids: tuple[int, ...]  # the write prefix, as the kb manifest records it
    bos_id: int | None  # the context BOS (separator); None if the tokenizer has no BOS
    memory_layers: tuple[int, ...]  # layers that read memories
    interval: int = 128  # I: memory positions lie in [p, p+I); the kb's max_tokens
    chunk_tokens: int = CHUNK_TOKENS  # text tokens per chunk
    refs_per_chunk: int = REFS_PER_CHUNK  # references retrieved per chunk

    def __post_init__(self):
        if self.chunk_tokens < 1:
            raise M3Error(f"--chunk-tokens {self.chunk_tokens} must be at least 1 (text tokens per memory chunk; "
                          f"the paper reads {CHUNK_TOKENS})")
        if self.refs_per_chunk < 0:
            raise M3Error(f"--refs {self.refs_per_chunk} must be 0 or more (references per chunk)")

    @classmethod
    def from_spec(cls, spec: MemorySpec, bos_id: int | None, chunk_tokens: int = CHUNK_TOKENS,
                  refs_per_chunk: int = REFS_PER_CHUNK, memory_layers: Sequence[int] | None = None) -> "ReadLayout":
        layers = tuple(memory_layers) if memory_layers is not None else spec.memory_layers
        return cls(spec.prefix_ids, bos_id, layers, spec.width, chunk_tokens, refs_per_chunk)

    @classmethod
    def from_manifest(cls, manifest, bos_id: int | None, chunk_tokens: int = CHUNK_TOKENS,
                      refs_per_chunk: int = REFS_PER_CHUNK, memory_layers: Sequence[int] | None = None) -> "ReadLayout":
        """The layout of a kb, from its Manifest (kb.manifest)."""
        return cls.from_spec(manifest.spec, bos_id, chunk_tokens, refs_per_chunk, memory_layers)

    def text_positions(self, n_text: int) -> int:
        """The highest RoPE position n_text text tokens reach, plus one: what the model must hold."""
        return len(self.prefix_ids) + self.interval + n_text + (self.bos_id is not None)

    def text_room(self, args, fix: str, scoring: bool = False) -> tuple[int, int, str]:
        """(text positions left, the positions a forward may span, the config.json key that says
        so): the model's span (ModelArgs.span) less the write prefix, the memory interval and the
        BOS. One M3Error, ending with `fix`, where no text fits; with `scoring`, also where nothing
        comes before the text (an empty write prefix without BOS, which compiles refuse since 0.2.0:
        the text's first token would have no prediction)."""
        if scoring and not self.head:
            raise M3Error("the kb's write prefix is empty and its tokenizer has no BOS: no token comes before a text, "
                          "so its first token cannot be scored; recompile the kb with a --prefix text (--rebuild)")
        limit, what = args.span
        room = limit - self.text_positions(0)
        if room < 1:
            raise M3Error(f"the memory layout takes {self.text_positions(0)} of the model's {limit} positions ({what}) "
                          f"before the text: no text fits; {fix}")
        return room, limit, what

    @property
    def head(self) -> list[int]:
        """Token ids in front of the text: the write prefix, then the context BOS."""
        return list(self.prefix_ids) + ([self.bos_id] if self.bos_id is not None else [])

    def positions(self, n_text: int) -> list[int]:
        """RoPE positions of head + n_text text tokens."""
        p = len(self.prefix_ids)
        n_after = n_text + (self.bos_id is not None)
        return list(range(p)) + [p + self.interval + i for i in range(n_after)]

    def chunk_of(self, n_text: int) -> list[int]:
        """Chunk index of every head + text position: -1 for the prefix, the BOS is in chunk 0."""
        bos = [0] if self.bos_id is not None else []
        return [-1] * len(self.prefix_ids) + bos + [i // self.chunk_tokens for i in range(n_text)]


@dataclass(frozen=True)
class ChunkMemory:
    """The memories one chunk attends to, gathered per memory layer."""

    keys: dict[int, torch.Tensor]  # layer -> (H, M, D) post-RoPE keys of all its references
    values: dict[int, torch.Tensor]  # layer -> (H, M, D)
    ref_ids: tuple[int, ...]  # where they came from

    @classmethod
    def gather(cls, memories: Sequence[Memory], layers: Sequence[int]) -> "ChunkMemory | None":
        if not memories:
            return None
        keys, values = {}, {}
        for layer in layers:
            ks, vs = [], []
            for m in memories:
                assert layer in m.layers, (layer, m.layers)
                li = m.layers.index(layer)
                ks.append(m.keys[li])  # (H, K, D)
                vs.append(m.values[li])  # (H, K, D)
            keys[layer] = torch.cat(ks, dim=1)  # (H, M, D)
            values[layer] = torch.cat(vs, dim=1)  # (H, M, D)
        return cls(keys, values, tuple(m.ref_id for m in memories))


@torch.no_grad()
def full_memories(model: Transformer, token_lists: Sequence[Sequence[int]], ref_ids: Sequence[int],
                  spec: MemorySpec, layers: Sequence[int] | None = None) -> list[Memory]:
    """Every token of each reference as memory, unquantized, encoded now by the kb's own recipe
    (memorize with top-k = width), in `layers` (default: the spec's): the no-sparsity baseline."""
    full = spec.with_full_references(layers)
    return [Memory(int(i), m.keys.float(), m.values.float(), m.positions, full.memory_layers)
            for i, m in zip(ref_ids, memorize(model, token_lists, full))]


def build_extra(chunks: Sequence[ChunkMemory | None], query_chunks: Sequence[int], device, dtype) -> dict[int, ExtraKV]:
    """ExtraKV per memory layer for one sequence: query t sees the memories of chunk query_chunks[t]."""
    present = [(c, m) for c, m in enumerate(chunks) if m is not None]
    if not present:
        return {}
    owner = torch.cat([torch.full((m.keys[next(iter(m.keys))].shape[1],), c) for c, m in present])  # (M,)
    qc = torch.tensor(list(query_chunks))  # (T,)
    visible = (qc[:, None] == owner[None, :])[None].to(device)  # (1, T, M)
    extra = {}
    for layer in present[0][1].keys:
        k = torch.cat([m.keys[layer] for _, m in present], dim=1)[None].to(device, dtype)  # (1, H, M, D)
        v = torch.cat([m.values[layer] for _, m in present], dim=1)[None].to(device, dtype)  # (1, H, M, D)
        extra[layer] = ExtraKV(k, v, visible)
    return extra


@torch.no_grad()
def text_logits(model: Transformer, layout: ReadLayout, text_ids: Sequence[int],
                chunks: Sequence[ChunkMemory | None] | None = None) -> torch.Tensor:
    """Logits (n, V) predicting each of the n text tokens from the head and the text before it,
    each chunk reading its own memories (chunks[c]; None or an empty list = no memory)."""
    n = len(text_ids)
    ids = layout.head + list(text_ids)
    pos = torch.tensor([layout.positions(n)], device=model.device)  # (1, T)
    extra = build_extra(chunks or [], layout.chunk_of(n), model.device, model.dtype)
    logits = model(torch.tensor([ids], device=model.device), positions=pos, extra=extra)[0].float()  # (T, V)
    first = len(layout.head) - 1  # the last head token predicts text token 0
    return logits[first:first + n]  # (n, V)


def text_nll(model: Transformer, layout: ReadLayout, text_ids: Sequence[int],
             chunks: Sequence[ChunkMemory | None] | None = None) -> tuple[float, int]:
    """Summed NLL (nats) of the text tokens under text_logits, and their count."""
    logits = text_logits(model, layout, text_ids, chunks)  # (n, V)
    targets = torch.tensor(list(text_ids), device=logits.device)  # (n,)
    return float(F.cross_entropy(logits, targets, reduction="sum")), len(text_ids)


Retrieve = Callable[[list[int]], ChunkMemory | None]  # a chunk's token ids -> its memories


@torch.no_grad()
def generate(model: Transformer, layout: ReadLayout, prompt_ids: Sequence[int], retrieve: Retrieve | None,
             max_new_tokens: int, temperature: float = 0.0, eos_id: int | None = None, seed: int = 0,
             progress: Callable[[int], None] | None = None) -> list[int]:
    """Generate with the paper's schedule: each prompt chunk reads the memories retrieved with its
    own text; the first generated chunk inherits the last prompt chunk's memories; then every
    chunk_tokens generated tokens the memories are dropped and retrieved anew with those tokens.
    retrieve=None generates without memory (same layout)."""
    dev, C = model.device, layout.chunk_tokens
    g = torch.Generator(device=dev).manual_seed(seed)
    cache = KVCache()
    p = len(layout.prefix_ids)
    if p:
        model(torch.tensor([list(layout.prefix_ids)], device=dev), cache=cache)  # sees no memory
    cache.next_pos = torch.tensor([p + layout.interval], device=dev)  # the text starts after the interval
    prompt = list(prompt_ids)
    pieces = [prompt[i:i + C] for i in range(0, len(prompt), C)] or [[]]
    if layout.bos_id is not None:
        pieces[0] = [layout.bos_id] + pieces[0]
    memory, logits = None, None
    for c, piece in enumerate(pieces):
        own = prompt[c * C:(c + 1) * C]
        memory = retrieve(own) if retrieve and own else None
        logits = _step(model, layout, piece, memory, cache, dev)
    if logits is None and max_new_tokens > 0:
        raise M3Error("nothing to continue: the prompt is empty and the tokenizer has no BOS token; give a prompt")
    new, window = [], []
    while len(new) < max_new_tokens:
        nxt = sample(logits[-1], temperature, g)
        if nxt == eos_id:
            break
        new.append(nxt)
        window.append(nxt)
        if progress is not None:
            progress(len(new))
        if len(new) == max_new_tokens:
            break  # its logits would predict a token nobody asked for
        if len(window) > C:
            # nxt opens a new chunk: the finished chunk's tokens fetch its memories, when a token is
            # fed to read them (a chunk ended by EOS or by the last token asked retrieves nothing)
            memory = retrieve(window[:C]) if retrieve else None
            window = window[C:]
        # fed with its own chunk's memories: the last token of a chunk too, whose key-values every
        # later token attends to. Chunks count from the first generated token (paper §3.1); they are
        # text_logits' (chunk_of, from the text's start) where the prompt fills whole chunks
        logits = _step(model, layout, [nxt], memory, cache, dev)
    return new


def _step(model, layout, ids, memory, cache, dev):
    if not ids:
        return None
    extra = build_extra([memory], [0] * len(ids), dev, model.dtype)
    return model(torch.tensor([ids], device=dev), cache=cache, extra=extra)[0].float()  # (T, V)

"""generate_text: a prompt continued by a model reading a kb's memories, the library call behind
`m3 generate` (paper §3.1's read schedule is reader.generate; this module picks the model, the
layout and the retrieval, and checks that the text fits the model's positions).

Without a kb the model generates plainly. A memory-trained checkpoint (one with m3-memory.json)
then keeps the layout it was trained with, memories left out: the write prefix at 0..p-1 and the
text after the memory interval, exactly as `--kb KB --no-memory` reads.
"""

import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from m3compile.config import (CHUNK_TOKENS, REFS_PER_CHUNK, check_min_relative_score, default_model_dir,
                              model_min_relative_score, read_model_memory)
from m3compile.errors import M3Error
from m3compile.reader import ChunkMemory, ReadLayout, generate
from m3compile.tokenizer import write_prefix


@dataclass
class GenerationResult:
    text: str  # the continuation, with its leading space
    memory: bool  # whether memories were read
    references_read: list[list[int]] = field(default_factory=list)  # ref ids per retrieval, in order
    new_tokens: int = 0


def generate_text(prompt: str, kb: str | Path | None = None, model: str | Path | None = None,
                  max_new_tokens: int = 128, temperature: float = 0.0, seed: int = 0, memory: bool = True,
                  chunk_tokens: int = CHUNK_TOKENS, refs_per_chunk: int = REFS_PER_CHUNK, mode: str | None = None,
                  min_relative_score: float | None = None, device: str = "cpu", log: Callable[[str], None] = lambda s: None,
                  progress: Callable[[int], None] | None = None) -> GenerationResult:
    """Continue `prompt`, reading `kb`'s memories chunk by chunk (or plainly without a kb).

    Args:
        prompt: the text to continue.
        kb: a compiled kb; None generates without memory.
        model: the checkpoint (default: the kb's, else the embedded model).
        max_new_tokens: at most this many tokens; fewer if the model's positions run out (logged).
        temperature: 0 is greedy.
        seed: the sampling seed (-2^63 to 2^64 - 1).
        memory: with a kb, False reads no memory (same layout).
        chunk_tokens: tokens per chunk (64: a chunk's memories are retrieved with its text).
        refs_per_chunk: references a chunk reads (5).
        mode: retrieval mode (default: the kb's).
        min_relative_score: read only the retrieved references scoring at least this fraction of a
            chunk's best (Retriever.retrieve_many); None = the model's m3-memory.json (the embedded
            reader: 0.7), else 0 (all refs_per_chunk, the paper's schedule).
        device: torch device.
        log: called with each note (e.g. a generation capped by the model's positions).
        progress: called with the number of tokens generated so far.
    Returns:
        GenerationResult(text, memory, references_read, new_tokens).
    Example:
        >>> generate_text("Who founded Brerrdale?", kb="kb/", max_new_tokens=10).text
        ' Emrys Viandane.'
    """
    for name, value in (("max_new_tokens", max_new_tokens), ("seed", seed), ("chunk_tokens", chunk_tokens),
                        ("refs_per_chunk", refs_per_chunk)):
        if not isinstance(value, numbers.Integral) or isinstance(value, (bool, np.bool_)):  # "10": a TypeError
            raise M3Error(f"{name}={value!r} ({type(value).__name__}) must be an integer")
    if not isinstance(temperature, numbers.Real) or isinstance(temperature, (bool, np.bool_)):
        raise M3Error(f"temperature={temperature!r} ({type(temperature).__name__}) must be a number")
    max_new_tokens, seed, chunk_tokens, refs_per_chunk = map(int, (max_new_tokens, seed, chunk_tokens, refs_per_chunk))
    temperature = float(temperature)
    if kb is None and mode is not None:
        raise M3Error(f"--mode {mode} chooses how a kb's references are retrieved, and no --kb is given: add "
                      "--kb or drop --mode")
    if mode is not None and not memory:
        raise M3Error(f"--mode {mode} chooses how references are retrieved, and --no-memory retrieves none: "
                      "drop --mode")
    if not temperature >= 0:  # also NaN
        raise M3Error(f"--temperature {temperature} must be 0 (greedy) or more, e.g. 0.8")
    if max_new_tokens < 0:
        raise M3Error(f"--max-new-tokens {max_new_tokens} must be 0 or more")
    if not -2**63 <= seed < 2**64:  # torch's generator takes no other (a RuntimeError traceback)
        raise M3Error(f"--seed {seed} must be from -2^63 to 2^64 - 1")
    if min_relative_score is not None:
        if kb is None or not memory:
            raise M3Error(f"--min-relative-score {min_relative_score} sets which retrieved references a chunk reads, "
                          f"and {'no --kb is given' if kb is None else '--no-memory reads none'}: drop it")
        min_relative_score = check_min_relative_score(min_relative_score)
    from m3compile.kb import load_kb_model, open_kb
    from m3compile.model import load_checkpoint

    base = open_kb(kb) if kb is not None else None
    if base is not None:
        ck = load_kb_model(base, model, device=device)
        layout = ReadLayout.from_spec(base.spec, ck.tokenizer.bos_id, chunk_tokens, refs_per_chunk)
    else:
        ck = load_checkpoint(model if model is not None else default_model_dir(), device=device)
        trained = read_model_memory(ck.path)
        if trained is not None:  # a model trained to read memories: the layout a kb compiled with it would have,
            # its settings missing from m3-memory.json taken as `m3 compile` takes them
            from m3compile.config import PAPER_DEFAULTS

            def setting(k):
                return trained[k] if trained.get(k) is not None else PAPER_DEFAULTS[k]

            prefix, interval = write_prefix(ck.tokenizer, setting("prefix")), setting("max_tokens")
        else:  # a plain model: BOS and the prompt
            prefix, interval = [], 0
        layout = ReadLayout(tuple(prefix), ck.tokenizer.bos_id, (), interval, chunk_tokens, refs_per_chunk)
        memory = False
    prompt_ids = ck.tokenizer.encode(prompt)
    # the positions a forward may span: the model's, or its sliding window where that is shorter
    # (the runtime refuses a span past the window: generation stopped there, its tokens lost)
    _, limit, what = layout.text_room(ck.args, "compile the kb with a smaller --max-tokens" if base is not None else
                                      f"the memory interval of {layout.interval} tokens (max_tokens, from "
                                      f"{ck.path / 'm3-memory.json'} or the paper's default) and the write prefix "
                                      "leave the model no room")
    free = limit - layout.text_positions(len(prompt_ids))
    if free < 0:
        raise M3Error(f"the prompt is {len(prompt_ids)} tokens, and with the memory layout it needs "
                      f"{layout.text_positions(len(prompt_ids))} positions; the model has {limit} "
                      f"({what}): shorten the prompt to at most {len(prompt_ids) + free} tokens")
    room = free + 1  # the last generated token is never fed to the model: it needs no position
    if max_new_tokens > room:
        log(f"note: the model has room for {room} more tokens after this {len(prompt_ids)}-token prompt "
            f"({limit} positions, {what}); generating at most {room}, not {max_new_tokens}")
        max_new_tokens = room
    read: list[list[int]] = []
    retrieve = None
    if memory and base is not None:
        from m3compile.retrieve import Retriever

        retriever = Retriever.open(base.path, base.manifest.to_dict())
        floor = model_min_relative_score(ck.path) if min_relative_score is None else min_relative_score

        def retrieve(tokens):  # noqa: F811 - None above means "no memory"
            ids = [h.ref_id for h in retriever.retrieve(ck.tokenizer.decode(tokens), refs_per_chunk, mode=mode,
                                                        min_relative_score=floor)]
            read.append(ids)
            return ChunkMemory.gather(base.memories(ids), layout.memory_layers)

    new = generate(ck.model, layout, prompt_ids, retrieve, max_new_tokens, temperature, ck.tokenizer.eos_id, seed,
                   progress=progress)
    # decoded after the prompt: a continuation decoded alone loses its leading space
    head = ck.tokenizer.decode(prompt_ids)
    full = ck.tokenizer.decode(prompt_ids + new)
    text = full[len(head):] if full.startswith(head) else ck.tokenizer.decode(new)
    return GenerationResult(text, memory and base is not None, read, len(new))

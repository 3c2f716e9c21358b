"""Continued training with explicit memory (`m3 train`): teach a checkpoint to read a kb's memories.

Paper §3.6 (../shared/docs/memory3-paper.md): every 64-token chunk of a training text attends to the
sparse memories of its retrieved references, *encoded in real time by the current weights* (the
weights move, so the kb's stored memories would be stale), and references overlapping the chunk by
more than 90 % (Eq. 6) are dropped, so the model learns to use knowledge rather than to copy.

Exactly the read side's format (reader.py): write prefix at 0..p-1, memories at parallel positions
[p, p+I), the BOS separator at p+I, the text after; each chunk reads only its own memories under one
softmax with the context; the kb's MemorySpec (prefix, memory layers, top-k, reference width I).
Memories are made by spec.memorize, the compile's own recipe, with autograd on: selection is
a discrete top-k (no gradient), while the kept keys/values carry gradients into the memory layers'
encoder when `grad_through_memory` is set. The paper is silent on this. The default is on: on the
demo world it is worth +12 points of held-out recall at the learning rate that works (40 -> 52 %
after 1000 steps at 1.5e-3; +3 at 5e-4) for ~16 % more training time and the encoder's activations
(examples/README.md, runs L1/L3 and D/M). Off, the encoder runs under no_grad.

Retrieval does not depend on the weights, so it runs once, before the first step. Batch order and
the memory/no-memory choice of each step are pure functions of (seed, step), so a resumed run draws
the same batches as an uninterrupted one; the state file holds weights, AdamW moments and the step.

Shape letters: B sequences, T tokens (head + text), R references, M memory tokens, H kv heads,
D head dim, V vocab.
"""

import functools
import json
import math
import random
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from m3compile import __version__
from m3compile.checkpoint import fingerprint
from m3compile.config import MODEL_MEMORY_FILE, TrainConfig, model_min_relative_score, write_model_memory
from m3compile.corpus import CorpusReport, iter_documents
from m3compile.errors import M3Error
from m3compile.kb import Memory, open_kb
from m3compile.model import ExtraKV, Transformer, bf16_is_native, check_device, load_checkpoint, save_checkpoint
from m3compile.reader import ChunkMemory, ReadLayout, build_extra
from m3compile.spec import MemorySpec, memorize

STATE_FILE = "train-state.safetensors"  # in the output directory while a run is unfinished
REPORT_FILE = "training.json"
STATE_FORMAT = "m3-train-state"
STATE_VERSION = 1

# (chunk texts, their token ids) -> ref ids per chunk, best first
RetrieveMany = Callable[[list[str], list[list[int]]], list[list[int]]]


@dataclass(frozen=True)
class TrainSequence:
    text_ids: tuple[int, ...]  # the text tokens (no head)
    chunk_refs: tuple[tuple[int, ...], ...]  # ref ids per chunk_tokens chunk, best first


# ---- data -----------------------------------------------------------------------------------------

def kb_retriever(kb_dir: str | Path, k: int, mode: str | None, max_overlap: float | None) -> RetrieveMany:
    """The kb's own retrieval (Retriever.retrieve_many) with the Eq. 6 filter, as ref ids."""
    from m3compile.retrieve import Retriever

    r = Retriever.open(kb_dir)

    def retrieve(texts, token_ids):
        hits = r.retrieve_many(texts, k, mode=mode, max_overlap=max_overlap, query_tokens=token_ids)
        return [[h.ref_id for h in row] for row in hits]
    return retrieve


def prepare_sequences(texts_path: Path, tokenizer, seq_tokens: int, chunk_tokens: int,
                      retrieve: RetrieveMany) -> list[TrainSequence]:
    """Tokenize the training texts, cut them into sequences, and retrieve every chunk's references."""
    report = CorpusReport()
    pieces = []
    for doc in iter_documents(Path(texts_path), report):
        ids = tokenizer.encode(doc.text)
        pieces += [ids[i:i + seq_tokens] for i in range(0, len(ids), seq_tokens)]
    report.raise_if_empty()
    if not pieces:
        raise M3Error(f"training texts {texts_path} hold no tokens; give texts to train on")
    chunks = [s[i:i + chunk_tokens] for s in pieces for i in range(0, len(s), chunk_tokens)]
    refs = retrieve([tokenizer.decode(c) for c in chunks], chunks)
    out, at = [], 0
    for s in pieces:
        n = math.ceil(len(s) / chunk_tokens)
        out.append(TrainSequence(tuple(s), tuple(tuple(r) for r in refs[at:at + n])))
        at += n
    return out


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """Sequences of one step: consecutive slices of seeded per-epoch permutations (stateless: a
    function of the arguments, so a resumed run draws the batches of an uninterrupted one)."""
    out = []
    for flat in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(flat, n)
        out.append(_epoch_order(f"{seed}/epoch/{epoch}", n)[i])
    return out


@functools.lru_cache(maxsize=2)  # a step's batch spans at most two epochs (batch_size <= n)
def _epoch_order(key: str, n: int) -> tuple[int, ...]:
    """The order of the n sequences in one epoch. Kept between steps: it was shuffled anew for
    every sequence of every step: 16 shuffles of ~260k sequences a step on a demo world of 8000
    articles, which made a step ~6x slower on two AVX2 cores (2026-12-07). Keyed by the seed's
    string, as the shuffle is (1, 1.0 and True are one key to a cache, three seeds here)."""
    perm = list(range(n))
    random.Random(key).shuffle(perm)
    return tuple(perm)


def uses_memory(step: int, config: TrainConfig) -> bool:
    return random.Random(f"{config.seed}/memory/{step}").random() < config.memory_fraction


def lr_at(step: int, c: TrainConfig) -> float:
    # the floor is min_lr, or lr itself where that is lower (a peak under 1e-4 rose towards 1e-4)
    floor = min(c.min_lr, c.lr)
    if step < c.warmup_steps:
        return c.lr * (step + 1) / c.warmup_steps
    if c.schedule == "wsd":
        start = c.steps - int(c.decay_fraction * c.steps)
        if step < start:
            return c.lr
        return c.lr + (floor - c.lr) * (step - start + 1) / max(1, c.steps - start)
    frac = (step - c.warmup_steps) / max(1, c.steps - c.warmup_steps)
    return floor + 0.5 * (c.lr - floor) * (1 + math.cos(math.pi * frac))


# ---- memories and the forward pass ----------------------------------------------------------------

def encode_memories(model: Transformer, token_lists: Sequence[Sequence[int]], ref_ids: Sequence[int],
                    spec: MemorySpec, grad: bool) -> list[Memory]:
    """Sparse memories of references under the current weights, exactly as `m3 compile` makes them
    (spec.memorize), differentiable through the kept keys and values when `grad`."""
    return [Memory(int(r), s.keys, s.values, s.positions, spec.memory_layers)
            for r, s in zip(ref_ids, memorize(model, token_lists, spec, grad=grad))]


def batch_logits(model: Transformer, layout: ReadLayout, text_ids: Sequence[Sequence[int]],
                 chunks: Sequence[Sequence[ChunkMemory | None] | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """reader.text_logits for a batch, with autograd: logits (B, T, V) of the padded head + text
    rows, and targets (B, T) holding the next text token where one is predicted, else -100."""
    dev, head = model.device, layout.head
    B, T = len(text_ids), len(head) + max(map(len, text_ids))
    tokens = torch.zeros(B, T, dtype=torch.long)  # (B, T)
    mask = torch.zeros(B, T, dtype=torch.bool)  # (B, T)
    pos = torch.zeros(B, T, dtype=torch.long)  # (B, T)
    targets = torch.full((B, T), -100, dtype=torch.long)  # (B, T)
    extras = []
    for b, ids in enumerate(text_ids):
        n, row = len(ids), head + list(ids)
        tokens[b, :len(row)] = torch.tensor(row)
        mask[b, :len(row)] = True
        pos[b, :len(row)] = torch.tensor(layout.positions(n))
        targets[b, len(head) - 1:len(row) - 1] = torch.tensor(list(ids))  # the last head token predicts text 0
        extras.append(build_extra(chunks[b] or [], layout.chunk_of(n), dev, model.dtype))
    extra = _stack_extras(extras, T) if any(extras) else {}
    logits = model(tokens.to(dev), attention_mask=mask.to(dev), positions=pos.to(dev), extra=extra)  # (B, T, V)
    return logits, targets.to(dev)


def _stack_extras(extras: list[dict[int, ExtraKV]], T: int) -> dict[int, ExtraKV]:
    # rows read different numbers of memory tokens: pad each to the longest, invisible
    layers = next(e for e in extras if e).keys()
    M = max(next(iter(e.values())).k.shape[2] for e in extras if e)
    out = {}
    for layer in layers:
        ks, vs, vis = [], [], []
        for e in extras:
            x = e.get(layer)
            if x is None:
                ref = next(e2 for e2 in extras if e2)[layer]
                x = ExtraKV(ref.k[:, :, :0], ref.v[:, :, :0], torch.zeros(1, 0, 0, dtype=torch.bool, device=ref.k.device))
            m, t = x.k.shape[2], x.visible.shape[1]
            ks.append(F.pad(x.k, (0, 0, 0, M - m)))  # (1, H, M, D)
            vs.append(F.pad(x.v, (0, 0, 0, M - m)))  # (1, H, M, D)
            vis.append(F.pad(x.visible, (0, M - m, 0, T - t)))  # (1, T, M)
        out[layer] = ExtraKV(torch.cat(ks), torch.cat(vs), torch.cat(vis))  # (B, H, M, D), (B, T, M)
    return out


RETRIEVED_AT_ONCE = 1 << 16  # references whose token ids are read in one pass over their row groups


def retrieved_tokens(kb, ref_ids) -> dict[int, list[int]]:
    """{ref id: token ids} of the references the training texts retrieved, read once before the
    first step, a row group at a time (references.TokenGroups): the whole table (texts too) was
    read as Python lists before. Read up front, not per step: a compile or compact committing into
    the kb during training removes the generation its table lies in."""
    from m3compile.references import TokenGroups
    from m3compile.retrieve import REF_TOKEN_BYTES

    ids = sorted(set(ref_ids))
    groups, out = TokenGroups(kb.references_path, REF_TOKEN_BYTES), {}
    for lo in range(0, len(ids), RETRIEVED_AT_ONCE):
        out.update(groups.require(ids[lo:lo + RETRIEVED_AT_ONCE], kb.path))
    return out


def step_loss(model: Transformer, layout: ReadLayout, seqs: Sequence[TrainSequence], ref_tokens,
              with_memory: bool, spec: MemorySpec, grad_through_memory: bool) -> tuple[torch.Tensor, int]:
    """Mean next-token loss over the text tokens of a batch, and their count."""
    chunks = [None] * len(seqs)
    if with_memory:
        wanted = sorted({r for s in seqs for c in s.chunk_refs for r in c})
        mems = encode_memories(model, [ref_tokens[r] for r in wanted], wanted, spec,
                               grad=grad_through_memory and torch.is_grad_enabled())
        by_id = {m.ref_id: m for m in mems}
        chunks = [[ChunkMemory.gather([by_id[r] for r in c], layout.memory_layers) for c in s.chunk_refs]
                  for s in seqs]
    logits, targets = batch_logits(model, layout, [s.text_ids for s in seqs], chunks)
    n = int((targets != -100).sum())
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum") / n
    return loss, n


# ---- resume state ----------------------------------------------------------------------------------

def save_state(path: Path, model: Transformer, opt: torch.optim.Optimizer, step: int, config: TrainConfig,
               history: list) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        for name, t in st.items():
            tensors[f"opt.{i}.{name}"] = torch.as_tensor(t).detach().cpu().contiguous()
    if model.args.tie_word_embeddings:
        tensors.pop("model.output.weight", None)
    meta = {"format": STATE_FORMAT, "format_version": str(STATE_VERSION), "step": str(step),
            "settings": json.dumps(config.run_settings(), sort_keys=True), "history": json.dumps(history)}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)  # a crash mid-write leaves the previous state intact


def _check_state_format(path: Path, meta: dict, fix: str) -> None:
    """M3Error unless `meta` is an m3-train-state this version reads; a newer one names both versions
    (formats/README.md)."""
    if meta.get("format") != STATE_FORMAT:
        raise M3Error(f"{path} is not an m3 training state ({STATE_FORMAT}); {fix}")
    version = meta.get("format_version", "")
    if not version.isdigit() or not 1 <= int(version) <= STATE_VERSION:
        newer = version.isdigit() and int(version) > STATE_VERSION
        raise M3Error(f"{path} has {STATE_FORMAT} format_version {version or '(none)'}, "
                      f"{'newer than' if newer else 'not one of'} the version{'' if newer else 's'} this "
                      f"m3compile reads ({STATE_VERSION}); {'upgrade m3compile, or ' if newer else ''}{fix}")


def load_state(path: Path, model: Transformer, opt: torch.optim.Optimizer, config: TrainConfig) -> tuple[int, list]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            _check_state_format(path, meta, "delete it to start afresh")
            if json.loads(meta["settings"]) != config.run_settings():
                raise M3Error(f"{path} was written by a run with other settings; resume with the same settings, "
                              "or delete it (or set resume=False) to start afresh")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        _set_weights(model, tensors)
        sd = opt.state_dict()
        sd["state"] = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, i, name = k.split(".", 2)
                sd["state"].setdefault(int(i), {})[name] = v
        opt.load_state_dict(sd)
        return int(meta["step"]), json.loads(meta["history"])
    except M3Error:
        raise
    except Exception as e:  # safetensors' own errors, missing metadata, tensors of other shapes
        raise M3Error(f"{path} cannot be read ({type(e).__name__}: {str(e)[:200]}); the training state is damaged: "
                      "delete it to start afresh") from None


def load_state_weights(path: Path, model: Transformer) -> int:
    """Only the model weights of a resume state (e.g. to evaluate a run mid-way); returns its step."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        _check_state_format(path, meta, "it cannot be read")
        _set_weights(model, {k: f.get_tensor(k) for k in f.keys() if k.startswith("model.")})
    return int(meta["step"])


def _set_weights(model: Transformer, tensors: dict[str, torch.Tensor]) -> None:
    """Load a state's `model.` tensors (the tied output weight is not stored)."""
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    if model.args.tie_word_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=True)


# ---- the loop ----------------------------------------------------------------------------------------

def train(config: TrainConfig, progress: Callable[[dict], None] | None = None,
          retrieve: RetrieveMany | None = None) -> dict:
    """Continue training `config.model` reading `config.kb`'s memories; write an HF checkpoint.

    Args:
        config: every setting (see TrainConfig).
        progress: called with {"event": "start", "sequences", "steps", "start_step"}, then per step
            {"event": "step", "step", "steps", "loss", "lr", "memory", "tokens_per_s"}, and
            {"event": "checkpoint", "step"}.
        retrieve: (chunk texts, chunk token ids) -> ref ids per chunk; None = the kb's index with
            config.retrieval_mode, refs_per_chunk and max_overlap.
    Returns:
        The report (also written to out/training.json): config, steps, loss curve, tokens/s,
        memory steps, wall time, and that kbs compiled with the input model need recompiling.
    Example:
        >>> from m3compile.train import train
        >>> train(TrainConfig(model="examples/model", kb="kb/", texts="train.jsonl", out="m2/", steps=500))
    """
    progress = progress or (lambda e: None)
    check_device(config.device)  # one line for a typo ("gpu"), before bf16_is_native asks torch about it
    if config.bf16 is None:  # resolved before anything records the settings (report, resume state)
        config = replace(config, bf16=bf16_is_native(config.device))
    if config.threads:
        torch.set_num_threads(config.threads)
    kb = open_kb(config.kb)
    ck = load_checkpoint(config.model, device=config.device)
    # the retrieval floor the start model reads with (its m3-memory.json), carried to the output:
    # training itself reads every retrieved reference, as the paper's schedule does (weak matches are
    # the distractors a reader learns to ignore)
    floor = model_min_relative_score(config.model)
    spec = kb.spec
    if fingerprint(config.model)["tokenizer_sha256"] != spec.tokenizer_sha256:
        raise M3Error(f"model {config.model} has another tokenizer than the one {config.kb} was compiled with; "
                      "compile the kb with this model's tokenizer")
    layout = ReadLayout.from_spec(spec, ck.tokenizer.bos_id, config.chunk_tokens, config.refs_per_chunk)
    room, limit, what = layout.text_room(ck.args, "compile the kb with a smaller --max-tokens", scoring=True)
    if config.seq_tokens > room:  # past them RoPE runs at positions the model never trained on
        raise M3Error(f"--seq-tokens {config.seq_tokens} does not fit the model: it has {limit} positions ({what}) "
                      f"and the read layout takes {layout.text_positions(0)} before the text (write prefix, the "
                      f"kb's {layout.interval}-token memory interval, BOS); use --seq-tokens {max(room, 0)} or less")
    out_dir = Path(config.out)
    if out_dir.exists() and not out_dir.is_dir():  # before the sequences are prepared
        raise M3Error(f"output {config.out} is a file; give a directory for the trained checkpoint")
    if out_dir.resolve() == Path(config.model).resolve():
        raise M3Error(f"output {config.out} is the input model: training would write over its weights; give a new "
                      "directory for the trained checkpoint")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / STATE_FILE).is_file():
        raise M3Error(f"output {config.out} holds files and no unfinished run of this command ({STATE_FILE}): a "
                      "finished checkpoint or another directory; give a new or empty directory")
    if retrieve is None:
        retrieve = kb_retriever(config.kb, config.refs_per_chunk, config.retrieval_mode, config.max_overlap)
    t0 = time.perf_counter()
    seqs = prepare_sequences(Path(config.texts), ck.tokenizer, config.seq_tokens, config.chunk_tokens, retrieve)
    retrieve = None  # the index and its caches are done with
    ref_tokens = retrieved_tokens(kb, (r for s in seqs for c in s.chunk_refs for r in c))
    prep_s = time.perf_counter() - t0

    model = ck.model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    params = sorted(model.named_parameters())
    opt = torch.optim.AdamW([{"params": [p for _, p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
                             {"params": [p for _, p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=config.lr, betas=(0.9, 0.95))
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / STATE_FILE
    start, history = 0, []
    if config.resume and state_path.is_file():
        start, history = load_state(state_path, model, opt, config)
    progress({"event": "start", "sequences": len(seqs), "steps": config.steps, "start_step": start,
              "bf16": config.bf16})

    t_loop, tokens, running = time.perf_counter(), 0, []
    memory_steps = 0
    for step in range(start, config.steps):
        batch = [seqs[i] for i in batch_indices(step, len(seqs), config.batch_size, config.seed)]
        mem = uses_memory(step, config)
        memory_steps += mem
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=config.bf16):
            loss, n = step_loss(model, layout, batch, ref_tokens, mem, spec, config.grad_through_memory)
        lr = lr_at(step, config)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        tokens += n
        running.append((loss.item(), mem))
        rate = tokens / max(1e-9, time.perf_counter() - t_loop)
        progress({"event": "step", "step": step + 1, "steps": config.steps, "loss": running[-1][0], "lr": lr,
                  "memory": mem, "tokens_per_s": rate})
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            m = [x for x, used in running if used]
            nm = [x for x, used in running if not used]
            history.append({"step": step + 1, "loss": round(sum(x for x, _ in running) / len(running), 4),
                            "memory_loss": round(sum(m) / len(m), 4) if m else None,
                            "no_memory_loss": round(sum(nm) / len(nm), 4) if nm else None})
            running = []
        if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
            save_state(state_path, model, opt, step + 1, config, history)
            progress({"event": "checkpoint", "step": step + 1})
    wall = time.perf_counter() - t_loop

    model.eval()
    # the memory format it learned to read (`m3 compile` with this checkpoint takes these settings),
    # written before the checkpoint, whose config.json comes last: a run killed while it writes leaves
    # no loadable checkpoint that would compile with the paper's defaults, and its state file resumes it
    write_model_memory(out, {"max_tokens": spec.width, "boundary": spec.boundary, "min_fill": spec.min_fill,
                             "prefix": spec.prefix, "top_k": spec.top_k, "memory_layers": list(spec.memory_layers)},
                       f"m3compile {__version__} (m3 train)", min_relative_score=floor)
    save_checkpoint(model, out, tokenizer_dir=config.model, bos_id=ck.tokenizer.bos_id, eos_id=ck.tokenizer.eos_id)
    report = {
        "config": {f.name: getattr(config, f.name) for f in fields(config)},
        "sequences": len(seqs), "text_tokens": sum(len(s.text_ids) for s in seqs),
        "chunks_with_refs": sum(bool(c) for s in seqs for c in s.chunk_refs),
        "chunks": sum(len(s.chunk_refs) for s in seqs),
        "layout": {"prefix_ids": list(layout.prefix_ids), "memory_layers": list(layout.memory_layers),
                   "top_k": spec.top_k, "interval": layout.interval},
        "start_step": start, "memory_steps_this_run": memory_steps, "loss_curve": history,
        "final_loss": history[-1]["loss"] if history else None,
        "prepare_seconds": round(prep_s, 2), "train_seconds": round(wall, 2),
        "tokens_per_s": round(tokens / max(1e-9, wall), 1), "torch": torch.__version__,
        "note": "the weights changed: kbs compiled with the input model must be recompiled with this one "
                f"(m3 compile takes the memory settings it was trained with from its {MODEL_MEMORY_FILE})",
    }
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    state_path.unlink(missing_ok=True)
    _epoch_order.cache_clear()  # ~9 MB an epoch of 260k sequences
    return report

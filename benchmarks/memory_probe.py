"""Probe: can a warm model learn to read oracle memories of entities it never saw?

Issue 6's diagnostic (examples/README.md, "Why recall stays at ~5 %"). Starting from the warm-up
model of `benchmarks/train_memory.py --work DIR` (DIR/warm), every training row holds questions
about a freshly generated entity whose article exists only as memory (its own, not retrieved),
with the loss weighted on the answer tokens. Held-out questions of world seed 0's held-out
entities are scored every --eval-every steps: answer accuracy (all answer tokens right, teacher
forced) and answer NLL, with the entity's own memory, none, another entity's, and the article in
context (RAG). --top-k 128 keeps every token; --layers picks the memory layers; --ref-tokens
splits articles into shorter references. --lookup-steps N first trains in-context lookup without
memory (fresh article, then its questions), the copy circuit memory reading reuses;
--lookup-share keeps that share of each memory step's rows as lookup rows.

    python benchmarks/memory_probe.py --model /tmp/m3-train-memory/warm --steps 1500 --top-k 128
    python benchmarks/memory_probe.py --model /tmp/m3-train-memory/warm --lookup-steps 2000 --steps 0 --save /tmp/mp/lookup
"""

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import make_corpus as mc  # noqa: E402  (examples/ is not a package)
from m3compile.model import bf16_is_native, load_checkpoint, save_checkpoint  # noqa: E402
from m3compile.reader import ChunkMemory, ReadLayout  # noqa: E402
from m3compile.train import batch_logits, encode_memories  # noqa: E402
from m3compile.config import CompileConfig  # noqa: E402
from m3compile.checkpoint import fingerprint  # noqa: E402
from m3compile.spec import MemorySpec  # noqa: E402


def entities(tok, seed: int, ref_tokens: int, n: int = 400) -> list[dict]:
    """Each entity: its article's references, its questions and restatements with answer columns."""
    world = mc.generate(n, seed)
    rng, notes = random.Random(f"{seed}/articles"), mc._see_also(world)
    out = []
    for e in world.entities:
        text, _ = mc.article(e, rng)
        ids = tok.encode(text.rstrip("\n") + mc._see_also_text(notes[e.id]) + "\n")

        def answered(items):
            rows = []
            for item in items:
                qi, off = tok.encode_with_offsets(item["text"])
                cols = [j for f in item["facts"] for j, (s, t) in enumerate(off) if s < f["end"] and t > f["start"]]
                rows.append((qi, cols))
            return rows

        out.append({"id": e.id, "refs": [ids[i:i + ref_tokens] for i in range(0, len(ids), ref_tokens)],
                    # a question is scored on its first fact's answer tokens
                    "questions": answered([{**q, "facts": q["facts"][:1]} for q in mc.questions(e)]),
                    "article": ids, "restatements": answered(mc.restatements(e, random.Random(e.id), 1))})
    return out


# bf16 autocast only where the CPU has bf16 units: emulated, it is 34x slower than float32 (AVX2)
BF16 = bf16_is_native("cpu")

class Probe:
    def __init__(self, a):
        self.a = a
        self.ck = load_checkpoint(a.model)
        self.tok, self.model = self.ck.tokenizer, self.ck.model
        self.layers = tuple(int(x) for x in a.layers.split(","))
        prefix = [self.tok.bos_id] + self.tok.encode("Reference:")
        self.layout = ReadLayout(tuple(prefix), self.tok.bos_id, self.layers, 128, 64, 5)
        # the compile's own recipe for these settings (the write prefix is the default "Reference:")
        config, _ = CompileConfig(corpus=".", max_tokens=128, top_k=a.top_k, memory_layers=self.layers, quant="none",
                                  model_memory=False).resolved(a.model)
        self.spec = MemorySpec.from_config(config, self.ck, fingerprint(a.model))
        assert self.spec.prefix_ids == self.layout.prefix_ids, (self.spec.prefix_ids, self.layout.prefix_ids)
        world = entities(self.tok, 0, a.ref_tokens)
        held, _, _ = mc.split_world([e["id"] for e in world], 0.1, 0.6, 0)
        self.held = [e for e in world if e["id"] in held]
        self.pool, self.pool_seed = [], 1

    def fresh(self) -> dict:
        if not self.pool:
            self.pool = entities(self.tok, 1000 + self.pool_seed, self.a.ref_tokens)
            random.Random(self.pool_seed).shuffle(self.pool)
            self.pool_seed += 1
        return self.pool.pop()

    def memories(self, ents):
        refs = [r for e in ents for r in e["refs"]]
        owner = [i for i, e in enumerate(ents) for _ in e["refs"]]
        mems = encode_memories(self.model, refs, list(range(len(refs))), self.spec, grad=torch.is_grad_enabled())
        per = [[] for _ in ents]
        for i, m in zip(owner, mems):
            per[i].append(m)
        return [[ChunkMemory.gather(p, self.layers)] for p in per]

    @torch.no_grad()
    def evaluate(self, mode: str) -> tuple[float, float]:
        self.model.eval()
        items = [(e, q) for e in self.held for q in e["questions"]]
        random.Random(0).shuffle(items)
        items = items[:self.a.eval_n]
        hits, nll, ntok = 0, 0.0, 0
        for i in range(0, len(items), 32):
            b = items[i:i + 32]
            if mode in ("none", "rag"):
                chunks = [None] * len(b)
            else:
                ents = [e if mode == "own" else self.held[(self.held.index(e) + 1) % len(self.held)] for e, _ in b]
                chunks = self.memories(ents)
            ctx = [e["article"] + self.tok.encode("\n\n") if mode == "rag" else [] for e, _ in b]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=BF16):
                logits, _ = batch_logits(self.model, self.layout, [c + q[0] for c, (_, q) in zip(ctx, b)], chunks)
            pred = logits.argmax(-1)
            for r, (_, (qi, cols)) in enumerate(b):
                o = len(self.layout.head) - 1 + len(ctx[r])
                hits += all(int(pred[r, o + j]) == qi[j] for j in cols)
                lp = F.log_softmax(logits[r].float(), -1)
                nll -= sum(float(lp[o + j, qi[j]]) for j in cols)
                ntok += len(cols)
        self.model.train()
        return round(hits / len(items), 3), round(nll / ntok, 3)

    def row(self, e) -> tuple[list[int], list[float]]:
        qs = random.sample(e["questions"], min(self.a.qper, len(e["questions"])))
        ids, w = [], []
        for qi, cols in qs:
            ww = [self.a.w_other] * len(qi)
            for j in cols:
                ww[j] = 1.0
            ids, w = ids + qi, w + ww
        return ids[:64], w[:64]  # one chunk: it reads this entity's memory

    def lookup_row(self, e) -> tuple[list[int], list[float]]:
        # the RAG evaluation's format (article, blank line, question), questions after it: the only
        # way to answer is to find the fact earlier in the sequence, which grows a copy circuit
        ctx = e["article"] + self.tok.encode("\n\n")
        ids, w = self.row(e)
        return ctx + ids, [0.0] * len(ctx) + w

    def train_step(self, rows, chunks, lr: float) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=BF16):
            logits, targets = batch_logits(self.model, self.layout, [r[0] for r in rows], chunks)
        weights = torch.zeros(targets.shape)  # (B, T)
        off = len(self.layout.head) - 1
        for r, (_, w) in enumerate(rows):
            weights[r, off:off + len(w)] = torch.tensor(w)
        nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                              reduction="none").view(targets.shape)
        loss = (nll * weights).sum() / weights.sum()
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        return loss.item()

    def phase(self, name: str, steps: int, make_batch, modes) -> None:
        a, t0, losses = self.a, time.time(), []
        for step in range(steps):
            rows, chunks = make_batch()
            # linear warm-up over 30 steps, cosine down to 10 % of the peak
            lr = a.lr * min(1, (step + 1) / 30) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
            losses.append(self.train_step(rows, chunks, lr))
            if (step + 1) % 50 == 0:
                print(f"{name} step {step + 1} loss {sum(losses) / len(losses):.3f} {time.time() - t0:.0f}s", flush=True)
                losses = []
            if (step + 1) % a.eval_every == 0 or step + 1 == steps:
                print(json.dumps({"phase": name, "step": step + 1, **{m: self.evaluate(m) for m in modes}}), flush=True)

    def lookup_batch(self):
        rows = [self.lookup_row(self.fresh()) for _ in range(self.a.batch_size)]
        return rows, [None] * len(rows)

    def memory_batch(self):
        ents = [self.fresh() for _ in range(self.a.batch_size)]
        rows = [self.row(e) for e in ents]
        with torch.set_grad_enabled(self.a.grad_through_memory):
            chunks = self.memories(ents)
        # --lookup-share of the rows keep practising in-context lookup (no memory) so the copy
        # circuit the memory reader reuses is not trained away
        n_look = round(self.a.lookup_share * len(ents))
        for r in range(n_look):
            rows[r], chunks[r] = self.lookup_row(ents[r]), None
        return rows, chunks

    def run(self):
        a, model = self.a, self.model
        self.params = list(model.parameters())
        for p in self.params:
            p.requires_grad_(True)
        self.opt = torch.optim.AdamW(self.params, lr=a.lr, betas=(0.9, 0.95), weight_decay=0.0)
        modes = ("own", "none", "other", "rag")
        print(json.dumps({"phase": "start", "step": 0, **{m: self.evaluate(m) for m in modes}}), flush=True)
        if a.lookup_steps:
            self.phase("lookup", a.lookup_steps, self.lookup_batch, ("none", "rag"))
        if a.steps:
            self.phase("memory", a.steps, self.memory_batch, modes)
        if a.save:
            save_checkpoint(model.eval(), a.save, tokenizer_dir=a.model, bos_id=self.tok.bos_id, eos_id=self.tok.eos_id)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="warm-up model: DIR/warm of benchmarks/train_memory.py --work DIR")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--top-k", type=int, default=8, help="kept tokens per layer and head; 128 keeps all")
    ap.add_argument("--layers", default="0,1", help="memory layers")
    ap.add_argument("--grad-through-memory", action="store_true")
    ap.add_argument("--qper", type=int, default=4, help="questions per training row")
    ap.add_argument("--w-other", type=float, default=0.1, help="loss weight of non-answer tokens")
    ap.add_argument("--ref-tokens", type=int, default=128)
    ap.add_argument("--lookup-steps", type=int, default=0,
                    help="first train in-context lookup (fresh article, then its questions; no memory)")
    ap.add_argument("--lookup-share", type=float, default=0.0,
                    help="share of each memory step's rows that are in-context lookup rows")
    ap.add_argument("--eval-n", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--save", help="write the probed model here")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    random.seed(0)
    Probe(a).run()


if __name__ == "__main__":
    main()

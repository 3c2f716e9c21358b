"""Where sparse-memory recall goes (issue 6): benchmarks/train_memory.py's held-out question and
restatement fact accuracy for one kb and model, read four ways that the kb format does not offer:

  1. refs/chunk N   retrieval keeps N references per chunk (the paper and the read side: 5);
  2. own refs       each record reads its own entity's first 5 references instead of retrieved
                    ones (an oracle: no retrieval errors, no other entity's memories);
  3. titled         every reference but a document's first is re-encoded with its document's title
                    between the write prefix and its tokens, so its kept keys and values have seen
                    the entity's name (float memories, encoded now, same top-k rule);
  4. sequential     the k-th retrieved memory of a chunk is rotated to its own slot of `max_tokens`
                    positions (best-ranked first) instead of the paper's shared interval, and the
                    text starts after all the slots.

Run it on the work directory of a train_memory.py run (its world, corpus and held-out split are
remade from the same arguments, byte for byte):

    python benchmarks/read_diagnostics.py --work /tmp/tm/D --kb /tmp/tm/D/kb-warm --model /tmp/tm/D/lookup
    python benchmarks/read_diagnostics.py --work /tmp/tm/D --kb /tmp/tm/D/kb-trained --model /tmp/tm/D/trained
"""

import argparse
import dataclasses
import json
from pathlib import Path

import torch

import train_memory as tm  # same directory
from m3compile.index import document_title
from m3compile.kb import Memory
from m3compile.model import apply_rope, rope_cos_sin, rope_inv_freq
from m3compile.train import encode_memories


def accuracy(ev: tm.Evaluator, recs, mode: str = "sparse", own: bool = False) -> dict:
    """Fact accuracy per record kind; own=True reads each record's own entity's references."""
    out = {}
    for kind in ("question", "restatement"):
        rows = [ev.record(r, "other", other=r["entity"]) if own else ev.record(r, mode)
                for r in recs if r["kind"] == kind]
        out[kind] = round(sum(x[2] for x in rows) / max(1, sum(x[3] for x in rows)), 4)
    return out


def titled_memories(ev: tm.Evaluator):
    """kb.memories replacement: each later reference encoded behind its document's title."""
    rows = ev.kb.references().select(["ref_id", "doc_id", "index", "token_ids", "text"]).to_pylist()
    first = {r["doc_id"]: r["text"] for r in rows if r["index"] == 0}
    by_id = {r["ref_id"]: r for r in rows}
    cache = {}

    def memories(ids):
        for i in ids:
            if i not in cache:
                r = by_id[i]
                title = document_title(first[r["doc_id"]])
                extra = ev.tok.encode(title + "\n") if r["index"] > 0 and title else []
                spec = dataclasses.replace(ev.kb.spec, prefix_ids=tuple(ev.kb.spec.prefix_ids) + tuple(extra))
                with torch.no_grad():
                    cache[i] = encode_memories(ev.ck.model, [r["token_ids"]], [i], spec, grad=False)[0]
        return [cache[i] for i in ids]
    return memories


def sequential_memories(ev: tm.Evaluator, plain):
    """kb.memories replacement: the k-th memory's keys rotated by k * interval positions."""
    inv = rope_inv_freq(ev.ck.args)
    slot = ev.layout.interval  # read now: the caller then widens the layout's interval to hold every slot

    def memories(ids):
        out = []
        for k, m in enumerate(plain(ids)):
            cos, sin = rope_cos_sin(inv, torch.tensor([[k * slot]]), torch.float32)  # (1, 1, 1, D)
            # RoPE rotations compose: a key rotated for position a, rotated again by d, is at a + d
            out.append(Memory(m.ref_id, apply_rope(m.keys, cos[0], sin[0]), m.values, m.positions, m.layers))
        return out
    return memories


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="a benchmarks/train_memory.py --work directory")
    ap.add_argument("--kb", type=Path, required=True)
    ap.add_argument("--model", type=Path, required=True)
    tm.add_world_args(ap)  # the run's own values, if it was given other ones
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    w = tm.make_world(a.work, a)
    held = tm.eval_records(w["records"], w["H"], a.eval_limit)
    ev = tm.Evaluator(a.kb, a.model, a.work)
    plain, base = ev.kb.memories, ev.layout
    res = {}
    for n in (1, 2, base.refs_per_chunk):
        ev.layout = dataclasses.replace(base, refs_per_chunk=n)
        res[f"refs/chunk {n}"] = accuracy(ev, held)
    ev.layout = base
    res["own refs"] = accuracy(ev, held, own=True)
    ev.kb.memories = titled_memories(ev)
    res["titled"] = accuracy(ev, held)
    ev.kb.memories = sequential_memories(ev, plain)
    ev.layout = dataclasses.replace(base, interval=base.interval * base.refs_per_chunk)
    res["sequential"] = accuracy(ev, held)
    print(f"{a.kb} read by {a.model}: held-out fact accuracy, questions / restatements")
    for k, v in res.items():
        print(f"  {k:14} {v['question']:7.1%} / {v['restatement']:.1%}")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()

"""A floor under the retrieval score: which of a chunk's retrieved references a reader should read.

A chunk reads the `refs_per_chunk` (5) references retrieval returns for it (paper §3.1). Asked about
one entity, retrieval ranks that entity's article first; the slots left go to whatever scores next.
In the 2000-article world kb those are related articles; in a kb of a few dozen articles they are
unrelated ones that match the question's words ("river", "founded"), and a small reader reads a
fact of the same kind from them: the answer is another entity's value. This benchmark measures, for
one model, on the held-out articles alone and on the whole world kb:

  * greedy recall (as `m3 generate --kb` answers: density_frontier.answer) at each floor F of
    --floors, reading only the retrieved references that score at least F x the chunk's best
    (Retriever.retrieve_many's min_relative_score; m3-memory.json `reading`);
  * at F = 0, what the reader is given: how many of the 5 are the question's own entity's, their
    scores relative to the best and the other entities', and of the wrong answers how many are a
    value that a retrieved reference of another entity states (the answer sentence's form with
    another value in it, found in that reference's text).

    OMP_NUM_THREADS=2 python benchmarks/read_floor.py --threads 2                    # the embedded reader, ~4 min
    OMP_NUM_THREADS=2 python benchmarks/read_floor.py --threads 2 --world-seed 9     # a world no step trained on
    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 python benchmarks/read_floor.py --threads 2 --embedder minilm   # hybrid retrieval
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from density_frontier import (READER, answer, first_sentence, load_records, other_world,  # noqa: E402  (same directory)
                              whole_world)
from train_memory import Evaluator, eval_records  # noqa: E402
from m3compile.config import CompileConfig, default_model_dir  # noqa: E402
from m3compile.pipeline import compile_kb  # noqa: E402


def other_value(rec: dict, said: str) -> str | None:
    """The value in a wrong answer sentence of the record's form ("The Waera." for "The Crianow."),
    or None where the answer has another form."""
    expected = rec["text"][rec["question_end"]:].strip()
    value = str(rec["facts"][0]["value"])
    at = expected.find(value)
    if at < 0:
        return None
    pre, post = expected[:at], expected[at + len(value):]
    if said.startswith(pre) and said.endswith(post) and len(said) > len(pre) + len(post):
        return said[len(pre):len(said) - len(post)]
    return None


def quantiles(xs: list[float]) -> dict:
    if not xs:
        return {}
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=10, method="inclusive") if len(xs) > 1 else xs * 9
    return {"min": round(xs[0], 3), "p10": round(q[0], 3), "median": round(statistics.median(xs), 3),
            "p90": round(q[8], 3), "max": round(xs[-1], 3)}


def measure(kb: Path, model: Path, corpus: Path, questions: list[dict], floors: list[float]) -> dict:
    ev = Evaluator(kb, model, corpus, min_relative_score=0.0)
    rows = ev.kb.references().select(["ref_id", "doc_id", "text"]).to_pydict()
    entity = {i: Path(d).stem for i, d in zip(rows["ref_id"], rows["doc_id"])}
    text = dict(zip(rows["ref_id"], rows["text"]))
    # each question's prompt as generation decodes it (the text its first chunk retrieves with)
    prompts = [ev.tok.decode(ev.tok.encode(r["text"][:r["question_end"]])) for r in questions]
    own, own_ratio, other_ratio, answer_found = 0, [], [], 0
    for r, prompt in zip(questions, prompts):
        hits = ev.read_hits(prompt)  # the floor is 0 here: every retrieved reference
        value = str(r["facts"][0]["value"])
        answer_found += any(entity[h.ref_id] == r["entity"] and value in text[h.ref_id] for h in hits)
        for h in hits:
            mine = entity[h.ref_id] == r["entity"]
            own += mine
            (own_ratio if mine else other_ratio).append(h.score / hits[0].score)
    out = {"questions": len(questions), "own_references_per_question": round(own / len(questions), 3),
           "answer_retrieved": round(answer_found / len(questions), 4),
           "own_score_ratio": quantiles(own_ratio), "other_score_ratio": quantiles(other_ratio), "floors": {}}
    for f in floors:
        ev.floor = f
        right, wrong, copied, kinds = 0, 0, 0, {}
        for r, prompt in zip(questions, prompts):
            said = first_sentence(answer(ev, r, True))
            ok = said == r["text"][r["question_end"]:].strip()
            right += ok
            k = kinds.setdefault(r["facts"][0]["key"], [0, 0])
            k[0] += ok
            k[1] += 1
            if not ok:
                wrong += 1
                got = other_value(r, said)
                copied += bool(got) and any(entity[h.ref_id] != r["entity"] and got in text[h.ref_id]
                                            for h in ev.read_hits(prompt))
        weakest = min(kinds.items(), key=lambda kv: kv[1][0] / kv[1][1])
        out["floors"][str(f)] = {"recall": round(right / len(questions), 4), "right": right, "wrong": wrong,
                                 "wrong_read_from_another_entity": copied,
                                 "weakest_kind": [weakest[0], round(weakest[1][0] / weakest[1][1], 4)]}
        print(f"  floor {f:g}: {100 * right / len(questions):.1f} % right; of {wrong} wrong, {copied} another "
              f"entity's value from its retrieved reference; weakest {weakest[0]}", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=default_model_dir())
    ap.add_argument("--floors", type=float, nargs="+", default=[0.0, 0.5, 0.6, 0.7, 0.8])
    ap.add_argument("--world-seed", type=int, default=None, metavar="SEED",
                    help="another world's held-out entities (density_frontier.py --world-seed)")
    ap.add_argument("--world-entities", type=int, default=8000)
    ap.add_argument("--limit", type=int, default=400, help="held-out records drawn (as density_frontier.py)")
    ap.add_argument("--embedder", default=None,
                    help="compile the kbs with this embedder (m3 compile --embedder, e.g. minilm): hybrid retrieval's scores")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    res = {"model": str(a.model), "world_seed": a.world_seed, "embedder": a.embedder, "kbs": {}}
    with tempfile.TemporaryDirectory(prefix="m3floor-") as tmp:
        if a.world_seed is None:
            facts, corpora = READER / "facts", {"held-out": READER, "world": whole_world(Path(tmp))}
        else:
            _, facts, held, whole = other_world(Path(tmp), a.world_entities, a.world_seed)
            corpora = {"held-out": held, "world": whole}
        recs = load_records(facts)
        questions = [r for r in eval_records(recs, {r["entity"] for r in recs}, a.limit) if r["kind"] == "question"]
        for name, corpus in corpora.items():
            t0 = time.perf_counter()
            kb = Path(tmp) / f"kb-{name}"
            compile_kb(CompileConfig(corpus=str(corpus / "corpus"), model=str(a.model), embedder=a.embedder), kb)
            print(f"{name} kb:", flush=True)
            res["kbs"][name] = measure(kb, a.model, corpus, questions, a.floors)
            res["kbs"][name]["seconds"] = round(time.perf_counter() - t0, 1)
    print("\n| kb | own refs of 5 | own / other refs' score ÷ best (median) | "
          + " | ".join(f"floor {f:g}" for f in a.floors) + " | wrong at 0: another entity's value |")
    print("|---|---|---|" + "---|" * len(a.floors) + "---|")
    for name, r in res["kbs"].items():
        cells = " | ".join(f"{100 * r['floors'][str(f)]['right'] / r['questions']:.1f} %" for f in a.floors)
        z = r["floors"].get("0.0")
        copied = f"{z['wrong_read_from_another_entity']} of {z['wrong']}" if z else "-"
        print(f"| {name} | {r['own_references_per_question']} | {r['own_score_ratio'].get('median')} / "
              f"{r['other_score_ratio'].get('median')} | {cells} | {copied} |")
    if a.json:
        a.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

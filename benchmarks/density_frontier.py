"""The density frontier: held-out recall against the kept share of a reference's key-values.

kept share = (kept tokens / reference tokens) x (memory layers / layers), nominal: top-k over the
width (the table's column, the plot's axis); the JSON's `share_measured` is what the kb keeps of
its own references, kept key-values over their tokens x kv heads x layers, a little higher where
sentence cuts leave references short of the width. With several --quant, each point's rows are
compared with its first one question by question (the paired difference in greedy recall, with
a 95 % interval). The first reader
(examples/reader-half) keeps 16 of 32 tokens in all 4 layers: 1/2; the embedded default, 5 of 32 in
layer 3 alone: 5/128 (8 of 32: 1/16). The paper keeps 8 of 128 in the first half of the layers:
1/32. Each point compiles the reader's 40 held-out articles (examples/reader/corpus: never in any
training text; `--kb world`: all 2000 articles of its world, the kb benchmarks/train_memory.py
reads) with one model at one (top-k, memory layers), int8 (`--quant` for others: every point at
each, a vq kb with codebooks trained on its own memories), and measures on the same held-out
records as examples/README.md (the first --limit records after a seeded shuffle):

  greedy    questions answered exactly as `m3 generate --kb` answers them: the question part as
            the prompt, greedy decoding, the kb's retrieval; right when the first sentence of the
            continuation is the record's answer sentence ("A silver wheel."); with the kb's
            memories, and without any (same layout);
  forced    teacher-forced fact accuracy (every token of the fact greedy-correct; the Evaluator of
            benchmarks/train_memory.py), questions / restatements: no memory, sparse memory found
            by retrieval, the article in context (RAG), another entity's memories;
  bytes     bytes per corpus token of the memory shards (what grows with the kept share), and of
            the whole kb directory (shards, table, index, manifest, and the tokenizer copy: a fixed
            ~54 KB that weighs ~15 bytes per token on these 3.5k-token kbs, nothing on a big one);
  kinds     greedy question recall with memory per fact kind (founded, market_day, ...);
  known     (--known) questions about the reader's known entities W (their articles were in its
            warm-up): of those it answers right without memory (greedy), how many it still answers
            right reading a kb of their own articles (or, --known-kb world, the world kb that holds
            them); memory must not make it forget. --known 1852 asks all of them.

Points are MODEL:TOP_K:LAYERS (LAYERS like 0-3 or 2,3; MODEL a checkpoint directory, `reader`
for the embedded default, or `half` for the 1/2 reader, examples/reader-half/model), with
`@WIDTH` after them for references of WIDTH tokens instead of the model's (reader:8:3@64). Without
--point: the 1/2 reader zero-shot at top-16, 8, 4, 2 and 1 of its 32-token references in all
layers (1/2 ... 1/32). `--dtype bfloat16` compiles the memories in bfloat16 (the model still reads
in float32): does the reader read memories of a bf16 compile as well? `--world-seed SEED` measures
on another world's held-out entities (split as train_memory.py splits, --world-entities of them,
--kb world: all its articles): a seed no recipe step trained on is new to every reader, including
the steps that replay the first world (d32r, d32s, d5e, d5r).

    python benchmarks/density_frontier.py --json frontier.json --plot examples/density_frontier.png
    python benchmarks/density_frontier.py --point half:16:0-3 reader:8:3 reader:4:3 --known 1000
    python benchmarks/density_frontier.py --kb world --world-seed 9 --point reader:8:3 reader:4:3
    python benchmarks/density_frontier.py --kb world --world-seed 9 --point reader:8:3 --quant int8 vq
"""

import argparse
import itertools
import json
import math
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from fractions import Fraction
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT / "examples"))

import make_corpus  # noqa: E402
from common import pyplot  # noqa: E402  (same directory)
from train_memory import Evaluator, eval_records  # noqa: E402  (same directory)
from m3compile.config import CompileConfig, default_model_dir  # noqa: E402
from m3compile.pipeline import compile_kb  # noqa: E402
from m3compile.reader import ChunkMemory, generate  # noqa: E402

READER = ROOT / "examples" / "reader"
HALF = ROOT / "examples" / "reader-half" / "model"  # the 1/2 reader, the embedded default until 2026-12-03
ALIASES = {"reader": default_model_dir(), "half": HALF}
ANSWER_TOKENS = 16  # the longest answer sentence of the demo world is 9 tokens


def layers_arg(s: str) -> tuple[int, ...]:
    if "-" in s:
        lo, hi = (int(x) for x in s.split("-"))
        return tuple(range(lo, hi + 1))
    return tuple(int(x) for x in s.split(","))


def parse_point(s: str) -> dict:
    """MODEL:TOP_K:LAYERS, or MODEL:TOP_K:LAYERS@WIDTH for references of WIDTH tokens instead of the model's."""
    body, _, width = s.partition("@")
    model, top_k, layers = body.rsplit(":", 2)
    path = ALIASES.get(model, Path(model))
    return {"name": s, "model": path, "top_k": int(top_k), "layers": layers_arg(layers),
            "width": int(width) if width else None}


def load_records(facts: Path) -> list[dict]:
    return [json.loads(line) for name in ("questions.jsonl", "restatements.jsonl")
            for line in (facts / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def answer(ev: Evaluator, rec: dict, memory: bool) -> str:
    """The greedy continuation of the question part, read as `m3 generate` reads (generation.py)."""
    prompt = ev.tok.encode(rec["text"][:rec["question_end"]])

    def retrieve(tokens):
        hits = ev.read_hits(ev.tok.decode(tokens))
        return ChunkMemory.gather(ev.kb.memories([h.ref_id for h in hits]), ev.layout.memory_layers)

    new = generate(ev.ck.model, ev.layout, prompt, retrieve if memory else None, ANSWER_TOKENS, 0.0,
                   ev.tok.eos_id)
    head = ev.tok.decode(prompt)
    full = ev.tok.decode(prompt + new)
    return full[len(head):] if full.startswith(head) else ev.tok.decode(new)


def first_sentence(text: str) -> str:
    text = text.strip()
    end = text.find(". ")
    return text if end < 0 else text[:end + 1]


def greedy(ev: Evaluator, questions: list[dict], memory: bool) -> dict:
    right, by_kind = [], defaultdict(lambda: [0, 0])
    for r in questions:
        ok = first_sentence(answer(ev, r, memory)) == r["text"][r["question_end"]:].strip()
        if ok:
            right.append(r["id"])
        k = by_kind[r["facts"][0]["key"]]
        k[0] += ok
        k[1] += 1
    return {"recall": round(len(right) / max(1, len(questions)), 4), "questions": len(questions), "right": right,
            "kinds": {k: round(v[0] / v[1], 4) for k, v in sorted(by_kind.items())}}


def kb_bytes(kb: Path) -> int:
    return sum(p.stat().st_size for p in kb.rglob("*") if p.is_file())


def measure(point: dict, corpus_dir: Path, recs: list[dict], tmp: Path, modes, dtype: str = "float32",
            quant: str = "int8", min_relative_score: float | None = None) -> dict:
    kb = tmp / f"kb-{abs(hash((point['name'], quant)))}"
    t0 = time.perf_counter()
    m = compile_kb(CompileConfig(corpus=str(corpus_dir / "corpus"), model=str(point["model"]), top_k=point["top_k"],
                                 memory_layers=point["layers"], max_tokens=point["width"], quant=quant,
                                 dtype=dtype), kb).manifest
    spec = m.spec
    ev = Evaluator(kb, point["model"], corpus_dir, min_relative_score)
    n_layers = ev.ck.args.n_layers
    tokens = sum(ev.kb.references().column("n_tokens").to_pylist())
    share = Fraction(spec.top_k, spec.width) * Fraction(len(spec.memory_layers), n_layers)
    qs = [r for r in recs if r["kind"] == "question"]
    row = {"point": point["name"], "model": str(point["model"]), "top_k": spec.top_k, "width": spec.width,
           "memory_layers": list(spec.memory_layers), "layers": n_layers, "dtype": spec.dtype, "quant": quant,
           "share": str(share),
           "share_value": float(share),
           # what the kb keeps of its own references (kept key-values over their tokens x kv heads x
           # layers): above the nominal share where sentence cuts leave references short of the width
           "share_measured": round(m.counts["kept_kv"] / (m.counts["tokens"] * spec.n_kv_heads * n_layers), 5),
           "min_relative_score": ev.floor, "kb_bytes_per_token": round(kb_bytes(kb) / tokens, 1),
           "memory_bytes_per_token": round(sum(p.stat().st_size for p in kb.glob("memory-*.safetensors")) / tokens, 1),
           "corpus_tokens": tokens}
    row["greedy"] = {"memory": greedy(ev, qs, True), "none": greedy(ev, qs, False)}
    row["forced"] = ev.table(recs, modes=modes)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def drawn_world(entities: int, seed: int):
    """A world and its split (H, A, W), as benchmarks/train_memory.py draws them with its defaults."""
    world = make_corpus.generate(entities, seed)
    return world, make_corpus.split_world([e.id for e in world.entities], 0.02, 0.92, seed)


def readers_world():
    """The readers' 2000-entity world (seed 0) and its split (H, A, W): H is examples/reader/corpus."""
    return drawn_world(2000, 0)


def known_world(tmp: Path, limit: int) -> tuple[Path, list[dict]]:
    """The reader's known entities W (trained on without memory): their articles and questions."""
    world, (_, _, W) = readers_world()
    out = tmp / "known"
    make_corpus.write_corpus(world, out / "corpus", ids=W)
    make_corpus.write_facts(world, out / "facts", ids=W)
    recs = [r for r in load_records(out / "facts") if r["kind"] == "question"]
    random.Random(0).shuffle(recs)
    return out, recs[:limit]


def whole_world(tmp: Path) -> Path:
    """Every article of the reader's 2000-entity world (its kb in benchmarks/train_memory.py)."""
    out = tmp / "world"
    make_corpus.write_corpus(make_corpus.generate(2000, 0), out / "corpus")
    return out


def other_world(tmp: Path, entities: int, seed: int) -> tuple[list, Path, Path, Path]:
    """Another world, split as benchmarks/train_memory.py splits its worlds: (its held-out entities,
    their facts, a folder of their articles alone, a folder of every article). With a seed no recipe
    step trained on (examples/train_sparse_reader.sh: 0-4, 6, 7, 14, 15) it is new to every reader, replay and all."""
    world, (H, _, _) = drawn_world(entities, seed)
    out = tmp / f"world-{seed}"
    make_corpus.write_facts(world, out / "facts", ids=H)
    make_corpus.write_corpus(world, out / "held" / "corpus", ids=H)
    make_corpus.write_corpus(world, out / "whole" / "corpus")
    return [e for e in world.entities if e.id in H], out / "facts", out / "held", out / "whole"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--point", nargs="+",
                    default=["half:16:0-3", "half:8:0-3", "half:4:0-3", "half:2:0-3", "half:1:0-3"])
    ap.add_argument("--limit", type=int, default=400, help="held-out records evaluated (as examples/README.md)")
    ap.add_argument("--known", type=int, default=0, metavar="N", help="also ask N questions about the known entities W")
    ap.add_argument("--known-kb", choices=("own", "world"), default="own",
                    help="the kb the known questions read: their 120 articles alone (own), or the whole 2000-article "
                         "world that holds them (world: the kb the held-out questions read with --kb world, so that "
                         "known and held-out facts differ only in what the model learned; a small kb of unrelated "
                         "neighbours reads worse, examples/README.md)")
    ap.add_argument("--kb", choices=("held-out", "world"), default="held-out",
                    help="the kb's articles: the 40 held-out ones (examples/reader/corpus) or all 2000 of the "
                         "world, as benchmarks/train_memory.py evaluates (same held-out records either way)")
    ap.add_argument("--world-seed", type=int, default=None, metavar="SEED",
                    help="measure on another world's held-out entities instead of the readers' first world's: "
                         "--kb world compiles all its articles, --kb held-out theirs alone (9, 10 or 13: "
                         "worlds no step trained on; the recipe trained on 0-4, 6, 7, 14 and 15, steps outside "
                         "it on 5, 8, 11, 12 and 16-18)")
    ap.add_argument("--world-entities", type=int, default=8000, help="entities of the --world-seed world")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="float32", help="the compile's dtype (the memories' forward); reading is float32")
    ap.add_argument("--min-relative-score", type=float, default=None, metavar="F",
                    help="read only retrieved references scoring at least F of the best (default: each model's "
                         "m3-memory.json, as m3 generate reads: 0.7 for the embedded reader, 0 for models without one)")
    ap.add_argument("--quant", nargs="+", default=["int8"],
                    help="the kbs' quantizations: every point is measured at each (int8, vq, ...: m3 compile --quant)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path)
    a = ap.parse_args()
    if a.world_seed is not None and a.known:
        ap.error("--known asks about the readers' first world (the facts they were trained on); "
                 "leave it out with --world-seed")
    torch.set_num_threads(a.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="m3frontier-") as tmp:
        if a.world_seed is None:
            facts, corpus = READER / "facts", READER if a.kb == "held-out" else whole_world(Path(tmp))
        else:
            _, facts, held, whole = other_world(Path(tmp), a.world_entities, a.world_seed)
            corpus = held if a.kb == "held-out" else whole
        recs = load_records(facts)
        recs = eval_records(recs, {r["entity"] for r in recs}, a.limit)
        known = known_world(Path(tmp), a.known) if a.known else None
        # the known questions' kb: their own articles, or the world's (already there with --kb world)
        if known and a.known_kb == "own":
            known_corpus = known[0]
        elif known:
            known_corpus = corpus if a.kb == "world" else whole_world(Path(tmp))
        for s, quant in itertools.product(a.point, a.quant):
            p = parse_point(s)
            row = measure(p, corpus, recs, Path(tmp), ("none", "sparse", "rag", "other"), a.dtype, quant,
                          a.min_relative_score)
            row["kb"] = a.kb if a.world_seed is None else f"{a.kb}, world {a.world_seed} ({a.world_entities} entities)"
            if known:
                # facts the model answers right without memory, asked again with their article's memories
                # with --kb world and --known-kb world: the kb just compiled for this point (up to date)
                kdir = Path(tmp) if known_corpus == corpus else Path(tmp) / "k"
                kev = measure(p, known_corpus, known[1], kdir, (), a.dtype, quant, a.min_relative_score)
                g = kev["greedy"]
                kept = set(g["none"]["right"]) & set(g["memory"]["right"])
                row["known"] = {"kb": a.known_kb, "questions": g["none"]["questions"], "none": g["none"]["recall"],
                                "memory": g["memory"]["recall"], "known_without_memory": len(g["none"]["right"]),
                                "still_right_with_memory": len(kept),
                                "ratio": round(len(kept) / max(1, len(g["none"]["right"])), 4),
                                # which ones memory lost, and what the known ones are (a fact kind the model
                                # guesses without memory, e.g. a guild's kind from its name, or a fact it learned)
                                "lost": sorted(set(g["none"]["right"]) - kept),
                                "known_kinds": dict(Counter(q.split(".q.")[1].rsplit(".", 1)[0]
                                                            for q in g["none"]["right"])),
                                "memory_kinds": g["memory"]["kinds"]}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print_table(rows)
    print_paired(rows)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2) + "\n")
    if a.plot:
        plot(rows, a.plot)
    return 0


def paired(base: dict, other: dict) -> dict:
    """Greedy recall of `other` against `base` on the same questions: the difference, its 95 %
    interval from the questions the two answer differently (paired: each question's pair of
    outcomes, not two independent samples), and how many each alone answered."""
    a, b = set(base["greedy"]["memory"]["right"]), set(other["greedy"]["memory"]["right"])
    n = base["greedy"]["memory"]["questions"]
    only_a, only_b = len(a - b), len(b - a)
    diff = (only_b - only_a) / n
    se = math.sqrt(max(0.0, (only_a + only_b) / n - diff**2) / n)
    return {"against": base["quant"], "points": round(100 * diff, 2), "ci95": [round(100 * (diff - 1.96 * se), 2),
            round(100 * (diff + 1.96 * se), 2)], "only_base": only_a, "only_this": only_b, "questions": n}


def print_paired(rows):
    """For each point read at several quantizations: each against the first, question by question."""
    first = {}
    for r in rows:
        base = first.setdefault(r["point"], r)
        if r is not base and base["greedy"]["memory"]["questions"] == r["greedy"]["memory"]["questions"]:
            r["paired"] = p = paired(base, r)
            print(f"{r['point']}: {r['quant']} against {p['against']}, greedy with memory: {p['points']:+.1f} points "
                  f"(95 % CI {p['ci95'][0]:+.1f} to {p['ci95'][1]:+.1f}; {p['only_base']} questions right only with "
                  f"{p['against']}, {p['only_this']} only with {r['quant']}, of {p['questions']})")


def pct(x) -> str:
    return f"{100 * x:.1f}"


def print_table(rows):
    print("| point | quant | kept share | bytes/corpus token: shards / kb | greedy q, memory | greedy q, none | forced q/r, sparse "
          "| forced q/r, none | forced q/r, RAG | forced q, other's memory | weakest kind | known facts still right with memory |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f = r["forced"]
        kinds = r["greedy"]["memory"]["kinds"]
        weak = min(kinds, key=kinds.get) if kinds else "-"
        known = (f"{r['known']['still_right_with_memory']} of {r['known']['known_without_memory']}"
                 if "known" in r else "-")
        print(f"| {r['point']} | {r['quant']} | {r['share']} | {r['memory_bytes_per_token']} / {r['kb_bytes_per_token']} "
              f"| {pct(r['greedy']['memory']['recall'])} % "
              f"| {pct(r['greedy']['none']['recall'])} % "
              f"| {pct(f['sparse']['question']['fact_acc'])} / {pct(f['sparse']['restatement']['fact_acc'])} % "
              f"| {pct(f['none']['question']['fact_acc'])} / {pct(f['none']['restatement']['fact_acc'])} % "
              f"| {pct(f['rag']['question']['fact_acc'])} / {pct(f['rag']['restatement']['fact_acc'])} % "
              f"| {pct(f['other']['question']['fact_acc'])} % | {weak} {pct(kinds.get(weak, 0))} % | {known} |")


def plot(rows, out: Path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_model = defaultdict(list)  # one line per model, memory-layer set and quantization
    for r in rows:
        layers = "all layers" if len(r["memory_layers"]) == r["layers"] else \
            "layers " + ",".join(map(str, r["memory_layers"]))
        by_model[(r["model"], layers, r["quant"])].append(r)
    for (model, layers, quant), rs in by_model.items():
        rs = sorted(rs, key=lambda r: r["share_value"])
        name = Path(model).parent.name if Path(model).name == "trained" else Path(model).name  # a train_memory --work
        known = {default_model_dir().resolve(): "embedded reader (sparse), ", HALF.resolve(): "1/2 reader, "}
        label = known.get(Path(model).resolve(), f"{name}, ") + layers + ("" if quant == "int8" else f", {quant}")
        ax.plot([r["share_value"] for r in rs], [100 * r["greedy"]["memory"]["recall"] for r in rs], "o-",
                label=label)
        for i, r in enumerate(rs):  # neighbours' labels alternate above and below their points
            ax.annotate(f"{r['top_k']}/{r['width']}, L{min(r['memory_layers'])}-{max(r['memory_layers'])}",
                        (r["share_value"], 100 * r["greedy"]["memory"]["recall"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4) if i % 2 == 0 else (4, -11))
    none = [100 * r["greedy"]["none"]["recall"] for r in rows]
    ax.axhline(sum(none) / len(none), color="grey", ls=":", label="no memory")
    ax.axhline(80, color="red", ls="--", lw=0.8, label="goal at <= 1/16")
    ax.set_xscale("log", base=2)
    ax.set_xticks([1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2], ["1/32", "1/16", "1/8", "1/4", "1/2"])
    ax.set_xlabel("kept share of a reference's key-values (tokens x layers)")
    ax.set_ylabel("held-out question recall, greedy exact (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    sys.exit(main())

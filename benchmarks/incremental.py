"""Incremental compile cost: full compile, then ~1 % new documents, then a no-change rebuild.

The corpus is --mb megabytes of ../shared/data/gutenberg, each book's text (between the Project
Gutenberg markers) cut into documents of about --doc-kb kilobytes at paragraph breaks. The model
is the compile benchmark's random-weight 125M-parameter Llama (12 x 768) in bfloat16 with a 32k
BPE trained on the same text. Prints each step's wall time as a share of the full compile, and
the forward passes each ran (goals: adding 1 % <= 2 %, no change <= 1 % with zero forward passes).

    python benchmarks/incremental.py --mb 1

With --scifact, the corpus is BEIR SciFact's 5,183 abstracts (../shared/data/scifact/corpus.jsonl,
one .jsonl file; the added ones in a second) and the model the embedded default (float32), the
setting where a kb is large (150,638 references) and a compile cheap a reference, so what an
incremental compile does beside encoding shows. A fourth step removes the added documents again.

    python benchmarks/incremental.py --scifact --add-share 0.0002
    python benchmarks/incremental.py --scifact --docs 1000 --add-share 0.001 --embedder minilm
    python benchmarks/incremental.py --scifact --docs 1000 --add-share 0.001 --embedder minilm --index-factory HNSW32
"""

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from m3compile import distribute, pipeline
from m3compile.config import CompileConfig
from m3compile.model import Transformer, save_checkpoint

from common import DATA  # noqa: E402  (same directory)
from compile_throughput import ARGS, book_texts, train_tokenizer  # noqa: E402

SCIFACT = DATA / "scifact"


def split_docs(texts: dict[str, str], doc_bytes: int) -> dict[str, str]:
    docs = {}
    for book, text in texts.items():
        part, parts = [], []
        for para in text.split("\n\n"):
            part.append(para)
            if sum(len(p) for p in part) >= doc_bytes:
                parts.append("\n\n".join(part))
                part = []
        if part:
            parts.append("\n\n".join(part))
        docs.update({f"{book}-{i:04d}": p for i, p in enumerate(parts) if p.strip()})
    return docs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=1.0)
    ap.add_argument("--doc-kb", type=float, default=8.0)
    ap.add_argument("--add-share", type=float, default=0.01, help="share of documents added in step 2")
    ap.add_argument("--scifact", action="store_true", help="SciFact's abstracts and the embedded default model")
    ap.add_argument("--docs", type=int, help="--scifact: only the first DOCS abstracts")
    ap.add_argument("--embedder", help="--scifact: a dense index too (e.g. minilm: hybrid retrieval)")
    ap.add_argument("--index-factory", default="Flat", help="--embedder: the dense index's FAISS factory (HNSW32, ...)")
    opts = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="m3incr-"))
    calls = {"n": 0}
    real = distribute.memorize  # the compile's map step (distribute.encode_frames) calls it per batch

    def counted(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    distribute.memorize = counted
    try:
        corpus = work / "corpus"
        corpus.mkdir()
        if opts.scifact:
            lines = (SCIFACT / "corpus.jsonl").read_text(encoding="utf-8").splitlines()[:opts.docs]
            n_add = max(1, round(opts.add_share * len(lines)))
            held = set(range(0, len(lines), max(1, len(lines) // n_add))[:n_add])
            (corpus / "abstracts.jsonl").write_text("".join(f"{x}\n" for i, x in enumerate(lines) if i not in held))
            added = {"added.jsonl": "".join(f"{lines[i]}\n" for i in sorted(held))}
            n_docs, what = len(lines), (f"SciFact's first {len(lines)} abstracts; the embedded default model, "
                                        f"float32; embedder {opts.embedder}, {opts.index_factory}")
            cfg = CompileConfig(corpus=str(corpus), embedder=opts.embedder, index_factory=opts.index_factory)
        else:
            texts = book_texts(opts.mb)
            docs = split_docs(texts, int(opts.doc_kb * 1024))
            names = sorted(docs)
            n_add = max(1, round(opts.add_share * len(names)))
            held = set(names[:: max(1, len(names) // n_add)][:n_add])  # spread over the books
            for name in names:
                if name not in held:
                    (corpus / f"{name}.txt").write_text(docs[name])
            added = {f"{name}.txt": docs[name] for name in held}
            n_docs, what = len(names), f"{opts.mb} MB of {len(texts)} books; model 125M params, bfloat16"
            model = work / "model"
            save_checkpoint(Transformer(ARGS).init_weights(seed=0), model, bos_id=1, eos_id=2)
            train_tokenizer(list(texts.values()), model)
            cfg = CompileConfig(corpus=str(corpus), model=str(model), dtype="bfloat16")
        rows = []
        docs_word = "document" + "s" * (len(held) > 1)
        steps = ["full compile", f"add {len(held)} {docs_word} ({100 * len(held) / n_docs:.2f} %)",
                 "no-change rebuild"] + ([f"remove the {docs_word} added"] if opts.scifact else [])
        for step in steps:
            for name, text in added.items():
                if step.startswith("add"):
                    (corpus / name).write_text(text)
                elif step.startswith("remove"):
                    (corpus / name).unlink()
            calls["n"] = 0
            t = time.perf_counter()
            r = pipeline.compile_kb(cfg, work / "kb")
            wall = time.perf_counter() - t
            stages = json.loads((work / "kb" / "run.json").read_text())["stage_seconds"] if r.summary.get(
                "shards_written") is not None and (work / "kb" / "run.json").is_file() else {}
            rows.append((step, wall, calls["n"], r.summary["references"], stages))
        full = rows[0][1]
        print(f"corpus: {n_docs} documents ({what}), {rows[0][3]['encoded']} references\n")
        print("| step | wall s | share of full compile | forward passes | references encoded / reused / removed |")
        print("|---|---|---|---|---|")
        for step, wall, n, refs, _ in rows:
            print(f"| {step} | {wall:.1f} | {100 * wall / full:.2f} % | {n} | "
                  f"{refs['encoded']} / {refs['reused']} / {refs['removed']} |")
        # where a step's time went (run.json of the compile that wrote it; a no-change rebuild
        # writes none, so its stages are the previous step's and are not shown)
        for step, wall, _, _, stages in [r for r in rows if not r[0].startswith("no-change")]:
            print(f"\n{step}: " + ", ".join(f"{k} {v:.2f} s" for k, v in sorted(stages.items(), key=lambda kv: -kv[1])))
    finally:
        distribute.memorize = real
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Incremental compile cost: full compile, then ~1 % new documents, then a no-change rebuild.

The corpus is --mb megabytes of ../shared/data/gutenberg, each book's text (between the Project
Gutenberg markers) cut into documents of about --doc-kb kilobytes at paragraph breaks. The model
is the compile benchmark's random-weight 125M-parameter Llama (12 x 768) in bfloat16 with a 32k
BPE trained on the same text. Prints each step's wall time as a share of the full compile, and
the forward passes each ran (goals: adding 1 % <= 2 %, no change <= 1 % with zero forward passes).

    python benchmarks/incremental.py --mb 1
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

from compile_throughput import ARGS, book_texts, train_tokenizer  # noqa: E402  (same directory)


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
    opts = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="m3incr-"))
    calls = {"n": 0}
    real = distribute.memorize  # the compile's map step (distribute.encode_frames) calls it per batch

    def counted(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    distribute.memorize = counted
    try:
        texts = book_texts(opts.mb)
        docs = split_docs(texts, int(opts.doc_kb * 1024))
        names = sorted(docs)
        n_add = max(1, round(opts.add_share * len(names)))
        held = set(names[:: max(1, len(names) // n_add)][:n_add])  # spread over the books
        corpus = work / "corpus"
        corpus.mkdir()
        for name in names:
            if name not in held:
                (corpus / f"{name}.txt").write_text(docs[name])
        model = work / "model"
        save_checkpoint(Transformer(ARGS).init_weights(seed=0), model, bos_id=1, eos_id=2)
        train_tokenizer(list(texts.values()), model)
        cfg = CompileConfig(corpus=str(corpus), model=str(model), dtype="bfloat16")
        rows = []
        for step in ("full compile", f"add {len(held)} documents ({100 * len(held) / len(names):.1f} %)",
                     "no-change rebuild"):
            if step.startswith("add"):
                for name in held:
                    (corpus / f"{name}.txt").write_text(docs[name])
            calls["n"] = 0
            t = time.perf_counter()
            r = pipeline.compile_kb(cfg, work / "kb")
            wall = time.perf_counter() - t
            stages = json.loads((work / "kb" / "run.json").read_text())["stage_seconds"] if r.summary.get(
                "shards_written") is not None and (work / "kb" / "run.json").is_file() else {}
            rows.append((step, wall, calls["n"], r.summary["references"], stages))
        full = rows[0][1]
        print(f"corpus: {len(names)} documents ({opts.mb} MB of {len(texts)} books), "
              f"{rows[0][3]['encoded']} references; model 125M params, bfloat16\n")
        print("| step | wall s | share of full compile | forward passes | references encoded / reused / removed |")
        print("|---|---|---|---|---|")
        for step, wall, n, refs, _ in rows:
            print(f"| {step} | {wall:.1f} | {100 * wall / full:.2f} % | {n} | "
                  f"{refs['encoded']} / {refs['reused']} / {refs['removed']} |")
        # where a step's time went (run.json of the compile that wrote it; a no-change rebuild
        # writes none, so its stages are the previous step's and are not shown)
        for step, wall, _, _, stages in rows[:2]:
            print(f"\n{step}: " + ", ".join(f"{k} {v:.2f} s" for k, v in sorted(stages.items(), key=lambda kv: -kv[1])))
    finally:
        distribute.memorize = real
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

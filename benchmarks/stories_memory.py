"""What explicit memories do for a real model never trained to read them: stories260K.

Converts ../shared/data/stories260k (llama2.c) to a Hugging Face checkpoint, compiles a kb from
the first --stories TinyStories validation stories (one document each), and prints `m3 eval
--oracle` over their first --tokens tokens: perplexity without memory, with the kb's sparse
memories (paper format: top-8, first half of the layers), with full-reference memories in those
layers and in all layers — for each --quant.

    python benchmarks/stories_memory.py --stories 60 --tokens 255 --quant none,int8
"""

import argparse
import json
import tempfile
from pathlib import Path

from common import stories260k, tinystories  # noqa: E402  (same directory)
from m3compile.config import CompileConfig
from m3compile.corpus import CorpusReport, iter_documents
from m3compile.evaluate import evaluate
from m3compile.kb import load_kb_model, open_kb
from m3compile.pipeline import compile_kb


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stories", type=int, default=60)
    ap.add_argument("--tokens", type=int, default=255, help="score the first N tokens of each story")
    ap.add_argument("--quant", default="none,int8")
    ap.add_argument("--top-k", type=int, default=8)
    opts = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="m3stories-") as tmp:
        work = Path(tmp)
        model = stories260k(work)
        stories = tinystories(opts.stories)
        corpus = work / "stories.jsonl"
        corpus.write_text("".join(json.dumps({"id": f"story{i:04d}", "text": s}) + "\n" for i, s in enumerate(stories)))
        docs = list(iter_documents(corpus, CorpusReport()))
        for quant in opts.quant.split(","):
            compile_kb(CompileConfig(corpus=str(corpus), model=str(model), quant=quant, top_k=opts.top_k), work / quant)
            kb = open_kb(work / quant)
            r = evaluate(kb, load_kb_model(kb), docs, oracle=True, max_text_tokens=opts.tokens)
            rows = r["rows"]
            print(f"\nquant {kb.manifest.quant['scheme']}, top-{opts.top_k}, memory layers "
                  f"{kb.manifest.write['memory_layers']}: {r['docs']} stories, {rows['no_memory']['tokens']} "
                  f"predicted tokens, oracle memories (each story's own references)")
            print("| memory | perplexity | nats/token | vs none | stories improved |\n|---|---|---|---|---|")
            base = rows["no_memory"]["nll"]
            for name, v in rows.items():
                print(f"| {name} | {v['ppl']:.4f} | {v['nll']:.4f} | {v['nll'] - base:+.4f} | "
                      f"{r['improved_docs'].get(name, '')} |")


if __name__ == "__main__":
    main()

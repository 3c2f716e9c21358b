"""Decoding throughput with and without explicit memory, measured in one run.

Compiles a kb (default: the 24-article demo corpus with examples/model; or --corpus/--model), then
generates --new tokens after a --prompt-token prompt, greedily, --reps times each way, with the
paper's schedule (retrieve 5 references per 64-token chunk, swap memories every 64 generated
tokens) and without memory. Prints tokens/s for both and their ratio (paper Table 21: 733 vs
1131 tokens/s on an A800 at batch 32, i.e. -35 %). Here: batch 1, CPU, KV cache, retrieval from
the kb's own index, memories decoded from the kb (LRU cache cleared before each run).

    python benchmarks/decode.py
    python benchmarks/decode.py --model /path/to/stories260k --corpus stories.jsonl
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from m3compile.config import CompileConfig
from m3compile.kb import load_kb_model, open_kb
from m3compile.pipeline import compile_kb
from m3compile.reader import ChunkMemory, ReadLayout, generate
from m3compile.retrieve import Retriever

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # the 24-article demo and its plain model (the README's figures), not the embedded memory reader
    ap.add_argument("--model", default=str(EXAMPLES / "model"), help="checkpoint dir")
    ap.add_argument("--corpus", default=str(EXAMPLES / "corpus"))
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    opts = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="m3decode-") as tmp:
        work = Path(tmp)
        compile_kb(CompileConfig(corpus=opts.corpus, model=opts.model), work / "kb")
        kb = open_kb(work / "kb")
        ck = load_kb_model(kb, opts.model)
        layout = ReadLayout.from_manifest(kb.manifest, ck.tokenizer.bos_id)
        retriever = Retriever.open(kb.path, kb.manifest)
        text = " ".join(kb.references().column("text").to_pylist())
        prompt = ck.tokenizer.encode(text)[:opts.prompt_tokens]
        n_retrievals = []

        def retrieve(tokens):
            ids = [h.ref_id for h in retriever.retrieve(ck.tokenizer.decode(tokens), layout.refs_per_chunk)]
            n_retrievals.append(len(ids))
            return ChunkMemory.gather(kb.memories(ids), layout.memory_layers)

        rates = {"without memory": [], "with memory": []}
        for rep in range(opts.reps + 1):  # the first round warms up and is dropped, as in the paper
            for name, fn in (("without memory", None), ("with memory", retrieve)):
                kb._cache.clear()
                t = time.perf_counter()
                out = generate(ck.model, layout, prompt, fn, opts.new)
                dt = time.perf_counter() - t
                if rep:
                    rates[name].append(len(out) / dt)
        print(f"model {kb.manifest.model['path']}, {sum(p.numel() for p in ck.model.parameters()):,} params; "
              f"prompt {len(prompt)} tokens, {opts.new} new, batch 1, {opts.reps} timed runs each, "
              f"{torch.get_num_threads()} threads")
        print(f"retrievals per memory run: {len(n_retrievals) // (opts.reps + 1)} "
              f"({layout.refs_per_chunk} references each)")
        mean = {k: sum(v) / len(v) for k, v in rates.items()}
        for k, v in mean.items():
            print(f"  {k:15s} {v:8.1f} tokens/s")
        print(f"with/without memory: {mean['with memory'] / mean['without memory']:.3f} "
              f"({100 * (mean['with memory'] / mean['without memory'] - 1):+.1f} %; paper: -35.2 %)")


if __name__ == "__main__":
    main()

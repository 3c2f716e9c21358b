"""A reader's held-out fact recall from a kb compiled at each quantization.

examples/reader/corpus holds the 40 articles of the readers' world that neither reader trained on;
the kb of each --quant is compiled from them with --model (default: the embedded reader) at its
m3-memory.json's settings, then benchmarks/train_memory.py's Evaluator measures
teacher-forced fact accuracy on the same held-out questions and restatements as examples/README.md
(the first 400 records after a seeded shuffle, retrieval by BM25, Eq. 6 filter 2/3). Only the
quantization changes between rows.

    python benchmarks/reader_recall.py --quant int8 vq vq-paper
    python benchmarks/reader_recall.py --quant int8 vq --model examples/reader-half/model   # the 1/2 reader
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

from train_memory import Evaluator, eval_records  # noqa: E402  (same directory)
from m3compile.config import CompileConfig, default_model_dir  # noqa: E402
from m3compile.pipeline import compile_kb  # noqa: E402

READER = ROOT / "examples" / "reader"


def records(limit: int) -> list[dict]:
    recs = [json.loads(line) for name in ("questions.jsonl", "restatements.jsonl")
            for line in (READER / "facts" / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    return eval_records(recs, {r["entity"] for r in recs}, limit)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quant", nargs="+", default=["int8", "vq"])
    ap.add_argument("--model", type=Path, default=default_model_dir(),
                    help="a memory-trained checkpoint (default: the embedded reader)")
    ap.add_argument("--limit", type=int, default=400, help="held-out records evaluated")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    recs = records(a.limit)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="m3recall-") as tmp:
        for quant in a.quant:
            kb = Path(tmp) / quant.replace(":", "_")
            t0 = time.perf_counter()
            m = compile_kb(CompileConfig(corpus=str(READER / "corpus"), model=str(a.model), quant=quant), kb).manifest
            t = Evaluator(kb, a.model, READER).table(recs, modes=("sparse",))["sparse"]
            rows[quant] = {"scheme": m.quant["scheme"], "bits_per_element": m.quant["bits_per_element_compressed"],
                           "bits_with_codebooks": m.quant.get("bits_per_element_with_codebooks"),
                           "rel_err_mean": round(m.quant["rel_err_mean"], 4), "questions": t["question"]["fact_acc"],
                           "restatements": t["restatement"]["fact_acc"], "seconds": round(time.perf_counter() - t0, 1)}
            print(f"{quant}: {rows[quant]}", file=sys.stderr)
    print("| quant | scheme | bits/element (zstd) | with codebooks | rel. error mean | questions | restatements |")
    print("|---|---|---|---|---|---|---|")
    for q, r in rows.items():
        print(f"| {q} | {r['scheme']} | {r['bits_per_element']} | {r['bits_with_codebooks'] or '-'} | "
              f"{r['rel_err_mean']} | {100 * r['questions']:.1f} % | {100 * r['restatements']:.1f} % |")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Quantization error and size on real activations: stories260K over TinyStories stories.

    python benchmarks/quant_error.py --stories 40
"""

import argparse
import tempfile
from pathlib import Path

from common import stories260k, tinystories  # noqa: E402  (same directory)
from m3compile.config import CompileConfig
from m3compile.pipeline import compile_kb


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stories", type=int, default=40)
    opts = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="m3quant-") as tmp:
        work = Path(tmp)
        model = stories260k(work)
        stories = tinystories(opts.stories)
        (work / "corpus").mkdir()
        (work / "corpus" / "stories.txt").write_text("\n\n".join(stories))
        print("| quant | bits/element stored | after zstd | rel. error max | mean | max abs |\n|---|---|---|---|---|---|")
        for quant in ("none", "int8", "int4"):
            q = compile_kb(CompileConfig(corpus=str(work / "corpus"), model=str(model), quant=quant), work / quant).manifest.quant
            print(f"| {q['scheme']} | {q['bits_per_element_stored']:.1f} | {q['bits_per_element_compressed']:.1f} | "
                  f"{q['rel_err_max']:.4f} | {q['rel_err_mean']:.4f} | {q['max_abs_err']:.4g} |")


if __name__ == "__main__":
    main()

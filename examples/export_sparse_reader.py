"""Export the sparse reader that examples/train_sparse_reader.sh trains, as the reader example.

    python examples/export_sparse_reader.py WORK_DIR --out examples/reader

writes OUT/model (for examples/reader: the package's embedded default model, which
examples/reader/model links to) and OUT/results.json:
- the model is a "soup" (every tensor the mean of two models' weights, (a + b) / 2 in float32):
  d7m, the mean of d5m and d7r, where d5m is the mean of d32s and d5r (the default before it;
  examples/README.md, "Composed phrasings at 5/128") and d7f, d7r are two steps from d5m
  ("Free phrasings: d7f, d7r and d7m"). Each soup reads held-out phrasings about as well as its
  later part and its templates and small kbs about as well as its earlier one. The files beside the
  weights (config, tokenizer, training.json) are the last step's (d7r), its resume state left out.
  `--soup d5m` writes WORK_DIR/d5m/trained, the soup the recipe's d7f starts from;
- its m3-memory.json says the density it is read at by default: 5 of 32 tokens of layer 3, 5/128
  (~1/26) of each reference's key-values. The recipe trained it at 8 (d16y, d16z), then at 4
  (d32a, d32r, d32s) and at 5 (d5e, d5r). Read at 5 it answers at least as well as the 1/2 reader on every world
  measured and its kbs are 8x smaller than that reader's (issue 13); read at 8 (`m3 compile --top-k
  8`, 1/16) it answers best; `--top-k 4` reads it at 1/32 (examples/README.md, "The density
  frontier");
- results.json: the world whose held-out articles are the example's corpus (the first step's
  world: every later step trained on fresh worlds, so those articles were never in any training
  text), each step's arguments and held-out figures, and the settings compiled with.

The corpus and facts of OUT are those of that world's held-out entities; they are rewritten only
when missing or --corpus is given (tests/test_examples.py checks that they match).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from m3compile import __version__  # noqa: E402
from m3compile.config import read_model_memory, write_model_memory  # noqa: E402

STEPS = ("d16b", "d16w", "d16y", "d16z", "d32a", "d32r", "d32s", "d5e", "d5r", "d7f", "d7r")  # train_sparse_reader.sh, in order
READ = {"top_k": 5, "memory_layers": [3]}  # 5/128: 5 of 32 tokens, layer 3 of 4
# the retrieval floor it reads with (m3-memory.json `reading`): a retrieved reference scoring under 0.7
# of the chunk's best is not read (examples/README.md, "A floor under the retrieval score")
MIN_RELATIVE_SCORE = 0.7
WORLD = ("entities", "world_seed", "held_out", "memory_only")
MACHINE_ARGS = ("work", "json", "export", "threads", "resume")  # where it ran, not what it trained
# soups: every tensor the mean of its parts' weights (steps, or soups named before it), equal weights;
# WORK_DIR/NAME/trained once made. EXPORTED is the one exported
SOUPS = {"d5m": ("d32s", "d5r"), "d7m": ("d5m", "d7r")}
EXPORTED = "d7m"
START = {"d7f": "d5m"}  # a step that does not start from the step before it


def soup_tensors(dirs: list[Path]) -> dict:
    """Every tensor of the dirs' model.safetensors, the mean of theirs: summed and divided in
    float32, stored in their dtype (the recipe's steps are float32: exactly (a + b) / 2)."""
    from safetensors.torch import load_file

    models = [load_file(str(d / "model.safetensors")) for d in dirs]
    if any(m.keys() != models[0].keys() or any(m[k].shape != models[0][k].shape or m[k].dtype != models[0][k].dtype
                                                 for k in m) for m in models):
        sys.exit(f"error: {', '.join(map(str, dirs))} do not hold the same tensors (names, shapes, dtypes); "
                 "they are not steps of one recipe")
    mean = {}
    for k in sorted(models[0]):
        acc = models[0][k].float()
        for m in models[1:]:
            acc = acc + m[k].float()
        mean[k] = (acc / len(models)).to(models[0][k].dtype).contiguous()
    return mean


def leaves(name: str) -> list[str]:
    """The trained steps whose weights a soup (or a step: itself) is made of."""
    return [leaf for part in SOUPS[name] for leaf in leaves(part)] if name in SOUPS else [name]


def write_soup(work: Path, name: str, dest: Path | None = None) -> Path:
    """dest (default WORK_DIR/NAME/trained): soup NAME's weights (its soup parts made first where
    missing), beside its last part's files (resume state left out), with the m3-memory.json the
    export writes. Returns dest."""
    from safetensors.torch import save_file

    parts = [work / p / "trained" for p in SOUPS[name]]
    for p, d in zip(SOUPS[name], parts):
        if p in SOUPS and not (d / "model.safetensors").is_file():
            write_soup(work, p)
    mean = soup_tensors(parts)  # before dest is touched: a failure leaves it whole
    dest = (dest or work / name / "trained").resolve()
    settings = {**read_model_memory(parts[-1]), **READ}
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(parts[-1], dest, ignore=shutil.ignore_patterns("train-state*"))
    # over the last part's weights, with the metadata torch writes (transformers asks for it)
    save_file(mean, str(dest / "model.safetensors"), metadata={"format": "pt"})
    for f in dest.iterdir():
        f.chmod(0o644)  # package data: readable by all (training writes its weights owner-only)
    write_model_memory(dest, settings, f"m3compile {__version__} (examples/export_sparse_reader.py)",
                       min_relative_score=MIN_RELATIVE_SCORE)
    return dest


def step_record(name: str, res: dict, previous: str | None) -> dict:
    args = {k: v for k, v in res["args"].items() if k not in MACHINE_ARGS}
    args["start_from"] = previous or "the 1/2 reader (examples/reader-half/model)"
    return {"args": args, **{k: res[k] for k in ("split", "selection", "warm", "trained", "wall_seconds")}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work", type=Path, help="the recipe's WORK_DIR")
    ap.add_argument("--out", type=Path, help="the example folder (examples/reader)")
    ap.add_argument("--corpus", action="store_true", help="rewrite OUT/corpus and OUT/facts")
    ap.add_argument("--soup", choices=sorted(set(SOUPS) - {EXPORTED}),
                    help="only write WORK_DIR/NAME/trained, a soup a later step starts from")
    a = ap.parse_args(argv)
    if (a.out is None) == (a.soup is None):
        ap.error("give --out (the export) or --soup NAME")
    # every step's record (for the export), the last step's files and the soup's steps' weights
    needed = leaves(a.soup) if a.soup else [*leaves(EXPORTED), STEPS[-1]]
    missing = [s for s in STEPS if not a.soup and not (a.work / f"{s}.json").is_file()]
    missing += [f"{s} (its trained model)" for s in dict.fromkeys(needed)
                if not all((a.work / s / "trained" / f).is_file() for f in ("config.json", "model.safetensors"))]
    if missing:
        sys.exit(f"error: {a.work} lacks the recipe steps {', '.join(missing)}; "
                 f"run `bash examples/train_sparse_reader.sh {a.work}` first")
    if a.soup:
        print(f"{write_soup(a.work, a.soup)}: the mean of {' and '.join(SOUPS[a.soup])}")
        return
    results = {s: json.loads((a.work / f"{s}.json").read_text()) for s in STEPS}
    world = {k: results[STEPS[0]]["args"][k] for k in WORLD}
    dest = write_soup(a.work, EXPORTED, a.out / "model")
    settings = read_model_memory(dest)

    if a.corpus or not (a.out / "corpus").is_dir():
        import make_corpus
        w = make_corpus.generate(world["entities"], world["world_seed"])
        H, _, _ = make_corpus.split_world([e.id for e in w.entities], world["held_out"],
                                          world["memory_only"], world["world_seed"])
        make_corpus.write_corpus(w, a.out / "corpus", ids=H)
        make_corpus.write_facts(w, a.out / "facts", ids=H)

    out = {
        "recipe": "bash examples/train_sparse_reader.sh WORK_DIR",
        "world": world,
        "steps": {s: step_record(s, results[s], START.get(s, STEPS[i - 1] if i else None))
                  for i, s in enumerate(STEPS)},
        # every tensor the mean of these models' weights; a soup's parts are in "soups"
        "model": {"mean_of": list(SOUPS[EXPORTED]), "soups": {k: list(v) for k, v in SOUPS.items()}},
        "compile": {"max_tokens": settings["max_tokens"], "top_k": settings["top_k"],
                    "memory_layers": list(settings["memory_layers"]), "quant": "int8"},
        "reading": {"min_relative_score": MIN_RELATIVE_SCORE},
    }
    (a.out / "results.json").write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    print(f"{dest}: the mean of {' and '.join(SOUPS[EXPORTED])} read at top-{READ['top_k']} of layers {READ['memory_layers']}; "
          f"{a.out / 'results.json'}")


if __name__ == "__main__":
    main()
